//! The reset sequence: an orderly stop, then wipe, then reboot or power off.
//!
//! Every path kills and unmounts before wiping (a wipe never races a writer); a graceful reset
//! stops services in order first. Which partitions may be wiped is decided before the sequence
//! starts, so an unknown label changes nothing.

use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use sequencer::{Denied, Sequence, SequenceKind, Task, TaskError};

use crate::platform::{PowerAction, WipeMethod};
use crate::runtime::Runtime;
use crate::slots;
use crate::tasks::{services, teardown};

/// Partitions a reset may wipe by label (slots and the ESP go only with the whole disk).
pub const WIPEABLE: &[&str] = &["STATE", "EPHEMERAL"];

/// What to wipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WipeTarget {
    /// These partitions of the system disk.
    Labels(Vec<String>),
    /// The whole system disk: the node needs installation media afterwards.
    SystemDisk,
}

/// One reset.
pub struct ResetJob {
    /// The node.
    pub rt: Arc<Runtime>,
    /// Stop services in order first.
    pub graceful: bool,
    /// What to wipe.
    pub target: WipeTarget,
    /// How.
    pub method: WipeMethod,
    /// Reboot afterwards (else power off).
    pub reboot: bool,
}

/// Why a reset request is refused before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetError {
    /// Both a list of labels and the whole disk.
    #[error("wipe either partitions by label or the whole system disk, not both")]
    LabelsAndDisk,
    /// A label a reset does not wipe.
    #[error("unknown partition label {label:?}: a reset wipes {} by label, or the whole system disk", WIPEABLE.join(", "))]
    UnknownLabel {
        /// As given.
        label: String,
    },
}

/// Checks the request before anything runs: known labels only, not both a list and the disk.
pub fn admit(labels: &[String], system_disk: bool) -> Result<WipeTarget, ResetError> {
    if system_disk && !labels.is_empty() {
        return Err(ResetError::LabelsAndDisk);
    }
    if system_disk {
        return Ok(WipeTarget::SystemDisk);
    }
    if labels.is_empty() {
        return Ok(WipeTarget::Labels(vec!["STATE".into(), "EPHEMERAL".into()]));
    }
    let mut out = Vec::new();
    for l in labels {
        let up = l.to_ascii_uppercase();
        if !WIPEABLE.contains(&up.as_str()) {
            return Err(ResetError::UnknownLabel { label: l.clone() });
        }
        if !out.contains(&up) {
            out.push(up);
        }
    }
    Ok(WipeTarget::Labels(out))
}

async fn leave_etcd(j: Arc<ResetJob>) -> Result<(), TaskError> {
    crate::etcd::leave_before_reset(j.rt.clone()).await
}

async fn stop_services(j: Arc<ResetJob>) -> Result<(), TaskError> {
    services::stop_services(j.rt.clone()).await
}

async fn kill_processes(j: Arc<ResetJob>) -> Result<(), TaskError> {
    teardown::kill_processes(j.rt.clone()).await
}

async fn unmount_filesystems(j: Arc<ResetJob>) -> Result<(), TaskError> {
    teardown::unmount_filesystems(j.rt.clone()).await
}

async fn sync_disks(j: Arc<ResetJob>) -> Result<(), TaskError> {
    teardown::sync_disks(j.rt.clone()).await
}

