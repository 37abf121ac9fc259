//! Power cuts at every write step (enumerated, not sampled) of an upgrade with its commit, and
//! of a reset: after each, the machine powers on again through the emulated firmware and the
//! node must be on a good slot with META readable, and, unless the reset already wiped it, its
//! config on STATE.

mod common;

use std::time::{Duration, Instant};

use api::proto::{
    ApplyConfigurationRequest, ApplyMode, ResetRequest, StatusRequest, StatusResponse, WipeMethod,
};
use common::{sim_bundle, start_env, SimNode};

/// The power-cut exit status (`phases::platform::sim::fault::POWER_CUT_STATUS`).
const CUT: i32 = 86;

/// The steps logged so far: (number, what).
fn steps(log: &std::path::Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (n, what) = l.split_once('\t')?;
            Some((n.parse().ok()?, what.to_string()))
        })
        .collect()
}

/// How the node came back after a power cut.
#[derive(Debug)]
enum Back {
    /// Running with its config (mTLS).
    Running(StatusResponse),
    /// In maintenance mode (no config: the reset had wiped STATE).
    Maintenance(StatusResponse),
}

/// Waits for the relaunched node (console from `offset` on) to run or wait in maintenance.
async fn came_back(node: &SimNode, offset: usize) -> Back {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let console = node.console();
        let fresh = console.get(offset..).unwrap_or_default();
        if let Some(fp) = fresh.lines().find_map(|l| {
            l.split("certificate SHA-256 ")
                .nth(1)
                .map(|r| r.trim_end_matches(':').trim().to_string())
        }) {
            if let Ok(mut c) = api::client::connect_insecure(&node.endpoint, Some(fp)).await {
                if let Ok(s) = c.status(StatusRequest {}).await {
                    return Back::Maintenance(s.into_inner());
                }
            }
        } else if let Ok(mut c) = api::client::connect_context(&node.endpoint, &node.ctx).await {
            if let Ok(s) = c.status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.state == "running" {
                    return Back::Running(s);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the node did not come back; console:\n{fresh}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The booted slot is good in a readable META (Status reads it from the disk).
fn on_a_good_slot(s: &StatusResponse) -> Result<(), String> {
    let me = s
        .slots
        .iter()
        .find(|r| r.slot == s.slot)
        .ok_or_else(|| format!("META has no record of the booted slot {}", s.slot))?;
    if me.state != "good" {
        return Err(format!("booted slot {} is {}", s.slot, me.state));
    }
    Ok(())
}

/// Runs `scenario` on a node whose power is cut at step `n`, then powers it on again.
async fn cut_at<F, Fut>(n: u64, what: &str, scenario: F) -> (SimNode, Back)
where
    F: FnOnce(SimNode) -> Fut,
    Fut: std::future::Future<Output = SimNode>,
{
    let node = start_env(&[("PLINTH_SIM_POWER_CUT_AT", n.to_string())]);
    node.version_after(None).await;
    let mut node = scenario(node).await;
    let status = node.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(CUT),
        "step {n} ({what}) was never reached; console:\n{}",
        node.console()
    );
    // The cut landed on the same step as in the reference run: the enumeration is exact.
    assert!(
        node.console()
            .contains(&format!("power cut at step {n}: {what}")),
        "step {n} is not {what:?} this time; console:\n{}",
        node.console()
    );
    let offset = node.console().len();
    node.launch(&[]);
    let back = came_back(&node, offset).await;
    (node, back)
}

async fn upgrade(node: SimNode) -> SimNode {
    // The cut may end the call.
    let _ = node.upgrade(&sim_bundle("2.0-sim", &[]), false).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_write_step_of_an_upgrade_and_its_commit_leaves_a_good_slot() {
    // The reference run numbers the steps: boot, then upgrade, trial boot and commit.
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("steps");
    let node = start_env(&[("PLINTH_SIM_STEP_LOG", log.display().to_string())]);
    let v = node.version_after(None).await;
    let booted = steps(&log).len();
    node.upgrade(&sim_bundle("2.0-sim", &[]), false)
        .await
        .expect("upgrade");
    node.running_on("B", &v.boot_id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.status().await.committed != "B" {
        assert!(Instant::now() < deadline, "B never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = steps(&log);
    drop(node);
    let under_test = &all[booted..];
    assert!(
        under_test.iter().any(|(_, w)| w.contains("ROOT-B"))
            && under_test.iter().any(|(_, w)| w.contains("META"))
            && under_test.iter().any(|(_, w)| w.contains("BootNext"))
            && under_test.iter().any(|(_, w)| w.contains("BootOrder")),
        "the steps miss a kind of write: {under_test:#?}"
    );

    let mut failures = Vec::new();
    for (n, what) in under_test {
        let (_node, back) = cut_at(*n, what, upgrade).await;
        let verdict = match &back {
            Back::Running(s) => on_a_good_slot(s),
            Back::Maintenance(_) => Err("lost its config (maintenance mode)".into()),
        };
        if let Err(e) = verdict {
            failures.push(format!("cut at step {n} ({what}): {e}"));
        }
    }
    println!(
        "power cuts during upgrade and commit: {} steps, {} passed",
        under_test.len(),
        under_test.len() - failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

async fn reset(node: SimNode) -> SimNode {
    let mut c = node.client().await;
    let _ = c
        .reset(ResetRequest {
            graceful: true,
            reboot: true,
            labels: vec!["STATE".into(), "EPHEMERAL".into()],
            system_disk: false,
            method: WipeMethod::Fast as i32,
        })
        .await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_write_step_of_a_reset_leaves_a_node_that_boots() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("steps");
    let node = start_env(&[("PLINTH_SIM_STEP_LOG", log.display().to_string())]);
    node.version_after(None).await;
    let booted = steps(&log).len();
    let offset = node.console().len();
    let node = reset(node).await;
    match came_back(&node, offset).await {
        Back::Maintenance(_) => {}
        other => panic!("the reset did not end in maintenance mode: {other:?}"),
    }
    let all = steps(&log);
    drop(node);
    let under_test = &all[booted..];
    assert!(
        under_test.iter().any(|(_, w)| w.starts_with("wipe")),
        "no wipe among the steps: {under_test:#?}"
    );

    let mut failures = Vec::new();
    let mut wiped_seen = false;
    for (n, what) in under_test {
        let (_node, back) = cut_at(*n, what, reset).await;
        // Cut at or before the first wipe, the config must survive; after it, maintenance
        // mode is right.
        let verdict = match &back {
            Back::Running(s) => on_a_good_slot(s),
            Back::Maintenance(_) if !wiped_seen => {
                Err("lost its config before anything was wiped".into())
            }
            Back::Maintenance(s) => on_a_good_slot(s),
        };
        if let Err(e) = verdict {
            failures.push(format!("cut at step {n} ({what}): {e}"));
        }
        wiped_seen |= what.starts_with("wipe");
    }
    println!(
        "power cuts during reset: {} steps, {} passed",
        under_test.len(),
        under_test.len() - failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Applies the node's own config renamed to `name`, in `mode` (a try lasts long enough to
/// outlive the test).
async fn apply_renamed(node: SimNode, name: &str, mode: ApplyMode) -> SimNode {
    let mut cfg = node.config_on_state().expect("config");
    cfg.machine.name = name.into();
    let mut c = node.client().await;
    let _ = c
        .apply_configuration(ApplyConfigurationRequest {
            data: cfg.to_yaml().expect("yaml"),
            mode: mode as i32,
            try_timeout_s: 3600,
            confirm: false,
            max_unavailable: 0,
        })
        .await;
    node
}

/// The write steps of applying a config in `mode`, numbered by a reference run.
async fn apply_steps(mode: ApplyMode) -> Vec<(u64, String)> {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("steps");
    let node = start_env(&[("PLINTH_SIM_STEP_LOG", log.display().to_string())]);
    node.version_after(None).await;
    let booted = steps(&log).len();
    let node = apply_renamed(node, "renamed", mode).await;
    assert_eq!(
        node.config_on_state().expect("config").machine.name,
        "renamed"
    );
    let all = steps(&log);
    drop(node);
    all[booted..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_write_step_of_applying_a_config_leaves_the_old_or_the_new_one() {
    for (mode, new_may_survive) in [(ApplyMode::NoReboot, true), (ApplyMode::Try, false)] {
        let under_test = apply_steps(mode).await;
        assert!(
            under_test.iter().any(|(_, w)| w.contains("config.yaml")),
            "{mode:?}: no write of config.yaml among the steps: {under_test:#?}"
        );
        let mut failures = Vec::new();
        for (n, what) in &under_test {
            let (node, back) = cut_at(*n, what, |node| apply_renamed(node, "renamed", mode)).await;
            let name = node.config_on_state().map(|c| c.machine.name);
            let verdict = match (&back, name.as_deref()) {
                (Back::Maintenance(_), _) => Err("lost its config (maintenance mode)".to_string()),
                (Back::Running(_), Some("sim")) => Ok(()),
                (Back::Running(_), Some("renamed")) if new_may_survive => Ok(()),
                // A try that a power cut interrupted was never confirmed: the boot reverts it.
                (Back::Running(_), other) => Err(format!("STATE holds {other:?}")),
            };
            if let Err(e) = verdict {
                failures.push(format!("{mode:?}: cut at step {n} ({what}): {e}"));
            }
        }
        println!(
            "power cuts while applying a config ({mode:?}): {} steps, {} passed",
            under_test.len(),
            under_test.len() - failures.len()
        );
        assert!(failures.is_empty(), "{failures:#?}");
    }
}

/// Pulls the plug, lets `quirk` change the NVRAM, powers on, and returns the running node's
/// status once it has repaired its entries.
async fn after_quirk(quirk: impl FnOnce(&bootloader::VarStore)) -> (SimNode, StatusResponse) {
    let mut node = common::start(vec![], &[]);
    node.version_after(None).await;
    node.wait_exit_quiet(); // the plug pulled
    quirk(&phases::platform::sim::Sim::vars(&node.machine()));
    let offset = node.console().len();
    node.launch(&[]);
    let s = match came_back(&node, offset).await {
        Back::Running(s) => s,
        other => panic!("{other:?}"),
    };
    (node, s)
}

fn entry_first(s: &StatusResponse) -> Result<(), String> {
    let a = s
        .boot_entries
        .iter()
        .find(|e| e.description == "Plinth A")
        .ok_or("no entry for slot A")?;
    if s.boot_order.first() != Some(&a.number) {
        return Err(format!(
            "BootOrder {:?} does not start with A's {}",
            s.boot_order, a.number
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_boot_entries_were_deleted_boots_by_the_removable_path_and_repairs_them() {
    let (node, s) = after_quirk(|vars| {
        for (n, o) in vars.boot_entries().expect("entries") {
            if o.description.to_string().starts_with("Plinth") {
                vars.delete_boot_entry(n).expect("delete");
            }
        }
    })
    .await;
    assert!(node.console().contains("\\EFI\\BOOT\\BOOTX64.EFI"));
    entry_first(&s).expect("repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_boot_order_was_reordered_puts_its_slot_first_again() {
    let (_node, s) = after_quirk(|vars| {
        let mut order = vars.boot_order().expect("order");
        order.reverse();
        vars.set_boot_order(&order).expect("order");
    })
    .await;
    entry_first(&s).expect("repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_variable_store_was_reset_to_blank_boots_and_repairs_its_entries() {
    let (node, s) = after_quirk(|vars| {
        std::fs::remove_dir_all(vars.root()).expect("blank store");
    })
    .await;
    assert!(node.console().contains("\\EFI\\BOOT\\BOOTX64.EFI"));
    entry_first(&s).expect("repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_variable_that_cannot_be_decoded_is_kept_and_the_node_boots_past_it() {
    let (node, s) = after_quirk(|vars| {
        // Another OS's entry in a layout nobody decodes, first in BootOrder.
        let garbage = bootloader::boot_vars::boot_entry_name(0x0007);
        vars.set(
            &garbage,
            bootloader::boot_vars::BOOT_VAR_ATTRIBUTES,
            &[0xde, 0xad, 0xbe],
        )
        .expect("garbage entry");
        let mut order = vars.boot_order().expect("order");
        order.insert(0, 0x0007);
        vars.set_boot_order(&order).expect("order");
    })
    .await;
    entry_first(&s).expect("our slot first");
    // Kept, after ours, and reported as what it is.
    assert!(s.boot_order.contains(&7), "{:?}", s.boot_order);
    let e = s.boot_entries.iter().find(|e| e.number == 7).expect("kept");
    assert_eq!(e.description, "(cannot be decoded)");
    let vars = phases::platform::sim::Sim::vars(&node.machine());
    assert!(vars
        .get(&bootloader::boot_vars::boot_entry_name(7))
        .expect("read")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_system_disk_beside_the_original_stops_the_boot_and_says_why() {
    let mut node = common::start(vec![], &[]);
    node.version_after(None).await;
    node.wait_exit_quiet();
    let machine = node.machine();
    let original = std::fs::read(machine.join("disk.img")).expect("disk");
    // The clone, attached as the second disk: every GUID the same.
    std::fs::copy(machine.join("disk.img"), machine.join("media.img")).expect("clone");
    let offset = node.console().len();
    node.launch(&[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let console = node.console();
        let fresh = &console[offset..];
        if fresh.contains("both carry the ESP partition GUID") {
            assert!(fresh.contains("a cloned disk?"), "{fresh}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal on the console:\n{fresh}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.wait_exit_quiet();
    // Neither disk was touched.
    assert!(std::fs::read(machine.join("disk.img")).expect("disk") == original);
    assert!(std::fs::read(machine.join("media.img")).expect("clone") == original);
}
