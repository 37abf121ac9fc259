//! Tasks of the initramfs: pseudo file systems, kernel modules, finding and checking the slot's
//! root image, and switching to it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upgrade::verity::VerityRoot;
use upgrade::Slot;

use crate::modules::name_of;
use crate::platform::{ModuleLoad, MountSpec, Platform};
use crate::runtime::{paths, BootInfo, MappedRoot};

/// Where systemd-stub leaves the UKI's `.pcrsig` in the initramfs.
pub const STUB_PCR_SIGNATURE: &str = "/.extra/tpm2-pcr-signature.json";
/// Where systemd-stub leaves the UKI's `.pcrpkey` in the initramfs.
pub const STUB_PCR_PUBLIC_KEY: &str = "/.extra/tpm2-pcr-public-key.pem";

/// The program the kernel runs to load a module it asks for; empty, it asks for none.
const MODPROBE_SYSCTL: &str = "/proc/sys/kernel/modprobe";

/// How long to wait for the boot disk to appear (NVMe probing runs after the driver loads).
const DISK_WAIT: Duration = Duration::from_secs(30);
/// How often to look for it meanwhile.
const DISK_POLL: Duration = Duration::from_millis(10);

/// The initramfs's shared state.
pub struct InitramfsState {
    /// The machine.
    pub platform: Arc<dyn Platform>,
    boot: Mutex<Option<BootInfo>>,
    /// The boot disk's META partition, once found, if this boot is a slot's trial.
    trial_meta: Mutex<Option<PathBuf>>,
}

/// The context of the initramfs sequence.
pub type Initramfs = Arc<InitramfsState>;

impl InitramfsState {
    /// A fresh context.
    pub fn new(platform: Arc<dyn Platform>) -> Initramfs {
        Arc::new(InitramfsState {
            platform,
            boot: Mutex::new(None),
            trial_meta: Mutex::new(None),
        })
    }

    /// During a trial, every initramfs phase that passes once the boot disk is known goes to
    /// META (machined does the same for its own phases), so a trial that dies before machined
    /// runs leaves where it stopped, and one that leaves nothing never got here at all.
    pub fn install_breadcrumbs(self: &Arc<Self>, bus: &sequencer::EventBus) {
        let weak = Arc::downgrade(self);
        bus.add_sink(Box::new(move |e: &sequencer::Event| {
            let sequencer::EventKind::PhaseStop {
                sequence,
                phase,
                error: None,
                ..
            } = &e.kind
            else {
                return;
            };
            let Some(ctx) = weak.upgrade() else {
                return;
            };
            if sequence != "initramfs" {
                return;
            }
            if let Err(e) = ctx.record_phase(phase) {
                tracing::warn!("writing the initramfs breadcrumb {phase}: {e}");
            }
        }));
    }

    /// Records `initramfs/phase` for the booted slot if this boot is its trial.
    fn record_phase(&self, phase: &str) -> Result<(), crate::platform::PlatformError> {
        let meta_dev = self
            .trial_meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(dev), Some(boot)) = (meta_dev, self.boot()) else {
            return Ok(());
        };
        let (mut f, base) = self.platform.open_partition(&dev, true)?;
        let io = |e: upgrade::meta::MetaError| {
            crate::platform::PlatformError::io("updating META on", &dev, std::io::Error::other(e))
        };
        let loaded = upgrade::meta::read(&mut f, base).map_err(io)?;
        let mut m = loaded.meta.clone();
        m.initramfs_passed(boot.slot, phase);
        upgrade::meta::write(&mut f, base, Some(&loaded), &m).map_err(io)?;
        Ok(())
    }

    /// Whether the booted slot is on trial, by META on `disk` (none or unreadable: no).
    fn note_trial(&self, disk: &crate::platform::Disk, slot: Slot) {
        let Some((_, dev)) = disk.by_label(upgrade::layout::LABEL_META) else {
            return;
        };
        let trial = self
            .platform
            .open_partition(dev, false)
            .ok()
            .and_then(|(mut f, base)| upgrade::meta::read(&mut f, base).ok())
            .is_some_and(|l| l.meta.is_trial_boot(slot));
        if trial {
            *self.trial_meta.lock().unwrap_or_else(|p| p.into_inner()) = Some(dev.clone());
        }
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

/// A module as the list names it.
#[derive(Debug, PartialEq, Eq)]
pub struct ModuleLine {
    /// Its path under `/lib/modules/<release>/`.
    pub path: String,
    /// The parameters it loads with.
    pub params: String,
    /// What must be in before it (paths).
    pub after: Vec<String>,
}

/// One line of the module list, as the image builder writes it
/// (`imager::kernel::order_text`): `path [param...][: after...]`.
pub fn parse_module_line(line: &str) -> Option<ModuleLine> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (module, after) = line.split_once(':').unwrap_or((line, ""));
    let mut words = module.split_whitespace();
    Some(ModuleLine {
        path: words.next()?.to_string(),
        params: words.collect::<Vec<_>>().join(" "),
        after: after.split_whitespace().map(str::to_owned).collect(),
    })
}

