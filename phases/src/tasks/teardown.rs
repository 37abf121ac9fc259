//! Tearing the node down before a power action: processes, then file systems.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sequencer::TaskError;

use crate::platform::{MountEntry, Platform};
use crate::runtime::Runtime;

/// How long processes get between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// File systems that stay: the root image and the kernel's pseudo file systems.
const KEEP: &[&str] = &["/", "/proc", "/sys", "/dev", "/run"];

/// Mounts could not be unmounted (each was remounted read-only instead, if possible).
#[derive(Debug, thiserror::Error)]
#[error("would not unmount (remounted read-only instead): {}", .0.join(", "))]
pub struct StillMounted(pub Vec<String>);

/// SIGTERM to every remaining process, SIGKILL to those alive after [`KILL_GRACE`].
///
/// A process is gone when it is gone from `/proc`, not when its command line is empty: a Go
/// program's main thread can have exited (its command line empty, so [`Platform::processes`]
/// no longer lists it) while its other threads still hold its files, and the unmounts after
/// this would find them busy: a reset would then not wipe (seen with etcd, running from an
/// extension under `/usr/local`, on SIGTERM and on SIGKILL alike).
pub async fn kill_processes(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let p = ctx.platform.clone();
    let pids = p.processes()?;
    if pids.is_empty() {
        return Ok(());
    }
    for &pid in &pids {
        p.kill(pid, Signal::SIGTERM)?;
    }
    // What is still there: listed now (a process started meanwhile too), or one of those
    // signalled whose threads have not all gone.
    let left = |p: &dyn Platform| -> Result<Vec<i32>, TaskError> {
        let mut left = p.processes()?;
        let lingering: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&pid| p.process_exists(pid) && !left.contains(&pid))
            .collect();
        left.extend(lingering);
        Ok(left)
    };
    if wait_gone(p.as_ref(), &left).await? {
        return Ok(());
    }
    let stubborn = left(p.as_ref())?;
    tracing::warn!(
        "killing {} processes that ignored SIGTERM: {stubborn:?}",
        stubborn.len()
    );
    for &pid in &stubborn {
        p.kill(pid, Signal::SIGKILL)?;
    }
    if !wait_gone(p.as_ref(), &left).await? {
        tracing::warn!(
            "processes still there after SIGKILL: {:?}",
            left(p.as_ref())?
        );
    }
    Ok(())
}

/// Waits up to [`KILL_GRACE`] until `left` finds nothing; whether it did.
async fn wait_gone(
    p: &dyn Platform,
    left: &impl Fn(&dyn Platform) -> Result<Vec<i32>, TaskError>,
) -> Result<bool, TaskError> {
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        if left(p)?.is_empty() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kept(target: &Path) -> bool {
    KEEP.iter().any(|k| {
        let k = Path::new(k);
        target == k || (k != Path::new("/") && target.starts_with(k))
    })
}

/// The mounts to take down, deepest first (a mount is always taken down before the one it
/// sits on).
pub fn unmount_order(mounts: &[MountEntry]) -> Vec<PathBuf> {
    let mut order: Vec<(usize, usize, PathBuf)> = mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| !kept(&m.target))
        .map(|(i, m)| (m.target.components().count(), i, m.target.clone()))
        .collect();
    // Deeper first; among equals, the later mount first (it may cover the earlier one).
    order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    order.into_iter().map(|(_, _, t)| t).collect()
}

/// Unmounts every writable file system, deepest first; what will not unmount is remounted
/// read-only and reported.
pub async fn unmount_filesystems(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    // The extensions' mounts live under /run (kept) and their loop devices hold files on the
    // ESP: they go first, or the ESP would not unmount. Their overlay on /usr/local may stay
    // busy a moment after the last program from it has gone: tried for up to 2 s.
    let target = Path::new(crate::extensions::TARGET);
    for _ in 0..20 {
        let mounted = ctx.platform.mounts()?.iter().any(|m| m.target == target);
        if !mounted || ctx.platform.unmount(target).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::extensions::deactivate(&ctx);
    let p = &ctx.platform;
    let mut stuck = Vec::new();
    for target in unmount_order(&p.mounts()?) {
        if let Err(e) = p.unmount(&target) {
            tracing::warn!("{e}");
            let ro = match p.remount_read_only(&target) {
                Ok(()) => "read-only",
                Err(_) => "still writable",
            };
            stuck.push(format!("{} ({ro})", target.display()));
        }
    }
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(StillMounted(stuck).into())
    }
}

/// Flushes everything to disk.
pub async fn sync_disks(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    ctx.platform.sync();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(target: &str) -> MountEntry {
        MountEntry {
            target: target.into(),
            fstype: "x".into(),
            source: "y".into(),
        }
    }

    #[test]
    fn mounts_come_down_deepest_first_and_pseudo_file_systems_stay() {
        let mounts = [
            m("/"),
            m("/proc"),
            m("/sys/firmware/efi/efivars"),
            m("/run"),
            m("/system/state"),
            m("/var"),
            m("/var/lib/data"),
            m("/tmp"),
        ];
        let order: Vec<String> = unmount_order(&mounts)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(order, ["/var/lib/data", "/system/state", "/tmp", "/var"]);
    }
}
