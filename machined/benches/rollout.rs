//! Rolling upgrades over 20 simulated nodes (3 control planes with Debian's etcd, 17 workers)
//! against `--max-unavailable K`: the wall time of `plinth upgrade --all` for K = 1, 3, 6 and
//! 17, each to a new version, beside the floor: one node's upgrade alone (`plinth upgrade
//! --wait` on a worker outside any rollout: send, write, reboot, trial, commit) times the
//! waves the plan has (each control plane alone, then the workers K at a time), which no
//! rollout can beat since it also waits for the cluster's health between nodes.
//!
//! `cargo build -p cli && cargo bench -p machined --bench rollout`

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{plinth_cli, SimCluster, Spec};
use common::sim_bundle;

fn run(cluster: &SimCluster, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(plinth_cli())
        .env("PLINTHCONFIG", cluster.client_config())
        .args(args)
        .output()
        .expect("plinth");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "plinth {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = SimCluster::start(Spec {
        name: "rollout",
        controlplanes: 3,
        workers: 17,
        etcd: true,
        services: vec![],
        tweak: common::cluster::as_generated(),
    });
    for n in &cluster.nodes {
        n.version_after(None).await;
    }
    run(&cluster, &["-e", &cluster.nodes[0].endpoint, "bootstrap"]);
    run(&cluster, &["health", "--wait-timeout", "180s"]);
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = |v: &str| {
        let p = dir.path().join(format!("{v}.plinth"));
        std::fs::write(&p, sim_bundle(v, &[])).expect("bundle");
        p.display().to_string()
    };

    // The floor: one worker upgraded alone (medians of 3, each to a new version).
    let last = &cluster.nodes[19].endpoint;
    let mut alone: Vec<Duration> = (0..3)
        .map(|i| {
            let b = bundle(&format!("1.{}-alone", i + 1));
            run(&cluster, &["-e", last, "upgrade", "--image", &b, "--wait"])
        })
        .collect();
    alone.sort();
    let one = alone[1];
    println!(
        "one node upgraded alone (plinth upgrade --wait, median of 3): {:.2} s",
        one.as_secs_f64()
    );

    for (i, k) in [1u32, 3, 6, 17].into_iter().enumerate() {
        let b = bundle(&format!("{}.0-k{k}", i + 2));
        let took = run(
            &cluster,
            &[
                "upgrade",
                "--all",
                "--image",
                &b,
                "--max-unavailable",
                &k.to_string(),
            ],
        );
        let waves = 3 + 17u32.div_ceil(k);
        println!(
            "20 nodes, K={k:<2}: {:6.1} s  ({waves} waves; floor {waves} x one node = {:5.1} s; ratio {:.2})",
            took.as_secs_f64(),
            one.as_secs_f64() * waves as f64,
            took.as_secs_f64() / (one.as_secs_f64() * waves as f64)
        );
    }
}
