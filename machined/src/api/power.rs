//! Reboot and Shutdown: started through the lifecycle like every sequence; the power action
//! follows once the teardown is done.

use phases::Runtime;
use sequencer::{Denied, SequenceKind};

/// Starts an orderly reboot for `actor`.
pub fn reboot(runtime: &std::sync::Arc<Runtime>, actor: String) -> Result<(), Denied> {
    phases::power::request(runtime, SequenceKind::Reboot, Some(actor), false).map(|_| ())
}

/// Starts an orderly power-off for `actor`; `force` drops the phase in progress.
pub fn shutdown(
    runtime: &std::sync::Arc<Runtime>,
    actor: String,
    force: bool,
) -> Result<(), Denied> {
    phases::power::request(runtime, SequenceKind::Shutdown, Some(actor), force).map(|_| ())
}
