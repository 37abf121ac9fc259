//! Tasks of the initramfs: pseudo file systems, kernel modules, finding and checking the slot's
//! root image, and switching to it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upgrade::Slot;

use crate::platform::{ModuleLoad, MountSpec, Platform};
use crate::runtime::{paths, BootInfo};

/// How long to wait for the boot disk to appear (NVMe probing runs after the driver loads).
const DISK_WAIT: Duration = Duration::from_secs(30);

/// The initramfs's shared state.
pub struct InitramfsState {
    /// The machine.
    pub platform: Arc<dyn Platform>,
    boot: Mutex<Option<BootInfo>>,
}

/// The context of the initramfs sequence.
pub type Initramfs = Arc<InitramfsState>;

impl InitramfsState {
    /// A fresh context.
    pub fn new(platform: Arc<dyn Platform>) -> Initramfs {
        Arc::new(InitramfsState {
            platform,
            boot: Mutex::new(None),
        })
    }

    /// What `findBootDisk` found.
    pub fn boot(&self) -> Option<BootInfo> {
        self.boot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn require_boot(&self) -> Result<BootInfo, InitramfsError> {
        self.boot().ok_or(InitramfsError::NoBootDisk)
    }
}

/// Why the initramfs could not reach the slot's root.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The firmware stub did not say which ESP it booted from.
    #[error("the firmware did not report the boot partition (LoaderDevicePartUUID is not set): boot the UKI through UEFI so systemd-stub sets it")]
    NoLoaderPartition,
    /// No disk carries the ESP the firmware booted from.
    #[error("no disk has the ESP {esp} the firmware booted from (waited {waited_s}s; disks seen: {seen})")]
    BootDiskNotFound {
        /// The ESP's GUID.
        esp: uuid::Uuid,
        /// How long we waited.
        waited_s: u64,
        /// The disks that were there.
        seen: String,
    },
    /// Two disks carry the ESP the firmware booted from (a cloned disk).
    #[error("disks {first} and {second} both carry the ESP partition GUID {esp} the firmware booted from (a cloned disk?): refusing to guess which one is the system disk; detach one, or give its partitions new GUIDs (sgdisk -G)")]
    TwoBootDisks {
        /// The ESP's GUID.
        esp: uuid::Uuid,
        /// One disk.
        first: String,
        /// The other.
        second: String,
    },
    /// The kernel command line does not name a slot.
    #[error("the kernel command line names no slot (plinth.slot=A or B): {cmdline:?}")]
    NoSlot {
        /// The command line.
        cmdline: String,
    },
    /// The boot disk lacks the slot's root partition.
    #[error("disk {disk} has no partition named {label}")]
    NoRootPartition {
        /// The disk.
        disk: String,
        /// The partition name looked for.
        label: &'static str,
    },
    /// A task ran before the boot disk was found.
    #[error("the boot disk has not been found yet")]
    NoBootDisk,
    /// The command line does not pin the root image.
    #[error(
        "the kernel command line does not pin the root image ({param} is missing or malformed)"
    )]
    RootNotPinned {
        /// The parameter.
        param: &'static str,
    },
    /// The root image is not the one the UKI was built with.
    #[error(
        "root image on {device} does not match the UKI: expected blake3 {expected}, found {actual}"
    )]
    RootMismatch {
        /// The partition.
        device: String,
        /// Digest from the command line.
        expected: String,
        /// Digest of the partition.
        actual: String,
    },
    /// The partition is shorter than the image.
    #[error("root partition {device} ends after {read} bytes, the image is {size} bytes")]
    RootTruncated {
        /// The partition.
        device: String,
        /// Bytes read.
        read: u64,
        /// Image size.
        size: u64,
    },
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Mounts `/proc`.
pub async fn mount_proc(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    Ok(ctx
        .platform
        .mount(&MountSpec::new("proc", "/proc", "proc").restricted())?)
}

/// Mounts `/sys`.
pub async fn mount_sys(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    Ok(ctx
        .platform
        .mount(&MountSpec::new("sysfs", "/sys", "sysfs").restricted())?)
}

