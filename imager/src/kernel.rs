//! The Debian kernel: download (cached), unpack, and the modules a node needs in load order.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::run;
use crate::ImageError;

/// What must be in before a module, beyond `modules.dep`'s symbol dependencies, by name or
/// alias, where `modules.softdep` does not say it (modprobe reads both the same way).
///
/// A module that asks the crypto API for an algorithm when it loads would otherwise make the
/// kernel call modprobe for it (the node has none, and autoloading is off:
/// [`ModuleIndex::order`] loads it first instead). `crc64_rocksoft` asks for `crc64-rocksoft`
/// as `crc_t10dif` asks for `crct10dif`, whose softdep the kernel declares and this one's it
/// does not.
pub const EXTRA_SOFTDEPS: &[(&str, &str)] = &[("crc64_rocksoft", "crypto-crc64-rocksoft")];

/// Modules the initramfs loads, by name: what it needs to find the boot disk (NVMe, or virtio
/// for installer media), map and mount the root, read the EFI variables and arm the watchdog,
/// and the entropy source TLS needs; and ext4, which the node needs first of all once the
/// initramfs is done (STATE holds its config), and which is the largest module: loaded beside
/// the initramfs's own work (in the late loader's background, the node waited about 0.2 s
/// more for it under TCG: BENCHMARKS.md), but after the rest, which the initramfs's tasks wait
/// for one after another. Their dependencies are added from `modules.dep` and
/// `modules.softdep`; they load in parallel in this order, each once what it follows is in.
///
/// The root's dm-verity hashes with the SHA-256 built into the kernel: the CPU's
/// (`sha256_ssse3`) costs its load (12–33 ms under TCG, where it hashes no faster than the C
/// code: BENCHMARKS.md), and the root is a few MiB, read little once machined runs from the
/// initramfs. It loads later, for the extensions' larger reads (held
/// back until they ask or the boot has settled).
pub const INITRAMFS_MODULES: &[&str] = &[
    // In the order the boot's tasks wait for them: what finding the boot disk waits for, the
    // watchdog (armed beside the disk's search, which ends its phase), the root's, ext4
    // (the hand-over's first need; listed before the watchdog, its 2 MiB held a CPU through
    // the boot disk's chain of modules and NVMe probe), entropy (the API's).
    "efivarfs",
    "nvme",
    "virtio_pci",
    "virtio_blk",
    // The VM's hardware watchdog's driver, and the kernel's own watchdog, which the node arms
    // where the machine has no hardware watchdog the kernel drives (`phases::watchdog`).
    "i6300esb",
    "softdog",
    "dm_verity",
    "squashfs",
    "ext4",
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
    // System extensions (loop devices over their files, checked by dm-verity with the CPU's
    // SHA-256, overlaid on /usr/local) and, for containers, their networks: held back until
    // an extension or a container asks, or the boot has settled.
    "loop",
    "overlay",
    "sha256_ssse3",
    "veth",
    "bridge",
];

/// Options modules load with, as `/etc/modprobe.d` would give them (the node has no modprobe).
/// The watchdog core stops the watchdog when the kernel reboots (`stop_on_reboot`), and a
/// kernel that then hangs in its reboot path (seen under TCG: soft lockups inside reboot(2))
/// would stay hung for good; kept running, the watchdog resets it. An option holds no `:`
/// (the list's separator).
pub const MODULE_OPTIONS: &[(&str, &str)] = &[("watchdog", "stop_on_reboot=0")];

/// A module to load: its path under `lib/modules/<release>/`, the parameters it loads with,
/// and the modules that must be in before it (paths too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Relative path of the `.ko`.
    pub path: String,
    /// Its parameters (`name=value`).
    pub params: Vec<String>,
    /// What it needs loaded first.
    pub after: Vec<String>,
}

