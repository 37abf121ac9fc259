//! A simulated fleet: 3 control planes (Debian's etcd, one member each) and 17 workers,
//! upgraded by rolling upgrades through the `plinth` CLI with `--max-unavailable 3`. How many
//! nodes held a reboot slot at once is counted from every node's own events (each node says
//! when it holds its slot and when it lets go; a node is down only inside that span):
//!
//! - two operators rolling out to disjoint halves of the fleet at once stay within 3 together;
//! - a worker whose trial fails stops the rollout, named with its reason, the nodes after it
//!   still on the old version;
//! - a rollout whose client is killed half-way is resumed by running it again, which finishes
//!   the fleet, and the bound held throughout;
//! - a rolling reboot, a rolling rollback (`-n … --max-unavailable 1`) and a config applied
//!   with a coordinated reboot each take their slots one node at a time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::proto::EventsRequest;
use common::cluster::{plinth_cli, SimCluster, Spec};
use common::sim_bundle;
use config::HealthCheck;
use sequencer::EventKind;

/// A node's reboot-slot events: (unix ms, state).
type SlotEvents = Vec<(u64, String)>;

/// Each node's reboot-slot events, as they happen.
#[derive(Default, Clone)]
struct Watch(Arc<Mutex<BTreeMap<String, SlotEvents>>>);

