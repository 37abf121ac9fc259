//! Tasks for the node's writable partitions (STATE, EPHEMERAL) and its config.

use std::error::Error as _;
use std::path::Path;
use std::sync::Arc;

use config::NodeConfig;
use sequencer::TaskError;
use upgrade::layout::{LABEL_EPHEMERAL, LABEL_STATE};

use super::blocking;
use crate::platform::{Mkfs, MountSpec};
use crate::runtime::{paths, Runtime};

/// The config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The config is invalid.
    #[error("node config {path}: {source}")]
    BadConfig {
        /// The file.
        path: String,
        /// What is wrong.
        #[source]
        source: config::ConfigError,
    },
}

/// Makes a file system on a partition (through the reaper when a program does it).
pub async fn format(
    ctx: &Runtime,
    device: &Path,
    fstype: &str,
    label: &str,
) -> Result<(), TaskError> {
    match ctx.platform.mkfs(device, fstype, label)? {
        Mkfs::Done => {}
        Mkfs::Run(argv) => {
            let log = Path::new("/run/plinth/mkfs.log");
            let (pid, exit) = ctx.reaper.spawn(|| ctx.platform.spawn(&argv, &[], log))?;
            let exit = exit
                .await
                .map_err(|_| format!("lost the exit of {} (pid {pid})", argv[0]))?;
            if !exit.success() {
                let out = ctx
                    .platform
                    .read(log)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                return Err(
                    format!("{} {}: {exit}: {}", argv[0], device.display(), out.trim()).into(),
                );
            }
        }
    }
    tracing::info!(
        "made a {fstype} file system labelled {label} on {}",
        device.display()
    );
    Ok(())
}

/// Opens a volume (unsealing and mapping an encrypted one) and mounts it, first making it if
/// it is blank: encrypted when the machine can seal its key, with a new file system (a wiped
/// STATE or EPHEMERAL comes back empty; the install on the other partitions stays). The
/// blocking work runs on threads of its own, so STATE and EPHEMERAL open side by side (each a
/// TPM unseal and a mapping when encrypted).
async fn open_and_mount(
    ctx: &Arc<Runtime>,
    label: &'static str,
    target: &'static str,
    restricted: bool,
) -> Result<(), TaskError> {
    let rt = ctx.clone();
    let dev = blocking(move || crate::slots::boot_partition(&rt, label)).await??;
    // The kernel drops a block device's cached blocks at its last close: held open until the
    // mount, the partition's first blocks, read by each check below and by the mount, come
    // from the disk once.
    let (platform, d) = (ctx.platform.clone(), dev.clone());
    let _held = blocking(move || platform.open_partition(&d, false)).await??;
    crate::modules::wait_for(crate::modules::FOR_VOLUMES).await?;
    let (platform, d) = (ctx.platform.clone(), dev.clone());
    if blocking(move || crate::volume::may_encrypt(platform.as_ref(), label, &d)).await?? {
        crate::modules::wait_for(crate::modules::FOR_CRYPT).await?;
    }
    let (platform, d) = (ctx.platform.clone(), dev.clone());
    let opened = match blocking(move || crate::volume::open(platform.as_ref(), label, &d)).await? {
        Err(e) if e.is_locked() => {
            // Not a broken boot: this machine cannot open this volume. The node comes up
            // without it (in maintenance mode, refusing configs) and says why.
            tracing::error!("{e}");
            ctx.set_volume(crate::volume::Volume {
                label: label.into(),
                device: dev,
                protection: crate::volume::Protection::Locked(
                    e.source()
                        .map_or_else(|| e.to_string(), ToString::to_string),
                ),
            });
            return Ok(());
        }
        other => other?,
    };
    // A plain volume was opened because it has a file system; a mapped one may not.
    let (volume, has_filesystem) = match opened {
        Some(v) => {
            let plain = matches!(v.protection, crate::volume::Protection::Plain(_));
            (v, plain)
        }
        None => {
            my_turn_to_make(ctx, label).await;
            let platform = ctx.platform.clone();
            let v =
                blocking(move || crate::volume::create(platform.as_ref(), label, &dev)).await??;
            format(ctx, &v.device, "ext4", label).await?;
            (v, true)
        }
    };
    let (platform, d) = (ctx.platform.clone(), volume.device.clone());
    if !has_filesystem && !blocking(move || platform.has_filesystem(&d, "ext4")).await?? {
        // Sealed and mapped, but the file system was never made (a power cut in between).
        my_turn_to_make(ctx, label).await;
        format(ctx, &volume.device, "ext4", label).await?;
    }
    tracing::info!("{label}: {}", volume.protection);
    let mut spec = MountSpec::new(&volume.device.display().to_string(), target, "ext4");
    if restricted {
        spec = spec.restricted();
    }
    let platform = ctx.platform.clone();
    blocking(move || platform.mount(&spec)).await??;
    ctx.set_volume(volume);
    Ok(())
}

