//! Timestamps for events.
//!
//! Events carry two clocks: wall-clock milliseconds (for people) and `CLOCK_BOOTTIME`
//! microseconds, which starts when the kernel starts and survives the initramfs → root handoff,
//! so the initramfs's events and machined's events sit on one time axis.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the kernel started (`CLOCK_BOOTTIME`); 0 if the clock cannot be read.
pub fn boot_us() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000)
            .saturating_add(ts.tv_nsec() as u64 / 1_000),
        Err(_) => 0,
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
