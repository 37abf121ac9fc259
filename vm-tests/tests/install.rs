//! Install from media through OVMF: a blank NVMe disk and the installer media; the node waits
//! in maintenance mode, takes a config with an install target over TLS, installs, reboots,
//! and, with the media gone, boots from the disk it wrote and answers over mTLS from slot A.

mod common;

use std::time::Duration;

use common::{artifacts, plinth, signing_key, upgradable_node, BOOT_TIMEOUT};
use vm_tests::node::wait_for_version;
use vm_tests::qemu::Vm;

/// How long the install itself may take under TCG (partition, format, write and verify slot A).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_disk_is_installed_from_media_and_boots_slot_a_without_it() {
    // The node's configs (PKI, trusted key) as for any node; its disk is replaced by a blank one.
    let node = upgradable_node("install");
    let dir = node.spec.dir.clone();
    let blank = std::fs::File::create(&node.disk).expect("blank disk");
    blank.set_len(2048 << 20).expect("size");
    drop(blank);

    // Installer media: the image's UKI and root, and its bundle signed by the trusted key.
    let a = artifacts();
    let bundle = dir.join("bundle.plinth");
    std::fs::write(&bundle, imager::bundle(&a, &signing_key()).expect("bundle")).expect("write");
    let media = dir.join("installer.raw");
    imager::disk::installer(&a, &bundle, &media, &dir.join("work")).expect("installer media");

    // Boot the media: maintenance mode, an address from DHCP, the fingerprint on the console.
    let mut spec = node.vm_spec();
    spec.media = Some(media);
    let mut vm = Vm::launch(spec.clone()).expect("launch");
    let (_, line) = vm
        .wait_for_line("certificate SHA-256", 0, BOOT_TIMEOUT)
        .expect("maintenance mode on the media");
    let fp = line
        .text
        .split("certificate SHA-256 ")
        .nth(1)
        .map(|s| s.trim_end_matches(':').trim().to_string())
        .expect("fingerprint");
    vm.wait_for_line("addresses: eth0 10.0.2.15/24", 0, Duration::from_secs(5))
        .expect("a DHCP lease");

    let ep = node.endpoint();
    let base = std::fs::read_to_string(dir.join("node.yaml")).expect("node.yaml");
    let with = |install: &str| {
        let text = base.replacen("machine:\n", &format!("machine:\n{install}"), 1);
        let p = dir.join("install.yaml");
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let apply = |file: String, expect_ok: bool| {
        let n = node.clone();
        let ep = ep.clone();
        let fp = fp.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(common::plinth_cli())
                .args(["apply-config", "--insecure", "--cert-fingerprint", &fp])
                .args(["-e", &ep, "-f", &file])
                .env("PLINTHCONFIG", n.spec.dir.join("plinthconfig"))
                .output()
                .expect("plinth");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.success(), expect_ok, "{text}");
            text
        })
    };

    // The media itself is not a target; the refusal names why and changes nothing.
    let out = apply(with("  install:\n    disk: /dev/vda\n"), false)
        .await
        .expect("cli");
    assert!(
        out.contains("/dev/vda is the installer media itself"),
        "{out}"
    );

    // The blank disk is.
    let out = apply(with("  install:\n    disk: /dev/nvme0n1\n"), true)
        .await
        .expect("cli");
    assert!(out.contains("config applied"), "{out}");
    vm.wait_for_line(
        "installed on /dev/nvme0n1; rebooting into it",
        0,
        INSTALL_TIMEOUT,
    )
    .expect("install");
    let (_, done) = vm
        .wait_for_line("reboot: Restarting system", 0, Duration::from_secs(120))
        .expect("reboot");
    let _ = std::fs::copy(spec.serial_log(), dir.join("install-serial.log"));
    let install_trace: String = vm
        .serial
        .lines()
        .into_iter()
        .map(|l| l.text + "\n")
        .collect();
    assert!(done.at > Duration::ZERO);
    for phase in [
        "checkTarget",
        "partition",
        "format",
        "writeSlot",
        "verifySlot",
        "commit",
        "writeConfig",
    ] {
        assert!(
            install_trace.contains(&format!("\"sequence\":\"install\",\"phase\":\"{phase}\"")),
            "install phase {phase} missing from the trace"
        );
    }
    vm.kill();

    // Media detached: the firmware boots the disk through the entry the installer made.
    spec.media = None;
    let mut vm = Vm::launch(spec).expect("relaunch");
    let ctx = node.context().expect("context").clone();
    let (v, _) = wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
        .await
        .expect("the installed node answers over mTLS");
    assert_eq!(v.slot, "A");
    let (_, firmware) = vm
        .wait_for_line("BdsDxe: starting", 0, Duration::from_secs(1))
        .expect("firmware line");
    assert!(firmware.text.contains("\"Plinth A\""), "{}", firmware.text);

    let status = common::status(&node).await;
    let a = status
        .boot_entries
        .iter()
        .find(|e| e.description == "Plinth A")
        .expect("an entry for slot A");
    assert!(
        a.path.contains("HD(1,GPT,") && a.path.contains("\\EFI\\plinth\\A.efi"),
        "{}",
        a.path
    );
    assert_eq!(status.boot_current, Some(a.number));
    assert_eq!(status.boot_order.first(), Some(&a.number));
    // Slot B is empty: it gets its entry when an upgrade has written and verified it.
    assert!(
        !status
            .boot_entries
            .iter()
            .any(|e| e.description == "Plinth B"),
        "{:?}",
        status.boot_entries
    );
    let out = plinth(&node, &["-e", &ep, "status"]);
    assert!(out.contains("Plinth A"), "{out}");
}
