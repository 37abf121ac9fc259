//! `-n/--nodes` fan-out: the `plinth` CLI asking 20 simulated nodes of one cluster for their
//! version at once, against asking one (`-e`, the floor: the same process start, config load
//! and one mTLS handshake), medians of N runs each, alternating.
//!
//! `cargo build -p cli && cargo bench -p machined --bench fanout [-- RUNS]` (15 by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use config::MachineType;

const NODES: usize = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
    let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/plinth");
    assert!(cli.is_file(), "build the CLI first: cargo build -p cli");
    let specs: Vec<ClusterNode> = (0..NODES)
        .map(|i| ClusterNode {
            name: if i < 3 {
                format!("cp-{}", i + 1)
            } else {
                format!("worker-{}", i - 2)
            },
            machine_type: if i < 3 {
                MachineType::Controlplane
            } else {
                MachineType::Worker
            },
            address: format!("10.5.0.{}/24", i + 2),
            endpoint: format!("127.0.0.1:{}", free_port()),
            etcd_ports: (2379, 2380),
        })
        .collect();
    let g = generate_cluster(&ClusterOptions {
        cluster: "fanout".into(),
        nodes: specs.clone(),
        interface: "eth0".into(),
        gateway: None,
        trusted_keys: vec![],
    })
    .expect("configs");
    let ctx = g.client.context(None).expect("context").1.clone();
    let nodes: Vec<common::SimNode> = g
        .nodes
        .iter()
        .zip(&specs)
        .map(|(n, s)| common::start_configured(n, s.endpoint.clone(), ctx.clone(), g.ca.clone()))
        .collect();
    for n in &nodes {
        n.version_after(None).await;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("plinthconfig");
    g.client.save(&config).expect("client config");
    let all: Vec<String> = nodes.iter().map(|n| n.endpoint.clone()).collect();
    let all = all.join(",");
    let run = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(&cli)
            .env("PLINTHCONFIG", &config)
            .args(args)
            .output()
            .expect("plinth");
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        took
    };
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternating which goes first, so neither always runs on a warmer machine.
        let a = || run(&["-e", &nodes[0].endpoint, "version"]);
        let b = || run(&["-n", &all, "version", "-o", "json"]);
        if i % 2 == 0 {
            one.push(a());
            many.push(b());
        } else {
            many.push(b());
            one.push(a());
        }
    }
    let (one, many) = (median(one), median(many));
    println!(
        "plinth version, medians of {runs}: {NODES} nodes at once with -n {} vs one node with -e {} (ratio {:.2})",
        ms(many),
        ms(one),
        many.as_secs_f64() / one.as_secs_f64()
    );
}
