//! Loading the kernel modules: those the initramfs needs (the disk, dm-verity, SquashFS, the
//! watchdog; and ext4, which the node needs first) as fast as the CPUs allow, and those the
//! node needs only later (vfat, the network driver) in the background at the lowest CPU
//! priority, so they fill the time the boot leaves idle instead of delaying it; each task that
//! needs a late module waits for it.
//! What nothing on the way to the API needs (dm-crypt and AES for encrypted volumes, the power
//! button) is held back until a task asks for it (then it alone loads, with what it follows)
//! or the boot has settled ([`release_after`]).
//! Under TCG a module costs tens to hundreds of milliseconds (its signature hashed, its
//! relocations applied: `cargo bench -p vm-tests --bench modules`), and on a two-CPU machine
//! the emulator's own threads (network, disk, console) share the host's cores with the vCPUs.
//!
//! The loader is one process-wide set of threads: it starts in the initramfs (which goes on as
//! the node in the same process) from descriptors opened before `switch_root` removes the
//! files, so it carries on across it.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::platform::{ModuleLoad, Platform};

/// One module to load: its path (for names and errors), its open file, what it follows.
pub struct Pending {
    /// Relative path of the `.ko`.
    pub path: String,
    /// The parameters it loads with (the image builder's: `async_probe` for a module that
    /// drives no device, and the options modprobe.d would give).
    pub params: String,
    /// The file, opened while it was still there.
    pub file: File,
    /// Modules that must be in first (paths; ones no list names are taken to be in).
    pub after: Vec<String>,
}

/// What loading one module did and took.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its path.
    pub path: String,
    /// What the kernel said.
    pub outcome: Result<ModuleLoad, String>,
    /// How long it took.
    pub took: Duration,
}

/// What the loader has done so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every module tried, in the order they finished.
    pub done: Vec<Loaded>,
    /// Every module has been tried.
    pub finished: bool,
}

impl Progress {
    fn tried(&self, name: &str) -> Option<&Loaded> {
        self.done.iter().find(|l| name_of(&l.path) == name)
    }
}

static LOADER: OnceLock<watch::Sender<Progress>> = OnceLock::new();

/// A module's name as the kernel knows it: the file's stem, dashes as underscores.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

struct Queues {
    early: Vec<Pending>,
    late: Vec<Pending>,
    /// Late ones held back until [`Queues::released`].
    held: Vec<Pending>,
    released: bool,
    /// Paths tried.
    done: HashSet<String>,
    /// Paths either list names.
    known: HashSet<String>,
    /// Names of the late ones (held back or not).
    late_names: HashSet<String>,
}

impl Queues {
    fn take(&mut self, late: bool) -> Option<Pending> {
        // The late ones start once every early one has started: until then the early ones
        // (the boot disk, the root) have the CPUs.
        if late && !self.early.is_empty() {
            return None;
        }
        let (done, known) = (&self.done, &self.known);
        let ready = |m: &Pending| {
            m.after
                .iter()
                .all(|a| done.contains(a) || !known.contains(a))
        };
        if !late {
            let i = self.early.iter().position(ready)?;
            return Some(self.early.remove(i));
        }
        if let Some(i) = self.late.iter().position(ready) {
            return Some(self.late.remove(i));
        }
        if !self.released {
            return None;
        }
        let i = self.held.iter().position(ready)?;
        Some(self.held.remove(i))
    }

    /// Lets the held-back modules `names` load, with what they follow; the others stay held.
    fn release_named(&mut self, names: &[String]) {
        let needed = with_what_they_follow(&self.held, |name| names.iter().any(|n| n == name));
        let (now, held): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|m| needed.contains(&m.path));
        self.held = held;
        self.late.extend(now);
    }

    /// Whether either list names module `name` (with underscores).
    fn knows(&self, name: &str) -> bool {
        self.known.iter().any(|k| name_of(k) == name)
    }

    fn empty(&self, late: bool) -> bool {
        if late {
            self.late.is_empty() && self.held.is_empty()
        } else {
            self.early.is_empty()
        }
    }
}

