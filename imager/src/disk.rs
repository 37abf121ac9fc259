//! System disks: a raw GPT image with the Plinth layout, slot A installed, the ESP holding
//! slot A's UKI (also at the removable-media path), STATE holding the node config (if any) and
//! an empty EPHEMERAL.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use upgrade::layout::{self, DiskPartition, LABEL_EPHEMERAL, LABEL_ESP, LABEL_STATE};
use upgrade::Slot;

use crate::tools::{require, run};
use crate::{Artifacts, ImageError};

const MIB: u64 = 1024 * 1024;

/// Default size of a system disk (sparse: only what is written takes space).
pub const DEFAULT_DISK_BYTES: u64 = 2048 * MIB;
/// Default slot size.
pub const DEFAULT_SLOT_BYTES: u64 = 256 * MIB;

/// What disk to make.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// The image to write.
    pub out: PathBuf,
    /// Disk size in bytes.
    pub disk_bytes: u64,
    /// Slot size in bytes.
    pub slot_bytes: u64,
    /// Node config YAML to put on STATE; none leaves STATE empty.
    pub config_yaml: Option<String>,
    /// Scratch directory for the partition images.
    pub work_dir: PathBuf,
    /// System extension files to put in the ESP's store (the node checks them at boot).
    pub extensions: Vec<PathBuf>,
}

fn part<'a>(parts: &'a [DiskPartition], label: &str) -> Result<&'a DiskPartition, ImageError> {
    parts
        .iter()
        .find(|p| p.label == label)
        .ok_or_else(|| ImageError::Invalid(format!("layout has no {label} partition")))
}

/// Copies `src` into `disk` at `offset`, skipping all-zero blocks so the disk stays sparse.
fn copy_into(
    disk: &mut File,
    disk_path: &Path,
    src: &Path,
    offset: u64,
    max: u64,
) -> Result<(), ImageError> {
    let mut f = File::open(src).map_err(ImageError::io("opening", src))?;
    let len = f.metadata().map_err(ImageError::io("reading", src))?.len();
    if len > max {
        return Err(ImageError::Invalid(format!(
            "{} ({len} bytes) does not fit its {max}-byte partition",
            src.display()
        )));
    }
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(ImageError::io("reading", src))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            disk.seek(SeekFrom::Start(offset + pos))
                .and_then(|_| disk.write_all(&buf[..n]))
                .map_err(ImageError::io("writing", disk_path))?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// A new file for a disk or partition image, readable by its owner only: a node's STATE holds
/// its private key, and an installer's bundle is nobody else's business.
fn private_file(path: &Path) -> Result<File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io("creating", path))
}

fn sized_file(path: &Path, bytes: u64) -> Result<(), ImageError> {
    let f = private_file(path)?;
    f.set_len(bytes).map_err(ImageError::io("sizing", path))
}

/// Builds the ESP image: slot A's UKI at `\EFI\plinth\A.efi` and at `\EFI\BOOT\BOOTX64.EFI`,
/// and the extensions in `\EFI\plinth\extensions`, each named `NAME@LEVEL.ext`.
fn esp_image(
    path: &Path,
    bytes: u64,
    artifacts: &Artifacts,
    extensions: &[PathBuf],
) -> Result<(), ImageError> {
    sized_file(path, bytes)?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "EFI"])
        .arg(path))?;
    let img = path.display().to_string();
    run(Command::new("mmd").args(["-i", &img, "::/EFI", "::/EFI/BOOT", "::/EFI/plinth"]))?;
    let uki = artifacts.uki(Slot::A);
    for dest in ["::/EFI/plinth/A.efi", "::/EFI/BOOT/BOOTX64.EFI"] {
        run(Command::new("mcopy").args(["-i", &img]).arg(uki).arg(dest))?;
    }
    if !extensions.is_empty() {
        run(Command::new("mmd").args(["-i", &img, "::/EFI/plinth/extensions"]))?;
    }
    let mut names: Vec<String> = Vec::new();
    for e in extensions {
        let mut head = Vec::new();
        std::fs::File::open(e)
            .and_then(|f| f.take(70 * 1024).read_to_end(&mut head))
            .map_err(ImageError::io("reading", e))?;
        let name = upgrade::extension::store_name(&head)
            .map_err(|err| ImageError::Invalid(format!("{}: {err}", e.display())))?;
        if names.contains(&name) {
            return Err(ImageError::Invalid(format!(
                "{}: a second extension for {name} (one file per name and level)",
                e.display()
            )));
        }
        names.push(name.clone());
        run(Command::new("mcopy")
            .args(["-i", &img])
            .arg(e)
            .arg(format!("::/EFI/plinth/extensions/{name}")))?;
    }
    Ok(())
}

