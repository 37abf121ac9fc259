//! Boot time through OVMF under TCG, against its floor: the same firmware, kernel and
//! initramfs with an `/init` that only says it was reached and powers off (`plinth-floor`, a binary of its own in machined's place).
//! Prints, per run and as medians: QEMU start → `Version` answered over mTLS for a Plinth node,
//! QEMU start → floor `/init` reached, their ratio, and machined's own share (PID 1 start →
//! API listening), then one node's timeline.
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench boot [-- RUNS]` (the image in
//! `out/` and the static machined must be built: `./x test` or `./x run` does both).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use sequencer::EventKind;
use vm_tests::node::{prepare, wait_for_version, NodeSpec};
use vm_tests::qemu::Vm;
use vm_tests::timeline::Timeline;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let floor_image = common::image_with("floor", "0.1.0-floor", &[], 0, "plinth-floor");

    let mut node_ready = Vec::new();
    let mut machined_share = Vec::new();
    let mut floor = Vec::new();
    let mut last_timeline = None;
    for run in 1..=runs {
        // The node.
        let node = common::node("bench-boot");
        let ctx = node.context().expect("context").clone();
        let mut vm = node.boot().expect("launch");
        let (_, ready) = wait_for_version(&mut vm, &node.endpoint(), &ctx, common::BOOT_TIMEOUT)
            .await
            .expect("boot");
        let t = Timeline::from_lines(&vm.serial.lines(), Some(ready));
        let node_split = Split {
            firmware: t.firmware_start_entry.as_ref().map(|(at, _)| *at),
            kernel: t.kernel_start,
            init: t.events.first().map(|(at, _)| *at),
        };
        let pid1 = t.first(
            |k| matches!(k, EventKind::SequenceStart { sequence } if sequence == "initialize"),
        );
        let api = t.first(|k| matches!(k, EventKind::ApiReady { .. }));
        let share = match (pid1, api) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        vm.kill();
        node_ready.push(ready);
        machined_share.push(share);
        last_timeline = Some(t);

        // The floor, on a disk of the floor image.
        let dir = common::workspace().join("target/vm-tests/bench-floor");
        let _ = std::fs::remove_dir_all(&dir);
        let spec = NodeSpec {
            name: "bench-floor".into(),
            dir,
            image_dir: Default::default(),
            memory_mb: 1024,
            services: Vec::new(),
            trusted_keys: Vec::new(),
        };
        let f = prepare(&spec, &floor_image).expect("floor disk");
        let mut vm = Vm::launch(f.vm_spec()).expect("launch floor");
        let (_, reached) = vm
            .wait_for_line("plinth-floor: init reached", 0, common::BOOT_TIMEOUT)
            .expect("floor init");
        let lines = vm.serial.lines();
        let _ = vm.wait_exit(Duration::from_secs(60));
        floor.push(reached.at);
        let floor_split = Split {
            firmware: lines
                .iter()
                .find(|l| l.text.contains("BdsDxe: starting"))
                .map(|l| l.at),
            kernel: reached
                .text
                .split("boot_us=")
                .nth(1)
                .and_then(|v| v.trim().parse().ok())
                .map(|us| reached.at.saturating_sub(Duration::from_micros(us))),
            init: Some(reached.at),
        };
        println!(
            "run {run}: node Version answered {}, of which machined (PID 1 start → API listening) {}; floor /init reached {}",
            ms(ready),
            ms(share),
            ms(reached.at)
        );
        println!("  node:  {}", node_split.render());
        println!("  floor: {}", floor_split.render());
    }
    let (n, f, m) = (median(node_ready), median(floor), median(machined_share));
    println!(
        "median of {runs}: node {} vs floor {}: ratio {:.2}; Plinth's cost over the floor {}; machined's own share {}",
        ms(n),
        ms(f),
        n.as_secs_f64() / f.as_secs_f64(),
        ms(n.saturating_sub(f)),
        ms(m)
    );
    if let Some(t) = last_timeline {
        println!("{}", t.render());
    }
}
