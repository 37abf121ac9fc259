//! The API server.
//!
//! What happens to a connection, in order ([`listener`]): it is counted against the global and
//! per-peer connection caps (over either, it is closed at once), its TLS handshake runs in its
//! own task under a cap on handshakes in progress and a deadline, the caller's [`Admission`] is
//! read once from its certificate, and HTTP/2 is served with a cap on concurrent streams,
//! keepalive pings and an idle timeout. Every call then passes [`authorize`]: the admission
//! must allow the method, the method's cap on open streams must have room, and the request body
//! is limited (64 KiB, except `Upgrade`). Only then does it reach the RPC ([`service`]) and the
//! [`Node`] behind it.
//!
//! The server owns every task it starts: [`ServerHandle::shutdown`] stops accepting, asks open
//! connections to finish (GOAWAY), and after the grace period ends every connection still open,
//! whatever its peer does. Maintenance mode relies on it: no connection admitted without a
//! client certificate outlives maintenance.

mod authorize;
pub mod limits;
mod listener;
mod service;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sequencer::{Denied, EventBus};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use limits::Limits;

use crate::proto::{self, StatusResponse, VersionResponse};
use crate::role::Role;

/// How a call was let in: every handler is told, so none can mistake a call admitted in
/// maintenance mode for an authenticated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The node had no config: server-only TLS, nobody authenticated, only the maintenance
    /// RPCs. Such a call may set the node's *first* config and nothing else.
    Maintenance,
    /// A client certificate from the node's CA, with this role.
    Role(Role),
}

/// What the API needs from the node it serves.
#[tonic::async_trait]
pub trait Node: Send + Sync + 'static {
    /// The Version reply.
    fn version(&self) -> VersionResponse;
    /// The node's event bus.
    fn events(&self) -> &EventBus;
    /// The Status reply.
    fn status(&self) -> StatusResponse;
    /// Starts the reboot sequence for `actor` (first taking a slot of the cluster's reboot
    /// semaphore when `max_unavailable` is not 0), or says why not.
    async fn reboot(&self, actor: String, max_unavailable: u32) -> Result<(), Status>;
    /// Starts the shutdown sequence for `actor`, or says why not.
    fn shutdown(&self, actor: String, force: bool) -> Result<(), Denied>;
    /// The supervised services.
    fn services(&self) -> Vec<proto::ServiceInfo>;
    /// The system extensions found at boot.
    fn extensions(&self) -> proto::ExtensionListResponse;
    /// Runs an upgrade from `bundle` to its end (or refusal).
    async fn upgrade(
        &self,
        actor: String,
        options: proto::UpgradeOptions,
        bundle: BundleSource,
    ) -> Result<proto::UpgradeResponse, Status>;
    /// Imports an image archive into the node's containerd.
    async fn image_import(
        &self,
        actor: String,
        options: proto::ImageImportOptions,
        archive: BundleStream,
    ) -> Result<proto::ImageImportResponse, Status>;
    /// The images in the node's containerd.
    async fn images(&self) -> Result<proto::ImageListResponse, Status>;
    /// The node's containers.
    async fn containers(&self) -> Result<proto::ContainerListResponse, Status>;
    /// Starts a debug container; its output (started, output, exit) is the answer. `input` is
    /// the rest of the call: stdin and resizes, ending when the caller closes its side.
    async fn debug(
        &self,
        actor: String,
        options: proto::DebugOptions,
        input: DebugInput,
    ) -> Result<DebugOutput, Status>;
    /// Starts a rollback to the other slot (after a slot of the cluster's reboot semaphore,
    /// when `max_unavailable` is not 0).
    async fn rollback(&self, actor: String, max_unavailable: u32) -> Result<(), Status>;
    /// Starts a new etcd cluster on this control plane (from the uploaded snapshot when
    /// `recover`).
    async fn bootstrap(&self, actor: String, recover: bool) -> Result<(), Status>;
    /// Every etcd member's own status.
    async fn etcd_status(&self) -> Result<proto::EtcdStatusResponse, Status>;
    /// A snapshot of etcd's keyspace, streamed.
    async fn etcd_snapshot(&self, actor: String) -> Result<SnapshotStream, Status>;
    /// Keeps an uploaded snapshot for a recovering bootstrap.
    async fn etcd_recover(
        &self,
        actor: String,
        options: proto::EtcdRecoverOptions,
        snapshot: BundleStream,
    ) -> Result<proto::EtcdRecoverResponse, Status>;
    /// The etcd cluster's members.
    async fn etcd_members(&self) -> Result<proto::EtcdMembersResponse, Status>;
    /// Takes this control plane out of the etcd cluster.
    async fn etcd_leave(&self, actor: String) -> Result<(), Status>;
    /// Removes another node's etcd member.
    async fn etcd_remove_member(&self, actor: String, id: u64) -> Result<(), Status>;
    /// The kernel log.
    fn dmesg(&self, follow: bool) -> Result<LineStream, Status>;
    /// A service's output.
    fn logs(&self, service: &str, tail: u32, follow: bool) -> Result<LineStream, Status>;
    /// Starts a reset, or says why not (unknown labels, another sequence).
    fn reset(&self, actor: String, request: proto::ResetRequest) -> Result<(), Status>;
    /// Applies a node config; `admission` says how the call got in.
    async fn apply_configuration(
        &self,
        actor: String,
        admission: Admission,
        request: proto::ApplyConfigurationRequest,
    ) -> Result<proto::ApplyConfigurationResponse, Status>;
    /// The running config, as YAML.
    fn get_configuration(&self) -> Result<proto::GetConfigurationResponse, Status>;
}

