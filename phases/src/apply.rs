//! The applyConfig sequence, and how the node config is kept on STATE.
//!
//! ```text
//! applyConfig: validate → writeConfig → applyLive → armRevert (try mode only)
//! ```
//!
//! A config is started like any other sequence, through the lifecycle machine: refused at once
//! while an upgrade, reset or install runs, never two at a time. `writeConfig` is the one place
//! the node's config changes, on disk and in memory together, under one lock; a config
//! admitted in maintenance mode may only be the *first* one (check and set under that lock), so
//! a call let in without a certificate can never replace a config an operator applied.
//!
//! On STATE: `config.yaml` is replaced atomically (temporary file, fsync, rename, fsync of the
//! directory) after the config it replaces is kept as `config.prev.yaml`. A config being tried
//! also leaves `config.trying`: a boot that finds it reverts to the previous config, since the
//! try was never confirmed.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use config::NodeConfig;
use sequencer::{Sequence, SequenceKind, Task};

use crate::platform::PlatformError;
use crate::runtime::{paths, Runtime};

/// The config an applied one replaced.
pub const PREVIOUS: &str = "/system/state/config.prev.yaml";
/// Present while a config is being tried: a boot that finds it reverts to [`PREVIOUS`].
pub const TRYING: &str = "/system/state/config.trying";

/// How long a try lasts when the caller does not say.
pub const DEFAULT_TRY: Duration = Duration::from_secs(60);

/// What to do once the config is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Apply what can be applied live; the rest at the next boot.
    NoReboot,
    /// Reboot into it (the caller starts the reboot once the sequence is done).
    Reboot,
    /// Apply live, and go back by itself after this long unless confirmed.
    Try(Duration),
}

