//! The node lifecycle: a `statig` hierarchical state machine that decides which sequence may
//! start, and which running sequence a new one may take over.
//!
//! ```text
//! maintenance ───────────── Start(boot|install|reboot|shutdown|reset) ──▶ …
//!             └─────────── Start(applyConfig) ──▶ configuring_first
//! operational ┬ booting ──── Finished(boot ok) ──▶ running
//!             ├ installing ─ Finished(install) ──▶ booting
//!             ├ running ──── Start(upgrade|rollback|applyConfig|reboot|shutdown|reset) ──▶ …
//!             ├ upgrading ── Finished(upgrade) ──▶ running
//!             ├ rolling_back Finished(rollback) ─▶ running
//!             ├ configuring  Finished(applyConfig) ─▶ running
//!             └ configuring_first Finished(applyConfig ok) ─▶ booting, otherwise ─▶ maintenance
//! terminating ┬ rebooting
//!             ├ resetting
//!             └ shutting_down (final)
//! ```
//!
//! Each state other than `maintenance` and `running` has a sequence running. A request to start
//! another one is checked against the takeover table ([`may_take_over`]): allowed means the
//! running sequence is cancelled (at its next phase boundary) and the new one starts after it;
//! refused means [`Denied::Busy`]. A request that makes no sense in the state (an upgrade in
//! maintenance mode) is [`Denied::NotAllowed`]. Both are published as events with the request's
//! actor id.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use statig::prelude::IntoStateMachineExt as _;

use crate::event::{EventBus, EventKind};

/// The lifecycle sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SequenceKind {
    /// First steps of a boot (before the config is known).
    Initialize,
    /// Installing onto a blank disk from media.
    Install,
    /// Booting into the running state.
    Boot,
    /// Writing and trying the other slot.
    Upgrade,
    /// Going back to the other (good) slot.
    Rollback,
    /// Wiping.
    Reset,
    /// Validating, writing and applying a node config.
    ApplyConfig,
    /// Orderly restart.
    Reboot,
    /// Orderly power-off.
    Shutdown,
}

impl SequenceKind {
    /// Every kind.
    pub const ALL: [SequenceKind; 9] = [
        SequenceKind::Initialize,
        SequenceKind::Install,
        SequenceKind::Boot,
        SequenceKind::Upgrade,
        SequenceKind::Rollback,
        SequenceKind::Reset,
        SequenceKind::ApplyConfig,
        SequenceKind::Reboot,
        SequenceKind::Shutdown,
    ];

    /// Stable name (the sequence's name in events).
    pub fn as_str(self) -> &'static str {
        match self {
            SequenceKind::Initialize => "initialize",
            SequenceKind::Install => "install",
            SequenceKind::Boot => "boot",
            SequenceKind::Upgrade => "upgrade",
            SequenceKind::Rollback => "rollback",
            SequenceKind::Reset => "reset",
            SequenceKind::ApplyConfig => "applyConfig",
            SequenceKind::Reboot => "reboot",
            SequenceKind::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for SequenceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the running sequence is, as far as a takeover is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// In a phase declared interruptible: it changes nothing that stopping half-way could
    /// leave unbootable (an upgrade receiving its bundle, or writing the slot it has marked
    /// `writing`, which nothing boots).
    Interruptible,
    /// Anywhere else.
    Critical,
}

/// The takeover table: may `new` cancel `running`, which is at `stage`?
///
/// | running ↓ / new → | reboot | shutdown | reset | anything else |
/// |---|---|---|---|---|
/// | initialize, boot | yes | yes | yes | no |
/// | upgrade in an interruptible phase (receiving, writing, verifying) | yes | yes | yes | no |
/// | install, upgrade (otherwise), rollback, reset, reboot, applyConfig | no | yes | no | no |
/// | shutdown | no | no | no | no |
///
/// Shutdown always wins except over itself. A reboot or reset may stop an upgrade only while
/// it receives or writes the inactive slot (a stalled download must not hold the node), never
/// while it installs the UKI, marks the slot or arms its trial. A non-forced shutdown still
/// lets a critical phase finish, because cancellation only happens at phase boundaries (or
/// inside an interruptible phase).
pub fn may_take_over(running: SequenceKind, stage: Stage, new: SequenceKind) -> bool {
    use SequenceKind::*;
    match (running, new) {
        (Shutdown, _) => false,
        (_, Shutdown) => true,
        (Initialize | Boot, Reboot | Reset) => true,
        (Upgrade, Reboot | Reset) => stage == Stage::Interruptible,
        (
            Initialize | Boot | Install | Upgrade | Rollback | Reset | ApplyConfig | Reboot,
            Initialize | Boot | Install | Upgrade | Rollback | Reset | ApplyConfig | Reboot,
        ) => false,
    }
}

/// The node's lifecycle state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// No config: only the maintenance API is served.
    Maintenance,
    /// Initialize and boot run.
    Booting,
    /// Install runs.
    Installing,
    /// Booted and idle.
    Running,
    /// Upgrade runs.
    Upgrading,
    /// Rollback runs.
    RollingBack,
    /// ApplyConfig runs.
    Configuring,
    /// Reboot runs.
    Rebooting,
    /// Reset runs.
    Resetting,
    /// Shutdown runs.
    ShuttingDown,
}

