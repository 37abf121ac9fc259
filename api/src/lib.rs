//! Plinth's API.
//!
//! - [`proto`]: the generated gRPC types (`plinth.machine.v1`).
//! - [`pki`]: the CA and the certificates `plinth gen config` makes.
//! - [`role`]: which role may call which RPC (one table).
//! - [`tls`]: rustls configurations: TLS 1.3 only, client certificates required on the server.
//! - [`server`]: the tonic server: accepts TLS, reads the caller's role from its certificate,
//!   refuses calls the role may not make, and serves a [`server::Node`].
//! - [`client`]: how `plinth` (and the tests) connect, with errors that say what went wrong.
#![warn(missing_docs)]

pub mod client;
pub mod convert;
pub mod gen;
pub mod pki;
pub mod role;
pub mod server;
pub mod tls;

/// Generated gRPC types for `plinth.machine.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("plinth.machine.v1");

    /// The encoded descriptors of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/machine_descriptor.bin"));
}

pub use role::Role;
