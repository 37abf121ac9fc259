//! `EFI_LOAD_OPTION` (the data of `Boot####`, `PlatformRecovery####`, …): a lossless codec.
//!
//! Layout: `attributes u32 LE`, `FilePathListLength u16 LE`, description (UTF-16LE, NUL
//! terminated), `FilePathListLength` bytes of device paths, then optional data to the end.
//! `LoadOption::encode(LoadOption::decode(b)) == b` for every `b` that decodes, because
//! machined rewrites entries it did not create (firmware entries, other OSes') and must not
//! change a byte it does not mean to.
//!
//! Why the codec is written here rather than taken from the `efivar` crate (crates.io, 2.0.0):
//! a throwaway program fed it every `Boot####` and `PlatformRecovery####` of the three OVMF
//! fixture folders (`BootEntry::parse`, then `to_bytes`, compared with the input). Only 4 of
//! 34 came back identical: Boot0009/Boot000A, whose path is exactly `HD(…)/File(…)`. Its
//! `FilePathList` keeps only an `HD` and a `File` node and silently drops every other node, so
//! all firmware entries (Fv/FvFile, PciRoot/Pci/NVMe, Ata, MAC, IPv4, IPv6, Uri) and even
//! PlatformRecovery0000's bare `File` path decoded to "no path" and re-encoded without it.
//! Malformed data made it panic: setting Boot0009's `HD` node length to 0 or 2 underflows
//! `length - 4` ("attempt to subtract with overflow"), and 0xffff panics in `split_at`
//! ("mid > len"); truncated options did return errors. Its source also panics when encoding
//! an `HD` node whose signature type is neither MBR nor GPT (its own `should_panic` test), and
//! rejects attribute bits it has no flag for. machined is PID 1 and reads variables other
//! software wrote, so it needs a codec that keeps unknown nodes and never panics: this one,
//! fuzzed by the proptests below and checked against every fixture in `tests/fixtures.rs`.

use std::fmt;

use uuid::Uuid;

use crate::device_path::{DevicePath, DevicePathError, DevicePathNode, HardDrive};

/// `LOAD_OPTION_ACTIVE`: the boot manager may boot this entry.
pub const LOAD_OPTION_ACTIVE: u32 = 0x0000_0001;
/// `LOAD_OPTION_FORCE_RECONNECT`: reconnect all drivers after loading a driver option.
pub const LOAD_OPTION_FORCE_RECONNECT: u32 = 0x0000_0002;
/// `LOAD_OPTION_HIDDEN`: not shown in the firmware's boot menu.
pub const LOAD_OPTION_HIDDEN: u32 = 0x0000_0008;
/// `LOAD_OPTION_CATEGORY_APP`: an application, not a boot target (edk2's UiApp, Shell).
pub const LOAD_OPTION_CATEGORY_APP: u32 = 0x0000_0100;

/// Bytes before the description: attributes and FilePathListLength.
const FIXED_LEN: usize = 6;

/// A decoded `EFI_LOAD_OPTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    /// `LOAD_OPTION_*` bits; unknown bits are kept.
    pub attributes: u32,
    /// Human-readable name shown in the boot menu.
    pub description: EfiString,
    /// The device paths; the first one is what the firmware boots.
    pub file_path_list: DevicePath,
    /// Bytes after the device paths (edk2 stores a GUID here for its own entries).
    pub optional_data: Vec<u8>,
}

/// A UTF-16 string as stored in firmware, kept as code units so that unpaired surrogates
/// (which a Rust `String` cannot hold) still round-trip.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EfiString(Vec<u16>);

impl EfiString {
    /// The code units, without a terminator.
    pub fn as_units(&self) -> &[u16] {
        &self.0
    }

    /// The text, with any unpaired surrogate replaced by U+FFFD.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf16_lossy(&self.0)
    }
}

impl From<&str> for EfiString {
    fn from(s: &str) -> Self {
        EfiString(s.encode_utf16().collect())
    }
}

impl From<Vec<u16>> for EfiString {
    fn from(units: Vec<u16>) -> Self {
        EfiString(units)
    }
}

