//! `-n/--nodes` against several simulated nodes of one generated cluster, through the `plinth`
//! CLI built from this workspace: every node answers in one run, each line says which node it
//! is from, and a node that is down fails the run without hiding the others' answers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use config::MachineType;

fn plinth_cli() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/plinth");
    assert!(
        p.is_file(),
        "{} is missing: build it with cargo build -p cli (./x test does)",
        p.display()
    );
    p
}

struct Cluster {
    nodes: Vec<common::SimNode>,
    config: tempfile::TempDir,
}

impl Cluster {
    /// `cps` control planes and `workers` workers, each a simulated node on 127.0.0.1.
    fn start(cps: usize, workers: usize) -> Cluster {
        let endpoints: Vec<String> = (0..cps + workers)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
                format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
            })
            .collect();
        let nodes = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let cp = i < cps;
                ClusterNode {
                    name: if cp {
                        format!("cp-{}", i + 1)
                    } else {
                        format!("worker-{}", i - cps + 1)
                    },
                    machine_type: if cp {
                        MachineType::Controlplane
                    } else {
                        MachineType::Worker
                    },
                    address: format!("10.5.0.{}/24", i + 2),
                    endpoint: e.clone(),
                    etcd_ports: (2379, 2380),
                }
            })
            .collect();
        let g = generate_cluster(&ClusterOptions {
            cluster: "sim".into(),
            nodes,
            interface: "eth0".into(),
            gateway: None,
            trusted_keys: vec![],
        })
        .expect("cluster configs");
        let ctx = g.client.context(None).expect("context").1.clone();
        let mut configs = g.nodes.clone();
        for c in &mut configs {
            c.machine.services = vec![config::Service {
                name: "pause".into(),
                command: vec!["/sbin/machined".into(), "pause".into()],
                depends_on: vec![],
                environment: vec![],
                restart: config::RestartPolicy::Always,
                stop_timeout_s: 3,
                health: None,
            }];
        }
        let nodes = configs
            .iter()
            .zip(&endpoints)
            .map(|(n, e)| common::start_configured(n, e.clone(), ctx.clone(), g.ca.clone()))
            .collect();
        let config = tempfile::tempdir().expect("tmp");
        g.client
            .save(&config.path().join("plinthconfig"))
            .expect("client config");
        Cluster { nodes, config }
    }

    fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.endpoint.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs the CLI with this cluster's client config: (succeeded, stdout, stderr).
    fn plinth(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(plinth_cli())
            .env("PLINTHCONFIG", self.config.path().join("plinthconfig"))
            .args(args)
            .output()
            .expect("running plinth");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_named_node_answers_and_a_node_that_is_down_fails_the_run_alone() {
    let mut cluster = Cluster::start(2, 2);
    for n in &cluster.nodes {
        n.version_after(None).await;
    }
    let all = cluster.endpoints();

    let (ok, out, err) = cluster.plinth(&["-n", &all, "version", "-o", "json"]);
    assert!(ok, "{out}{err}");
    let docs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON array");
    assert_eq!(docs.len(), 4, "{out}");
    for (doc, node) in docs.iter().zip(&cluster.nodes) {
        // In the order named, each from its own node.
        assert_eq!(doc["node"], node.endpoint.as_str(), "{doc}");
        assert_eq!(doc["node"], doc["version"]["node"]["endpoint"], "{doc}");
    }
    let names: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["version"]["node"]["name"].as_str())
        .collect();
    assert_eq!(names, ["cp-1", "cp-2", "worker-1", "worker-2"]);

    let (ok, out, err) = cluster.plinth(&["-n", &all, "services"]);
    assert!(ok, "{out}{err}");
    let mut lines = out.lines();
    assert!(
        lines.next().is_some_and(|h| h.starts_with("NODE ")),
        "{out}"
    );
    for n in &cluster.nodes {
        assert!(
            lines.clone().any(|l| l.starts_with(&n.endpoint)),
            "no row from {}:\n{out}",
            n.endpoint
        );
    }

    // A control plane without the etcd extension cannot be bootstrapped, and says why.
    let err = cluster.nodes[0]
        .client()
        .await
        .bootstrap(api::proto::BootstrapRequest {})
        .await
        .expect_err("no etcd program");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("etcd"), "{err:?}");

    // -n on a command that runs on one node is refused, not ignored.
    let (ok, _, err) = cluster.plinth(&["-n", &all, "reboot"]);
    assert!(!ok && err.contains("-n/--nodes"), "{err}");

    // Without -n: the context's first node, the output as it always was.
    let (ok, out, err) = cluster.plinth(&["version", "-o", "json"]);
    assert!(ok, "{out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one document");
    assert_eq!(doc["node"]["name"], "cp-1", "{out}");

    // One node down: the others still answer, the run fails and names it.
    let down = cluster.nodes[2].endpoint.clone();
    cluster.nodes[2].wait_exit_quiet();
    let (ok, out, err) = cluster.plinth(&["-n", &all, "status", "-o", "json"]);
    assert!(!ok, "a node down must fail the run:\n{out}");
    let docs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON array");
    assert_eq!(docs.len(), 4, "{out}");
    assert!(
        docs[2]["error"].as_str().is_some_and(|e| e.contains(&down)),
        "{out}"
    );
    for i in [0, 1, 3] {
        assert_eq!(docs[i]["status"]["state"], "running", "{out}");
    }
    assert!(
        err.contains("1 of 4 nodes failed") && err.contains(&down),
        "{err}"
    );

    let (ok, out, err) = cluster.plinth(&["-n", &all, "containers"]);
    assert!(!ok, "{out}");
    assert!(err.contains(&down), "{err}");
}