/// Starts loading the kernel modules the image carries, mounts efivarfs once its module is in,
/// and waits for the modules that finding the boot disk needs: the initramfs's modules (`/lib/modules/plinth.order`) load as many at a
/// time as are ready, and each later task waits for its own (the watchdog's, dm-verity's,
/// SquashFS's), so they load while the boot disk is found; the modules the node needs later
/// (`plinth.late`) load in the background at the lowest priority ([`crate::modules`]). A
/// module goes in once the modules its line lists after the `:` are in (the image builder
/// lists its dependencies and softdeps there, and its parameters before the `:`).
pub async fn load_modules(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| format!("reading the kernel release: {e}"))?;
    let base = Path::new("/lib/modules").join(&release);
    // The node has no modprobe: every module it loads, this loader loads, each after what it
    // needs. Module autoloading off, a kernel that asks for a module (a crypto algorithm, a
    // file system, a protocol) is told at once that there is none, instead of starting a
    // helper process that fails to exec; nothing can be loaded behind the loader's back either.
    if ctx.platform.name() == "linux" {
        if let Err(e) = std::fs::write(MODPROBE_SYSCTL, b"\n") {
            // Only the failed helpers come back: the boot goes on.
            tracing::warn!("module autoloading stays on ({MODPROBE_SYSCTL}: {e})");
        }
    }
    // The files are opened now: the late ones load after switch_root has removed them.
    let open = |list: &str| -> Result<Vec<crate::modules::Pending>, sequencer::TaskError> {
        let Ok(text) = ctx.platform.read(Path::new(list)) else {
            return Ok(Vec::new());
        };
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(parse_module_line)
            .map(|m| {
                let file = ctx.platform.open_file(&base.join(&m.path))?;
                Ok(crate::modules::Pending {
                    path: m.path,
                    params: m.params,
                    file,
                    after: m.after,
                })
            })
            .collect()
    };
    let early = open(paths::MODULE_ORDER)?;
    let late = open(paths::MODULE_LATE)?;
    let late_count = late.len();
    crate::modules::start(
        ctx.platform.clone(),
        early,
        late,
        module_jobs(&ctx.platform.cmdline()?),
    );
    // efivarfs (where the firmware stub left `LoaderDevicePartUUID`) is mounted as soon as its
    // module is in, while the disk drivers still load.
    let efivarfs = async {
        crate::modules::wait_for(crate::modules::FOR_EFIVARS).await?;
        mount_efivarfs(&ctx)
    };
    let disk = async {
        crate::modules::wait_for(crate::modules::FOR_BOOT_DISK).await?;
        Ok::<(), sequencer::TaskError>(())
    };
    tokio::try_join!(disk, efivarfs)?;
    let done = crate::modules::loaded();
    let mut slowest: Vec<&crate::modules::Loaded> = done.iter().collect();
    slowest.sort_by_key(|l| std::cmp::Reverse(l.took));
    let count = |f: fn(&ModuleLoad) -> bool| {
        done.iter()
            .filter(|l| l.outcome.as_ref().is_ok_and(f))
            .count()
    };
    tracing::info!(
        "kernel modules: {} loaded, {} already present, the rest ({late_count} for later) loading in the background; slowest: {}",
        count(|o| *o == ModuleLoad::Loaded),
        count(|o| *o == ModuleLoad::AlreadyLoaded),
        slowest
            .iter()
            .take(5)
            .map(|l| format!("{} {} ms", name_of(&l.path), l.took.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let absent: Vec<String> = done
        .iter()
        .filter(|l| {
            l.outcome
                .as_ref()
                .is_ok_and(|o| *o == ModuleLoad::NoSuchHardware)
        })
        .map(|l| name_of(&l.path))
        .collect();
    if !absent.is_empty() {
        tracing::info!(
            "not for this machine (the CPU or device they drive is absent): {}",
            absent.join(", ")
        );
    }
    Ok(())
}

/// How many modules load at once: one more than there are CPUs (module init often waits on
/// a device, and another module's work fills the wait), or `plinth.modules.jobs=N`.
fn module_jobs(cmdline: &str) -> usize {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("plinth.modules.jobs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) + 1)
        .max(1)
}

/// Arms the watchdog (if the machine has one): from here on, a boot that stops making progress
/// resets the machine.
pub async fn arm_watchdog(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    if ctx.platform.name() != "linux" {
        return Ok(());
    }
    crate::modules::wait_for(crate::modules::FOR_WATCHDOG).await?;
    match super::blocking(crate::watchdog::arm).await? {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!("no watchdog device: a hung boot will not reset by itself");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Mounts efivarfs, where the firmware stub left `LoaderDevicePartUUID`.
fn mount_efivarfs(ctx: &Initramfs) -> Result<(), sequencer::TaskError> {
    let spec = MountSpec::new("efivarfs", crate::platform::linux::EFIVARS, "efivarfs").restricted();
    Ok(ctx.platform.mount(&spec)?)
}

/// Finds the system disk (the one whose ESP the firmware booted from) and the slot's root on it.
pub async fn find_boot_disk(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    // Blocking work only (EFI variables through the firmware, partition tables, META): on a
    // thread of its own, so that the phase's other task (the watchdog) runs beside it instead
    // of after it on the initramfs's one async thread.
    super::blocking(move || look_for_boot_disk(&ctx)).await?
}

fn look_for_boot_disk(ctx: &Initramfs) -> Result<(), sequencer::TaskError> {
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
                verity: None,
                partitions: disk
                    .partitions
                    .iter()
                    .map(|(p, node)| (p.label.clone(), node.clone()))
                    .collect(),
            };
            tracing::info!(
                "booted slot {slot} from {}; root is {}",
                disk.device.display(),
                root.display()
            );
            *ctx.boot.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            ctx.note_trial(disk, slot);
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
        // The namespace scan ends after the driver's load returns; looking again often costs
        // a directory listing, and the boot waits for nothing else here.
        std::thread::sleep(DISK_POLL);
    }
}

/// The device-mapper name of the slot's verified root.
pub const ROOT_MAPPING: &str = "plinth-root";

/// Maps the slot's root partition through dm-verity with the root hash the (signed) UKI's
/// command line pins: from here on the kernel checks every block it reads against the tree,
/// and a corrupted block panics the node (a trial boot then falls back by itself).
pub async fn map_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let root = VerityRoot::from_cmdline(&ctx.platform.cmdline()?)?;
    crate::modules::wait_for(crate::modules::FOR_ROOT).await?;
    let mut boot = ctx.require_boot()?;
    let device = ctx
        .platform
        .map_verity(ROOT_MAPPING, &boot.root_device, &root, true)?;
    tracing::info!(
        "root {} mapped through dm-verity as {} (root hash {})",
        boot.root_device.display(),
        device.display(),
        root.root
    );
    boot.verity = Some(MappedRoot {
        root,
        name: ROOT_MAPPING.into(),
        device,
    });
    *ctx.boot.lock().unwrap_or_else(|p| p.into_inner()) = Some(boot);
    Ok(())
}

/// Mounts the slot's SquashFS read-only where the new root will be.
pub async fn mount_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let boot = ctx.require_boot()?;
    let mapped = boot
        .verity
        .as_ref()
        .ok_or("the root was not mapped through dm-verity")?;
    let source = mapped.device.display().to_string();
    Ok(ctx
        .platform
        .mount(&MountSpec::new(&source, paths::NEW_ROOT, "squashfs").read_only())?)
}

/// Switches to the new root and leaves the boot info for machined on `/run`.
pub async fn switch_root(ctx: Initramfs) -> Result<(), sequencer::TaskError> {
    let boot = ctx.require_boot()?;
    // systemd-stub put the UKI's PCR policy key and signatures in the initramfs (not
    // measured: the signatures cover PCR 11, which covers the key); machined needs them to
    // unseal the volume keys, and the initramfs is about to go.
    let extra: Vec<(&str, Vec<u8>)> = [
        (STUB_PCR_SIGNATURE, crate::volume::PCR_SIGNATURE),
        (STUB_PCR_PUBLIC_KEY, crate::volume::PCR_PUBLIC_KEY),
    ]
    .into_iter()
    .filter_map(|(from, to)| Some((to, ctx.platform.read(Path::new(from)).ok()?)))
    .collect();
    ctx.platform.switch_root(&PathBuf::from(paths::NEW_ROOT))?;
    let info = Path::new(paths::BOOT_INFO);
    if let Some(dir) = info.parent() {
        ctx.platform.mkdir_all(dir)?;
    }
    for (to, data) in extra {
        ctx.platform.write(Path::new(to), &data)?;
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

    #[test]
    fn module_lines_name_what_goes_in_first() {
        assert_eq!(
            parse_module_line("kernel/a.ko: kernel/b.ko kernel/c.ko"),
            Some(ModuleLine {
                path: "kernel/a.ko".into(),
                params: String::new(),
                after: vec!["kernel/b.ko".into(), "kernel/c.ko".into()]
            })
        );
        assert_eq!(
            parse_module_line("kernel/a.ko stop_on_reboot=0 async_probe=1"),
            Some(ModuleLine {
                path: "kernel/a.ko".into(),
                params: "stop_on_reboot=0 async_probe=1".into(),
                after: vec![]
            })
        );
        assert_eq!(
            parse_module_line("kernel/a.ko async_probe=1: kernel/b.ko"),
            Some(ModuleLine {
                path: "kernel/a.ko".into(),
                params: "async_probe=1".into(),
                after: vec!["kernel/b.ko".into()]
            })
        );
        assert_eq!(parse_module_line("  "), None);
        assert_eq!(parse_module_line("# comment"), None);
        assert_eq!(module_jobs("quiet plinth.modules.jobs=1"), 1);
        assert_eq!(module_jobs("plinth.modules.jobs=0"), 1);
        assert!(module_jobs("quiet") >= 2);
    }
}
