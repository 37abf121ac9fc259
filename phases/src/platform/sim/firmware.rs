//! The simulated firmware: what OVMF's boot manager and systemd-stub do at power-on, on the
//! simulated machine's variables and disk.
//!
//! At power-on (checked against the OVMF captures in `bootloader/tests/data/ovmf-efivars`):
//! 1. volatile variables from the last boot are gone (NVRAM keeps only non-volatile ones);
//! 2. the firmware makes sure its own entries exist (a setup app and the NVMe disk's
//!    removable-media entry) and re-appends any of them missing from `BootOrder`;
//! 3. `BootNext`, if set, is deleted and tried first (a one-shot), then `BootOrder` in order;
//!    setup apps are skipped, and an entry whose file is not on its ESP fails to load;
//! 4. the entry that loads becomes `BootCurrent`, and the stub sets `LoaderDevicePartUUID`.

use std::path::{Path, PathBuf};

use bootloader::boot_vars::{BOOT_CURRENT, LOADER_DEVICE_PART_UUID};
use bootloader::device_path::{DevicePath, DevicePathNode};
use bootloader::efivarfs::{
    VarName, VarStore, BOOTSERVICE_ACCESS, LOADER_VARIABLE, NON_VOLATILE, RUNTIME_ACCESS,
};
use bootloader::load_option::{
    LoadOption, LOAD_OPTION_ACTIVE, LOAD_OPTION_CATEGORY_APP, LOAD_OPTION_HIDDEN,
};
use upgrade::layout::TYPE_ESP;

use super::{FsSignature, Sim};

/// The firmware's removable-media path.
pub const REMOVABLE_PATH: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// Power-on failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// A variable could not be read or written.
    #[error("firmware variables: {0}")]
    Vars(String),
    /// Nothing could be booted.
    #[error("no bootable entry (tried {tried})")]
    NothingToBoot {
        /// What was tried.
        tried: String,
    },
}

fn vars_err(e: impl std::fmt::Display) -> FirmwareError {
    FirmwareError::Vars(e.to_string())
}

/// What the firmware started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// The `Boot####` entry.
    pub entry: u16,
    /// Its description.
    pub description: String,
    /// The ESP it loaded from.
    pub esp_guid: uuid::Uuid,
    /// The file it loaded (firmware spelling).
    pub path: String,
    /// The UKI's kernel command line.
    pub cmdline: String,
}

/// The firmware's own entries: the setup app and the NVMe disk (removable-media boot).
fn own_entries() -> Vec<(u16, LoadOption)> {
    let path = |nodes: Vec<DevicePathNode>| DevicePath {
        nodes: nodes
            .into_iter()
            .chain([DevicePathNode::EndEntire])
            .collect(),
    };
    vec![
        (
            0,
            LoadOption {
                attributes: LOAD_OPTION_ACTIVE | LOAD_OPTION_HIDDEN | LOAD_OPTION_CATEGORY_APP,
                description: "UiApp".into(),
                file_path_list: path(vec![DevicePathNode::FirmwareFile(uuid::uuid!(
                    "462caa21-7614-4503-836e-8ab6f4662331"
                ))]),
                optional_data: Vec::new(),
            },
        ),
        (
            1,
            LoadOption {
                attributes: LOAD_OPTION_ACTIVE,
                description: "UEFI Sim NVMe plinth0".into(),
                file_path_list: path(vec![
                    DevicePathNode::Acpi {
                        hid: 0x0a03_41d0,
                        uid: 0,
                    },
                    DevicePathNode::Pci {
                        function: 0,
                        device: 4,
                    },
                    DevicePathNode::Nvme {
                        namespace_id: 1,
                        eui64: [0; 8],
                    },
                ]),
                optional_data: Vec::new(),
            },
        ),
    ]
}

/// An entry the firmware made itself (OVMF's are device entries, never `HD(...)` paths).
fn firmware_owned(option: &LoadOption) -> bool {
    option.file_path_list.hard_drive().is_none()
}

/// The ESPs on the machine's disk: (partition GUID, volume directory if formatted).
/// The installer media's own entry (a removable disk on another controller), which OVMF
/// makes when such a disk is attached.
fn media_entry() -> LoadOption {
    LoadOption {
        attributes: LOAD_OPTION_ACTIVE,
        description: "UEFI Sim Misc Device".into(),
        file_path_list: DevicePath {
            nodes: vec![
                DevicePathNode::Acpi {
                    hid: 0x0a03_41d0,
                    uid: 0,
                },
                DevicePathNode::Pci {
                    function: 0,
                    device: 6,
                },
                DevicePathNode::EndEntire,
            ],
        },
        optional_data: Vec::new(),
    }
}

/// The disk a firmware-owned entry reaches: the NVMe system disk, or the media.
fn own_entry_disk(sim_dir: &Path, option: &LoadOption) -> PathBuf {
    let nvme = option
        .file_path_list
        .nodes
        .iter()
        .any(|n| matches!(n, DevicePathNode::Nvme { .. }));
    if nvme {
        Sim::disk_path(sim_dir)
    } else {
        Sim::media_path(sim_dir)
    }
}

/// The ESPs of every disk: (unique GUID, the volume if it holds a FAT file system, the disk).
fn esps(sim_dir: &Path) -> Vec<(uuid::Uuid, Option<PathBuf>, PathBuf)> {
    [Sim::disk_path(sim_dir), Sim::media_path(sim_dir)]
        .into_iter()
        .flat_map(|d| esps_of(sim_dir, &d))
        .collect()
}

