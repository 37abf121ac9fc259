//! A cluster in QEMU through OVMF, made and run the way an operator does, through the CLI:
//! `plinth cluster create --control-planes 3` (configs from `generate_cluster`, the
//! control planes with the etcd extension signed by the cluster's own key, every node on one
//! private network: QEMU's multicast socket on the host's loopback). Before bootstrap etcd
//! waits and says so; `plinth bootstrap` on cp-1; cp-2 and cp-3 join as learners and are
//! promoted; `plinth health` passes over all three; a key written with Debian's `etcdctl`
//! (through the control planes' forwarded client ports, with the etcd certificates of cp-1's
//! config) is read back after a rolling upgrade of all three (`plinth upgrade --all
//! --max-unavailable 1`, a bundle signed with the cluster's key; etcd's quorum kept); a
//! snapshot, every control plane reset (EPHEMERAL wiped), and `plinth bootstrap --recover-from`
//! brings the key back; `plinth cluster destroy` stops every VM.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{image, image_dir, machined, plinth_cli, workspace, BOOT_TIMEOUT};

const NAME: &str = "vmcluster";
const KEY: &str = "/app/greeting";
const VALUE: &str = "written before the upgrade";

fn base() -> PathBuf {
    workspace().join("target/vm-tests/cluster")
}

/// The cluster's files, where `plinth cluster create` keeps them (under the test's HOME).
fn cluster_dir() -> PathBuf {
    base().join("home/.plinth/clusters").join(NAME)
}

/// The CLI as an operator runs it: the test's HOME and client config, off the runtime.
async fn plinth(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(plinth_cli())
            .args(&args)
            .env("HOME", base().join("home"))
            .env("PLINTHCONFIG", base().join("plinthconfig"))
            .output()
            .expect("running plinth");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .expect("cli")
}

/// A node as `plinth cluster create` recorded it.
struct Node {
    name: String,
    endpoint: String,
    etcd: Option<String>,
    console: PathBuf,
    pid: u32,
}

fn recorded() -> Vec<Node> {
    let nodes = read_recorded();
    assert!(!nodes.is_empty(), "cluster.json lists no nodes");
    nodes
}

