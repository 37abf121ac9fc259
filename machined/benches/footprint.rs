//! machined's footprint: the static binary and image sizes, PID 1's resident memory and live
//! heap after boot, across 3000 mTLS connections to the running node and across 100 upgrades
//! streamed into the simulated machine (they must not grow), and the upgrade's end-to-end time
//! there (API call → new slot committed). The live heap is glibc's `mallinfo2`, which the
//! simulated machine prints between boots and on SIGUSR1: RSS alone cannot tell a leak from
//! the allocator keeping freed memory.
//!
//! `cargo bench -p machined --bench footprint [-- UPGRADES]` prints the figures. Sizes are read
//! from `target/x86_64-unknown-linux-gnu/release/machined` and `out/` when they exist.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

/// A number field of `/proc/PID/status` (`VmRSS:` in KiB, `Threads:`).
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// The last "sim: heap in use N bytes" the simulated machine printed (before its latest boot).
fn heap_in_use(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .find_map(|l| l.split("sim: heap in use ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Asks the simulated machine for a heap report (SIGUSR1) and reads it off the console.
async fn heap_now(node: &common::SimNode, pid: u32) -> u64 {
    let count = |c: &str| c.matches("sim: heap in use ").count();
    let before = count(&node.console());
    let _ = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status();
    for _ in 0..100 {
        let c = node.console();
        if count(&c) > before {
            return heap_in_use(&c);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no heap report on the console");
}

/// `N:value` pairs, each value divided by `unit`, space-separated.
fn series(samples: &[(usize, u64)], unit: u64) -> String {
    let parts: Vec<String> = samples
        .iter()
        .map(|(n, v)| format!("{n}:{}", v / unit))
        .collect();
    parts.join(" ")
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

    // A running node under API use: many clients, each its own mTLS connection.
    let mut heap_by_connections = vec![(0, heap_now(&node, pid).await)];
    let rounds: usize = std::env::var("PLINTH_BENCH_CONNECTION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for round in 1..=rounds {
        for _ in 0..500 {
            let mut c = node.client().await;
            c.version(api::proto::VersionRequest {})
                .await
                .expect("version");
        }
        heap_by_connections.push((round * 500, heap_now(&node, pid).await));
    }
    println!(
        "heap in use (KiB) after N mTLS connections to a running node (one Version call each), N:heap: {}; RSS {} KiB",
        series(&heap_by_connections, 1024),
        rss_kib(pid)
    );
    let mut times = Vec::new();
    let mut samples = vec![(0usize, rss0)];
    let mut heap = Vec::new();
    let mut threads = vec![status_field(pid, "Threads:")];
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
            heap.push((i, heap_in_use(&node.console())));
            threads.push(status_field(pid, "Threads:"));
        }
    }
    println!(
        "machined heap in use between boots (KiB, glibc mallinfo2) after N upgrades, N:heap: {}",
        series(&heap, 1024)
    );
    println!("machined threads every 10 upgrades: {threads:?}");
    if let (Some(first), Some(last)) = (heap.first(), heap.last()) {
        println!(
            "heap growth from upgrade {} to {}: {} bytes",
            first.0,
            last.0,
            last.1 as i64 - first.1 as i64
        );
    }
    times.sort();
    println!(
        "machined RSS (KiB) after N upgrades, N:RSS: {}",
        series(&samples, 1)
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
