//! The Install sequence: from installer media onto a blank disk.
//!
//! The media carries a signed bundle in its `INSTALL` partition. Install partitions the target
//! with the system layout, makes the file systems, then writes slot A exactly as an upgrade
//! writes a slot (same tasks: signature by a trusted key, streamed write, read-back verify), so
//! an install is never less checked than an upgrade. The target becomes the runtime's system
//! disk once partitioned, which is what lets those tasks run unchanged. It ends with slot A
//! committed in META, its boot entry first in `BootOrder`, and the node config on STATE; the
//! caller reboots.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sequencer::{Sequence, Task, TaskError};
use upgrade::layout::{self, LABEL_EPHEMERAL, LABEL_ESP, LABEL_INSTALL, LABEL_STATE};
use upgrade::meta::SlotState;
use upgrade::Slot;

use crate::platform::{MountSpec, PlatformError, WipeMethod};
use crate::runtime::{paths, Runtime};
use crate::slots;
use crate::tasks::state;
use crate::tasks::upgrade as t;
use crate::upgrade::UpgradeJob;

/// Size of each slot on an installed disk.
pub const SLOT_BYTES: u64 = 256 << 20;

/// Where the target's STATE is mounted while the config is written to it.
const TARGET_STATE: &str = "/run/plinth/install/state";

/// How much of each end of a disk is looked at (and wiped): where partition tables and file
/// system signatures live.
const ENDS: u64 = 1 << 20;

/// One install in progress.
pub struct InstallJob {
    /// The upgrade machinery, writing slot A of the target.
    pub upgrade: Arc<UpgradeJob>,
    /// The target disk.
    pub disk: PathBuf,
    /// Whether whatever is on the target may be destroyed.
    pub wipe: bool,
    /// The target's STATE volume, once made (the mapping, when it is encrypted).
    state: std::sync::Mutex<Option<PathBuf>>,
}

impl InstallJob {
    fn rt(&self) -> &Runtime {
        &self.upgrade.rt
    }
}

/// What the target disk holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Zeroes where a partition table or file system would be.
    Blank,
    /// A GPT with Plinth's partitions.
    PlinthInstall(Vec<String>),
    /// A GPT with other partitions.
    Partitions(Vec<String>),
    /// No GPT, but not blank either (a file system, another table, data).
    Data,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Blank => f.write_str("nothing"),
            Found::PlinthInstall(l) => write!(f, "a Plinth install (partitions {})", l.join(", ")),
            Found::Partitions(l) => write!(f, "a partition table ({})", l.join(", ")),
            Found::Data => {
                f.write_str("data (non-zero bytes where a partition table or file system would be)")
            }
        }
    }
}

/// Reads what `disk` holds and its size.
pub fn inspect(rt: &Runtime, disk: &Path) -> Result<(Found, u64), TaskError> {
    let (mut f, _) = rt.platform.open_partition(disk, false)?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| PlatformError::io("sizing", disk, e))?;
    if let Ok(parts) = layout::read_table(&mut f) {
        if !parts.is_empty() {
            let labels: Vec<String> = parts.iter().map(|p| p.label.clone()).collect();
            let plinth = [LABEL_ESP, layout::LABEL_META, LABEL_STATE]
                .iter()
                .all(|l| labels.iter().any(|x| x == l));
            return Ok(if plinth {
                (Found::PlinthInstall(labels), size)
            } else {
                (Found::Partitions(labels), size)
            });
        }
    }
    let mut buf = vec![0u8; ENDS.min(size) as usize];
    for at in [0, size.saturating_sub(ENDS)] {
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| PlatformError::io("reading", disk, e))?;
        if buf.iter().any(|&b| b != 0) {
            return Ok((Found::Data, size));
        }
    }
    Ok((Found::Blank, size))
}

