//! `plinth reboot` and `plinth shutdown`.

use std::time::{Duration, Instant};

use anyhow::bail;
use api::proto::{RebootRequest, ShutdownRequest, VersionRequest};

use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug)]
pub struct RebootArgs {
    /// Wait until the node is back (answers with a new boot id).
    #[arg(long)]
    wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Take a slot of the cluster's reboot semaphore first: the node waits until fewer than K
    /// nodes of the cluster are down for an upgrade or a coordinated reboot.
    #[arg(long, value_name = "K", default_value_t = 0)]
    max_unavailable: u32,
}

#[derive(clap::Args, Debug)]
pub struct ShutdownArgs {
    /// Abort the phase in progress (even an upgrade's slot write) instead of waiting for it.
    #[arg(long)]
    force: bool,
}

async fn boot_id(target: &Target) -> anyhow::Result<String> {
    let (endpoint, mut c) = target.connect().await?;
    Ok(c.version(VersionRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .boot_id)
}

pub async fn reboot(target: &Target, args: RebootArgs) -> anyhow::Result<()> {
    let before = boot_id(target).await?;
    let (endpoint, mut c) = target.connect().await?;
    let actor = c
        .reboot(RebootRequest {
            max_unavailable: args.max_unavailable,
        })
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .actor_id;
    eprintln!("reboot started (actor {actor})");
    if !args.wait {
        return Ok(());
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    eprintln!("waiting for {endpoint} to come back...");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // While the node is down every attempt fails; only a new boot id means it is back.
        if let Ok(Ok(now)) = tokio::time::timeout(Duration::from_secs(10), boot_id(target)).await {
            if now != before {
                eprintln!(
                    "node is back after {:.1}s: boot id {now} (was {before})",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{endpoint} did not come back within {}s", args.timeout);
        }
    }
}

pub async fn shutdown(target: &Target, args: ShutdownArgs) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let actor = c
        .shutdown(ShutdownRequest { force: args.force })
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .actor_id;
    eprintln!("shutdown started (actor {actor})");
    Ok(())
}
