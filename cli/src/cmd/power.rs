//! `plinth reboot` and `plinth shutdown`.

use std::time::{Duration, Instant};

use anyhow::bail;
use api::proto::{RebootRequest, ShutdownRequest, VersionRequest};

use crate::connect::{status_error, Target};
use crate::fanout::{node_column, print, Show, NODE_HEADER};
use crate::output::Format;

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

/// Waits until the node at `target` answers with a boot id other than `before`.
async fn back(target: &Target, before: &str, timeout: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // While the node is down every attempt fails; only a new boot id means it is back.
        if let Ok(Ok(now)) = tokio::time::timeout(Duration::from_secs(10), boot_id(target)).await {
            if now != before {
                return Ok(started.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("did not come back within {timeout}s");
        }
    }
}

/// `-n`: every node asked at once, a line each. With `--max-unavailable` the nodes take their
/// turns through the cluster's reboot semaphore themselves: a rolling reboot.
async fn reboot_many(target: &Target, args: RebootArgs) -> anyhow::Result<()> {
    let replies = target
        .each(|endpoint, mut c| {
            let one = Target {
                endpoints: vec![endpoint.clone()],
                nodes: Vec::new(),
                ..target.clone()
            };
            async move {
                let e = |s| status_error(&endpoint, s);
                let before = c
                    .version(VersionRequest {})
                    .await
                    .map_err(e)?
                    .into_inner()
                    .boot_id;
                let actor = c
                    .reboot(RebootRequest {
                        max_unavailable: args.max_unavailable,
                    })
                    .await
                    .map_err(e)?
                    .into_inner()
                    .actor_id;
                let after = if args.wait {
                    Some(
                        back(&one, &before, args.timeout)
                            .await
                            .map_err(|e| e.context(endpoint.clone()))?,
                    )
                } else {
                    None
                };
                Ok((actor, after))
            }
        })
        .await?;
    let show = Show {
        json: |_: &str, (actor, after): &(String, Option<Duration>)| serde_json::json!({ "actor_id": actor, "back_after_s": after.map(|d| d.as_secs_f64()) }),
        key: "reboot",
        header: |many: bool| {
            println!(
                "{}ACTOR                                 BACK AFTER",
                if many { NODE_HEADER } else { "" }
            );
        },
        render: |endpoint: &str, many: bool, (actor, after): &(String, Option<Duration>)| {
            println!(
                "{}{actor:<37} {}",
                node_column(endpoint, many),
                after.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
            );
        },
    };
    print(target, replies, Format::Text, show)
}

pub async fn reboot(target: &Target, args: RebootArgs) -> anyhow::Result<()> {
    if target.fans_out() {
        return reboot_many(target, args).await;
    }
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
    if target.fans_out() {
        return crate::fanout::actions(target, |endpoint, mut c| async move {
            c.shutdown(ShutdownRequest { force: args.force })
                .await
                .map(|r| r.into_inner().actor_id)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await;
    }
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
