//! META copies: decoding never panics. The first byte chooses whether the checksum is fixed up
//! first, so mutations also reach the record parser behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upgrade::meta::{decode_copy, encode_copy, HEADER};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if mode & 1 == 1 && buf.len() >= HEADER {
        // Make the length field cover the rest and append the right checksum.
        let len = (buf.len() - HEADER) as u32;
        buf[20..24].copy_from_slice(&len.to_le_bytes());
        let sum = blake3::hash(&buf);
        buf.extend_from_slice(sum.as_bytes());
    }
    if let Ok((seq, meta)) = decode_copy(&buf) {
        // What decodes re-encodes, and that decodes to the same record.
        let again = encode_copy(seq, &meta).expect("a decoded record encodes");
        let (seq2, meta2) = decode_copy(&again).expect("re-encoded copy decodes");
        assert_eq!((seq, &meta), (seq2, &meta2));
    }
});