/// Why an install onto `machine.install.disk` may not start (answered before anything is
/// written, while the config that names it is applied).
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Not on installer media.
    #[error("the node did not boot from installer media")]
    NotMedia,
    /// No target.
    #[error("machine.install: the node booted from installer media and needs a target disk (machine.install.disk)")]
    NoTarget,
    /// Nothing to check the bundle with.
    #[error("machine.upgrade.trusted_keys: empty; the installer checks the bundle's signature like an upgrade, so list the key that signed it")]
    NoTrustedKeys,
    /// The target is not a block device (or cannot be looked at).
    #[error("machine.install.disk: {0}")]
    NotADisk(PlatformError),
    /// A partition, not a disk.
    #[error("machine.install.disk: {0} is a partition; name the whole disk (the install lays out its own partitions)")]
    Partition(String),
    /// The media itself.
    #[error("machine.install.disk: {0} is the installer media itself")]
    Media(String),
    /// The target could not be read.
    #[error("machine.install.disk: {disk}: {source}")]
    Unreadable {
        /// The disk.
        disk: String,
        /// Why.
        #[source]
        source: TaskError,
    },
    /// It holds something and wiping was not allowed.
    #[error(
        "machine.install.disk: {disk} holds {found}; set machine.install.wipe to install over it"
    )]
    NotBlank {
        /// The disk.
        disk: String,
        /// What it holds.
        found: Found,
    },
    /// The config refuses unencrypted volumes and this machine cannot encrypt them.
    #[error("machine.encryption.without_tpm is refuse, and this machine cannot seal keys to a TPM ({0})")]
    NoTpm(String),
    /// The firmware holds Secure Boot keys that are not the media's.
    #[error("this machine's firmware holds other Secure Boot keys (Secure Boot {mode}, not in Setup Mode), so it would not boot what this installer writes: enrol the db certificate the media carries ({keys}/db.auth) or put the firmware in Setup Mode")]
    ForeignSecureBootKeys {
        /// The firmware's mode.
        mode: bootloader::secureboot::Mode,
        /// Where the media keeps its keys.
        keys: &'static str,
    },
    /// Too small.
    #[error("machine.install.disk: {disk} has {size} bytes; the layout needs at least {need}")]
    TooSmall {
        /// The disk.
        disk: String,
        /// Its size.
        size: u64,
        /// The layout's minimum.
        need: u64,
    },
}

