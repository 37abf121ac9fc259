//! `plinth cluster create --simulated`, as a user on a laptop runs it: five simulated nodes (3
//! control planes with the host's etcd, 2 workers) started by the CLI from the provisioning
//! crate, their context made current; `plinth bootstrap` and `plinth health` on it; a second
//! create of the same name refused while it runs; `plinth cluster destroy` stops every node.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::plinth_cli;

fn plinth(home: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(plinth_cli())
        .env("HOME", home)
        .env("PLINTHCONFIG", home.join("plinthconfig"))
        .args(args)
        .output()
        .expect("plinth");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn a_simulated_cluster_made_by_the_cli_bootstraps_passes_health_and_is_destroyed() {
    let home = tempfile::tempdir().expect("tmp");
    let home = home.path();
    let machined = env!("CARGO_BIN_EXE_machined");
    let create = [
        "cluster",
        "create",
        "--simulated",
        "--name",
        "lab",
        "--control-planes",
        "3",
        "--workers",
        "2",
        "--machined",
        machined,
    ];
    let (ok, out) = plinth(home, &create);
    assert!(ok, "{out}");
    assert!(out.contains("next: plinth bootstrap"), "{out}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join(".plinth/clusters/lab/cluster.json")).expect("state"),
    )
    .expect("json");
    let pids: Vec<u64> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 5, "{state}");

    let (ok, out) = plinth(home, &create);
    assert!(!ok && out.contains("already running"), "{out}");

    // The context is current: no -e, no --config.
    let (ok, out) = plinth(home, &["bootstrap"]);
    assert!(ok, "{out}");
    let (ok, out) = plinth(home, &["health", "--wait-timeout", "180s"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS")).count(),
        5,
        "{out}"
    );
    let endpoints: Vec<&str> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["endpoint"].as_str())
        .collect();
    let (ok, out) = plinth(home, &["-n", &endpoints.join(","), "version"]);
    assert!(ok, "{out}");
    for name in ["cp-1", "cp-2", "cp-3", "worker-1", "worker-2"] {
        assert!(out.contains(name), "{out}");
    }

    let (ok, out) = plinth(home, &["cluster", "destroy", "--name", "lab"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "nodes still running after destroy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!home.join(".plinth/clusters/lab").exists());
    // Nor any etcd of theirs (their data was under the cluster's directory).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(".plinth/clusters/lab/"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Workers alone ask for the one control plane a cluster needs (as talosctl does).
    let (ok, out) = plinth(
        home,
        &[
            "cluster",
            "create",
            "--simulated",
            "--name",
            "few",
            "--workers",
            "2",
            "--machined",
            machined,
        ],
    );
    assert!(ok, "{out}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join(".plinth/clusters/few/cluster.json")).expect("state"),
    )
    .expect("json");
    let names: Vec<&str> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["cp-1", "worker-1", "worker-2"], "{state}");
    let (ok, out) = plinth(home, &["cluster", "destroy", "--name", "few"]);
    assert!(ok, "{out}");
}
