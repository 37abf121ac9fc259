//! The sequence lock: at most one lifecycle sequence runs; a new one starts only through the
//! lifecycle machine, which either refuses it at once or lets it take over the running one.
//!
//! A takeover cancels the running sequence (at its next phase boundary, or at once when forced)
//! and the new sequence starts only after the old one has stopped, so two sequences never run
//! together.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event::EventBus;
use crate::lifecycle::{Denied, Lifecycle, NodeState, Outcome, Request, SequenceKind, Stage};
use crate::runner::{run_with, Cancel, SequenceError};
use crate::sequence::Sequence;

struct Active {
    kind: SequenceKind,
    actor: String,
    cancel: Cancel,
    done: watch::Receiver<bool>,
}

/// A started sequence.
pub struct Started {
    /// The request's actor id: every event of the sequence carries it.
    pub actor: String,
    /// The sequence that was taken over, if one was.
    pub preempted: Option<SequenceKind>,
    /// Resolves when the sequence ends.
    pub handle: JoinHandle<Result<(), SequenceError>>,
}

/// The node's lifecycle machine and the sequence lock.
pub struct Controller {
    /// The machine (its state is the API's node state).
    pub lifecycle: Lifecycle,
    bus: Arc<EventBus>,
    active: Mutex<Option<Active>>,
}

