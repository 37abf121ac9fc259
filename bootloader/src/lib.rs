//! UEFI boot variables for Plinth: the efivarfs store, typed boot-manager accessors, and a
//! lossless codec for `EFI_LOAD_OPTION` and device paths.
//!
//! The layers, bottom up:
//! - [`efivarfs`]: `Name-GUID` files holding attributes + data ([`VarStore`]).
//! - [`device_path`] and [`load_option`]: bytes ↔ [`DevicePath`] / [`LoadOption`], byte-exact
//!   both ways, never panicking on bad input.
//! - [`boot_vars`]: `BootCurrent`, `BootNext`, `BootOrder`, `Boot####`,
//!   `LoaderDevicePartUUID` as typed values on a [`VarStore`].
//!
//! Slot policy (which entry is slot A or B, how `BootOrder` is reconciled) is built on top of
//! this crate, not in it.

#![warn(missing_docs)]

pub mod boot_vars;
pub mod device_path;
pub mod efivarfs;
pub mod load_option;
pub mod secureboot;
pub mod slots;
pub mod uki;

pub use boot_vars::{BootEntries, BootVarError};
pub use device_path::{DevicePath, DevicePathError, DevicePathNode, HardDrive};
pub use efivarfs::{VarName, VarStore, VarStoreError, Variable};
pub use load_option::{EfiString, LoadOption, LoadOptionError};