/// The late modules the boot needs before the API answers: the volumes', the ESP's and the
/// network's, with what they depend on. The other late ones are held back.
const BEFORE_THE_API: &[&[&str]] = &[FOR_VOLUMES, FOR_ESP, FOR_NETWORK];

/// Splits `late` into what loads in the background now (what [`BEFORE_THE_API`] names, and
/// its dependencies) and what is held back.
fn hold_back(late: Vec<Pending>) -> (Vec<Pending>, Vec<Pending>) {
    let needed = with_what_they_follow(&late, |name| {
        BEFORE_THE_API.iter().any(|l| l.contains(&name))
    });
    late.into_iter().partition(|m| needed.contains(&m.path))
}

/// The paths of the modules in `list` whose name `wanted` accepts, and of those in `list` they
/// follow, directly or not.
fn with_what_they_follow(list: &[Pending], wanted: impl Fn(&str) -> bool) -> HashSet<String> {
    let mut needed: HashSet<&str> = list
        .iter()
        .filter(|m| wanted(&name_of(&m.path)))
        .map(|m| m.path.as_str())
        .collect();
    loop {
        let more: Vec<&str> = list
            .iter()
            .filter(|m| needed.contains(m.path.as_str()))
            .flat_map(|m| m.after.iter().map(String::as_str))
            .filter(|a| !needed.contains(a))
            .collect();
        if more.is_empty() {
            break;
        }
        needed.extend(more);
    }
    needed.into_iter().map(String::from).collect()
}

/// The loader's queues, for [`release`].
static QUEUES: OnceLock<Arc<(Mutex<Queues>, Condvar)>> = OnceLock::new();

/// Lets the held-back modules `names` load (a task waits for them), with what they follow:
/// the others stay held, so that they do not load beside the rest of the boot (an encrypted
/// node's `mountState` waits for dm-crypt; the bridge, overlay and loop modules would
/// otherwise load at once, on the way to the API).
fn release_named(names: &[String]) {
    with_queues(|q| q.release_named(names));
}

/// Changes the loader's queues (if it runs) and wakes it to look at them again.
fn with_queues(change: impl FnOnce(&mut Queues)) {
    if let Some(queues) = QUEUES.get() {
        let (lock, cv) = &**queues;
        change(&mut lock.lock().unwrap_or_else(|p| p.into_inner()));
        cv.notify_all();
    }
}

/// Lets the held-back modules load (the boot has settled).
pub fn release() {
    with_queues(|q| {
        if !q.released && !q.held.is_empty() {
            tracing::debug!("kernel modules: loading the {} held back", q.held.len());
        }
        q.released = true;
    });
}

/// [`release`]s the held-back modules after `delay` (the power button's, and dm-crypt's on a
/// node whose volumes are not encrypted: nothing waits for them, and they would otherwise load
/// beside the first calls the node answers).
pub fn release_after(delay: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        release();
    });
}

/// The late loader's thread id, once it runs (0 before).
static LATE_THREAD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Lowers the calling thread's CPU priority as far as it goes (nice 19): its work then runs
/// when nothing else wants the CPU. Records it as the late loader's.
fn lowest_priority() {
    // SAFETY: gettid takes nothing and returns the calling thread's id.
    let tid = unsafe { libc::gettid() };
    LATE_THREAD.store(tid, std::sync::atomic::Ordering::SeqCst);
    set_priority(tid, 19);
}

/// Sets thread `tid`'s nice value.
fn set_priority(tid: libc::pid_t, nice: libc::c_int) {
    // SAFETY: setpriority takes plain integers; PRIO_PROCESS with a thread id changes that
    // thread only (Linux).
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
}