/// The node's module list as the initramfs reads it: one module per line,
/// `path [param...][: after...]`.
pub fn order_text(modules: &[Module]) -> String {
    modules
        .iter()
        .map(|m| {
            let mut line = std::iter::once(&m.path)
                .chain(&m.params)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ");
            if !m.after.is_empty() {
                line = format!("{line}: {}", m.after.join(" "));
            }
            line + "\n"
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

/// The kernel the image is built with unless told otherwise: Debian's cloud flavour, for
/// virtual machines. It builds in what a VM's boot needs (ext4, NVMe and their CRC chain), so
/// the initramfs loads 15 modules instead of 30 and the boot costs less (BENCHMARKS.md); it
/// has no drivers for most physical hardware nor for the VM's hardware watchdog
/// ([`OPTIONAL_MODULES`]). Bare metal takes the generic flavour, `linux-image-amd64`.
pub const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";

/// The release a versioned kernel package carries (`linux-image-6.1.0-57-cloud-amd64`:
/// `6.1.0-57-cloud-amd64`); `None` for a metapackage (`linux-image-amd64`) or anything else.
fn release_in(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")
        .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// The versioned kernel package a metapackage (`linux-image-amd64`,
/// `linux-image-cloud-amd64`) depends on, or a versioned one as it is; and its release.
fn versioned_package(package: &str) -> Result<(String, String), ImageError> {
    let versioned = match release_in(package) {
        Some(_) => package.to_string(),
        None if package.starts_with("linux-image-") => {
            let out = run(Command::new("apt-cache").args(["depends", package])).map_err(|e| {
                ImageError::Invalid(format!(
                    "asking apt which kernel {package} depends on (misspelled, or run apt-get \
                     update?): {e}"
                ))
            })?;
            depends_on_kernel(&out).ok_or_else(|| {
                ImageError::Invalid(format!("{package} depends on no versioned kernel package"))
            })?
        }
        None => {
            return Err(ImageError::Invalid(format!(
                "{package:?} is not a linux-image package"
            )))
        }
    };
    let release = release_in(&versioned)
        .unwrap_or_default()
        .trim_end_matches("-unsigned")
        .to_string();
    Ok((versioned, release))
}

/// The versioned kernel package in `apt-cache depends` output (`Depends:`, or `|Depends:` for
/// one of alternatives).
fn depends_on_kernel(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| release_in(p).is_some())
        .map(str::to_owned)
}

/// Downloads (once) and unpacks the kernel package.
pub fn fetch(cache: &Path, package: Option<&str>) -> Result<Kernel, ImageError> {
    let (package, release) = versioned_package(package.unwrap_or(DEFAULT_PACKAGE))?;
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

/// What the kernel package says about its modules, parsed once: each module's path and symbol
/// dependencies (`modules.dep`), its softdeps, and which modules drive devices
/// (`modules.alias`).
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// By name: the path and the paths it needs.
    deps: HashMap<String, (String, Vec<String>)>,
    /// By name: the names that must be in before it beyond its symbol dependencies.
    soft: HashMap<String, Vec<String>>,
    /// Names of the modules with a device alias.
    with_devices: HashSet<String>,
    /// Names of the modules built into the kernel (`modules.builtin`): nothing to load.
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Reads the kernel package's `modules.dep`, `modules.softdep`, `modules.alias` and
    /// `modules.builtin`.
    pub fn of(kernel: &Kernel) -> Result<ModuleIndex, ImageError> {
        let read = |file: &str| {
            let p = kernel.modules_dir().join(file);
            std::fs::read_to_string(&p).map_err(ImageError::io("reading", &p))
        };
        Ok(ModuleIndex::parse(
            &read("modules.dep")?,
            &read("modules.softdep")?,
            &read("modules.alias")?,
            EXTRA_SOFTDEPS,
        )
        .with_builtin(&read("modules.builtin")?))
    }

    /// This index, knowing the modules `modules_builtin` lists (one path per line) as built
    /// into the kernel: a kernel flavour that builds in what the boot needs (Debian's cloud
    /// kernel has ext4 and NVMe built in) has them there before `/init`, with nothing to load.
    pub fn with_builtin(mut self, modules_builtin: &str) -> ModuleIndex {
        self.builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        self
    }

    /// Whether module `name` is built into the kernel.
    fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Whether module `name` is neither a module of this kernel nor built in.
    fn is_absent(&self, name: &str) -> bool {
        let n = name.replace('-', "_");
        !self.deps.contains_key(&n) && !self.builtin.contains(&n)
    }

    /// Whether module `name` is one the node can do without ([`OPTIONAL_MODULES`]) and this
    /// kernel does not have.
    fn is_absent_optional(&self, name: &str) -> bool {
        let n = name.replace('-', "_");
        self.is_absent(&n) && OPTIONAL_MODULES.iter().any(|o| o.replace('-', "_") == n)
    }

    /// The [`OPTIONAL_MODULES`] this kernel does not have: the image is built without them,
    /// and says so.
    pub fn absent_optional(&self) -> Vec<&'static str> {
        OPTIONAL_MODULES
            .iter()
            .copied()
            .filter(|o| self.is_absent(o))
            .collect()
    }

    /// The index of these texts, with `extra` softdeps (module, what it needs first).
    pub fn parse(
        modules_dep: &str,
        softdep_text: &str,
        alias_text: &str,
        extra: &[(&str, &str)],
    ) -> ModuleIndex {
        let mut deps = HashMap::new();
        for line in modules_dep.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let list = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(module_name(path), (path.to_string(), list));
        }
        let mut aliases: HashMap<&str, Vec<String>> = HashMap::new();
        let mut with_devices = HashSet::new();
        for line in alias_text.lines() {
            if let ["alias", alias, module] = line.split_whitespace().collect::<Vec<_>>()[..] {
                let module = module.replace('-', "_");
                if is_device_alias(alias) {
                    with_devices.insert(module.clone());
                }
                aliases.entry(alias).or_default().push(module);
            }
        }
        let soft = softdeps(softdep_text, &aliases, &deps, extra);
        ModuleIndex {
            deps,
            soft,
            with_devices,
            builtin: HashSet::new(),
        }
    }

    /// Fails naming the first of `drivers` that `modules.alias` does not show driving a device.
    pub fn check_drivers(&self, drivers: &[&str]) -> Result<(), ImageError> {
        // A built-in driver probes before `/init`; an absent one is not loaded (`order` says
        // so unless it is optional).
        match drivers.iter().find(|d| {
            !self.with_devices.contains(&d.replace('-', "_"))
                && !self.is_builtin(d)
                && !self.is_absent(d)
        }) {
            Some(d) => Err(ImageError::Invalid(format!(
                "kernel module {d} has no device alias in modules.alias: it would load without \
                 waiting for its devices (is modules.alias complete, and from this kernel?)"
            ))),
            None => Ok(()),
        }
    }

    /// The modules for `wanted` in a load order: each after what it needs, its symbol
    /// dependencies (listed in the reverse of the order `modules.dep` gives, as modprobe loads
    /// them) and its softdeps, each naming those.
    pub fn order(&self, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
        let mut order: Vec<Module> = Vec::new();
        let mut visiting: Vec<String> = Vec::new();
        for name in wanted {
            if self.is_builtin(name) || self.is_absent_optional(name) {
                continue;
            }
            let Some((path, _)) = self.deps.get(&name.replace('-', "_")) else {
                return Err(ImageError::Invalid(format!(
                    "kernel module {name} is neither in modules.dep nor in modules.builtin \
                     (misspelled, or not in this kernel?)"
                )));
            };
            self.visit(path, &mut order, &mut visiting);
        }
        Ok(order)
    }

    /// All of `initramfs` and `late` in load order, split into what the initramfs loads (the
    /// first and what they need) and the rest.
    pub fn split_late(
        &self,
        initramfs: &[&str],
        late: &[&str],
    ) -> Result<(Vec<Module>, Vec<Module>), ImageError> {
        let first: HashSet<String> = self.order(initramfs)?.into_iter().map(|m| m.path).collect();
        let all: Vec<&str> = initramfs.iter().chain(late).copied().collect();
        Ok(self
            .order(&all)?
            .into_iter()
            .partition(|m| first.contains(&m.path)))
    }

    /// Puts the module at `path` in `order` after what it needs (a softdep cycle is cut where
    /// it closes: the module that closes it does not wait for the other).
    fn visit(&self, path: &str, order: &mut Vec<Module>, visiting: &mut Vec<String>) {
        if order.iter().any(|m| m.path == path) || visiting.iter().any(|v| v == path) {
            return;
        }
        let name = module_name(path);
        let needs = self
            .deps
            .get(&name)
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let pre: Vec<String> = self
            .soft
            .get(&name)
            .into_iter()
            .flatten()
            .filter_map(|p| self.deps.get(p).map(|(path, _)| path.clone()))
            .filter(|p| p != path)
            .collect();
        visiting.push(path.to_string());
        for dep in pre.iter().chain(needs.iter().rev()) {
            self.visit(dep, order, visiting);
        }
        visiting.pop();
        let mut after = needs;
        for p in pre {
            if !after.contains(&p) {
                after.push(p);
            }
        }
        // What a cycle cut is not in the order yet: waiting for it would wait for ever.
        after.retain(|a| order.iter().any(|m| &m.path == a));
        let params = self.params(&name);
        order.push(Module {
            path: path.to_string(),
            params,
            after,
        });
    }

    /// The parameters module `name` loads with: its [`MODULE_OPTIONS`], and `async_probe=1`
    /// if it drives no device.
    ///
    /// With `async_probe` the kernel skips the wait that ends every other module's load, for
    /// all asynchronous work in the system to finish. The NVMe driver probes its controller
    /// asynchronously, so under TCG every module that finished while it did (the file
    /// systems, the watchdog core) held its loader thread until the probe was done, up to
    /// half a second: all the loader's threads at once, ext4 not even started. A device
    /// driver keeps the wait: once its load returns, its devices are there.
    fn params(&self, name: &str) -> Vec<String> {
        let mut params: Vec<String> = MODULE_OPTIONS
            .iter()
            .filter(|(m, _)| *m == name)
            .map(|(_, p)| p.to_string())
            .collect();
        if !self.with_devices.contains(name) {
            params.push("async_probe=1".into());
        }
        params
    }
}

/// Whether a `modules.alias` pattern matches a device (`pci:…`, `virtio:…`, `acpi*:…`,
/// `input:…`: a bus and its ids), which the kernel loads the module for when one appears. Not
/// a device: a file system, algorithm or protocol (`fs-ext4`, `crypto-sha256`, `net-pf-10`,
/// no bus), a device node the module makes itself (`devname:`), or a CPU feature (`cpu:`:
/// the AES and CRC instructions).
fn is_device_alias(alias: &str) -> bool {
    alias
        .split_once(':')
        .is_some_and(|(bus, _)| !matches!(bus, "devname" | "cpu"))
}

/// What must be in before each module beyond its symbol dependencies (`pre:` in
/// `modules.softdep`, and `extra`), resolved to module names much as modprobe resolves them:
/// a module's own name, else the modules `modules.alias` gives for it (`aliases`). Of several
/// (the CPU's implementation of an algorithm and the generic one) modprobe loads all; this takes
/// the generic one, which loads on any CPU, and only it.
/// One that resolves to no module is built into the kernel, and needs no loading.
fn softdeps(
    softdep_text: &str,
    aliases: &HashMap<&str, Vec<String>>,
    deps: &HashMap<String, (String, Vec<String>)>,
    extra: &[(&str, &str)],
) -> HashMap<String, Vec<String>> {
    let resolve = |name: &str| -> Option<String> {
        let own = name.replace('-', "_");
        if deps.contains_key(&own) {
            return Some(own);
        }
        let found = aliases.get(name)?;
        found
            .iter()
            .find(|m| m.ends_with("_generic"))
            .or(found.first())
            .cloned()
    };
    let mut pre: Vec<(String, &str)> = Vec::new();
    for line in softdep_text.lines() {
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
            continue;
        };
        let mut in_pre = false;
        for w in words {
            match w {
                "pre:" => in_pre = true,
                "post:" => in_pre = false,
                _ if in_pre => pre.push((module.replace('-', "_"), w)),
                _ => {}
            }
        }
    }
    pre.extend(extra.iter().map(|(m, p)| (m.replace('-', "_"), *p)));
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (module, wanted) in pre {
        if let Some(r) = resolve(wanted) {
            let list = out.entry(module).or_default();
            if !list.contains(&r) {
                list.push(r);
            }
        }
    }
    out
}

