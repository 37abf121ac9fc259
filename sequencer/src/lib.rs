//! The engine of `machined`.
//!
//! A [`Sequence`] is an ordered list of [`Phase`]s; a phase's [`Task`]s run concurrently and the
//! phase ends when all of them have. The [`runner`] runs a sequence, turning every start and stop
//! into an [`Event`] on the [`EventBus`] (monotonic id, timestamps, duration) and a `tracing` span.
//! The node's lifecycle is a `statig` hierarchical state machine ([`lifecycle`]) that decides
//! which sequence may start.
#![warn(missing_docs)]

pub mod clock;
pub mod controller;
pub mod event;
pub mod lifecycle;
pub mod runner;
pub mod sequence;
pub mod trace;

pub use controller::{Controller, Started};
pub use event::{Event, EventBus, EventKind, Replay, SubscribeError};
pub use lifecycle::{Denied, Lifecycle, Moved, NodeState, Outcome, Request, SequenceKind, Stage};
pub use runner::{run, run_with, Cancel, SequenceError};
pub use sequence::{Phase, Sequence, Task, TaskError};
