//! The Debian kernel: download (cached), unpack, and the modules a node needs in load order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::run;
use crate::ImageError;

/// Modules loaded before every other one, by name.
///
/// ext4, crc-t10dif and t10-pi ask the crypto API for crc32c / crct10dif / crc64-rocksoft,
/// which would make the kernel call modprobe; the node has none, so the generic
/// implementations go in first.
///
/// The CPU's SHA-256 (`sha256_ssse3`: SHA-NI, AVX2 or SSSE3) goes in first too: the kernel
/// checks every module's signature with SHA-256 over the whole file, and every later module
/// (5 MiB of them, ext4 alone 2 MiB) is then hashed with it instead of the generic C code.
pub const EARLY_MODULES: &[&str] = &[
    "sha256_ssse3",
    "crc32c_generic",
    "crct10dif_generic",
    "crc64_rocksoft_generic",
];

/// Modules the initramfs loads (after the early ones), by name: what it needs to find the boot
/// disk (NVMe, or virtio for installer media), map and mount the root, read the EFI variables
/// and arm the watchdog, and the entropy source TLS needs; and ext4, which the node needs
/// first of all once the initramfs is done (STATE holds its config), and which is the largest
/// module: loaded beside the initramfs's own work it is in by then (in the background after
/// it, the node waited about 0.2 s more for it under TCG: BENCHMARKS.md). Their dependencies are added from
/// `modules.dep`; they load in parallel, each once its dependencies (and the early ones) are in.
pub const INITRAMFS_MODULES: &[&str] = &[
    // First what finding the boot disk waits for, then the root's, the volumes', the
    // watchdog, entropy.
    "efivarfs",
    "nvme",
    "virtio_pci",
    "virtio_blk",
    "dm_verity",
    "squashfs",
    "ext4",
    "i6300esb",
    // Entropy: without it getrandom, and so TLS, waits for the CRNG.
    "virtio-rng",
];

/// Modules the node needs only after the initramfs: they load in the background while the boot
/// goes on (`phases::modules`), and each task that needs one waits for it.
pub const LATE_MODULES: &[&str] = &[
    // In the order the boot needs them: the ESP's file system, the network; then encryption
    // (with the CPU's AES instructions: a CPU without them refuses aesni_intel with ENODEV,
    // and the generic code built into the kernel does the work) and the ACPI power button,
    // read by machined through evdev; these last are held back until asked for.
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "virtio_net",
    "dm_crypt",
    "xts",
    "aesni_intel",
    "button",
    "evdev",
    // System extensions (loop devices over their files, overlaid on /usr/local) and, for
    // containers, their networks: held back until an extension or a container asks.
    "loop",
    "overlay",
    "veth",
    "bridge",
];

/// A module to load: its path under `lib/modules/<release>/` and the modules that must be in
/// before it (paths too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Relative path of the `.ko`.
    pub path: String,
    /// What it needs loaded first.
    pub after: Vec<String>,
}

/// The node's module list as the initramfs reads it: one module per line, `path: after...`.
pub fn order_text(modules: &[Module]) -> String {
    modules
        .iter()
        .map(|m| {
            if m.after.is_empty() {
                format!("{}\n", m.path)
            } else {
                format!("{}: {}\n", m.path, m.after.join(" "))
            }
        })
        .collect()
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Release string (`6.1.0-NN-amd64`).
    pub release: String,
    /// Where the package is unpacked.
    pub root: PathBuf,
    /// The kernel image.
    pub vmlinuz: PathBuf,
}

impl Kernel {
    /// `lib/modules/<release>` under the unpacked package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The kernel package `linux-image-amd64` points at.
fn default_package() -> Result<String, ImageError> {
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_owned)
        .ok_or_else(|| {
            ImageError::Invalid(
                "cannot tell which kernel linux-image-amd64 depends on (run apt-get update)".into(),
            )
        })
}