/// Volumes are made one at a time, STATE first ([`Runtime::state_settled`]).
async fn my_turn_to_make(ctx: &Runtime, label: &str) {
    if label != LABEL_STATE {
        // The sender lives in `ctx`, and STATE's task sets it however it ends.
        let _ = ctx.state_settled.subscribe().wait_for(|done| *done).await;
    }
}

/// Mounts STATE (ext4: config, PKI) on `/system/state`.
pub async fn mount_state(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let _settled = crate::runtime::SetOnDrop(&ctx.state_settled);
    open_and_mount(&ctx, LABEL_STATE, paths::STATE, true).await
}

/// Mounts EPHEMERAL (ext4) on `/var`.
pub async fn mount_ephemeral(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    open_and_mount(&ctx, LABEL_EPHEMERAL, paths::EPHEMERAL, false).await
}

/// Once STATE and EPHEMERAL are open, PCR 11 moves on: nothing later in this boot (a root
/// exploit included) can unseal their keys again.
pub async fn lock_volumes(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let sealed = ctx
        .volumes()
        .iter()
        .any(|v| matches!(v.protection, crate::volume::Protection::Sealed { .. }));
    if sealed {
        crate::volume::lock(ctx.platform.as_ref())?;
        tracing::info!("PCR 11 extended: the volume keys cannot be unsealed again this boot");
    }
    Ok(())
}

/// Installer media has no STATE or EPHEMERAL: memory stands in for both (the config applied
/// in maintenance mode lives there until the install copies it to the target).
pub async fn mount_scratch(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    for target in [paths::STATE, paths::EPHEMERAL] {
        ctx.platform.mkdir_all(Path::new(target))?;
        ctx.platform
            .mount(&MountSpec::new("tmpfs", target, "tmpfs").data("mode=0700"))?;
    }
    Ok(())
}

/// Reads and validates the node config from STATE.
pub async fn load_config(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    blocking(move || read_config(&ctx)).await?
}

fn read_config(ctx: &Arc<Runtime>) -> Result<(), TaskError> {
    if crate::apply::revert_unconfirmed(ctx)? {
        tracing::warn!(
            "a config was being tried when the node went down: the previous one is back"
        );
    }
    let path = Path::new(paths::CONFIG);
    let text = match ctx.platform.read(path) {
        Ok(t) => t,
        Err(crate::platform::PlatformError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            // No config: the node will wait for one in maintenance mode.
            tracing::warn!("no node config at {}: maintenance mode", paths::CONFIG);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let config = NodeConfig::from_yaml(&String::from_utf8_lossy(&text)).map_err(|source| {
        StateError::BadConfig {
            path: paths::CONFIG.into(),
            source,
        }
    })?;
    crate::volume::check_policy(config.machine.encryption.without_tpm, &ctx.volumes())?;
    ctx.set_config(config);
    Ok(())
}