/// A task waits for a module the late loader has not loaded yet: the loader's work is the
/// boot's now, so it runs at normal priority from here on. At nice 19 beside a busy boot it
/// crawled, and a module's load holds kernel locks: virtio_net's registration holds the
/// network configuration lock, which the network task's first request then waited out.
fn late_loader_is_awaited() {
    let tid = LATE_THREAD.swap(0, std::sync::atomic::Ordering::SeqCst);
    if tid != 0 {
        set_priority(tid, 0);
    }
}

/// Starts loading: `early` with `jobs` threads, `late` with one thread at the lowest priority,
/// each module once those it follows are in (an early one may follow only early ones), the
/// late ones nothing before the API needs only once [`release`]d. A second call does nothing
/// (one loader per process).
pub fn start(platform: Arc<dyn Platform>, early: Vec<Pending>, late: Vec<Pending>, jobs: usize) {
    let (tx, _) = watch::channel(Progress::default());
    if LOADER.set(tx).is_err() {
        return;
    }
    let known = early.iter().chain(&late).map(|m| m.path.clone()).collect();
    let late_names = late.iter().map(|m| name_of(&m.path)).collect();
    let (late, held) = hold_back(late);
    let queues = Arc::new((
        Mutex::new(Queues {
            early,
            late,
            held,
            released: false,
            done: HashSet::new(),
            known,
            late_names,
        }),
        Condvar::new(),
    ));
    let _ = QUEUES.set(queues.clone());
    let started = Instant::now();
    let mut workers = Vec::new();
    for late in std::iter::repeat_n(false, jobs.max(1)).chain([true]) {
        let (queues, platform) = (queues.clone(), platform.clone());
        workers.push(std::thread::spawn(move || {
            if late {
                lowest_priority();
            }
            worker(&platform, &queues, late)
        }));
    }
    std::thread::spawn(move || {
        for w in workers {
            let _ = w.join();
        }
        let Some(tx) = LOADER.get() else {
            return;
        };
        tx.send_modify(|p| p.finished = true);
        let p = tx.borrow();
        let failed: Vec<String> = p
            .done
            .iter()
            .filter_map(|l| l.outcome.as_ref().err().map(|e| format!("{}: {e}", l.path)))
            .collect();
        tracing::info!(
            "kernel modules: all {} in after {} ms{}",
            p.done.len(),
            started.elapsed().as_millis(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed.join("; "))
            }
        );
    });
}

