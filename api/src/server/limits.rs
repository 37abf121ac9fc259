//! What one API server will hold at once, whoever is calling: PID 1 must not be exhaustible
//! through its own API.
//!
//! The defaults bound the memory a flood can pin. Request bodies are at most
//! [`Limits::max_request`] (64 KiB) except the uploads' (`Upgrade`, `ImageImport`), whose streams are at most
//! [`Limits::max_upgrades`] at a time, and a `Debug` session's stdin (at most
//! [`Limits::max_debug_sessions`] at a time); so the data HTTP/2 buffers for a connection is at most
//! `max_streams × max_request` plus one upload window, and the whole server holds at most
//! `max_connections` of those. `BENCHMARKS.md` has the figures measured under a flood.

use std::time::Duration;

/// The server's caps and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Established (handshake done) connections, all peers together.
    pub max_connections: usize,
    /// Open connections (handshaking or established) from one IP address.
    pub max_connections_per_peer: usize,
    /// Connections whose peer has sent nothing yet; a new one beyond it evicts the oldest.
    pub max_silent: usize,
    /// TLS handshakes in progress at once; a new one beyond it evicts the oldest.
    pub max_handshakes: usize,
    /// A handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_streams: u32,
    /// Request body bytes of any call but the uploads (`Upgrade`, `ImageImport`).
    pub max_request: usize,
    /// One upload message (a bundle or archive chunk).
    pub max_upgrade_message: usize,
    /// HTTP/2 receive window of a stream: how much of an upload may be in flight.
    pub stream_window: u32,
    /// Upload calls (`Upgrade`, `ImageImport`) open at once.
    pub max_upgrades: usize,
    /// `Debug` sessions open at once (each holds a container and its shim on the node).
    pub max_debug_sessions: usize,
    /// `Events` streams open at once.
    pub max_event_streams: usize,
    /// `Dmesg` streams open at once.
    pub max_dmesg_streams: usize,
    /// `Logs` streams open at once.
    pub max_log_streams: usize,
    /// Health and reflection calls open at once (health's `Watch` never ends).
    pub max_open_service_streams: usize,
    /// A PING is sent after this long without a frame from the peer.
    pub keepalive_interval: Duration,
    /// A PING not acknowledged within this closes the connection.
    pub keepalive_timeout: Duration,
    /// A connection with no call open for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_peer: 32,
            max_silent: 512,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            max_streams: 16,
            max_request: 64 << 10,
            max_upgrade_message: 1 << 20,
            // Wide enough that an upload keeps flowing while the node writes the slot (64 KiB
            // windows held the slot write at 48 MiB/s; BENCHMARKS.md).
            stream_window: 4 << 20,
            max_upgrades: 2,
            max_debug_sessions: 4,
            max_event_streams: 64,
            max_dmesg_streams: 16,
            max_log_streams: 32,
            max_open_service_streams: 16,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}
