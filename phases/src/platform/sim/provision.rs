//! Making a simulated machine: its disk (real GPT, slot A installed, file systems formatted),
//! a blank NVRAM, and the initramfs's files.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use upgrade::layout::{self, DiskPartition, LABEL_EPHEMERAL, LABEL_ESP, LABEL_STATE};
use upgrade::verity::VerityRoot;
use upgrade::Slot;

use super::{root_image, FsSignature, Sim};

/// What to install.
#[derive(Debug, Clone)]
pub struct SimImage {
    /// The image's version string (in its root's `/etc/plinth-release`).
    pub version: String,
    /// Extra kernel command-line arguments.
    pub extra_cmdline: Vec<String>,
    /// Bytes of filler after the root's file table, standing in for a real root's size (for
    /// throughput benchmarks); deterministic and incompressible.
    pub payload_bytes: u64,
}

impl SimImage {
    /// The simulated root partition image (its file table, then its dm-verity hash tree, as a
    /// real root image has) and what a UKI pins of it.
    pub fn root(&self) -> (Vec<u8>, VerityRoot) {
        let release = format!("NAME=Plinth\nVERSION={}\n", self.version);
        let mut image = root_image(&[(crate::runtime::paths::RELEASE, &release)]);
        if let Ok(n) = usize::try_from(self.payload_bytes) {
            let start = image.len();
            image.resize(start + n, 0);
            blake3::Hasher::new()
                .update(self.version.as_bytes())
                .finalize_xof()
                .fill(&mut image[start..]);
        }
        // Never fails: the data is padded to whole blocks first and is never empty.
        upgrade::verity::image(image).unwrap_or_default()
    }

    /// The root partition image alone.
    pub fn rootfs(&self) -> Vec<u8> {
        self.root().0
    }

    /// The simulated UKI for `slot`: its command line pins this image's verity root.
    pub fn uki(&self, slot: Slot) -> Vec<u8> {
        self.uki_pinning(slot, &self.root().1)
    }

    /// [`SimImage::uki`] for a root already made with [`SimImage::root`] (a bundle needs the
    /// root and both UKIs; with a large payload, making the root once matters).
    pub fn uki_pinning(&self, slot: Slot, pin: &VerityRoot) -> Vec<u8> {
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "panic=1".into(),
            format!("plinth.slot={slot}"),
        ];
        cmdline.extend(pin.cmdline_args());
        cmdline.extend(self.extra_cmdline.iter().cloned());
        format!("PLINTH-SIM-UKI\ncmdline={}\n", cmdline.join(" ")).into_bytes()
    }
}

/// Provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Where.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The layout could not be made.
    #[error(transparent)]
    Layout(#[from] upgrade::LayoutError),
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ProvisionError + 'a {
    move |source| ProvisionError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Writes `data` into the disk at `offset`.
pub fn write_at(disk: &Path, offset: u64, data: &[u8]) -> Result<(), ProvisionError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(io("opening", disk))?;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(data))
        .and_then(|_| f.sync_all())
        .map_err(io("writing", disk))
}

/// Formats a (simulated) file system on a partition: a signature at its start and an empty
/// volume directory. Returns the volume directory.
pub fn format(dir: &Path, p: &DiskPartition, fstype: &str) -> Result<PathBuf, ProvisionError> {
    format_on(dir, &Sim::disk_path(dir), p, fstype)
}

/// [`format`] on another of the machine's disks.
pub fn format_on(
    dir: &Path,
    disk: &Path,
    p: &DiskPartition,
    fstype: &str,
) -> Result<PathBuf, ProvisionError> {
    let sig = FsSignature {
        fstype: fstype.into(),
        uuid: uuid::Uuid::new_v4(),
        label: p.label.clone(),
    };
    write_at(disk, p.offset, &sig.encode())?;
    let vol = Sim::volume_dir(dir, sig.uuid);
    std::fs::create_dir_all(&vol).map_err(io("creating", &vol))?;
    Ok(vol)
}

/// A machine directory with nothing on it yet: blank NVRAM, no disks, the initramfs.
fn blank_machine(dir: &Path) -> Result<(), ProvisionError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io("cleaning", dir))?;
    }
    for sub in ["efivars", "volumes", "fs/lib/modules", "tmp", "roots"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
    }
    // The initramfs: an empty module list (the simulated kernel has everything built in).
    let order = dir.join("fs/lib/modules/plinth.order");
    std::fs::write(&order, b"").map_err(io("writing", &order))
}

