//! Starting and stopping the config's services.

use std::sync::Arc;

use sequencer::TaskError;

use crate::runtime::Runtime;

/// Starts supervising the config's services (each starts when its dependencies are healthy).
pub async fn start_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    ctx.services.start(&cfg.machine.services);
    spawn_log_rotation(
        &ctx,
        cfg.machine
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect(),
    );
    Ok(())
}

/// Keeps every service's log under [`crate::logs::MAX_SERVICE_LOG`] (checked every few
/// seconds; EPHEMERAL must not fill up with one chatty service's output).
fn spawn_log_rotation(ctx: &Arc<Runtime>, names: Vec<String>) {
    if names.is_empty() {
        return;
    }
    let weak = Arc::downgrade(ctx);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let Some(rt) = weak.upgrade() else { return };
            for name in &names {
                match crate::logs::rotate_if_large(rt.platform.as_ref(), name) {
                    Ok(true) => tracing::info!("rotated the log of service {name}"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("rotating the log of service {name}: {e}"),
                }
            }
        }
    });
}

/// How long the boot waits for every service to be healthy.
pub const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits until every service is healthy. After [`HEALTH_WAIT`] the boot goes on (the node is
/// reachable to find out why) and the services stay as they are.
pub async fn wait_services_healthy(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let deadline = tokio::time::Instant::now() + HEALTH_WAIT;
    loop {
        let waiting = ctx.services.unhealthy();
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(
                "services still not healthy after {}s: {}",
                HEALTH_WAIT.as_secs(),
                waiting.join(", ")
            );
            return Ok(());
        }
        crate::watchdog::feed();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Stops every service, dependents first, each with SIGTERM then SIGKILL at its deadline.
pub async fn stop_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    ctx.services.stop_all().await;
    Ok(())
}

/// Checks the system extensions in the ESP's store and overlays those that pass on
/// `/usr/local` ([`crate::extensions`]); a refused one is reported and left out.
pub async fn mount_extensions(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    crate::extensions::activate(&ctx).await
}
