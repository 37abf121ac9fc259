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
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?} is not a duration (90s, 5m, 1h)")),
    };
    Ok(Duration::from_secs(secs))
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
    // Every node of the context unless -n names some.
    let mut all = target.clone();
    if all.nodes.is_empty() {
        all.nodes = target.context()?.endpoints;
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
                    None => println!("SKIP  {}: no control plane among the nodes", c.what),
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

    let cps: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.status.machine_type == "controlplane")
        .collect();
    let members = members(all, &cps).await;
    checks.push(Check {
        what: "etcd members match the control planes",
        outcome: (!cps.is_empty()).then(|| {
            let members = members.as_ref().map_err(|e| e.clone())?;
            let want: BTreeSet<&str> = cps.iter().map(|n| n.name.as_str()).collect();
            let have: BTreeSet<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
            let learners: Vec<&str> = members
                .iter()
                .filter(|(_, learner)| *learner)
                .map(|(n, _)| n.as_str())
                .collect();
            let mut why = Vec::new();
            let missing: Vec<&str> = want.difference(&have).copied().collect();
            if !missing.is_empty() {
                why.push(format!("not members: {}", missing.join(", ")));
            }
            let extra: Vec<&str> = have.difference(&want).copied().collect();
            if !extra.is_empty() {
                why.push(format!(
                    "members that are not answering control planes: {}",
                    extra.join(", ")
                ));
            }
            if !learners.is_empty() {
                why.push(format!("still learners: {}", learners.join(", ")));
            }
            if why.is_empty() {
                Ok(want.into_iter().collect::<Vec<_>>().join(", "))
            } else {
                Err(why.join("; "))
            }
        }),
    });
    checks.push(Check {
        what: "etcd is healthy",
        outcome: (!cps.is_empty()).then(|| {
            let sick: Vec<&str> = cps
                .iter()
                .filter(|n| !n.etcd_healthy)
                .map(|n| n.name.as_str())
                .collect();
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

/// The etcd members (name, learner) as the first answering control plane lists them.
async fn members(all: &Target, cps: &[&Node]) -> Result<Vec<(String, bool)>, String> {
    let ctx = all.context().map_err(|e| e.to_string())?;
    let mut last = String::from("no control plane answered");
    for n in cps {
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