/// Downloads (once) and unpacks the kernel package.
pub fn fetch(cache: &Path, package: Option<&str>) -> Result<Kernel, ImageError> {
    let package = match package {
        Some(p) => p.to_string(),
        None => default_package()?,
    };
    let release = package
        .strip_prefix("linux-image-")
        .map(|r| r.trim_end_matches("-unsigned").to_string())
        .ok_or_else(|| ImageError::Invalid(format!("{package:?} is not a linux-image package")))?;
    let dir = cache.join("kernel");
    let deb = crate::tools::debian_package(&dir, &package)?;
    let root = dir.join(&package);
    let kernel = Kernel {
        vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")),
        release,
        root,
    };
    if !kernel.modules_dir().join("modules.dep").is_file() {
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&kernel.root))?;
        run(Command::new("depmod")
            .arg("-b")
            .arg(&kernel.root)
            .arg(&kernel.release))?;
    }
    if !kernel.vmlinuz.is_file() {
        return Err(ImageError::Invalid(format!(
            "{} has no {}",
            deb.display(),
            kernel.vmlinuz.display()
        )));
    }
    Ok(kernel)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules for `early` then `wanted` from a `modules.dep` text, in a load order (each after
/// its dependencies, which are listed in the reverse of the order `modules.dep` gives, as
/// modprobe loads them), each naming what must be loaded before it: its dependencies, and
/// every early module.
pub fn order_from_dep(
    modules_dep: &str,
    early: &[&str],
    wanted: &[&str],
) -> Result<Vec<Module>, ImageError> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(path), (path.to_string(), list));
    }
    let mut order: Vec<Module> = Vec::new();
    let mut early_paths: Vec<String> = Vec::new();
    for (i, name) in early.iter().chain(wanted).enumerate() {
        let key = name.replace('-', "_");
        let (path, needs) = deps.get(&key).ok_or_else(|| {
            ImageError::Invalid(format!(
                "kernel module {name} is not in modules.dep (is it built in, or misspelled?)"
            ))
        })?;
        for dep in needs.iter().rev().chain(std::iter::once(path)) {
            if order.iter().any(|m| &m.path == dep) {
                continue;
            }
            let own = deps
                .get(&module_name(dep))
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let mut after: Vec<String> = if i < early.len() {
                Vec::new()
            } else {
                early_paths.clone()
            };
            for d in own {
                if !after.contains(&d) {
                    after.push(d);
                }
            }
            order.push(Module {
                path: dep.clone(),
                after,
            });
        }
        if i < early.len() {
            early_paths = order.iter().map(|m| m.path.clone()).collect();
        }
    }
    Ok(order)
}

/// The node's modules for this kernel: those the initramfs loads, and those that load in the
/// background after it.
pub fn module_order(kernel: &Kernel) -> Result<(Vec<Module>, Vec<Module>), ImageError> {
    let p = kernel.modules_dir().join("modules.dep");
    let text = std::fs::read_to_string(&p).map_err(ImageError::io("reading", &p))?;
    split_late(&text, EARLY_MODULES, INITRAMFS_MODULES, LATE_MODULES)
}

/// All of `early`, `initramfs` and `late` in load order, split into what the initramfs loads
/// (the first two and their dependencies) and the rest.
pub fn split_late(
    modules_dep: &str,
    early: &[&str],
    initramfs: &[&str],
    late: &[&str],
) -> Result<(Vec<Module>, Vec<Module>), ImageError> {
    let first: Vec<String> = order_from_dep(modules_dep, early, initramfs)?
        .into_iter()
        .map(|m| m.path)
        .collect();
    let all: Vec<&str> = initramfs.iter().chain(late).copied().collect();
    Ok(order_from_dep(modules_dep, early, &all)?
        .into_iter()
        .partition(|m| first.contains(&m.path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko
";

    fn paths(order: &[Module]) -> Vec<&str> {
        order.iter().map(|m| m.path.as_str()).collect()
    }

    #[test]
    fn dependencies_load_first_in_reverse_listed_order_and_once() {
        let order = order_from_dep(DEP, &[], &["virtio_pci", "virtio_net"]).expect("order");
        assert_eq!(
            paths(&order),
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
            ]
        );
        let virtio = &order[1];
        assert_eq!(virtio.after, ["kernel/drivers/virtio/virtio_ring.ko"]);
    }

    #[test]
    fn every_module_waits_for_the_early_ones() {
        let order = order_from_dep(DEP, &["crc64-rocksoft"], &["virtio"]).expect("order");
        assert_eq!(
            paths(&order),
            [
                "kernel/lib/crc64.ko",
                "kernel/lib/crc64-rocksoft.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
            ]
        );
        assert_eq!(order[1].after, ["kernel/lib/crc64.ko"]);
        assert_eq!(
            order[3].after,
            [
                "kernel/lib/crc64.ko",
                "kernel/lib/crc64-rocksoft.ko",
                "kernel/drivers/virtio/virtio_ring.ko"
            ]
        );
        assert_eq!(
            order_text(&order[..2]),
            "kernel/lib/crc64.ko\nkernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko\n"
        );
    }

    #[test]
    fn late_modules_are_those_the_initramfs_does_not_need() {
        let (first, late) = split_late(DEP, &[], &["virtio_pci"], &["virtio_net"]).expect("split");
        assert_eq!(
            paths(&first),
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
            ]
        );
        // virtio_net's own dependencies that the initramfs already loads are not again.
        assert_eq!(
            paths(&late),
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
            ]
        );
    }

    #[test]
    fn module_names_match_with_dashes_or_underscores() {
        let order = order_from_dep(DEP, &[], &["crc64-rocksoft"]).expect("order");
        assert_eq!(
            order.last().map(|m| m.path.as_str()),
            Some("kernel/lib/crc64-rocksoft.ko")
        );
    }

    #[test]
    fn an_unknown_module_is_named_in_the_error() {
        let err = order_from_dep(DEP, &[], &["nvme"]).expect_err("unknown");
        assert!(err.to_string().contains("nvme"), "{err}");
    }
}
