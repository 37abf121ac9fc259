//! Upgrades in the VM, through OVMF under TCG, as printed figures:
//!
//! - a good upgrade end to end (`plinth upgrade --wait`: API call → new slot committed), split
//!   into the upgrade sequence (bundle streamed, slot written and verified, trial armed) and the
//!   trial (reboot, trial boot, health gates, commit);
//! - slot write + verify throughput inside the VM, from the upgrade's own `writeSlot` and
//!   `verifySlot` phases, beside its peer in the same run: the same kernel on the same emulated
//!   NVMe disk running `busybox dd oflag=direct conv=fsync` of the same root image from RAM,
//!   then `b3sum` of the disk (Plinth has no shell, so the peer boots the UKI's kernel and
//!   initramfs directly with a second archive holding busybox and b3sum);
//! - rollback time for a slot whose kernel panics and one whose machined hangs: API call → the
//!   node back on the old slot with the failure reported, and the part of it after the upgrade
//!   sequence ended (trial reboot, failure, fallback, boot of the old slot).
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench upgrade [-- MIB]` (default 128 MiB
//! of incompressible filler in the new root; needs `out/`, the static machined, and the
//! packages busybox-static and b3sum for the peer).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sequencer::EventKind;
use vm_tests::node::wait_for_version;
use vm_tests::serial::Line;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn mib_s(bytes: u64, d: Duration) -> String {
    format!(
        "{:.1} MiB/s",
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    )
}

/// What the console said during one upgrade.
#[derive(Default)]
struct Trace {
    write: Option<Duration>,
    verify: Option<Duration>,
    bytes: u64,
    /// Host time (since QEMU started) at which the upgrade sequence ended.
    upgrade_end: Option<Duration>,
}

fn read_trace(lines: &[Line]) -> Trace {
    let mut t = Trace::default();
    for l in lines {
        let Some(e) = sequencer::trace::parse_line(&l.text) else {
            continue;
        };
        match e.kind {
            EventKind::PhaseStop {
                sequence,
                phase,
                duration_us,
                ..
            } if sequence == "upgrade" => {
                let d = Some(Duration::from_micros(duration_us));
                match phase.as_str() {
                    "writeSlot" => t.write = d,
                    "verifySlot" => t.verify = d,
                    _ => {}
                }
            }
            EventKind::Progress {
                sequence, total, ..
            } if sequence == "upgrade" => t.bytes = total,
            EventKind::SequenceStop { sequence, .. } if sequence == "upgrade" => {
                t.upgrade_end.get_or_insert(l.at);
            }
            _ => {}
        }
    }
    t
}

/// Boots a node, runs `plinth upgrade --image BUNDLE --wait` and returns (whether it succeeded,
/// API call → CLI return, the trace, the CLI's output).
async fn upgrade_once(name: &str, bundle: &Path) -> (bool, Duration, Duration, Trace, String) {
    let node = common::upgradable_node(name);
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, common::BOOT_TIMEOUT)
        .await
        .expect("boot A");
    let from = vm.serial.lines().len();
    let args = vec![
        "-e".to_string(),
        node.endpoint(),
        "upgrade".into(),
        "--image".into(),
        bundle.display().to_string(),
        "--wait".into(),
    ];
    let started = vm.started;
    let t0 = started.elapsed();
    let n2 = node.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || common::plinth_output(&n2, &args))
        .await
        .expect("cli");
    let t1 = started.elapsed();
    let lines = vm.serial.lines();
    let trace = read_trace(&lines[from.min(lines.len())..]);
    (ok, t0, t1, trace, text)
}

/// The peer: the UKI's kernel and initramfs, booted directly on the same emulated NVMe disk,
/// with a second archive whose `/peer-init` writes the root image with `dd` and hashes the
/// disk with `b3sum`. Returns (dd, b3sum) as timed by console lines on the host.
fn peer(image_dir: &Path, kernel_release: &str, root: &Path, work: &Path) -> (Duration, Duration) {
    let kernel = image_dir.join(format!(
        "cache/kernel/linux-image-{kernel_release}/boot/vmlinuz-{kernel_release}"
    ));
    assert!(kernel.is_file(), "no kernel at {}", kernel.display());
    let stage = work.join("peer-root");
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["bin", "lib64", "lib/x86_64-linux-gnu"] {
        std::fs::create_dir_all(stage.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .expect("busybox (apt-get install busybox-static)");
    std::fs::copy("/usr/bin/b3sum", stage.join("bin/b3sum"))
        .expect("b3sum (apt-get install b3sum)");
    // b3sum's shared libraries, where ldd says they are.
    let ldd = Command::new("ldd")
        .arg("/usr/bin/b3sum")
        .output()
        .expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = stage.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("{lib}: {e}"));
    }
    // The image, padded to whole MiB: the disk is exactly its size, so b3sum reads it all.
    let mut data = std::fs::read(root).expect("root image");
    data.resize(data.len().div_ceil(1 << 20) << 20, 0);
    let size = data.len() as u64;
    std::fs::write(stage.join("root.img"), &data).expect("root.img");
    let script = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in $($B sed 's/[ :].*//' /lib/modules/plinth.order); do $B insmod /lib/modules/{kernel_release}/$m 2>/dev/null; done
while [ ! -b /dev/nvme0n1 ]; do $B sleep 0.1; done
echo "peer: dd start"
$B dd if=/root.img of=/dev/nvme0n1 bs=1M oflag=direct conv=fsync 2>/dev/null
echo "peer: dd done"
echo 3 > /proc/sys/vm/drop_caches
/bin/b3sum /dev/nvme0n1
echo "peer: b3sum done"
$B poweroff -f
"#
    );
    let init = stage.join("peer-init");
    std::fs::write(&init, script).expect("peer-init");
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    // initramfs = the UKI's archive, then ours (the kernel unpacks concatenated archives).
    let list = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(&stage)
        .output()
        .expect("cpio");
    assert!(list.status.success(), "cpio failed");
    let mut initrd = std::fs::read(image_dir.join("initramfs.cpio")).expect("initramfs.cpio");
    initrd.extend_from_slice(&list.stdout);
    let initrd_path = work.join("peer-initrd.cpio");
    std::fs::write(&initrd_path, initrd).expect("initrd");
    let disk = work.join("peer-disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(size))
        .expect("disk");

    let mut child = Command::new(vm_tests::qemu::QEMU)
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd_path)
        .args(["-append", "console=ttyS0 quiet rdinit=/peer-init panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=unsafe",
            disk.display()
        ))
        .args([
            "-device",
            "nvme,serial=peer0,drive=d0",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let started = Instant::now();
    let (mut dd_start, mut dd_done, mut b3_done) = (None, None, None);
    let mut hash = String::new();
    let stdout = child.stdout.take().expect("stdout");
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        let at = started.elapsed();
        let line = line.trim().to_string();
        if line.contains("peer: dd start") {
            dd_start = Some(at);
        } else if line.contains("peer: dd done") {
            dd_done = Some(at);
        } else if line.contains("peer: b3sum done") {
            b3_done = Some(at);
        } else if line.ends_with("/dev/nvme0n1") {
            hash = line.split_whitespace().next().unwrap_or("").to_string();
        }
    }
    let _ = child.wait();
    let (Some(a), Some(b), Some(c)) = (dd_start, dd_done, b3_done) else {
        panic!("the peer VM did not finish (dd {dd_start:?} {dd_done:?}, b3sum {b3_done:?})");
    };
    assert_eq!(
        hash,
        blake3::hash(&data).to_hex().to_string(),
        "the peer's disk does not hold the image"
    );
    let _ = std::fs::remove_file(&disk);
    (b - a, c - b)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(128);
    let image_dir = common::image_dir();
    let base = common::artifacts();

    // A good upgrade, with a root of realistic size.
    let good = common::bundle_filled("bench-good", "0.2.0-bench", &[], mib << 20);
    let (ok, t0, t1, trace, text) = upgrade_once("bench-upgrade", &good).await;
    assert!(ok, "the upgrade failed: {text}");
    let (w, v) = (
        trace.write.expect("writeSlot"),
        trace.verify.expect("verifySlot"),
    );
    let end = trace.upgrade_end.expect("upgrade end");
    println!(
        "good upgrade ({} MiB root): API call → committed {}; upgrade sequence {} (writeSlot {}, verifySlot {}); reboot + trial boot + commit {}",
        trace.bytes >> 20,
        ms(t1 - t0),
        ms(end.saturating_sub(t0)),
        ms(w),
        ms(v),
        ms(t1.saturating_sub(end))
    );

    // The peer, on the same root image.
    let root = common::workspace().join("target/vm-tests/images/bench-good/rootfs.squashfs");
    let work = tempfile::tempdir().expect("tmp");
    let (dd, b3) = peer(&image_dir, &base.kernel_release, &root, work.path());
    let n = trace.bytes;
    println!(
        "slot write + verify in the VM, {n} bytes: Plinth {} ({}): writeSlot {} (bundle received over the API and written), verifySlot {} | peer {} ({}): dd oflag=direct conv=fsync {}, b3sum {}",
        ms(w + v),
        mib_s(n, w + v),
        mib_s(n, w),
        mib_s(n, v),
        ms(dd + b3),
        mib_s(n, dd + b3),
        mib_s(n, dd),
        mib_s(n, b3)
    );

    // Rollbacks.
    for (case, cmdline) in [
        ("panic", "rdinit=/nonexistent"),
        ("hang", "plinth.fault=hang"),
    ] {
        let b = common::bundle(&format!("broken-{case}"), "0.2.0-broken", &[cmdline]);
        let (ok, t0, t1, trace, text) = upgrade_once(&format!("bench-rollback-{case}"), &b).await;
        assert!(!ok && text.contains("upgrade failed"), "{case}: {text}");
        let end = trace.upgrade_end.expect("upgrade end");
        let reason = text
            .lines()
            .find(|l| l.contains("upgrade failed"))
            .unwrap_or("")
            .trim();
        println!(
            "rollback, slot that {}: API call → back on A with the failure reported {}; after the upgrade sequence (trial reboot → fallback → A answering) {} [{reason}]",
            if case == "panic" { "panics (kernel, panic=1)" } else { "hangs (machined, watchdog)" },
            ms(t1 - t0),
            ms(t1.saturating_sub(end))
        );
    }
}
