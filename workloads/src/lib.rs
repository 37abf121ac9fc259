//! machined's side of the container runtime.
//!
//! containerd and runc come from a system extension (`plinth image extension --runtime`);
//! machined writes containerd's config, runs it as a supervised service and speaks its gRPC API
//! through the `containerd-client` crate (the protocol containerd's own Go client speaks).
#![warn(missing_docs)]

pub mod containerd;
pub mod containers;
pub mod debug;
pub mod images;
pub mod network;
pub mod oci;

pub use containerd::{Containerd, Error};
