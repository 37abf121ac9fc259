//! Lifecycle scenarios on the simulated machine, through the API: boot, reboot, shutdown, and
//! which request wins when two meet.

mod common;

use std::time::Duration;

use api::proto::{RebootRequest, ShutdownRequest, StatusRequest};
use common::{start, stopped_with};
use config::{HealthCheck, RestartPolicy, Service};
use sequencer::EventKind;

/// A service whose health check can never pass: the boot waits on it, API up.
fn never_healthy() -> Service {
    Service {
        name: "never-healthy".into(),
        command: vec!["/sbin/machined".into(), "pause".into()],
        depends_on: vec![],
        environment: vec![],
        restart: RestartPolicy::Always,
        stop_timeout_s: 2,
        health: Some(HealthCheck::Tcp("127.0.0.1:1".into())),
    }
}

#[tokio::test]
async fn a_simulated_node_boots_through_the_firmware_into_slot_a_and_answers() {
    let node = start(vec![], &[]);
    let v = node.version_after(None).await;
    assert_eq!(
        (v.slot.as_str(), v.version.as_str(), v.state.as_str()),
        ("A", "1.0-sim", "running")
    );
    assert_eq!(v.root_fstype, "squashfs");
    assert!(
        node.console().contains("SimFirmware: starting Boot0001"),
        "{}",
        node.console()
    );
}

#[tokio::test]
async fn reboot_during_boot_cancels_the_boot_and_the_reboot_wins() {
    let node = start(vec![never_healthy()], &[]);
    let mut c = node.client().await;
    // The boot is waiting for the service's health.
    let status = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (status.state.as_str(), status.running_sequence.as_str()),
        ("booting", "boot")
    );
    let before = status.boot_id;
    let actor = c
        .reboot(RebootRequest::default())
        .await
        .expect("reboot is admitted")
        .into_inner()
        .actor_id;
    // A new boot answers: the reboot ran to the end.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Ok(mut c) = api::client::connect_context(&node.endpoint, &node.ctx).await {
            if let Ok(s) = c.status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.boot_id != before {
                    break s;
                }
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", node.console());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after.state, "booting");
    // The old boot's console shows the boot cancelled by the reboot, and the reboot's teardown
    // under the request's actor id.
    let console = node.console();
    let events: Vec<_> = console
        .lines()
        .filter_map(sequencer::trace::parse_line)
        .collect();
    assert!(
        stopped_with(&events, "boot", "cancelled by reboot"),
        "{console}"
    );
    assert!(events.iter().any(|e| e.actor.as_deref() == Some(actor.as_str())
        && matches!(&e.kind, EventKind::SequenceStop { sequence, error: None, .. } if sequence == "reboot")));
}

#[tokio::test]
async fn reboot_returns_with_a_new_boot_id_and_the_teardown_in_order() {
    let node = start(vec![], &[]);
    let v = node.version_after(None).await;
    let mut c = node.client().await;
    c.reboot(RebootRequest::default()).await.expect("reboot");
    let v2 = node.version_after(Some(&v.boot_id)).await;
    assert_ne!(v2.boot_id, v.boot_id);
    let console = node.console();
    let phases: Vec<String> = console
        .lines()
        .filter_map(sequencer::trace::parse_line)
        .filter_map(|e| match e.kind {
            EventKind::PhaseStart {
                sequence, phase, ..
            } if sequence == "reboot" => Some(phase),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [
            "armStagedUpgrade",
            "stopServices",
            "killProcesses",
            "unmountFilesystems",
            "syncDisks"
        ]
    );
}

#[tokio::test]
async fn shutdown_during_boot_wins_and_the_machine_powers_off() {
    let mut node = start(vec![never_healthy()], &[]);
    let mut c = node.client().await;
    c.shutdown(ShutdownRequest { force: false })
        .await
        .expect("shutdown always wins");
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", node.console());
    assert!(node.console().contains("sim: power off"));
}

#[tokio::test]
async fn a_second_reboot_is_refused_while_the_first_runs_and_names_it() {
    // A service that ignores SIGTERM holds the reboot in stopServices for its 2 s timeout.
    let mut stubborn = never_healthy();
    stubborn.health = None;
    stubborn.command.push("--ignore-sigterm".into());
    let node = start(vec![stubborn], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    c.reboot(RebootRequest::default())
        .await
        .expect("first reboot");
    let err = c
        .reboot(RebootRequest::default())
        .await
        .expect_err("second refused");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("reboot is running"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("actor id"), "{}", err.message());
}
