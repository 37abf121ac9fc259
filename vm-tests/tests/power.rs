//! An orderly end: reboot comes back with a new boot id after tearing down (and a reboot the
//! kernel never finishes is reset by the watchdog), shutdown powers the VM off with its file
//! systems clean.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{e2fs_device, image_on_kernel, node, node_booting, plinth, TestNode, BOOT_TIMEOUT};
use sequencer::trace;
use vm_tests::node::wait_for_version;

const TEARDOWN: [&str; 4] = [
    "stopServices",
    "killProcesses",
    "unmountFilesystems",
    "syncDisks",
];

/// Phase names of `sequence` that started, in console order, from console line `from`.
fn phases_on_console(
    lines: &[vm_tests::serial::Line],
    sequence: &str,
) -> Vec<(usize, String, Option<String>)> {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let e = trace::parse_line(&l.text)?;
            match e.kind {
                sequencer::EventKind::PhaseStop {
                    sequence: s,
                    phase,
                    error,
                    ..
                } if s == sequence => Some((i, phase, error)),
                _ => None,
            }
        })
        .collect()
}

/// `plinth reboot --wait` on `node`: it says the node is back, and the node answers with a
/// boot id other than `before`'s. Returns that answer.
async fn reboot_and_wait(
    node: &TestNode,
    vm: &mut vm_tests::qemu::Vm,
    before: &api::proto::VersionResponse,
) -> api::proto::VersionResponse {
    let ctx = node.context().expect("context").clone();
    let endpoint = node.endpoint();
    let node2 = node.clone();
    let out = tokio::task::spawn_blocking(move || {
        plinth(
            &node2,
            &["-e", &endpoint, "reboot", "--wait", "--timeout", "300"],
        )
    })
    .await
    .expect("cli");
    assert!(out.contains("node is back"), "{out}");
    let (after, _) = wait_for_version(vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("second boot");
    assert_ne!(after.boot_id, before.boot_id);
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plinth_reboot_wait_brings_the_node_back_with_a_new_boot_id_after_an_orderly_teardown() {
    // A running node.
    let node = node("reboot");
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    let (before, _) = wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("first boot");

    // `plinth reboot --wait` returns once the node answers with a new boot id.
    let after = reboot_and_wait(&node, &mut vm, &before).await;
    assert_eq!(after.slot, "A");

    // The console shows the teardown phases, in order and without errors, before the firmware
    // starts the next boot.
    let lines = vm.serial.lines();
    let teardown = phases_on_console(&lines, "reboot");
    let names: Vec<&str> = teardown.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(names[0], "armStagedUpgrade");
    assert_eq!(names[1..], TEARDOWN);
    assert!(teardown.iter().all(|(_, _, e)| e.is_none()), "{teardown:?}");
    let firmware_starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.text.contains("BdsDxe: starting"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        firmware_starts.len(),
        2,
        "one boot before, one after the reboot"
    );
    assert!(teardown.iter().all(|(i, _, _)| *i < firmware_starts[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_the_kernel_never_finishes_is_reset_by_the_watchdog() {
    // An image whose reboots halt the kernel after the teardown: the machine stops dead, as
    // one whose kernel hangs inside reboot(2) does, interrupts off. Only a hardware watchdog
    // can bring it back, and only if the kernel left it running: the image is built on
    // Debian's generic kernel, which has the VM's watchdog driver (the default image's cloud
    // kernel has none, and the kernel's own software watchdog stops with the kernel). This
    // also boots the generic kernel, the one for bare metal, through the whole node.
    let halting = image_on_kernel(
        "halt-on-reboot",
        "0.1.0-halt",
        &["plinth.fault=halt-on-reboot"],
        "linux-image-amd64",
    );
    let node = node_booting("halt-on-reboot", &halting);
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    let (before, _) = wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("first boot");
    let lines = vm.serial.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.text.contains("watchdog armed: i6300ESB")
                && l.text.contains("kept running through reboots")),
        "the hardware watchdog is not armed and kept through reboots:\n{}",
        vm.serial.tail(40)
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.text.contains("no hardware watchdog")),
        "the hardware watchdog was taken for the kernel's own:\n{}",
        vm.serial.tail(40)
    );

    reboot_and_wait(&node, &mut vm, &before).await;

    // The kernel halted, and the firmware started again after it: the watchdog's reset.
    let lines = vm.serial.lines();
    let halted = lines
        .iter()
        .position(|l| l.text.contains("System halted"))
        .unwrap_or_else(|| panic!("the kernel did not halt:\n{}", vm.serial.tail(60)));
    assert!(
        lines[halted..]
            .iter()
            .any(|l| l.text.contains("BdsDxe: starting")),
        "no boot after the halt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plinth_shutdown_powers_the_vm_off_with_state_and_ephemeral_unmounted_cleanly() {
    // A running node.
    let node = node("shutdown");
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");

    // `plinth shutdown`, then QEMU exits on its own.
    let endpoint = node.endpoint();
    let node2 = node.clone();
    let out = tokio::task::spawn_blocking(move || plinth(&node2, &["-e", &endpoint, "shutdown"]))
        .await
        .expect("cli");
    assert!(out.contains("shutdown started"), "{out}");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("QEMU exits by itself");
    assert!(status.success(), "QEMU exit status {status}");

    // The teardown ran without errors.
    let teardown = phases_on_console(&vm.serial.lines(), "shutdown");
    let names: Vec<&str> = teardown.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(names, TEARDOWN);
    assert!(teardown.iter().all(|(_, _, e)| e.is_none()), "{teardown:?}");

    // STATE and EPHEMERAL are clean ext4: nothing for the journal to recover on the next mount.
    for label in ["STATE", "EPHEMERAL"] {
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(e2fs_device(&node, label))
            .output()
            .expect("dumpe2fs");
        let text = String::from_utf8_lossy(&out.stdout);
        let state = text
            .lines()
            .find(|l| l.starts_with("Filesystem state:"))
            .unwrap_or("");
        assert!(state.ends_with("clean"), "{label}: {state}");
        let features = text
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or("");
        assert!(!features.contains("needs_recovery"), "{label}: {features}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acpi_power_button_shuts_the_node_down_in_order() {
    let node = node("power-button");
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");
    // The button's driver loads a few seconds after the boot (nothing on the way to the API
    // needs it): wait for machined to say it listens.
    vm.wait_for_line("listening for the power button", 0, Duration::from_secs(30))
        .expect("button listener");

    vm.press_power_button().expect("press");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("QEMU exits by itself");
    assert!(status.success(), "QEMU exit status {status}");
    let lines = vm.serial.lines();
    let shutdown = phases_on_console(&lines, "shutdown");
    let names: Vec<&str> = shutdown.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(names, TEARDOWN);
    let actor = lines
        .iter()
        .filter_map(|l| trace::parse_line(&l.text))
        .find(|e| matches!(&e.kind, sequencer::EventKind::SequenceStart { sequence } if sequence == "shutdown"))
        .and_then(|e| e.actor);
    assert_eq!(actor.as_deref(), Some("acpi:power-button"));
}
