//! Starting the API.

use std::sync::Arc;

use sequencer::{EventKind, TaskError};

use crate::runtime::Runtime;

/// Starts the API with the config's identity and, once the boot's network configuration has
/// ended (the listener is bound while the addresses are configured), says where it listens:
/// announced earlier, a client that takes the word connects to an address the node does not
/// have yet, and its connection attempt waits out a retransmission.
pub async fn start_api(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    // TLS needs the kernel's random numbers ready, which the entropy device's driver feeds.
    crate::modules::wait_for(crate::modules::FOR_ENTROPY).await?;
    let endpoint = ctx.api.start(ctx.clone(), &cfg).await?;
    // A wildcard address is reached on loopback.
    ctx.set_api_probe(endpoint.replace("0.0.0.0", "127.0.0.1"));
    let mut settled = ctx.network_settled.subscribe();
    // The sender lives in `ctx`, so this ends when the network task does.
    let _ = settled.wait_for(|done| *done).await;
    ctx.bus.publish(EventKind::ApiReady { endpoint }, None);
    Ok(())
}
