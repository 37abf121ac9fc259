//! Three control planes in QEMU through OVMF, the way an operator runs a cluster: configs from
//! `generate_cluster` (one etcd CA, a member certificate each), every node with the signed etcd
//! extension (Debian's etcd and etcdctl) in its ESP's store, on one private network (eth1:
//! QEMU's multicast socket on the host's loopback) besides its own user network (eth0, the
//! API's way in). Before bootstrap etcd waits and says so; `plinth bootstrap` on cp-1; cp-2
//! and cp-3 join as learners and are promoted; `plinth health` passes; a key written with
//! Debian's `etcdctl` is read back after a rolling upgrade of all three (`plinth upgrade --all
//! --max-unavailable 1`, etcd's quorum kept); a snapshot, every node reset (EPHEMERAL wiped),
//! and `plinth bootstrap --recover-from` brings the key back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use common::{
    bundle, etcd_extension, plinth_output, prepared, signing_key, workspace, TestNode, BOOT_TIMEOUT,
};
use config::MachineType;
use vm_tests::node::{wait_for_version, NodeSpec, Preset};
use vm_tests::qemu::{free_port, Lan, Vm};

const KEY: &str = "/app/greeting";
const VALUE: &str = "written before the upgrade";

/// The CLI with the cluster's client config (every node in its context), off the runtime.
async fn cli(node: &TestNode, args: &[&str]) -> (bool, String) {
    let node = (*node).clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || plinth_output(&node, &args))
        .await
        .expect("cli")
}

/// Debian's etcdctl against the cluster, through each node's forwarded client port, with
/// machined's etcd client certificate.
fn etcdctl(dir: &Path, cluster: &config::Cluster, ports: &[u16], args: &[&str]) -> (bool, String) {
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    vm_tests::etcdctl::etcdctl(cluster, &endpoints, dir, args)
}