/// Why a config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A call admitted in maintenance mode found the node configured.
    #[error("the node already has its config; a call admitted in maintenance mode (without a client certificate) may only give it its first one")]
    AlreadyConfigured,
    /// A change to a configured node with no config loaded.
    #[error("the node has no config to change")]
    NotConfigured,
    /// The config's install target cannot be installed on.
    #[error(transparent)]
    Install(#[from] crate::install::AdmitError),
    /// Nothing is being tried.
    #[error("no config is being tried")]
    NothingToConfirm,
    /// The config refuses the node's unencrypted volumes.
    #[error("{0}")]
    Encryption(String),
    /// STATE is sealed and this boot could not unseal it: no config can be written.
    #[error(
        "{0}; no config can be written to it (install from media over this disk to start over)"
    )]
    Locked(String),
    /// The config could not be written as YAML.
    #[error("writing the config as YAML: {0}")]
    Yaml(#[from] config::ConfigError),
    /// STATE could not be written.
    #[error("writing the config to STATE: {0}")]
    Write(#[from] PlatformError),
    /// The containers could not be changed (the config is written).
    #[error("changing the containers: {0}")]
    Containers(String),
}

/// One config being applied.
pub struct ApplyJob {
    /// The node.
    pub rt: Arc<Runtime>,
    /// The new config.
    pub config: NodeConfig,
    /// What to do once written.
    pub mode: Mode,
    /// Admitted in maintenance mode: may only set the first config.
    pub first: bool,
    /// Sections that only a boot applies (filled in by `applyLive`).
    needs_reboot: Mutex<Vec<String>>,
    /// The config it replaced (filled in by `writeConfig`).
    replaced: Mutex<Option<NodeConfig>>,
}

impl ApplyJob {
    /// A job applying `config`.
    pub fn new(rt: Arc<Runtime>, config: NodeConfig, mode: Mode, first: bool) -> Arc<ApplyJob> {
        Arc::new(ApplyJob {
            rt,
            config,
            mode,
            first,
            needs_reboot: Mutex::new(Vec::new()),
            replaced: Mutex::new(None),
        })
    }

    /// Sections that take effect only at the next boot.
    pub fn needs_reboot(&self) -> Vec<String> {
        self.needs_reboot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replaced(&self) -> Option<NodeConfig> {
        self.replaced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The applyConfig phase table.
pub fn sequence() -> Sequence<Arc<ApplyJob>> {
    Sequence::new("applyConfig")
        .phase("validate", [Task::new("validate", validate)])
        .phase("writeConfig", [Task::new("writeConfig", write_config)])
        .phase("applyLive", [Task::new("applyLive", apply_live)])
        .phase_when(
            "armRevert",
            |j: &Arc<ApplyJob>| matches!(j.mode, Mode::Try(_)),
            [Task::new("armRevert", arm_revert)],
        )
}

/// The confirmation of a config being tried, as a sequence of the same kind (so it, too, is
/// admitted by the lifecycle and shows in the trace).
pub fn confirm_sequence() -> Sequence<Arc<Runtime>> {
    Sequence::new("applyConfig").phase("confirm", [Task::new("confirm", confirm)])
}

/// What only this node can check: on installer media, an install target that can be used.
async fn validate(job: Arc<ApplyJob>) -> Result<(), ApplyError> {
    let rt = &job.rt;
    if job.first && rt.installer() {
        crate::install::admit(rt, &job.config)?;
    }
    if !job.first && rt.config().is_none() {
        return Err(ApplyError::NotConfigured);
    }
    if job.first && rt.config().is_some() {
        return Err(ApplyError::AlreadyConfigured);
    }
    if let Some(why) = crate::volume::locked(&rt.volumes()) {
        return Err(ApplyError::Locked(why));
    }
    // A node running on plain volumes cannot take a config that refuses them (installer
    // media are checked by the install's own admission: their volumes are memory).
    if !rt.installer() {
        crate::volume::check_policy(job.config.machine.encryption.without_tpm, &rt.volumes())
            .map_err(ApplyError::Encryption)?;
    }
    Ok(())
}

/// Writes the config and makes it the node's, as one step under the config lock.
async fn write_config(job: Arc<ApplyJob>) -> Result<(), ApplyError> {
    let rt = &job.rt;
    let _held = rt.config_lock();
    let current = rt.config();
    // The check and the set under one lock: of two first configs racing, one wins, and a
    // maintenance call can never replace a config that is already there.
    if job.first && current.is_some() {
        return Err(ApplyError::AlreadyConfigured);
    }
    let yaml = job.config.to_yaml()?;
    let p = &rt.platform;
    let trying = exists(p.as_ref(), TRYING)?;
    // While a try is pending, PREVIOUS is the config it reverts to: a second try, or a normal
    // apply on top of it, must not make the unconfirmed one the fallback.
    if let (Some(old), false) = (&current, trying) {
        p.replace(Path::new(PREVIOUS), old.to_yaml()?.as_bytes())?;
    }
    if let Mode::Try(_) = job.mode {
        p.replace(Path::new(TRYING), b"a config is being tried\n")?;
    }
    p.replace(Path::new(paths::CONFIG), yaml.as_bytes())?;
    if !matches!(job.mode, Mode::Try(_)) {
        // Applying over a config being tried keeps the new one for good: its revert is
        // cancelled, and the marker goes only now that the new config is in place.
        if let Some(pending) = rt.replace_pending_try(None) {
            pending.cancel();
        }
        p.remove(Path::new(TRYING))?;
    }
    // A try over a try goes back to the config before both.
    let current = match (&job.mode, trying) {
        (Mode::Try(_), true) => read_previous(p.as_ref()).or(current),
        _ => current,
    };
    rt.set_config(job.config.clone());
    *job.replaced.lock().unwrap_or_else(|p| p.into_inner()) = current;
    if job.first {
        // The boot goes on with it even if the caller is gone by now.
        rt.config_applied.notify_one();
    }
    Ok(())
}

/// Applies what can change without a boot (the host name, the containers); says what needs
/// one.
async fn apply_live(job: Arc<ApplyJob>) -> Result<(), ApplyError> {
    let new = &job.config.machine;
    let Some(old_config) = job.replaced() else {
        // The first config: the boot that follows applies all of it.
        return Ok(());
    };
    let old = &old_config.machine;
    if new.name != old.name {
        job.rt.platform.set_hostname(&new.name)?;
    }
    let mut later = Vec::new();
    if new.network != old.network {
        later.push("machine.network".to_string());
    }
    if new.api != old.api {
        later.push("machine.api".to_string());
    }
    if new.services != old.services {
        later.push("machine.services".to_string());
    }
    // etcd runs as the boot's config made it.
    if new.machine_type != old.machine_type {
        later.push("machine.type".to_string());
    }
    if job.config.cluster != old_config.cluster {
        later.push("cluster".to_string());
    }
    if new.containers != old.containers {
        crate::tasks::services::apply_containers(&job.rt, &old.containers, &new.containers)
            .await
            .map_err(|e| ApplyError::Containers(e.to_string()))?;
    }
    *job.needs_reboot.lock().unwrap_or_else(|p| p.into_inner()) = later;
    Ok(())
}

/// Try mode: unless confirmed in time, the replaced config is applied again.
async fn arm_revert(job: Arc<ApplyJob>) -> Result<(), ApplyError> {
    let Mode::Try(after) = job.mode else {
        return Ok(());
    };
    let Some(old) = job.replaced() else {
        return Ok(());
    };
    let token = tokio_util::sync::CancellationToken::new();
    if let Some(previous) = job.rt.replace_pending_try(Some(token.clone())) {
        previous.cancel();
    }
    let rt = job.rt.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(after) => revert(rt, old, token).await,
        }
    });
    Ok(())
}

/// Applies `old` again (as an applyConfig sequence of its own), retrying while another
/// sequence is in the way, until it runs or the try is confirmed.
async fn revert(rt: Arc<Runtime>, old: NodeConfig, token: tokio_util::sync::CancellationToken) {
    loop {
        if token.is_cancelled() {
            return;
        }
        let job = ApplyJob::new(rt.clone(), old.clone(), Mode::NoReboot, false);
        match rt.controller.start(
            SequenceKind::ApplyConfig,
            sequence(),
            job,
            Some("config-revert".into()),
            false,
        ) {
            Ok(started) => {
                match started.handle.await {
                    Ok(Ok(())) => {
                        tracing::warn!("the config being tried was not confirmed: reverted")
                    }
                    Ok(Err(e)) => tracing::error!("reverting the config being tried: {e}"),
                    Err(e) => tracing::error!("reverting the config being tried: {e}"),
                }
                rt.replace_pending_try(None);
                return;
            }
            Err(denied) => {
                // A terminating sequence will boot, and the boot reverts (config.trying).
                tracing::warn!("reverting the config being tried waits: {denied}");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

/// Keeps the config being tried: its revert is cancelled and the marker removed.
async fn confirm(rt: Arc<Runtime>) -> Result<(), ApplyError> {
    let _held = rt.config_lock();
    let pending = rt
        .replace_pending_try(None)
        .ok_or(ApplyError::NothingToConfirm)?;
    pending.cancel();
    rt.platform.remove(Path::new(TRYING))?;
    Ok(())
}

fn exists(p: &dyn crate::platform::Platform, path: &str) -> Result<bool, PlatformError> {
    match p.read(Path::new(path)) {
        Ok(_) => Ok(true),
        Err(PlatformError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The config kept as PREVIOUS, if it reads as one.
fn read_previous(p: &dyn crate::platform::Platform) -> Option<NodeConfig> {
    let bytes = p.read(Path::new(PREVIOUS)).ok()?;
    NodeConfig::from_yaml(&String::from_utf8_lossy(&bytes)).ok()
}

/// At boot: a config tried and never confirmed (the node went down first) is reverted.
pub fn revert_unconfirmed(rt: &Runtime) -> Result<bool, PlatformError> {
    let p = &rt.platform;
    if !exists(p.as_ref(), TRYING)? {
        return Ok(false);
    }
    match p.read(Path::new(PREVIOUS)) {
        Ok(previous) => p.replace(Path::new(paths::CONFIG), &previous)?,
        Err(e) => {
            tracing::warn!("a config was being tried but the previous one is gone: {e}; keeping it")
        }
    }
    p.remove(Path::new(TRYING))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_apply_phases_are_in_order() {
        assert_eq!(
            super::sequence().phase_names(),
            ["validate", "writeConfig", "applyLive", "armRevert"]
        );
        assert_eq!(super::confirm_sequence().phase_names(), ["confirm"]);
    }
}