/// Where installer media carry the signed Secure Boot lists the install enrols (`db.auth`,
/// `KEK.auth`, `PK.auth`), on their ESP.
pub const KEYS_DIR: &str = "EFI/plinth/keys";

/// Puts the signed Secure Boot lists on an ESP image.
fn esp_keys(path: &Path, keys: &Path) -> Result<(), ImageError> {
    let keys = crate::secureboot::Keys::load(keys)?;
    let img = path.display().to_string();
    run(Command::new("mmd").args(["-i", &img, &format!("::/{KEYS_DIR}")]))?;
    for var in crate::secureboot::ENROL_ORDER {
        run(Command::new("mcopy")
            .args(["-i", &img])
            .arg(keys.auth(var))
            .arg(format!("::/{KEYS_DIR}/{var}.auth")))?;
    }
    Ok(())
}

/// Builds an ext4 image, populated from `content` if given.
fn ext4_image(
    path: &Path,
    bytes: u64,
    label: &str,
    content: Option<&Path>,
) -> Result<(), ImageError> {
    sized_file(path, bytes)?;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label, "-E", "root_owner=0:0"]);
    if let Some(dir) = content {
        cmd.arg("-d").arg(dir);
    }
    run(cmd.arg(path))?;
    Ok(())
}

/// Makes a system disk with slot A installed from `artifacts`.
pub fn assemble(
    artifacts: &Artifacts,
    opts: &DiskOptions,
) -> Result<Vec<DiskPartition>, ImageError> {
    require(&[
        ("mkfs.vfat", "dosfstools"),
        ("mmd", "mtools"),
        ("mcopy", "mtools"),
        ("mkfs.ext4", "e2fsprogs"),
    ])?;
    std::fs::create_dir_all(&opts.work_dir).map_err(ImageError::io("creating", &opts.work_dir))?;
    let parts = layout::plan(opts.disk_bytes, opts.slot_bytes)?;

    let esp = part(&parts, LABEL_ESP)?;
    let esp_img = opts.work_dir.join("esp.img");
    esp_image(&esp_img, esp.len, artifacts, &opts.extensions)?;

    let state = part(&parts, LABEL_STATE)?;
    let state_dir = opts.work_dir.join("state");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir).map_err(ImageError::io("cleaning", &state_dir))?;
    }
    std::fs::create_dir_all(&state_dir).map_err(ImageError::io("creating", &state_dir))?;
    if let Some(yaml) = &opts.config_yaml {
        let p = state_dir.join("config.yaml");
        config::client::write_private(&p, yaml.as_bytes())
            .map_err(ImageError::io("writing", &p))?;
    }
    let state_img = opts.work_dir.join("state.img");
    ext4_image(&state_img, state.len, LABEL_STATE, Some(&state_dir))?;

    let eph = part(&parts, LABEL_EPHEMERAL)?;
    let eph_img = opts.work_dir.join("ephemeral.img");
    ext4_image(&eph_img, eph.len, LABEL_EPHEMERAL, None)?;

    let root_a = part(&parts, Slot::A.root_label())?;

    // Build into a temporary file and rename: a half-written disk never has the final name.
    let tmp = opts.out.with_extension("partial");
    let mut disk = private_file(&tmp)?;
    disk.set_len(opts.disk_bytes)
        .map_err(ImageError::io("sizing", &tmp))?;
    layout::write_table(&mut disk, opts.disk_bytes, &parts)?;
    copy_into(&mut disk, &tmp, &esp_img, esp.offset, esp.len)?;
    copy_into(
        &mut disk,
        &tmp,
        &artifacts.rootfs,
        root_a.offset,
        root_a.len,
    )?;
    copy_into(&mut disk, &tmp, &state_img, state.offset, state.len)?;
    copy_into(&mut disk, &tmp, &eph_img, eph.offset, eph.len)?;
    disk.sync_all().map_err(ImageError::io("syncing", &tmp))?;
    std::fs::rename(&tmp, &opts.out).map_err(ImageError::io("renaming", &tmp))?;
    for f in [&esp_img, &state_img, &eph_img] {
        let _ = std::fs::remove_file(f);
    }
    Ok(parts)
}