/// Wipes what the request named.
async fn wipe(j: Arc<ResetJob>) -> Result<(), TaskError> {
    let rt = &j.rt;
    let targets: Vec<(String, std::path::PathBuf, u64)> = match &j.target {
        WipeTarget::Labels(labels) => labels
            .iter()
            .map(|l| slots::partition(rt, l).map(|(p, dev)| (l.clone(), dev, p.len)))
            .collect::<Result<_, _>>()?,
        WipeTarget::SystemDisk => {
            let boot = rt.boot().ok_or(slots::SlotError::NoBootInfo)?;
            let (mut f, base) = rt.platform.open_partition(&boot.disk, false)?;
            let len = f
                .seek(SeekFrom::End(0))
                .map_err(|e| crate::platform::PlatformError::io("sizing", &boot.disk, e))?
                - base;
            // The partitions first (their file systems' contents go with them), then the disk
            // itself, partition table included.
            let disks = rt.platform.disks()?;
            let mut t: Vec<_> = disks
                .iter()
                .find(|d| d.device == boot.disk)
                .map(|d| {
                    d.partitions
                        .iter()
                        .map(|(p, dev)| (p.label.clone(), dev.clone(), p.len))
                        .collect()
                })
                .unwrap_or_default();
            t.push(("system disk".into(), boot.disk.clone(), len));
            t
        }
    };
    for (label, dev, len) in targets {
        let platform = rt.platform.clone();
        if crate::volume::LABELS.contains(&label.as_str()) {
            // Crypto-erase first: the header with the sealed key goes, then the TPM's parent
            // keys, so the data is unreadable whatever the wipe below leaves.
            let (p, l, d) = (platform.clone(), label.clone(), dev.clone());
            let erased =
                tokio::task::spawn_blocking(move || crate::volume::erase(p.as_ref(), &l, &d))
                    .await??;
            if erased {
                tracing::info!(
                    "crypto-erased {label}: its sealed key and the TPM's parent keys are gone"
                );
            }
        }
        let method = j.method;
        let d = dev.clone();
        tokio::task::spawn_blocking(move || platform.wipe(&d, len, method)).await??;
        tracing::info!(
            "wiped {label} ({}, {len} bytes, {:?})",
            dev.display(),
            j.method
        );
    }
    Ok(())
}

/// The reset phase table.
pub fn reset() -> Sequence<Arc<ResetJob>> {
    Sequence::new("reset")
        // A control plane leaves etcd while its services still run.
        .phase_when(
            "leaveEtcd",
            |j: &Arc<ResetJob>| j.graceful,
            [Task::new("leaveEtcd", leave_etcd)],
        )
        .phase_when(
            "stopServices",
            |j: &Arc<ResetJob>| j.graceful,
            [Task::new("stopServices", stop_services)],
        )
        .phase(
            "killProcesses",
            [Task::new("killProcesses", kill_processes)],
        )
        .phase(
            "unmountFilesystems",
            [Task::new("unmountFilesystems", unmount_filesystems)],
        )
        .phase("wipe", [Task::new("wipe", wipe)])
        .phase("syncDisks", [Task::new("syncDisks", sync_disks)])
}

/// Starts a reset; when it ends, reboots or powers off (even after a failure: a node told to
/// reset does not go back to work half-wiped).
pub fn request(job: ResetJob, actor: Option<String>) -> Result<String, Denied> {
    let rt = job.rt.clone();
    let action = if job.reboot {
        PowerAction::Reboot
    } else {
        PowerAction::PowerOff
    };
    let started = rt
        .controller
        .start(SequenceKind::Reset, reset(), Arc::new(job), actor, false)?;
    let platform = rt.platform.clone();
    tokio::spawn(async move {
        match started.handle.await {
            Ok(Err(e)) if e.is_cancelled() => return,
            Ok(Err(e)) => tracing::error!("{e}; going ahead with {action:?}"),
            Ok(Ok(())) => {}
            Err(e) => tracing::error!("reset panicked: {e}; going ahead with {action:?}"),
        }
        if let Err(e) = platform.power(action) {
            tracing::error!("{e}");
        }
    });
    Ok(started.actor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_labels_are_refused_and_the_default_is_state_and_ephemeral() {
        assert_eq!(
            admit(&[], false),
            Ok(WipeTarget::Labels(vec!["STATE".into(), "EPHEMERAL".into()]))
        );
        assert_eq!(
            admit(&["state".into(), "EPHEMERAL".into()], false),
            Ok(WipeTarget::Labels(vec!["STATE".into(), "EPHEMERAL".into()]))
        );
        // META holds the security floor: it goes only with the whole disk.
        assert_eq!(
            admit(&["META".into()], false),
            Err(ResetError::UnknownLabel {
                label: "META".into()
            })
        );
        assert!(admit(&["ROOT-A".into()], false).is_err_and(|e| e.to_string().contains("ROOT-A")));
        assert!(admit(&["STATE".into()], true).is_err());
        assert_eq!(admit(&[], true), Ok(WipeTarget::SystemDisk));
    }

    #[test]
    fn the_reset_phases_are_in_order() {
        assert_eq!(
            reset().phase_names(),
            [
                "leaveEtcd",
                "stopServices",
                "killProcesses",
                "unmountFilesystems",
                "wipe",
                "syncDisks"
            ]
        );
    }
}
