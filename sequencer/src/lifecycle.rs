//! The node lifecycle: a `statig` hierarchical state machine that decides which sequence may
//! start.
//!
//! ```text
//! Operational ─┬─ Booting ──boot ok──▶ Running
//!              │     │ boot failed ─────────────────┐
//!              └─ (reboot / shutdown requests) ─────┤
//!                                                   ▼
//! Terminating ─┬─ Rebooting ── shutdown ──▶ ShuttingDown
//!              └─ ShuttingDown (final: nothing leaves it)
//! ```
//!
//! A request either moves the machine (and may then start its sequence) or is refused with a
//! [`Denied`] reason; refusals are events too. The machine is the sync flavour of statig behind a
//! mutex, so any task may consult it; transitions are published on the event bus.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use statig::prelude::IntoStateMachineExt as _;

use crate::event::{EventBus, EventKind};

/// The node's lifecycle state, as reported by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// The boot sequence runs.
    Booting,
    /// Booted: serving, waiting for requests.
    Running,
    /// The reboot sequence runs.
    Rebooting,
    /// The shutdown sequence runs.
    ShuttingDown,
}

impl NodeState {
    /// Stable name used in events and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Booting => "booting",
            NodeState::Running => "running",
            NodeState::Rebooting => "rebooting",
            NodeState::ShuttingDown => "shutting_down",
        }
    }

    /// The superstate this state belongs to.
    pub fn superstate(self) -> &'static str {
        match self {
            NodeState::Booting | NodeState::Running => "operational",
            NodeState::Rebooting | NodeState::ShuttingDown => "terminating",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something asked of the lifecycle machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// The boot sequence finished successfully.
    BootSucceeded,
    /// The boot sequence failed: the node must reboot.
    BootFailed,
    /// An operator (or a signal) asks for a reboot.
    Reboot,
    /// An operator (or a signal, or the power button) asks for a shutdown.
    Shutdown,
}

impl Request {
    /// Stable name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Request::BootSucceeded => "boot_succeeded",
            Request::BootFailed => "boot_failed",
            Request::Reboot => "reboot",
            Request::Shutdown => "shutdown",
        }
    }
}

/// Why the machine refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The request makes no sense in this state (e.g. "boot succeeded" while running).
    #[error("{request} is not allowed while the node is {state}")]
    NotAllowed {
        /// The request.
        request: &'static str,
        /// The current state.
        state: NodeState,
    },
    /// The same sequence already runs.
    #[error("the node is already {state}")]
    AlreadyRunning {
        /// The current state.
        state: NodeState,
    },
}

/// The statig chart itself. statig generates public `State`/`Superstate` enums; they stay
/// private to this module.
mod chart {
    #![allow(missing_docs)]
    use super::{Denied, NodeState, Request};
    use statig::prelude::*;

    /// The statig machine. Its shared storage is empty; the verdict of each request goes out
    /// through the context.
    #[derive(Default)]
    pub(super) struct Machine;

    /// What a dispatch decided, written by the handlers.
    #[derive(Default)]
    pub(super) struct Verdict {
        pub(super) denied: Option<Denied>,
    }

    /// Events the machine handles.
    pub(super) struct Ask(pub(super) Request);

    #[state_machine(initial = "State::booting()", state(derive(Debug, Clone)))]
    impl Machine {
        #[state(superstate = "operational")]
        fn booting(event: &Ask) -> Outcome<State> {
            match event.0 {
                Request::BootSucceeded => Transition(State::running()),
                Request::BootFailed => Transition(State::rebooting()),
                _ => Super,
            }
        }

        #[state(superstate = "operational")]
        fn running(context: &mut Verdict, event: &Ask) -> Outcome<State> {
            match event.0 {
                Request::BootSucceeded | Request::BootFailed => {
                    context.denied = Some(Denied::NotAllowed {
                        request: event.0.as_str(),
                        state: NodeState::Running,
                    });
                    Handled
                }
                _ => Super,
            }
        }

        /// Shared by Booting and Running: a reboot or shutdown may interrupt either.
        #[superstate]
        fn operational(event: &Ask) -> Outcome<State> {
            match event.0 {
                Request::Reboot => Transition(State::rebooting()),
                Request::Shutdown => Transition(State::shutting_down()),
                _ => Super,
            }
        }

        #[state(superstate = "terminating")]
        fn rebooting(context: &mut Verdict, event: &Ask) -> Outcome<State> {
            match event.0 {
                // Shutdown always wins.
                Request::Shutdown => Transition(State::shutting_down()),
                Request::Reboot | Request::BootFailed => {
                    context.denied = Some(Denied::AlreadyRunning {
                        state: NodeState::Rebooting,
                    });
                    Handled
                }
                _ => Super,
            }
        }

