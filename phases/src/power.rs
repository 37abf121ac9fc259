//! Asking for a reboot or a shutdown: the sequence through the lifecycle machine, then the power
//! action once it has ended.

use std::sync::Arc;

use sequencer::{Denied, SequenceKind};

use crate::platform::PowerAction;
use crate::runtime::Runtime;

/// Starts the reboot (or shutdown) sequence; when it ends, restarts (or powers off) the machine.
/// A teardown that fails still ends in the power action: a node asked to go down goes down. A
/// sequence taken over (a shutdown during a reboot) leaves the action to its successor.
///
/// Returns the request's actor id, or the refusal.
pub fn request(
    rt: &Arc<Runtime>,
    kind: SequenceKind,
    actor: Option<String>,
    force: bool,
) -> Result<String, Denied> {
    let (sequence, action) = match kind {
        SequenceKind::Shutdown => (crate::shutdown::shutdown(), PowerAction::PowerOff),
        _ => (crate::shutdown::reboot(), PowerAction::Reboot),
    };
    let started = rt
        .controller
        .start(kind, sequence, rt.clone(), actor, force)?;
    let platform = rt.platform.clone();
    tokio::spawn(async move {
        match started.handle.await {
            Ok(Err(e)) if e.is_cancelled() => return,
            Ok(Err(e)) => tracing::error!("{e}; going ahead with {action:?}"),
            Ok(Ok(())) => {}
            Err(e) => tracing::error!("{kind} sequence panicked: {e}; going ahead with {action:?}"),
        }
        if let Err(e) = platform.power(action) {
            tracing::error!("{e}");
        }
    });
    Ok(started.actor)
}
