//! Typed access to the boot-manager variables on a [`VarStore`].
//!
//! Each accessor reads or writes one variable and checks its shape; malformed data is an
//! error naming the variable, never a panic. No policy lives here: which entry a slot uses
//! and how `BootOrder` is reconciled are decided by the caller.

use uuid::Uuid;

use crate::device_path::utf16le_units;
use crate::efivarfs::{
    VarName, VarStore, VarStoreError, BOOTSERVICE_ACCESS, LOADER_VARIABLE, NON_VOLATILE,
    RUNTIME_ACCESS,
};
use crate::load_option::{LoadOption, LoadOptionError};

/// Attributes of the boot-manager variables the OS writes: non-volatile, visible at boot and
/// at runtime (what efibootmgr and the firmware use).
pub const BOOT_VAR_ATTRIBUTES: u32 = NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS;

/// `BootCurrent`: the entry the firmware booted this time.
pub const BOOT_CURRENT: &str = "BootCurrent";
/// `BootNext`: a one-shot entry for the next boot; the firmware deletes it before booting it.
pub const BOOT_NEXT: &str = "BootNext";
/// `BootOrder`: the entries the firmware tries, in order.
pub const BOOT_ORDER: &str = "BootOrder";
/// `LoaderDevicePartUUID`: the partition systemd-stub was loaded from (volatile).
pub const LOADER_DEVICE_PART_UUID: &str = "LoaderDevicePartUUID";

/// Why a boot-manager variable could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BootVarError {
    /// The store failed (the error names the variable and its file).
    #[error(transparent)]
    Store(#[from] VarStoreError),
    /// A variable's data length does not fit its type.
    #[error("EFI variable {name} holds {len} bytes, expected {expected}")]
    BadLength {
        /// The variable.
        name: VarName,
        /// Bytes present.
        len: usize,
        /// What the type needs.
        expected: &'static str,
    },
    /// A `Boot####` (or similar) variable is not a valid load option.
    #[error("decoding load option {name}")]
    DecodeLoadOption {
        /// The variable.
        name: VarName,
        /// What was wrong.
        #[source]
        source: LoadOptionError,
    },
    /// A load option could not be encoded for writing.
    #[error("encoding load option for {name}")]
    EncodeLoadOption {
        /// The variable.
        name: VarName,
        /// What was wrong.
        #[source]
        source: LoadOptionError,
    },
    /// `LoaderDevicePartUUID` is not a UTF-16 GUID string.
    #[error("EFI variable {name} holds {value:?}, not a partition GUID")]
    BadGuid {
        /// The variable.
        name: VarName,
        /// The text found (lossy).
        value: String,
    },
}

/// The name of the `Boot####` variable for entry `number` (four uppercase hex digits).
pub fn boot_entry_name(number: u16) -> VarName {
    VarName::global(format!("Boot{number:04X}"))
}

/// The entry number of a `Boot####` variable name, if it is one. The spec spells the
/// number in uppercase hex; other spellings are not boot entries to the firmware.
pub fn boot_entry_number(name: &VarName) -> Option<u16> {
    if name.vendor() != crate::efivarfs::EFI_GLOBAL_VARIABLE {
        return None;
    }
    let hex = name.name().strip_prefix("Boot")?;
    let upper_hex = |c: char| c.is_ascii_digit() || ('A'..='F').contains(&c);
    if hex.len() != 4 || !hex.chars().all(upper_hex) {
        return None;
    }
    u16::from_str_radix(hex, 16).ok()
}

/// The `Boot####` entries, split by whether they decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootEntries {
    /// Those that decode, ascending by number.
    pub readable: Vec<(u16, LoadOption)>,
    /// The numbers of those that do not.
    pub unreadable: Vec<u16>,
}

impl VarStore {
    /// `BootCurrent`, the entry booted this time; `None` if the firmware did not set it.
    pub fn boot_current(&self) -> Result<Option<u16>, BootVarError> {
        self.get_u16(&VarName::global(BOOT_CURRENT))
    }