impl NodeState {
    /// Every state.
    pub const ALL: [NodeState; 10] = [
        NodeState::Maintenance,
        NodeState::Booting,
        NodeState::Installing,
        NodeState::Running,
        NodeState::Upgrading,
        NodeState::RollingBack,
        NodeState::Configuring,
        NodeState::Rebooting,
        NodeState::Resetting,
        NodeState::ShuttingDown,
    ];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Maintenance => "maintenance",
            NodeState::Booting => "booting",
            NodeState::Installing => "installing",
            NodeState::Running => "running",
            NodeState::Upgrading => "upgrading",
            NodeState::RollingBack => "rolling_back",
            NodeState::Configuring => "configuring",
            NodeState::Rebooting => "rebooting",
            NodeState::Resetting => "resetting",
            NodeState::ShuttingDown => "shutting_down",
        }
    }

    /// The superstate the state belongs to.
    pub fn superstate(self) -> &'static str {
        match self {
            NodeState::Maintenance => "maintenance",
            NodeState::Booting
            | NodeState::Installing
            | NodeState::Running
            | NodeState::Upgrading
            | NodeState::RollingBack
            | NodeState::Configuring => "operational",
            NodeState::Rebooting | NodeState::Resetting | NodeState::ShuttingDown => "terminating",
        }
    }

    /// The sequence that runs in this state, if one does.
    pub fn running(self) -> Option<SequenceKind> {
        match self {
            NodeState::Maintenance | NodeState::Running => None,
            NodeState::Booting => Some(SequenceKind::Boot),
            NodeState::Installing => Some(SequenceKind::Install),
            NodeState::Upgrading => Some(SequenceKind::Upgrade),
            NodeState::RollingBack => Some(SequenceKind::Rollback),
            NodeState::Configuring => Some(SequenceKind::ApplyConfig),
            NodeState::Rebooting => Some(SequenceKind::Reboot),
            NodeState::Resetting => Some(SequenceKind::Reset),
            NodeState::ShuttingDown => Some(SequenceKind::Shutdown),
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every phase passed.
    Succeeded,
    /// A task failed.
    Failed,
    /// It was cancelled.
    Cancelled,
}

/// Something asked of the lifecycle machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Start a sequence.
    Start(SequenceKind),
    /// A sequence ended.
    Finished(SequenceKind, Outcome),
    /// The boot found no config: serve the maintenance API and wait for one.
    EnterMaintenance,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Start(k) => write!(f, "{k}"),
            Request::Finished(k, o) => write!(f, "{k} finished ({o:?})"),
            Request::EnterMaintenance => f.write_str("enter maintenance"),
        }
    }
}

/// Why the machine refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Another sequence runs and the request may not take it over.
    #[error("{running} is running; {requested} may not interrupt it")]
    Busy {
        /// The running sequence.
        running: SequenceKind,
        /// The requested one.
        requested: SequenceKind,
    },
    /// The request makes no sense in this state.
    #[error("{request} is not allowed while the node is {state}")]
    NotAllowed {
        /// The request.
        request: String,
        /// The state it was refused in.
        state: NodeState,
    },
}

