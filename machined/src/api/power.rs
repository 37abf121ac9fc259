//! Reboot and Shutdown: started through the lifecycle like every sequence; the power action
//! follows once the teardown is done.

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
    let rt = runtime.clone();
    tokio::spawn(async move {
        let mut hold = match queued.wait().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("coordinated reboot: {e}");
                return;
            }
        };
        if let Err(e) = hold.keep().await {
            phases::reboot_slot::refused(&rt, format!("reboot: {e}"));
            return;
        }
        if let Err(d) = phases::power::request(&rt, SequenceKind::Reboot, Some(actor), false) {
            phases::reboot_slot::refused(&rt, format!("reboot: {d}"));
            hold.abandon();
        }
    });
    Ok(())
}

/// Starts an orderly power-off for `actor`; `force` drops the phase in progress.
pub fn shutdown(
    runtime: &std::sync::Arc<Runtime>,
    actor: String,
    force: bool,
) -> Result<(), Denied> {
    phases::power::request(runtime, SequenceKind::Shutdown, Some(actor), force).map(|_| ())
}