impl Controller {
    /// A controller in `Booting`.
    pub fn new(bus: Arc<EventBus>) -> Arc<Self> {
        Arc::new(Controller {
            lifecycle: Lifecycle::new(bus.clone()),
            bus,
            active: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node state.
    pub fn state(&self) -> NodeState {
        self.lifecycle.state()
    }

    /// The running sequence and its actor id.
    pub fn running(&self) -> Option<(SequenceKind, String)> {
        self.lock()
            .as_ref()
            .filter(|a| !*a.done.borrow())
            .map(|a| (a.kind, a.actor.clone()))
    }

    /// A new actor id: a UUIDv7 from the clock, this process and a counter. Not from the
    /// kernel's random pool: early in boot `getrandom` blocks until the CRNG is seeded, and an
    /// id only needs to be unique, not secret.
    pub fn new_actor() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tail = [0u8; 10];
        tail[..4].copy_from_slice(&n.to_be_bytes());
        tail[4..8].copy_from_slice(&std::process::id().to_be_bytes());
        tail[8..].copy_from_slice(&(crate::clock::boot_us() as u16).to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(crate::clock::unix_ms(), &tail)
            .into_uuid()
            .to_string()
    }

    /// Starts `sequence` as `kind` if the lifecycle machine admits it; refuses at once
    /// otherwise. With `force`, a takeover aborts the running sequence mid-phase.
    pub fn start<C: Clone + Send + 'static>(
        self: &Arc<Self>,
        kind: SequenceKind,
        sequence: Sequence<C>,
        ctx: C,
        actor: Option<String>,
        force: bool,
    ) -> Result<Started, Denied> {
        let actor = actor.unwrap_or_else(Self::new_actor);
        let mut active = self.lock();
        let stage = active
            .as_ref()
            .filter(|a| !*a.done.borrow())
            .map_or(Stage::Critical, |a| a.cancel.stage());
        let moved = self
            .lifecycle
            .request_at(Request::Start(kind), stage, Some(&actor))?;
        let previous = active.take();
        if let (Some(p), Some(_)) = (&previous, moved.preempted) {
            if force {
                p.cancel.abort(kind.as_str());
            } else {
                p.cancel.cancel(kind.as_str());
            }
        }
        let cancel = Cancel::new();
        let (done_tx, done_rx) = watch::channel(false);
        *active = Some(Active {
            kind,
            actor: actor.clone(),
            cancel: cancel.clone(),
            done: done_rx,
        });
        drop(active);

        let this = self.clone();
        let task_actor = actor.clone();
        let handle = tokio::spawn(async move {
            // Never two sequences at once: wait for the one before to stop.
            if let Some(mut p) = previous.map(|p| p.done) {
                while !*p.borrow_and_update() {
                    if p.changed().await.is_err() {
                        break;
                    }
                }
            }
            let result = run_with(&sequence, ctx, &this.bus, Some(&task_actor), &cancel).await;
            let outcome = match &result {
                Ok(()) => Outcome::Succeeded,
                Err(e) if e.is_cancelled() => Outcome::Cancelled,
                Err(_) => Outcome::Failed,
            };
            {
                let active = this.lock();
                // A sequence that was taken over does not report: the machine has moved on.
                if active.as_ref().is_some_and(|a| a.actor == task_actor) {
                    let _ = this
                        .lifecycle
                        .request(Request::Finished(kind, outcome), Some(&task_actor));
                }
            }
            let _ = done_tx.send(true);
            result
        });
        Ok(Started {
            actor,
            preempted: moved.preempted,
            handle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::sequence::Task;
    use std::time::Duration;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    fn slow(name: &'static str, phases: usize) -> Sequence<()> {
        let mut s = Sequence::new(name);
        for _ in 0..phases {
            s = s.phase(
                "wait",
                [Task::new("wait", |_: ()| async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<(), Never>(())
                })],
            );
        }
        s
    }

    #[test]
    fn actor_ids_are_unique() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| Controller::new_actor()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[tokio::test]
    async fn a_reboot_during_boot_cancels_the_boot_and_runs_after_it() {
        let bus = EventBus::new(1024);
        let c = Controller::new(bus.clone());
        let boot = c
            .start(SequenceKind::Boot, slow("boot", 20), (), None, false)
            .expect("boot");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let reboot = c
            .start(SequenceKind::Reboot, slow("reboot", 1), (), None, false)
            .expect("reboot wins");
        assert_eq!(reboot.preempted, Some(SequenceKind::Boot));
        let boot_result = boot.handle.await.expect("join");
        assert!(boot_result.is_err_and(|e| e.is_cancelled()));
        reboot.handle.await.expect("join").expect("reboot runs");
        assert_eq!(c.state(), NodeState::Rebooting);
        // The reboot's first event comes after the boot's last.
        let events = bus.snapshot();
        let boot_end = events.iter().position(
            |e| matches!(&e.kind, EventKind::SequenceStop { sequence, .. } if sequence == "boot"),
        );
        let reboot_start = events.iter().position(
            |e| matches!(&e.kind, EventKind::SequenceStart { sequence } if sequence == "reboot"),
        );
        assert!(boot_end < reboot_start, "{boot_end:?} {reboot_start:?}");
    }

    #[tokio::test]
    async fn an_upgrade_is_refused_at_once_while_a_reset_runs_and_the_refusal_names_the_actor() {
        let bus = EventBus::new(1024);
        let c = Controller::new(bus.clone());
        c.lifecycle
            .request(
                Request::Finished(SequenceKind::Boot, Outcome::Succeeded),
                None,
            )
            .expect("running");
        let reset = c
            .start(SequenceKind::Reset, slow("reset", 4), (), None, false)
            .expect("reset");
        let err = c
            .start(
                SequenceKind::Upgrade,
                slow("upgrade", 1),
                (),
                Some("op-42".into()),
                false,
            )
            .err()
            .expect("refused");
        assert_eq!(
            err,
            Denied::Busy {
                running: SequenceKind::Reset,
                requested: SequenceKind::Upgrade
            }
        );
        let denied = bus
            .snapshot()
            .into_iter()
            .rev()
            .find(|e| matches!(e.kind, EventKind::RequestDenied { .. }));
        assert_eq!(denied.and_then(|e| e.actor).as_deref(), Some("op-42"));
        reset.handle.await.expect("join").expect("reset unaffected");
    }

    #[tokio::test]
    async fn a_finished_sequence_returns_the_node_to_running_and_frees_the_lock() {
        let c = Controller::new(EventBus::new(1024));
        c.lifecycle
            .request(
                Request::Finished(SequenceKind::Boot, Outcome::Succeeded),
                None,
            )
            .expect("running");
        let up = c
            .start(SequenceKind::Upgrade, slow("upgrade", 1), (), None, false)
            .expect("upgrade");
        assert_eq!(c.running().map(|r| r.0), Some(SequenceKind::Upgrade));
        up.handle.await.expect("join").expect("ok");
        assert_eq!(c.state(), NodeState::Running);
        assert_eq!(c.running(), None);
        assert!(c
            .start(SequenceKind::Rollback, slow("rollback", 1), (), None, false)
            .is_ok());
    }

    #[tokio::test]
    async fn a_shutdown_during_an_upgrade_waits_for_the_phase_in_progress() {
        let c = Controller::new(EventBus::new(1024));
        c.lifecycle
            .request(
                Request::Finished(SequenceKind::Boot, Outcome::Succeeded),
                None,
            )
            .expect("running");
        let up = c
            .start(SequenceKind::Upgrade, slow("upgrade", 3), (), None, false)
            .expect("upgrade");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sd = c
            .start(SequenceKind::Shutdown, slow("shutdown", 1), (), None, false)
            .expect("shutdown wins");
        let err = up.handle.await.expect("join").expect_err("cancelled");
        // Stopped at the boundary after the first phase, not inside it.
        assert!(matches!(&err, SequenceError::Cancelled { .. }), "{err}");
        sd.handle.await.expect("join").expect("shutdown runs");
        assert_eq!(c.state(), NodeState::ShuttingDown);
    }
}
