//! The tasks of every sequence, grouped by subsystem. A task is a plain async function taking
//! its sequence's context; its name lives in the phase table.

pub mod api;
pub mod fault;
pub mod initramfs;
pub mod network;
pub mod services;
pub mod state;
pub mod system;
pub mod teardown;
pub mod trial;
pub mod upgrade;

/// A task's blocking work (mounts, reads and writes, the TPM, firmware variables) runs on a
/// thread of its own, in the task's log span: a task that blocked where it is polled would hold
/// one of the runtime's threads (the initramfs has one, the node two) and every task waiting to
/// be polled there, its phase's others among them. A failure to run it converts into the task's
/// error (`TaskError: From<JoinError>`). The sequencer keeps count of it: an interrupted phase
/// waits for it to end.
pub(crate) use sequencer::runner::blocking;
