//! Reboot and Shutdown: started through the lifecycle like every sequence; the power action
//! follows once the teardown is done.

use std::future::Future;
use std::sync::Arc;

use phases::reboot_slot::{refused, Queued};
use phases::Runtime;
use sequencer::{Denied, SequenceKind};

/// Starts an orderly reboot for `actor`.
///
/// With `max_unavailable` (not 0) the node first joins the cluster's reboot queue (refused at
/// once when it may not, a control plane etcd cannot spare for one) and answers; it reboots on
/// a task of its own when its slot comes, and holds it until it runs again, as an upgrade
/// does. Its `reboot-slot` events say how it goes.
pub async fn reboot(
    runtime: &std::sync::Arc<Runtime>,
    actor: String,
    max_unavailable: u32,
) -> Result<(), super::error::ApiError> {
    if max_unavailable == 0 {
        return phases::power::request(runtime, SequenceKind::Reboot, Some(actor.clone()), false)
            .map(|_| ())
            .map_err(super::error::ApiError::denied(&actor));
    }
    let queued = phases::reboot_slot::enqueue(runtime, max_unavailable, "reboot").await?;
    reboot_when_held(runtime, queued, actor, "reboot", || async { Ok(None) });
    Ok(())
}

/// A coordinated reboot's second half, on a task of its own (the caller has had its answer):
/// waits for `queued`'s slot, hands it on to the next boot, runs `before` (what must happen
/// just before the reboot, as a rollback's switch of slots; it returns what it left waiting for
/// the next boot, if anything), and reboots for `actor`. A refusal at any step is a `refused`
/// event naming `what`, and nothing after it happens.
pub fn reboot_when_held<F, Fut>(
    rt: &Arc<Runtime>,
    queued: Queued,
    actor: String,
    what: &'static str,
    before: F,
) where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<&'static str>, String>> + Send,
{
    let rt = rt.clone();
    tokio::spawn(async move {
        // A refusal while waiting is its own event already.
        let Ok(mut hold) = queued.wait().await else {
            return;
        };
        if let Err(e) = hold.keep().await {
            refused(&rt, format!("{what}: {e}"));
            return;
        }
        let staged = match before().await {
            Ok(staged) => staged,
            Err(e) => {
                refused(&rt, format!("{what}: {e}"));
                hold.abandon();
                return;
            }
        };
        if let Err(d) = phases::power::request(&rt, SequenceKind::Reboot, Some(actor), false) {
            // What `before` did stays done, for the node's next reboot.
            let staged = staged.map(|s| format!(": {s}")).unwrap_or_default();
            refused(&rt, format!("{what}: not rebooted ({d}){staged}"));
            hold.abandon();
        }
    });
}

/// Starts an orderly power-off for `actor`; `force` drops the phase in progress.
pub fn shutdown(
    runtime: &std::sync::Arc<Runtime>,
    actor: String,
    force: bool,
) -> Result<(), Denied> {
    phases::power::request(runtime, SequenceKind::Shutdown, Some(actor), force).map(|_| ())
}
