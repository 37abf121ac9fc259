//! The node config: parsing and validation never panic on any text, and a config that is
//! accepted writes out to YAML that is accepted again as the same config.
#![no_main]

use config::NodeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = NodeConfig::from_yaml(text) {
        let yaml = cfg.to_yaml().expect("an accepted config writes out");
        let again = NodeConfig::from_yaml(&yaml).expect("a written config reads back");
        assert_eq!(again, cfg);
    }
});