/// A move the machine made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// State before.
    pub from: NodeState,
    /// State after.
    pub to: NodeState,
    /// The sequence that was taken over, if one was.
    pub preempted: Option<SequenceKind>,
}

/// The statig chart itself. statig generates public `State`/`Superstate` enums; they stay
/// private to this module.
mod chart {
    #![allow(missing_docs)]
    use super::{may_take_over, Denied, NodeState, Outcome as Ended, Request, SequenceKind, Stage};
    use statig::prelude::*;

    #[derive(Default)]
    pub(super) struct Machine;

    /// What a dispatch decided, written by the handlers; `stage` is its input (where the
    /// running sequence is).
    pub(super) struct Verdict {
        pub(super) stage: Stage,
        pub(super) denied: Option<Denied>,
        pub(super) preempted: Option<SequenceKind>,
    }

    /// The state a started sequence puts the node in.
    fn state_for(kind: SequenceKind) -> State {
        match kind {
            SequenceKind::Initialize | SequenceKind::Boot => State::booting(),
            SequenceKind::Install => State::installing(),
            SequenceKind::Upgrade => State::upgrading(),
            SequenceKind::Rollback => State::rolling_back(),
            SequenceKind::ApplyConfig => State::configuring(),
            SequenceKind::Reboot => State::rebooting(),
            SequenceKind::Reset => State::resetting(),
            SequenceKind::Shutdown => State::shutting_down(),
        }
    }

    fn not_allowed(v: &mut Verdict, request: &Request, state: NodeState) -> Outcome<State> {
        v.denied = Some(Denied::NotAllowed {
            request: request.to_string(),
            state,
        });
        Handled
    }

    /// A start while `running` runs: take it over or refuse.
    fn take_over(v: &mut Verdict, running: SequenceKind, new: SequenceKind) -> Outcome<State> {
        if may_take_over(running, v.stage, new) {
            v.preempted = Some(running);
            Transition(state_for(new))
        } else {
            v.denied = Some(Denied::Busy {
                running,
                requested: new,
            });
            Handled
        }
    }

    #[state_machine(initial = "State::booting()", state(derive(Debug, Clone)))]
    impl Machine {
        #[state]
        fn maintenance(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Start(
                    k @ (SequenceKind::Boot
                    | SequenceKind::Initialize
                    | SequenceKind::Install
                    | SequenceKind::Reboot
                    | SequenceKind::Shutdown
                    | SequenceKind::Reset),
                ) => Transition(state_for(*k)),
                Request::Start(SequenceKind::ApplyConfig) => Transition(State::configuring_first()),
                Request::Start(SequenceKind::Upgrade | SequenceKind::Rollback)
                | Request::Finished(..)
                | Request::EnterMaintenance => not_allowed(context, event, NodeState::Maintenance),
            }
        }