/// A new machine: a blank system disk of `disk_bytes` (sparse) and installer media (`media.img`:
/// an ESP whose removable path holds slot A's UKI, `ROOT-A` with the root image, `INSTALL` with
/// `bundle`), as `plinth image build --installer` makes it.
pub fn provision_installer(
    dir: &Path,
    image: &SimImage,
    bundle: &[u8],
    disk_bytes: u64,
) -> Result<(), ProvisionError> {
    const MIB: u64 = 1 << 20;
    blank_machine(dir)?;
    let disk = Sim::disk_path(dir);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)
        .map_err(io("creating", &disk))?;
    f.set_len(disk_bytes).map_err(io("sizing", &disk))?;

    let rootfs = image.rootfs();
    let mib = |n: usize| (n as u64).div_ceil(MIB).max(1) * MIB;
    let mut parts = Vec::new();
    let mut offset = MIB;
    for (i, (label, type_guid, len)) in [
        (LABEL_ESP, layout::TYPE_ESP, MIB),
        (
            Slot::A.root_label(),
            layout::TYPE_ROOT_X86_64,
            mib(rootfs.len()),
        ),
        (
            layout::LABEL_INSTALL,
            layout::TYPE_LINUX_FS,
            mib(bundle.len()),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        parts.push(DiskPartition {
            number: i as u32 + 1,
            label: label.into(),
            type_guid,
            guid: uuid::Uuid::new_v4(),
            offset,
            len,
        });
        offset += len;
    }
    let media = Sim::media_path(dir);
    let media_bytes = offset + MIB;
    {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&media)
            .map_err(io("creating", &media))?;
        f.set_len(media_bytes).map_err(io("sizing", &media))?;
        layout::write_table(&mut f, media_bytes, &parts)?;
    }
    let vol = format_on(dir, &media, &parts[0], "vfat")?;
    let p = vol.join("EFI/BOOT/BOOTX64.EFI");
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(io("creating", d))?;
    }
    std::fs::write(&p, image.uki(Slot::A)).map_err(io("writing", &p))?;
    write_at(&media, parts[1].offset, &rootfs)?;
    write_at(&media, parts[2].offset, bundle)
}

/// Makes a machine in `dir` with slot A installed from `image` and `config_yaml` on STATE
/// (none leaves STATE empty). Its NVRAM is blank, as a new machine's is.
pub fn provision(
    dir: &Path,
    image: &SimImage,
    config_yaml: Option<&str>,
    slot_bytes: u64,
) -> Result<Vec<DiskPartition>, ProvisionError> {
    provision_with_esp(dir, image, config_yaml, slot_bytes, None)
}

