//! The watchdog: armed early in the initramfs, fed only while the boot makes progress (every
//! event feeds it), and from machined's main loop once the node runs. A boot that hangs stops
//! feeding it, and the machine resets; on a trial boot, the firmware then falls back to the
//! committed slot. It is the machine's hardware watchdog where the kernel has its driver, else
//! the kernel's own timer (`softdog`: Debian's cloud kernel has no driver for the VM's
//! i6300esb), which resets a hung machined but not a kernel stuck with interrupts off.
//!
//! There is one watchdog per machine, so the open device is a process-wide value. The
//! initramfs hands its descriptor to machined across `exec` (it is opened without
//! `O_CLOEXEC`) and writes the number to `/run`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The device.
pub const DEVICE: &str = "/dev/watchdog";
/// Where the initramfs leaves the descriptor's number.
pub const HANDOFF: &str = "/run/plinth/watchdog-fd";
/// Seconds without a feed before the machine resets.
pub const TIMEOUT_S: i32 = 30;

nix::ioctl_readwrite!(
    /// `WDIOC_SETTIMEOUT`: sets the timeout in seconds (the driver may round it).
    wdioc_settimeout,
    b'W',
    6,
    libc::c_int
);

nix::ioctl_read!(
    /// `WDIOC_SETOPTIONS` (declared `_IOR` by the kernel, though it takes its argument in).
    wdioc_setoptions,
    b'W',
    4,
    libc::c_int
);
/// `WDIOS_DISABLECARD`: stop the watchdog.
const WDIOS_DISABLECARD: libc::c_int = 1;
/// The watchdog core's `stop_on_reboot` parameter (the image loads it with 0:
/// `imager::kernel::MODULE_OPTIONS`).
const STOP_ON_REBOOT: &str = "/sys/module/watchdog/parameters/stop_on_reboot";

/// What the driver calls its watchdog (the one `/dev/watchdog` opens, the first).
const IDENTITY: &str = "/sys/class/watchdog/watchdog0/identity";
/// There when the kernel's software watchdog is loaded.
const SOFTDOG: &str = "/sys/module/softdog";

static WATCHDOG: OnceLock<Mutex<File>> = OnceLock::new();

/// Opens and arms the watchdog (waiting up to `wait` for its driver to create the device).
/// Returns `Ok(false)` when the machine has none.
pub fn arm(wait: Duration) -> Result<bool, String> {
    let deadline = std::time::Instant::now() + wait;
    while !Path::new(DEVICE).exists() {
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without O_CLOEXEC: the descriptor must survive the exec into machined.
    let fd = nix::fcntl::open(
        DEVICE,
        nix::fcntl::OFlag::O_WRONLY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening {DEVICE}: {e}"))?;
    let file = File::from(fd);
    let mut timeout: libc::c_int = TIMEOUT_S;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes one c_int through the pointer, which points
    // at a live local for the duration of the call; the descriptor is open.
    unsafe { wdioc_settimeout(file.as_raw_fd(), &mut timeout) }
        .map_err(|e| format!("setting the watchdog timeout: {e}"))?;
    let fd = file.as_raw_fd();
    let _ = WATCHDOG.set(Mutex::new(file));
    feed();
    // Read back from the kernel: whether a kernel that hangs while rebooting gets reset too.
    let through_reboot = std::fs::read_to_string(STOP_ON_REBOOT).is_ok_and(|v| v.trim() == "0");
    let identity = std::fs::read_to_string(IDENTITY).unwrap_or_default();
    let identity = identity.trim();
    if through_reboot {
        tracing::info!(
            "watchdog armed: {identity} {TIMEOUT_S}s (fd {fd}), kept running through reboots"
        );
    } else {
        tracing::warn!(
            "watchdog armed: {identity} {TIMEOUT_S}s (fd {fd}), but the kernel stops it on \
             reboot: a reboot that hangs will not reset"
        );
    }
    if Path::new(SOFTDOG).exists() {
        tracing::warn!(
            "the watchdog is the kernel's own (softdog; no driver for a hardware one): it resets \
             a node whose machined hangs, not one whose kernel hangs with interrupts off"
        );
    }
    Ok(true)
}

/// Stops the watchdog (before a power-off: one that hangs should not become a reboot).
pub fn disarm() {
    if let Some(w) = WATCHDOG.get() {
        let f = w.lock().unwrap_or_else(|p| p.into_inner());
        let mut opt: libc::c_int = WDIOS_DISABLECARD;
        // SAFETY: WDIOC_SETOPTIONS reads one c_int through the pointer, which points at a
        // live local for the duration of the call; the descriptor is open.
        if let Err(e) = unsafe { wdioc_setoptions(f.as_raw_fd(), &mut opt) } {
            tracing::warn!("stopping the watchdog: {e}");
        }
    }
}

/// The descriptor number to hand over, if armed.
pub fn handoff_fd() -> Option<RawFd> {
    WATCHDOG
        .get()
        .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd())
}

/// Takes over the descriptor the initramfs left open.
pub fn adopt(fd: RawFd) {
    // The initramfs went on as the node in this same process: the device is already ours, and
    // a second owner of the descriptor would close it.
    if let Some(w) = WATCHDOG.get() {
        let file = w.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = close_on_exec(&file) {
            tracing::warn!("marking the watchdog close-on-exec: {e}");
        }
        return;
    }
    // Only an fd that is open and really the watchdog is adopted.
    let is_wd =
        std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|p| p == Path::new(DEVICE));
    if is_wd {
        // SAFETY: the descriptor was inherited across exec from our own initramfs, which opened
        // it for this purpose; nothing else in this process owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // It crossed one exec on purpose; it must not cross another into a service (which
        // could then keep the node alive, or reset it, by writing to it).
        if let Err(e) = close_on_exec(&file) {
            tracing::warn!("marking the watchdog close-on-exec: {e}");
        }
        let _ = WATCHDOG.set(Mutex::new(file));
        feed();
    }
}

/// Sets `FD_CLOEXEC` on `file`.
pub fn close_on_exec(file: &File) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = FdFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFD)?);
    fcntl(file, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC)).map(|_| ())
}

/// Feeds the watchdog, if one is armed.
pub fn feed() {
    if let Some(w) = WATCHDOG.get() {
        let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(b"\0");
    }
}

/// Whether a watchdog is armed in this process.
pub fn armed() -> bool {
    WATCHDOG.get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_descriptor_is_marked_close_on_exec() {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let f = tempfile::tempfile().expect("file");
        fcntl(&f, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear");
        close_on_exec(&f).expect("set");
        let flags = FdFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFD).expect("get"));
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
    }
}
