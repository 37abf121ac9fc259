//! Golden tests against real OVMF variables (see `tests/data/ovmf-efivars/README.md`), and the
//! store's file format in a temp dir. Uses the crate's public API only.
//!
//! The fixtures are copied into `tests/data/` so a clean clone tests on its own;
//! `fixture_copy_matches_shared_fixtures` checks the copy against the shared original when the
//! workspace sits beside it.

use std::fs;
use std::path::{Path, PathBuf};

use bootloader::boot_vars::{boot_entry_number, BOOT_VAR_ATTRIBUTES};
use bootloader::device_path::DevicePathNode;
use bootloader::efivarfs::{
    BOOTSERVICE_ACCESS, EFI_GLOBAL_VARIABLE, LOADER_VARIABLE, NON_VOLATILE, RUNTIME_ACCESS,
};
use bootloader::{DevicePath, LoadOption, VarName, VarStore, VarStoreError};
use uuid::Uuid;

const FOLDERS: [&str; 3] = ["fresh", "after-efibootmgr-create", "after-failed-trial"];
const ESP_GUID: &str = "dcad3259-41e5-41a9-9bcb-d1ff211ed9f6";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ovmf-efivars")
}

fn fixture(folder: &str) -> VarStore {
    VarStore::new(data_dir().join(folder))
}

fn esp_guid() -> Uuid {
    Uuid::parse_str(ESP_GUID).unwrap()
}

fn is_load_option(name: &VarName) -> bool {
    let n = name.name();
    name.vendor() == EFI_GLOBAL_VARIABLE
        && (boot_entry_number(name).is_some()
            || n.strip_prefix("PlatformRecovery")
                .is_some_and(|hex| hex.len() == 4 && hex.chars().all(|c| c.is_ascii_hexdigit())))
}

fn is_console_path(name: &VarName) -> bool {
    name.vendor() == EFI_GLOBAL_VARIABLE
        && [
            "ConIn",
            "ConOut",
            "ErrOut",
            "ConInDev",
            "ConOutDev",
            "ErrOutDev",
        ]
        .contains(&name.name())
}

/// Every (folder, variable name, data) for which `pick` holds.
fn fixture_vars(pick: fn(&VarName) -> bool) -> Vec<(&'static str, VarName, Vec<u8>)> {
    let mut out = Vec::new();
    for folder in FOLDERS {
        let store = fixture(folder);
        for name in store.list().unwrap().into_iter().filter(pick) {
            let var = store.get(&name).unwrap().unwrap();
            out.push((folder, name, var.data));
        }
    }
    out
}

#[test]
fn every_fixture_load_option_round_trips_byte_for_byte() {
    let vars = fixture_vars(is_load_option);
    // 9 + 11 + 11 Boot#### and one PlatformRecovery0000 per folder.
    assert_eq!(vars.len(), 34);
    for (folder, name, data) in vars {
        let option = LoadOption::decode(&data).unwrap_or_else(|e| panic!("{folder}/{name}: {e}"));
        assert_eq!(option.encode().unwrap(), data, "{folder}/{name}");
    }
}

#[test]
fn every_fixture_console_device_path_round_trips_byte_for_byte() {
    let vars = fixture_vars(is_console_path);
    assert_eq!(vars.len(), 18);
    for (folder, name, data) in vars {
        let path = DevicePath::decode(&data).unwrap_or_else(|e| panic!("{folder}/{name}: {e}"));
        assert_eq!(path.encode().unwrap(), data, "{folder}/{name}");
    }
}

#[test]
fn every_node_ovmf_emits_decodes_to_a_typed_node() {
    let mut paths: Vec<(String, DevicePath)> = fixture_vars(is_console_path)
        .into_iter()
        .map(|(folder, name, data)| {
            (
                format!("{folder}/{name}"),
                DevicePath::decode(&data).unwrap(),
            )
        })
        .collect();
    paths.extend(
        fixture_vars(is_load_option)
            .into_iter()
            .map(|(folder, name, data)| {
                (
                    format!("{folder}/{name}"),
                    LoadOption::decode(&data).unwrap().file_path_list,
                )
            }),
    );
    for (what, path) in paths {
        let raw: Vec<_> = path
            .nodes
            .iter()
            .filter(|n| matches!(n, DevicePathNode::Raw(_)))
            .collect();
        assert!(raw.is_empty(), "{what}: untyped nodes {raw:?}");
    }
}

#[test]
fn encoder_reproduces_efibootmgr_boot0009() {
    let store = fixture("after-efibootmgr-create");
    let expected = store.get(&VarName::global("Boot0009")).unwrap().unwrap();
    let option = LoadOption::for_esp_file(
        "Plinth A",
        1,
        esp_guid(),
        0x800,
        0x28000,
        r"\EFI\plinth\A.efi",
    );
    assert_eq!(option.encode().unwrap(), expected.data);
    assert_eq!(expected.attributes, BOOT_VAR_ATTRIBUTES);
}