/// Device drivers whose load the boot relies on returning with their devices there (the disk,
/// the watchdog, the entropy source, the network): a kernel package whose `modules.alias` does
/// not show them as drivers (a file cut short, another kernel's) would have them load with
/// `async_probe` and the boot race their devices, so the image is not built.
pub const DEVICE_DRIVERS: &[&str] = &[
    "nvme",
    "virtio_pci",
    "virtio_blk",
    "i6300esb",
    "virtio_rng",
    "virtio_net",
];

/// Modules the image is built without when the kernel has none (neither a module nor built
/// in): the VM's hardware watchdog driver. Debian's cloud kernel, the image's default, has no
/// driver for QEMU's i6300esb; the node then arms the kernel's own watchdog, softdog, which
/// the image always carries (`phases::watchdog`: it resets a hung machined, not a kernel
/// that stops taking interrupts; the generic kernel, `--kernel-package linux-image-amd64`,
/// drives the VM's).
pub const OPTIONAL_MODULES: &[&str] = &["i6300esb"];

/// The node's modules for one kernel.
pub struct ModuleOrder {
    /// What the initramfs loads, in order.
    pub initramfs: Vec<Module>,
    /// What loads in the background after it.
    pub late: Vec<Module>,
    /// The [`OPTIONAL_MODULES`] this kernel does not have.
    pub absent: Vec<&'static str>,
}

