//! `plinth health`: cluster-wide checks, in order, each a line that passes or fails with the
//! reason; with `--wait-timeout`, checked again until all pass or the time is up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use api::proto::{
    EtcdMembersRequest, ServiceListRequest, StatusRequest, StatusResponse, VersionRequest,
};

use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Wait until every check passes, up to this long (90s, 5m, 1h); without it the checks
    /// run once.
    #[arg(long, value_parser = parse_duration)]
    wait_timeout: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (90s, 5m, 1h)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?} is not a duration (90s, 5m, 1h)")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// What one node said.
struct Node {
    endpoint: String,
    name: String,
    status: StatusResponse,
    unhealthy: Vec<String>,
    etcd_healthy: bool,
}

/// One check's result.
struct Check {
    what: &'static str,
    /// `None` when it does not apply (no control plane among the nodes).
    outcome: Option<Result<String, String>>,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    // The nodes -n names, else -e's, else every node of the context.
    let mut all = target.clone();
    if all.nodes.is_empty() {
        all.nodes = if target.endpoints.is_empty() {
            target.context()?.endpoints
        } else {
            target.endpoints.clone()
        };
    }
    if all.nodes.is_empty() {
        bail!("no nodes: the context lists no endpoints; name them with -n");
    }
    let deadline = args.wait_timeout.map(|t| Instant::now() + t);
    loop {
        let checks = check(&all).await?;
        let passed = checks.iter().all(|c| !matches!(c.outcome, Some(Err(_))));
        let last = deadline.is_none_or(|d| Instant::now() >= d);
        if passed || last {
            for c in &checks {
                match &c.outcome {
                    Some(Ok(detail)) => println!("PASS  {}: {detail}", c.what),
                    Some(Err(why)) => println!("FAIL  {}: {why}", c.what),
                    None => println!("SKIP  {}: the nodes belong to no cluster", c.what),
                }
            }
            if passed {
                return Ok(());
            }
            let failed = checks
                .iter()
                .filter(|c| matches!(c.outcome, Some(Err(_))))
                .count();
            return Err(anyhow!("{failed} of {} checks failed", checks.len()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs the checks over `all`'s nodes until they pass; after `timeout`, fails with the checks
/// that did not (a rolling upgrade's gate between nodes).
pub async fn wait_passing(all: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let checks = check(all).await?;
        let failed: Vec<String> = checks
            .iter()
            .filter_map(|c| match &c.outcome {
                Some(Err(why)) => Some(format!("{}: {why}", c.what)),
                _ => None,
            })
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "cluster health did not pass within {}s: {}",
                timeout.as_secs(),
                failed.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn check(all: &Target) -> anyhow::Result<Vec<Check>> {
    let replies = all
        .each(|endpoint, mut c| async move {
            let e = |s| status_error(&endpoint, s);
            let name = c
                .version(VersionRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .node_name;
            let status = c.status(StatusRequest {}).await.map_err(e)?.into_inner();
            let services = c
                .service_list(ServiceListRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .services;
            Ok(Node {
                endpoint: endpoint.clone(),
                name,
                unhealthy: services
                    .iter()
                    .filter(|s| !s.healthy)
                    .map(|s| format!("{} ({})", s.name, s.state))
                    .collect(),
                etcd_healthy: services.iter().any(|s| s.name == "etcd" && s.healthy),
                status,
            })
        })
        .await?;
    let total = replies.len();
    let mut nodes = Vec::new();
    let mut down = Vec::new();
    for r in replies {
        match r.result {
            Ok(n) => nodes.push(n),
            Err(e) => down.push(format!("{e:#}")),
        }
    }
    let mut checks = vec![Check {
        what: "every node answers",
        outcome: Some(if down.is_empty() {
            Ok(format!("{total} nodes"))
        } else {
            Err(down.join("; "))
        }),
    }];

    // The control planes as the cluster's config lists them (every node carries the list),
    // not only those that answered.
    let want: BTreeSet<&str> = nodes
        .iter()
        .find(|n| !n.status.controlplanes.is_empty())
        .map(|n| n.status.controlplanes.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let cps: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.status.machine_type == "controlplane")
        .collect();
    let members = members(all, &nodes).await;
    checks.push(Check {
        what: "etcd members match the control planes",
        outcome: (!want.is_empty()).then(|| {
            let members = members.as_ref().map_err(|e| e.clone())?;
            let named: Vec<&str> = members
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !n.is_empty())
                .collect();
            let have: BTreeSet<&str> = named.iter().copied().collect();
            let learners: Vec<&str> = members
                .iter()
                .filter(|(_, learner)| *learner)
                .map(|(n, _)| {
                    if n.is_empty() {
                        "(not started)"
                    } else {
                        n.as_str()
                    }
                })
                .collect();
            let mut why = Vec::new();
            let missing: Vec<&str> = want.difference(&have).copied().collect();
            if !missing.is_empty() {
                why.push(format!("not members: {}", missing.join(", ")));
            }
            let extra: Vec<&str> = have.difference(&want).copied().collect();
            if !extra.is_empty() {
                why.push(format!(
                    "members that are not control planes: {}",
                    extra.join(", ")
                ));
            }
            if named.len() != have.len() || members.len() != named.len() {
                why.push(format!(
                    "{} members for {} control planes (duplicates or members not started)",
                    members.len(),
                    want.len()
                ));
            }
            if !learners.is_empty() {
                why.push(format!("still learners: {}", learners.join(", ")));
            }
            if why.is_empty() {
                Ok(want.iter().copied().collect::<Vec<_>>().join(", "))
            } else {
                Err(why.join("; "))
            }
        }),
    });
    checks.push(Check {
        what: "etcd is healthy",
        outcome: (!want.is_empty()).then(|| {
            if cps.is_empty() {
                return Err("no control plane answered".into());
            }
            let mut sick: Vec<String> = cps
                .iter()
                .filter(|n| !n.etcd_healthy)
                .map(|n| n.name.clone())
                .collect();
            // A control plane of the cluster that is not among the answering nodes.
            sick.extend(
                want.iter()
                    .filter(|w| !cps.iter().any(|n| n.name == **w))
                    .map(|w| format!("{w} (did not answer)")),
            );
            if sick.is_empty() {
                Ok(format!("a quorum read answers on {} members", cps.len()))
            } else {
                Err(format!("etcd not healthy on {}", sick.join(", ")))
            }
        }),
    });
    let sick: Vec<String> = nodes
        .iter()
        .filter(|n| !n.unhealthy.is_empty())
        .map(|n| format!("{}: {}", n.name, n.unhealthy.join(", ")))
        .collect();
    checks.push(Check {
        what: "every node's services are healthy",
        outcome: Some(if sick.is_empty() {
            Ok(format!("{} nodes", nodes.len()))
        } else {
            Err(sick.join("; "))
        }),
    });
    let off: Vec<String> = nodes
        .iter()
        .filter(|n| n.status.trial || n.status.slot != n.status.committed)
        .map(|n| {
            format!(
                "{} ({}) booted {}{}, committed {}",
                n.name,
                n.endpoint,
                n.status.slot,
                if n.status.trial { " on trial" } else { "" },
                n.status.committed
            )
        })
        .collect();
    checks.push(Check {
        what: "every node booted its committed slot",
        outcome: Some(if off.is_empty() {
            Ok(format!("{} nodes", nodes.len()))
        } else {
            Err(off.join("; "))
        }),
    });
    Ok(checks)
}

/// The etcd members (name, learner) as the first node that can ask lists them (a worker
/// asks as a client of the cluster).
async fn members(all: &Target, nodes: &[Node]) -> Result<Vec<(String, bool)>, String> {
    let ctx = all.context().map_err(|e| e.to_string())?;
    let mut last = String::from("no node answered");
    for n in nodes {
        let reply = async {
            let mut c = api::client::connect_context(&n.endpoint, &ctx)
                .await
                .map_err(|e| e.to_string())?;
            c.etcd_members(EtcdMembersRequest {})
                .await
                .map(|r| r.into_inner().members)
                .map_err(|s| api::client::describe_status(&s))
        }
        .await;
        match reply {
            Ok(m) => return Ok(m.into_iter().map(|m| (m.name, m.learner)).collect()),
            Err(e) => last = format!("{}: {e}", n.name),
        }
    }
    Err(last)
}
