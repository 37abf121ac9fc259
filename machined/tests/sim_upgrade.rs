//! A/B upgrades on the simulated machine, through the API: the trial, the commit, the fall
//! back of a slot that cannot boot, the refusals, staging and rollback.

mod common;

use std::time::Duration;

use api::proto::{RebootRequest, RollbackRequest};
use common::{signing_key, sim_bundle, start, start_with};
use config::HealthCheck;

/// The boot entry of `slot` in a Status reply.
fn entry_of(s: &api::proto::StatusResponse, slot: &str) -> Option<u32> {
    let path = format!("\\EFI\\plinth\\{slot}.efi");
    s.boot_entries
        .iter()
        .find(|e| e.path.contains(&path))
        .map(|e| e.number)
}

fn slot<'a>(s: &'a api::proto::StatusResponse, name: &str) -> &'a api::proto::SlotStatus {
    s.slots
        .iter()
        .find(|x| x.slot == name)
        .expect("slot in status")
}

#[tokio::test]
async fn an_upgrade_boots_b_by_boot_next_commits_it_and_a_second_upgrade_goes_back_into_a() {
    let node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    assert_eq!(v1.slot, "A");

    // Upgrade to 2.0: written into B, the node reboots into it.
    let reply = node
        .upgrade(&sim_bundle("2.0-sim", &[]), false)
        .await
        .expect("upgrade");
    assert_eq!(
        (reply.slot.as_str(), reply.version.as_str(), reply.rebooting),
        ("B", "2.0-sim", true)
    );
    let v2 = node.running_on("B", &v1.boot_id).await;
    assert_eq!(v2.version, "2.0-sim");

    // B booted by BootNext, passed its trial and is committed; A stays good as the fallback.
    let s = node.status().await;
    assert_eq!(s.committed, "B");
    assert_eq!(
        (slot(&s, "B").state.as_str(), slot(&s, "A").state.as_str()),
        ("good", "good")
    );
    let (a, b) = (
        entry_of(&s, "A").expect("A entry"),
        entry_of(&s, "B").expect("B entry"),
    );
    assert_eq!(s.boot_current, Some(b));
    assert_eq!(&s.boot_order[..2], &[b, a]);
    assert_eq!(s.boot_next, None);
    assert!(
        slot(&s, "B").breadcrumbs.iter().any(|c| c == "committed"),
        "{:?}",
        slot(&s, "B")
    );

    // A second upgrade goes into A.
    let reply = node
        .upgrade(&sim_bundle("3.0-sim", &[]), false)
        .await
        .expect("second upgrade");
    assert_eq!(reply.slot, "A");
    let v3 = node.running_on("A", &v2.boot_id).await;
    assert_eq!(v3.version, "3.0-sim");
    let s = node.status().await;
    assert_eq!(s.committed, "A");
    assert_eq!(&s.boot_order[..2], &[a, b]);
}

#[tokio::test]
async fn a_b_whose_kernel_cannot_start_falls_back_to_a_and_says_why() {
    let node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    node.upgrade(&sim_bundle("2.0-broken", &["plinth.sim.panic"]), false)
        .await
        .expect("upgrade");
    // The firmware tries B once (BootNext), it panics, the reset lands on A.
    let v2 = node.running_on("A", &v1.boot_id).await;
    assert_eq!(v2.version, "1.0-sim");
    let s = node.status().await;
    assert_eq!(s.committed, "A");
    assert_eq!(slot(&s, "B").state, "failed");
    let failure = s.last_failure.expect("last failure reported");
    assert_eq!(
        (failure.slot.as_str(), failure.version.as_str()),
        ("B", "2.0-broken")
    );
    assert!(
        failure.reason.contains("before machined started"),
        "{}",
        failure.reason
    );
    assert!(node.console().contains("Kernel panic"));
}

#[tokio::test]
async fn a_b_that_fails_its_health_gates_falls_back_to_a_with_the_gate_as_the_reason() {
    // The extra check is only judged on a trial: A boots fine, B never passes it.
    let node = start_with(vec![], &[], |c| {
        c.machine.upgrade.trial_timeout_s = 2;
        c.machine.upgrade.health_checks = vec![HealthCheck::Tcp("127.0.0.1:1".into())];
    });
    let v1 = node.version_after(None).await;
    node.upgrade(&sim_bundle("2.0-sick", &[]), false)
        .await
        .expect("upgrade");
    let v2 = node.running_on("A", &v1.boot_id).await;
    assert_eq!(v2.slot, "A");
    let s = node.status().await;
    let failure = s.last_failure.expect("last failure reported");
    assert_eq!(failure.slot, "B");
    assert!(
        failure.reason.contains("health gates not passed within 2s")
            && failure.reason.contains("127.0.0.1:1"),
        "{}",
        failure.reason
    );
}