impl PartialEq<str> for EfiString {
    fn eq(&self, other: &str) -> bool {
        self.0.iter().copied().eq(other.encode_utf16())
    }
}

impl PartialEq<&str> for EfiString {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl fmt::Display for EfiString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

/// Why load-option bytes could not be decoded, or a load option could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadOptionError {
    /// Shorter than the 6-byte fixed header.
    #[error("load option is {len} bytes, shorter than the 6-byte attributes + FilePathListLength header")]
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// No NUL code unit before the bytes run out.
    #[error("load option description has no NUL terminator")]
    UnterminatedDescription,
    /// FilePathListLength runs past the end of the data.
    #[error("load option FilePathListLength is {declared} bytes but only {available} remain after the description")]
    FilePathListOverrun {
        /// Declared FilePathListLength.
        declared: u16,
        /// Bytes left after the description.
        available: usize,
    },
    /// The device paths do not tile.
    #[error("decoding the load option's device paths")]
    DevicePath(#[source] DevicePathError),
    /// The device paths do not fit in FilePathListLength's 16 bits.
    #[error("load option device paths are {len} bytes, more than FilePathListLength's 65535")]
    FilePathListTooLong {
        /// Encoded length.
        len: usize,
    },
    /// A NUL inside the description would end it early when read back.
    #[error("load option description {description:?} contains a NUL character")]
    NulInDescription {
        /// The description, lossily converted.
        description: String,
    },
    /// A device path node could not be encoded.
    #[error("encoding the load option's device paths")]
    EncodeDevicePath(#[source] DevicePathError),
}

impl LoadOption {
    /// Decodes `EFI_LOAD_OPTION` bytes (the variable data, without the efivarfs attribute word).
    pub fn decode(bytes: &[u8]) -> Result<Self, LoadOptionError> {
        let Some((&[a0, a1, a2, a3, l0, l1], rest)) = bytes.split_first_chunk::<FIXED_LEN>() else {
            return Err(LoadOptionError::TooShort { len: bytes.len() });
        };
        let attributes = u32::from_le_bytes([a0, a1, a2, a3]);
        let file_path_list_length = u16::from_le_bytes([l0, l1]);

        // The description ends at the first NUL code unit.
        let mut description = Vec::new();
        let mut rest = rest;
        loop {
            let Some((&unit, after)) = rest.split_first_chunk::<2>() else {
                return Err(LoadOptionError::UnterminatedDescription);
            };
            rest = after;
            match u16::from_le_bytes(unit) {
                0 => break,
                u => description.push(u),
            }
        }

        let (path_bytes, optional_data) = rest
            .split_at_checked(usize::from(file_path_list_length))
            .ok_or(LoadOptionError::FilePathListOverrun {
                declared: file_path_list_length,
                available: rest.len(),
            })?;
        let file_path_list = DevicePath::decode(path_bytes).map_err(LoadOptionError::DevicePath)?;

        Ok(LoadOption {
            attributes,
            description: EfiString(description),
            file_path_list,
            optional_data: optional_data.to_vec(),
        })
    }

    /// Encodes to `EFI_LOAD_OPTION` bytes.
    pub fn encode(&self) -> Result<Vec<u8>, LoadOptionError> {
        if self.description.0.contains(&0) {
            return Err(LoadOptionError::NulInDescription {
                description: self.description.to_string_lossy(),
            });
        }
        let paths = self
            .file_path_list
            .encode()
            .map_err(LoadOptionError::EncodeDevicePath)?;
        let paths_len = u16::try_from(paths.len())
            .map_err(|_| LoadOptionError::FilePathListTooLong { len: paths.len() })?;

        let mut out =
            Vec::with_capacity(FIXED_LEN + 2 * (self.description.0.len() + 1) + paths.len());
        out.extend(self.attributes.to_le_bytes());
        out.extend(paths_len.to_le_bytes());
        for unit in self.description.0.iter().chain([&0]) {
            out.extend(unit.to_le_bytes());
        }
        out.extend(paths);
        out.extend(&self.optional_data);
        Ok(out)
    }

    /// An active entry booting `path` on a GPT partition: the bytes
    /// `efibootmgr -c -d DISK -p N -L DESCRIPTION -l PATH` writes.
    ///
    /// `path` is used as given (efibootmgr passes `-l` through too), so give it with
    /// backslashes, e.g. `\EFI\plinth\A.efi`.
    pub fn for_esp_file(
        description: &str,
        partition_number: u32,
        partition_guid: Uuid,
        start_lba: u64,
        size_lba: u64,
        path: &str,
    ) -> Self {
        LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: EfiString::from(description),
            file_path_list: DevicePath {
                nodes: vec![
                    DevicePathNode::HardDrive(HardDrive::gpt(
                        partition_number,
                        partition_guid,
                        start_lba,
                        size_lba,
                    )),
                    DevicePathNode::FilePath(path.to_string()),
                    DevicePathNode::EndEntire,
                ],
            },
            optional_data: Vec::new(),
        }
    }

    /// Whether `LOAD_OPTION_ACTIVE` is set.
    pub fn is_active(&self) -> bool {
        self.attributes & LOAD_OPTION_ACTIVE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Boot0009 of the after-efibootmgr-create fixture, without the attribute word.
    const BOOT0009: &[u8] = &[
        0x01, 0x00, 0x00, 0x00, 0x56, 0x00, 0x50, 0x00, 0x6c, 0x00, 0x69, 0x00, 0x6e, 0x00, 0x74,
        0x00, 0x68, 0x00, 0x20, 0x00, 0x41, 0x00, 0x00, 0x00, 0x04, 0x01, 0x2a, 0x00, 0x01, 0x00,
        0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x02, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x59, 0x32, 0xad, 0xdc, 0xe5, 0x41, 0xa9, 0x41, 0x9b, 0xcb, 0xd1, 0xff,
        0x21, 0x1e, 0xd9, 0xf6, 0x02, 0x02, 0x04, 0x04, 0x28, 0x00, 0x5c, 0x00, 0x45, 0x00, 0x46,
        0x00, 0x49, 0x00, 0x5c, 0x00, 0x70, 0x00, 0x6c, 0x00, 0x69, 0x00, 0x6e, 0x00, 0x74, 0x00,
        0x68, 0x00, 0x5c, 0x00, 0x41, 0x00, 0x2e, 0x00, 0x65, 0x00, 0x66, 0x00, 0x69, 0x00, 0x00,
        0x00, 0x7f, 0xff, 0x04, 0x00,
    ];

    /// Boot0002 of the fresh fixture (PciRoot/Pci/NVMe, edk2 GUID as optional data).
    const BOOT0002: &[u8] = &[
        0x01, 0x00, 0x00, 0x00, 0x26, 0x00, 0x55, 0x00, 0x45, 0x00, 0x46, 0x00, 0x49, 0x00, 0x20,
        0x00, 0x51, 0x00, 0x45, 0x00, 0x4d, 0x00, 0x55, 0x00, 0x20, 0x00, 0x4e, 0x00, 0x56, 0x00,
        0x4d, 0x00, 0x65, 0x00, 0x20, 0x00, 0x43, 0x00, 0x74, 0x00, 0x72, 0x00, 0x6c, 0x00, 0x20,
        0x00, 0x70, 0x00, 0x6c, 0x00, 0x69, 0x00, 0x6e, 0x00, 0x74, 0x00, 0x68, 0x00, 0x30, 0x00,
        0x20, 0x00, 0x31, 0x00, 0x00, 0x00, 0x02, 0x01, 0x0c, 0x00, 0xd0, 0x41, 0x03, 0x0a, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x01, 0x06, 0x00, 0x00, 0x04, 0x03, 0x17, 0x10, 0x00, 0x01, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x7f, 0xff, 0x04, 0x00, 0x4e,
        0xac, 0x08, 0x81, 0x11, 0x9f, 0x59, 0x4d, 0x85, 0x0e, 0xe2, 0x1a, 0x52, 0x2c, 0x59, 0xb2,
    ];

    #[test]
    fn boot0009_decodes_to_plinth_a_on_the_esp() {
        let opt = LoadOption::decode(BOOT0009).unwrap();
        assert!(opt.is_active());
        assert_eq!(opt.description, "Plinth A");
        assert_eq!(opt.file_path_list.file_path(), Some("\\EFI\\plinth\\A.efi"));
        let hd = opt.file_path_list.hard_drive().unwrap();
        assert_eq!(
            hd.partition_guid(),
            Some(Uuid::parse_str("dcad3259-41e5-41a9-9bcb-d1ff211ed9f6").unwrap())
        );
        assert!(opt.optional_data.is_empty());
    }

    #[test]
    fn description_with_lone_surrogate_round_trips() {
        let opt = LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: EfiString::from(vec![0x0041, 0xd800, 0x0042]),
            file_path_list: DevicePath {
                nodes: vec![DevicePathNode::EndEntire],
            },
            optional_data: vec![1, 2, 3],
        };
        let bytes = opt.encode().unwrap();
        assert_eq!(LoadOption::decode(&bytes).unwrap(), opt);
        assert_eq!(opt.description.to_string(), "A\u{fffd}B");
    }

    #[test]
    fn description_without_terminator_is_an_error() {
        let bytes = [1, 0, 0, 0, 4, 0, b'A', 0, b'B'];
        assert_eq!(
            LoadOption::decode(&bytes),
            Err(LoadOptionError::UnterminatedDescription)
        );
    }

    #[test]
    fn file_path_list_length_past_the_end_is_an_error() {
        let mut bytes = BOOT0009.to_vec();
        bytes[4..6].copy_from_slice(&0x2000u16.to_le_bytes());
        assert_eq!(
            LoadOption::decode(&bytes),
            Err(LoadOptionError::FilePathListOverrun {
                declared: 0x2000,
                available: 0x56
            })
        );
    }

    #[test]
    fn header_shorter_than_six_bytes_is_an_error() {
        assert_eq!(
            LoadOption::decode(&[1, 0, 0]),
            Err(LoadOptionError::TooShort { len: 3 })
        );
    }

    #[test]
    fn description_with_nul_refuses_to_encode() {
        let mut opt = LoadOption::decode(BOOT0009).unwrap();
        opt.description = EfiString::from("Plinth\0A");
        assert!(matches!(
            opt.encode(),
            Err(LoadOptionError::NulInDescription { .. })
        ));
    }

    /// What the codec promises for any input: no panic, and whatever decodes re-encodes to
    /// the same bytes.
    fn check_total(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(opt) = LoadOption::decode(bytes) {
            let again = opt
                .encode()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &bytes);
            // Display must not panic either.
            let _ = opt.file_path_list.to_string();
        }
        if let Ok(path) = DevicePath::decode(bytes) {
            let again = path
                .encode()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &bytes);
            let _ = path.to_string();
        }
        Ok(())
    }

    /// Overwrite, insert or delete bytes of a fixture.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        Truncate(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Remove),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    fn mutate(base: &[u8], mutations: &[Mutation]) -> Vec<u8> {
        let mut bytes = base.to_vec();
        for m in mutations {
            let len = bytes.len();
            match *m {
                Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
                Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
                Mutation::Remove(i) if len > 0 => {
                    bytes.remove(i % len);
                }
                Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
                _ => {}
            }
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic_and_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            check_total(&bytes)?;
        }

        #[test]
        fn mutated_fixture_bytes_never_panic_and_round_trip(
            base in prop_oneof![Just(BOOT0009), Just(BOOT0002)],
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            check_total(&mutate(base, &mutations))?;
        }

        #[test]
        fn mutated_device_path_bytes_never_panic_and_round_trip(
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            // The file path list alone, so mutations land in node headers more often.
            let paths = &BOOT0002[0x42..0x68];
            check_total(&mutate(paths, &mutations))?;
        }

        #[test]
        fn any_esp_entry_round_trips(
            description in "[ -~]{0,40}",
            partition in any::<u32>(),
            guid in any::<u128>(),
            start in any::<u64>(),
            size in any::<u64>(),
            path in "(\\\\[A-Za-z0-9._-]{1,12}){1,4}",
        ) {
            let opt = LoadOption::for_esp_file(&description, partition, Uuid::from_u128(guid), start, size, &path);
            let bytes = opt.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(LoadOption::decode(&bytes), Ok(opt));
        }
    }
}
