//! etcd on simulated control planes, each running Debian's etcd as the machined service
//! `etcd` (the simulated machine's `/usr/local/bin/etcd`, from its `usr-local` directory, is
//! the host's, standing in for the etcd extension): before bootstrap they wait and say so; `plinth bootstrap` on one starts
//! the cluster and is refused on a worker, a second time, and on a node that joined; the
//! others join as learners and are promoted; the members and the quorum are seen through
//! the API and the CLI; and a rebooted control plane restarts its member from its data.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::proto::{BootstrapRequest, EtcdMembersRequest, ServiceListRequest};
use common::cluster::{SimCluster, Spec};
use sequencer::EventKind;

/// Runs the CLI: (succeeded, its stdout and stderr together).
fn plinth(cluster: &SimCluster, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = cluster.plinth(args);
    (ok, format!("{out}{err}"))
}

fn etcd_lines(node: &common::SimNode) -> String {
    node.console()
        .lines()
        .filter(|l| l.contains("etcd") && !l.starts_with("plinth-trace"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The end of the etcd service's log, wherever the simulated EPHEMERAL keeps it.
fn etcd_log(node: &common::SimNode) -> String {
    fn find(dir: &Path) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == "etcd.log") {
                return Some(p);
            }
        }
        None
    }
    let text = find(&node.machine())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| "(no etcd.log)".into());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn etcd_healthy(node: &common::SimNode) -> bool {
    let mut c = node.client().await;
    c.service_list(ServiceListRequest {})
        .await
        .map(|r| r.into_inner().services)
        .unwrap_or_default()
        .iter()
        .any(|s| s.name == "etcd" && s.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_wait_one_is_bootstrapped_and_the_others_join_and_are_promoted() {
    let cluster = SimCluster::start(Spec {
        name: "simetcd",
        controlplanes: 3,
        workers: 1,
        etcd: true,
        services: vec![],
        tweak: common::cluster::as_generated(),
    });
    for n in &cluster.nodes {
        n.version_after(None).await;
    }
    let (cp1, worker) = (&cluster.nodes[0], &cluster.nodes[3]);

    // Before bootstrap every control plane waits, and says what to do.
    for n in &cluster.nodes[..3] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = n.events().await.iter().any(|e| {
                matches!(&e.kind, EventKind::Service { service, state, message }
                    if service == "etcd" && state == "waiting" && message.contains("plinth bootstrap"))
            });
            if waiting {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no waiting event:\n{}",
                n.console()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!etcd_healthy(n).await);
    }

    // A worker runs no etcd.
    let err = worker
        .client()
        .await
        .bootstrap(BootstrapRequest::default())
        .await
        .expect_err("a worker");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

    // The CLI bootstraps cp-1; a second time is refused.
    let (ok, out) = plinth(&cluster, &["-e", &cp1.endpoint, "bootstrap"]);
    assert!(ok, "{out}");
    let err = cp1
        .client()
        .await
        .bootstrap(BootstrapRequest::default())
        .await
        .expect_err("twice");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // cp-2 and cp-3 join as learners and are promoted; every etcd is healthy (a quorum read).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let reply = cp1
            .client()
            .await
            .etcd_members(EtcdMembersRequest {})
            .await
            .map(|r| r.into_inner().members);
        let members = match &reply {
            Ok(m) => m.clone(),
            Err(e) => {
                eprintln!("members: {e:?}");
                Vec::new()
            }
        };
        let mut names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        let voting = members.iter().all(|m| !m.learner);
        let mut healthy = true;
        for n in &cluster.nodes[..3] {
            healthy &= etcd_healthy(n).await;
        }
        if names == ["cp-1", "cp-2", "cp-3"] && voting && healthy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members {reply:?}, all healthy {healthy}\ncp-2's etcd lines:\n{}\nits etcd log:\n{}",
            etcd_lines(&cluster.nodes[1]),
            etcd_log(&cluster.nodes[1])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in &cluster.nodes[1..3] {
        let events = n.events().await;
        assert!(
            events.iter().any(
                |e| matches!(&e.kind, EventKind::Service { service, state, .. }
                if service == "etcd" && state == "joining")
            ),
            "no join event"
        );
    }
    // A node that joined is not bootstrapped again.
    let err = cluster.nodes[1]
        .client()
        .await
        .bootstrap(BootstrapRequest::default())
        .await
        .expect_err("joined");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // plinth health, over the context's four nodes: every check passes.
    let (ok, out) = plinth(&cluster, &["health"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS")).count(),
        5,
        "{out}"
    );
    assert!(out.contains("cp-1, cp-2, cp-3"), "{out}");

    // A key written through the cluster survives a control plane's reboot, which restarts its
    // member from its data (no join, no bootstrap) and leaves three voting members.
    // A worker's etcd client certificate.
    let worker_cluster = cluster.generated.nodes[3].cluster.clone().expect("cluster");
    let creds = etcd::Credentials::of(&worker_cluster);
    let etcd = etcd::Etcd::connect(&etcd::Etcd::endpoints_of(&worker_cluster), &creds)
        .await
        .expect("etcd");
    etcd.put("/plinth/test", "before the reboot")
        .await
        .expect("put");
    let cp2 = &cluster.nodes[1];
    let before = cp2.version_after(None).await.boot_id;
    cp2.client()
        .await
        .reboot(api::proto::RebootRequest::default())
        .await
        .expect("reboot");
    cp2.version_after(Some(&before)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !etcd_healthy(cp2).await {
        assert!(Instant::now() < deadline, "{}", etcd_lines(cp2));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Its second boot found its data: it neither waited nor joined again.
    let lines = etcd_lines(cp2);
    assert_eq!(lines.matches("no etcd data here").count(), 1, "{lines}");
    assert!(!lines.contains("removing the stale"), "{lines}");
    let members = etcd.members().await.expect("members");
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| !m.learner), "{members:?}");
    assert_eq!(
        etcd.get("/plinth/test").await.expect("get").as_deref(),
        Some("before the reboot")
    );

    // The worker sees the members too (a client of the cluster), through the CLI.
    let (ok, out) = plinth(&cluster, &["-e", &worker.endpoint, "etcd", "members"]);
    assert!(ok, "{out}");
    for name in ["cp-1", "cp-2", "cp-3"] {
        assert!(out.contains(name), "{out}");
    }

    // A control plane lost (powered off): health says which node and which member, and fails
    // after waiting for as long as it was told.
    let mut cluster = cluster;
    let lost = cluster.nodes.remove(2);
    let lost_endpoint = lost.endpoint.clone();
    drop(lost);
    let started = Instant::now();
    let (ok, out) = plinth(&cluster, &["health", "--wait-timeout", "3s"]);
    assert!(!ok, "{out}");
    assert!(started.elapsed() >= Duration::from_secs(3), "did not wait");
    let line = |what: &str| {
        out.lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
            .to_string()
    };
    let answers = line("every node answers");
    assert!(
        answers.starts_with("FAIL") && answers.contains(&lost_endpoint),
        "{out}"
    );
    let etcd_line = line("etcd is healthy");
    assert!(
        etcd_line.starts_with("FAIL") && etcd_line.contains("cp-3 (did not answer)"),
        "{out}"
    );
    assert!(
        line("booted its committed slot").starts_with("PASS"),
        "{out}"
    );

    // Members removed by id: not this node's own, not an unknown one, not one that answers;
    // the lost one, through the CLI.
    let cp1 = &cluster.nodes[0];
    let members = cp1
        .client()
        .await
        .etcd_members(EtcdMembersRequest {})
        .await
        .expect("members")
        .into_inner()
        .members;
    let id = |name: &str| {
        members
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.id)
            .expect("listed")
    };
    let mut c = cp1.client().await;
    for (id, code) in [
        (id("cp-1"), tonic::Code::FailedPrecondition),
        (id("cp-2"), tonic::Code::FailedPrecondition),
        (7, tonic::Code::NotFound),
    ] {
        let err = c
            .etcd_remove_member(api::proto::EtcdRemoveMemberRequest { id })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{id:x}: {err:?}");
    }
    let (ok, out) = plinth(
        &cluster,
        &[
            "-e",
            &cp1.endpoint,
            "etcd",
            "remove-member",
            &format!("{:x}", id("cp-3")),
        ],
    );
    assert!(ok, "{out}");
    // The cluster's config still names three control planes: health says which is missing.
    let rest: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint.clone()).collect();
    let (ok, out) = plinth(&cluster, &["-n", &rest.join(","), "health"]);
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("not members: cp-3")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("PASS") && l.contains("every node answers")),
        "{out}"
    );

    // A graceful reset of cp-2 leaves the cluster first: cp-1 is its only member.
    cluster.nodes[1]
        .client()
        .await
        .reset(api::proto::ResetRequest {
            graceful: true,
            ..Default::default()
        })
        .await
        .expect("reset");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let names: Vec<String> = cp1
            .client()
            .await
            .etcd_members(EtcdMembersRequest {})
            .await
            .map(|r| r.into_inner().members.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        if names == ["cp-1"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members {names:?}\ncp-2:\n{}",
            etcd_lines(&cluster.nodes[1])
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcd_healthy(cp1).await {
        assert!(Instant::now() < deadline, "{}", etcd_lines(cp1));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The last member cannot leave: etcd's refusal, with its code.
    let err = cp1
        .client()
        .await
        .etcd_leave(api::proto::EtcdLeaveRequest {})
        .await
        .expect_err("the last member");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(etcd_healthy(cp1).await);
}
