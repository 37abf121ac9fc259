//! Reset through OVMF: the wiped partitions really lose their contents, and the node comes
//! back in maintenance mode with its install intact.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{e2fs_device, node_with_services, partition_is_zero, plinth, BOOT_TIMEOUT};
use config::{RestartPolicy, Service};
use vm_tests::node::wait_for_version;

/// A service writing to /var, so EPHEMERAL has data to lose.
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

/// The root directory of an ext4 image, as debugfs lists it.
fn ext4_root(device: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(device)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_wipes_state_and_ephemeral_and_the_node_comes_back_in_maintenance_mode() {
    let node = node_with_services("reset", vec![ticker()]);
    let ctx = node.context().expect("context").clone();
    // A machine without a TPM: the volumes the node makes again after the reset are plain
    // ext4, which the host can list below (the install test covers encrypted volumes and the
    // reset's crypto-erase of them).
    let mut vm = vm_tests::qemu::Vm::launch(vm_tests::qemu::VmSpec {
        tpm: None,
        lan: None,
        ..node.vm_spec()
    })
    .expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");
    // Let the ticker write to /var.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // plinth reset --wipe STATE,EPHEMERAL --reboot
    let ep = node.endpoint();
    let n2 = node.clone();
    let out = tokio::task::spawn_blocking(move || {
        plinth(
            &n2,
            &["-e", &ep, "reset", "--wipe", "STATE,EPHEMERAL", "--reboot"],
        )
    })
    .await
    .expect("cli");
    assert!(out.contains("reset started"), "{out}");

    // The node comes back in maintenance mode (the slot still boots), fingerprint on the console.
    let (_, line) = vm
        .wait_for_line("maintenance mode: no node config", 0, BOOT_TIMEOUT)
        .expect("maintenance mode after the reset");
    assert!(line.text.contains("takes one over TLS"));
    let (_, fp_line) = vm
        .wait_for_line("certificate SHA-256", 0, Duration::from_secs(5))
        .expect("fingerprint");
    let fp = fp_line
        .text
        .split("certificate SHA-256 ")
        .nth(1)
        .map(|s| s.trim_end_matches(':').trim().to_string())
        .expect("fp");
    let mut c = api::client::connect_insecure(&node.endpoint(), Some(fp))
        .await
        .expect("connect");
    let s = c
        .status(api::proto::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((s.state.as_str(), s.slot.as_str()), ("maintenance", "A"));

    // From the host, after the VM stops: STATE holds no config, EPHEMERAL no service logs.
    vm.kill();
    let listing = ext4_root(&e2fs_device(&node, "STATE"));
    assert!(
        listing.contains("lost+found") && !listing.contains("config.yaml"),
        "{listing}"
    );
    let listing = ext4_root(&e2fs_device(&node, "EPHEMERAL"));
    assert!(
        listing.contains("lost+found") && !listing.contains(" log"),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_reset_leaves_only_zeroes_in_the_wiped_partitions() {
    let node = node_with_services("reset-zero", vec![ticker()]);
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");

    let ep = node.endpoint();
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || {
        plinth(
            &n2,
            &[
                "-e",
                &ep,
                "reset",
                "--wipe",
                "STATE,EPHEMERAL",
                "--method",
                "zero",
            ],
        )
    })
    .await
    .expect("cli");
    // Powers off once wiped.
    let status = vm.wait_exit(Duration::from_secs(300)).expect("QEMU exits");
    assert!(status.success(), "{status}");
    for label in ["STATE", "EPHEMERAL"] {
        assert!(
            partition_is_zero(&node, label),
            "{label} holds non-zero bytes"
        );
    }
}
