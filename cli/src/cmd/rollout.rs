//! `plinth upgrade -n A,B,... | --all --max-unavailable K`: a rolling upgrade of the fleet.
//!
//! The control planes go first, one at a time; then the workers, K at a time. Every node is
//! sent the bundle with `max_unavailable = K`, so the node itself takes a slot of the
//! cluster's reboot semaphore in etcd before it writes anything and keeps it until it runs
//! again: two operators, or a rerun after this client was killed, share the same K. After
//! each node commits, the next waits for `plinth health` to pass. The first node that falls
//! back stops the rollout (no new node starts; those under way finish), and the reason is
//! said. A rerun skips the nodes already running the bundle's version, committed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use api::proto::{StatusRequest, VersionRequest, VersionResponse};
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use super::health;
use super::upgrade::{self as up, UpgradeArgs};
use crate::connect::{status_error, Target};

/// A node of the rollout, as it stood when the rollout began.
#[derive(Debug, Clone)]
struct Planned {
    endpoint: String,
    name: String,
    controlplane: bool,
    version: String,
    /// Already on the bundle's version and committed: nothing to do.
    done: bool,
}

impl Planned {
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.endpoint)
    }

    fn target(&self, like: &Target) -> Target {
        Target {
            endpoints: vec![self.endpoint.clone()],
            nodes: Vec::new(),
            ..like.clone()
        }
    }
}

/// Progress on the terminal: one line per step per node.
fn say(node: &Planned, what: impl std::fmt::Display) {
    eprintln!("{:<12} {what}", node.name);
}

/// The bundle's version, from its manifest (the nodes check its signature; this only plans).
async fn bundle_version(image: &str) -> anyhow::Result<Option<String>> {
    if up::is_url(image) {
        return Ok(None);
    }
    let mut f = tokio::fs::File::open(image)
        .await
        .with_context(|| format!("opening {image}"))?;
    let mut head = Vec::new();
    (&mut f).take(128 * 1024).read_to_end(&mut head).await?;
    let manifest = upgrade::bundle::peek_manifest(&head)
        .with_context(|| format!("{image} is not an upgrade bundle"))?;
    Ok(Some(manifest.version))
}

