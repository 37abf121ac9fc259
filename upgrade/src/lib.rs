//! A/B slots and the system disk's layout.
//!
//! A slot is the pair (UKI on the ESP, SquashFS in `ROOT-x`). This crate knows the partition
//! table every Plinth system disk has ([`layout::LAYOUT`]), creates it, and finds partitions on
//! an existing disk by label or by unique GUID (the way the initramfs finds the disk it booted
//! from: the ESP whose GUID the firmware stub reported). [`meta`] is the slot record kept twice
//! on META; [`bundle`] is the signed upgrade bundle, [`extension`] a signed system extension.
#![warn(missing_docs)]

pub mod bundle;
pub mod extension;
pub mod layout;
pub mod meta;
pub mod policy;
pub mod slot;
pub mod twocopy;
pub mod verity;

pub use layout::{DiskPartition, LayoutError, PartitionSpec, Size, LAYOUT};
pub use slot::Slot;
