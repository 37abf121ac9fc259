//! The tasks of every sequence, grouped by subsystem. A task is a plain async function taking
//! its sequence's context; its name lives in the phase table.

pub mod api;
pub mod fault;
pub mod initramfs;
pub mod network;
pub mod services;
pub mod state;
pub mod system;
pub mod teardown;
pub mod trial;
pub mod upgrade;
