//! The bundle manifest: parsing never panics, and what parses serialises and parses back the
//! same. (On a node only signed manifests reach the parser; here every input does.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use upgrade::bundle::parse_manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse_manifest(data) {
        let json = serde_json::to_vec(&m).expect("a manifest serialises");
        let again = parse_manifest(&json).expect("a serialised manifest parses");
        assert_eq!(again, m);
    }
});
