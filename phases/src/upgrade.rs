//! The upgrade and rollback sequences.
//!
//! An upgrade writes the slot that is not running, from a signed bundle streamed in (no copy of
//! the image is kept anywhere), verifies it, installs its UKI, marks it pending, and points
//! `BootNext` at it; the reboot that follows is its trial. A staged upgrade stops before
//! `BootNext`: the next reboot arms it.
//!
//! While it receives the bundle and writes or verifies the slot (marked `writing`, which nothing
//! boots), a reboot or a reset may take it over: a stalled download must not hold the node.
//! The source itself has an idle timeout and a deadline ([`Deadlines`]), so an upgrade that
//! stops receiving fails by itself and says why.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use sequencer::{Sequence, Task, TaskError};
use tokio::io::{AsyncRead, ReadBuf};
use upgrade::bundle::{BundleError, Manifest};
use upgrade::meta::SlotState;
use upgrade::policy::PolicyError;
use upgrade::Slot;

use crate::platform::PlatformError;
use crate::runtime::Runtime;
use crate::slots;
use crate::tasks::upgrade as t;

/// Where the bundle comes from.
pub type Source = Box<dyn AsyncRead + Send + Unpin>;

/// Why an upgrade or a rollback may not start (answered before anything runs).
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The boot has not got far enough.
    #[error("the node has not finished booting")]
    NotBooted,
    /// No config.
    #[error("the node has no config")]
    NoConfig,
    /// Nobody's bundles would be accepted.
    #[error("the node trusts no signing key (machine.upgrade.trusted_keys is empty)")]
    NoTrustedKeys,
    /// The running slot is still on trial.
    #[error("the running slot {slot} is not committed yet ({state}): wait until its trial commits or fails")]
    NotCommitted {
        /// The running slot.
        slot: Slot,
        /// Its state.
        state: &'static str,
    },
    /// Rollback needs a good slot to go to.
    #[error("slot {slot} is {state}: rollback needs a good slot")]
    NoGoodSlot {
        /// The other slot.
        slot: Slot,
        /// Its state.
        state: &'static str,
    },
    /// No slot record yet.
    #[error("META holds no slot record yet")]
    NoMeta,
    /// Rolling back would run a slot below the security floor.
    #[error("slot {slot} has security version {security_version}, below this node's floor {floor}: rollback would run a release the node has left behind for a security fix")]
    BelowFloor {
        /// The other slot.
        slot: Slot,
        /// Its security version.
        security_version: u64,
        /// The floor.
        floor: u64,
    },
    /// META could not be read.
    #[error("reading META: {0}")]
    Meta(TaskError),
    /// The bundle source cannot be used.
    #[error("{0}")]
    Source(String),
}

/// Why an upgrade failed: every task of the upgrade sequence fails with one of these, so the
/// API can say exactly what went wrong (and with which gRPC code).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The bundle is not one this node takes (signature, manifest, sizes, digests).
    #[error(transparent)]
    Bundle(BundleError),
    /// A UKI in the bundle does not fit its slot or its root.
    #[error("{0}")]
    Uki(String),
    /// The bundle is below the floor, expired, a downgrade, or not the one pinned.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The bundle goes on after its last component.
    #[error("the bundle has bytes after its last component (its signed manifest says it ends after {0} bytes)")]
    Trailing(u64),
    /// The source sent nothing for too long, or not all of it in time.
    #[error("{0}")]
    Stalled(String),
    /// The source failed (an upload broke off, a server refused).
    #[error("{0}")]
    Source(String),
    /// The bundle's OS provides another extension level, and neither the node's store nor the
    /// bundle has a version of an active extension for it.
    #[error("the bundle's OS provides extension level {level}, and no version of {} for it is in this node's store or in the bundle: the new slot would run without it. Add one to the bundle (plinth image bundle --extension FILE)", .orphans.join(", "))]
    Orphans {
        /// The bundle's extension level.
        level: u32,
        /// The active extensions left without a version (name, version, level).
        orphans: Vec<String>,
    },
    /// The ESP cannot hold the extensions the bundle brings.
    #[error("the bundle brings {need} bytes of extensions and the ESP has room for {room}")]
    EspFull {
        /// Bytes the bundle's extensions take.
        need: u64,
        /// Bytes free on the ESP (less what is kept free), with what the slot's earlier
        /// extensions take.
        room: u64,
    },
    /// The slot did not keep what was written.
    #[error("slot {slot} does not read back as written: {reason}")]
    Verify {
        /// The slot.
        slot: Slot,
        /// What differs.
        reason: String,
    },
    /// The node's own work failed (disk I/O, META, boot entries).
    #[error(transparent)]
    Node(TaskError),
}