#[test]
fn encoder_reproduces_efibootmgr_boot000a() {
    let store = fixture("after-efibootmgr-create");
    let expected = store.get(&VarName::global("Boot000A")).unwrap().unwrap();
    let option = LoadOption::for_esp_file(
        "Plinth B",
        1,
        esp_guid(),
        0x800,
        0x28000,
        r"\EFI\plinth\B.efi",
    );
    assert_eq!(option.encode().unwrap(), expected.data);
    assert_eq!(expected.attributes, BOOT_VAR_ATTRIBUTES);
}

#[test]
fn boot0009_path_displays_like_efibootmgr() {
    let option = fixture("after-efibootmgr-create")
        .boot_entry(0x0009)
        .unwrap()
        .unwrap();
    assert_eq!(option.description, "Plinth A");
    assert_eq!(
        option.file_path_list.to_string(),
        r"HD(1,GPT,dcad3259-41e5-41a9-9bcb-d1ff211ed9f6,0x800,0x28000)/File(\EFI\plinth\A.efi)"
    );
}

#[test]
fn firmware_entries_display_as_in_the_serial_log() {
    let store = fixture("fresh");
    let path = |n| {
        store
            .boot_entry(n)
            .unwrap()
            .unwrap()
            .file_path_list
            .to_string()
    };
    assert_eq!(
        path(0x0001),
        "PciRoot(0x0)/Pci(0x1,0x1)/Ata(Secondary,Master,0x0)"
    );
    assert_eq!(
        path(0x0002),
        "PciRoot(0x0)/Pci(0x4,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)"
    );
    assert_eq!(
        path(0x0003),
        "PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,0x1)"
    );
    assert_eq!(
        path(0x0000),
        "Fv(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)"
    );
    assert_eq!(
        path(0x0006),
        "PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0,0x0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)/Uri()"
    );
}

#[test]
fn console_paths_display_every_instance() {
    let con_out = fixture("fresh")
        .get(&VarName::global("ConOut"))
        .unwrap()
        .unwrap();
    assert_eq!(
        DevicePath::decode(&con_out.data).unwrap().to_string(),
        "PciRoot(0x0)/Pci(0x1,0x0)/Serial(0x0)/Uart(115200,8,N,1)/\
         VenMsg(e0c14753-f9be-11d2-9a0c-0090273fc14d),\
         PciRoot(0x0)/Pci(0x2,0x0)/AcpiAdr(0x80010100)"
    );
}

#[test]
fn fresh_boot_ran_0002_with_the_firmware_order_and_no_boot_next() {
    let store = fixture("fresh");
    assert_eq!(store.boot_current().unwrap(), Some(0x0002));
    assert_eq!(
        store.boot_order().unwrap(),
        (0x0000..=0x0008).collect::<Vec<u16>>()
    );
    assert_eq!(store.boot_next().unwrap(), None);
    assert_eq!(
        store.boot_entry_numbers().unwrap(),
        (0x0000..=0x0008).collect::<Vec<u16>>()
    );
}

#[test]
fn efibootmgr_create_left_boot_next_000a_and_order_0009() {
    let store = fixture("after-efibootmgr-create");
    assert_eq!(store.boot_current().unwrap(), Some(0x0002));
    assert_eq!(store.boot_next().unwrap(), Some(0x000a));
    assert_eq!(store.boot_order().unwrap(), [0x0009]);
    let entries = store.boot_entries().unwrap();
    let numbers: Vec<u16> = entries.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (0x0000..=0x000a).collect::<Vec<u16>>());
    let (_, b) = &entries[10];
    assert_eq!(b.description, "Plinth B");
    assert_eq!(b.file_path_list.file_path(), Some(r"\EFI\plinth\B.efi"));
}

#[test]
fn after_failed_trial_boot_next_is_consumed_and_firmware_reappended_its_entries() {
    let store = fixture("after-failed-trial");
    assert_eq!(store.boot_current().unwrap(), Some(0x0009));
    assert_eq!(store.boot_next().unwrap(), None);
    let mut expected = vec![0x0009];
    expected.extend(0x0000..=0x0008);
    assert_eq!(store.boot_order().unwrap(), expected);
}

#[test]
fn loader_device_part_uuid_names_the_esp() {
    for folder in FOLDERS {
        assert_eq!(
            fixture(folder).loader_device_part_uuid().unwrap(),
            Some(esp_guid()),
            "{folder}"
        );
    }
}