    /// `BootNext`, the one-shot entry for the next boot, if set.
    pub fn boot_next(&self) -> Result<Option<u16>, BootVarError> {
        self.get_u16(&VarName::global(BOOT_NEXT))
    }

    /// Sets `BootNext`: the firmware boots `number` once, deleting `BootNext` before it starts
    /// the entry, and falls back to `BootOrder` on the boot after.
    pub fn set_boot_next(&self, number: u16) -> Result<(), BootVarError> {
        self.set(
            &VarName::global(BOOT_NEXT),
            BOOT_VAR_ATTRIBUTES,
            &number.to_le_bytes(),
        )?;
        Ok(())
    }

    /// Deletes `BootNext`; succeeds if it was not set.
    pub fn delete_boot_next(&self) -> Result<(), BootVarError> {
        self.delete(&VarName::global(BOOT_NEXT))?;
        Ok(())
    }

    /// `BootOrder`; empty if not set.
    pub fn boot_order(&self) -> Result<Vec<u16>, BootVarError> {
        let name = VarName::global(BOOT_ORDER);
        let Some(var) = self.get(&name)? else {
            return Ok(Vec::new());
        };
        if !var.data.len().is_multiple_of(2) {
            return Err(BootVarError::BadLength {
                name,
                len: var.data.len(),
                expected: "an even number (a list of u16 entry numbers)",
            });
        }
        Ok(var
            .data
            .chunks_exact(2)
            .filter_map(|c| c.try_into().ok())
            .map(u16::from_le_bytes)
            .collect())
    }

    /// Replaces `BootOrder`. The firmware may append its own entries again on the next boot.
    /// An empty order is refused (writing nothing would delete the variable on firmware).
    pub fn set_boot_order(&self, order: &[u16]) -> Result<(), BootVarError> {
        let data: Vec<u8> = order.iter().flat_map(|n| n.to_le_bytes()).collect();
        self.set(&VarName::global(BOOT_ORDER), BOOT_VAR_ATTRIBUTES, &data)?;
        Ok(())
    }

    /// `LoaderDevicePartUUID` (set by systemd-stub/systemd-boot: the GUID as NUL-terminated
    /// UTF-16LE text, uppercase); `None` if this boot did not go through a stub.
    pub fn loader_device_part_uuid(&self) -> Result<Option<Uuid>, BootVarError> {
        let name = VarName::new(LOADER_DEVICE_PART_UUID, LOADER_VARIABLE);
        let Some(var) = self.get(&name)? else {
            return Ok(None);
        };
        let Some(units) = utf16le_units(&var.data) else {
            return Err(BootVarError::BadLength {
                name,
                len: var.data.len(),
                expected: "an even number (UTF-16 text)",
            });
        };
        let text = match units.split_last() {
            Some((0, body)) => body,
            _ => units.as_slice(),
        };
        let text = String::from_utf16_lossy(text);
        // Uuid parsing is case-insensitive; the stub writes uppercase.
        match Uuid::try_parse(&text) {
            Ok(uuid) => Ok(Some(uuid)),
            Err(_) => Err(BootVarError::BadGuid { name, value: text }),
        }
    }

    /// The load option `Boot####` for `number`, if it exists.
    pub fn boot_entry(&self, number: u16) -> Result<Option<LoadOption>, BootVarError> {
        self.get_load_option(&boot_entry_name(number))
    }

    /// Writes `Boot####` for `number`.
    pub fn set_boot_entry(&self, number: u16, option: &LoadOption) -> Result<(), BootVarError> {
        let name = boot_entry_name(number);
        let data = option
            .encode()
            .map_err(|source| BootVarError::EncodeLoadOption {
                name: name.clone(),
                source,
            })?;
        self.set(&name, BOOT_VAR_ATTRIBUTES, &data)?;
        Ok(())
    }

    /// Deletes `Boot####` for `number`; succeeds if it did not exist.
    pub fn delete_boot_entry(&self, number: u16) -> Result<(), BootVarError> {
        self.delete(&boot_entry_name(number))?;
        Ok(())
    }

