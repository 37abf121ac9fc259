//! Fault injection for tests, off unless the kernel command line asks: what a broken image
//! looks like to the watchdog and to the trial logic.
//!
//! `plinth.fault=hang` makes machined stop making progress at the start of `boot` (it stops
//! feeding the watchdog, as a deadlocked PID 1 would). `plinth.fault=halt-on-reboot` makes a
//! reboot halt the kernel instead, as a kernel that hangs in its reboot path would leave the
//! machine: only the watchdog, kept running through reboots, brings it back.

use std::sync::Arc;

use sequencer::TaskError;

use crate::platform::Platform;
use crate::runtime::Runtime;

/// Whether the command line asks for a hang.
pub fn hang_requested(ctx: &Arc<Runtime>) -> bool {
    requested(ctx.platform.as_ref(), "hang")
}

/// Whether the kernel command line asks for `plinth.fault=<fault>`.
pub fn requested(platform: &(impl Platform + ?Sized), fault: &str) -> bool {
    platform.cmdline().is_ok_and(|c| {
        c.split_whitespace()
            .any(|a| a.strip_prefix("plinth.fault=") == Some(fault))
    })
}

/// Never returns.
pub async fn hang(_: Arc<Runtime>) -> Result<(), TaskError> {
    tracing::warn!("plinth.fault=hang: machined stops here");
    std::future::pending::<()>().await;
    Ok(())
}