#[test]
fn stub_variables_are_volatile() {
    let store = fixture("after-failed-trial");
    let stub_vars: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.vendor() == LOADER_VARIABLE)
        .collect();
    assert!(!stub_vars.is_empty());
    for name in stub_vars {
        let var = store.get(&name).unwrap().unwrap();
        assert_eq!(
            var.attributes,
            BOOTSERVICE_ACCESS | RUNTIME_ACCESS,
            "{name}"
        );
    }
}

#[test]
fn fixture_copy_matches_shared_fixtures() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/ovmf-efivars");
    if !shared.is_dir() {
        eprintln!("skipping: {} is not beside this checkout", shared.display());
        return;
    }
    for folder in FOLDERS {
        let ours = list_files(&data_dir().join(folder));
        let theirs = list_files(&shared.join(folder));
        assert_eq!(ours, theirs, "{folder}: file lists differ");
        for file in ours {
            let a = fs::read(data_dir().join(folder).join(&file)).unwrap();
            let b = fs::read(shared.join(folder).join(&file)).unwrap();
            assert!(a == b, "{folder}/{file} differs from the shared fixture");
        }
    }
}

fn list_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

// --- VarStore on a temp dir: the efivarfs file format ---

#[test]
fn set_get_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    let name = VarName::global("Timeout");
    assert_eq!(store.get(&name).unwrap(), None);
    store
        .set(&name, NON_VOLATILE | BOOTSERVICE_ACCESS, &[3, 0])
        .unwrap();
    let var = store.get(&name).unwrap().unwrap();
    assert_eq!(var.attributes, NON_VOLATILE | BOOTSERVICE_ACCESS);
    assert_eq!(var.data, [3, 0]);
    store.delete(&name).unwrap();
    assert_eq!(store.get(&name).unwrap(), None);
    // Deleting again is not an error.
    store.delete(&name).unwrap();
}

#[test]
fn variable_file_is_attributes_le_then_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    store.set_boot_next(0x000a).unwrap();
    let file = dir
        .path()
        .join("BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c");
    assert_eq!(fs::read(file).unwrap(), [0x07, 0, 0, 0, 0x0a, 0x00]);
}

#[test]
fn set_replaces_a_longer_value_entirely() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    let name = VarName::global("BootOrder");
    store
        .set(&name, BOOT_VAR_ATTRIBUTES, &[9, 0, 0, 0, 1, 0])
        .unwrap();
    store.set(&name, BOOT_VAR_ATTRIBUTES, &[10, 0]).unwrap();
    assert_eq!(
        fs::read(store.path_of(&name).unwrap()).unwrap(),
        [0x07, 0, 0, 0, 10, 0]
    );
}

#[test]
fn empty_value_is_refused_rather_than_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    let err = store
        .set(&VarName::global("BootNext"), BOOT_VAR_ATTRIBUTES, &[])
        .unwrap_err();
    assert!(matches!(err, VarStoreError::EmptyValue { .. }), "{err}");
    assert_eq!(store.list().unwrap(), []);
}

#[test]
fn file_shorter_than_attributes_is_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    let name = VarName::global("BootNext");
    fs::write(store.path_of(&name).unwrap(), [7, 0]).unwrap();
    let err = store.get(&name).unwrap_err();
    assert!(
        matches!(err, VarStoreError::TooShort { len: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c"),
        "{err}"
    );
}

#[test]
fn list_returns_every_variable_sorted_and_skips_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = VarStore::new(dir.path());
    store.set_boot_order(&[1]).unwrap();
    store.set_boot_next(1).unwrap();
    store
        .set(
            &VarName::new("LoaderDevicePartUUID", LOADER_VARIABLE),
            6,
            &[b'x', 0],
        )
        .unwrap();
    fs::write(dir.path().join("not-a-variable"), b"").unwrap();
    let names: Vec<String> = store
        .list()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        names,
        [
            "LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f",
            "BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            "BootOrder-8be4df61-93ca-11d2-aa0d-00e098032b8c",
        ]
    );
}

#[test]
fn fixture_folder_copied_to_a_temp_dir_reads_and_writes_like_efivarfs() {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(data_dir().join("after-efibootmgr-create")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let store = VarStore::new(dir.path());
    // What the firmware did before the next boot: consume BootNext.
    store.delete_boot_next().unwrap();
    assert_eq!(store.boot_next().unwrap(), None);
    // Rewriting a firmware entry unchanged keeps its bytes.
    let before = store.get(&VarName::global("Boot0005")).unwrap().unwrap();
    let option = store.boot_entry(0x0005).unwrap().unwrap();
    store.set_boot_entry(0x0005, &option).unwrap();
    assert_eq!(
        store.get(&VarName::global("Boot0005")).unwrap().unwrap(),
        before
    );
}