        #[state(superstate = "operational")]
        fn booting(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::Boot, Ended::Succeeded) => {
                    Transition(State::running())
                }
                // Initialize passing leaves the node booting; failures are handled by the caller
                // (it asks for a reboot).
                Request::Finished(SequenceKind::Initialize | SequenceKind::Boot, _) => Handled,
                Request::EnterMaintenance => Transition(State::maintenance()),
                Request::Start(SequenceKind::Install) => Transition(State::installing()),
                // machined's own boot chain (initialize → boot) runs in this state.
                Request::Start(SequenceKind::Initialize | SequenceKind::Boot) => Handled,
                Request::Start(k) => take_over(context, SequenceKind::Boot, *k),
                _ => Super,
            }
        }

        #[state(superstate = "operational")]
        fn installing(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::Install, _) => Transition(State::booting()),
                Request::Start(k) => take_over(context, SequenceKind::Install, *k),
                _ => Super,
            }
        }

        #[state(superstate = "operational")]
        fn running(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Start(
                    k @ (SequenceKind::Upgrade
                    | SequenceKind::Rollback
                    | SequenceKind::Reboot
                    | SequenceKind::Shutdown
                    | SequenceKind::Reset
                    | SequenceKind::ApplyConfig),
                ) => Transition(state_for(*k)),
                Request::Start(
                    SequenceKind::Initialize | SequenceKind::Boot | SequenceKind::Install,
                )
                | Request::Finished(..)
                | Request::EnterMaintenance => not_allowed(context, event, NodeState::Running),
            }
        }

        /// A config being applied on a running node.
        #[state(superstate = "operational")]
        fn configuring(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::ApplyConfig, _) => Transition(State::running()),
                Request::Start(k) => take_over(context, SequenceKind::ApplyConfig, *k),
                _ => Super,
            }
        }

        /// The first config, applied in maintenance mode: the node boots with it, or waits
        /// for another.
        #[state(superstate = "operational")]
        fn configuring_first(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::ApplyConfig, Ended::Succeeded) => {
                    Transition(State::booting())
                }
                Request::Finished(SequenceKind::ApplyConfig, _) => Transition(State::maintenance()),
                Request::Start(k) => take_over(context, SequenceKind::ApplyConfig, *k),
                _ => Super,
            }
        }

        #[state(superstate = "operational")]
        fn upgrading(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::Upgrade, _) => Transition(State::running()),
                Request::Start(k) => take_over(context, SequenceKind::Upgrade, *k),
                _ => Super,
            }
        }

        #[state(superstate = "operational")]
        fn rolling_back(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(SequenceKind::Rollback, _) => Transition(State::running()),
                Request::Start(k) => take_over(context, SequenceKind::Rollback, *k),
                _ => Super,
            }
        }

        /// What the operational states did not handle is refused.
        #[superstate]
        fn operational(context: &mut Verdict, event: &Request) -> Outcome<State> {
            context.denied.get_or_insert(Denied::NotAllowed {
                request: event.to_string(),
                state: NodeState::Running,
            });
            Handled
        }

        #[state(superstate = "terminating")]
        fn rebooting(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Start(k) => take_over(context, SequenceKind::Reboot, *k),
                _ => Super,
            }
        }

        #[state(superstate = "terminating")]
        fn resetting(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Start(k) => take_over(context, SequenceKind::Reset, *k),
                _ => Super,
            }
        }

        #[state(superstate = "terminating")]
        fn shutting_down(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Start(k) => take_over(context, SequenceKind::Shutdown, *k),
                _ => Super,
            }
        }

        /// A terminating sequence ends in a power action, whatever its outcome: the node stays
        /// where it is until then. Nothing else is accepted.
        #[superstate]
        fn terminating(context: &mut Verdict, event: &Request) -> Outcome<State> {
            match event {
                Request::Finished(..) => Handled,
                _ => not_allowed(context, event, NodeState::ShuttingDown),
            }
        }
    }

    pub(super) fn node_state(state: &State) -> NodeState {
        match state {
            State::Maintenance {} => NodeState::Maintenance,
            State::Booting {} => NodeState::Booting,
            State::Installing {} => NodeState::Installing,
            State::Running {} => NodeState::Running,
            State::Upgrading {} => NodeState::Upgrading,
            State::RollingBack {} => NodeState::RollingBack,
            State::Configuring {} | State::ConfiguringFirst {} => NodeState::Configuring,
            State::Rebooting {} => NodeState::Rebooting,
            State::Resetting {} => NodeState::Resetting,
            State::ShuttingDown {} => NodeState::ShuttingDown,
        }
    }
}

use chart::{node_state, Machine, Verdict};

/// The lifecycle machine shared by machined's tasks and the API.
pub struct Lifecycle {
    machine: Mutex<statig::blocking::StateMachine<Machine>>,
    bus: Arc<EventBus>,
}