/// Like [`provision`], with a chosen ESP partition GUID (to replay captured firmware variables
/// that name it).
pub fn provision_with_esp(
    dir: &Path,
    image: &SimImage,
    config_yaml: Option<&str>,
    slot_bytes: u64,
    esp_guid: Option<uuid::Uuid>,
) -> Result<Vec<DiskPartition>, ProvisionError> {
    blank_machine(dir)?;

    let disk_bytes = layout::min_disk_bytes(slot_bytes);
    let mut parts = layout::plan(disk_bytes, slot_bytes)?;
    if let (Some(guid), Some(esp)) = (esp_guid, parts.iter_mut().find(|p| p.label == LABEL_ESP)) {
        esp.guid = guid;
    }
    let disk = Sim::disk_path(dir);
    {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&disk)
            .map_err(io("creating", &disk))?;
        f.set_len(disk_bytes).map_err(io("sizing", &disk))?;
        layout::write_table(&mut f, disk_bytes, &parts)?;
    }
    let part = |label: &str| parts.iter().find(|p| p.label == label).cloned();
    if let Some(root_a) = part(Slot::A.root_label()) {
        write_at(&disk, root_a.offset, &image.rootfs())?;
    }
    if let Some(esp) = part(LABEL_ESP) {
        let vol = format(dir, &esp, "vfat")?;
        for rel in ["EFI/plinth/A.efi", "EFI/BOOT/BOOTX64.EFI"] {
            let p = vol.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(io("creating", d))?;
            }
            std::fs::write(&p, image.uki(Slot::A)).map_err(io("writing", &p))?;
        }
    }
    if let Some(state) = part(LABEL_STATE) {
        let vol = format(dir, &state, "ext4")?;
        if let Some(yaml) = config_yaml {
            let p = vol.join("config.yaml");
            std::fs::write(&p, yaml).map_err(io("writing", &p))?;
        }
    }
    if let Some(eph) = part(LABEL_EPHEMERAL) {
        format(dir, &eph, "ext4")?;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::sim::firmware;

    const MIB: u64 = 1024 * 1024;

    /// The captures of ../shared/fixtures/ovmf-efivars (copied under bootloader/tests/data).
    fn fixture(moment: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../bootloader/tests/data/ovmf-efivars")
            .join(moment)
    }

    #[test]
    fn the_emulated_firmware_replays_ovmfs_failed_trial_exactly() {
        use bootloader::efivarfs::VarStore;
        let dir = tempfile::tempdir().expect("tmp");
        let image = SimImage {
            version: "1.0".into(),
            extra_cmdline: vec![],
            payload_bytes: 0,
        };
        // The captured disk's ESP, and the NVRAM as efibootmgr left it: BootNext=000A ("Plinth
        // B"), BootOrder=0009, the firmware's own entries 0000-0008.
        let esp_guid = uuid::uuid!("dcad3259-41e5-41a9-9bcb-d1ff211ed9f6");
        provision_with_esp(dir.path(), &image, None, 16 * MIB, Some(esp_guid)).expect("provision");
        let vars = Sim::vars(dir.path());
        for entry in std::fs::read_dir(fixture("after-efibootmgr-create")).expect("fixture") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), vars.root().join(entry.file_name())).expect("copy");
        }
        // B's UKI is one that cannot boot (its kernel panics).
        let esp_dir = std::fs::read_dir(dir.path().join("volumes"))
            .expect("volumes")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("EFI/BOOT/BOOTX64.EFI").exists())
            .expect("esp volume");
        let broken = SimImage {
            version: "2.0".into(),
            extra_cmdline: vec!["plinth.sim.panic".into()],
            payload_bytes: 0,
        };
        std::fs::write(esp_dir.join("EFI/plinth/B.efi"), broken.uki(Slot::B)).expect("B.efi");

        // Power on: BootNext is consumed and B is tried.
        let first = firmware::power_on(dir.path()).expect("boots");
        assert_eq!(
            (first.entry, first.description.as_str()),
            (0x000A, "Plinth B")
        );
        assert_eq!(vars.boot_next().expect("read"), None);
        assert!(first.cmdline.contains("plinth.sim.panic"));

        // B panicked; at the next power-on the firmware falls back to BootOrder: A.
        let second = firmware::power_on(dir.path()).expect("boots");
        assert_eq!(
            (second.entry, second.description.as_str()),
            (0x0009, "Plinth A")
        );

        // What the firmware left is what OVMF left in after-failed-trial.
        let captured = VarStore::new(fixture("after-failed-trial"));
        assert_eq!(
            vars.boot_current().expect("read"),
            captured.boot_current().expect("read")
        );
        assert_eq!(
            vars.boot_next().expect("read"),
            captured.boot_next().expect("read")
        );
        assert_eq!(
            vars.boot_order().expect("read"),
            captured.boot_order().expect("read")
        );
        assert_eq!(
            vars.boot_order().expect("read"),
            [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn a_new_machine_boots_slot_a_from_the_removable_path_and_says_which_esp() {
        let dir = tempfile::tempdir().expect("tmp");
        let image = SimImage {
            version: "1.0".into(),
            extra_cmdline: vec![],
            payload_bytes: 0,
        };
        let parts = provision(dir.path(), &image, None, 16 * MIB).expect("provision");
        let booted = firmware::power_on(dir.path()).expect("boots");
        let esp = parts.iter().find(|p| p.label == "EFI").expect("esp");
        assert_eq!(booted.esp_guid, esp.guid);
        assert_eq!(booted.path, firmware::REMOVABLE_PATH);
        assert!(booted.cmdline.contains("plinth.slot=A"));
        let vars = Sim::vars(dir.path());
        assert_eq!(vars.boot_current().expect("read"), Some(booted.entry));
        assert_eq!(
            vars.loader_device_part_uuid().expect("read"),
            Some(esp.guid)
        );
    }
}