/// Waits until the node's events say `needle` (its boot goes on after the API answers).
async fn wait_events(n: &TestNode, needle: &str) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let (_, out) = cli(n, &["-e", &n.endpoint(), "events"]).await;
        if out.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no event saying {needle:?}:\n{out}",
            n.spec.name
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn boot_all(nodes: &[TestNode], vms: &mut [Vm]) {
    for (n, vm) in nodes.iter().zip(vms.iter_mut()) {
        let ctx = n.context().expect("context").clone();
        wait_for_version(vm, &n.endpoint(), &ctx, BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{} did not boot: {e}", n.spec.name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_planes_form_etcd_survive_a_rolling_upgrade_and_recover_from_a_snapshot() {
    let base = workspace().join("target/vm-tests/cluster");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("mkdir");
    // Built before the VMs start: both take the CPU.
    let ext = etcd_extension(&base);
    let next = bundle("cluster-next", "0.2.0-cluster", &[]);

    let ports: Vec<u16> = (0..3).map(|_| free_port().expect("port")).collect();
    let specs: Vec<ClusterNode> = (0..3)
        .map(|i| ClusterNode {
            name: format!("cp-{}", i + 1),
            machine_type: MachineType::Controlplane,
            address: format!("10.5.0.{}/24", i + 2),
            endpoint: format!("127.0.0.1:{}", ports[i]),
            etcd_ports: (2379, 2380),
        })
        .collect();
    let generated = generate_cluster(&ClusterOptions {
        cluster: "vmcluster".into(),
        nodes: specs.clone(),
        interface: "eth1".into(),
        gateway: None,
        trusted_keys: vec![upgrade::bundle::public_hex(&signing_key().verifying_key())],
    })
    .expect("cluster configs");
    let lan = free_port().expect("port");
    let nodes: Vec<TestNode> = generated
        .nodes
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            let mut cfg = cfg.clone();
            // The API's way in: QEMU's user network on eth0, forwarded from the host.
            cfg.machine
                .network
                .interfaces
                .insert(0, vm_tests::node::user_network_interface());
            let name = cfg.machine.name.clone();
            prepared(NodeSpec {
                name: name.clone(),
                dir: base.join(&name),
                image_dir: Default::default(),
                memory_mb: 1024,
                services: vec![],
                trusted_keys: vec![],
                extensions: vec![ext.clone()],
                containers: vec![],
                // etcd's client port, for etcdctl on the host.
                forwards: vec![2379],
                preset: Some(Preset {
                    api_port: ports[i],
                    node: cfg,
                    client: generated.client.clone(),
                }),
                lan: Some(Lan {
                    port: lan,
                    mac: format!("52:54:00:12:35:{:02x}", i + 2),
                }),
            })
        })
        .collect();
    let etcd_ports: Vec<u16> = nodes
        .iter()
        .map(|n| n.forwarded(2379).expect("forward"))
        .collect();
    let section = generated.nodes[0].cluster.clone().expect("cluster");
    let ctl = |args: &[&str]| etcdctl(&base, &section, &etcd_ports, args);

    let started = Instant::now();
    let mut vms: Vec<Vm> = nodes.iter().map(|n| n.boot().expect("launch")).collect();
    boot_all(&nodes, &mut vms).await;
    eprintln!("three nodes up after {:?}", started.elapsed());
    let cp1 = &nodes[0];
    let ep1 = cp1.endpoint();

    // Before bootstrap every control plane waits, and says what to do.
    for n in &nodes {
        wait_events(n, "run `plinth bootstrap`").await;
    }
    let (ok, out) = cli(cp1, &["-e", &ep1, "bootstrap"]).await;
    assert!(ok, "{out}");
    let joined = Instant::now();
    let (ok, out) = cli(cp1, &["health", "--wait-timeout", "600s"]).await;
    assert!(ok, "the cluster never became healthy:\n{out}");
    eprintln!("bootstrap to three healthy members: {:?}", joined.elapsed());
    for n in &nodes[1..] {
        wait_events(n, "as learner").await;
        wait_events(n, "promoted to a voting member").await;
    }
    let (ok, out) = ctl(&["put", KEY, VALUE]);
    assert!(ok, "{out}");

    // A rolling upgrade of all three, one at a time: etcd keeps its quorum, the key stays.
    let image = next.display().to_string();
    let (ok, out) = cli(
        cp1,
        &[
            "upgrade",
            "--all",
            "--image",
            &image,
            "--max-unavailable",
            "1",
        ],
    )
    .await;
    assert!(ok, "rolling upgrade:\n{out}");
    for n in &nodes {
        let (ok, out) = cli(n, &["-e", &n.endpoint(), "version"]).await;
        assert!(
            ok && out.contains("0.2.0-cluster"),
            "{}: {out}",
            n.spec.name
        );
    }
    let (ok, out) = ctl(&["get", KEY, "--print-value-only"]);
    assert!(ok && out.trim() == VALUE, "{out}");
    let (ok, out) = ctl(&["endpoint", "health"]);
    assert!(ok, "{out}");

    // A snapshot; then every node reset (no graceful leave: the last member could not), so
    // no etcd data is left; the snapshot brings the key back.
    let snapshot = base.join("etcd.snapshot").display().to_string();
    let (ok, out) = cli(cp1, &["-e", &ep1, "etcd", "snapshot", &snapshot]).await;
    assert!(ok, "{out}");
    let resets: Vec<_> = nodes
        .iter()
        .map(|n| {
            let n = n.clone();
            tokio::spawn(async move {
                cli(
                    &n,
                    &[
                        "-e",
                        &n.endpoint(),
                        "reset",
                        "--graceful=false",
                        "--reboot",
                        "--wipe",
                        "EPHEMERAL",
                    ],
                )
                .await
            })
        })
        .collect();
    for r in resets {
        let (ok, out) = r.await.expect("reset");
        assert!(ok, "{out}");
    }
    // Back, each waiting for a bootstrap again (its etcd data went with EPHEMERAL).
    for n in &nodes {
        wait_events(n, "run `plinth bootstrap`").await;
    }
    let (ok, out) = cli(cp1, &["-e", &ep1, "bootstrap", "--recover-from", &snapshot]).await;
    assert!(ok, "{out}");
    let (ok, out) = cli(cp1, &["health", "--wait-timeout", "600s"]).await;
    assert!(ok, "never healthy after the recovery:\n{out}");
    let (ok, out) = ctl(&["get", KEY, "--print-value-only"]);
    assert!(ok && out.trim() == VALUE, "{out}");
    eprintln!("whole test: {:?}", started.elapsed());
}
