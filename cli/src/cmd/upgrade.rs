//! `plinth upgrade` and `plinth rollback`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::proto::upgrade_request::Msg;
use api::proto::{RollbackRequest, StatusRequest, UpgradeOptions, UpgradeRequest, VersionRequest};

use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug)]
pub struct UpgradeArgs {
    /// The bundle (`plinth image bundle` makes one): a file, sent in the call, or an http://
    /// URL the node pulls itself.
    #[arg(long)]
    pub image: String,
    /// Write and verify it, but leave the trial to the next reboot.
    #[arg(long)]
    pub stage: bool,
    /// The bundle digest to insist on (`plinth image bundle` prints it): the node refuses any
    /// other bundle before writing a byte. Worth it for URLs, whose content can change.
    #[arg(long, value_name = "BLAKE3")]
    digest: Option<String>,
    /// Accept a lower version than the running one at the same security version (a bundle
    /// below the node's security floor is refused whatever this says).
    #[arg(long)]
    allow_downgrade: bool,
    /// Follow the node through its reboot to the commit, or the fall back and its reason.
    #[arg(long)]
    wait: bool,
    /// How long to wait, in seconds (per node in a rolling upgrade).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Take a slot of the cluster's reboot semaphore first: at most this many nodes of the
    /// cluster down at once, counting every other rollout's. With -n or --all, a rolling
    /// upgrade (default 1).
    #[arg(long, value_name = "K")]
    max_unavailable: Option<u32>,
    /// A rolling upgrade of every node of the context.
    #[arg(long)]
    all: bool,
    /// With -n or --all: print the plan (which nodes, in which waves), change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// Wait until the node is back on the other slot.
    #[arg(long)]
    wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Take a slot of the cluster's reboot semaphore first: the node answers once queued, and
    /// rolls back when fewer than K nodes of the cluster are down (with -n, a rolling
    /// rollback).
    #[arg(long, value_name = "K", default_value_t = 0)]
    max_unavailable: u32,
}

pub(crate) async fn boot_id(target: &Target) -> anyhow::Result<String> {
    let (endpoint, mut c) = target.connect().await?;
    Ok(c.version(VersionRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .boot_id)
}

/// Waits for a running node with a boot id other than `before`; returns its Status.
pub(crate) async fn wait_back(
    target: &Target,
    before: &str,
    timeout: u64,
) -> anyhow::Result<api::proto::StatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let attempt = async {
            let (_, mut c) = target.connect().await?;
            let v = c.version(VersionRequest {}).await?.into_inner();
            anyhow::Ok((v, c.status(StatusRequest {}).await?.into_inner()))
        };
        if let Ok(Ok((v, s))) = tokio::time::timeout(Duration::from_secs(10), attempt).await {
            // Running: the boot (and a trial's commit) is over.
            if v.boot_id != before && v.state == "running" {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            bail!("the node did not come back within {timeout}s");
        }
    }
}

/// The call's first message (`max_unavailable` 0: no reboot slot taken).
pub(crate) fn options(args: &UpgradeArgs, max_unavailable: u32) -> UpgradeRequest {
    let url = if is_url(&args.image) { &args.image } else { "" };
    UpgradeRequest {
        msg: Some(Msg::Options(UpgradeOptions {
            stage: args.stage,
            url: url.into(),
            expected_digest: args.digest.clone().unwrap_or_default(),
            allow_downgrade: args.allow_downgrade,
            max_unavailable,
        })),
    }
}

pub(crate) fn is_url(image: &str) -> bool {
    image.starts_with("http://") || image.starts_with("https://")
}

pub(crate) async fn send_url(
    target: &Target,
    url: &str,
    first: UpgradeRequest,
) -> anyhow::Result<api::proto::UpgradeResponse> {
    let (endpoint, mut c) = target.connect_long().await?;
    eprintln!("the node is pulling {url}");
    match c.upgrade(futures::stream::iter([first])).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(with_node_state(target, status_error(&endpoint, s)).await),
    }
}

pub async fn upgrade(target: &Target, args: UpgradeArgs) -> anyhow::Result<()> {
    if target.fans_out() || args.all {
        return super::rollout::run(target, &args, args.max_unavailable.unwrap_or(1)).await;
    }
    if args.dry_run {
        bail!("--dry-run plans a rolling upgrade: name the nodes with -n, or --all");
    }
    let before = boot_id(target).await?;
    let first = options(&args, args.max_unavailable.unwrap_or(0));
    let reply = if is_url(&args.image) {
        send_url(target, &args.image, first).await?
    } else {
        send_file(target, Path::new(&args.image), first, true).await?
    };
    report(target, &before, reply, &args).await
}

