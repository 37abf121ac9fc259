//! The API server.
//!
//! TCP connections are accepted here, each TLS handshake runs in its own task (a slow or hostile
//! client cannot hold up others), and the caller's role is read once per connection from its
//! certificate. A tower layer in front of every RPC checks the role against [`crate::role`]
//! before the call reaches the service, so no handler can forget to.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use sequencer::{Controller, Denied, EventBus, Replay, SubscribeError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::convert::to_proto;
use crate::proto::machine_server::{Machine, MachineServer};
use crate::proto::{
    self, EventsRequest, LifecycleResponse, RebootRequest, ShutdownRequest, StatusRequest,
    StatusResponse, VersionRequest, VersionResponse,
};
use crate::role::{may_call, Role, SERVICE};

/// HTTP/2 receive window per stream (the connection gets twice this): see `serve`.
const UPLOAD_WINDOW: u32 = 4 << 20;

/// What the API needs from the node it serves.
#[tonic::async_trait]
pub trait Node: Send + Sync + 'static {
    /// The Version reply.
    fn version(&self) -> VersionResponse;
    /// The node's event bus.
    fn events(&self) -> &EventBus;
    /// The Status reply.
    fn status(&self) -> StatusResponse;
    /// Starts the reboot sequence for `actor`, or says why not.
    fn reboot(&self, actor: String) -> Result<(), Denied>;
    /// Starts the shutdown sequence for `actor`, or says why not.
    fn shutdown(&self, actor: String, force: bool) -> Result<(), Denied>;
    /// The supervised services.
    fn services(&self) -> Vec<proto::ServiceInfo>;
    /// Runs an upgrade from `bundle` to its end (or refusal).
    async fn upgrade(
        &self,
        actor: String,
        stage: bool,
        bundle: BundleSource,
    ) -> Result<proto::UpgradeResponse, Status>;
    /// Starts a rollback to the other slot.
    fn rollback(&self, actor: String) -> Result<(), Status>;
    /// The kernel log.
    fn dmesg(&self, follow: bool) -> Result<LineStream, Status>;
    /// A service's output.
    fn logs(&self, service: &str, tail: u32, follow: bool) -> Result<LineStream, Status>;
    /// Starts a reset, or says why not (unknown labels, another sequence).
    fn reset(&self, actor: String, request: proto::ResetRequest) -> Result<(), Status>;
    /// Applies a node config.
    async fn apply_configuration(
        &self,
        actor: String,
        request: proto::ApplyConfigurationRequest,
    ) -> Result<proto::ApplyConfigurationResponse, Status>;
}

/// Log lines for `Dmesg` and `Logs`.
pub type LineStream = Pin<Box<dyn Stream<Item = Result<proto::LogLine, Status>> + Send>>;

/// The bundle bytes of an `Upgrade` call, as a reader.
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

/// A TLS connection that tells tonic who its peer is.
struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn peer_info(remote: SocketAddr, stream: &tokio_rustls::server::TlsStream<TcpStream>) -> PeerInfo {
    let organization = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| crate::pki::organization(c));
    PeerInfo {
        remote,
        role: organization.as_deref().and_then(|o| o.parse().ok()),
        organization,
    }
}

