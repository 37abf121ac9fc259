//! The verified chain from firmware to root, attacked: a slot B whose UKI was changed after it
//! was signed is refused by the firmware (Secure Boot), and a slot B whose root has one flipped
//! byte is stopped by dm-verity; in both the trial falls back to A, which says why.

mod common;

use std::time::Duration;

use common::{plinth, plinth_output, status, upgradable_node, BOOT_TIMEOUT};
use vm_tests::node::wait_for_version;
use vm_tests::qemu::Vm;

fn slot<'a>(s: &'a api::proto::StatusResponse, name: &str) -> &'a api::proto::SlotStatus {
    s.slots
        .iter()
        .find(|x| x.slot == name)
        .expect("slot in status")
}

/// A node that trusts the tests' bundle key, booted on slot A.
async fn booted_on_a(name: &str) -> (common::TestNode, config::Context, Vm) {
    let node = upgradable_node(name);
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot A");
    (node, ctx, vm)
}

/// Runs the CLI off the async runtime: whether it succeeded, and its output.
async fn cli(node: &common::TestNode, args: &[&str]) -> (bool, String) {
    let node = node.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || plinth_output(&node, &args))
        .await
        .expect("cli")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uki_changed_after_signing_is_refused_by_the_firmware_and_the_node_says_why() {
    // A release whose slot-B UKI has one byte flipped after it was signed, in a bundle the node
    // trusts (the bundle key is not the Secure Boot key: only the firmware checks the UKI).
    let a = common::image("tampered-uki", "0.2.0-tampered", &[]);
    let mut uki_b = std::fs::read(&a.uki_b).expect("uki-B");
    let at = uki_b.len() / 3;
    uki_b[at] ^= 0x01;
    let bundle_bytes = upgrade::bundle::build(
        "0.2.0-tampered",
        std::env::consts::ARCH,
        &std::fs::read(&a.uki_a).expect("uki-A"),
        &uki_b,
        &std::fs::read(&a.rootfs).expect("root"),
        &common::signing_key(),
    )
    .expect("bundle");
    let bundle = common::workspace().join("target/vm-tests/images/tampered-uki/bundle.plinth");
    std::fs::write(&bundle, bundle_bytes).expect("write bundle");

    let (node, _, mut vm) = booted_on_a("sb-tampered-uki").await;
    let ep = node.endpoint();
    let (ok, text) = cli(
        &node,
        &[
            "-e",
            &ep,
            "upgrade",
            "--image",
            &bundle.display().to_string(),
            "--wait",
        ],
    )
    .await;
    assert!(!ok, "the trial must fail: {text}");

    // The firmware refused it (its own words on the console), and A runs again.
    vm.wait_for_line("Access Denied", 0, Duration::from_secs(5))
        .expect("OVMF refused the UKI");
    let s = status(&node).await;
    assert_eq!((s.slot.as_str(), s.committed.as_str()), ("A", "A"));
    assert_eq!(slot(&s, "B").state, "failed");
    let f = s.last_failure.expect("last failure");
    assert!(
        f.reason.contains("firmware refused") && f.reason.contains("changed after it was signed"),
        "{}",
        f.reason
    );
    assert!(text.contains("changed after it was signed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_block_flipped_after_the_write_stops_the_trial_in_dm_verity_and_a_says_why() {
    let bundle = common::bundle("flipped-root", "0.2.0-flipped", &[]);
    let (node, ctx, mut vm) = booted_on_a("verity-flipped-root").await;
    let ep = node.endpoint();

    // Slot B written and verified, its trial staged for the next reboot.
    let (ok, text) = cli(
        &node,
        &[
            "-e",
            &ep,
            "upgrade",
            "--image",
            &bundle.display().to_string(),
            "--stage",
        ],
    )
    .await;
    assert!(ok, "{text}");
    let (ok, text) = cli(&node, &["-e", &ep, "shutdown"]).await;
    assert!(ok, "{text}");
    vm.wait_exit(Duration::from_secs(120)).expect("powered off");
    let spec = vm.spec.clone();
    drop(vm);

    // Someone with the disk flips one byte of B's root: in the SquashFS superblock, which the
    // kernel reads to mount it.
    let (offset, _) = common::partition(&node, "ROOT-B");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node.disk)
            .expect("disk");
        let mut b = [0u8; 1];
        disk.seek(SeekFrom::Start(offset + 40)).expect("seek");
        disk.read_exact(&mut b).expect("read");
        disk.seek(SeekFrom::Start(offset + 40)).expect("seek");
        disk.write_all(&[b[0] ^ 0x01]).expect("write");
        disk.sync_all().expect("sync");
    }

    // A boots; the reboot arms B's staged trial; dm-verity stops B; the firmware falls back.
    let mut vm = Vm::launch(spec).expect("relaunch");
    let (v1, _) = wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
        .await
        .expect("A again");
    assert_eq!(v1.slot, "A");
    plinth(&node, &["-e", &ep, "reboot"]);
    vm.wait_for_line("is corrupted", 0, BOOT_TIMEOUT)
        .expect("dm-verity reports the corrupted block");
    vm.wait_for_line("Kernel panic", 0, Duration::from_secs(60))
        .expect("and panics the trial");
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let s = loop {
        let (v, _) = wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
            .await
            .expect("back");
        if v.boot_id != v1.boot_id {
            break status(&node).await;
        }
        assert!(std::time::Instant::now() < deadline, "no new boot");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!((s.slot.as_str(), s.committed.as_str()), ("A", "A"));
    assert_eq!(slot(&s, "B").state, "failed");
    let f = s.last_failure.expect("last failure");
    assert!(
        f.reason
            .contains("stopped in the initramfs after initramfs/mapRoot"),
        "{}",
        f.reason
    );
}
