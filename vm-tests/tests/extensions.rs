//! System extensions: a signed extension (a web page and Debian's busybox) is checked, mapped
//! through dm-verity and overlaid on /usr/local, and a service runs a program from it; one
//! signed by another key, one with a flipped byte, one built for another extension level and
//! one holding a setuid file are each refused with their reason while the node boots. A
//! program from the extension also shows the cgroup v2 controllers handed down below the root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::proto::{ExtensionListRequest, ServiceListRequest};
use common::{node_with_extensions, signing_key, workspace, BOOT_TIMEOUT};
use config::{HealthCheck, Service};
use imager::extension::ExtensionOptions;
use upgrade::extension as ext;
use vm_tests::node::wait_for_version;

fn work() -> PathBuf {
    workspace().join("target/vm-tests/extensions-build")
}

/// Builds an extension named `name` from `tree` (and Debian packages) with the imager, as
/// `plinth image extension` does.
fn pack(
    name: &str,
    tree: &Path,
    debs: &[&str],
    level: u32,
    key: &upgrade::bundle::SigningKey,
) -> PathBuf {
    let opts = ExtensionOptions {
        name: name.into(),
        version: "1.0".into(),
        dir: Some(tree.to_path_buf()),
        debs: debs.iter().map(|d| d.to_string()).collect(),
        programs: Vec::new(),
        cache: workspace().join("target/vm-tests/cache"),
        staging: work().join(format!("{name}.staging")),
        level,
    };
    let (bytes, _) =
        imager::extension::build(&opts, key).unwrap_or_else(|e| panic!("packing {name}: {e}"));
    let out = work().join(format!("{name}.ext"));
    std::fs::write(&out, bytes).expect("writing the extension");
    out
}

/// A service running busybox from the extension with `args`.
fn busybox(name: &str, args: &[&str], health: Option<HealthCheck>) -> Service {
    let mut command = vec!["/usr/local/bin/busybox".to_string()];
    command.extend(args.iter().map(|a| a.to_string()));
    Service {
        health,
        ..common::service(name, command)
    }
}

/// An extension of one small file, `/usr/local/share/NAME`.
fn small(name: &str, level: u32, key: &upgrade::bundle::SigningKey) -> PathBuf {
    let rel = format!("usr/local/share/{name}");
    pack(name, &tree(name, &rel, "x\n"), &[], level, key)
}

