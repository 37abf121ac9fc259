//! Starting the API.

use std::sync::Arc;

use sequencer::{EventKind, TaskError};

use crate::runtime::Runtime;

/// Starts the API with the config's identity and says where it listens.
pub async fn start_api(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    // TLS needs the kernel's random numbers ready, which the entropy device's driver feeds.
    crate::modules::wait_for(crate::modules::FOR_ENTROPY).await?;
    let endpoint = ctx.api.start(ctx.clone(), &cfg).await?;
    // A wildcard address is reached on loopback.
    ctx.set_api_probe(endpoint.replace("0.0.0.0", "127.0.0.1"));
    ctx.bus.publish(EventKind::ApiReady { endpoint }, None);
    Ok(())
}
