//! Slot write + verify throughput in the simulated machine (its disk is a host file), against
//! its peer in the same run: `dd oflag=direct conv=fsync` of the same root image into a file of
//! the same size, then `b3sum` of that file.
//!
//! `cargo bench -p machined --bench slot_write [-- MIB [RUNS] [upload|http|https]]` (default
//! 200 MiB, 3 runs, the bundle uploaded in the call; `http`/`https`: the node pulls it from a
//! server on 127.0.0.1). Plinth's figures are the upgrade's own `writeSlot` (receive, hash,
//! write, fsync) and `verifySlot` (drop the cached pages, read back, hash) phases, read from its
//! trace. The upgrade is staged, so the node stays up and keeps its trace.
//!
//! With `rauc` among the arguments, RAUC 1.8 (Debian's `rauc`) then installs a plain bundle of
//! the same size into a file-backed slot with the noop bootloader, in the same run
//! (`benches/rauc-install.sh`, as root: it loop-mounts the bundle).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use phases::platform::sim::provision::SimImage;
use sequencer::EventKind;

fn mib_s(bytes: u64, d: Duration) -> String {
    format!(
        "{:.0} MiB/s",
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The median of the runs' sums.
fn median_of(a: &[Duration], b: &[Duration]) -> Duration {
    median(a.iter().zip(b).map(|(x, y)| *x + *y).collect())
}

/// Runs `cmd` and returns how long it took; panics with its output if it fails.
fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// The peer: `dd` the image into a sparse file of `slot` bytes (as the simulated disk is),
/// bypassing the page cache and syncing at the end, then `b3sum` it (it reads from the device:
/// direct writes leave nothing cached).
fn peer(image: &Path, dir: &Path, slot: u64, threads: &str) -> (Duration, Duration) {
    let target = dir.join("peer-slot.img");
    let _ = std::fs::remove_file(&target);
    std::fs::File::create(&target)
        .and_then(|f| f.set_len(slot))
        .expect("peer slot");
    let write = timed(
        Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", target.display()))
            .args(["bs=1M", "oflag=direct", "conv=fsync,notrunc", "status=none"]),
    );
    let hash = timed(
        Command::new("b3sum")
            .args(["--num-threads", threads])
            .arg(&target),
    );
    let _ = std::fs::remove_file(&target);
    (write, hash)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let mut args = words.iter().filter_map(|a| a.parse::<u64>().ok());
    let mib = args.next().unwrap_or(200);
    let runs = args.next().unwrap_or(3) as usize;
    let source = words
        .iter()
        .find(|w| matches!(w.as_str(), "upload" | "http" | "https"))
        .map_or("upload", String::as_str);
    if Command::new("b3sum").arg("--version").output().is_err() {
        eprintln!("b3sum is missing: apt-get install b3sum");
        std::process::exit(2);
    }
    let slot = (mib + 16) << 20;
    let (ca, tls) = common::serve::https_identity();
    let node = common::start_with_slots_and(slot, |c| c.machine.upgrade.ca = ca);
    let work = tempfile::tempdir().expect("tmp");

    let (mut write, mut verify, mut dd, mut b3, mut b3_one) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut size = 0;
    for run in 1..=runs {
        let image = SimImage {
            version: format!("2.{run}-bench"),
            extra_cmdline: vec![],
            payload_bytes: mib << 20,
        };
        let root = image.rootfs();
        size = root.len() as u64;
        let bundle = common::sim_bundle_of(image);
        let before = node.events().await.last().map(|e| e.id).unwrap_or(0);
        let staged = api::proto::UpgradeOptions {
            stage: true,
            ..Default::default()
        };
        match source {
            "upload" => node.upgrade_with(&bundle, staged).await,
            scheme => {
                let tls = (scheme == "https").then(|| tls.clone());
                let url = common::serve::serve(bundle, common::serve::Behaviour::Whole, tls).await;
                node.upgrade_url_with(&url, staged).await
            }
        }
        .expect("staged upgrade");
        let phase = |name: &str, events: &[sequencer::Event]| {
            events
                .iter()
                .filter(|e| e.id > before)
                .find_map(|e| match &e.kind {
                    EventKind::PhaseStop {
                        sequence,
                        phase,
                        duration_us,
                        ..
                    } if sequence == "upgrade" && phase == name => {
                        Some(Duration::from_micros(*duration_us))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no {name} phase in the trace"))
        };
        // The reply may come before the sequence ends: wait for its stop in the trace.
        let events = loop {
            let events = node.events().await;
            let done = events.iter().any(|e| {
                e.id > before
                    && matches!(&e.kind, EventKind::SequenceStop { sequence, .. } if sequence == "upgrade")
            });
            if done {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (w, v) = (phase("writeSlot", &events), phase("verifySlot", &events));

        let path = work.path().join("root.img");
        std::fs::write(&path, &root).expect("root image");
        let (d, h) = peer(&path, work.path(), slot, "0");
        let (_, h1) = peer(&path, work.path(), slot, "1");
        println!(
            "run {run}: {mib} MiB ({source}): Plinth write {} ({}), verify {} ({}) | dd {} ({}), b3sum {} ({}), b3sum 1 thread {} ({})",
            ms(w), mib_s(size, w), ms(v), mib_s(size, v),
            ms(d), mib_s(size, d), ms(h), mib_s(size, h), ms(h1), mib_s(size, h1)
        );
        write.push(w);
        verify.push(v);
        dd.push(d);
        b3.push(h);
        b3_one.push(h1);
    }
    let (w, v, d, h, h1) = (
        median(write.clone()),
        median(verify.clone()),
        median(dd.clone()),
        median(b3.clone()),
        median(b3_one),
    );
    let rauc = words.iter().any(|w| w == "rauc").then(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/rauc-install.sh");
        let out = Command::new(script)
            .arg(mib.to_string())
            .arg(work.path().join("rauc"))
            .env("RUNS", runs.to_string())
            .output()
            .expect("run the RAUC benchmark");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script}: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("rauc install: "))
            .and_then(|l| l.split(" in ").nth(1))
            .and_then(|l| l.split(" s").next())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64)
            .expect("rauc install time")
    });
    if let Some(r) = rauc {
        println!(
            "side by side ({source}): Plinth write+verify {} vs RAUC install {} ({:.2}x faster) vs dd+b3sum {} ({:.2}x the floor)",
            ms(median_of(&write, &verify)),
            ms(r),
            r.as_secs_f64() / median_of(&write, &verify).as_secs_f64(),
            ms(median_of(&dd, &b3)),
            median_of(&write, &verify).as_secs_f64() / median_of(&dd, &b3).as_secs_f64(),
        );
    }
    println!(
        "median of {runs}, {size} bytes ({source}): Plinth write+verify {} ({}) vs dd+b3sum {} ({}); write {} vs dd {}; verify {} vs b3sum {} (1 thread: {})",
        ms(w + v),
        mib_s(size, w + v),
        ms(d + h),
        mib_s(size, d + h),
        mib_s(size, w),
        mib_s(size, d),
        mib_s(size, v),
        mib_s(size, h),
        mib_s(size, h1),
    );
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}