/// The RPC implementation, generic over the node it serves.
struct MachineService<N> {
    node: Arc<N>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl<N: Node> Machine for MachineService<N> {
    async fn version(
        &self,
        _: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(self.node.version()))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn reboot(
        &self,
        _: Request<RebootRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node
            .reboot(actor.clone())
            .map_err(|d| denied_status(&d, &actor))?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn shutdown(
        &self,
        r: Request<ShutdownRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node
            .shutdown(actor.clone(), r.into_inner().force)
            .map_err(|d| denied_status(&d, &actor))?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn service_list(
        &self,
        _: Request<proto::ServiceListRequest>,
    ) -> Result<Response<proto::ServiceListResponse>, Status> {
        Ok(Response::new(proto::ServiceListResponse {
            services: self.node.services(),
        }))
    }

    async fn upgrade(
        &self,
        request: Request<tonic::Streaming<proto::UpgradeRequest>>,
    ) -> Result<Response<proto::UpgradeResponse>, Status> {
        use futures::StreamExt;
        let mut stream = request.into_inner();
        let options = match stream.message().await? {
            Some(proto::UpgradeRequest {
                msg: Some(proto::upgrade_request::Msg::Options(o)),
            }) => o,
            _ => {
                return Err(Status::invalid_argument(
                    "the first Upgrade message must carry the options",
                ))
            }
        };
        let bytes = stream.map(|m| match m {
            Ok(proto::UpgradeRequest {
                msg: Some(proto::upgrade_request::Msg::Chunk(c)),
            }) => Ok(bytes::Bytes::from(c)),
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "options after the first Upgrade message",
            )),
            Err(status) => Err(std::io::Error::other(format!(
                "upload failed: {}",
                status.message()
            ))),
        });
        let source = if options.url.is_empty() {
            BundleSource::Stream(Box::new(tokio_util::io::StreamReader::new(bytes)))
        } else {
            BundleSource::Url(options.url)
        };
        let actor = Controller::new_actor();
        let reply = self.node.upgrade(actor, options.stage, source).await?;
        Ok(Response::new(reply))
    }

    async fn rollback(
        &self,
        _: Request<proto::RollbackRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node.rollback(actor.clone())?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    type DmesgStream = LineStream;

    async fn dmesg(&self, r: Request<proto::DmesgRequest>) -> Result<Response<LineStream>, Status> {
        Ok(Response::new(self.node.dmesg(r.into_inner().follow)?))
    }

    type LogsStream = LineStream;

    async fn logs(&self, r: Request<proto::LogsRequest>) -> Result<Response<LineStream>, Status> {
        let r = r.into_inner();
        Ok(Response::new(self.node.logs(&r.service, r.tail, r.follow)?))
    }

    async fn reset(
        &self,
        r: Request<proto::ResetRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node.reset(actor.clone(), r.into_inner())?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn apply_configuration(
        &self,
        r: Request<proto::ApplyConfigurationRequest>,
    ) -> Result<Response<proto::ApplyConfigurationResponse>, Status> {
        let actor = Controller::new_actor();
        Ok(Response::new(
            self.node.apply_configuration(actor, r.into_inner()).await?,
        ))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let replay = match (r.since_id, r.tail) {
            (Some(id), _) => Replay::SinceId(id),
            (None, 0) => Replay::None,
            (None, n) => Replay::Tail(n as usize),
        };
        let actor = (!r.actor_id.is_empty()).then_some(r.actor_id);
        let mut sub = self
            .node
            .events()
            .subscribe(replay, actor)
            .map_err(|e| Status::out_of_range(e.to_string()))?;
        if !r.follow {
            let backlog: Vec<_> = sub
                .drain_backlog()
                .iter()
                .map(|e| Ok(to_proto(e)))
                .collect();
            return Ok(Response::new(Box::pin(futures::stream::iter(backlog))));
        }
        let stream = futures::stream::unfold(Some(sub), |state| async move {
            let mut sub = state?;
            match sub.next().await {
                Ok(e) => Some((Ok(to_proto(&e)), Some(sub))),
                // Say so and end the stream: a watcher must never silently miss events.
                Err(e @ SubscribeError::Lagged { .. }) => {
                    Some((Err(Status::data_loss(e.to_string())), None))
                }
                Err(e) => Some((Err(Status::unavailable(e.to_string())), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// How the server admits callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Client certificates required; roles from them.
    Normal,
    /// No config yet: server-only TLS, and only the maintenance RPCs, to anyone.
    Maintenance,
}

/// Checks every call's role before it reaches the service.
#[derive(Clone)]
struct Authorize<S> {
    inner: S,
    mode: Mode,
}

#[derive(Clone)]
struct AuthorizeLayer(Mode);

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            mode: self.0,
        }
    }
}

/// Why a call is refused, or `None` when it may proceed.
fn refusal(peer: Option<&PeerInfo>, path: &str) -> Option<Status> {
    let method = path.strip_prefix(SERVICE).unwrap_or(path);
    match peer.map(|p| (p.role, p.organization.as_deref())) {
        Some((Some(role), _)) if may_call(role, path) => None,
        Some((Some(role), _)) => Some(Status::permission_denied(format!("role {role} may not call {method}"))),
        Some((None, Some(org))) => Some(Status::permission_denied(format!(
            "the client certificate's organization {org:?} is not a role (os:admin, os:operator, os:reader)"
        ))),
        _ => Some(Status::permission_denied(
            "the client certificate carries no role (its Organization must be os:admin, os:operator or os:reader)",
        )),
    }
}

/// In maintenance mode only the maintenance RPCs are served.
fn maintenance_refusal(path: &str) -> Option<Status> {
    let method = path.strip_prefix(SERVICE).unwrap_or(path);
    if crate::role::MAINTENANCE_RPCS.contains(&method) {
        None
    } else {
        Some(Status::permission_denied(format!(
            "the node is in maintenance mode (no config yet): {method} is not served; only {}",
            crate::role::MAINTENANCE_RPCS.join(", ")
        )))
    }
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verdict = match self.mode {
            Mode::Normal => refusal(req.extensions().get::<PeerInfo>(), req.uri().path()),
            Mode::Maintenance => maintenance_refusal(req.uri().path()),
        };
        if let Some(status) = verdict {
            tracing::warn!(path = req.uri().path(), "refused: {}", status.message());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // Take the service that was polled ready, leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(req).await })
    }
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening address could not be read.
    #[error("reading the listener's address: {0}")]
    Addr(#[source] std::io::Error),
}

/// A running server; dropping it does not stop it, [`ServerHandle::shutdown`] does.
pub struct ServerHandle {
    /// The address the server listens on.
    pub local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting and gives calls in flight `grace` to finish; then drops the rest
    /// (a client holding a connection open, or following events, must not hold the node up).
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

/// Serves the Machine API for `node` on `listener` with `tls`.
pub fn serve<N: Node>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    node: Arc<N>,
    mode: Mode,
) -> Result<ServerHandle, ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::Addr)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (conns_tx, conns_rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    let accept_loop = async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if conns_tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let conns_tx = conns_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer = peer_info(remote, &stream);
                        let _ = conns_tx.send(Ok(TlsConn { stream, peer })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, "TLS handshake refused: {e}"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let service = MachineServer::new(MachineService { node });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conns_rx);
    let task = tokio::spawn(async move {
        let accept = tokio::spawn(accept_loop);
        let result = tonic::transport::Server::builder()
            // HTTP/2's default 64 KiB windows let a client send one chunk per round trip, and
            // a bundle upload stalls whenever the node writes to disk. Wider windows keep the
            // upload flowing while the slot is written; memory is bounded by them per stream.
            .initial_stream_window_size(Some(UPLOAD_WINDOW))
            .initial_connection_window_size(Some(2 * UPLOAD_WINDOW))
            .layer(AuthorizeLayer(mode))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        accept.abort();
        if let Err(e) = result {
            tracing::error!("API server stopped: {e}");
        }
    });
    Ok(ServerHandle {
        local_addr,
        stop: Some(stop_tx),
        task,
    })
}