/// Whether the config's install target can be installed on; the disk (as the disk list
/// names it) and whether it may be wiped.
pub fn admit(rt: &Runtime, cfg: &config::NodeConfig) -> Result<(PathBuf, bool), AdmitError> {
    if !rt.installer() {
        return Err(AdmitError::NotMedia);
    }
    let install = cfg.machine.install.as_ref().ok_or(AdmitError::NoTarget)?;
    if cfg.machine.upgrade.trusted_keys.is_empty() {
        return Err(AdmitError::NoTrustedKeys);
    }
    let named = PathBuf::from(&install.disk);
    let target = rt
        .platform
        .block_device(&named)
        .map_err(AdmitError::NotADisk)?;
    if target.partition {
        return Err(AdmitError::Partition(named.display().to_string()));
    }
    // The same device, however it is named (a by-id symlink, another path).
    let media = rt
        .boot()
        .and_then(|b| rt.platform.block_device(&b.disk).ok());
    if media.is_some_and(|m| m.id == target.id) {
        return Err(AdmitError::Media(named.display().to_string()));
    }
    let disk = target.path;
    let shown = disk.display().to_string();
    let (found, size) = inspect(rt, &disk).map_err(|source| AdmitError::Unreadable {
        disk: shown.clone(),
        source,
    })?;
    if found != Found::Blank && !install.wipe {
        return Err(AdmitError::NotBlank { disk: shown, found });
    }
    let need = layout::min_disk_bytes(SLOT_BYTES);
    if size < need {
        return Err(AdmitError::TooSmall {
            disk: shown,
            size,
            need,
        });
    }
    if cfg.machine.encryption.without_tpm == config::WithoutTpm::Refuse {
        let why = match rt.platform.tpm() {
            Ok(Some(_)) => crate::volume::policy_material(rt.platform.as_ref())
                .err()
                .map(|w| format!("the booted image is not signed for TPM sealing: {w}")),
            Ok(None) => Some("it has no TPM".to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            return Err(AdmitError::NoTpm(why));
        }
    }
    if let Some(keys) = media_keys(rt) {
        let mode = bootloader::secureboot::mode(&rt.platform.efivars())
            .unwrap_or(bootloader::secureboot::Mode::Unsupported);
        let ours =
            bootloader::secureboot::db_has(&rt.platform.efivars(), &keys.db_cert).unwrap_or(false);
        if matches!(
            mode,
            bootloader::secureboot::Mode::On | bootloader::secureboot::Mode::Off
        ) && !ours
        {
            return Err(AdmitError::ForeignSecureBootKeys {
                mode,
                keys: KEYS_DIR,
            });
        }
    }
    Ok((disk, install.wipe))
}

/// Where installer media keep the signed Secure Boot lists, on their ESP.
pub const KEYS_DIR: &str = "EFI/plinth/keys";
/// Where the media's ESP is looked at.
const MEDIA_ESP: &str = "/run/plinth/install/media-esp";

/// The signed Secure Boot lists the installer media carry.
#[derive(Debug, Clone)]
pub struct MediaKeys {
    /// `db.auth`, `KEK.auth`, `PK.auth`.
    pub db: Vec<u8>,
    /// KEK's.
    pub kek: Vec<u8>,
    /// PK's.
    pub pk: Vec<u8>,
    /// The db certificate (DER), from the end of `db.auth`'s signature list.
    pub db_cert: Vec<u8>,
}

/// The Secure Boot lists on the media's ESP, if the media carry them (a signed image's do).
pub fn media_keys(rt: &Runtime) -> Option<MediaKeys> {
    let boot = rt.boot()?;
    let disks = rt.platform.disks().ok()?;
    let (_, esp) = disks
        .iter()
        .find(|d| d.device == boot.disk)?
        .by_label(LABEL_ESP)?
        .clone();
    rt.platform.mkdir_all(Path::new(MEDIA_ESP)).ok()?;
    let spec = MountSpec::new(&esp.display().to_string(), MEDIA_ESP, "vfat")
        .read_only()
        .restricted();
    rt.platform.mount(&spec).ok()?;
    let read = |v: &str| {
        rt.platform
            .read(
                &Path::new(MEDIA_ESP)
                    .join(KEYS_DIR)
                    .join(format!("{v}.auth")),
            )
            .ok()
    };
    let found = (|| {
        let (db, kek, pk) = (read("db")?, read("KEK")?, read("PK")?);
        // EFI_VARIABLE_AUTHENTICATION_2: a 16-byte time, then a certificate of dwLength bytes;
        // then the list: a 28-byte header and a 16-byte owner before the certificate.
        let cert_len = u32::from_le_bytes(db.get(16..20)?.try_into().ok()?) as usize;
        let db_cert = db.get(16 + cert_len + 44..)?.to_vec();
        Some(MediaKeys {
            db,
            kek,
            pk,
            db_cert,
        })
    })();
    let _ = rt.platform.unmount(Path::new(MEDIA_ESP));
    found
}

/// A job installing from the media's bundle onto the config's target.
pub fn job(rt: Arc<Runtime>) -> Result<Arc<InstallJob>, TaskError> {
    let cfg = rt.config().ok_or("the node config is not loaded")?;
    let (disk, wipe) = admit(&rt, &cfg)?;
    let (_, dev) = slots::partition(&rt, LABEL_INSTALL)?;
    let (mut f, base) = rt.platform.open_partition(&dev, false)?;
    f.seek(SeekFrom::Start(base))
        .map_err(|e| PlatformError::io("seeking in", &dev, e))?;
    let source = Box::new(tokio::fs::File::from_std(f));
    Ok(Arc::new(InstallJob {
        upgrade: UpgradeJob::for_slot(rt, Slot::A, source),
        disk,
        wipe,
        state: std::sync::Mutex::new(None),
    }))
}

/// Wipes the target if allowed (and needed); refuses otherwise.
async fn check_target(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let (found, size) = inspect(j.rt(), &j.disk)?;
    match found {
        Found::Blank => Ok(()),
        _ if j.wipe => {
            tracing::info!("wiping {} (it held {found})", j.disk.display());
            Ok(j.rt().platform.wipe(&j.disk, size, WipeMethod::Fast)?)
        }
        _ => Err(format!("{} holds {found}", j.disk.display()).into()),
    }
}

/// Writes the GPT, has the kernel read it, and makes the target the system disk.
async fn partition(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let rt = j.rt();
    let (mut f, _) = rt.platform.open_partition(&j.disk, true)?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| PlatformError::io("sizing", &j.disk, e))?;
    let parts = layout::plan(size, SLOT_BYTES)?;
    layout::write_table(&mut f, size, &parts)?;
    f.sync_all()
        .map_err(|e| PlatformError::io("syncing", &j.disk, e))?;
    drop(f);
    rt.platform.reread_partitions(&j.disk)?;
    // The partitions' device nodes appear asynchronously (devtmpfs).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let disks = rt.platform.disks()?;
        let ready = disks.iter().find(|d| d.device == j.disk).is_some_and(|d| {
            parts.iter().all(|p| {
                d.by_label(&p.label)
                    .is_some_and(|(_, node)| rt.platform.open_partition(node, false).is_ok())
            })
        });
        if ready {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{}: the kernel did not show the new partitions within 10 s",
                j.disk.display()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rt.set_system_disk(j.disk.clone());
    // The new layout puts META where a previous install had it, and a fast wipe of the disk
    // leaves it: a record of slots (and a security floor) that are not this install's.
    let (meta, meta_dev) = slots::partition(rt, layout::LABEL_META)?;
    rt.platform.wipe(&meta_dev, meta.len, WipeMethod::Zero)?;
    tracing::info!(
        "partitioned {}: {}",
        j.disk.display(),
        parts
            .iter()
            .map(|p| format!("{} {} MiB", p.label, p.len >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn format_label(j: &InstallJob, label: &'static str, fstype: &str) -> Result<(), TaskError> {
    let (_, dev) = slots::partition(j.rt(), label)?;
    state::format(j.rt(), &dev, fstype, label).await
}

async fn format_esp(j: Arc<InstallJob>) -> Result<(), TaskError> {
    format_label(&j, LABEL_ESP, "vfat").await
}

/// Makes the target's `label` volume (encrypted, its key sealed to this machine's TPM, when it
/// can be) and its file system.
async fn format_volume(j: &InstallJob, label: &'static str) -> Result<PathBuf, TaskError> {
    let (_, dev) = slots::partition(j.rt(), label)?;
    crate::modules::wait_for(crate::modules::FOR_VOLUMES).await?;
    crate::modules::wait_for(crate::modules::FOR_CRYPT).await?;
    let v = crate::volume::create(j.rt().platform.as_ref(), label, &dev)?;
    state::format(j.rt(), &v.device, "ext4", label).await?;
    tracing::info!("{label}: {}", v.protection);
    Ok(v.device)
}

async fn format_state(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let dev = format_volume(&j, LABEL_STATE).await?;
    *j.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(dev);
    Ok(())
}

async fn format_ephemeral(j: Arc<InstallJob>) -> Result<(), TaskError> {
    format_volume(&j, LABEL_EPHEMERAL).await?;
    Ok(j.rt()
        .platform
        .unmap(&crate::volume::mapping_name(LABEL_EPHEMERAL))?)
}

/// On a machine in Setup Mode, enrols the Secure Boot keys the media carry (db, KEK, then PK,
/// which ends Setup Mode): from the next boot the firmware starts only UKIs signed by them.
/// Last but for the commit, so an install that fails earlier leaves the firmware as it was.
async fn enrol_secure_boot(j: Arc<InstallJob>) -> Result<(), TaskError> {
    use bootloader::secureboot::{self, Mode};
    let rt = j.rt();
    let Some(keys) = media_keys(rt) else {
        tracing::info!("the media carry no Secure Boot keys (an unsigned image): none enrolled");
        return Ok(());
    };
    let store = rt.platform.efivars();
    match secureboot::mode(&store).map_err(bootloader::BootVarError::from)? {
        Mode::Setup => {
            secureboot::enrol(&store, &keys.db, &keys.kek, &keys.pk)
                .map_err(bootloader::BootVarError::from)?;
            tracing::info!("enrolled the media's Secure Boot keys (db, KEK, PK): Secure Boot is on from the next boot");
            rt.bus.publish(
                sequencer::EventKind::Slot {
                    slot: Slot::A.to_string(),
                    state: "installing".into(),
                    message: "enrolled the media's Secure Boot keys; Secure Boot is on from the next boot".into(),
                },
                None,
            );
        }
        Mode::Unsupported => {
            tracing::info!("this firmware has no Secure Boot: no keys enrolled")
        }
        mode => tracing::info!("Secure Boot is {mode} with the media's keys already enrolled"),
    }
    Ok(())
}

/// Mounts the target's ESP where the upgrade tasks write UKIs.
async fn mount_esp(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let (_, dev) = slots::partition(j.rt(), LABEL_ESP)?;
    crate::modules::wait_for(crate::modules::FOR_ESP).await?;
    let dev = dev.display().to_string();
    j.rt().platform.mkdir_all(Path::new(paths::ESP))?;
    Ok(j.rt()
        .platform
        .mount(&MountSpec::new(&dev, paths::ESP, "vfat").restricted())?)
}

/// The removable-media path gets slot A's UKI too (firmware that loses its entries still
/// boots the disk).
async fn install_fallback(j: Arc<InstallJob>) -> Result<(), TaskError> {
    slots::follow_committed(j.rt(), Slot::A)
}

/// META: slot A good and committed; its entry first in `BootOrder`.
async fn commit(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let m = slots::update_meta(j.rt(), |m| m.commit(Slot::A))?;
    let entries = slots::reconcile_entries(j.rt(), &m)?;
    let version = &m.slot(Slot::A).version;
    slots::slot_event(
        j.rt(),
        Slot::A,
        SlotState::Good,
        format!("{version} installed on {}", j.disk.display()),
    );
    tracing::info!(
        "installed {version} in slot A of {}; boot entry {:04X?}",
        j.disk.display(),
        entries[0]
    );
    Ok(())
}

/// Puts the node config on the target's STATE, then unmounts what the install mounted.
async fn write_config(j: Arc<InstallJob>) -> Result<(), TaskError> {
    let rt = j.rt();
    let cfg = rt.config().ok_or("the node config is not loaded")?;
    let dev = j
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or("the target's STATE was not made")?;
    let dev = dev.display().to_string();
    rt.platform.mkdir_all(Path::new(TARGET_STATE))?;
    rt.platform
        .mount(&MountSpec::new(&dev, TARGET_STATE, "ext4").restricted())?;
    let written = cfg.to_yaml().map_err(TaskError::from).and_then(|yaml| {
        rt.platform
            .replace(
                &Path::new(TARGET_STATE).join("config.yaml"),
                yaml.as_bytes(),
            )
            .map_err(TaskError::from)
    });
    rt.platform.sync();
    let unmounted = rt.platform.unmount(Path::new(TARGET_STATE));
    let esp = rt.platform.unmount(Path::new(paths::ESP));
    let unmapped = rt.platform.unmap(&crate::volume::mapping_name(LABEL_STATE));
    written?;
    unmounted?;
    esp?;
    unmapped?;
    Ok(())
}

/// An upgrade task run on the install's upgrade job.
macro_rules! upgrade_task {
    ($name:literal, $f:path) => {
        Task::new($name, |j: Arc<InstallJob>| $f(j.upgrade.clone()))
    };
}

/// The install phase table.
pub fn install() -> Sequence<Arc<InstallJob>> {
    Sequence::new("install")
        .phase("checkTarget", [Task::new("checkTarget", check_target)])
        .phase("partition", [Task::new("partition", partition)])
        .phase(
            "format",
            [
                Task::new("formatEsp", format_esp),
                Task::new("formatState", format_state),
                Task::new("formatEphemeral", format_ephemeral),
            ],
        )
        .phase("mountEsp", [Task::new("mountEsp", mount_esp)])
        .phase("readBundle", [upgrade_task!("readBundle", t::read_bundle)])
        .phase("receiveUki", [upgrade_task!("receiveUki", t::receive_uki)])
        .phase("writeSlot", [upgrade_task!("writeSlot", t::write_slot)])
        .phase("verifySlot", [upgrade_task!("verifySlot", t::verify_slot)])
        .phase("installUki", [upgrade_task!("installUki", t::install_uki)])
        .phase(
            "markWritten",
            [upgrade_task!("markWritten", t::mark_pending)],
        )
        .phase(
            "installFallback",
            [Task::new("installFallback", install_fallback)],
        )
        .phase(
            "enrolSecureBoot",
            [Task::new("enrolSecureBoot", enrol_secure_boot)],
        )
        .phase("commit", [Task::new("commit", commit)])
        .phase("writeConfig", [Task::new("writeConfig", write_config)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_install_phases_are_in_order() {
        assert_eq!(
            super::install().phase_names(),
            [
                "checkTarget",
                "partition",
                "format",
                "mountEsp",
                "readBundle",
                "receiveUki",
                "writeSlot",
                "verifySlot",
                "installUki",
                "markWritten",
                "installFallback",
                "enrolSecureBoot",
                "commit",
                "writeConfig"
            ]
        );
    }
}