        #[state(superstate = "terminating")]
        fn shutting_down(context: &mut Verdict, event: &Ask) -> Outcome<State> {
            match event.0 {
                Request::Shutdown => {
                    context.denied = Some(Denied::AlreadyRunning {
                        state: NodeState::ShuttingDown,
                    });
                    Handled
                }
                _ => Super,
            }
        }

        /// Anything a terminating state did not take is refused: nothing else starts once the node
        /// is going down.
        #[superstate]
        fn terminating(context: &mut Verdict, event: &Ask) -> Outcome<State> {
            context.denied.get_or_insert(Denied::NotAllowed {
                request: event.0.as_str(),
                state: NodeState::ShuttingDown,
            });
            Handled
        }
    }
}

use chart::{Ask, Machine, State, Verdict};

fn node_state(state: &State) -> NodeState {
    match state {
        State::Booting {} => NodeState::Booting,
        State::Running {} => NodeState::Running,
        State::Rebooting {} => NodeState::Rebooting,
        State::ShuttingDown {} => NodeState::ShuttingDown,
    }
}

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

    /// Asks the machine to move; on success the caller starts the matching sequence.
    pub fn request(&self, request: Request, actor: Option<&str>) -> Result<NodeState, Denied> {
        let mut machine = self.lock();
        let from = node_state(machine.state());
        let mut verdict = Verdict::default();
        machine.handle_with_context(&Ask(request), &mut verdict);
        let to = node_state(machine.state());
        // Publish under the machine lock so transitions appear in the order they happened.
        if let Some(denied) = verdict.denied {
            let denied = match denied {
                Denied::NotAllowed { request, .. } => Denied::NotAllowed {
                    request,
                    state: from,
                },
                other => other,
            };
            self.bus.publish(
                EventKind::RequestDenied {
                    request: request.as_str().into(),
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
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;
    use Request::*;

    /// Drives a fresh machine to `state`.
    fn machine_in(state: NodeState) -> Lifecycle {
        let m = Lifecycle::new(EventBus::new(64));
        let path: &[Request] = match state {
            Booting => &[],
            Running => &[BootSucceeded],
            Rebooting => &[Reboot],
            ShuttingDown => &[Shutdown],
        };
        for r in path {
            m.request(*r, None).expect("path to state");
        }
        assert_eq!(m.state(), state);
        m
    }

    /// Every (state, request) pair and its outcome: the new state, or refused.
    const TABLE: &[(NodeState, Request, Option<NodeState>)] = &[
        (Booting, BootSucceeded, Some(Running)),
        (Booting, BootFailed, Some(Rebooting)),
        (Booting, Reboot, Some(Rebooting)),
        (Booting, Shutdown, Some(ShuttingDown)),
        (Running, BootSucceeded, None),
        (Running, BootFailed, None),
        (Running, Reboot, Some(Rebooting)),
        (Running, Shutdown, Some(ShuttingDown)),
        (Rebooting, BootSucceeded, None),
        (Rebooting, BootFailed, None),
        (Rebooting, Reboot, None),
        (Rebooting, Shutdown, Some(ShuttingDown)),
        (ShuttingDown, BootSucceeded, None),
        (ShuttingDown, BootFailed, None),
        (ShuttingDown, Reboot, None),
        (ShuttingDown, Shutdown, None),
    ];

    #[test]
    fn every_state_request_pair_has_the_outcome_in_the_table() {
        for &(state, request, expect) in TABLE {
            let m = machine_in(state);
            let got = m.request(request, None).ok();
            assert_eq!(got, expect, "{state:?} + {request:?}");
            let now = m.state();
            assert_eq!(
                now,
                expect.unwrap_or(state),
                "{state:?} + {request:?} left the machine in {now:?}"
            );
        }
    }

    #[test]
    fn a_refusal_is_an_event_with_the_actor_and_the_state_it_was_refused_in() {
        let bus = EventBus::new(64);
        let m = Lifecycle::new(bus.clone());
        m.request(Shutdown, None).expect("shutdown");
        let err = m.request(Reboot, Some("actor-7")).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "reboot is not allowed while the node is shutting_down"
        );
        let last = bus.snapshot().pop().expect("event");
        assert_eq!(last.actor.as_deref(), Some("actor-7"));
        assert!(matches!(last.kind, EventKind::RequestDenied { .. }));
    }

    #[test]
    fn transitions_are_published_as_state_change_events() {
        let bus = EventBus::new(64);
        let m = Lifecycle::new(bus.clone());
        m.request(BootSucceeded, None).expect("boot ok");
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
        assert_eq!(Booting.superstate(), "operational");
        assert_eq!(Running.superstate(), "operational");
        assert_eq!(Rebooting.superstate(), "terminating");
        assert_eq!(ShuttingDown.superstate(), "terminating");
    }
}