/// Mounts devtmpfs on `/dev`: the kernel creates the device nodes.
pub async fn mount_dev(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    Ok(ctx
        .platform
        .mount(&MountSpec::new("devtmpfs", "/dev", "devtmpfs").data("mode=0755"))?)
}

/// Mounts a tmpfs on `/run` (it moves to the new root and carries the hand-over files).
pub async fn mount_run(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    Ok(ctx
        .platform
        .mount(&MountSpec::new("tmpfs", "/run", "tmpfs").data("mode=0755"))?)
}

/// Loads the kernel modules the image carries, in the order computed at build time
/// (dependencies first).
pub async fn load_modules(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let order = ctx.platform.read(Path::new(paths::MODULE_ORDER))?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| format!("reading the kernel release: {e}"))?;
    let base = Path::new("/lib/modules").join(&release);
    let (mut loaded, mut present) = (0, 0);
    for line in String::from_utf8_lossy(&order).lines() {
        let rel = line.trim();
        if rel.is_empty() || rel.starts_with('#') {
            continue;
        }
        match ctx.platform.load_module(&base.join(rel))? {
            ModuleLoad::Loaded => loaded += 1,
            ModuleLoad::AlreadyLoaded => present += 1,
        }
    }
    tracing::info!("kernel modules: {loaded} loaded, {present} already present");
    Ok(())
}