#[tokio::test]
async fn bad_bundles_are_refused_with_the_cause_and_nothing_bootable_changes() {
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let before = node.status().await;
    let good = sim_bundle("2.0-sim", &[]);

    // Signed by a key the node does not trust.
    let image = phases::platform::sim::provision::SimImage {
        version: "2.0".into(),
        extra_cmdline: vec![],
        payload_bytes: 0,
    };
    let other_key = upgrade::bundle::SigningKey::from_bytes(&[1u8; 32]);
    let (ua, ub, root) = (
        image.uki(upgrade::Slot::A),
        image.uki(upgrade::Slot::B),
        image.rootfs(),
    );
    let untrusted =
        upgrade::bundle::build("2.0", std::env::consts::ARCH, &ua, &ub, &root, &other_key)
            .expect("bundle");
    // For another architecture.
    let foreign =
        upgrade::bundle::build("2.0", "riscv64", &ua, &ub, &root, &signing_key()).expect("bundle");
    // A root image bigger than the slot (16 MiB).
    let mut fat = root.clone();
    fat.resize(17 << 20, 0);
    let (fat, _) = upgrade::verity::image(fat).expect("fat root");
    let big_image = upgrade::bundle::build(
        "2.0",
        std::env::consts::ARCH,
        &ua,
        &ub,
        &fat,
        &signing_key(),
    )
    .expect("bundle");
    // A root whose bytes do not match the manifest (a corrupt last byte).
    let mut corrupt = good.clone();
    if let Some(last) = corrupt.last_mut() {
        *last ^= 0xff;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("untrusted", untrusted, "signature does not verify"),
        ("foreign", foreign, "bundle is for riscv64"),
        ("too big", big_image, "partition holds"),
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        ("corrupt", corrupt, "digest mismatch"),
        ("not a bundle", b"hello".to_vec(), "truncated"),
    ];
    for (name, bytes, needle) in cases {
        let err = node.upgrade(&bytes, false).await.expect_err(name);
        assert!(err.message().contains(needle), "{name}: {}", err.message());
        let s = node.status().await;
        assert_eq!(s.committed, before.committed, "{name}");
        assert_eq!(s.boot_order, before.boot_order, "{name}");
        assert_eq!(s.boot_next, None, "{name}");
        assert_ne!(slot(&s, "B").state, "pending", "{name}");
        assert_eq!(slot(&s, "A").state, "good", "{name}");
    }
}

