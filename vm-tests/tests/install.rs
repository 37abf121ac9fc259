//! Install from media through OVMF's Secure Boot build in Setup Mode, with a TPM: a blank NVMe
//! disk and the installer media; the node waits in maintenance mode, takes a config with an
//! install target over TLS, installs (its STATE and EPHEMERAL encrypted with keys sealed to the
//! TPM), enrols the media's Secure Boot keys, reboots, and, with the media gone, boots from the
//! disk it wrote under Secure Boot and answers over mTLS from slot A. Then the disk is attacked:
//! read from the host, moved to a machine with another TPM, and its old key header put back
//! after a reset crypto-erased it.

mod common;

use std::time::Duration;

use common::{artifacts, plinth, signing_key, upgradable_node, BOOT_TIMEOUT};
use vm_tests::node::wait_for_version;
use vm_tests::qemu::{Firmware, Vm};

/// How long the install itself may take under TCG (partition, format, write and verify slot A).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_disk_is_installed_from_media_and_boots_slot_a_without_it() {
    let (node, media) = blank_machine_with_media("install");
    let dir = node.spec.dir.clone();

    // Boot the media on firmware in Setup Mode (no keys enrolled: anything boots): maintenance
    // mode, an address from DHCP, the fingerprint on the console.
    let mut spec = node.vm_spec();
    spec.media = Some(media);
    spec.firmware = Firmware::SecureBoot {
        vars: vm_tests::firmware::OVMF_VARS.into(),
    };
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

    // The blank disk is; and the config refuses to run unencrypted.
    let out = apply(
        with("  install:\n    disk: /dev/nvme0n1\n  encryption:\n    without_tpm: refuse\n"),
        true,
    )
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
        "enrolSecureBoot",
        "commit",
        "writeConfig",
    ] {
        assert!(
            install_trace.contains(&format!("\"sequence\":\"install\",\"phase\":\"{phase}\"")),
            "install phase {phase} missing from the trace"
        );
    }
    for said in [
        "STATE: new encrypted volume, key sealed to the TPM",
        "EPHEMERAL: new encrypted volume, key sealed to the TPM",
        "enrolled the media's Secure Boot keys",
    ] {
        assert!(
            install_trace.contains(said),
            "{said:?} missing from the console"
        );
    }
    vm.kill();

    // Media detached: the firmware boots the disk through the entry the installer made.
    spec.media = None;
    let mut vm = Vm::launch(spec.clone()).expect("relaunch");
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

    // The chain of trust: Secure Boot on with the keys the install enrolled, the root verified
    // by dm-verity, both volumes encrypted with keys sealed to PCR 7 (re-sealed on this first
    // boot under Secure Boot) and the signed PCR 11 policy.
    let t = status.trust.expect("trust");
    assert_eq!(t.secure_boot, "on");
    assert_eq!(t.verity_state, "verified");
    assert_eq!(t.verity_root.len(), 64);
    assert_eq!(t.tpm, "TPM 2.0");
    for label in ["STATE", "EPHEMERAL"] {
        let v = t
            .volumes
            .iter()
            .find(|v| v.label == label)
            .unwrap_or_else(|| panic!("{label} in {:?}", t.volumes));
        assert!(v.encrypted, "{label}: {}", v.detail);
        assert_eq!(v.pcrs, [7, 11], "{label}: {}", v.detail);
    }
    assert_eq!(t.pcrs.iter().map(|p| p.index).collect::<Vec<_>>(), [7, 11]);
    assert!(out.contains("Secure Boot: on"), "{out}");

    // From the host: STATE holds the config, its CA and its key, but none of it in the clear.
    let (offset, len) = common::partition(&node, "STATE");
    let raw = read_range(&node.disk, offset, len);
    for needle in [
        &b"config.yaml"[..],
        b"-----BEGIN",
        b"PRIVATE KEY",
        b"machine:",
        b"trusted_keys",
    ] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "{} found in STATE's raw bytes",
            String::from_utf8_lossy(needle)
        );
    }
    assert_eq!(
        &raw[..8],
        b"PLNTSEAL",
        "STATE starts with its sealed-key header"
    );
    drop(raw);

    // A second boot unseals with PCR 7 bound.
    let booted = v.boot_id.clone();
    plinth(&node, &["-e", &ep, "reboot", "--wait"]);
    let (v2, _) = wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
        .await
        .expect("second boot");
    assert_ne!(v2.boot_id, booted);

    // The disk moved to another machine (the same firmware keys, another TPM): nothing unseals,
    // the node stays up in maintenance mode, says why, and refuses configs.
    plinth(&node, &["-e", &ep, "shutdown"]);
    vm.wait_exit(Duration::from_secs(120)).expect("off");
    drop(vm);
    let mut other = spec.clone();
    other.tpm = Some(dir.join("vm/tpm-of-another-machine"));
    let mut vm = Vm::launch(other).expect("launch with another TPM");
    let (_, why) = vm
        .wait_for_line("STATE cannot be unlocked", 0, BOOT_TIMEOUT)
        .expect("the node says it cannot unseal STATE");
    assert!(why.text.contains("another machine's TPM"), "{}", why.text);
    let fp = maintenance_fingerprint(&mut vm);
    let mut c = api::client::connect_insecure(&ep, Some(fp))
        .await
        .expect("maintenance API");
    let s = c
        .status(api::proto::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.state, "maintenance");
    let locked = s.trust.expect("trust").volumes;
    assert!(
        locked
            .iter()
            .all(|v| v.encrypted && v.detail.contains("locked")),
        "{locked:?}"
    );
    let err = c
        .apply_configuration(api::proto::ApplyConfigurationRequest {
            data: base.clone(),
            ..Default::default()
        })
        .await
        .expect_err("a locked node takes no config");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("locked"), "{}", err.message());
    vm.kill();

    // Back in its own machine; someone copies STATE's header (the sealed key) off the disk, then
    // the node is reset. The reset crypto-erases: the header is zeroed and the TPM's parent keys
    // evicted, so the copy is worthless even with this TPM.
    let mut vm = Vm::launch(spec.clone()).expect("relaunch");
    wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
        .await
        .expect("boots with its own TPM");
    let header = read_range(&node.disk, offset, 1 << 20);
    let out = plinth(
        &node,
        &["-e", &ep, "reset", "--wipe", "STATE,EPHEMERAL", "--reboot"],
    );
    assert!(out.contains("reset started"), "{out}");
    vm.wait_for_line("maintenance mode: no node config", 0, BOOT_TIMEOUT)
        .expect("maintenance mode after the reset");
    assert!(
        vm.serial.find("crypto-erased STATE", 0).is_some(),
        "the reset crypto-erased STATE"
    );
    vm.kill();
    write_range(&node.disk, offset, &header);
    let mut vm = Vm::launch(spec).expect("relaunch with the old header");
    let (_, why) = vm
        .wait_for_line("STATE cannot be unlocked", 0, BOOT_TIMEOUT)
        .expect("the old header does not unseal");
    assert!(
        why.text.contains("holds no parent key") || why.text.contains("does not belong"),
        "{}",
        why.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firmware_holding_other_secure_boot_keys_is_refused_before_anything_is_written() {
    // A machine whose firmware holds someone else's keys, with Secure Boot turned off (so the
    // media boot): what the install would write could never boot once it is turned on.
    let (node, media) = blank_machine_with_media("install-foreign-keys");
    let dir = node.spec.dir.clone();
    let other_keys = dir.join("other-keys");
    imager::secureboot::generate(&other_keys, "Someone else").expect("other keys");
    let mut spec = node.vm_spec();
    spec.media = Some(media);
    spec.firmware = Firmware::SecureBoot {
        vars: vm_tests::firmware::vars_with(&other_keys, false).expect("vars"),
    };
    let mut vm = Vm::launch(spec).expect("launch");
    let fp = maintenance_fingerprint(&mut vm);
    let base = std::fs::read_to_string(dir.join("node.yaml")).expect("node.yaml");
    let cfg = base.replacen(
        "machine:\n",
        "machine:\n  install:\n    disk: /dev/nvme0n1\n",
        1,
    );
    let mut c = api::client::connect_insecure(&node.endpoint(), Some(fp))
        .await
        .expect("maintenance API");
    let err = c
        .apply_configuration(api::proto::ApplyConfigurationRequest {
            data: cfg,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("holds other Secure Boot keys (Secure Boot off, not in Setup Mode)")
            && err.message().contains("EFI/plinth/keys/db.auth"),
        "{}",
        err.message()
    );
    vm.kill();
    // Nothing was written: the disk is still blank at both ends.
    let len = std::fs::metadata(&node.disk).expect("disk").len();
    for at in [0, len - (1 << 20)] {
        assert!(
            read_range(&node.disk, at, 1 << 20).iter().all(|&b| b == 0),
            "the disk was written at {at}"
        );
    }
}

/// A node's configs (PKI, trusted key) as for any node, its disk replaced by a blank one, and
/// installer media: the image's UKI and root, and its bundle signed by the trusted key.
fn blank_machine_with_media(name: &str) -> (common::TestNode, std::path::PathBuf) {
    let node = upgradable_node(name);
    let dir = node.spec.dir.clone();
    let blank = std::fs::File::create(&node.disk).expect("blank disk");
    blank.set_len(2048 << 20).expect("size");
    drop(blank);
    let a = artifacts();
    let bundle = dir.join("bundle.plinth");
    std::fs::write(&bundle, imager::bundle(&a, &signing_key()).expect("bundle")).expect("write");
    let media = dir.join("installer.raw");
    imager::disk::installer(&a, &bundle, &media, &dir.join("work")).expect("installer media");
    (node, media)
}

fn maintenance_fingerprint(vm: &mut Vm) -> String {
    let (_, line) = vm
        .wait_for_line("certificate SHA-256", 0, BOOT_TIMEOUT)
        .expect("fingerprint");
    line.text
        .split("certificate SHA-256 ")
        .nth(1)
        .map(|s| s.trim_end_matches(':').trim().to_string())
        .expect("fingerprint")
}

fn read_range(disk: &std::path::Path, offset: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(disk).expect("disk");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).expect("read");
    buf
}

fn write_range(disk: &std::path::Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("disk");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}
