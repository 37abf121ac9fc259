//! Install on the simulated machine, through the API: a blank disk and installer media; the
//! node waits in maintenance mode, refuses targets it must not touch, installs from the media's
//! bundle, reboots, and boots slot A from the disk it wrote.

mod common;

use api::proto::{ApplyConfigurationRequest, ApplyMode};
use common::start_installer;

async fn apply(node: &common::SimNode, cfg: &config::NodeConfig) -> Result<String, String> {
    let fp = node.maintenance_fingerprint().await;
    let mut c = api::client::connect_insecure(&node.endpoint, Some(fp))
        .await
        .map_err(|e| e.to_string())?;
    c.apply_configuration(ApplyConfigurationRequest {
        data: cfg.to_yaml().expect("yaml"),
        mode: ApplyMode::NoReboot as i32,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().summary)
    .map_err(|s| s.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_disk_is_installed_from_media_and_the_node_boots_it() {
    let (node, mut cfg) = start_installer("1.5-sim");
    let machine = node.machine();
    let disk = machine.join("disk.img").display().to_string();
    let media = machine.join("media.img").display().to_string();

    // On media, without a target, the config is refused and nothing changes.
    let err = apply(&node, &cfg).await.expect_err("no target");
    assert!(err.contains("machine.install"), "{err}");
    // The media itself is not a target.
    cfg.machine.install = Some(config::node::Install {
        disk: media.clone(),
        wipe: true,
    });
    let err = apply(&node, &cfg).await.expect_err("the media");
    assert!(err.contains("is the installer media itself"), "{err}");
    // ... under another name either (as /dev/disk/by-id links name disks).
    let alias = machine.join("alias.img");
    std::os::unix::fs::symlink(&media, &alias).expect("symlink");
    cfg.machine.install = Some(config::node::Install {
        disk: alias.display().to_string(),
        wipe: true,
    });
    let err = apply(&node, &cfg)
        .await
        .expect_err("the media by another name");
    assert!(err.contains("is the installer media itself"), "{err}");
    // A partition is not a target.
    cfg.machine.install = Some(config::node::Install {
        disk: format!("{media}#2"),
        wipe: true,
    });
    let err = apply(&node, &cfg).await.expect_err("a partition");
    assert!(err.contains("is a partition"), "{err}");

    // A config that refuses unencrypted volumes, on a machine without a TPM.
    cfg.machine.install = Some(config::node::Install {
        disk: disk.clone(),
        wipe: false,
    });
    cfg.machine.encryption.without_tpm = config::WithoutTpm::Refuse;
    let err = apply(&node, &cfg).await.expect_err("no TPM to seal to");
    assert!(
        err.contains(
            "without_tpm is refuse, and this machine cannot seal keys to a TPM (it has no TPM)"
        ),
        "{err}"
    );
    cfg.machine.encryption.without_tpm = config::WithoutTpm::Unencrypted;

    let out = apply(&node, &cfg).await.expect("install");
    assert!(out.contains("config applied"), "{out}");

    // Installed, rebooted, running from the disk with the applied config over mTLS.
    let v = node.version_after(None).await;
    assert_eq!((v.slot.as_str(), v.version.as_str()), ("A", "1.5-sim"));
    let console = node.console();
    assert!(
        console.contains(&format!("installed on {disk}")),
        "{console}"
    );
    let s = node.status().await;
    let a = s
        .boot_entries
        .iter()
        .find(|e| e.description == "Plinth A")
        .expect("an entry for slot A");
    assert_eq!(s.boot_order.first(), Some(&a.number));
    assert_eq!(s.boot_current, Some(a.number));
    assert_eq!(s.committed, "A");
    let rec = s.slots.iter().find(|r| r.slot == "A").expect("A's record");
    assert_eq!(
        (rec.state.as_str(), rec.version.as_str()),
        ("good", "1.5-sim")
    );

    // The install ran its phase table, in order (the trace of the installer's boot).
    let started: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("\"kind\":\"phase_start\",\"sequence\":\"install\""))
        .filter_map(|l| l.split("\"phase\":\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        started,
        [
            "checkTarget",
            "partition",
            "format",
            "mountEsp",
            "readBundle",
            "receiveUki",
            "writeSlot",
            "verifySlot",
            "installUki",
            "markWritten",
            "installFallback",
            "enrolSecureBoot",
            "commit",
            "writeConfig"
        ]
    );
}
