//! Loading the kernel modules: those the initramfs needs (the disk, dm-verity, SquashFS, the
//! watchdog) as fast as the CPUs allow, and those the node needs only later (ext4, dm-crypt,
//! vfat, the network driver, the power button) in the background at the lowest CPU priority,
//! so they fill the time the boot leaves idle instead of delaying it; each task that needs a
//! late module waits for it. Under TCG a module costs tens to hundreds of milliseconds (its
//! signature hashed, its relocations applied, its self-tests run).
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
    /// Paths tried.
    done: HashSet<String>,
    /// Paths either list names.
    known: HashSet<String>,
}

impl Queues {
    fn take(&mut self, late: bool) -> Option<Pending> {
        // The late ones start once every early one has started: until then the early ones
        // (the boot disk, the root) have the CPUs.
        if late && !self.early.is_empty() {
            return None;
        }
        let (done, known) = (&self.done, &self.known);
        let q = if late {
            &mut self.late
        } else {
            &mut self.early
        };
        let i = q.iter().position(|m| {
            m.after
                .iter()
                .all(|a| done.contains(a) || !known.contains(a))
        })?;
        Some(q.remove(i))
    }

    fn empty(&self, late: bool) -> bool {
        if late {
            self.late.is_empty()
        } else {
            self.early.is_empty()
        }
    }
}

/// Lowers the calling thread's CPU priority as far as it goes (nice 19): its work then runs
/// when nothing else wants the CPU.
fn lowest_priority() {
    // SAFETY: gettid and setpriority take and return plain integers; PRIO_PROCESS with a
    // thread id changes that thread only (Linux).
    let _ = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
}

/// Starts loading: `early` with `jobs` threads, `late` with one thread at the lowest priority,
/// each module once those it follows are in (an early one may follow only early ones). A
/// second call does nothing (one loader per process).
pub fn start(platform: Arc<dyn Platform>, early: Vec<Pending>, late: Vec<Pending>, jobs: usize) {
    let (tx, _) = watch::channel(Progress::default());
    if LOADER.set(tx).is_err() {
        return;
    }
    let known = early.iter().chain(&late).map(|m| m.path.clone()).collect();
    let queues = Arc::new((
        Mutex::new(Queues {
            early,
            late,
            done: HashSet::new(),
            known,
        }),
        Condvar::new(),
    ));
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
            .load_module_file(&m.file, &PathBuf::from(&m.path))
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
/// tried). Returns at once when no loader runs (the simulated machine).
pub async fn wait_for(names: &[&str]) -> Result<(), String> {
    let Some(tx) = LOADER.get() else {
        return Ok(());
    };
    let wanted: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
    let mut rx = tx.subscribe();
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

/// Modules the boot disk needs (NVMe, or virtio for installer media) and the EFI variables
/// the firmware stub left.
pub const FOR_BOOT_DISK: &[&str] = &["nvme", "virtio_blk", "efivarfs"];
/// The hardware watchdog's driver.
pub const FOR_WATCHDOG: &[&str] = &["i6300esb"];
/// What mapping and mounting the root needs.
pub const FOR_ROOT: &[&str] = &["dm_verity", "sha256_ssse3", "squashfs"];
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
            file: tempfile::tempfile().expect("file"),
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_module_is_taken_only_once_what_it_follows_is_in() {
        let mut q = Queues {
            early: vec![pending("b", &["a"]), pending("a", &[])],
            late: vec![pending("c", &["b", "elsewhere"])],
            done: HashSet::new(),
            known: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
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
}