/// Size of the installer media's ESP.
const INSTALLER_ESP_BYTES: u64 = 64 * MIB;

fn round_mib(n: u64) -> u64 {
    n.div_ceil(MIB) * MIB
}

/// Makes installer media: an ESP with slot A's UKI (at the removable-media path, so any
/// firmware boots it) and, for a signed image, the Secure Boot lists the install enrols,
/// `ROOT-A` holding the root image (the media boots like a system disk) and `INSTALL` holding
/// the signed bundle the Install sequence writes to the target.
pub fn installer(
    artifacts: &Artifacts,
    bundle: &Path,
    out: &Path,
    work_dir: &Path,
) -> Result<Vec<DiskPartition>, ImageError> {
    require(&[
        ("mkfs.vfat", "dosfstools"),
        ("mmd", "mtools"),
        ("mcopy", "mtools"),
    ])?;
    std::fs::create_dir_all(work_dir).map_err(ImageError::io("creating", work_dir))?;
    let bundle_len = std::fs::metadata(bundle)
        .map_err(ImageError::io("reading", bundle))?
        .len();
    let specs = [
        (LABEL_ESP, layout::TYPE_ESP, INSTALLER_ESP_BYTES),
        (
            Slot::A.root_label(),
            layout::TYPE_ROOT_X86_64,
            round_mib(artifacts.rootfs_size),
        ),
        (
            layout::LABEL_INSTALL,
            layout::TYPE_LINUX_FS,
            round_mib(bundle_len),
        ),
    ];
    let mut parts = Vec::new();
    let mut offset = MIB;
    for (i, (label, type_guid, len)) in specs.into_iter().enumerate() {
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
    // 1 MiB behind the last partition for the backup GPT.
    let disk_bytes = offset + MIB;

    let esp_img = work_dir.join("installer-esp.img");
    esp_image(&esp_img, INSTALLER_ESP_BYTES, artifacts, &[])?;
    if let Some(keys) = &artifacts.secureboot {
        esp_keys(&esp_img, keys)?;
    }
    let tmp = out.with_extension("partial");
    let mut disk = private_file(&tmp)?;
    disk.set_len(disk_bytes)
        .map_err(ImageError::io("sizing", &tmp))?;
    layout::write_table(&mut disk, disk_bytes, &parts)?;
    copy_into(&mut disk, &tmp, &esp_img, parts[0].offset, parts[0].len)?;
    copy_into(
        &mut disk,
        &tmp,
        &artifacts.rootfs,
        parts[1].offset,
        parts[1].len,
    )?;
    copy_into(&mut disk, &tmp, bundle, parts[2].offset, parts[2].len)?;
    disk.sync_all().map_err(ImageError::io("syncing", &tmp))?;
    std::fs::rename(&tmp, out).map_err(ImageError::io("renaming", &tmp))?;
    let _ = std::fs::remove_file(&esp_img);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.raw");
        super::sized_file(&p, 4096).expect("create");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
