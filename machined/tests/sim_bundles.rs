//! Validly signed bundles a node must still refuse: before a byte is written, one below its
//! security floor (whatever the caller says), one past its expiry, a lower version at the same
//! security version unless the caller allows it, and one that is not the bundle the caller
//! pinned; and, once the slot is written (that is where the bundle ends), one with bytes after
//! its last component, the reply saying what changed.

mod common;

use api::proto::UpgradeOptions;
use common::{sim_bundle, sim_release, start, SimNode};

fn slot<'a>(s: &'a api::proto::StatusResponse, name: &str) -> &'a api::proto::SlotStatus {
    s.slots
        .iter()
        .find(|r| r.slot == name)
        .expect("slot record")
}

/// Nothing bootable changed since `before`: same committed slot, order, no BootNext, and the
/// inactive slot's record is as it was.
async fn unchanged(
    node: &SimNode,
    before: &api::proto::StatusResponse,
    inactive: &str,
    what: &str,
) {
    let s = node.status().await;
    assert_eq!(s.committed, before.committed, "{what}");
    assert_eq!(s.boot_order, before.boot_order, "{what}");
    assert_eq!(s.boot_next, None, "{what}");
    assert_eq!(
        slot(&s, inactive),
        slot(before, inactive),
        "{what}: the inactive slot changed"
    );
}

fn staged(allow_downgrade: bool, digest: &str) -> UpgradeOptions {
    UpgradeOptions {
        stage: true,
        expected_digest: digest.into(),
        allow_downgrade,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_bundle_below_the_security_floor_is_refused_whatever_the_caller_says() {
    let node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    // 2.0 at security version 2 commits: the floor rises to 2.
    node.upgrade(&sim_release("2.0-sim", 2, None), false)
        .await
        .expect("upgrade");
    node.running_on("B", &v1.boot_id).await;
    let before = node.status().await;
    assert_eq!((before.committed.as_str(), before.security_floor), ("B", 2));
    assert_eq!(slot(&before, "B").security_version, 2);

    // A later version string, validly signed, but security version 1: refused, with or without
    // --allow-downgrade.
    for allow in [false, true] {
        let err = node
            .upgrade_with(&sim_release("3.0-sim", 1, None), staged(allow, ""))
            .await
            .expect_err("below the floor");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message()
                .contains("security version 1, below this node's floor 2")
                && err.message().contains("nothing on the disk was changed"),
            "{}",
            err.message()
        );
        unchanged(&node, &before, "A", "below the floor").await;
    }

    // Slot A (security version 0) is good, but going back to it would run below the floor.
    let mut c = node.client().await;
    let err = c
        .rollback(api::proto::RollbackRequest::default())
        .await
        .expect_err("rollback below the floor");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("security version 0, below this node's floor 2"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_expired_bundle_is_refused() {
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let before = node.status().await;
    let err = node
        .upgrade_with(
            &sim_release("2.0-sim", 0, Some(1_000_000_000)),
            staged(false, ""),
        )
        .await
        .expect_err("expired");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("expired at 1000000000"),
        "{}",
        err.message()
    );
    unchanged(&node, &before, "B", "expired").await;
    // Not yet expired: taken.
    let far = 4_000_000_000;
    node.upgrade_with(&sim_release("2.0-sim", 0, Some(far)), staged(false, ""))
        .await
        .expect("an unexpired bundle is taken");
}

#[tokio::test]
async fn a_lower_version_at_the_same_security_version_needs_allow_downgrade() {
    let node = start(vec![], &[]);
    node.version_after(None).await; // runs 1.0-sim at security version 0
    let before = node.status().await;
    let older = sim_release("0.9-sim", 0, None);
    let err = node
        .upgrade_with(&older, staged(false, ""))
        .await
        .expect_err("a downgrade");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("0.9-sim is older than the running 1.0-sim")
            && err.message().contains("--allow-downgrade"),
        "{}",
        err.message()
    );
    unchanged(&node, &before, "B", "downgrade").await;
    let r = node
        .upgrade_with(&older, staged(true, ""))
        .await
        .expect("allowed");
    assert_eq!(r.version, "0.9-sim");
    assert_eq!(slot(&node.status().await, "B").state, "pending");
}

#[tokio::test]
async fn a_bundle_other_than_the_pinned_digest_is_refused() {
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let before = node.status().await;
    let bundle = sim_bundle("2.0-sim", &[]);
    let digest = upgrade::bundle::head_digest(&bundle).expect("digest");
    let other = upgrade::bundle::head_digest(&sim_bundle("2.1-sim", &[])).expect("digest");
    let err = node
        .upgrade_with(&bundle, staged(false, &other))
        .await
        .expect_err("not the pinned bundle");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("digest is {digest}, not the expected {other}")),
        "{}",
        err.message()
    );
    unchanged(&node, &before, "B", "pinned").await;
    node.upgrade_with(&bundle, staged(false, &digest.to_uppercase()))
        .await
        .expect("the pinned bundle is taken");
}

#[tokio::test]
async fn a_bundle_with_bytes_after_its_last_component_is_refused_and_the_reply_says_what_changed() {
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let before = node.status().await;
    let mut long = sim_bundle("2.0-sim", &[]);
    long.extend_from_slice(b"appended by somebody");
    let err = node
        .upgrade_with(&long, staged(false, ""))
        .await
        .expect_err("trailing bytes");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("bytes after its last component")
            && err
                .message()
                .contains("slot B's previous image and its boot entry are gone")
            && err
                .message()
                .contains("the running slot A and its entry are unchanged"),
        "{}",
        err.message()
    );
    let s = node.status().await;
    assert_eq!(s.committed, before.committed);
    assert_eq!(s.boot_order, before.boot_order);
    assert_eq!(
        slot(&s, "B").state,
        "empty",
        "a slot with part of an image is empty"
    );
}
