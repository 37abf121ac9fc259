//! Boot time through OVMF's Secure Boot build under TCG, against its floor: the same firmware
//! (with the same keys enrolled), kernel and initramfs, with an `/init` that only says it was
//! reached and powers off (`plinth-floor`, a binary of its own in machined's place).
//!
//! Each boot is timed from its own kernel's start (guest clock zero), so the firmware's noise
//! (seconds under TCG) drops out: node: kernel start → `Version` answered over mTLS; floor:
//! kernel start → `/init`. Prints both per run, the medians and their difference (Plinth's
//! cost) as one line, the node's boot split into segments (median per segment), the whole
//! boots from QEMU's start, and one node's timeline.
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench boot [-- RUNS]` (5 by default;
//! the image in `out/` and the static machined must be built: `./x test` or `./x run` does
//! both).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use sequencer::EventKind;
use vm_tests::node::{prepare, wait_for_version_with, Polling};
use vm_tests::qemu::Vm;
use vm_tests::timeline::Timeline;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The host's CPU time so far, in clock ticks: (stolen by the hypervisor, all). Under TCG a
/// vCPU is a host thread, so time stolen from the host is time the guest's clock runs on
/// without it: a run with much steal is slow for reasons outside both boots.
fn host_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    (
        fields.get(7).copied().unwrap_or(0),
        fields.iter().take(8).sum(),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Host times (since QEMU started) of one boot's milestones: the firmware starting the boot
/// entry, the kernel's start (guest clock zero, from a console line that carries it), /init.
struct Split {
    firmware: Option<Duration>,
    kernel: Option<Duration>,
    init: Option<Duration>,
}

impl Split {
    fn render(&self) -> String {
        let span = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => ms(b.saturating_sub(a)),
            _ => "?".into(),
        };
        format!(
            "firmware {} | systemd-stub + kernel load {} | kernel start → /init {}",
            span(Some(Duration::ZERO), self.firmware),
            span(self.firmware, self.kernel),
            span(self.kernel, self.init)
        )
    }
}

/// The kernel's own milestones in one boot's log, in its printk clock (which restarts when the
/// TSC is found unstable, so set them against each other, not against `boot_us`): the initramfs
/// unpacked (it runs beside the initcalls), `/init` run, and how the TSC was calibrated.
struct KernelMarks {
    unpack: Option<(u64, u64)>,
    init: Option<u64>,
    tsc: &'static str,
}

impl KernelMarks {
    fn from_log(log: &[(u64, String)]) -> KernelMarks {
        let at = |needle: &str| {
            log.iter()
                .find(|(_, t)| t.contains(needle))
                .map(|(us, _)| *us)
        };
        let unpack = at("Trying to unpack rootfs image").zip(at("Freeing initrd memory"));
        // The kernel's own lines (arch/x86/kernel/tsc.c), in the order it tries the ways.
        let tsc = if at("tsc: Fast TSC calibration using PIT").is_some() {
            "TSC fast against the PIT"
        } else if at("tsc: using HPET reference calibration").is_some() {
            "TSC from the HPET"
        } else if at("tsc: using PMTIMER reference calibration").is_some() {
            "TSC from the PM timer"
        } else if at("tsc: PIT calibration matches").is_some() {
            "TSC slowly against the PIT"
        } else {
            "TSC otherwise"
        };
        KernelMarks {
            unpack,
            init: at("Run /init as init process"),
            tsc,
        }
    }

    fn render(&self) -> String {
        let us = |v: u64| ms(Duration::from_micros(v));
        format!(
            "initramfs unpacked {} ({}), /init run at {}, {}",
            self.unpack
                .map(|(a, b)| format!("{}–{}", us(a), us(b)))
                .unwrap_or_else(|| "?".into()),
            self.unpack
                .map(|(a, b)| us(b.saturating_sub(a)))
                .unwrap_or_else(|| "?".into()),
            self.init.map(us).unwrap_or_else(|| "?".into()),
            self.tsc
        )
    }
}

/// The node's kernel log, through the API, kept in `file` for reading later; what came, with
/// a line on the console if the call failed (the boot is measured already).
async fn node_kernel_log(node: &common::TestNode, file: &std::path::Path) -> Vec<(u64, String)> {
    let mut log = Vec::new();
    let read = async {
        let ctx = node.context().map_err(|e| e.to_string())?.clone();
        let mut c = api::client::connect_context(&node.endpoint(), &ctx)
            .await
            .map_err(|e| e.to_string())?;
        let mut s = c
            .dmesg(api::proto::DmesgRequest { follow: false })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(l) = s.message().await.map_err(|e| e.to_string())? {
            log.push((l.boot_us, l.text));
        }
        Ok::<(), String>(())
    };
    if let Err(e) = read.await {
        println!("  (the node's kernel log: {e})");
    }
    keep_log(&log, file);
    log
}

const KEPT_LOGS: &str = "target/vm-tests/bench-boot-kernel";

/// Where each run's kernel logs are kept (each node's and floor's own directory is made afresh
/// per run): `target/vm-tests/bench-boot-kernel/{node,floor}-<run>.log`.
fn kept_log(who: &str, run: usize) -> std::path::PathBuf {
    let dir = common::workspace().join(KEPT_LOGS);
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{who}-{run}.log"))
}

fn keep_log(log: &[(u64, String)], file: &std::path::Path) {
    let text: String = log
        .iter()
        .map(|(us, t)| format!("[{:>5}.{:06}] {t}\n", us / 1_000_000, us % 1_000_000))
        .collect();
    let _ = std::fs::write(file, text);
}

/// One node boot, timed from its kernel's start (guest clock zero, so firmware noise drops
/// out): the segments in boot order and the total to `Version` answered.
struct NodeBoot {
    /// `(segment, duration)`, in boot order.
    segments: Vec<(String, Duration)>,
    /// Kernel start → `Version` answered (host).
    answered: Duration,
    /// Kernel start → `/init` (the kernel's own part, the floor's too).
    init: Duration,
}

impl NodeBoot {
    /// `/init` → `Version` answered: Plinth's own part, free of the kernel's start, which
    /// swings by ±0.5 s between boots of the same bytes under TCG.
    fn own(&self) -> Duration {
        self.answered.saturating_sub(self.init)
    }

    fn from_timeline(t: &Timeline, answered_host: Duration) -> Option<NodeBoot> {
        let kernel = t.kernel_start?;
        let mut segments = Vec::new();
        let init = t.first(
            |k| matches!(k, EventKind::SequenceStart { sequence } if sequence == "initramfs"),
        )?;
        segments.push((
            "kernel start → /init".to_string(),
            init.saturating_sub(kernel),
        ));
        let phases = t.phases();
        let mut at = init;
        let api = t.first(|k| matches!(k, EventKind::ApiReady { .. }))?;
        for p in &phases {
            if p.start >= api {
                break;
            }
            if p.start > at + Duration::from_millis(1) {
                segments.push((
                    format!("(gap before {}/{})", p.sequence, p.phase),
                    p.start - at,
                ));
            }
            let d = p.duration.unwrap_or_default();
            let end = (p.start + d).min(api);
            segments.push((
                format!("{}/{}", p.sequence, p.phase),
                end.saturating_sub(p.start),
            ));
            at = end;
        }
        if api > at {
            segments.push(("(to API ready)".into(), api - at));
        }
        segments.push((
            "API ready → Version answered".into(),
            answered_host.saturating_sub(api),
        ));
        Some(NodeBoot {
            segments,
            answered: answered_host.saturating_sub(kernel),
            init: init.saturating_sub(kernel),
        })
    }
}

/// Boots the node once, timed: the boot, when `Version` answered (host, since QEMU started),
/// the split and the timeline. The VM is left running.
async fn boot_node(node: &common::TestNode) -> (Vm, NodeBoot, Duration, Split, Timeline) {
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    let (_, ready) = wait_for_version_with(
        &mut vm,
        &node.endpoint(),
        &ctx,
        common::BOOT_TIMEOUT,
        Polling::EAGER,
    )
    .await
    .expect("boot");
    let t = Timeline::from_lines(&vm.serial.lines(), Some(ready));
    let split = Split {
        firmware: t.firmware_start_entry.as_ref().map(|(at, _)| *at),
        kernel: t.kernel_start,
        init: t.events.first().map(|(at, _)| *at),
    };
    let boot = NodeBoot::from_timeline(&t, ready).expect("a complete boot trace");
    (vm, boot, ready, split, t)
}

/// Boots the floor once: kernel start → `/init` (its own clock), QEMU start → `/init`, the split.
fn boot_floor(
    floor_image: &imager::Artifacts,
    run: usize,
) -> (Duration, Duration, Split, KernelMarks) {
    let spec = common::plain_spec("bench-floor");
    let f = prepare(&spec, floor_image).expect("floor disk");
    let mut vm = Vm::launch(f.vm_spec()).expect("launch floor");
    let (_, reached) = vm
        .wait_for_line("plinth-floor: init reached", 0, common::BOOT_TIMEOUT)
        .expect("floor init");
    if let Err(e) = vm.wait_exit(Duration::from_secs(60)) {
        println!("  (the floor did not power off: {e}; its kernel log may be cut short)");
    }
    let lines = vm.serial.lines();
    let log: Vec<(u64, String)> = lines
        .iter()
        .filter_map(|l| {
            let (us, text) = l
                .text
                .split_once("plinth-floor: kmsg ")?
                .1
                .split_once(' ')?;
            Some((us.parse().ok()?, text.to_string()))
        })
        .collect();
    keep_log(&log, &kept_log("floor", run));
    let floor_kernel_us: u64 = reached
        .text
        .split("boot_us=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .expect("the floor prints its clock");
    let split = Split {
        firmware: lines
            .iter()
            .find(|l| l.text.contains("BdsDxe: starting"))
            .map(|l| l.at),
        kernel: Some(
            reached
                .at
                .saturating_sub(Duration::from_micros(floor_kernel_us)),
        ),
        init: Some(reached.at),
    };
    (
        Duration::from_micros(floor_kernel_us),
        reached.at,
        split,
        KernelMarks::from_log(&log),
    )
}

/// The answered call made again on a booted node, each on a new connection as the first was:
/// at once (the boot's last steps may still run) and after 3 s of quiet. Set against
/// `API ready → Version answered`, it says how much of that was the call's own work and how
/// much the first run of its code (under TCG the emulator translates guest code, the kernel's
/// network path and machined's TLS and HTTP/2 alike, the first time it runs).
async fn warm_calls(node: &common::TestNode) -> (Duration, Duration) {
    let (endpoint, ctx) = (node.endpoint(), node.context().expect("context").clone());
    let call = || async {
        let start = std::time::Instant::now();
        let mut c = api::client::connect_context(&endpoint, &ctx)
            .await
            .expect("connect");
        c.version(api::proto::VersionRequest {})
            .await
            .expect("Version");
        start.elapsed()
    };
    let now = call().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    (now, call().await)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let floor_image = common::image_with("floor", "0.1.0-floor", &[], 0, "plinth-floor");
    // Only this invocation's kernel logs are kept.
    let _ = std::fs::remove_dir_all(common::workspace().join(KEPT_LOGS));

    // Per run, the node boots twice on one disk and one firmware: its first boot writes the
    // firmware's boot entries (an install does that on a real machine), the second is the
    // boot every installed node makes, and is the one set against the floor. The floor boots
    // before the node on even runs, after it on odd ones, so the order cannot bias the medians.
    let mut node_boots: Vec<NodeBoot> = Vec::new();
    let mut first_boots = Vec::new();
    let mut node_ready = Vec::new();
    let mut floor = Vec::new();
    let mut floor_from_kernel = Vec::new();
    let mut last_timeline = None;
    let mut warm_quiet = Vec::new();
    for run in 1..=runs {
        let floor_first = run % 2 == 0;
        let cpu_before = host_cpu_ticks();
        let mut floor_run = floor_first.then(|| boot_floor(&floor_image, run));

        let node = common::node("bench-boot");
        let (mut vm, first, _, _, _) = boot_node(&node).await;
        let (node2, endpoint) = (node.clone(), node.endpoint());
        let out = tokio::task::spawn_blocking(move || {
            common::plinth(&node2, &["-e", &endpoint, "shutdown"])
        })
        .await
        .expect("shutdown");
        assert!(out.contains("shutdown started"), "{out}");
        vm.wait_exit(Duration::from_secs(120))
            .expect("the node powers off");
        let (mut vm, boot, ready, node_split, t) = boot_node(&node).await;
        let warm = warm_calls(&node).await;
        let node_marks =
            KernelMarks::from_log(&node_kernel_log(&node, &kept_log("node", run)).await);
        warm_quiet.push(warm.1);
        vm.kill();
        last_timeline = Some(t);

        if floor_run.is_none() {
            floor_run = Some(boot_floor(&floor_image, run));
        }
        let Some((floor_k, reached, floor_split, floor_marks)) = floor_run else {
            unreachable!("the floor booted before or after the node")
        };
        floor.push(reached);
        floor_from_kernel.push(floor_k);
        let cpu_after = host_cpu_ticks();
        let steal = cpu_after.0.saturating_sub(cpu_before.0) as f64
            / cpu_after.1.saturating_sub(cpu_before.1).max(1) as f64
            * 100.0;
        println!(
            "run {run}: from kernel start: node Version answered {} (its first boot {}), floor /init {}, cost {} (the node's /init → answered {}) | from QEMU start: node {}, floor {} | host CPU stolen by the hypervisor during the run: {steal:.0}%",
            ms(boot.answered),
            ms(first.answered),
            ms(floor_k),
            ms(boot.answered.saturating_sub(floor_k)),
            ms(boot.own()),
            ms(ready),
            ms(reached)
        );
        println!(
            "  the same call again, the node booted: at once {}, after 3 s {} (each a new connection: TLS handshake and Version)",
            ms(warm.0),
            ms(warm.1)
        );
        println!("  node:  {}", node_split.render());
        println!("  floor: {}", floor_split.render());
        println!(
            "  node's kernel (its printk clock):  {}",
            node_marks.render()
        );
        println!(
            "  floor's kernel (its printk clock): {}",
            floor_marks.render()
        );
        node_ready.push(ready);
        first_boots.push(first.answered);
        node_boots.push(boot);
    }
    let node_k = median(node_boots.iter().map(|b| b.answered).collect());
    let floor_k = median(floor_from_kernel.clone());
    println!();
    println!(
        "Plinth's cost over the floor, from each boot's kernel start (node, a boot after its first: → Version answered over mTLS; floor: → /init), medians of {runs}, Secure Boot on: {} ({} vs {})",
        ms(node_k.saturating_sub(floor_k)),
        ms(node_k),
        ms(floor_k)
    );
    println!(
        "the node's own part, /init → Version answered (its kernel start → /init left out: node {}, floor {}), median of {runs}: {}",
        ms(median(node_boots.iter().map(|b| b.init).collect())),
        ms(floor_k),
        ms(median(node_boots.iter().map(NodeBoot::own).collect()))
    );
    println!(
        "the same call on the booted node after 3 s of quiet, median of {runs}: {} (a new connection, as the first call's)",
        ms(median(warm_quiet))
    );
    let first_k = median(first_boots);
    println!(
        "the node's first boot (it writes the firmware's boot entries): {} ({} vs {})",
        ms(first_k.saturating_sub(floor_k)),
        ms(first_k),
        ms(floor_k)
    );
    println!(
        "whole boot from QEMU start, medians: node {} vs floor {} (ratio {:.2}; firmware noise included)",
        ms(median(node_ready.clone())),
        ms(median(floor.clone())),
        median(node_ready).as_secs_f64() / median(floor).as_secs_f64()
    );
    // The split: each segment's median across the runs (segments present in every run).
    println!();
    println!("node, kernel start → Version answered, per segment (median of {runs}):");
    let names: Vec<String> = node_boots[0]
        .segments
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let values: Vec<Duration> = node_boots
            .iter()
            .filter_map(|b| b.segments.iter().find(|(n, _)| *n == name).map(|(_, d)| *d))
            .collect();
        if values.len() == node_boots.len() {
            println!("  {:<44} {:>9}", name, ms(median(values)));
        }
    }
    println!("  {:<44} {:>9}", "floor: kernel start → /init", ms(floor_k));
    if let Some(t) = last_timeline {
        println!("{}", t.render());
    }
}