impl Watch {
    /// Follows every node's events (again after each reboot: a new boot replays its own).
    fn start(cluster: &SimCluster) -> Watch {
        let w = Watch::default();
        for (n, cfg) in cluster.nodes.iter().zip(&cluster.generated.nodes) {
            let (endpoint, ctx, name) =
                (n.endpoint.clone(), n.ctx.clone(), cfg.machine.name.clone());
            let w = w.clone();
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                loop {
                    if let Ok(mut c) = api::client::connect_context(&endpoint, &ctx).await {
                        let req = EventsRequest {
                            since_id: Some(0),
                            follow: true,
                            ..Default::default()
                        };
                        if let Ok(s) = c.events(req).await {
                            let mut s = s.into_inner();
                            while let Ok(Some(e)) = s.message().await {
                                let Some(e) = api::convert::from_proto(&e) else {
                                    continue;
                                };
                                if let EventKind::Cluster { state, message, .. } = e.kind {
                                    if seen.insert((e.unix_ms, state.clone(), message)) {
                                        let mut map = w.0.lock().expect("watch");
                                        map.entry(name.clone())
                                            .or_default()
                                            .push((e.unix_ms, state));
                                    }
                                }
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        w
    }

    /// The most nodes that held a slot at one moment, and how many times a node had to wait.
    fn most_held(&self) -> (usize, usize) {
        self.most_held_since(0)
    }

    /// [`Watch::most_held`], counting only events since `since` (unix ms).
    fn most_held_since(&self, since: u64) -> (usize, usize) {
        let mut map = self.0.lock().expect("watch").clone();
        for events in map.values_mut() {
            events.retain(|(ms, _)| *ms >= since);
        }
        let mut points: Vec<(u64, i32)> = Vec::new();
        let mut waits = 0;
        for events in map.values() {
            let mut events = events.clone();
            events.sort();
            let mut open = None;
            for (ms, state) in events {
                match state.as_str() {
                    "held" => open = Some(ms),
                    "released" => {
                        if let Some(start) = open.take() {
                            points.push((start, 1));
                            points.push((ms, -1));
                        }
                    }
                    "waiting" => waits += 1,
                    _ => {}
                }
            }
            if let Some(start) = open {
                points.push((start, 1));
            }
        }
        // A release and a hold at the same millisecond: the release first.
        points.sort();
        let (mut now, mut most) = (0i32, 0i32);
        for (_, d) in points {
            now += d;
            most = most.max(now);
        }
        (most as usize, waits)
    }

    /// Nodes that said they released a slot since `since` (unix ms).
    fn released_since(&self, since: u64) -> usize {
        let map = self.0.lock().expect("watch");
        map.values()
            .filter(|ev| ev.iter().any(|(ms, s)| *ms >= since && s == "released"))
            .count()
    }

    /// Nodes that said they hold a slot since `since` (unix ms).
    fn held_since(&self, since: u64) -> usize {
        let map = self.0.lock().expect("watch");
        map.values()
            .filter(|ev| ev.iter().any(|(ms, s)| *ms >= since && s == "held"))
            .count()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Each node's (name, version, committed and running the same slot, last failure's version).
/// Every node's console lines that say why a boot ended early (a fatal error, a failed
/// boot), for a failure's message.
async fn fatal(cluster: &SimCluster) -> String {
    let lines: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| {
            n.console()
                .lines()
                .filter(|l| l.contains("fatal") || l.contains("boot failed"))
                .map(|l| format!("{}: {l}", n.endpoint))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = format!(
        "\nboots ended early, on the nodes' consoles:\n{}",
        lines.join("\n")
    );
    // A trial that stopped with no reason of its own ("stopped after ..."): what its console
    // said around it (the consoles go with the test's temporary directory).
    for n in &cluster.nodes {
        if n.status().await.last_failure.is_some() {
            let console = n.console();
            let tail: Vec<&str> = console.lines().rev().take(80).collect();
            out += &format!("\n\nthe last lines of {}'s console:\n", n.endpoint);
            out += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
    }
    out
}

async fn versions(cluster: &SimCluster) -> BTreeMap<String, (String, bool, String)> {
    let mut out = BTreeMap::new();
    for n in &cluster.nodes {
        let v = n.version_after(None).await;
        let s = n.status().await;
        out.insert(
            v.node_name,
            (
                v.version,
                s.committed == s.slot,
                s.last_failure.map(|f| f.version).unwrap_or_default(),
            ),
        );
    }
    out
}

fn upgrade_args<'a>(nodes: &'a str, bundle: &'a str) -> Vec<&'a str> {
    let mut args = if nodes.is_empty() {
        vec!["upgrade", "--all"]
    } else {
        vec!["-n", nodes, "upgrade"]
    };
    args.extend([
        "--image",
        bundle,
        "--max-unavailable",
        "3",
        "--timeout",
        "120",
    ]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_upgrades_of_twenty_nodes_keep_within_k_and_stop_at_a_failed_trial() {
    // worker-2's trial gate: a TCP port this test listens on, or not.
    let gate = std::net::TcpListener::bind("127.0.0.1:0").expect("gate");
    let gate_addr = gate.local_addr().expect("addr").to_string();
    let cluster = SimCluster::start(Spec {
        name: "fleet",
        controlplanes: 3,
        workers: 17,
        etcd: true,
        services: vec![],
        tweak: Box::new({
            let gate_addr = gate_addr.clone();
            move |n| {
                if n.machine.name == "worker-2" {
                    n.machine.upgrade.trial_timeout_s = 3;
                    n.machine.upgrade.health_checks = vec![HealthCheck::Tcp(gate_addr.clone())];
                }
            }
        }),
    });
    for n in &cluster.nodes {
        n.version_after(None).await;
    }
    let (ok, out, err) = cluster.plinth(&["-e", &cluster.nodes[0].endpoint, "bootstrap"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cluster.plinth(&["health", "--wait-timeout", "180s"]);
    assert!(ok, "the fleet never became healthy:\n{out}{err}");
    let watch = Watch::start(&cluster);

    let dir = tempfile::tempdir().expect("tmp");
    let (v2, v3) = (dir.path().join("v2.plinth"), dir.path().join("v3.plinth"));
    std::fs::write(&v2, sim_bundle("2.0-fleet", &[])).expect("v2");
    std::fs::write(&v3, sim_bundle("3.0-fleet", &[])).expect("v3");
    let (v2, v3) = (v2.display().to_string(), v3.display().to_string());

    // The plan, changing nothing.
    let (ok, out, err) = cluster.plinth(&[
        "upgrade",
        "--all",
        "--image",
        &v2,
        "--max-unavailable",
        "3",
        "--dry-run",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("wave 1   cp-1")
            && out.contains("wave 4   worker-1")
            && out.contains("wave 9   worker-16"),
        "{out}"
    );
    assert!(versions(&cluster)
        .await
        .values()
        .all(|(v, ..)| v == "1.0-sim"));

    // Two operators at once, each on half the fleet with K=3: 3 down at most, together.
    let endpoints: Vec<&str> = cluster.nodes.iter().map(|n| n.endpoint.as_str()).collect();
    let (first, second) = (endpoints[..11].join(","), endpoints[11..].join(","));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| cluster.plinth(&upgrade_args(&first, &v2)));
        let b = s.spawn(|| cluster.plinth(&upgrade_args(&second, &v2)));
        (a.join().expect("a"), b.join().expect("b"))
    });
    if !(a.0 && b.0) {
        let consoles = fatal(&cluster).await;
        assert!(a.0, "first rollout:\n{}{}{consoles}", a.1, a.2);
        assert!(b.0, "second rollout:\n{}{}{consoles}", b.1, b.2);
    }
    assert!(a.2.contains("committed Plinth 2.0-fleet"), "{}", a.2);
    let now = versions(&cluster).await;
    assert!(
        now.values()
            .all(|(v, committed, _)| v == "2.0-fleet" && *committed),
        "{now:?}"
    );
    let (most, waits) = watch.most_held();
    assert_eq!(
        most, 3,
        "two rollouts with K=3 together held {most} slots at once"
    );
    assert!(
        waits > 0,
        "with 20 nodes wanting 3 slots some must have waited"
    );

    // worker-2's trial fails (its gate is closed now): the rollout stops there, saying why,
    // and the workers after it are not touched.
    drop(gate);
    let (ok, out, err) = cluster.plinth(&upgrade_args("", &v3));
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("rollout stopped: worker-2") && err.contains("health gates"),
        "{err}"
    );
    let now = versions(&cluster).await;
    assert_eq!(
        now["worker-2"],
        ("2.0-fleet".into(), true, "3.0-fleet".into())
    );
    for late in 10..=17 {
        assert_eq!(now[&format!("worker-{late}")].0, "2.0-fleet", "{now:?}");
    }
    assert!(now["cp-3"].0 == "3.0-fleet", "{now:?}");
    let (most, _) = watch.most_held();
    assert!(most <= 3, "{most} slots held at once");

    // Healthy again, a rollout to 3.0 whose client is killed once nodes are under way...
    let gate = std::net::TcpListener::bind(&gate_addr).expect("gate again");
    let started = unix_ms();
    let mut killed = Command::new(plinth_cli())
        .env("PLINTHCONFIG", cluster.client_config())
        .args(upgrade_args("", &v3))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("plinth");
    let deadline = Instant::now() + Duration::from_secs(120);
    while watch.held_since(started) < 2 {
        assert!(Instant::now() < deadline, "the rollout never got under way");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    killed.kill().expect("kill");
    let _ = killed.wait();
    // ... is finished by running it again: the nodes it had started finish on their own.
    let (ok, out, err) = cluster.plinth(&upgrade_args("", &v3));
    assert!(ok, "{out}{err}");
    let now = versions(&cluster).await;
    assert!(
        now.values()
            .all(|(v, committed, _)| v == "3.0-fleet" && *committed),
        "{now:?}"
    );
    let (most, _) = watch.most_held();
    assert!(most <= 3, "{most} slots held at once");

    // A rolling reboot: four workers asked at once with K=1 (`-n`), each answers at once and
    // reboots when its turn comes, one at a time; --wait follows each back.
    let since = unix_ms();
    let mut before = Vec::new();
    for n in &cluster.nodes[3..7] {
        before.push(n.version_after(None).await.boot_id);
    }
    let four: Vec<&str> = cluster.nodes[3..7]
        .iter()
        .map(|n| n.endpoint.as_str())
        .collect();
    let (ok, out, err) = cluster.plinth(&[
        "-n",
        &four.join(","),
        "reboot",
        "--max-unavailable",
        "1",
        "--wait",
        "--timeout",
        "120",
    ]);
    assert!(ok, "{out}{err}");
    for ep in &four {
        assert!(
            out.lines().any(|l| l.starts_with(ep) && l.ends_with('s')),
            "{out}"
        );
    }
    for (n, b) in cluster.nodes[3..7].iter().zip(&before) {
        n.version_after(Some(b)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (most, waits) = watch.most_held_since(since);
        let released = watch.released_since(since);
        if released == 4 {
            assert_eq!(most, 1, "coordinated reboots with K=1 overlapped");
            assert!(waits > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{released} of 4 reboots released their slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A rolling rollback of the same four: each answers once queued, and goes back to 2.0
    // when its turn comes, one at a time.
    let since = unix_ms();
    let (ok, out, err) =
        cluster.plinth(&["-n", &four.join(","), "rollback", "--max-unavailable", "1"]);
    assert!(ok, "{out}{err}");
    wait_released(&watch, since, 4, "rollbacks").await;
    let now = versions(&cluster).await;
    for w in 1..=4 {
        assert_eq!(now[&format!("worker-{w}")].0, "2.0-fleet", "{now:?}");
    }
    assert_eq!(now["worker-5"].0, "3.0-fleet", "{now:?}");

    // A config applied with a reboot that waits for its slot.
    let worker5 = &cluster.nodes[7];
    let before = worker5.version_after(None).await.boot_id;
    let file = dir.path().join("worker-5.yaml");
    std::fs::write(&file, cluster.generated.nodes[7].to_yaml().expect("yaml")).expect("write");
    let since = unix_ms();
    let (ok, out, err) = cluster.plinth(&[
        "-e",
        &worker5.endpoint,
        "apply-config",
        "-f",
        &file.display().to_string(),
        "--mode",
        "reboot",
        "--max-unavailable",
        "1",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("queued for a reboot slot"), "{out}");
    worker5.version_after(Some(&before)).await;
    wait_released(&watch, since, 1, "the apply-config reboot").await;
    drop(gate);
}

/// Waits until `n` nodes said they released their reboot slot since `since`, having held
/// one at a time.
async fn wait_released(watch: &Watch, since: u64, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let released = watch.released_since(since);
        if released == n {
            let (most, _) = watch.most_held_since(since);
            assert_eq!(most, 1, "{what} with K=1 overlapped");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{released} of {n} {what} released their slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_node_outside_a_cluster_refuses_coordinated_reboots_upgrades_rollbacks_and_configs() {
    let node = common::start(vec![], &[]);
    let v = node.version_after(None).await;
    let err = node
        .client()
        .await
        .reboot(api::proto::RebootRequest { max_unavailable: 1 })
        .await
        .expect_err("no cluster");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not in a cluster"), "{err:?}");
    let err = node
        .upgrade_with(
            &sim_bundle("2.0-alone", &[]),
            api::proto::UpgradeOptions {
                max_unavailable: 1,
                ..Default::default()
            },
        )
        .await
        .expect_err("no cluster");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(node.version_after(None).await.boot_id, v.boot_id);
    // A config applied with a coordinated reboot: refused before anything is written.
    let mut renamed = node.config_on_state().expect("config");
    let name = renamed.machine.name.clone();
    renamed.machine.name = "renamed".into();
    let apply = |mode: api::proto::ApplyMode| api::proto::ApplyConfigurationRequest {
        data: renamed.to_yaml().expect("yaml"),
        mode: mode as i32,
        max_unavailable: 1,
        ..Default::default()
    };
    let mut c = node.client().await;
    let err = c
        .apply_configuration(apply(api::proto::ApplyMode::Reboot))
        .await
        .expect_err("no cluster");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = c
        .apply_configuration(apply(api::proto::ApplyMode::NoReboot))
        .await
        .expect_err("no reboot to coordinate");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("mode reboot"), "{err:?}");
    assert_eq!(node.config_on_state().expect("config").machine.name, name);
    assert_eq!(node.version_after(None).await.boot_id, v.boot_id);
    let s = node.status().await;
    assert!(
        s.slots.iter().all(|x| x.slot == "A" || x.state == "empty"),
        "{:?}",
        s.slots
    );
    // A coordinated rollback too, once there is a good slot to go back to.
    node.upgrade(&sim_bundle("2.0-alone", &[]), false)
        .await
        .expect("a plain upgrade");
    node.running_on("B", &v.boot_id).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.status().await.committed != "B" {
        assert!(Instant::now() < deadline, "B never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_b = node.version_after(None).await.boot_id;
    let err = node
        .client()
        .await
        .rollback(api::proto::RollbackRequest { max_unavailable: 1 })
        .await
        .expect_err("no cluster");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not in a cluster"), "{err:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = node.version_after(None).await;
    assert_eq!((now.slot.as_str(), now.boot_id), ("B", on_b));
}
