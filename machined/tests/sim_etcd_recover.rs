//! etcd snapshots and disaster recovery on three simulated control planes running Debian's
//! etcd: a key written with Debian's `etcdctl`; `plinth etcd status` and `plinth etcd snapshot`;
//! every control plane reset (EPHEMERAL wiped, no graceful leave), so no etcd data is left
//! anywhere; a damaged snapshot refused by the CLI, and by the node when it gets one anyway,
//! with nothing left behind; `plinth bootstrap --recover-from` on one node, the others
//! joining it, and the key back.

mod common;

use std::time::{Duration, Instant};

use api::proto::etcd_recover_request::Msg;
use api::proto::{BootstrapRequest, EtcdRecoverOptions, EtcdRecoverRequest};
use common::cluster::{etcdctl, SimCluster, Spec};

/// Waits until `plinth health` passes over the cluster.
fn healthy(cluster: &SimCluster) {
    let (ok, out, err) = cluster.plinth(&["health", "--wait-timeout", "180s"]);
    assert!(ok, "never healthy:\n{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_brings_the_keys_back_into_a_cluster_rebuilt_from_nothing() {
    let cluster = SimCluster::start(Spec {
        name: "recover",
        controlplanes: 3,
        workers: 0,
        etcd: true,
        services: vec![],
        tweak: common::cluster::as_generated(),
    });
    for n in &cluster.nodes {
        n.version_after(None).await;
    }
    let cp1 = &cluster.nodes[0];
    let (ok, out, err) = cluster.plinth(&["-e", &cp1.endpoint, "bootstrap"]);
    assert!(ok, "{out}{err}");
    healthy(&cluster);
    let section = cluster.generated.nodes[0].cluster.clone().expect("cluster");
    let (ok, out) = etcdctl(
        &section,
        &["put", "/app/greeting", "written before the disaster"],
    );
    assert!(ok, "{out}");

    // Every member's status: three answer, one of them the leader, all at one term.
    let (ok, out, err) = cluster.plinth(&["-e", &cp1.endpoint, "etcd", "status", "-o", "json"]);
    assert!(ok, "{out}{err}");
    let members: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(members.len(), 3, "{out}");
    assert!(members.iter().all(|m| m["error"] == ""), "{out}");
    let leaders: Vec<&serde_json::Value> =
        members.iter().filter(|m| m["leader"] == m["id"]).collect();
    assert_eq!(leaders.len(), 1, "{out}");

    // A snapshot, checked by the CLI against etcd's own SHA-256 trailer.
    let dir = tempfile::tempdir().expect("tmp");
    let snapshot = dir.path().join("etcd.snapshot");
    let snap = snapshot.display().to_string();
    let (ok, out, err) = cluster.plinth(&["-e", &cp1.endpoint, "etcd", "snapshot", &snap]);
    assert!(ok, "{out}{err}");
    assert!(std::fs::metadata(&snapshot).expect("saved").len() > 32);
    // A worker... there is none; a node with data refuses an upload for recovery.
    let (ok, out, err) =
        cluster.plinth(&["-e", &cp1.endpoint, "bootstrap", "--recover-from", &snap]);
    assert!(!ok && err.contains("already bootstrapped"), "{out}{err}");

    // The disaster: every control plane reset, its etcd data wiped with EPHEMERAL, without
    // leaving (the last member could not). They come back waiting for a bootstrap.
    for n in &cluster.nodes {
        let before = n.version_after(None).await.boot_id;
        let (ok, out, err) = cluster.plinth(&[
            "-e",
            &n.endpoint,
            "reset",
            "--graceful=false",
            "--reboot",
            "--wipe",
            "EPHEMERAL",
        ]);
        assert!(ok, "{out}{err}");
        n.version_after(Some(&before)).await;
    }
    let (ok, out) = etcdctl(&section, &["get", "/app/greeting", "--print-value-only"]);
    assert!(!ok, "no etcd should answer now: {out}");

    // A damaged snapshot: the CLI refuses it; sent anyway, the node's restore refuses it and
    // leaves no data (the node still waits for a bootstrap).
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let damaged = dir.path().join("damaged.snapshot");
    bytes[100] ^= 0xff;
    std::fs::write(&damaged, &bytes).expect("write");
    let (ok, out, err) = cluster.plinth(&[
        "-e",
        &cp1.endpoint,
        "bootstrap",
        "--recover-from",
        &damaged.display().to_string(),
    ]);
    assert!(
        !ok && err.contains("not an intact etcd snapshot"),
        "{out}{err}"
    );
    let mut c = cp1.client().await;
    let msgs = vec![
        EtcdRecoverRequest {
            msg: Some(Msg::Options(EtcdRecoverOptions {
                size: bytes.len() as u64,
            })),
        },
        EtcdRecoverRequest {
            msg: Some(Msg::Chunk(bytes)),
        },
    ];
    c.etcd_recover(tokio_stream::iter(msgs))
        .await
        .expect("kept");
    let err = c
        .bootstrap(BootstrapRequest { recover_etcd: true })
        .await
        .expect_err("a damaged snapshot");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("etcdctl snapshot restore"),
        "{err:?}"
    );

    // The real one: cp-1 starts a one-member cluster from it, cp-2 and cp-3 join, the key is
    // back, read with etcdctl.
    let (ok, out, err) =
        cluster.plinth(&["-e", &cp1.endpoint, "bootstrap", "--recover-from", &snap]);
    assert!(ok, "{out}{err}");
    healthy(&cluster);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = etcdctl(&section, &["get", "/app/greeting", "--print-value-only"]);
        if ok && out.trim() == "written before the disaster" {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = cluster.plinth(&["etcd", "members"]);
    assert!(ok, "{out}{err}");
    assert!(
        ["cp-1", "cp-2", "cp-3"].iter().all(|n| out.contains(n)),
        "{out}"
    );
}
