//! machined's footprint: the static binary and image sizes, PID 1's resident memory after boot
//! and across 100 upgrades streamed into the simulated machine (it must not grow), and the
//! upgrade's end-to-end time there (API call → new slot committed).
//!
//! `cargo bench -p machined --bench footprint [-- UPGRADES]` prints the figures. Sizes are read
//! from `target/x86_64-unknown-linux-gnu/release/machined` and `out/` when they exist.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn size(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let upgrades: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(b) = size(&ws.join("target/x86_64-unknown-linux-gnu/release/machined")) {
        println!("machined static binary (release, +crt-static): {}", mib(b));
    }
    if let Ok(text) = std::fs::read_to_string(ws.join("out/artifacts.json")) {
        let a: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        for (what, key) in [("UKI (slot A)", "uki_a"), ("SquashFS root", "rootfs")] {
            if let Some(b) = a[key].as_str().and_then(|p| size(Path::new(p))) {
                println!("{what}: {}", mib(b));
            }
        }
    }

    let node = common::start(vec![], &[]);
    let mut v = node.version_after(None).await;
    let pid = node.pid().expect("pid");
    let rss0 = rss_kib(pid);
    println!("simulated node: machined RSS after boot {rss0} KiB");
    let mut times = Vec::new();
    let mut samples = vec![(0usize, rss0)];
    for i in 1..=upgrades {
        let target = if v.slot == "A" { "B" } else { "A" };
        let bundle = common::sim_bundle(&format!("2.{i}-sim"), &[]);
        let t = Instant::now();
        node.upgrade(&bundle, false).await.expect("upgrade");
        v = node.running_on(target, &v.boot_id).await;
        while node.status().await.committed != target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(t.elapsed());
        if i % 10 == 0 {
            samples.push((i, rss_kib(pid)));
        }
    }
    times.sort();
    let line: Vec<String> = samples.iter().map(|(i, r)| format!("{i}:{r}")).collect();
    println!(
        "machined RSS (KiB) after N upgrades, N:RSS: {}",
        line.join(" ")
    );
    if let (Some(first), Some(last)) = (samples.get(1), samples.last()) {
        println!(
            "growth from upgrade {} to {}: {} KiB",
            first.0,
            last.0,
            last.1 as i64 - first.1 as i64
        );
    }
    if !times.is_empty() {
        println!(
            "upgrade end to end in the simulated machine (API call → committed, incl. the trial reboot), {} runs: p50 {:.0} ms, max {:.0} ms",
            times.len(),
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
    }
}