impl From<BundleError> for UpgradeError {
    fn from(e: BundleError) -> Self {
        match e {
            BundleError::Io(io) => UpgradeError::from_source(io),
            other => UpgradeError::Bundle(other),
        }
    }
}

impl From<PlatformError> for UpgradeError {
    fn from(e: PlatformError) -> Self {
        UpgradeError::Node(Box::new(e))
    }
}

impl From<slots::SlotError> for UpgradeError {
    fn from(e: slots::SlotError) -> Self {
        UpgradeError::Node(Box::new(e))
    }
}

impl UpgradeError {
    /// A read of the bundle source failed.
    pub fn from_source(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            UpgradeError::Stalled(e.to_string())
        } else {
            UpgradeError::Source(e.to_string())
        }
    }
}

/// What the caller asked of an upgrade.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Stop before arming the trial.
    pub stage: bool,
    /// The bundle digest the caller expects (empty: any signed bundle).
    pub expected_digest: String,
    /// Accept a lower version at the same security version.
    pub allow_downgrade: bool,
}

/// One upgrade in progress.
pub struct UpgradeJob {
    /// The node.
    pub rt: Arc<Runtime>,
    /// What the caller asked.
    pub options: Options,
    /// The slot being written.
    pub target: Slot,
    /// The source ends where the bundle does (an upload, a download); not so the installer's
    /// INSTALL partition, whose unused space follows the bundle.
    pub(crate) source_is_bundle: bool,
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
    pub fn new(
        rt: Arc<Runtime>,
        options: Options,
        source: Source,
    ) -> Result<Arc<UpgradeJob>, AdmitError> {
        let booted = rt.boot().ok_or(AdmitError::NotBooted)?.slot;
        Ok(Arc::new(UpgradeJob {
            rt,
            options,
            target: booted.other(),
            source_is_bundle: true,
            source: tokio::sync::Mutex::new(source),
            state: Mutex::new(JobState::default()),
        }))
    }