/// What `cluster.json` lists, leniently (also from `Drop`, which must not panic).
fn read_recorded() -> Vec<Node> {
    let path = cluster_dir().join("cluster.json");
    let Some(state) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return Vec::new();
    };
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_string);
    state["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| {
                    Some(Node {
                        name: text(n, "name")?,
                        endpoint: text(n, "endpoint")?,
                        etcd: text(n, "etcd"),
                        console: PathBuf::from(text(n, "console")?),
                        pid: n["pid"]
                            .as_u64()
                            .and_then(|p| u32::try_from(p).ok())
                            .unwrap_or(0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Stops the cluster however the test ends; on a failure, shows the end of every console
/// first (the files go with the cluster: four disks would fill a small CI disk).
struct Cluster;

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && cluster_dir().join("cluster.json").exists() {
            for n in read_recorded() {
                let text = std::fs::read_to_string(&n.console).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {} console, last lines:", n.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        if !cluster_dir().exists() {
            // Destroyed by the test itself.
            return;
        }
        let _ = std::process::Command::new(plinth_cli())
            .args(["cluster", "destroy", "--name", NAME])
            .env("HOME", base().join("home"))
            .status();
    }
}

/// Waits until the node's events say `needle` (its boot goes on after the API answers).
async fn wait_events(n: &Node, needle: &str) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let (_, out) = plinth(&["-e", &n.endpoint, "events"]).await;
        if out.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no event saying {needle:?}:\n{out}",
            n.name
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Debian's etcdctl through the control planes' forwarded client ports, with the etcd client
/// certificate of cp-1's config (as `plinth cluster create` wrote it).
fn etcdctl(nodes: &[Node], args: &[&str]) -> (bool, String) {
    let yaml = std::fs::read_to_string(cluster_dir().join("cp-1/node.yaml")).expect("node.yaml");
    let config = config::NodeConfig::from_yaml(&yaml).expect("cp-1's config");
    let endpoints: Vec<String> = nodes.iter().filter_map(|n| n.etcd.clone()).collect();
    assert_eq!(
        endpoints.len(),
        3,
        "every control plane's etcd is forwarded"
    );
    vm_tests::etcdctl::etcdctl(
        config.cluster.as_ref().expect("a cluster section"),
        &endpoints,
        &base(),
        args,
    )
}

/// The bundle of `image` signed with the cluster's own key (the one its nodes trust).
fn bundle_for_cluster(a: &imager::Artifacts) -> PathBuf {
    let pem = std::fs::read_to_string(cluster_dir().join("signing.key")).expect("signing.key");
    let key = upgrade::bundle::key_from_pem(&pem).expect("the cluster's key");
    let bytes = imager::bundle_release(a, &key, 0, None, &[]).expect("bundle");
    let path = base().join("next.plinth");
    std::fs::write(&path, bytes).expect("write bundle");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_made_with_the_cli_forms_etcd_survives_a_rolling_upgrade_and_recovers() {
    let _ = std::fs::remove_dir_all(base());
    std::fs::create_dir_all(base().join("home")).expect("mkdir");
    // Built before the VMs start: both take the CPU.
    common::artifacts();
    let next = image("cluster-next", "0.2.0-cluster", &[]);

    let started = Instant::now();
    let _cluster = Cluster;
    let image_dir = image_dir().display().to_string();
    let machined = machined().display().to_string();
    let (ok, out) = plinth(&[
        "cluster",
        "create",
        "--name",
        NAME,
        "--control-planes",
        "3",
        "--image-dir",
        &image_dir,
        "--machined",
        &machined,
        "--wait",
        &BOOT_TIMEOUT.as_secs().to_string(),
    ])
    .await;
    assert!(ok, "cluster create:\n{out}");
    assert!(out.contains("made it current"), "{out}");
    eprintln!("three nodes up after {:?}", started.elapsed());
    let nodes = recorded();
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["cp-1", "cp-2", "cp-3"]);
    let cps = &nodes[..];
    let all: Vec<&str> = nodes.iter().map(|n| n.endpoint.as_str()).collect();
    let all = all.join(",");
    let ep1 = cps[0].endpoint.clone();

    // Before bootstrap every control plane waits, and says what to do.
    for n in cps {
        wait_events(n, "run `plinth bootstrap`").await;
    }
    let (ok, out) = plinth(&["-e", &ep1, "bootstrap"]).await;
    assert!(ok, "{out}");
    let joined = Instant::now();
    // Over the context's nodes: all three.
    let (ok, out) = plinth(&["health", "--wait-timeout", "600s"]).await;
    assert!(ok, "the cluster never became healthy:\n{out}");
    eprintln!("bootstrap to a healthy cluster: {:?}", joined.elapsed());
    for n in &cps[1..] {
        wait_events(n, "as learner").await;
        wait_events(n, "promoted to a voting member").await;
    }
    let (ok, out) = etcdctl(&nodes, &["put", KEY, VALUE]);
    assert!(ok, "{out}");

    // A rolling upgrade of the whole cluster, one node at a time: etcd keeps its quorum and
    // the key stays. (Workers, and waves of K > 1, are the simulated fleet's to prove: under
    // TCG every VM running costs the others CPU, and each node's upgrade costs CI minutes.)
    let phase = Instant::now();
    let bundle = bundle_for_cluster(&next).display().to_string();
    let (ok, out) = plinth(&[
        "upgrade",
        "--all",
        "--image",
        &bundle,
        "--max-unavailable",
        "1",
    ])
    .await;
    assert!(ok, "rolling upgrade:\n{out}");
    eprintln!(
        "rolling upgrade of the control planes: {:?}",
        phase.elapsed()
    );
    for n in &nodes {
        let (ok, out) = plinth(&["-e", &n.endpoint, "version"]).await;
        assert!(ok && out.contains("0.2.0-cluster"), "{}: {out}", n.name);
    }
    let (ok, out) = plinth(&["-n", &all, "version"]).await;
    assert!(ok, "version over all three:\n{out}");
    let (ok, out) = etcdctl(&nodes, &["get", KEY, "--print-value-only"]);
    assert!(ok && out.trim() == VALUE, "{out}");
    let (ok, out) = etcdctl(&nodes, &["endpoint", "health"]);
    assert!(ok, "{out}");

    // A snapshot; then every control plane reset (no graceful leave: the last member could
    // not), so no etcd data is left; the snapshot brings the key back.
    let snapshot = base().join("etcd.snapshot").display().to_string();
    let phase = Instant::now();
    let (ok, out) = plinth(&["-e", &ep1, "etcd", "snapshot", &snapshot]).await;
    assert!(ok, "{out}");
    let (ok, out) = plinth(&[
        "-n",
        &all,
        "reset",
        "--graceful=false",
        "--reboot",
        "--wipe",
        "EPHEMERAL",
    ])
    .await;
    assert!(ok, "{out}");
    // Back, each waiting for a bootstrap again (its etcd data went with EPHEMERAL).
    for n in cps {
        wait_events(n, "run `plinth bootstrap`").await;
    }
    let (ok, out) = plinth(&["-e", &ep1, "bootstrap", "--recover-from", &snapshot]).await;
    assert!(ok, "{out}");
    let (ok, out) = plinth(&["health", "--wait-timeout", "600s"]).await;
    assert!(ok, "never healthy after the recovery:\n{out}");
    let (ok, out) = etcdctl(&nodes, &["get", KEY, "--print-value-only"]);
    assert!(ok && out.trim() == VALUE, "{out}");
    eprintln!(
        "snapshot, reset of the control planes, recovery: {:?}",
        phase.elapsed()
    );

    // Every VM stops with the cluster.
    let pids: Vec<u32> = recorded().iter().map(|n| n.pid).collect();
    assert!(pids.iter().all(|&p| p > 0), "{pids:?}");
    let sockets: Vec<PathBuf> = recorded()
        .iter()
        .map(|n| provision::qemu::socket_dir(&cluster_dir().join(&n.name).join("vm")))
        .collect();
    assert!(sockets.iter().all(|s| s.is_dir()), "{sockets:?}");
    let (ok, out) = plinth(&["cluster", "destroy", "--name", NAME]).await;
    assert!(ok && out.contains("3 node(s)"), "{out}");
    for pid in pids {
        assert!(
            !provision::qemu::process_runs(pid),
            "QEMU {pid} outlived cluster destroy"
        );
    }
    // Nothing of the cluster is left, its VMs' socket directories included.
    assert!(!cluster_dir().exists());
    for s in sockets {
        assert!(!s.exists(), "{} outlived cluster destroy", s.display());
    }
    eprintln!("whole test: {:?}", started.elapsed());
}
