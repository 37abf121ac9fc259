//! Network tasks: host name and static addresses from the node config.

use std::sync::Arc;

use sequencer::TaskError;

use crate::runtime::Runtime;

fn config(ctx: &Runtime) -> Result<config::NodeConfig, TaskError> {
    ctx.config()
        .ok_or_else(|| "the node config is not loaded".into())
}

/// Sets the host name to the node name.
pub async fn set_hostname(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = config(&ctx)?;
    Ok(ctx.platform.set_hostname(&cfg.machine.name)?)
}

/// Brings up loopback and the configured interfaces.
pub async fn configure_network(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    // However the configuration ends, the API's announcement does not wait on it for ever.
    let _settled = crate::runtime::SetOnDrop(&ctx.network_settled);
    let cfg = config(&ctx)?;
    crate::modules::wait_for(crate::modules::FOR_NETWORK).await?;
    Ok(ctx
        .platform
        .configure_network(&cfg.machine.network.interfaces)
        .await?)
}