/// Log lines for `Dmesg` and `Logs`.
pub type LineStream = Pin<Box<dyn Stream<Item = Result<proto::LogLine, Status>> + Send>>;

/// An etcd snapshot's chunks.
pub type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<proto::EtcdSnapshotChunk, Status>> + Send>>;

/// A `Debug` call's messages after its options.
pub type DebugInput = Pin<Box<dyn Stream<Item = Result<proto::DebugRequest, Status>> + Send>>;

/// A `Debug` call's answer.
pub type DebugOutput = Pin<Box<dyn Stream<Item = Result<proto::DebugResponse, Status>> + Send>>;

/// The bytes of an upload (an `Upgrade`'s bundle, an `ImageImport`'s archive), as a reader.
pub type BundleStream = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// Where an upgrade's bundle comes from.
pub enum BundleSource {
    /// Streamed in the call.
    Stream(BundleStream),
    /// Pulled by the node from this URL.
    Url(String),
}

/// A lifecycle refusal as the RPC's reply: another sequence in the way is `ABORTED`, a request
/// the state forbids is `FAILED_PRECONDITION`. The message names the running sequence and the
/// request's actor id (its refusal event carries the same id).
pub fn denied_status(denied: &Denied, actor: &str) -> Status {
    let msg = format!("{denied} (actor id {actor})");
    match denied {
        Denied::Busy { .. } => Status::aborted(msg),
        Denied::NotAllowed { .. } => Status::failed_precondition(msg),
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: SocketAddr,
    /// Role from the client certificate's Organization; `None` without one.
    pub role: Option<Role>,
    /// The Organization as written, for error messages.
    pub organization: Option<String>,
}

/// How the server admits callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Client certificates required; roles from them.
    Normal,
    /// No config yet: server-only TLS, and only the maintenance RPCs, to anyone.
    Maintenance,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening address could not be read.
    #[error("reading the listener's address: {0}")]
    Addr(#[source] std::io::Error),
}

/// A running server. [`ServerHandle::shutdown`] stops it in order; dropping the handle ends
/// it at once (every connection with it).
pub struct ServerHandle {
    /// The address the server listens on.
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting, tells open connections to finish (HTTP/2 GOAWAY) and gives calls in
    /// flight `grace`; then ends every connection still open (a client holding one, following
    /// events, or never answering a PING must not hold the node up). Returns once the accept
    /// loop and every connection task are gone.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            listener::finish(task, grace).await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // The task owns the accept loop and a JoinSet of every connection: aborting it
            // drops them all.
            task.abort();
        }
    }
}

/// Serves the Machine API (with gRPC health and reflection) for `node` on `listener` with
/// `tls`, admitting callers as `mode` says, within `limits`.
pub fn serve<N: Node>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    node: Arc<N>,
    mode: Mode,
    limits: Limits,
) -> Result<ServerHandle, ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::Addr)?;
    let stop = CancellationToken::new();
    let routes = service::routes(node, &limits);
    let task = tokio::spawn(listener::run(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        routes,
        mode,
        Arc::new(limits),
        stop.clone(),
    ));
    Ok(ServerHandle {
        local_addr,
        stop,
        task: Some(task),
    })
}
