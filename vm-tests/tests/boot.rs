//! A node boots through real UEFI firmware into machined and answers over mutual TLS.

mod common;

use std::time::Duration;

use api::pki::{Ca, ClientSpec};
use api::proto::VersionRequest;
use api::Role;
use common::{node, plinth, BOOT_TIMEOUT};
use vm_tests::node::wait_for_version;
use vm_tests::timeline::Timeline;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_boots_through_ovmf_into_machined_and_answers_version_over_mtls() {
    // Prepare a node: PKI, node config on STATE, slot A installed.
    let node = node("boot");
    let ctx = node.context().expect("admin context").clone();

    // Boot it through OVMF.
    let mut vm = node.boot().expect("launch QEMU");

    // The firmware starts our UKI from the NVMe disk.
    vm.wait_for_line("BdsDxe: starting", 0, BOOT_TIMEOUT)
        .expect("firmware starts a boot entry");

    // The API answers Version over mTLS: slot A, machined is PID 1, root is SquashFS on ROOT-A.
    let (version, ready) = wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(version.slot, "A");
    assert_eq!(version.machined_pid, 1);
    assert_eq!(version.root_fstype, "squashfs");
    assert_eq!(
        (
            version.root_source.as_str(),
            version.root_partition.as_str()
        ),
        ("/dev/dm-0", "/dev/nvme0n1p3"),
        "the root is the dm-verity mapping of ROOT-A (partition 3)"
    );
    assert_eq!(version.node_name, "boot");

    // A client without a certificate is refused with an error that says so, without hanging.
    let no_cert = api::tls::client_config(&ctx.ca, None).expect("tls");
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = api::client::connect(&node.endpoint(), no_cert)
            .await
            .map_err(|e| e.to_string())?;
        c.version(VersionRequest {})
            .await
            .map(|_| ())
            .map_err(|s| api::client::describe_status(&s))
    })
    .await
    .expect("refusal must not hang")
    .expect_err("no certificate must be refused");
    assert!(err.contains("requires a client certificate"), "{err}");

    // A client signed by another CA is refused.
    let other = Ca::generate("other").expect("ca");
    let foreign = other
        .issue_client(&ClientSpec::new("mallory", Role::Admin))
        .expect("cert");
    let foreign_tls =
        api::tls::client_config(&ctx.ca, Some((&foreign.cert_pem, &foreign.key_pem))).expect("tls");
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = api::client::connect(&node.endpoint(), foreign_tls)
            .await
            .map_err(|e| e.to_string())?;
        c.version(VersionRequest {})
            .await
            .map(|_| ())
            .map_err(|s| api::client::describe_status(&s))
    })
    .await
    .expect("refusal must not hang")
    .expect_err("a foreign CA must be refused");
    assert!(err.contains("not signed by the node's CA"), "{err}");

    // The boot trace shows the phases in order, initramfs first, then machined's boot.
    let timeline = Timeline::from_lines(&vm.serial.lines(), Some(ready));
    println!("{}", timeline.render());
    let order = timeline.phase_order();
    assert_eq!(
        order,
        [
            "initramfs/mountPseudoFilesystems",
            "initramfs/loadModules",
            "initramfs/findBootDisk",
            "initramfs/mapRoot",
            "initramfs/mountRoot",
            "initramfs/switchRoot",
            "initialize/handover",
            "initialize/mountPartitions",
            "initialize/loadConfig",
            "boot/network",
            "boot/mountExtensions",
            "boot/startServices",
            "boot/waitServicesHealthy",
        ]
    );
    assert!(timeline
        .phases()
        .iter()
        .all(|p| p.duration.is_some() && p.error.is_none()));
    // `plinth dmesg` shows the node's kernel log.
    let node3 = node.clone();
    let ep3 = node.endpoint();
    let dmesg = tokio::task::spawn_blocking(move || plinth(&node3, &["-e", &ep3, "dmesg"]))
        .await
        .expect("cli");
    assert!(
        dmesg.contains("Linux version") && dmesg.contains("Command line:"),
        "{dmesg}"
    );

    // `plinth bootchart` writes a Chrome trace with every phase and an SVG that parses.
    let out_dir = node.spec.dir.join("bootchart");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let endpoint = node.endpoint();
    let node2 = node.clone();
    let dir_arg = out_dir.display().to_string();
    tokio::task::spawn_blocking(move || {
        plinth(&node2, &["-e", &endpoint, "bootchart", "-o", &dir_arg])
    })
    .await
    .expect("cli");
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("bootchart.json")).expect("json file"))
            .expect("valid JSON");
    let slices: Vec<&str> = trace["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| e["name"].as_str())
        .collect();
    let svg = std::fs::read_to_string(out_dir.join("bootchart.svg")).expect("svg file");
    let doc = roxmltree::Document::parse(&svg).expect("SVG parses");
    let texts: String = doc
        .descendants()
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n");
    for p in &order {
        let phase = p.split('/').nth(1).expect("phase");
        assert!(
            slices.iter().any(|s| s.contains(phase)),
            "trace lacks {phase}"
        );
        assert!(texts.contains(phase), "SVG lacks {phase}");
    }
    if std::env::var_os("PLINTH_SAVE_BOOTCHART").is_some() {
        let docs = common::workspace().join("docs");
        std::fs::copy(out_dir.join("bootchart.svg"), docs.join("bootchart-vm.svg")).expect("copy");
    }

    let fw = timeline
        .firmware_start_entry
        .as_ref()
        .map(|(_, l)| l.clone())
        .unwrap_or_default();
    assert!(fw.contains("NVMe"), "firmware started {fw:?}");
}
