//! Fault injection for tests, off unless the kernel command line asks: what a broken image
//! looks like to the watchdog and to the trial logic.
//!
//! `plinth.fault=hang` makes machined stop making progress at the start of `boot` (it stops
//! feeding the watchdog, as a deadlocked PID 1 would).

use std::sync::Arc;

use sequencer::TaskError;

use crate::runtime::Runtime;

/// Whether the command line asks for a hang.
pub fn hang_requested(ctx: &Arc<Runtime>) -> bool {
    ctx.platform
        .cmdline()
        .is_ok_and(|c| c.split_whitespace().any(|a| a == "plinth.fault=hang"))
}

/// Never returns.
pub async fn hang(_: Arc<Runtime>) -> Result<(), TaskError> {
    tracing::warn!("plinth.fault=hang: machined stops here");
    std::future::pending::<()>().await;
    Ok(())
}
