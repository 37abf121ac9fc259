//! The node's view of its slots: META (read, changed, written), the boot entries, and the
//! ESP's UKIs, all on the boot disk.
//!
//! Every change to META goes through [`update_meta`], which serialises writers and keeps the
//! last record read, so the two-copy protocol of [`upgrade::meta`] always writes over the older
//! copy.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bootloader::slots::{Esp, Wanted};
use sequencer::{EventKind, TaskError};
use upgrade::layout::{DiskPartition, LABEL_ESP, LABEL_META};
use upgrade::meta::{self, Loaded, Meta, SlotState};
use upgrade::Slot;

use crate::platform::PlatformError;
use crate::runtime::{paths, Runtime};

/// Why a slot operation could not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The boot disk is not known yet.
    #[error("the boot disk is not known yet")]
    NoBootInfo,
    /// A partition is missing.
    #[error("boot disk {disk} has no {label} partition")]
    NoPartition {
        /// Disk.
        disk: String,
        /// Label.
        label: String,
    },
    /// META could not be read or written.
    #[error("META on {device}: {source}")]
    Meta {
        /// Device.
        device: String,
        /// Why.
        #[source]
        source: meta::MetaError,
    },
    /// The boot entries could not be written.
    #[error("boot entries: {0}")]
    Entries(#[from] bootloader::BootVarError),
}

/// The device node of the system disk's partition `label`: as the initramfs found it when the
/// system disk is the one booted (nothing repartitions a booted disk: a wipe of all of it ends
/// the boot), read from the disk otherwise (an install's target).
pub fn boot_partition(rt: &Runtime, label: &str) -> Result<PathBuf, TaskError> {
    let found = rt
        .boot()
        .filter(|b| Some(&b.disk) == rt.system_disk().as_ref());
    if let Some((_, node)) = found
        .as_ref()
        .and_then(|b| b.partitions.iter().find(|(l, _)| l == label))
    {
        return Ok(node.clone());
    }
    partition(rt, label).map(|(_, node)| node)
}

/// A partition of the boot disk by label, with its device node.
pub fn partition(rt: &Runtime, label: &str) -> Result<(DiskPartition, PathBuf), TaskError> {
    let disk = rt.system_disk().ok_or(SlotError::NoBootInfo)?;
    let disks = rt.platform.disks()?;
    disks
        .iter()
        .find(|d| d.device == disk)
        .and_then(|d| d.by_label(label).cloned())
        .ok_or_else(|| {
            SlotError::NoPartition {
                disk: disk.display().to_string(),
                label: label.into(),
            }
            .into()
        })
}

/// Where the ESP is, as a boot entry names it.
pub fn esp(rt: &Runtime) -> Result<Esp, TaskError> {
    let (p, _) = partition(rt, LABEL_ESP)?;
    Ok(Esp {
        partition_number: p.number,
        partition_guid: p.guid,
        start_lba: p.first_lba(),
        size_lba: p.sectors(),
    })
}

fn meta_err(device: &Path) -> impl FnOnce(meta::MetaError) -> SlotError + '_ {
    move |source| SlotError::Meta {
        device: device.display().to_string(),
        source,
    }
}

/// Reads META as it is on disk (`None` when neither copy is valid: a new disk).
pub fn read_meta(rt: &Runtime) -> Result<Option<Loaded>, TaskError> {
    let dev = boot_partition(rt, LABEL_META)?;
    let (mut f, base) = rt.platform.open_partition(&dev, false)?;
    match meta::read(&mut f, base) {
        Ok(l) => Ok(Some(l)),
        Err(meta::MetaError::NoValidCopy(..)) => Ok(None),
        Err(e) => Err(meta_err(&dev)(e).into()),
    }
}

/// The image version of the running root.
pub fn running_version(rt: &Runtime) -> String {
    rt.platform
        .read(Path::new(paths::RELEASE))
        .ok()
        .and_then(|b| crate::tasks::system::release_version(&String::from_utf8_lossy(&b)))
        .unwrap_or_default()
}

