//! A/B upgrades through OVMF: the new slot is tried once by BootNext and committed only when
//! healthy; a slot that panics or hangs lands the node back on the old one, which says why.

mod common;

use common::{bundle, plinth, status, upgradable_node, BOOT_TIMEOUT};
use vm_tests::node::wait_for_version;

fn slot<'a>(s: &'a api::proto::StatusResponse, name: &str) -> &'a api::proto::SlotStatus {
    s.slots
        .iter()
        .find(|x| x.slot == name)
        .expect("slot in status")
}

fn entry_of(s: &api::proto::StatusResponse, name: &str) -> u32 {
    let path = format!("\\EFI\\plinth\\{name}.efi");
    s.boot_entries
        .iter()
        .find(|e| e.path.contains(&path))
        .unwrap_or_else(|| panic!("no entry for {name}: {:?}", s.boot_entries))
        .number
}

/// Runs the CLI off the async runtime.
async fn cli(node: &vm_tests::node::PreparedNode, args: Vec<String>) -> String {
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plinth(&node, &args)
    })
    .await
    .expect("cli")
}

/// What a broken B does, and what the node must say about it afterwards.
struct FallBackCase {
    name: &'static str,
    cmdline: &'static [&'static str],
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_boots_b_by_boot_next_commits_it_and_a_second_upgrade_goes_back_into_a() {
    let b = bundle("v2", "0.2.0-test", &[]);
    let a2 = bundle("v3", "0.3.0-test", &[]);
    let node = upgradable_node("upgrade");
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    let (v1, _) = wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot A");
    assert_eq!(v1.slot, "A");

    // plinth upgrade --wait: streams the bundle, follows the reboot, reports the commit.
    let ep = node.endpoint();
    let out = cli(
        &node,
        vec![
            "-e".into(),
            ep.clone(),
            "upgrade".into(),
            "--image".into(),
            b.display().to_string(),
            "--wait".into(),
        ],
    )
    .await;
    assert!(
        out.contains("upgrade committed: slot B runs Plinth 0.2.0-test"),
        "{out}"
    );

    // B booted by BootNext (the firmware said so), is committed and first; A is the fallback.
    let (v2, _) = wait_for_version(&mut vm, &ep, &ctx, BOOT_TIMEOUT)
        .await
        .expect("B answers");
    assert_eq!(
        (
            v2.slot.as_str(),
            v2.version.as_str(),
            v2.root_partition.as_str()
        ),
        ("B", "0.2.0-test", "/dev/nvme0n1p4")
    );
    let s = status(&node).await;
    assert_eq!(s.committed, "B");
    assert_eq!(
        (slot(&s, "A").state.as_str(), slot(&s, "B").state.as_str()),
        ("good", "good")
    );
    let (a_entry, b_entry) = (entry_of(&s, "A"), entry_of(&s, "B"));
    assert_eq!(&s.boot_order[..2], &[b_entry, a_entry]);
    assert_eq!(s.boot_current, Some(b_entry));
    let started_b = format!("BdsDxe: starting Boot{b_entry:04X} \"Plinth B\"");
    assert!(
        vm.serial.find(&started_b, 0).is_some(),
        "the firmware never started B's entry"
    );

    // A second upgrade goes back into A.
    let out = cli(
        &node,
        vec![
            "-e".into(),
            ep.clone(),
            "upgrade".into(),
            "--image".into(),
            a2.display().to_string(),
            "--wait".into(),
        ],
    )
    .await;
    assert!(
        out.contains("upgrade committed: slot A runs Plinth 0.3.0-test"),
        "{out}"
    );
    let s = status(&node).await;
    assert_eq!((s.committed.as_str(), s.slot.as_str()), ("A", "A"));
    assert_eq!(&s.boot_order[..2], &[a_entry, b_entry]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b_that_panics_or_hangs_lands_the_node_back_on_a_which_says_why() {
    let cases = [
        FallBackCase {
            name: "panic",
            // No init in the initramfs: the kernel panics and panic=1 resets the machine.
            cmdline: &["rdinit=/nonexistent"],
            reason: "before machined started",
        },
        FallBackCase {
            name: "hang",
            // machined stops at the start of boot: the watchdog resets the machine.
            cmdline: &["plinth.fault=hang"],
            reason: "stopped after initialize/loadConfig",
        },
    ];
    for case in cases {
        let b = bundle(
            &format!("broken-{}", case.name),
            "0.2.0-broken",
            case.cmdline,
        );
        let node = upgradable_node(&format!("fallback-{}", case.name));
        let ctx = node.context().expect("context").clone();
        let mut vm = node.boot().expect("launch");
        wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
            .await
            .expect("boot A");

        // The upgrade itself succeeds; the trial fails.
        let ep = node.endpoint();
        let node2 = node.clone();
        let args = [
            "-e".to_string(),
            ep.clone(),
            "upgrade".into(),
            "--image".into(),
            b.display().to_string(),
            "--wait".into(),
        ];
        let (ok, text) = tokio::task::spawn_blocking(move || common::plinth_output(&node2, &args))
            .await
            .expect("cli");
        assert!(
            !ok,
            "{}: a failed trial must fail `plinth upgrade --wait`: {text}",
            case.name
        );
        assert!(
            text.contains("upgrade failed") && text.contains(case.reason),
            "{}: {text}",
            case.name
        );

        // Back on A by itself; Status says B failed and why.
        let s = status(&node).await;
        assert_eq!(
            (s.slot.as_str(), s.committed.as_str()),
            ("A", "A"),
            "{}",
            case.name
        );
        assert_eq!(slot(&s, "B").state, "failed", "{}", case.name);
        let f = s.last_failure.expect("last failure");
        assert_eq!(f.slot, "B");
        assert!(
            f.reason.contains(case.reason),
            "{}: {}",
            case.name,
            f.reason
        );
        drop(vm);
    }
}