/// Arms the hardware watchdog (if the machine has one): from here on, a boot that stops making
/// progress resets the machine.
pub async fn arm_watchdog(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    if ctx.platform.name() != "linux" {
        return Ok(());
    }
    match tokio::task::spawn_blocking(|| crate::watchdog::arm(Duration::from_secs(2))).await? {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!("no watchdog device: a hung boot will not reset by itself");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Mounts efivarfs, where the firmware stub left `LoaderDevicePartUUID`.
pub async fn mount_efivarfs(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let spec = MountSpec::new("efivarfs", crate::platform::linux::EFIVARS, "efivarfs").restricted();
    Ok(ctx.platform.mount(&spec)?)
}

/// Finds the system disk (the one whose ESP the firmware booted from) and the slot's root on it.
pub async fn find_boot_disk(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let cmdline = ctx.platform.cmdline()?;
    let slot = Slot::from_cmdline(&cmdline).ok_or(InitramfsError::NoSlot { cmdline })?;
    let esp = ctx
        .platform
        .efivars()
        .loader_device_part_uuid()?
        .ok_or(InitramfsError::NoLoaderPartition)?;
    let started = Instant::now();
    loop {
        let disks = ctx.platform.disks()?;
        let mut carriers = disks
            .iter()
            .filter(|d| d.partitions.iter().any(|(p, _)| p.guid == esp));
        let found = carriers.next();
        // A cloned disk carries the same GUIDs: which of the two the firmware booted cannot be
        // told, and writing the wrong one's META or slots would be worse than not booting.
        if let (Some(a), Some(b)) = (found, carriers.next()) {
            return Err(InitramfsError::TwoBootDisks {
                esp,
                first: a.device.display().to_string(),
                second: b.device.display().to_string(),
            }
            .into());
        }
        if let Some(disk) = found {
            let label = slot.root_label();
            let (_, root) =
                disk.by_label(label)
                    .ok_or_else(|| InitramfsError::NoRootPartition {
                        disk: disk.device.display().to_string(),
                        label,
                    })?;
            let info = BootInfo {
                slot,
                disk: disk.device.clone(),
                esp_guid: esp,
                root_device: root.clone(),
                installer: disk.by_label(upgrade::layout::LABEL_INSTALL).is_some(),
            };
            tracing::info!(
                "booted slot {slot} from {}; root is {}",
                disk.device.display(),
                root.display()
            );
            *ctx.boot.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            return Ok(());
        }
        if started.elapsed() > DISK_WAIT {
            let seen: Vec<String> = disks
                .iter()
                .map(|d| d.device.display().to_string())
                .collect();
            return Err(InitramfsError::BootDiskNotFound {
                esp,
                waited_s: DISK_WAIT.as_secs(),
                seen: if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                },
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The root image's size and digest, as the UKI's command line pins them.
pub fn pinned_root(cmdline: &str) -> Result<(u64, String), InitramfsError> {
    let param = |name: &'static str| {
        cmdline
            .split_whitespace()
            .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .ok_or(InitramfsError::RootNotPinned { param: name })
    };
    let size = param("plinth.root.size")?
        .parse()
        .map_err(|_| InitramfsError::RootNotPinned {
            param: "plinth.root.size",
        })?;
    let digest = param("plinth.root.blake3")?.to_ascii_lowercase();
    if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(InitramfsError::RootNotPinned {
            param: "plinth.root.blake3",
        });
    }
    Ok((size, digest))
}

/// blake3 of the first `size` bytes of `path`.
pub fn hash_prefix(file: std::fs::File, path: &Path, size: u64) -> Result<String, InitramfsError> {
    let mut hasher = blake3::Hasher::new();
    let read = hasher
        .update_reader(file.take(size))
        .map_err(|source| InitramfsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .count();
    if read != size {
        return Err(InitramfsError::RootTruncated {
            device: path.display().to_string(),
            read,
            size,
        });
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Checks that the slot's root partition holds exactly the image the UKI was built with, so a
/// UKI and a root image from different builds can never run together.
pub async fn verify_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let boot = ctx.require_boot()?;
    let (size, expected) = pinned_root(&ctx.platform.cmdline()?)?;
    let (mut file, base) = ctx.platform.open_partition(&boot.root_device, false)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(base))
        .map_err(|e| crate::platform::PlatformError::io("seeking in", &boot.root_device, e))?;
    let device = boot.root_device.clone();
    let actual = tokio::task::spawn_blocking(move || hash_prefix(file, &device, size)).await??;
    if actual != expected {
        return Err(InitramfsError::RootMismatch {
            device: boot.root_device.display().to_string(),
            expected,
            actual,
        }
        .into());
    }
    Ok(())
}

/// Mounts the slot's SquashFS read-only where the new root will be.
pub async fn mount_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let boot = ctx.require_boot()?;
    let source = boot.root_device.display().to_string();
    Ok(ctx
        .platform
        .mount(&MountSpec::new(&source, paths::NEW_ROOT, "squashfs").read_only())?)
}

/// Switches to the new root and leaves the boot info for machined on `/run`.
pub async fn switch_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let boot = ctx.require_boot()?;
    ctx.platform.switch_root(&PathBuf::from(paths::NEW_ROOT))?;
    let info = Path::new(paths::BOOT_INFO);
    if let Some(dir) = info.parent() {
        ctx.platform.mkdir_all(dir)?;
    }
    let json = serde_json::to_vec(&boot).map_err(|e| format!("encoding boot info: {e}"))?;
    ctx.platform.write(info, &json)?;
    if let Some(fd) = crate::watchdog::handoff_fd() {
        ctx.platform.write(
            Path::new(crate::watchdog::HANDOFF),
            fd.to_string().as_bytes(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn the_command_line_pins_the_root_image() {
        let cmd = format!(
            "console=ttyS0 plinth.slot=A plinth.root.size=4096 plinth.root.blake3={DIGEST}"
        );
        assert_eq!(pinned_root(&cmd).ok(), Some((4096, DIGEST.to_string())));
    }

    #[test]
    fn a_command_line_without_a_digest_does_not_pin_the_root() {
        let err = pinned_root("plinth.slot=A plinth.root.size=4096").expect_err("unpinned");
        assert!(err.to_string().contains("plinth.root.blake3"), "{err}");
        assert!(pinned_root("plinth.root.size=x plinth.root.blake3=00").is_err());
    }

    #[test]
    fn only_the_image_prefix_is_hashed_and_a_short_partition_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("part");
        std::fs::write(&p, [b"image".as_slice(), &[0u8; 100]].concat()).expect("write");
        let got = hash_prefix(std::fs::File::open(&p).expect("open"), &p, 5).expect("hash");
        assert_eq!(got, blake3::hash(b"image").to_hex().to_string());
        let err = hash_prefix(std::fs::File::open(&p).expect("open"), &p, 1000).expect_err("short");
        assert!(
            matches!(err, InitramfsError::RootTruncated { read: 105, .. }),
            "{err}"
        );
    }
}