/// The node's modules for this kernel.
pub fn module_order(kernel: &Kernel) -> Result<ModuleOrder, ImageError> {
    let index = ModuleIndex::of(kernel)?;
    index.check_drivers(DEVICE_DRIVERS)?;
    let (initramfs, late) = index.split_late(INITRAMFS_MODULES, LATE_MODULES)?;
    Ok(ModuleOrder {
        initramfs,
        late,
        absent: index.absent_optional(),
    })
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

    fn index(softdep: &str) -> ModuleIndex {
        ModuleIndex::parse(DEP, softdep, "", &[])
    }

    fn paths(order: &[Module]) -> Vec<&str> {
        order.iter().map(|m| m.path.as_str()).collect()
    }

    #[test]
    fn dependencies_load_first_in_reverse_listed_order_and_once() {
        let order = index("")
            .order(&["virtio_pci", "virtio_net"])
            .expect("order");
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

    const SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep virtio_pci pre: crypto-crc64-rocksoft
softdep virtio pre: builtin-only post: virtio_net
";
    const ALIAS: &str = "\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias crypto-crc64-rocksoft crc64_rocksoft_fast
alias crypto-crc64-rocksoft crc64-rocksoft
";

    #[test]
    fn softdeps_resolve_through_aliases_to_the_generic_module_and_skip_what_is_built_in() {
        let dep = format!("{DEP}kernel/crypto/crc64_rocksoft_fast.ko:\n");
        let soft = ModuleIndex::parse(&dep, SOFTDEP, ALIAS, &[("virtio-net", "virtio-ring")]).soft;
        // Of two modules for one alias, neither generic, the first; no `post:`; a name that
        // is neither a module nor an alias is built in.
        assert_eq!(soft["virtio_pci"], ["crc64_rocksoft_fast"]);
        assert!(!soft.contains_key("virtio"), "{soft:?}");
        assert_eq!(soft["virtio_net"], ["virtio_ring"]);
        let generic = ALIAS.replace("crc64_rocksoft_fast", "crc64_rocksoft_generic");
        let dep = format!("{DEP}kernel/crypto/crc64_rocksoft_generic.ko:\n");
        let soft = ModuleIndex::parse(&dep, SOFTDEP, &generic, &[]).soft;
        assert_eq!(soft["virtio_pci"], ["crc64_rocksoft_generic"]);
    }

    #[test]
    fn a_softdep_loads_before_its_module_and_nothing_else_waits_for_it() {
        let order = index("softdep virtio_pci pre: crc64-rocksoft")
            .order(&["virtio_net", "virtio_pci"])
            .expect("order");
        let at = |p: &str| order.iter().position(|m| m.path == p).expect(p);
        assert!(at("kernel/lib/crc64-rocksoft.ko") < at("kernel/drivers/virtio/virtio_pci.ko"));
        assert!(at("kernel/lib/crc64.ko") < at("kernel/lib/crc64-rocksoft.ko"));
        let pci = &order[at("kernel/drivers/virtio/virtio_pci.ko")];
        assert!(pci
            .after
            .contains(&"kernel/lib/crc64-rocksoft.ko".to_string()));
        // virtio_net (and virtio, which both need) does not wait for what virtio_pci follows.
        let net = &order[at("kernel/drivers/net/virtio_net.ko")];
        assert!(!net.after.iter().any(|a| a.contains("crc64")), "{net:?}");
    }

    #[test]
    fn a_softdep_cycle_is_cut() {
        let order = index("softdep virtio pre: crc64_rocksoft\nsoftdep crc64_rocksoft pre: virtio")
            .order(&["virtio"])
            .expect("order");
        assert_eq!(order.len(), 4, "{order:?}");
        // No two modules wait for each other, and each waits only for what is before it.
        for (i, m) in order.iter().enumerate() {
            for a in &m.after {
                assert!(
                    order[..i].iter().any(|b| &b.path == a),
                    "{} waits for {a}, not before it: {order:?}",
                    m.path
                );
            }
        }
    }

    #[test]
    fn built_in_modules_are_not_loaded_and_an_absent_optional_one_is_left_out() {
        let idx =
            index("").with_builtin("kernel/fs/ext4/ext4.ko\nkernel/drivers/nvme/host/nvme.ko\n");
        let order = idx
            .order(&["ext4", "nvme", "i6300esb", "virtio_ring"])
            .expect("an order");
        assert_eq!(paths(&order), ["kernel/drivers/virtio/virtio_ring.ko"]);
        assert_eq!(idx.absent_optional(), ["i6300esb"]);
        // Built in, a driver's devices are there before /init: no alias needed.
        idx.check_drivers(&["nvme", "i6300esb"]).expect("drivers");
        let err = idx.order(&["ext5"]).expect_err("a misspelled module");
        assert!(err.to_string().contains("ext5"), "{err}");
        // An absent driver the node needs is named as absent, not as one without an alias.
        idx.check_drivers(&["virtio_blk"]).expect("left to order");
        let err = idx.order(&["virtio_blk"]).expect_err("absent");
        assert!(err.to_string().contains("neither in modules.dep"), "{err}");
    }

    #[test]
    fn a_metapackage_names_the_versioned_kernel_it_depends_on() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            depends_on_kernel(out).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        // A virtual package (`<…>`) or another kind of dependency is not a kernel.
        assert_eq!(
            depends_on_kernel("x\n  Depends: <linux-image-6.1.0-1-amd64>\n  Depends: linux-base\n"),
            None
        );
        assert_eq!(
            versioned_package("linux-image-6.1.0-57-amd64").expect("as it is"),
            ("linux-image-6.1.0-57-amd64".into(), "6.1.0-57-amd64".into())
        );
        let err = versioned_package("vmlinuz").expect_err("not a kernel package");
        assert!(err.to_string().contains("vmlinuz"), "{err}");
    }

    #[test]
    fn late_modules_are_those_the_initramfs_does_not_need() {
        let (first, late) = index("")
            .split_late(&["virtio_pci"], &["virtio_net"])
            .expect("split");
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
        let order = index("").order(&["crc64-rocksoft"]).expect("order");
        assert_eq!(
            order.last().map(|m| m.path.as_str()),
            Some("kernel/lib/crc64-rocksoft.ko")
        );
    }

    #[test]
    fn an_unknown_module_is_named_in_the_error() {
        let err = index("").order(&["nvme"]).expect_err("unknown");
        assert!(err.to_string().contains("nvme"), "{err}");
    }

    /// Aliases as Debian's 6.1 kernel has them for these modules.
    const DEVICE_ALIASES: &str = "\
alias fs-ext4 ext4
alias crypto-sha256 sha256_ssse3
alias cpu:type:x86,ven*fam*mod*:feature:*0099* aesni_intel
alias devname:mapper/control dm_mod
alias char-major-10-236 dm_mod
alias pci:v00008086d000025ABsv*sd*bc*sc*i* i6300esb
alias virtio:d00000004v* virtio_rng
alias acpi*:PNP0C0C:* button
alias input:b*v*p*e*-e*k*r*a*m*l*s*f*w* evdev
";

    #[test]
    fn only_modules_that_drive_no_device_skip_the_wait_for_device_probes() {
        let dep = "kernel/fs/ext4/ext4.ko:\nkernel/arch/x86/crypto/sha256-ssse3.ko:\n\
            kernel/arch/x86/crypto/aesni-intel.ko:\nkernel/drivers/md/dm-mod.ko:\n\
            kernel/drivers/watchdog/watchdog.ko:\n\
            kernel/drivers/watchdog/i6300esb.ko: kernel/drivers/watchdog/watchdog.ko\n\
            kernel/drivers/char/hw_random/virtio-rng.ko:\nkernel/drivers/acpi/button.ko:\n\
            kernel/drivers/input/evdev.ko:\n";
        let index = ModuleIndex::parse(dep, "", DEVICE_ALIASES, &[]);
        let order = index
            .order(&[
                "ext4",
                "sha256_ssse3",
                "aesni_intel",
                "dm_mod",
                "i6300esb",
                "virtio_rng",
                "button",
                "evdev",
            ])
            .expect("order");
        let params = |name: &str| {
            order
                .iter()
                .find(|m| module_name(&m.path) == name)
                .map(|m| m.params.join(" "))
                .expect(name)
        };
        for deviceless in ["ext4", "sha256_ssse3", "aesni_intel", "dm_mod"] {
            assert_eq!(params(deviceless), "async_probe=1", "{deviceless}");
        }
        for driver in ["i6300esb", "virtio_rng", "button", "evdev"] {
            assert_eq!(params(driver), "", "{driver}");
        }
        // The watchdog core keeps running through a reboot, and has no device of its own.
        assert_eq!(params("watchdog"), "stop_on_reboot=0 async_probe=1");
        assert_eq!(
            order_text(&order[..1]),
            "kernel/fs/ext4/ext4.ko async_probe=1\n"
        );
        let esb = order
            .iter()
            .find(|m| m.path.contains("i6300esb"))
            .expect("esb");
        assert_eq!(
            order_text(std::slice::from_ref(esb)),
            "kernel/drivers/watchdog/i6300esb.ko: kernel/drivers/watchdog/watchdog.ko\n"
        );
    }

    #[test]
    fn module_options_fit_the_list_and_name_modules_as_the_kernel_does() {
        for (module, option) in MODULE_OPTIONS {
            assert!(!option.contains(':') && !option.contains(char::is_whitespace));
            assert_eq!(*module, module_name(module), "{module}");
        }
    }

    #[test]
    fn a_driver_the_boot_waits_on_must_show_as_one() {
        let dep = "kernel/drivers/watchdog/i6300esb.ko:\nkernel/fs/ext4/ext4.ko:\n";
        let index = ModuleIndex::parse(dep, "", DEVICE_ALIASES, &[]);
        index.check_drivers(&["i6300esb"]).expect("a driver");
        let err = index
            .check_drivers(&["i6300esb", "ext4"])
            .expect_err("no device");
        assert!(err.to_string().contains("ext4"), "{err}");
        // An empty alias file shows no driver at all.
        let err = ModuleIndex::parse(dep, "", "", &[])
            .check_drivers(&["i6300esb"])
            .expect_err("no aliases");
        assert!(err.to_string().contains("i6300esb"), "{err}");
    }
}
