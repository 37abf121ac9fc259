//! The upgrade and rollback sequences.
//!
//! An upgrade writes the slot that is not running, from a signed bundle streamed in (no copy of
//! the image is kept anywhere), verifies it, installs its UKI, marks it pending, and points
//! `BootNext` at it; the reboot that follows is its trial. A staged upgrade stops before
//! `BootNext`: the next reboot arms it.

use std::sync::{Arc, Mutex, MutexGuard};

use sequencer::{Sequence, Task};
use tokio::io::AsyncRead;
use upgrade::bundle::Manifest;
use upgrade::meta::SlotState;
use upgrade::Slot;

use crate::runtime::Runtime;
use crate::slots;
use crate::tasks::upgrade as t;

/// Where the bundle comes from.
pub type Source = Box<dyn AsyncRead + Send + Unpin>;

/// One upgrade in progress.
pub struct UpgradeJob {
    /// The node.
    pub rt: Arc<Runtime>,
    /// Stop before arming the trial.
    pub stage: bool,
    /// The slot being written.
    pub target: Slot,
    pub(crate) source: tokio::sync::Mutex<Source>,
    state: Mutex<JobState>,
}

#[derive(Default)]
pub(crate) struct JobState {
    pub(crate) manifest: Option<Manifest>,
    pub(crate) uki: Option<Vec<u8>>,
}

impl UpgradeJob {
    /// A job writing the slot that is not running.
    pub fn new(rt: Arc<Runtime>, stage: bool, source: Source) -> Result<Arc<UpgradeJob>, String> {
        let booted = rt.boot().ok_or("the boot disk is not known yet")?.slot;
        Ok(Arc::new(UpgradeJob {
            rt,
            stage,
            target: booted.other(),
            source: tokio::sync::Mutex::new(source),
            state: Mutex::new(JobState::default()),
        }))
    }

    /// A job writing `target` (the installer writes slot A of a new disk).
    pub fn for_slot(rt: Arc<Runtime>, target: Slot, source: Source) -> Arc<UpgradeJob> {
        Arc::new(UpgradeJob {
            rt,
            stage: true,
            target,
            source: tokio::sync::Mutex::new(source),
            state: Mutex::new(JobState::default()),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bundle's manifest, once read.
    pub fn manifest(&self) -> Option<Manifest> {
        self.state().manifest.clone()
    }
}

/// Why an upgrade or rollback may not start now (answered before anything runs).
pub fn admit_upgrade(rt: &Runtime) -> Result<(), String> {
    let booted = rt.boot().ok_or("the node has not finished booting")?.slot;
    let cfg = rt.config().ok_or("the node has no config")?;
    if cfg.machine.upgrade.trusted_keys.is_empty() {
        return Err(
            "the node trusts no signing key (machine.upgrade.trusted_keys is empty)".into(),
        );
    }
    let meta = slots::read_meta(rt)
        .map_err(|e| e.to_string())?
        .map(|l| l.meta);
    if let Some(m) = meta {
        let me = m.slot(booted);
        if m.committed != booted || me.state != SlotState::Good {
            return Err(format!(
                "the running slot {booted} is not committed yet ({}): wait until its trial commits or fails",
                me.state.as_str()
            ));
        }
    }
    Ok(())
}

/// Why a rollback may not start now.
pub fn admit_rollback(rt: &Runtime) -> Result<Slot, String> {
    let booted = rt.boot().ok_or("the node has not finished booting")?.slot;
    let other = booted.other();
    let m = slots::read_meta(rt)
        .map_err(|e| e.to_string())?
        .map(|l| l.meta)
        .ok_or("META holds no slot record yet")?;
    let state = m.slot(other).state;
    if state != SlotState::Good {
        return Err(format!(
            "slot {other} is {}: rollback needs a good slot",
            state.as_str()
        ));
    }
    Ok(other)
}

/// The upgrade phase table.
pub fn upgrade() -> Sequence<Arc<UpgradeJob>> {
    Sequence::new("upgrade")
        .phase("readBundle", [Task::new("readBundle", t::read_bundle)])
        .phase("receiveUki", [Task::new("receiveUki", t::receive_uki)])
        .phase("writeSlot", [Task::new("writeSlot", t::write_slot)])
        .phase("verifySlot", [Task::new("verifySlot", t::verify_slot)])
        .phase("installUki", [Task::new("installUki", t::install_uki)])
        .phase("markPending", [Task::new("markPending", t::mark_pending)])
        .phase_when(
            "armTrial",
            |j: &Arc<UpgradeJob>| !j.stage,
            [Task::new("armTrial", t::arm_trial)],
        )
}

/// The rollback phase table (the reboot follows it).
pub fn rollback() -> Sequence<Arc<Runtime>> {
    Sequence::new("rollback").phase("switchSlot", [Task::new("switchSlot", t::switch_slot)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_upgrade_phases_are_in_order() {
        assert_eq!(
            super::upgrade().phase_names(),
            [
                "readBundle",
                "receiveUki",
                "writeSlot",
                "verifySlot",
                "installUki",
                "markPending",
                "armTrial"
            ]
        );
        assert_eq!(super::rollback().phase_names(), ["switchSlot"]);
    }
}
