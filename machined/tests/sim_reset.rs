//! Reset on the simulated machine: what it wipes, how, what it refuses, and what the node is
//! afterwards.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use api::proto::{ResetRequest, StatusRequest, WipeMethod};
use common::{sim_bundle, start, SimNode};
use config::{RestartPolicy, Service};

fn ticker() -> Service {
    Service {
        name: "ticker".into(),
        command: vec!["/sbin/machined".into(), "pause".into(), "--tick".into()],
        depends_on: vec![],
        environment: vec![],
        restart: RestartPolicy::Always,
        stop_timeout_s: 3,
        health: None,
    }
}

/// The bytes of a partition of the node's disk.
fn partition_bytes(node: &SimNode, label: &str) -> Vec<u8> {
    let disk = node.machine().join("disk.img");
    let mut f = std::fs::File::open(&disk).expect("disk");
    let p = upgrade::layout::read_table(&mut f)
        .expect("gpt")
        .into_iter()
        .find(|p| p.label == label)
        .expect("partition");
    let mut data = vec![0u8; p.len as usize];
    f.seek(SeekFrom::Start(p.offset)).expect("seek");
    f.read_exact(&mut data).expect("read");
    data
}

/// The volume directories (file system contents) that exist now.
fn volumes(node: &SimNode) -> Vec<String> {
    std::fs::read_dir(node.machine().join("volumes"))
        .expect("volumes")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn reset(labels: &[&str], reboot: bool, method: WipeMethod) -> ResetRequest {
    ResetRequest {
        graceful: true,
        reboot,
        labels: labels.iter().map(|s| s.to_string()).collect(),
        system_disk: false,
        method: method as i32,
    }
}

#[tokio::test]
async fn wiping_state_and_ephemeral_brings_the_node_back_in_maintenance_mode_with_its_install() {
    let node = start(vec![ticker()], &[]);
    node.version_after(None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = volumes(&node);
    let mut c = node.client().await;
    c.reset(reset(&["STATE", "EPHEMERAL"], true, WipeMethod::Fast))
        .await
        .expect("reset");

    // Back in maintenance mode: the config is gone, the slot still boots.
    let fp = node.maintenance_fingerprint().await;
    let mut m = api::client::connect_insecure(&node.endpoint, Some(fp))
        .await
        .expect("connect");
    let s = m
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((s.state.as_str(), s.slot.as_str()), ("maintenance", "A"));
    // The old STATE and EPHEMERAL contents are gone; the ESP's is not.
    let after = volumes(&node);
    let gone: Vec<&String> = before.iter().filter(|v| !after.contains(v)).collect();
    assert_eq!(gone.len(), 2, "before {before:?} after {after:?}");
    assert!(!after.iter().any(|v| node
        .machine()
        .join("volumes")
        .join(v)
        .join("config.yaml")
        .exists()));
    assert!(!after.iter().any(|v| node
        .machine()
        .join("volumes")
        .join(v)
        .join("log/services/ticker.log")
        .exists()));
}

#[tokio::test]
async fn a_zero_reset_leaves_only_zeroes_and_powers_off() {
    let mut node = start(vec![ticker()], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    c.reset(reset(&["STATE", "EPHEMERAL"], false, WipeMethod::Zero))
        .await
        .expect("reset");
    assert!(node.wait_exit(Duration::from_secs(30)).success());
    for label in ["STATE", "EPHEMERAL"] {
        assert!(
            partition_bytes(&node, label).iter().all(|&b| b == 0),
            "{label} is not all zeroes"
        );
    }
    // META and the slot were not touched.
    assert!(partition_bytes(&node, "ROOT-A").starts_with(b"PLINTH-SIM-ROOT"));
}

#[tokio::test]
async fn an_unknown_label_is_refused_before_anything_is_touched() {
    let node = start(vec![], &[]);
    let v = node.version_after(None).await;
    let before = volumes(&node);
    let mut c = node.client().await;
    let err = c
        .reset(reset(&["STATE", "ROOT-A"], true, WipeMethod::Fast))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"ROOT-A\""), "{}", err.message());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.version_after(None).await.boot_id, v.boot_id);
    assert_eq!(volumes(&node), before);
}

#[tokio::test]
async fn an_upgrade_is_refused_at_once_while_a_reset_runs_and_the_refusal_names_the_actor() {
    // The ticker is stopped gracefully; a stubborn service holds the reset for its 3 s.
    let mut stubborn = ticker();
    stubborn.name = "stubborn".into();
    stubborn.command = vec![
        "/sbin/machined".into(),
        "pause".into(),
        "--ignore-sigterm".into(),
    ];
    let node = start(vec![stubborn], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    c.reset(reset(&["EPHEMERAL"], true, WipeMethod::Fast))
        .await
        .expect("reset");
    let err = node
        .upgrade(&sim_bundle("2.0-sim", &[]), false)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert!(
        err.message().contains("reset is running"),
        "{}",
        err.message()
    );
    let actor = err
        .message()
        .split("actor id ")
        .nth(1)
        .expect("actor id")
        .trim_end_matches(')')
        .to_string();
    // The refusal is an event with that actor id.
    let console = node.console();
    let refused = console
        .lines()
        .filter_map(sequencer::trace::parse_line)
        .find(|e| matches!(e.kind, sequencer::EventKind::RequestDenied { .. }))
        .expect("refusal event");
    assert_eq!(refused.actor.as_deref(), Some(actor.as_str()));
}

#[tokio::test]
async fn wiping_the_system_disk_leaves_a_machine_that_needs_media() {
    let mut node = start(vec![], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    c.reset(ResetRequest {
        graceful: true,
        reboot: true,
        labels: vec![],
        system_disk: true,
        method: WipeMethod::Fast as i32,
    })
    .await
    .expect("reset");
    // The firmware finds nothing to boot.
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        node.console().contains("no bootable entry"),
        "{}",
        node.console()
    );
    let disk = node.machine().join("disk.img");
    let mut f = std::fs::File::open(disk).expect("disk");
    assert!(
        upgrade::layout::read_table(&mut f).is_err(),
        "the partition table is gone"
    );
}

#[tokio::test]
async fn a_config_is_refused_at_once_while_a_reset_runs() {
    // A service that ignores SIGTERM holds the graceful reset for its 3 s stop timeout.
    let stubborn = Service {
        name: "stubborn".into(),
        command: vec![
            "/sbin/machined".into(),
            "pause".into(),
            "--ignore-sigterm".into(),
        ],
        ..ticker()
    };
    let node = start(vec![stubborn], &[]);
    node.version_after(None).await;
    let mut cfg = node.config_on_state().expect("config");
    cfg.machine.name = "during-reset".into();
    let mut c = node.client().await;
    c.reset(reset(&["EPHEMERAL"], true, WipeMethod::Fast))
        .await
        .expect("reset");
    let err = c
        .apply_configuration(api::proto::ApplyConfigurationRequest {
            data: cfg.to_yaml().expect("yaml"),
            ..Default::default()
        })
        .await
        .expect_err("refused while the reset runs");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("reset is running"),
        "{}",
        err.message()
    );
    // The reset goes on; the config on STATE is the one the node had.
    let v = node.version_after(None).await;
    assert_eq!(v.node_name, "sim");
    assert_eq!(node.config_on_state().expect("config").machine.name, "sim");
}