impl Lifecycle {
    /// A machine in `Booting`, publishing transitions and refusals on `bus`.
    pub fn new(bus: Arc<EventBus>) -> Self {
        Lifecycle {
            machine: Mutex::new(Machine.state_machine()),
            bus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, statig::blocking::StateMachine<Machine>> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> NodeState {
        node_state(self.lock().state())
    }

    /// Asks the machine to move. Refusals and transitions are published with `actor`.
    pub fn request(&self, request: Request, actor: Option<&str>) -> Result<Moved, Denied> {
        self.request_at(request, Stage::Critical, actor)
    }

    /// Asks the machine to move while the running sequence is at `stage`.
    pub fn request_at(
        &self,
        request: Request,
        stage: Stage,
        actor: Option<&str>,
    ) -> Result<Moved, Denied> {
        let mut machine = self.lock();
        let from = node_state(machine.state());
        let mut verdict = Verdict {
            stage,
            denied: None,
            preempted: None,
        };
        machine.handle_with_context(&request, &mut verdict);
        let to = node_state(machine.state());
        // Published under the machine lock, so events are in the order things happened.
        if let Some(denied) = verdict.denied {
            let denied = match denied {
                // The superstate does not know which leaf it was called for.
                Denied::NotAllowed { request, .. } => Denied::NotAllowed {
                    request,
                    state: from,
                },
                other => other,
            };
            self.bus.publish(
                EventKind::RequestDenied {
                    request: request.to_string(),
                    reason: denied.to_string(),
                },
                actor,
            );
            return Err(denied);
        }
        if from != to {
            self.bus.publish(
                EventKind::StateChange {
                    from: from.as_str().into(),
                    to: to.as_str().into(),
                },
                actor,
            );
        }
        Ok(Moved {
            from,
            to,
            preempted: verdict.preempted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;
    use SequenceKind as K;

    /// Drives a fresh machine to `state`.
    fn machine_in(state: NodeState) -> Lifecycle {
        let m = Lifecycle::new(EventBus::new(256));
        let path: &[Request] = match state {
            Booting => &[],
            Maintenance => &[Request::EnterMaintenance],
            Installing => &[Request::Start(K::Install)],
            Running => &[Request::Finished(K::Boot, Outcome::Succeeded)],
            Upgrading => &[
                Request::Finished(K::Boot, Outcome::Succeeded),
                Request::Start(K::Upgrade),
            ],
            RollingBack => &[
                Request::Finished(K::Boot, Outcome::Succeeded),
                Request::Start(K::Rollback),
            ],
            Configuring => &[
                Request::Finished(K::Boot, Outcome::Succeeded),
                Request::Start(K::ApplyConfig),
            ],
            Rebooting => &[Request::Start(K::Reboot)],
            Resetting => &[Request::Start(K::Reset)],
            ShuttingDown => &[Request::Start(K::Shutdown)],
        };
        for r in path {
            m.request(*r, None).expect("path to state");
        }
        assert_eq!(m.state(), state);
        m
    }

    /// The kinds each state accepts, written out literally (not derived from the code under
    /// test): a start of any other kind is refused. Where an accepted start leads is
    /// [`target`].
    const ACCEPTS: &[(NodeState, &[SequenceKind])] = &[
        (
            Maintenance,
            &[
                K::Initialize,
                K::Boot,
                K::Install,
                K::Reset,
                K::ApplyConfig,
                K::Reboot,
                K::Shutdown,
            ],
        ),
        (
            Booting,
            &[
                K::Initialize,
                K::Boot,
                K::Install,
                K::Reset,
                K::Reboot,
                K::Shutdown,
            ],
        ),
        (Installing, &[K::Shutdown]),
        (
            Running,
            &[
                K::Upgrade,
                K::Rollback,
                K::Reset,
                K::ApplyConfig,
                K::Reboot,
                K::Shutdown,
            ],
        ),
        (Upgrading, &[K::Shutdown]),
        (RollingBack, &[K::Shutdown]),
        (Configuring, &[K::Shutdown]),
        (Rebooting, &[K::Shutdown]),
        (Resetting, &[K::Shutdown]),
        (ShuttingDown, &[]),
    ];

    /// The state an accepted start of `kind` puts the node in.
    fn target(kind: SequenceKind) -> NodeState {
        match kind {
            K::Initialize | K::Boot => Booting,
            K::Install => Installing,
            K::Upgrade => Upgrading,
            K::Rollback => RollingBack,
            K::ApplyConfig => Configuring,
            K::Reboot => Rebooting,
            K::Reset => Resetting,
            K::Shutdown => ShuttingDown,
        }
    }

    #[test]
    fn every_start_request_in_every_state_moves_or_is_refused_as_the_table_says() {
        assert_eq!(ACCEPTS.len(), NodeState::ALL.len());
        for &(state, accepted) in ACCEPTS {
            for kind in SequenceKind::ALL {
                let m = machine_in(state);
                let got = m.request(Request::Start(kind), None).ok().map(|mv| mv.to);
                let want = accepted.contains(&kind).then(|| target(kind));
                assert_eq!(got, want, "{state:?} + start {kind:?}");
                assert_eq!(
                    m.state(),
                    want.unwrap_or(state),
                    "{state:?} + start {kind:?} left the machine elsewhere"
                );
            }
        }
    }

    #[test]
    fn an_upgrade_receiving_or_writing_may_be_taken_over_by_a_reboot_or_a_reset_only() {
        for kind in SequenceKind::ALL {
            let m = machine_in(Upgrading);
            let got = m
                .request_at(Request::Start(kind), Stage::Interruptible, None)
                .ok()
                .map(|mv| (mv.to, mv.preempted));
            let want = matches!(kind, K::Reboot | K::Reset | K::Shutdown)
                .then(|| (target(kind), Some(K::Upgrade)));
            assert_eq!(got, want, "interruptible upgrade + start {kind:?}");
        }
    }

    #[test]
    fn the_takeover_table_reads_as_written() {
        use Stage::*;
        // (running, stage, new, may take over), every row literal.
        let rows: &[(SequenceKind, Stage, SequenceKind, bool)] = &[
            (K::Boot, Critical, K::Reboot, true),
            (K::Boot, Critical, K::Reset, true),
            (K::Boot, Critical, K::Upgrade, false),
            (K::Initialize, Critical, K::Reset, true),
            (K::Upgrade, Critical, K::Reboot, false),
            (K::Upgrade, Interruptible, K::Reboot, true),
            (K::Upgrade, Interruptible, K::Reset, true),
            (K::Upgrade, Interruptible, K::Upgrade, false),
            (K::Upgrade, Interruptible, K::ApplyConfig, false),
            (K::Upgrade, Critical, K::Shutdown, true),
            (K::Install, Interruptible, K::Reboot, false),
            (K::Reset, Critical, K::Reboot, false),
            (K::ApplyConfig, Critical, K::Reboot, false),
            (K::ApplyConfig, Critical, K::ApplyConfig, false),
            (K::ApplyConfig, Critical, K::Shutdown, true),
            (K::Reboot, Critical, K::Shutdown, true),
            (K::Shutdown, Critical, K::Shutdown, false),
            (K::Shutdown, Interruptible, K::Reboot, false),
        ];
        for &(running, stage, new, want) in rows {
            assert_eq!(
                may_take_over(running, stage, new),
                want,
                "{running:?} at {stage:?}, {new:?}"
            );
        }
    }

    #[test]
    fn the_first_config_leads_to_booting_or_back_to_maintenance() {
        for (outcome, after) in [
            (Outcome::Succeeded, Booting),
            (Outcome::Failed, Maintenance),
            (Outcome::Cancelled, Maintenance),
        ] {
            let m = machine_in(Maintenance);
            m.request(Request::Start(K::ApplyConfig), None)
                .expect("first config");
            assert_eq!(m.state(), Configuring);
            // A second config while the first is applied: another sequence in the way.
            let err = m
                .request(Request::Start(K::ApplyConfig), None)
                .expect_err("busy");
            assert!(matches!(err, Denied::Busy { .. }), "{err}");
            m.request(Request::Finished(K::ApplyConfig, outcome), None)
                .expect("finished");
            assert_eq!(m.state(), after, "{outcome:?}");
        }
    }

    #[test]
    fn forbidden_transitions_are_refused_with_the_right_reason() {
        // (state, request, refusal is Busy (true) or NotAllowed (false))
        let table: &[(NodeState, Request, bool)] = &[
            (Resetting, Request::Start(K::Upgrade), true),
            (Upgrading, Request::Start(K::Reboot), true),
            (Upgrading, Request::Start(K::ApplyConfig), true),
            (Resetting, Request::Start(K::ApplyConfig), true),
            (Upgrading, Request::Start(K::Rollback), true),
            (Installing, Request::Start(K::Reset), true),
            (ShuttingDown, Request::Start(K::Shutdown), true),
            (ShuttingDown, Request::Start(K::Reboot), true),
            (Rebooting, Request::Start(K::Reboot), true),
            (Maintenance, Request::Start(K::Upgrade), false),
            (Maintenance, Request::Start(K::Rollback), false),
            (Running, Request::Start(K::Boot), false),
            (
                Running,
                Request::Finished(K::Boot, Outcome::Succeeded),
                false,
            ),
            (Running, Request::EnterMaintenance, false),
        ];
        for &(state, request, busy) in table {
            let m = machine_in(state);
            let err = m.request(request, None).expect_err("must be refused");
            assert_eq!(
                matches!(err, Denied::Busy { .. }),
                busy,
                "{state:?} + {request}: {err}"
            );
            assert_eq!(m.state(), state);
        }
    }

    #[test]
    fn a_reboot_takes_over_a_boot_and_says_so() {
        let m = machine_in(Booting);
        let mv = m
            .request(Request::Start(K::Reboot), None)
            .expect("reboot wins");
        assert_eq!((mv.to, mv.preempted), (Rebooting, Some(K::Boot)));
    }

    #[test]
    fn shutdown_takes_over_everything_but_itself() {
        for state in NodeState::ALL {
            let m = machine_in(state);
            let r = m.request(Request::Start(K::Shutdown), None);
            assert_eq!(r.is_ok(), state != ShuttingDown, "{state:?}");
        }
    }

    #[test]
    fn sequences_finishing_return_the_node_to_where_it_waits() {
        let cases: &[(NodeState, SequenceKind, NodeState)] = &[
            (Booting, K::Boot, Running),
            (Upgrading, K::Upgrade, Running),
            (RollingBack, K::Rollback, Running),
            (Configuring, K::ApplyConfig, Running),
            (Installing, K::Install, Booting),
            (Rebooting, K::Reboot, Rebooting),
            (ShuttingDown, K::Shutdown, ShuttingDown),
        ];
        for &(state, kind, after) in cases {
            let m = machine_in(state);
            m.request(Request::Finished(kind, Outcome::Succeeded), None)
                .expect("finish");
            assert_eq!(m.state(), after, "{kind:?} finishing in {state:?}");
        }
    }

    #[test]
    fn a_refusal_is_an_event_with_the_actor_and_the_running_sequence() {
        let bus = EventBus::new(64);
        let m = Lifecycle::new(bus.clone());
        m.request(Request::Start(K::Reset), None).expect("reset");
        let err = m
            .request(Request::Start(K::Upgrade), Some("actor-7"))
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "reset is running; upgrade may not interrupt it"
        );
        let last = bus.snapshot().pop().expect("event");
        assert_eq!(last.actor.as_deref(), Some("actor-7"));
        assert!(matches!(last.kind, EventKind::RequestDenied { .. }));
    }

    #[test]
    fn transitions_are_published_as_state_change_events() {
        let bus = EventBus::new(64);
        let m = Lifecycle::new(bus.clone());
        m.request(Request::Finished(K::Boot, Outcome::Succeeded), None)
            .expect("boot ok");
        let e = bus.snapshot().pop().expect("event");
        assert_eq!(
            e.kind,
            EventKind::StateChange {
                from: "booting".into(),
                to: "running".into()
            }
        );
    }

    #[test]
    fn superstates_group_the_states() {
        assert_eq!(Running.superstate(), "operational");
        assert_eq!(Upgrading.superstate(), "operational");
        assert_eq!(Resetting.superstate(), "terminating");
        assert_eq!(Maintenance.superstate(), "maintenance");
    }
}
