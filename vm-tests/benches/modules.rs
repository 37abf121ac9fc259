//! What each of the node's kernel modules costs to load under TCG, on the node's own VM
//! (OVMF's Secure Boot build with the keys enrolled, a software TPM, two vCPUs): an image with
//! `plinth-modcost` as `/init` loads the image's modules one at a time (the initramfs's list,
//! then the late one), from memory (`init_module`, machined's way, the read included) and from a file
//! (`finit_module`), unloading them between rounds, and reports each one's median both ways.
//! With Secure Boot on, Debian's kernel (IMA's arch policy) measures a module loaded from a
//! file (a SHA-256 of it and a TPM PCR 10 extend); the output says how many loads IMA measured.
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench modules` (the image in `out/` and
//! the static binaries must be built: `./x test` or `./x run` does both).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use vm_tests::node::prepare;
use vm_tests::qemu::Vm;

struct Cost {
    name: String,
    bytes: u64,
    memory: Duration,
    file: Duration,
    /// Each round's, in microseconds.
    rounds_memory: String,
    rounds_file: String,
}

/// A comma-separated list of microseconds as milliseconds.
fn rounds(us: &str) -> String {
    us.split(',')
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| format!("{:.0}", v / 1e3))
        .collect::<Vec<_>>()
        .join("/")
}

/// `key=value` from a console line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// `key=value` from a console line, as text.
fn word(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let image = common::image_with("modcost", "0.1.0-modcost", &[], 0, "plinth-modcost");
    let spec = common::plain_spec("bench-modcost");
    let prepared = prepare(&spec, &image).expect("disk");
    let mut vm = Vm::launch(prepared.vm_spec()).expect("launch");
    vm.wait_for_line("plinth-modcost: done", 0, Duration::from_secs(600))
        .expect("the module loads to finish");
    let lines: Vec<String> = vm
        .serial
        .lines()
        .into_iter()
        .filter_map(|l| {
            l.text
                .split_once("plinth-modcost: ")
                .map(|(_, t)| t.to_string())
        })
        .collect();
    let _ = vm.wait_exit(Duration::from_secs(60));

    let mut costs: Vec<Cost> = lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("module ")?;
            Some(Cost {
                name: rest.split_whitespace().next()?.to_string(),
                bytes: field(rest, "bytes")?,
                memory: Duration::from_micros(field(rest, "memory_us")?),
                file: Duration::from_micros(field(rest, "file_us")?),
                rounds_memory: word(rest, "rounds_memory")?,
                rounds_file: word(rest, "rounds_file")?,
            })
        })
        .collect();
    assert!(!costs.is_empty(), "no module was measured: {lines:#?}");
    costs.sort_by_key(|c| std::cmp::Reverse(c.file));
    println!(
        "each module's load, median of the rounds, one at a time (most costly from a file first):"
    );
    println!(
        "  {:<24} {:>9} {:>12} {:>12} {:>12}   each round (file | memory)",
        "module", "bytes", "from file", "from memory", "difference"
    );
    for c in &costs {
        println!(
            "  {:<24} {:>9} {:>12} {:>12} {:>12}   {} | {} ms",
            c.name,
            c.bytes,
            ms(c.file),
            ms(c.memory),
            format!(
                "{:.1} ms",
                (c.file.as_secs_f64() - c.memory.as_secs_f64()) * 1e3
            ),
            rounds(&c.rounds_file),
            rounds(&c.rounds_memory)
        );
    }
    for l in &lines {
        if l.contains("left out") || l.starts_with("IMA") || l.starts_with("failed") {
            println!("  {l}");
        }
    }
    let (file, memory): (Duration, Duration) = (
        costs.iter().map(|c| c.file).sum(),
        costs.iter().map(|c| c.memory).sum(),
    );
    println!(
        "all {} modules, the sum of each one's median: from a file (finit_module) {}, from memory (init_module, machined's way) {}",
        costs.len(),
        ms(file),
        ms(memory)
    );
}