fn worker(platform: &Arc<dyn Platform>, queues: &(Mutex<Queues>, Condvar), late: bool) {
    let (lock, cv) = queues;
    loop {
        let next = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.empty(late) {
                    break None;
                }
                if let Some(m) = q.take(late) {
                    break Some(m);
                }
                q = cv
                    .wait_timeout(q, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let Some(m) = next else {
            return;
        };
        let t = Instant::now();
        let outcome = platform
            .load_module_file(&m.file, &PathBuf::from(&m.path), &m.params)
            .map_err(|e| e.to_string());
        let loaded = Loaded {
            path: m.path.clone(),
            outcome,
            took: t.elapsed(),
        };
        lock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .done
            .insert(m.path);
        if let Some(tx) = LOADER.get() {
            tx.send_modify(|p| p.done.push(loaded));
        }
        cv.notify_all();
    }
}

/// What the loader has tried so far.
pub fn loaded() -> Vec<Loaded> {
    LOADER
        .get()
        .map(|tx| tx.borrow().done.clone())
        .unwrap_or_default()
}

/// Waits until the modules `names` are in (one this machine has no hardware for counts once
/// tried), releasing those of them held back, with what they follow. Returns at once when no loader runs
/// (the simulated machine); a name neither list holds (built into the kernel, or absent from
/// it) is not waited for.
pub async fn wait_for(names: &[&str]) -> Result<(), String> {
    wait(names, true).await
}

/// [`wait_for`] without releasing anything: for what may load whenever the loader gets to it.
pub async fn wait_for_quietly(names: &[&str]) -> Result<(), String> {
    wait(names, false).await
}

async fn wait(names: &[&str], ask: bool) -> Result<(), String> {
    let Some(tx) = LOADER.get() else {
        return Ok(());
    };
    let mut wanted: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
    let (held, late) = QUEUES.get().map_or((false, false), |queues| {
        let q = queues.0.lock().unwrap_or_else(|p| p.into_inner());
        // What neither list names is not the loader's to load: built into the kernel (a
        // flavour with the boot's drivers built in), or a driver the kernel does not have.
        wanted.retain(|w| q.knows(w));
        (
            q.held.iter().any(|m| wanted.contains(&name_of(&m.path))),
            wanted.iter().any(|w| q.late_names.contains(w)),
        )
    });
    if ask && held {
        release_named(&wanted);
    }
    let mut rx = tx.subscribe();
    // A module, once tried, stays tried, and the boost lasts: one look is enough.
    if late {
        let p = rx.borrow();
        if !p.finished && wanted.iter().any(|w| p.tried(w).is_none()) {
            late_loader_is_awaited();
        }
    }
    loop {
        {
            let p = rx.borrow_and_update();
            let mut all = true;
            for w in &wanted {
                match p.tried(w) {
                    Some(Loaded {
                        outcome: Err(e), ..
                    }) => return Err(format!("kernel module {w}: {e}")),
                    Some(_) => {}
                    None => all = false,
                }
            }
            if all || p.finished {
                return Ok(());
            }
        }
        if rx.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// Modules the boot disk needs (NVMe, or virtio for installer media).
pub const FOR_BOOT_DISK: &[&str] = &["nvme", "virtio_blk"];
/// efivarfs, where the firmware stub leaves which ESP it booted from.
pub const FOR_EFIVARS: &[&str] = &["efivarfs"];
/// The watchdogs' modules: the VM's hardware watchdog's driver (where the kernel has it) and
/// the kernel's own watchdog; `crate::watchdog` arms one of them.
pub const FOR_WATCHDOG: &[&str] = &["i6300esb", "softdog"];

/// What mapping and mounting the root needs.
pub const FOR_ROOT: &[&str] = &["dm_verity", "squashfs"];
/// The entropy device's driver.
pub const FOR_ENTROPY: &[&str] = &["virtio_rng"];
/// Modules every volume needs.
pub const FOR_VOLUMES: &[&str] = &["ext4"];
/// Modules an encrypted volume needs: dm-crypt with XTS (and AES-NI where the CPU has it).
pub const FOR_CRYPT: &[&str] = &["dm_crypt", "xts", "aesni_intel"];
/// Modules the ESP needs.
pub const FOR_ESP: &[&str] = &["vfat", "nls_cp437", "nls_ascii"];
/// Modules the network needs.
pub const FOR_NETWORK: &[&str] = &["virtio_net"];
/// Modules the power button needs.
pub const FOR_POWER_BUTTON: &[&str] = &["button", "evdev"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels() {
        assert_eq!(name_of("kernel/drivers/md/dm-crypt.ko"), "dm_crypt");
        assert_eq!(name_of("kernel/fs/ext4/ext4.ko"), "ext4");
    }

    fn pending(path: &str, after: &[&str]) -> Pending {
        Pending {
            path: path.into(),
            params: String::new(),
            file: tempfile::tempfile().expect("file"),
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_module_is_taken_only_once_what_it_follows_is_in() {
        let mut q = Queues {
            early: vec![pending("b", &["a"]), pending("a", &[])],
            late: vec![pending("c", &["b", "elsewhere"])],
            held: Vec::new(),
            released: false,
            done: HashSet::new(),
            known: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            late_names: HashSet::new(),
        };
        assert!(
            q.take(true).is_none(),
            "c follows b, and early ones are left"
        );
        assert_eq!(q.take(false).map(|m| m.path), Some("a".into()));
        assert!(q.take(false).is_none(), "b follows a, still loading");
        q.done.insert("a".into());
        assert_eq!(q.take(false).map(|m| m.path), Some("b".into()));
        q.done.insert("b".into());
        // "elsewhere" is in no list: taken to be in (built in, or loaded before).
        assert_eq!(q.take(true).map(|m| m.path), Some("c".into()));
        assert!(q.empty(false) && q.empty(true));
    }

    #[test]
    fn what_the_api_needs_loads_in_the_background_the_rest_is_held_until_released() {
        let late = vec![
            pending("kernel/lib/crc16.ko", &[]),
            pending("kernel/fs/ext4/ext4.ko", &["kernel/lib/crc16.ko"]),
            pending("kernel/crypto/cryptd.ko", &[]),
            pending(
                "kernel/arch/x86/crypto/aesni-intel.ko",
                &["kernel/crypto/cryptd.ko"],
            ),
            pending("kernel/drivers/input/evdev.ko", &[]),
            pending("kernel/drivers/net/virtio_net.ko", &[]),
        ];
        let (now, held) = hold_back(late);
        let names = |v: &[Pending]| v.iter().map(|m| name_of(&m.path)).collect::<Vec<_>>();
        assert_eq!(names(&now), ["crc16", "ext4", "virtio_net"]);
        assert_eq!(names(&held), ["cryptd", "aesni_intel", "evdev"]);

        let mut q = late_queues(now, held);
        let mut taken = take_all_late(&mut q);
        assert_eq!(taken, ["crc16", "ext4", "virtio_net"]);
        assert!(!q.empty(true), "the held ones are still to load");
        q.released = true;
        taken.extend(take_all_late(&mut q));
        assert_eq!(taken[3..], ["cryptd", "aesni_intel", "evdev"]);
        assert!(q.empty(true));
    }

    #[test]
    fn a_task_waiting_for_a_held_module_releases_it_and_what_it_follows_only() {
        let held = vec![
            pending("kernel/crypto/cryptd.ko", &[]),
            pending(
                "kernel/arch/x86/crypto/aesni-intel.ko",
                &["kernel/crypto/cryptd.ko"],
            ),
            pending("kernel/drivers/md/dm-crypt.ko", &[]),
            pending("kernel/net/bridge/bridge.ko", &[]),
            pending("kernel/drivers/input/evdev.ko", &[]),
        ];
        let mut q = late_queues(Vec::new(), held);
        q.release_named(&["dm_crypt".to_string(), "aesni_intel".to_string()]);
        let mut taken = take_all_late(&mut q);
        assert_eq!(taken, ["cryptd", "aesni_intel", "dm_crypt"]);
        assert!(!q.empty(true), "bridge and evdev are still held");
        q.released = true;
        taken.extend(take_all_late(&mut q));
        assert_eq!(taken[3..], ["bridge", "evdev"]);
    }

    #[test]
    fn a_module_neither_list_names_is_not_the_loaders() {
        // Debian's cloud kernel builds ext4 and NVMe in: the lists do not name them, and a
        // task waiting for them must not wait for the loader to finish everything.
        let q = late_queues(vec![pending("kernel/fs/fat/vfat.ko", &[])], Vec::new());
        assert!(q.knows("vfat"));
        assert!(!q.knows("ext4"));
        assert!(!q.knows("nvme"));
    }

    /// Queues with only late modules: `late` to load, `held` held back.
    fn late_queues(late: Vec<Pending>, held: Vec<Pending>) -> Queues {
        let known = late.iter().chain(&held).map(|m| m.path.clone()).collect();
        Queues {
            early: Vec::new(),
            late,
            held,
            released: false,
            done: HashSet::new(),
            known,
            late_names: HashSet::new(),
        }
    }

    /// Takes the late modules ready to load, each done at once; their names in order.
    fn take_all_late(q: &mut Queues) -> Vec<String> {
        let mut taken = Vec::new();
        while let Some(m) = q.take(true) {
            q.done.insert(m.path.clone());
            taken.push(name_of(&m.path));
        }
        taken
    }
}