    /// The numbers of every `Boot####` variable, ascending.
    pub fn boot_entry_numbers(&self) -> Result<Vec<u16>, BootVarError> {
        let mut numbers: Vec<u16> = self.list()?.iter().filter_map(boot_entry_number).collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Every `Boot####` entry, ascending by number. One malformed entry fails the whole
    /// listing, naming it; use [`Self::boot_entry_numbers`] and [`Self::boot_entry`] to
    /// skip such entries instead.
    pub fn boot_entries(&self) -> Result<Vec<(u16, LoadOption)>, BootVarError> {
        let mut entries = Vec::new();
        for number in self.boot_entry_numbers()? {
            // An entry deleted between list and read is simply gone.
            if let Some(option) = self.boot_entry(number)? {
                entries.push((number, option));
            }
        }
        Ok(entries)
    }

    /// Every `Boot####` entry that decodes, and the numbers of those that do not (a firmware
    /// or another OS may write entries this codec cannot read: they are not ours to fail on,
    /// nor to delete).
    pub fn readable_boot_entries(&self) -> Result<BootEntries, BootVarError> {
        let mut out = BootEntries::default();
        for number in self.boot_entry_numbers()? {
            match self.boot_entry(number) {
                Ok(Some(option)) => out.readable.push((number, option)),
                Ok(None) => {}
                Err(BootVarError::DecodeLoadOption { .. }) => out.unreadable.push(number),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Any variable holding an `EFI_LOAD_OPTION` (`Boot####`, `PlatformRecovery####`, …).
    pub fn get_load_option(&self, name: &VarName) -> Result<Option<LoadOption>, BootVarError> {
        let Some(var) = self.get(name)? else {
            return Ok(None);
        };
        LoadOption::decode(&var.data)
            .map(Some)
            .map_err(|source| BootVarError::DecodeLoadOption {
                name: name.clone(),
                source,
            })
    }

    fn get_u16(&self, name: &VarName) -> Result<Option<u16>, BootVarError> {
        let Some(var) = self.get(name)? else {
            return Ok(None);
        };
        let bytes: [u8; 2] =
            var.data
                .as_slice()
                .try_into()
                .map_err(|_| BootVarError::BadLength {
                    name: name.clone(),
                    len: var.data.len(),
                    expected: "2 (a u16 entry number)",
                })?;
        Ok(Some(u16::from_le_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, VarStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = VarStore::new(dir.path());
        (dir, store)
    }

    #[test]
    fn boot_entry_names_are_four_uppercase_hex_digits() {
        assert_eq!(boot_entry_name(0x000a).name(), "Boot000A");
        assert_eq!(boot_entry_number(&VarName::global("Boot000A")), Some(10));
        assert_eq!(boot_entry_number(&VarName::global("Boot000a")), None);
        assert_eq!(boot_entry_number(&VarName::global("BootOrder")), None);
        assert_eq!(boot_entry_number(&VarName::global("Boot00001")), None);
        assert_eq!(boot_entry_number(&VarName::global("Boot+001")), None);
        assert_eq!(
            boot_entry_number(&VarName::new("Boot0001", LOADER_VARIABLE)),
            None
        );
    }

    #[test]
    fn boot_next_round_trips_and_delete_is_idempotent() {
        let (_dir, store) = store();
        assert_eq!(store.boot_next().unwrap(), None);
        store.set_boot_next(0x000a).unwrap();
        assert_eq!(store.boot_next().unwrap(), Some(0x000a));
        let var = store.get(&VarName::global(BOOT_NEXT)).unwrap().unwrap();
        assert_eq!(var.attributes, BOOT_VAR_ATTRIBUTES);
        store.delete_boot_next().unwrap();
        store.delete_boot_next().unwrap();
        assert_eq!(store.boot_next().unwrap(), None);
    }

    #[test]
    fn boot_order_round_trips_and_shrinks() {
        let (_dir, store) = store();
        assert_eq!(store.boot_order().unwrap(), Vec::<u16>::new());
        store.set_boot_order(&[9, 0, 1, 2]).unwrap();
        store.set_boot_order(&[10, 9]).unwrap();
        assert_eq!(store.boot_order().unwrap(), [10, 9]);
    }

    #[test]
    fn empty_boot_order_is_refused() {
        let (_dir, store) = store();
        assert!(matches!(
            store.set_boot_order(&[]),
            Err(BootVarError::Store(VarStoreError::EmptyValue { .. }))
        ));
    }

    #[test]
    fn odd_length_boot_order_is_an_error_naming_it() {
        let (_dir, store) = store();
        store
            .set(
                &VarName::global(BOOT_ORDER),
                BOOT_VAR_ATTRIBUTES,
                &[9, 0, 1],
            )
            .unwrap();
        let err = store.boot_order().unwrap_err();
        assert!(err.to_string().contains("BootOrder-8be4df61"), "{err}");
    }

    #[test]
    fn boot_current_of_wrong_length_is_an_error_naming_it() {
        let (_dir, store) = store();
        store
            .set(
                &VarName::global(BOOT_CURRENT),
                BOOT_VAR_ATTRIBUTES,
                &[2, 0, 0],
            )
            .unwrap();
        let err = store.boot_current().unwrap_err();
        assert!(
            matches!(&err, BootVarError::BadLength { name, len: 3, .. } if name.name() == BOOT_CURRENT),
            "{err}"
        );
    }

    #[test]
    fn lowercase_loader_device_part_uuid_parses_too() {
        let (_dir, store) = store();
        let text = "dcad3259-41e5-41a9-9bcb-d1ff211ed9f6";
        let data: Vec<u8> = text
            .encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect();
        store
            .set(
                &VarName::new(LOADER_DEVICE_PART_UUID, LOADER_VARIABLE),
                6,
                &data,
            )
            .unwrap();
        assert_eq!(
            store.loader_device_part_uuid().unwrap(),
            Some(Uuid::parse_str(text).unwrap())
        );
    }

    #[test]
    fn garbage_loader_device_part_uuid_is_an_error_naming_it() {
        let (_dir, store) = store();
        let name = VarName::new(LOADER_DEVICE_PART_UUID, LOADER_VARIABLE);
        store.set(&name, 6, &[b'x', 0, 0, 0]).unwrap();
        assert!(matches!(
            store.loader_device_part_uuid(),
            Err(BootVarError::BadGuid { value, .. }) if value == "x"
        ));
        store.set(&name, 6, &[b'x', 0, 0]).unwrap();
        assert!(matches!(
            store.loader_device_part_uuid(),
            Err(BootVarError::BadLength { len: 3, .. })
        ));
    }

    #[test]
    fn malformed_boot_entry_is_an_error_naming_it() {
        let (_dir, store) = store();
        store
            .set(
                &boot_entry_name(3),
                BOOT_VAR_ATTRIBUTES,
                &[1, 0, 0, 0, 4, 0, b'A'],
            )
            .unwrap();
        let err = store.boot_entries().unwrap_err();
        assert!(err.to_string().contains("Boot0003-8be4df61"), "{err}");
        assert_eq!(store.boot_entry_numbers().unwrap(), [3]);
    }

    #[test]
    fn boot_entry_round_trips_through_the_store() {
        let (_dir, store) = store();
        let guid = Uuid::parse_str("dcad3259-41e5-41a9-9bcb-d1ff211ed9f6").unwrap();
        let option =
            LoadOption::for_esp_file("Plinth A", 1, guid, 0x800, 0x28000, "\\EFI\\plinth\\A.efi");
        store.set_boot_entry(0x0009, &option).unwrap();
        assert_eq!(store.boot_entry(0x0009).unwrap(), Some(option.clone()));
        assert_eq!(store.boot_entries().unwrap(), [(0x0009, option)]);
        store.delete_boot_entry(0x0009).unwrap();
        assert_eq!(store.boot_entry(0x0009).unwrap(), None);
    }
}