fn esps_of(sim_dir: &Path, disk: &Path) -> Vec<(uuid::Uuid, Option<PathBuf>, PathBuf)> {
    let Ok(mut f) = std::fs::File::open(disk) else {
        return Vec::new();
    };
    let Ok(table) = upgrade::layout::read_table(&mut f) else {
        return Vec::new();
    };
    table
        .into_iter()
        .filter(|p| p.type_guid == TYPE_ESP)
        .map(|p| {
            use std::io::{Read, Seek, SeekFrom};
            let mut block = [0u8; 512];
            let sig = f
                .seek(SeekFrom::Start(p.offset))
                .and_then(|_| f.read_exact(&mut block))
                .ok()
                .and_then(|_| FsSignature::decode(&block))
                .filter(|s| s.fstype == "vfat");
            (
                p.guid,
                sig.map(|s| Sim::volume_dir(sim_dir, s.uuid)),
                disk.to_path_buf(),
            )
        })
        .collect()
}

fn load(sim_dir: &Path, option: &LoadOption) -> Option<(uuid::Uuid, String, Vec<u8>)> {
    if !option.is_active() || option.attributes & LOAD_OPTION_CATEGORY_APP != 0 {
        return None;
    }
    let esps = esps(sim_dir);
    let (guid, dir, path) = match option
        .file_path_list
        .hard_drive()
        .and_then(|hd| hd.partition_guid())
    {
        Some(guid) => {
            let (g, dir, _) = esps.into_iter().find(|(g, _, _)| *g == guid)?;
            (g, dir?, option.file_path_list.file_path()?.to_string())
        }
        // A device entry boots the removable-media path of its disk's first ESP.
        None => {
            let disk = own_entry_disk(sim_dir, option);
            let (g, dir, _) = esps.into_iter().find(|(_, _, d)| *d == disk)?;
            (g, dir?, REMOVABLE_PATH.to_string())
        }
    };
    let rel: PathBuf = path.split('\\').filter(|s| !s.is_empty()).collect();
    let data = std::fs::read(dir.join(rel)).ok()?;
    Some((guid, path, data))
}

/// Powers the machine on: picks and "loads" a boot entry as OVMF would.
pub fn power_on(sim_dir: &Path) -> Result<Booted, FirmwareError> {
    let vars: VarStore = Sim::vars(sim_dir);
    std::fs::create_dir_all(vars.root()).map_err(vars_err)?;
    // 1. RAM is gone.
    for name in vars.list().map_err(vars_err)? {
        if let Ok(Some(v)) = vars.get(&name) {
            if v.attributes & NON_VOLATILE == 0 {
                vars.delete(&name).map_err(vars_err)?;
            }
        }
    }
    // 2. The firmware's own entries exist and are in BootOrder.
    // An entry it cannot decode, OVMF skips (it reports it and boots the next).
    let mut entries = vars.readable_boot_entries().map_err(vars_err)?.readable;
    if !entries.iter().any(|(_, o)| firmware_owned(o)) {
        for (n, o) in own_entries() {
            let n = (n..=0xffff)
                .find(|n| !entries.iter().any(|(m, _)| m == n))
                .unwrap_or(n);
            vars.set_boot_entry(n, &o).map_err(vars_err)?;
            entries.push((n, o));
        }
    }
    // An attached removable disk gets its entry too, as OVMF makes one per bootable device.
    if Sim::media_path(sim_dir).exists()
        && !entries
            .iter()
            .any(|(_, o)| o.description == media_entry().description)
    {
        let n = (2..=0xffff)
            .find(|n| !entries.iter().any(|(m, _)| m == n))
            .unwrap_or(2);
        vars.set_boot_entry(n, &media_entry()).map_err(vars_err)?;
        entries.push((n, media_entry()));
    }
    let mut order = vars.boot_order().map_err(vars_err)?;
    let mut owned: Vec<u16> = entries
        .iter()
        .filter(|(_, o)| firmware_owned(o))
        .map(|(n, _)| *n)
        .collect();
    owned.sort_unstable();
    let before = order.clone();
    order.extend(owned.into_iter().filter(|n| !before.contains(n)));
    if order != before {
        vars.set_boot_order(&order).map_err(vars_err)?;
    }
    // 3. BootNext is a one-shot: gone before it is tried.
    let mut candidates = Vec::new();
    if let Some(next) = vars.boot_next().map_err(vars_err)? {
        vars.delete_boot_next().map_err(vars_err)?;
        candidates.push(next);
    }
    candidates.extend(order.iter().copied());
    let mut tried = Vec::new();
    for n in candidates {
        tried.push(format!("Boot{n:04X}"));
        let Ok(Some(option)) = vars.boot_entry(n) else {
            continue;
        };
        let Some((esp_guid, path, data)) = load(sim_dir, &option) else {
            continue;
        };
        let Some(cmdline) = bootloader::uki::cmdline(&data) else {
            continue;
        };
        // 4. What booted, and (systemd-stub) from which partition.
        let volatile = BOOTSERVICE_ACCESS | RUNTIME_ACCESS;
        vars.set(&VarName::global(BOOT_CURRENT), volatile, &n.to_le_bytes())
            .map_err(vars_err)?;
        let text: Vec<u8> = esp_guid
            .to_string()
            .to_uppercase()
            .encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect();
        vars.set(
            &VarName::new(LOADER_DEVICE_PART_UUID, LOADER_VARIABLE),
            volatile,
            &text,
        )
        .map_err(vars_err)?;
        return Ok(Booted {
            entry: n,
            description: option.description.to_string_lossy(),
            esp_guid,
            path,
            cmdline,
        });
    }
    Err(FirmwareError::NothingToBoot {
        tried: tried.join(", "),
    })
}
