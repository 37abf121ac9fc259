//! machined: Plinth's PID 1, as a library with a thin `main`.
//!
//! One static binary, two roles:
//! - in the initramfs (`/init`, with `/etc/initrd-release` present) it runs the initramfs
//!   sequence, switches to the slot's root and goes on as the node in the same process
//!   ([`initramfs`]);
//! - on the slot's root it is the node ([`node`]): the boot chain ([`boot`]), the API
//!   ([`api`]), and it never exits.
//!
//! With the `sim` feature (tests and development, never the release image) it also runs
//! the simulated machine ([`sim`]).
//!
//! Anything that goes wrong ends in [`fatal`]: say why on the console, wait, reboot. PID 1 must
//! not exit (the kernel would panic) and must not panic.
#![warn(missing_docs)]

pub mod api;
pub mod boot;
pub mod console;
pub mod initramfs;
pub mod limits;
pub mod node;
#[cfg(feature = "sim")]
pub mod sim;

use std::time::Duration;

/// The single fatal path: report, give the operator time to read it, reboot. Never returns.
pub fn fatal(reason: &str) -> ! {
    const DELAY: Duration = Duration::from_secs(10);
    console::line(&format!("machined: fatal: {reason}"));
    console::line(&format!("machined: rebooting in {}s", DELAY.as_secs()));
    std::thread::sleep(DELAY);
    nix::unistd::sync();
    loop {
        let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        console::line(&format!("machined: reboot failed: {e}"));
        std::thread::sleep(Duration::from_secs(60));
    }
}

static STARTED_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Notes when `main` began (the kernel's clock), for the boot's timeline.
pub fn mark_start() {
    STARTED_US.store(
        sequencer::clock::boot_us(),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// When `main` began, in microseconds of the kernel's clock (0 if [`mark_start`] was not called).
pub fn started_us() -> u64 {
    STARTED_US.load(std::sync::atomic::Ordering::Relaxed)
}
