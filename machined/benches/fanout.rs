//! `-n/--nodes` fan-out: the `plinth` CLI asking 20 simulated nodes of one cluster for their
//! version at once, against asking one (`-e`, the floor: the same process start, config load
//! and one mTLS handshake), medians of N runs each, alternating.
//!
//! `cargo build -p cli && cargo bench -p machined --bench fanout [-- RUNS]` (15 by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{plinth_cli, SimCluster, Spec};

const NODES: usize = 20;

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
    let cli = plinth_cli();
    let cluster = SimCluster::start(Spec {
        name: "fanout",
        controlplanes: 3,
        workers: NODES - 3,
        etcd: false,
        services: vec![],
        tweak: common::cluster::as_generated(),
    });
    let nodes = &cluster.nodes;
    for n in nodes {
        n.version_after(None).await;
    }
    let config = cluster.client_config();
    let all = cluster.endpoints();
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
