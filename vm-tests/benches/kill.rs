//! Fault injection in the VM: QEMU is killed at a random moment (seeded) during an upgrade
//! (bundle streaming, slot write, trial reboot, health gates, commit), relaunched on the same
//! disk and NVRAM, and the node must come back over mTLS on a good slot with META readable.
//! Prints each trial and how many passed; exits non-zero if any failed.
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench kill -- [TRIALS] [SEED]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use vm_tests::node::wait_for_version;
use vm_tests::qemu::Vm;

/// xorshift64*: a seeded sequence, so a failing trial can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Kill moments are drawn from the first this-many milliseconds after the upgrade is asked
/// for: past the commit of a typical upgrade under TCG.
const WINDOW_MS: u64 = 45_000;

/// Waits until the booted slot is good in META (a trial resolves one way or the other).
async fn settle(vm: &mut Vm, node: &vm_tests::node::PreparedNode) -> Result<String, String> {
    let ctx = node.context().expect("context").clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = String::new();
    while Instant::now() < deadline {
        if vm.exited().is_some() {
            return Err("QEMU exited".into());
        }
        let status = async {
            let mut c = api::client::connect_context(&node.endpoint(), &ctx)
                .await
                .map_err(|e| e.to_string())?;
            c.status(api::proto::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
        };
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(15), status).await {
            match s.slots.iter().find(|r| r.slot == s.slot) {
                Some(r) if r.state == "good" => {
                    return Ok(format!("slot {} (good, {})", s.slot, r.version))
                }
                Some(r) => last = format!("booted slot {} is {}", s.slot, r.state),
                None => last = "META has no record of the booted slot".into(),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("never settled on a good slot: {last}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nums: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let trials = nums.first().copied().unwrap_or(20);
    let seed = nums.get(1).copied().unwrap_or(1);
    let mut rng = Rng(seed.max(1));
    let bundle = common::bundle("kill-b", "0.2.0-kill", &[]);
    let mut passed = 0;
    for trial in 1..=trials {
        let delay = Duration::from_millis(rng.next() % WINDOW_MS);
        let node = common::upgradable_node("kill");
        let ctx = node.context().expect("context").clone();
        let ep = node.endpoint();
        let spec = node.vm_spec();
        let mut vm = Vm::launch(spec.clone()).expect("launch");
        wait_for_version(&mut vm, &ep, &ctx, common::BOOT_TIMEOUT)
            .await
            .expect("first boot");

        // The upgrade, and the plug pulled `delay` after it was asked for.
        let mut call = std::process::Command::new(common::plinth_cli())
            .args(["-e", &ep, "upgrade", "--image"])
            .arg(&bundle)
            .arg("--wait")
            .env("PLINTHCONFIG", node.spec.dir.join("plinthconfig"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("plinth upgrade");
        tokio::time::sleep(delay).await;
        let lines = vm.serial.lines();
        let at = lines
            .iter()
            .rev()
            .find_map(|l| {
                let t = &l.text;
                let seq = t.split("\"sequence\":\"").nth(1)?.split('"').next()?;
                let phase = t.split("\"phase\":\"").nth(1)?.split('"').next()?;
                Some(format!("{seq}/{phase}"))
            })
            .unwrap_or_default();
        vm.kill();
        // The client was waiting for a node that lost its power: it goes too.
        let _ = call.kill();
        let _ = call.wait();

        // Power on again: same disk, same NVRAM.
        let mut vm = Vm::launch(spec).expect("relaunch");
        let verdict = match wait_for_version(&mut vm, &ep, &ctx, common::BOOT_TIMEOUT).await {
            Err(e) => Err(format!("did not come back: {e}")),
            // A slot on trial must end good (committed, or the firmware's fallback).
            Ok(_) => settle(&mut vm, &node).await,
        };
        vm.kill();
        match verdict {
            Ok(what) => {
                passed += 1;
                println!(
                    "trial {trial}: killed {:.1} s into the upgrade (last trace: {at}) → back on {what}",
                    delay.as_secs_f64()
                );
            }
            Err(e) => println!(
                "trial {trial}: killed {:.1} s into the upgrade (last trace: {at}) → FAILED: {e}",
                delay.as_secs_f64()
            ),
        }
    }
    println!("QEMU killed during upgrades (seed {seed}): {trials} trials, {passed} passed");
    if passed != trials {
        std::process::exit(1);
    }
}
