//! Starting and stopping the config's services.

use std::sync::Arc;

use sequencer::TaskError;

use crate::runtime::Runtime;

/// Starts supervising the config's services (each starts when its dependencies are healthy).
pub async fn start_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    ctx.services.start(&cfg.machine.services);
    Ok(())
}

/// Stops every service, dependents first, each with SIGTERM then SIGKILL at its deadline.
pub async fn stop_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    ctx.services.stop_all().await;
    Ok(())
}
