//! Plinth's lifecycle sequences and the platform they run on.
//!
//! Each sequence is a phase table in its own file ([`initramfs`], [`boot`], [`shutdown`]), readable as a
//! checklist; the tasks live in [`tasks`], grouped by subsystem; every effect on the machine goes
//! through the [`platform::Platform`] trait, so the same sequences can later run against a
//! simulated machine.
#![warn(missing_docs)]

pub mod apply;
pub mod boot;
pub mod etcd;
pub mod extensions;
/// The DHCP client (its own crate, so the fuzzer can take it alone).
pub use dhcp;
pub mod fetch;
pub mod initramfs;
pub mod install;
pub mod logs;
pub mod modules;
pub mod platform;
pub mod power;
pub mod reaper;
pub mod reboot_slot;
pub mod reset;
pub mod runtime;
pub mod services;
pub mod sessions;
pub mod shutdown;
pub mod slots;
pub mod tasks;
pub mod upgrade;
pub mod volume;
pub mod watchdog;

pub use runtime::{ApiLauncher, BootInfo, Runtime};