/// Sends the bundle in the call (with a progress bar when `bar`: not for many at once).
pub(crate) async fn send_file(
    target: &Target,
    image: &Path,
    first: UpgradeRequest,
    bar: bool,
) -> anyhow::Result<api::proto::UpgradeResponse> {
    let file = tokio::fs::File::open(image)
        .await
        .with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata().await?.len();
    let bar = if bar {
        crate::upload::bar(size, "sending")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let chunks = crate::upload::chunks(file, bar.clone(), |buf| UpgradeRequest {
        msg: Some(Msg::Chunk(buf)),
    });
    let stream = futures::StreamExt::chain(futures::stream::iter([first]), chunks);
    let (endpoint, mut c) = target.connect_long().await?;
    let reply = c.upgrade(stream).await;
    bar.finish_and_clear();
    match reply {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(with_node_state(target, status_error(&endpoint, s)).await),
    }
}

/// An upgrade call that failed, with what the node is doing now: a broken connection does not
/// stop the node, and the operator must know whether it is still upgrading.
async fn with_node_state(target: &Target, error: anyhow::Error) -> anyhow::Error {
    let now = async {
        let (_, mut c) = target.connect().await?;
        anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
    };
    match tokio::time::timeout(Duration::from_secs(10), now).await {
        Ok(Ok(s)) if !s.running_sequence.is_empty() => error.context(format!(
            "the node is still {} (sequence {}, actor {}): `plinth status` follows it, `plinth reboot` stops it while it receives or writes the slot",
            s.state, s.running_sequence, s.running_actor_id
        )),
        Ok(Ok(s)) => error.context(format!("the node is {} and runs no sequence now", s.state)),
        _ => error.context("the node could not be asked what it is doing now"),
    }
}

/// Says what the node did with the bundle and, with --wait, how its trial ended.
async fn report(
    target: &Target,
    before: &str,
    reply: api::proto::UpgradeResponse,
    args: &UpgradeArgs,
) -> anyhow::Result<()> {
    eprintln!(
        "wrote Plinth {} into slot {} and verified it (actor {})",
        reply.version, reply.slot, reply.actor_id
    );
    if !reply.rebooting {
        eprintln!("staged: its trial is the next reboot (`plinth reboot`)");
        return Ok(());
    }
    eprintln!(
        "the node is rebooting into slot {} for its trial",
        reply.slot
    );
    if !args.wait {
        return Ok(());
    }
    let s = wait_back(target, before, args.timeout).await?;
    if s.committed == reply.slot && s.slot == reply.slot {
        println!(
            "upgrade committed: slot {} runs Plinth {}",
            reply.slot, reply.version
        );
        return Ok(());
    }
    match s.last_failure {
        Some(f) if f.slot == reply.slot => bail!(
            "upgrade failed: the node is back on slot {}; slot {} ({}) failed: {}",
            s.slot,
            f.slot,
            f.version,
            f.reason
        ),
        _ => bail!(
            "the node is back on slot {} but slot {} is not committed",
            s.slot,
            reply.slot
        ),
    }
}

pub async fn rollback(target: &Target, args: RollbackArgs) -> anyhow::Result<()> {
    if target.fans_out() {
        if args.wait {
            bail!("--wait follows one node: with -n, follow them with plinth -n ... status");
        }
        let max_unavailable = args.max_unavailable;
        return crate::fanout::actions(target, |endpoint, mut c| async move {
            c.rollback(RollbackRequest { max_unavailable })
                .await
                .map(|r| r.into_inner().actor_id)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await;
    }
    let before = boot_id(target).await?;
    let (endpoint, mut c) = target.connect().await?;
    let actor = c
        .rollback(RollbackRequest {
            max_unavailable: args.max_unavailable,
        })
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .actor_id;
    eprintln!("rollback started (actor {actor}); the node reboots into the other slot");
    if !args.wait {
        return Ok(());
    }
    let s = wait_back(target, &before, args.timeout).await?;
    println!("rolled back: slot {} is committed and running", s.slot);
    Ok(())
}
