//! `-n/--nodes` against several simulated nodes of one generated cluster, through the `plinth`
//! CLI built from this workspace: every node answers in one run, each line says which node it
//! is from, and a node that is down fails the run without hiding the others' answers.

mod common;

use common::cluster::{SimCluster, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_named_node_answers_and_a_node_that_is_down_fails_the_run_alone() {
    let mut cluster = SimCluster::start(Spec {
        name: "sim",
        controlplanes: 2,
        workers: 2,
        etcd: false,
        services: vec![config::Service {
            name: "pause".into(),
            command: vec!["/sbin/machined".into(), "pause".into()],
            depends_on: vec![],
            environment: vec![],
            restart: config::RestartPolicy::Always,
            stop_timeout_s: 3,
            health: None,
        }],
        tweak: common::cluster::as_generated(),
    });
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
        .bootstrap(api::proto::BootstrapRequest::default())
        .await
        .expect_err("no etcd program");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("etcd"), "{err:?}");

    // -n on a command that runs on one node is refused, not ignored.
    let (ok, _, err) = cluster.plinth(&["-n", &all, "bootstrap"]);
    assert!(!ok && err.contains("-n/--nodes"), "{err}");

    // Every node's config under its own heading; a rollback asked of every node is refused by
    // each (no good slot B yet), each named.
    let (ok, out, err) = cluster.plinth(&["-n", &all, "get", "config"]);
    assert!(ok, "{out}{err}");
    for n in &cluster.nodes {
        assert!(out.contains(&format!("# {}\n", n.endpoint)), "{out}");
    }
    assert_eq!(
        out.matches("\nmachine:").count() + usize::from(out.starts_with("machine:")),
        4,
        "{out}"
    );
    // One patch for two nodes, one after the other; each has it.
    let two = format!(
        "{},{}",
        cluster.nodes[0].endpoint, cluster.nodes[1].endpoint
    );
    let (ok, out, err) = cluster.plinth(&[
        "-n",
        &two,
        "patch",
        "config",
        "-p",
        r#"{"machine":{"upgrade":{"trial_timeout_s":77}}}"#,
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cluster.plinth(&["-n", &two, "get", "config"]);
    assert!(ok, "{out}{err}");
    assert_eq!(out.matches("trial_timeout_s: 77").count(), 2, "{out}");
    let (ok, out, err) = cluster.plinth(&["-n", &all, "rollback"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("4 of 4 nodes failed") && err.contains("rollback needs a good slot"),
        "{err}"
    );

    // Without -n: the context's first node, the output as it always was.
    let (ok, out, err) = cluster.plinth(&["version", "-o", "json"]);
    assert!(ok, "{out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one document");
    assert_eq!(doc["node"]["name"], "cp-1", "{out}");

    // Streams: every node's events and kernel log, each line after its node.
    let (ok, out, err) = cluster.plinth(&["-n", &all, "events", "--tail", "3"]);
    assert!(ok, "{out}{err}");
    for n in &cluster.nodes {
        let mine = out.lines().filter(|l| l.starts_with(&n.endpoint)).count();
        assert_eq!(mine, 3, "{} events from {}:\n{out}", mine, n.endpoint);
    }
    let (ok, out, err) = cluster.plinth(&["-n", &all, "dmesg"]);
    assert!(ok, "{out}{err}");
    for n in &cluster.nodes {
        assert!(
            out.lines().any(|l| l.starts_with(&n.endpoint)),
            "no kernel log from {}:\n{out}",
            n.endpoint
        );
    }

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
    let (ok, out, err) = cluster.plinth(&["-n", &all, "events", "--tail", "1"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("1 of 4 nodes failed") && err.contains(&down),
        "{err}"
    );
    assert_eq!(
        out.lines().count(),
        3,
        "the others' events still come:\n{out}"
    );
}