/// What every node runs now. A node that does not answer is waited for (an earlier rollout's
/// node may be rebooting), up to `secs`; then the rollout does not start: the health gate
/// between nodes needs them all.
async fn survey(all: &Target, version: Option<&str>, secs: u64) -> anyhow::Result<Vec<Planned>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match survey_once(all, version).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(e) => {
                eprintln!("{e:#}: asking again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn survey_once(all: &Target, version: Option<&str>) -> anyhow::Result<Vec<Planned>> {
    let replies = all
        .each(|endpoint, mut c| async move {
            let e = |s| status_error(&endpoint, s);
            let v = c.version(VersionRequest {}).await.map_err(e)?.into_inner();
            let s = c.status(StatusRequest {}).await.map_err(e)?.into_inner();
            Ok((v, s))
        })
        .await?;
    let mut planned = Vec::new();
    let mut unreachable = Vec::new();
    for r in replies {
        match r.result {
            Ok((v, s)) => planned.push(Planned {
                done: version == Some(v.version.as_str()) && s.committed == v.slot,
                endpoint: r.node,
                name: v.node_name,
                controlplane: s.machine_type == "controlplane",
                version: v.version,
            }),
            Err(e) => unreachable.push(format!("{e:#}")),
        }
    }
    if !unreachable.is_empty() {
        bail!(
            "not every node answers, so the rollout does not start: {}",
            unreachable.join("; ")
        );
    }
    // Control planes first (stable: the order given otherwise).
    planned.sort_by_key(|p| !p.controlplane);
    Ok(planned)
}

fn print_plan(planned: &[Planned], to: &str, k: u32) {
    println!("rolling upgrade to {to}, at most {k} node(s) down at once:");
    let mut wave = 0;
    let mut in_wave = k;
    let mut cps = true;
    for p in planned {
        if p.done {
            println!("  skip     {:<24} already runs {}", p.label(), p.version);
            continue;
        }
        // Each control plane a wave of its own; the workers K to a wave (`cps`: the node
        // before was a control plane, or there was none).
        if p.controlplane || cps || in_wave == k {
            wave += 1;
            in_wave = 0;
        }
        cps = p.controlplane;
        in_wave += 1;
        println!(
            "  wave {wave:<3} {:<24} {} {} -> {to}",
            p.label(),
            if p.controlplane {
                "controlplane"
            } else {
                "worker      "
            },
            p.version
        );
    }
}

/// Runs the rollout over `target`'s nodes (`-n`, else the context's with `--all`).
pub async fn run(target: &Target, args: &UpgradeArgs, k: u32) -> anyhow::Result<()> {
    if args.stage {
        bail!("--stage does not roll out: a rolling upgrade takes each node through its trial before the next");
    }
    if k == 0 {
        bail!("--max-unavailable must be at least 1");
    }
    if up::is_url(&args.image) {
        // Its version is not known here, so a rerun could not skip the nodes already done.
        bail!("a rolling upgrade sends a bundle file (--image FILE): from a URL its version cannot be read here to skip the nodes already on it");
    }
    let nodes = if target.nodes.is_empty() {
        target.context()?.endpoints
    } else {
        target.nodes.clone()
    };
    if nodes.is_empty() {
        bail!("no nodes: the context lists no endpoints; name them with -n");
    }
    // The health gate is the cluster's, as `plinth health` sees it: the context's nodes, and
    // any other this rollout names.
    let mut cluster = target.context()?.endpoints;
    cluster.extend(
        nodes
            .iter()
            .filter(|n| !cluster.contains(n))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let gate = Target {
        nodes: cluster,
        ..target.clone()
    };
    let all = Target {
        nodes,
        ..target.clone()
    };
    let version = bundle_version(&args.image).await?;
    let planned = survey(&all, version.as_deref(), args.timeout).await?;
    let to = version.clone().unwrap_or_else(|| args.image.clone());
    print_plan(&planned, &to, k);
    if args.dry_run {
        return Ok(());
    }
    let todo: Vec<Planned> = planned.into_iter().filter(|p| !p.done).collect();
    if todo.is_empty() {
        println!("every node already runs {to}");
        return Ok(());
    }
    let stop = AtomicBool::new(false);
    let step = |p: Planned| {
        let (all, gate, stop, version) = (&all, &gate, &stop, &version);
        async move {
            if stop.load(Ordering::SeqCst) {
                return (p, None);
            }
            let r = one(&p, (all, gate), args, (k, version.as_deref())).await;
            if r.is_err() {
                stop.store(true, Ordering::SeqCst);
            }
            (p, Some(r))
        }
    };
    let (cps, workers): (Vec<Planned>, Vec<Planned>) =
        todo.into_iter().partition(|p| p.controlplane);
    let mut results = Vec::new();
    // One control plane at a time, whatever K: each is an etcd member.
    for p in cps {
        results.push(step(p).await);
    }
    results.extend(
        futures::stream::iter(workers)
            .map(step)
            .buffer_unordered(k as usize)
            .collect::<Vec<_>>()
            .await,
    );
    summarize(&results, &to)
}

fn summarize(results: &[(Planned, Option<anyhow::Result<()>>)], to: &str) -> anyhow::Result<()> {
    let names = |f: &dyn Fn(&Option<anyhow::Result<()>>) -> bool| {
        results
            .iter()
            .filter(|(_, r)| f(r))
            .map(|(p, _)| p.name.clone())
            .collect::<Vec<_>>()
    };
    let upgraded = names(&|r| matches!(r, Some(Ok(()))));
    let untouched = names(&|r| r.is_none());
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(p, r)| match r {
            Some(Err(e)) => Some(format!("{}: {e:#}", p.label())),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        println!("rollout done: {} node(s) upgraded to {to}", upgraded.len());
        return Ok(());
    }
    let mut msg = format!("rollout stopped: {}", failed.join("; "));
    if !upgraded.is_empty() {
        msg += &format!("; upgraded to {to}: {}", upgraded.join(", "));
    }
    if !untouched.is_empty() {
        msg += &format!(
            "; not started (still on their version): {}",
            untouched.join(", ")
        );
    }
    Err(anyhow!(msg))
}

/// Waits until the node runs with its slot committed: one an earlier rollout left in its
/// trial (that client was killed) is upgraded, or found done, once the trial is over.
async fn settle(p: &Planned, t: &Target, secs: u64) -> anyhow::Result<VersionResponse> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut said = false;
    loop {
        let now = async {
            let (_, mut c) = t.connect().await?;
            let v = c.version(VersionRequest {}).await?.into_inner();
            let s = c.status(StatusRequest {}).await?.into_inner();
            anyhow::Ok((v, s))
        };
        if let Ok(Ok((v, s))) = tokio::time::timeout(Duration::from_secs(10), now).await {
            if v.state == "running" && s.committed == v.slot && s.running_sequence.is_empty() {
                return Ok(v);
            }
            if !said {
                say(
                    p,
                    format!(
                        "is {} (slot {} of committed {}): waiting for it to settle",
                        v.state, v.slot, s.committed
                    ),
                );
                said = true;
            }
        }
        if Instant::now() > deadline {
            bail!("did not settle (running, its slot committed) within {secs}s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Upgrades one node: it waits for a reboot slot, is sent the bundle, reboots into its trial;
/// then the cluster must be healthy again.
async fn one(
    p: &Planned,
    (all, gate): (&Target, &Target),
    args: &UpgradeArgs,
    (k, to): (u32, Option<&str>),
) -> anyhow::Result<()> {
    let t = p.target(all);
    let v = settle(p, &t, args.timeout).await?;
    if to == Some(v.version.as_str()) {
        say(p, format!("already runs {} (committed)", v.version));
        return Ok(());
    }
    let before = v.boot_id;
    say(
        p,
        format!("waiting for a reboot slot, then sending {}", args.image),
    );
    let options = up::options(args, k);
    let reply = if up::is_url(&args.image) {
        up::send_url(&t, &args.image, options).await?
    } else {
        up::send_file(&t, Path::new(&args.image), options, false).await?
    };
    if !reply.rebooting {
        bail!(
            "wrote Plinth {} into slot {} but did not reboot into its trial (another sequence had started: `plinth status` says which)",
            reply.version,
            reply.slot
        );
    }
    say(
        p,
        format!(
            "wrote Plinth {} into slot {}; rebooting for its trial",
            reply.version, reply.slot
        ),
    );
    let s = up::wait_back(&t, &before, args.timeout).await?;
    if s.committed != reply.slot || s.slot != reply.slot {
        let why = match s.last_failure {
            Some(f) if f.slot == reply.slot => {
                format!("slot {} ({}) failed: {}", f.slot, f.version, f.reason)
            }
            _ => format!("slot {} is not committed", reply.slot),
        };
        say(p, format!("FELL BACK to slot {}: {why}", s.slot));
        bail!("fell back to slot {}: {why}", s.slot);
    }
    say(p, format!("committed Plinth {}", reply.version));
    health::wait_passing(gate, Duration::from_secs(args.timeout)).await?;
    say(p, "cluster healthy");
    Ok(())
}
