//! The node lifecycle: a `statig` hierarchical state machine that decides which sequence may
//! start, and which running sequence a new one may take over.
//!
//! ```text
//! maintenance ───────────── Start(boot|install|reboot|shutdown|reset) ──▶ …
//! operational ┬ booting ──── Finished(boot ok) ──▶ running
//!             ├ installing ─ Finished(install) ──▶ booting
//!             ├ running ──── Start(upgrade|rollback|reboot|shutdown|reset) ──▶ …
//!             ├ upgrading ── Finished(upgrade) ──▶ running
//!             └ rolling_back Finished(rollback) ─▶ running
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
    /// Orderly restart.
    Reboot,
    /// Orderly power-off.
    Shutdown,
}

impl SequenceKind {
    /// Every kind.
    pub const ALL: [SequenceKind; 8] = [
        SequenceKind::Initialize,
        SequenceKind::Install,
        SequenceKind::Boot,
        SequenceKind::Upgrade,
        SequenceKind::Rollback,
        SequenceKind::Reset,
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

/// The takeover table: may `new` cancel `running`?
///
/// | running ↓ / new → | reboot | shutdown | reset | anything else |
/// |---|---|---|---|---|
/// | initialize, boot | yes | yes | yes | no |
/// | install, upgrade, rollback, reset, reboot | no | yes | no | no |
/// | shutdown | no | no | no | no |
///
/// Shutdown always wins except over itself. Nothing but a shutdown interrupts an install, an
/// upgrade or a reset; a non-forced shutdown still lets the phase in progress (an upgrade's slot
/// write) finish, because cancellation only happens at phase boundaries.
pub fn may_take_over(running: SequenceKind, new: SequenceKind) -> bool {
    use SequenceKind::*;
    match (running, new) {
        (Shutdown, _) => false,
        (_, Shutdown) => true,
        (Initialize | Boot, Reboot | Reset) => true,
        _ => false,
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
    /// Reboot runs.
    Rebooting,
    /// Reset runs.
    Resetting,
    /// Shutdown runs.
    ShuttingDown,
}

impl NodeState {
    /// Every state.
    pub const ALL: [NodeState; 9] = [
        NodeState::Maintenance,
        NodeState::Booting,
        NodeState::Installing,
        NodeState::Running,
        NodeState::Upgrading,
        NodeState::RollingBack,
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
            | NodeState::RollingBack => "operational",
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
    use super::{may_take_over, Denied, NodeState, Outcome as Ended, Request, SequenceKind};
    use statig::prelude::*;

    #[derive(Default)]
    pub(super) struct Machine;

    /// What a dispatch decided, written by the handlers.
    #[derive(Default)]
    pub(super) struct Verdict {
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
        if may_take_over(running, new) {
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
                _ => not_allowed(context, event, NodeState::Maintenance),
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
                    | SequenceKind::Reset),
                ) => Transition(state_for(*k)),
                _ => not_allowed(context, event, NodeState::Running),
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
        let mut machine = self.lock();
        let from = node_state(machine.state());
        let mut verdict = Verdict::default();
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

    /// The state a start request leads to from `state`, or `None` if refused: the whole
    /// start table, written out as the rule it must follow.
    fn expected_start(state: NodeState, kind: SequenceKind) -> Option<NodeState> {
        let target = match kind {
            K::Initialize | K::Boot => Booting,
            K::Install => Installing,
            K::Upgrade => Upgrading,
            K::Rollback => RollingBack,
            K::Reboot => Rebooting,
            K::Reset => Resetting,
            K::Shutdown => ShuttingDown,
        };
        match (state, kind) {
            (Maintenance, K::Upgrade | K::Rollback) => None,
            (Maintenance, _) => Some(target),
            (Running, K::Upgrade | K::Rollback | K::Reboot | K::Shutdown | K::Reset) => {
                Some(target)
            }
            (Running, _) => None,
            (Booting, K::Install | K::Boot | K::Initialize) => Some(target),
            (s, k) => match s.running() {
                Some(r) if may_take_over(r, k) => Some(target),
                _ => None,
            },
        }
    }

    #[test]
    fn every_start_request_in_every_state_moves_or_is_refused_as_the_table_says() {
        for state in NodeState::ALL {
            for kind in SequenceKind::ALL {
                let m = machine_in(state);
                let got = m.request(Request::Start(kind), None).ok().map(|mv| mv.to);
                let want = expected_start(state, kind);
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
    fn forbidden_transitions_are_refused_with_the_right_reason() {
        // (state, request, refusal is Busy (true) or NotAllowed (false))
        let table: &[(NodeState, Request, bool)] = &[
            (Resetting, Request::Start(K::Upgrade), true),
            (Upgrading, Request::Start(K::Reboot), true),
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