    /// A job writing `target` (the installer writes slot A of a new disk).
    pub fn for_slot(rt: Arc<Runtime>, target: Slot, source: Source) -> Arc<UpgradeJob> {
        Arc::new(UpgradeJob {
            rt,
            options: Options {
                stage: true,
                ..Options::default()
            },
            target,
            source_is_bundle: false,
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

/// Why an upgrade may not start now.
pub fn admit_upgrade(rt: &Runtime) -> Result<(), AdmitError> {
    let booted = rt.boot().ok_or(AdmitError::NotBooted)?.slot;
    let cfg = rt.config().ok_or(AdmitError::NoConfig)?;
    if cfg.machine.upgrade.trusted_keys.is_empty() {
        return Err(AdmitError::NoTrustedKeys);
    }
    let meta = slots::read_meta(rt)
        .map_err(AdmitError::Meta)?
        .map(|l| l.meta);
    if let Some(m) = meta {
        let me = m.slot(booted);
        if m.committed != booted || me.state != SlotState::Good {
            return Err(AdmitError::NotCommitted {
                slot: booted,
                state: me.state.as_str(),
            });
        }
    }
    Ok(())
}

/// Why a rollback may not start now; else the slot it goes to.
pub fn admit_rollback(rt: &Runtime) -> Result<Slot, AdmitError> {
    let booted = rt.boot().ok_or(AdmitError::NotBooted)?.slot;
    let other = booted.other();
    let m = slots::read_meta(rt)
        .map_err(AdmitError::Meta)?
        .map(|l| l.meta)
        .ok_or(AdmitError::NoMeta)?;
    let state = m.slot(other).state;
    if state != SlotState::Good {
        return Err(AdmitError::NoGoodSlot {
            slot: other,
            state: state.as_str(),
        });
    }
    let security_version = m.slot(other).security_version;
    if security_version < m.security_floor {
        return Err(AdmitError::BelowFloor {
            slot: other,
            security_version,
            floor: m.security_floor,
        });
    }
    Ok(other)
}

/// The upgrade phase table. Receiving, writing and verifying are interruptible (a reboot or a
/// reset may cut them); installing the UKI, marking the slot and arming the trial are not.
pub fn upgrade() -> Sequence<Arc<UpgradeJob>> {
    Sequence::new("upgrade")
        .interruptible_phase("readBundle", [Task::new("readBundle", t::read_bundle)])
        .interruptible_phase("receiveUki", [Task::new("receiveUki", t::receive_uki)])
        .interruptible_phase("writeSlot", [Task::new("writeSlot", t::write_slot)])
        .interruptible_phase(
            "receiveExtensions",
            [Task::new("receiveExtensions", t::receive_extensions)],
        )
        .interruptible_phase("verifySlot", [Task::new("verifySlot", t::verify_slot)])
        .phase("installUki", [Task::new("installUki", t::install_uki)])
        .phase("markPending", [Task::new("markPending", t::mark_pending)])
        .phase_when(
            "armTrial",
            |j: &Arc<UpgradeJob>| !j.options.stage,
            [Task::new("armTrial", t::arm_trial)],
        )
}

/// The rollback phase table (the reboot follows it).
pub fn rollback() -> Sequence<Arc<Runtime>> {
    Sequence::new("rollback").phase("switchSlot", [Task::new("switchSlot", t::switch_slot)])
}

/// A bundle source with an idle timeout and a deadline: a source that sends nothing for
/// `idle`, or has not sent everything within `total`, fails with `TimedOut`, naming itself.
pub struct Deadlines<R> {
    inner: R,
    what: String,
    idle: Duration,
    total: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    total_timer: Pin<Box<tokio::time::Sleep>>,
}

impl<R> Deadlines<R> {
    /// `inner`, called `what` in errors.
    pub fn new(inner: R, what: impl Into<String>, idle: Duration, total: Duration) -> Self {
        Deadlines {
            inner,
            what: what.into(),
            idle,
            total,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            total_timer: Box::pin(tokio::time::sleep(total)),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Deadlines<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(next);
                }
                return Poll::Ready(r);
            }
            Poll::Pending => {}
        }
        let timed_out =
            |msg: String| Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)));
        if this.total_timer.as_mut().poll(cx).is_ready() {
            return timed_out(format!(
                "{} did not deliver the whole bundle within {}s (machine.upgrade.receive_deadline_s)",
                this.what,
                this.total.as_secs()
            ));
        }
        if this.idle_timer.as_mut().poll(cx).is_ready() {
            return timed_out(format!(
                "{} sent nothing for {}s (machine.upgrade.idle_timeout_s)",
                this.what,
                this.idle.as_secs()
            ));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_upgrade_phases_are_in_order() {
        assert_eq!(
            super::upgrade().phase_names(),
            [
                "readBundle",
                "receiveUki",
                "writeSlot",
                "receiveExtensions",
                "verifySlot",
                "installUki",
                "markPending",
                "armTrial"
            ]
        );
        assert_eq!(super::rollback().phase_names(), ["switchSlot"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_goes_silent_fails_with_its_idle_timeout() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut src = Deadlines::new(
            rx,
            "the upload",
            Duration::from_secs(30),
            Duration::from_secs(600),
        );
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"abc")
            .await
            .expect("write");
        let mut buf = [0u8; 3];
        src.read_exact(&mut buf).await.expect("first bytes");
        let err = src.read(&mut buf).await.expect_err("silent");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            err.to_string().contains("the upload sent nothing for 30s"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_trickles_fails_at_its_deadline() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if tokio::io::AsyncWriteExt::write_all(&mut tx, b"x")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut src = Deadlines::new(
            rx,
            "http://x/b",
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let mut sink = Vec::new();
        let err = src.read_to_end(&mut sink).await.expect_err("deadline");
        assert!(err.to_string().contains("within 60s"), "{err}");
        assert!((28..=31).contains(&sink.len()), "{}", sink.len());
    }
}
