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

/// Sets [`Runtime::network_settled`] when dropped: however the configuration ends (done,
/// failed, or the phase cancelled), the API's announcement does not wait on it for ever.
struct Settled<'a>(&'a Runtime);

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        self.0.network_settled.send_replace(true);
    }
}

/// Brings up loopback and the configured interfaces.
pub async fn configure_network(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let _settled = Settled(&ctx);
    let cfg = config(&ctx)?;
    crate::modules::wait_for(crate::modules::FOR_NETWORK).await?;
    Ok(ctx
        .platform
        .configure_network(&cfg.machine.network.interfaces)
        .await?)
}