#[tokio::test]
async fn an_upgrade_is_refused_at_once_while_a_reboot_runs_and_names_it() {
    let mut stubborn = config::Service {
        name: "stubborn".into(),
        command: vec![
            "/sbin/machined".into(),
            "pause".into(),
            "--ignore-sigterm".into(),
        ],
        depends_on: vec![],
        environment: vec![],
        restart: config::RestartPolicy::Always,
        stop_timeout_s: 3,
        health: None,
    };
    stubborn.restart = config::RestartPolicy::Always;
    let node = start(vec![stubborn], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    c.reboot(RebootRequest::default()).await.expect("reboot");
    let err = node
        .upgrade(&sim_bundle("2.0-sim", &[]), false)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("reboot is running"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_staged_upgrade_waits_for_the_next_reboot_and_rollback_returns_to_the_good_slot() {
    let node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    // Rollback needs a good other slot: B is empty.
    let mut c = node.client().await;
    let err = c
        .rollback(RollbackRequest::default())
        .await
        .expect_err("no good slot to go back to");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("slot B is empty"),
        "{}",
        err.message()
    );

    // Staged: written and pending, no BootNext, no reboot.
    let reply = node
        .upgrade(&sim_bundle("2.0-sim", &[]), true)
        .await
        .expect("staged");
    assert!(!reply.rebooting);
    let s = node.status().await;
    assert_eq!(
        (slot(&s, "B").state.as_str(), s.boot_next),
        ("pending", None)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node.version_after(None).await.boot_id,
        v1.boot_id,
        "a staged upgrade does not reboot"
    );

    // The next reboot is B's trial, and B commits.
    c.reboot(RebootRequest::default()).await.expect("reboot");
    let v2 = node.running_on("B", &v1.boot_id).await;
    assert_eq!(node.status().await.committed, "B");

    // Rollback: back to A, which is good.
    let mut c = node.client().await;
    c.rollback(RollbackRequest::default())
        .await
        .expect("rollback");
    let v3 = node.running_on("A", &v2.boot_id).await;
    assert_eq!(v3.version, "1.0-sim");
    let s = node.status().await;
    assert_eq!(s.committed, "A");
    assert_eq!(
        slot(&s, "B").state,
        "good",
        "B stays good: a rollback is not a failure"
    );
}

#[tokio::test]
async fn a_root_changed_after_a_staged_write_fails_its_trial_in_dm_verity_and_a_says_why() {
    let mut node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    node.upgrade(&sim_bundle("2.0-sim", &[]), true)
        .await
        .expect("staged");
    // Powered off; someone with the disk flips one byte of B's root image.
    node.wait_exit_quiet();
    let disk_path = node.machine().join("disk.img");
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)
        .expect("disk");
    let parts = upgrade::layout::read_table(&mut disk).expect("GPT");
    let root_b = parts.iter().find(|p| p.label == "ROOT-B").expect("ROOT-B");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut b = [0u8; 1];
        disk.seek(SeekFrom::Start(root_b.offset + 5)).expect("seek");
        disk.read_exact(&mut b).expect("read");
        disk.seek(SeekFrom::Start(root_b.offset + 5)).expect("seek");
        disk.write_all(&[b[0] ^ 1]).expect("write");
        disk.sync_all().expect("sync");
    }
    drop(disk);
    node.launch(&[]);
    let v2 = node.running_on("A", &v1.boot_id).await;
    // The reboot arms the staged trial; dm-verity refuses B's root; the firmware falls back.
    let mut c = node.client().await;
    c.reboot(RebootRequest::default()).await.expect("reboot");
    let v3 = node.running_on("A", &v2.boot_id).await;
    assert_eq!(v3.slot, "A");
    let s = node.status().await;
    assert_eq!(slot(&s, "B").state, "failed");
    let failure = s.last_failure.expect("last failure reported");
    assert!(
        failure
            .reason
            .contains("stopped in the initramfs after initramfs/findBootDisk"),
        "{}",
        failure.reason
    );
    assert!(
        node.console().contains("dm-verity"),
        "the console says why the initramfs stopped"
    );
}

#[tokio::test]
async fn an_upgrade_pulled_from_a_url_resumes_where_the_connection_broke_off() {
    let node = start(vec![], &[]);
    let v1 = node.version_after(None).await;
    let bundle = sim_bundle("2.0-url", &[]);
    let half = bundle.len() / 2;
    let (url, ranges) =
        common::serve::serve_logged(bundle, common::serve::Behaviour::BreakOnce, None).await;
    let reply = node.upgrade_url(&url).await.expect("pulled and written");
    assert_eq!(
        (reply.slot.as_str(), reply.version.as_str()),
        ("B", "2.0-url")
    );
    assert_eq!(
        *ranges.lock().expect("ranges"),
        vec![format!("bytes={half}-")]
    );
    let v2 = node.running_on("B", &v1.boot_id).await;
    assert_eq!(v2.version, "2.0-url");
}

#[tokio::test]
async fn an_upgrade_is_refused_while_the_running_slot_is_still_on_trial() {
    // B's trial waits on a check that cannot pass (for 60 s), with the API up.
    let node = start_with(vec![], &[], |c| {
        c.machine.upgrade.trial_timeout_s = 60;
        c.machine.upgrade.health_checks = vec![HealthCheck::Tcp("127.0.0.1:1".into())];
    });
    let v1 = node.version_after(None).await;
    node.upgrade(&sim_bundle("2.0-sim", &[]), false)
        .await
        .expect("upgrade");
    // Wait for B to answer, still booting (in its health gates).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = api::client::connect_context(&node.endpoint, &node.ctx).await {
            if let Ok(s) = c.status(api::proto::StatusRequest {}).await {
                let s = s.into_inner();
                if s.boot_id != v1.boot_id && s.trial {
                    break;
                }
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", node.console());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = node
        .upgrade(&sim_bundle("3.0-sim", &[]), false)
        .await
        .expect_err("refused");
    // The boot (with its gates) is still running: nothing may start beside it.
    assert!(
        matches!(
            err.code(),
            tonic::Code::FailedPrecondition | tonic::Code::Aborted
        ),
        "{err:?}"
    );
    assert!(
        err.message().contains("not committed yet") || err.message().contains("boot is running"),
        "{}",
        err.message()
    );
}