/// Changes META with `f` and writes it; starts from a fresh record (the running slot good and
/// committed) on a disk that has none. Returns the record written.
pub fn update_meta(rt: &Runtime, f: impl FnOnce(&mut Meta)) -> Result<Meta, TaskError> {
    let _guard = rt.meta_lock();
    let dev = boot_partition(rt, LABEL_META)?;
    let previous = read_meta(rt)?;
    let mut m = match &previous {
        Some(l) => l.meta.clone(),
        None => {
            let slot = rt.boot().ok_or(SlotError::NoBootInfo)?.slot;
            Meta::initial(slot, &running_version(rt))
        }
    };
    f(&mut m);
    // Most boots change nothing: no write (and no sync) then.
    if previous.as_ref().is_some_and(|l| l.meta == m) {
        return Ok(m);
    }
    let (mut file, base) = rt.platform.open_partition(&dev, true)?;
    file.seek(SeekFrom::Start(base))
        .map_err(|e| PlatformError::io("seeking in", &dev, e))?;
    meta::write(&mut file, base, previous.as_ref(), &m).map_err(meta_err(&dev))?;
    Ok(m)
}

/// Publishes a slot event.
pub fn slot_event(rt: &Runtime, slot: Slot, state: SlotState, message: impl Into<String>) {
    rt.bus.publish(
        EventKind::Slot {
            slot: slot.to_string(),
            state: state.as_str().into(),
            message: message.into(),
        },
        None,
    );
}

fn wanted(slot: Slot, in_order: bool) -> Wanted {
    Wanted {
        description: format!("Plinth {slot}"),
        path: slot.uki_path().into(),
        in_order,
    }
}

/// Makes the boot entries agree with META: the committed slot first in `BootOrder`, the other
/// slot after it only if it is good; a slot gets an entry once it has an image. Returns the
/// entry numbers (A, B) that exist.
pub fn reconcile_entries(rt: &Runtime, m: &Meta) -> Result<[Option<u16>; 2], TaskError> {
    let vars = rt.platform.efivars();
    let esp = esp(rt)?;
    let other = m.committed.other();
    let mut want = vec![wanted(m.committed, true)];
    let mut retired = Vec::new();
    let other_state = m.slot(other).state;
    if other_state == SlotState::Empty || other_state == SlotState::Writing {
        retired.push(wanted(other, false));
    } else {
        want.push(wanted(other, other_state == SlotState::Good));
    }
    let entries = vars.readable_boot_entries().map_err(SlotError::from)?;
    for n in &entries.unreadable {
        tracing::warn!("Boot{n:04X} could not be decoded: kept as it is, and not ours");
    }
    let existing = entries.readable;
    let order = vars.boot_order().map_err(SlotError::from)?;
    let plan = bootloader::slots::plan(
        &existing,
        &entries.unreadable,
        &order,
        &esp,
        &want,
        &retired,
    );
    if !plan.is_noop(&order) {
        bootloader::slots::apply(&vars, &plan).map_err(SlotError::from)?;
        tracing::info!("boot entries reconciled: BootOrder {:04X?}", plan.order);
    }
    let mut out = [None, None];
    for (w, n) in want.iter().zip(&plan.entries) {
        let slot = if w.path == Slot::A.uki_path() {
            Slot::A
        } else {
            Slot::B
        };
        out[slot as usize] = Some(*n);
    }
    Ok(out)
}

/// The UKI path of `slot` under the ESP mount.
pub fn uki_file(slot: Slot) -> PathBuf {
    Path::new(paths::ESP)
        .join("EFI/plinth")
        .join(format!("{slot}.efi"))
}

/// The firmware's removable-media path under the ESP mount.
pub fn removable_file() -> PathBuf {
    Path::new(paths::ESP).join("EFI/BOOT/BOOTX64.EFI")
}

/// Replaces a file on the ESP atomically: written to a temporary name and synced, then renamed.
pub fn write_esp_file(rt: &Runtime, path: &Path, data: &[u8]) -> Result<(), TaskError> {
    if let Some(dir) = path.parent() {
        rt.platform.mkdir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    rt.platform.write(&tmp, data)?;
    rt.platform.rename(&tmp, path)?;
    // The rename itself must reach the disk before anyone relies on it.
    rt.platform.sync();
    Ok(())
}

/// `\EFI\BOOT\BOOTX64.EFI` becomes a copy of `slot`'s UKI (for firmware that lost its entries).
pub fn follow_committed(rt: &Runtime, slot: Slot) -> Result<(), TaskError> {
    let uki = rt.platform.read(&uki_file(slot))?;
    let current = rt.platform.read(&removable_file()).unwrap_or_default();
    if current != uki {
        write_esp_file(rt, &removable_file(), &uki)?;
    }
    Ok(())
}
