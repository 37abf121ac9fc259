//! `EFI_LOAD_OPTION` and device paths: decoding never panics, and whatever decodes encodes
//! back to the same bytes (the codec is lossless: entries written by others survive a rewrite).
#![no_main]

use bootloader::{DevicePath, LoadOption};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(option) = LoadOption::decode(data) {
        let again = option.encode().expect("a decoded option encodes");
        assert_eq!(again, data, "load option does not round-trip");
        // Rendering (what Status shows as efibootmgr -v does) never panics either.
        let _ = option.file_path_list.to_string();
        let _ = option.description.to_string();
    }
    if let Ok(path) = DevicePath::decode(data) {
        let again = path.encode().expect("a decoded device path encodes");
        assert_eq!(again, data, "device path does not round-trip");
        let _ = path.to_string();
    }
});