/// A tree under usr/local with a file at `rel` holding `text`.
fn tree(name: &str, rel: &str, text: &str) -> PathBuf {
    let root = work().join(format!("{name}.tree"));
    let _ = std::fs::remove_dir_all(&root);
    let file = root.join(rel);
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&file, text).expect("write");
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_extension_is_overlaid_and_runs_while_tampered_ones_are_refused_by_reason() {
    let _ = std::fs::remove_dir_all(work());
    std::fs::create_dir_all(work()).expect("mkdir");
    let key = signing_key();
    let page = "served from a system extension\n";

    // The good one: a page, and busybox from Debian's package (to /usr/local/bin).
    let web = pack(
        "web",
        &tree("web", "usr/local/share/www/index.html", page),
        &["busybox-static"],
        ext::LEVEL,
        &key,
    );
    // Signed by a key the node does not trust.
    let other = upgrade::bundle::SigningKey::from_bytes(&[7; 32]);
    let unsigned = small("unsigned", ext::LEVEL, &other);
    // One byte flipped in its image, after signing.
    let flipped = small("flipped", ext::LEVEL, &key);
    let mut bytes = std::fs::read(&flipped).expect("read");
    let head = ext::read_head(&bytes, &[key.verifying_key()]).expect("head");
    bytes[head.image_offset as usize + 1000] ^= 0x01;
    std::fs::write(&flipped, bytes).expect("write");
    // Built for the next extension level.
    let future = small("future", ext::LEVEL + 1, &key);
    // A setuid file, signed: the imager refuses to pack it, so it is packed by hand.
    let suid_tree = tree("suid", "usr/local/bin/su", "#!/bin/false\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        suid_tree.join("usr/local/bin/su"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("chmod");
    std::fs::create_dir_all(suid_tree.join(ext::RELEASE_DIR)).expect("mkdir");
    std::fs::write(
        suid_tree.join(ext::release_path("suid")),
        ext::release_record("1.0", ext::LEVEL, std::env::consts::ARCH),
    )
    .expect("record");
    let sqfs = work().join("suid.squashfs");
    let ok = std::process::Command::new("mksquashfs")
        .arg(&suid_tree)
        .arg(&sqfs)
        .args(["-noappend", "-all-root", "-no-xattrs", "-quiet"])
        .status()
        .expect("mksquashfs");
    assert!(ok.success());
    let suid = work().join("suid.ext");
    let signed = ext::build(
        "suid",
        "1.0",
        ext::LEVEL,
        std::env::consts::ARCH,
        std::fs::read(&sqfs).expect("read"),
        &key,
    )
    .expect("sign");
    std::fs::write(&suid, signed).expect("write");

    // A service runs busybox's web server from the extension, healthy when it answers.
    let www = busybox(
        "www",
        &[
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:8080",
            "-h",
            "/usr/local/share/www",
        ],
        Some(HealthCheck::Tcp("127.0.0.1:8080".into())),
    );
    // Another shows what the cgroup v2 root hands down to services and containers.
    let cgroups = busybox(
        "cgroups",
        &[
            "sh",
            "-c",
            "echo subtree: $(cat /sys/fs/cgroup/cgroup.subtree_control); exec sleep 100000",
        ],
        None,
    );
    let node = node_with_extensions(
        "extensions",
        vec![web, unsigned, flipped, future, suid],
        vec![www, cgroups],
    );
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("the node boots with its refused extensions left out");

    let list = common::poll_api(
        &node,
        120,
        "extensions never listed",
        |mut client| async move {
            let list = client
                .extension_list(ExtensionListRequest {})
                .await?
                .into_inner();
            Ok(if list.extensions.len() == 5 {
                Ok(list)
            } else {
                Err(format!("{list:?}"))
            })
        },
    )
    .await;
    let get = |n: &str| {
        list.extensions
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n} not listed: {list:?}"))
    };
    let web = get("web");
    assert!(web.active, "{web:?}");
    assert_eq!(web.version, "1.0");
    assert_eq!(web.digest.len(), 64);
    for (name, reason) in [
        ("unsigned", "signature"),
        ("flipped", "digest"),
        ("future", "level"),
        ("suid", "setuid"),
    ] {
        let e = get(name);
        assert!(!e.active, "{e:?}");
        assert_eq!(e.refused_reason, reason, "{e:?}");
    }
    // Signed ones refused later still say what they are.
    assert_eq!(get("future").level, ext::LEVEL + 1);
    assert_eq!(get("flipped").version, "1.0");
    assert!(
        get("suid").refused_message.contains("/usr/local/bin/su"),
        "{:?}",
        get("suid")
    );

    // The service from the extension comes up healthy: /usr/local is the overlay.
    common::poll_api(
        &node,
        120,
        "www from the extension never became healthy",
        |mut client| async move {
            let services = client
                .service_list(ServiceListRequest {})
                .await?
                .into_inner()
                .services;
            Ok(if services.iter().any(|s| s.name == "www" && s.healthy) {
                Ok(())
            } else {
                Err(format!("{services:?}"))
            })
        },
    )
    .await;

    // cgroup v2 is mounted with the controllers containers need enabled below the root.
    let n1 = node.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = n1.clone();
        let logs = tokio::task::spawn_blocking(move || {
            common::plinth_output(&n, &["-e", &n.endpoint(), "logs", "cgroups"]).1
        })
        .await
        .expect("cli");
        if let Some(line) = logs.lines().find(|l| l.contains("subtree:")) {
            for c in ["cpu", "cpuset", "io", "memory", "pids"] {
                assert!(
                    line.split_whitespace().any(|w| w == c),
                    "{c} not enabled: {line}"
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "no cgroup line in: {logs}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The CLI shows the same, and each refusal is an event with its reason.
    let n2 = node.clone();
    let (table, events) = tokio::task::spawn_blocking(move || {
        (
            common::plinth(&n2, &["-e", &n2.endpoint(), "get", "extensions"]),
            common::plinth(&n2, &["-e", &n2.endpoint(), "events", "--tail", "400"]),
        )
    })
    .await
    .expect("cli");
    println!("{table}");
    assert!(table.contains("web") && table.contains("active"), "{table}");
    assert!(table.contains("refused (setuid)"), "{table}");
    for line in [
        "extension web active",
        "extension unsigned refused: signature",
        "extension flipped refused: digest",
        "extension future refused: level",
        "extension suid refused: setuid",
    ] {
        assert!(events.contains(line), "no {line:?} in:\n{events}");
    }

    // An orderly shutdown takes the extension down before the ESP it lives on: every file
    // system unmounts.
    let failed = common::shutdown_failures(&node, &mut vm).await;
    assert!(failed.is_empty(), "shutdown phases failed: {failed:?}");
}
