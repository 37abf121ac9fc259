//! The watchdog: armed early in the initramfs, fed only while the boot makes progress (every
//! event feeds it), and from machined's main loop once the node runs. A boot that hangs stops
//! feeding it, and the machine resets; on a trial boot, the firmware then falls back to the
//! committed slot. It is the machine's hardware watchdog where the kernel drives one, else the
//! kernel's own timer (`softdog`: Debian's cloud kernel has no driver for the VM's i6300esb),
//! which resets a hung machined but not a kernel that stops taking interrupts ([`pick`]).
//!
//! There is one watchdog per machine, so the open device is a process-wide value. The
//! initramfs hands its descriptor to machined across `exec` (it is opened without
//! `O_CLOEXEC`) and writes the number to `/run`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Where the kernel lists its watchdogs (`watchdogN`, each `/dev/watchdogN`).
const CLASS: &str = "/sys/class/watchdog";
/// What softdog calls itself (its `watchdog_info`). Not told by a parent device: drivers such
/// as i6300esb register theirs without one.
const SOFTDOG_IDENTITY: &str = "Software Watchdog";
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

static WATCHDOG: OnceLock<Mutex<File>> = OnceLock::new();

/// A watchdog the kernel lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    /// `watchdogN`: the device is `/dev/watchdogN`.
    name: String,
    /// What its driver calls it (`i6300ESB timer`, `Software Watchdog`).
    identity: String,
    /// Whether it is a hardware one: any but the kernel's own.
    hardware: bool,
}

/// The watchdog to arm among those listed under `class` (`/sys/class/watchdog`): a hardware
/// one if the machine has one the kernel drives, else the kernel's own (softdog), which the
/// image loads beside the hardware driver: a software watchdog resets a node whose machined
/// stops feeding it, but only a hardware one resets a kernel that stops taking interrupts
/// on every CPU (halted, or hung late in reboot(2)).
fn pick(class: &Path) -> Option<Listed> {
    let mut listed: Vec<Listed> = std::fs::read_dir(class)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with("watchdog") {
                return None;
            }
            let identity = std::fs::read_to_string(e.path().join("identity"))
                .map(|i| i.trim().to_string())
                .unwrap_or_else(|_| "unnamed".into());
            Some(Listed {
                hardware: identity != SOFTDOG_IDENTITY,
                identity,
                name,
            })
        })
        .collect();
    // Hardware first, then by name: the same choice on every boot.
    listed.sort_by(|a, b| b.hardware.cmp(&a.hardware).then(a.name.cmp(&b.name)));
    listed.into_iter().next()
}

/// Opens and arms the watchdog ([`pick`]). Returns `Ok(false)` when the machine has none.
///
/// Nothing to wait for: a driver built in probed before `/init`, and a loaded one's load
/// returned with its device registered (a device driver keeps the kernel's synchronous probe,
/// `imager::kernel::ModuleIndex::params`; softdog registers in its init), and devtmpfs makes
/// the node as the device is added.
pub fn arm() -> Result<bool, String> {
    let Some(wd) = pick(Path::new(CLASS)) else {
        return Ok(false);
    };
    let device = format!("/dev/{}", wd.name);
    // Without O_CLOEXEC: the descriptor must survive the exec into machined.
    let fd = nix::fcntl::open(
        device.as_str(),
        nix::fcntl::OFlag::O_WRONLY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening {device}: {e}"))?;
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
    let identity = &wd.identity;
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
    if !wd.hardware {
        tracing::warn!(
            "no hardware watchdog the kernel drives: the kernel's own ({identity}) resets a \
             node whose machined hangs, not one whose kernel stops taking interrupts"
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
    let is_wd = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|p| p.to_str().is_some_and(|p| p.starts_with("/dev/watchdog")));
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
    fn a_hardware_watchdog_is_armed_before_the_kernels_own() {
        let class = tempfile::tempdir().expect("dir");
        let add = |name: &str, identity: &str| {
            let d = class.path().join(name);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join("identity"), format!("{identity}\n")).expect("identity");
        };
        assert_eq!(pick(class.path()), None, "no watchdog at all");
        // softdog registered first: it is watchdog0, which /dev/watchdog would open.
        add("watchdog0", "Software Watchdog");
        assert_eq!(
            pick(class.path()).map(|w| (w.name, w.hardware)),
            Some(("watchdog0".to_string(), false))
        );
        add("watchdog1", "i6300ESB timer");
        let w = pick(class.path()).expect("a watchdog");
        assert_eq!(
            (w.name.as_str(), w.identity.as_str(), w.hardware),
            ("watchdog1", "i6300ESB timer", true)
        );
    }

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
