//! Where a bundle comes from, when it misbehaves: a URL that trickles one byte every 2 s, an
//! upload that goes silent, a reboot or a reset asked for while the slot is being written, and
//! pulls over HTTPS (checked against the CA the node config names) and their resumes. A stalled
//! upgrade must never hold the node: it fails by itself and says why, or gives way.

mod common;

use std::time::Duration;

use api::proto::{upgrade_request::Msg, ResetRequest, UpgradeOptions, UpgradeRequest};
use common::serve::{https_identity, serve, Behaviour};
use common::{sim_bundle, sim_bundle_of, start_with, SimNode};
use phases::platform::sim::provision::SimImage;

fn slot<'a>(s: &'a api::proto::StatusResponse, name: &str) -> &'a api::proto::SlotStatus {
    s.slots
        .iter()
        .find(|r| r.slot == name)
        .expect("slot record")
}

/// A node whose upgrade sources time out after `idle` s of silence and `deadline` s in all.
fn node_with_deadlines(idle: u64, deadline: u64) -> SimNode {
    start_with(vec![], &[], |c| {
        c.machine.upgrade.idle_timeout_s = idle;
        c.machine.upgrade.receive_deadline_s = deadline;
    })
}

/// A bundle with 8 MiB of root filler: big enough to stop half-way through.
fn big_bundle() -> Vec<u8> {
    sim_bundle_of(SimImage {
        version: "2.0-big".into(),
        extra_cmdline: vec![],
        payload_bytes: 8 << 20,
    })
}

/// Starts an upload of the first `sent` bytes of `bundle` that then sends nothing (the stream
/// stays open); returns the call and the sender keeping it open.
fn held_upload(
    node: &SimNode,
    bundle: &[u8],
    sent: usize,
) -> (
    tokio::task::JoinHandle<Result<api::proto::UpgradeResponse, tonic::Status>>,
    tokio::sync::mpsc::Sender<UpgradeRequest>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut msgs = vec![UpgradeRequest {
        msg: Some(Msg::Options(UpgradeOptions::default())),
    }];
    msgs.extend(bundle[..sent].chunks(64 << 10).map(|c| UpgradeRequest {
        msg: Some(Msg::Chunk(c.to_vec())),
    }));
    for m in msgs {
        tx.try_send(m).expect("queued");
    }
    let (endpoint, ctx) = (node.endpoint.clone(), node.ctx.clone());
    let call = tokio::spawn(async move {
        let mut c = api::client::connect_context(&endpoint, &ctx)
            .await
            .expect("connect");
        c.upgrade(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    (call, tx)
}

/// Waits until slot B is being written.
async fn writing(node: &SimNode) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while slot(&node.status().await, "B").state != "writing" {
        assert!(
            std::time::Instant::now() < deadline,
            "B was never being written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_url_that_trickles_fails_the_upgrade_by_itself_at_its_deadline() {
    let node = node_with_deadlines(3, 6);
    node.version_after(None).await;
    let url = serve(
        sim_bundle("2.0-sim", &[]),
        Behaviour::Trickle(Duration::from_secs(2)),
        None,
    )
    .await;
    let started = std::time::Instant::now();
    let err = node.upgrade_url(&url).await.expect_err("stalled");
    let took = started.elapsed();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("{url} did not deliver the whole bundle within 6s"))
            && err.message().contains("nothing on the disk was changed"),
        "{}",
        err.message()
    );
    assert!(took < Duration::from_secs(20), "it took {took:?}");
    // The node is free again: a good bundle goes in.
    let s = node.status().await;
    assert_eq!(
        (s.state.as_str(), slot(&s, "B").state.as_str()),
        ("running", "empty")
    );
    node.upgrade(&sim_bundle("2.0-sim", &[]), true)
        .await
        .expect("the next upgrade runs");
}

#[tokio::test]
async fn an_upload_that_goes_silent_fails_by_itself_and_says_what_changed() {
    let node = node_with_deadlines(3, 600);
    node.version_after(None).await;
    let bundle = big_bundle();
    let (call, _open) = held_upload(&node, &bundle, bundle.len() / 2);
    let err = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the upgrade ended by itself")
        .expect("join")
        .expect_err("silent");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("the upload sent nothing for 3s")
            && err
                .message()
                .contains("slot B's previous image and its boot entry are gone"),
        "{}",
        err.message()
    );
    let s = node.status().await;
    assert_eq!((s.state.as_str(), s.committed.as_str()), ("running", "A"));
    assert_eq!(slot(&s, "B").state, "empty");
}

#[tokio::test]
async fn a_reboot_or_a_reset_may_take_over_an_upgrade_writing_the_slot() {
    for take_over in ["reboot", "reset"] {
        let node = node_with_deadlines(600, 3600);
        let v1 = node.version_after(None).await;
        let bundle = big_bundle();
        let (call, _open) = held_upload(&node, &bundle, bundle.len() / 2);
        writing(&node).await;
        let mut c = node.client().await;
        let accepted = match take_over {
            "reboot" => c
                .reboot(api::proto::RebootRequest::default())
                .await
                .map(|_| ()),
            _ => c
                .reset(ResetRequest {
                    graceful: true,
                    reboot: true,
                    // The config stays (on STATE): the node comes back running.
                    labels: vec!["EPHEMERAL".into()],
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        accepted.unwrap_or_else(|e| panic!("{take_over} during the slot write: {e:?}"));
        let err = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the upgrade call ended")
            .expect("join")
            .expect_err("taken over");
        assert!(
            matches!(
                err.code(),
                tonic::Code::Aborted | tonic::Code::Unavailable | tonic::Code::Unknown
            ),
            "{take_over}: {err:?}"
        );
        // Back on A; B, half written, is marked so and not in the boot order.
        let v2 = node.running_on("A", &v1.boot_id).await;
        assert_ne!(v2.boot_id, v1.boot_id);
        let s = node.status().await;
        assert_eq!(s.committed, "A", "{take_over}");
        assert!(
            matches!(slot(&s, "B").state.as_str(), "writing" | "empty"),
            "{take_over}: B is {}",
            slot(&s, "B").state
        );
        let b_entries: Vec<u32> = s
            .boot_entries
            .iter()
            .filter(|e| e.description == "Plinth B")
            .map(|e| e.number)
            .collect();
        assert!(
            !s.boot_order.iter().any(|n| b_entries.contains(n)),
            "{take_over}: B is in BootOrder {:?}",
            s.boot_order
        );
    }
}

#[tokio::test]
async fn an_upgrade_pulled_over_https_is_checked_against_the_configured_ca() {
    let (ca, tls) = https_identity();
    let (other_ca, _) = https_identity();
    let url = serve(sim_bundle("2.0-tls", &[]), Behaviour::Whole, Some(tls)).await;

    // No CA in the config: refused before anything runs.
    let node = start_with(vec![], &[], |_| {});
    node.version_after(None).await;
    let err = node.upgrade_url(&url).await.expect_err("no CA");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("no CA certificates"),
        "{}",
        err.message()
    );
    drop(node);

    // Another CA: the server is not the one the node trusts.
    let node = start_with(vec![], &[], |c| c.machine.upgrade.ca = other_ca.clone());
    node.version_after(None).await;
    let err = node.upgrade_url(&url).await.expect_err("wrong CA");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().to_lowercase().contains("certificate"),
        "{}",
        err.message()
    );
    drop(node);

    // The right CA: pulled, written, and committed.
    let node = start_with(vec![], &[], |c| c.machine.upgrade.ca = ca.clone());
    let v1 = node.version_after(None).await;
    let r = node.upgrade_url(&url).await.expect("pulled over https");
    assert_eq!((r.slot.as_str(), r.version.as_str()), ("B", "2.0-tls"));
    node.running_on("B", &v1.boot_id).await;
}

#[tokio::test]
async fn a_resume_that_does_not_start_where_the_download_stopped_is_refused() {
    let node = start_with(vec![], &[], |_| {});
    node.version_after(None).await;
    let url = serve(big_bundle(), Behaviour::BadResume, None).await;
    let err = node.upgrade_url(&url).await.expect_err("bad resume");
    assert!(
        err.message().contains("resumed with Content-Range"),
        "{}",
        err.message()
    );
    let s = node.status().await;
    assert_eq!((s.committed.as_str(), s.boot_next), ("A", None));
    assert_ne!(slot(&s, "B").state, "pending");
}

#[tokio::test]
async fn a_config_is_refused_at_once_while_an_upgrade_writes_the_slot_and_runs_as_a_sequence_otherwise(
) {
    let node = node_with_deadlines(600, 3600);
    node.version_after(None).await;
    let cfg = node.config_on_state().expect("config");
    let apply = |name: &str| {
        let mut c = cfg.clone();
        c.machine.name = name.into();
        api::proto::ApplyConfigurationRequest {
            data: c.to_yaml().expect("yaml"),
            ..Default::default()
        }
    };
    let bundle = big_bundle();
    let (call, open) = held_upload(&node, &bundle, bundle.len() / 2);
    writing(&node).await;
    let mut c = node.client().await;
    let err = c
        .apply_configuration(apply("during-upgrade"))
        .await
        .expect_err("refused while the upgrade runs");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        err.message()
            .contains("upgrade is running; applyConfig may not interrupt it"),
        "{}",
        err.message()
    );
    assert_eq!(node.config_on_state().expect("config").machine.name, "sim");
    // Once the upgrade is over (the upload ends short), the same config goes in, as the
    // applyConfig sequence in the trace.
    drop(open);
    let _ = call.await;
    c.apply_configuration(apply("after-upgrade"))
        .await
        .expect("applied");
    assert_eq!(
        node.config_on_state().expect("config").machine.name,
        "after-upgrade"
    );
    let events = node.events().await;
    let phases: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            sequencer::EventKind::PhaseStart {
                sequence, phase, ..
            } if sequence == "applyConfig" => Some(phase.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(phases, ["validate", "writeConfig", "applyLive"]);
}
