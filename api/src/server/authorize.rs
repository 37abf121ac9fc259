//! The gate every call passes before it reaches an RPC: admission (maintenance RPC set, or the
//! role table), the method's cap on open streams, the request-body limit, and the deadline for
//! receiving a request. Refusals are answered here, so no handler can forget a check.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::Status;

use super::{Admission, Limits, Mode, PeerInfo};
use crate::role::{may_call, MAINTENANCE_RPCS, SERVICE};

/// How long a call other than an upload may take to send its request and get its response
/// started: a peer that trickles a request body must not hold a stream (and its buffer).
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The methods whose request is an upload (a bundle, an image archive): no cap on the body's
/// size and no request deadline (their handlers bound both), and at most
/// [`Limits::max_upgrades`] of them open at once.
const UPLOADS: &[&str] = &["Upgrade", "ImageImport", "EtcdRecover"];

/// A debug session: its request body is the program's stdin for as long as it runs, so it has
/// no cap on the body's size (tonic caps each message) and at most [`Limits::max_debug_sessions`]
/// are open at once. Its response must start within the deadline like any call's.
const DEBUG: &str = "Debug";

/// Caps on open streams per method, shared by every connection of a server.
pub(super) struct StreamCaps {
    upgrade: Arc<Semaphore>,
    debug: Arc<Semaphore>,
    events: Arc<Semaphore>,
    dmesg: Arc<Semaphore>,
    logs: Arc<Semaphore>,
    /// Health (its `Watch` never ends) and reflection (a stream both ways): open to every
    /// caller, so capped like the followers.
    open_services: Arc<Semaphore>,
}

impl StreamCaps {
    pub(super) fn new(l: &Limits) -> Self {
        StreamCaps {
            upgrade: Arc::new(Semaphore::new(l.max_upgrades)),
            debug: Arc::new(Semaphore::new(l.max_debug_sessions)),
            events: Arc::new(Semaphore::new(l.max_event_streams)),
            dmesg: Arc::new(Semaphore::new(l.max_dmesg_streams)),
            logs: Arc::new(Semaphore::new(l.max_log_streams)),
            open_services: Arc::new(Semaphore::new(l.max_open_service_streams)),
        }
    }

    /// The cap for the call at `path` (`method` is its Machine method), if it has one.
    fn of(&self, path: &str, method: &str) -> Option<(&Arc<Semaphore>, &'static str)> {
        if crate::role::is_open_service(path) {
            return Some((&self.open_services, "health or reflection"));
        }
        match method {
            m if UPLOADS.contains(&m) => Some((&self.upgrade, "upload")),
            DEBUG => Some((&self.debug, DEBUG)),
            "Events" => Some((&self.events, "Events")),
            "Dmesg" => Some((&self.dmesg, "Dmesg")),
            "Logs" => Some((&self.logs, "Logs")),
            _ => None,
        }
    }
}

/// What one connection is doing, for its idle timeout.
#[derive(Default)]
pub(super) struct Activity {
    open: AtomicUsize,
    last: Mutex<Option<Instant>>,
}

impl Activity {
    /// How long the connection has had no call open (`None` while one is).
    pub(super) fn idle_for(&self, since: Instant) -> Option<Duration> {
        if self.open.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(since);
        Some(last.elapsed())
    }
}

/// Held for as long as a call is open: its response body carries it to the end.
struct CallGuard {
    activity: Arc<Activity>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl CallGuard {
    fn new(activity: Arc<Activity>, permit: Option<OwnedSemaphorePermit>) -> Self {
        activity.open.fetch_add(1, Ordering::SeqCst);
        CallGuard {
            activity,
            _permit: permit,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.activity.open.fetch_sub(1, Ordering::SeqCst);
        *self.activity.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

/// Why a call may not go on, or `None`.
fn refusal(admission: Option<Admission>, peer: &PeerInfo, path: &str) -> Option<Status> {
    let method = path.strip_prefix(SERVICE).unwrap_or(path);
    match admission {
        Some(Admission::Maintenance) => {
            if MAINTENANCE_RPCS.contains(&method) || crate::role::is_open_service(path) {
                None
            } else {
                Some(Status::permission_denied(format!(
                    "the node is in maintenance mode (no config yet): {method} is not served; only {}",
                    MAINTENANCE_RPCS.join(", ")
                )))
            }
        }
        Some(Admission::Role(role)) if may_call(role, path) => None,
        Some(Admission::Role(role)) => Some(Status::permission_denied(format!(
            "role {role} may not call {method}"
        ))),
        None => Some(match &peer.organization {
            Some(org) => Status::permission_denied(format!(
                "the client certificate's organization {org:?} is not a role (os:admin, os:operator, os:reader)"
            )),
            None => Status::permission_denied(
                "the client certificate carries no role (its Organization must be os:admin, os:operator or os:reader)",
            ),
        }),
    }
}

/// The admission of a connection in `mode` from `peer`.
pub(super) fn admission(mode: Mode, peer: &PeerInfo) -> Option<Admission> {
    match mode {
        Mode::Maintenance => Some(Admission::Maintenance),
        Mode::Normal => peer.role.map(Admission::Role),
    }
}

/// The gate, one per connection.
#[derive(Clone)]
pub(super) struct Authorize {
    pub(super) inner: Routes,
    pub(super) peer: PeerInfo,
    pub(super) admission: Option<Admission>,
    pub(super) caps: Arc<StreamCaps>,
    pub(super) limits: Arc<Limits>,
    pub(super) activity: Arc<Activity>,
}

type Reply = http::Response<tonic::body::Body>;

impl tower::Service<http::Request<hyper::body::Incoming>> for Authorize {
    type Response = Reply;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Reply, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Routes is always ready (it routes; the services behind it are cloned per call).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let path = req.uri().path().to_string();
        let method = path.strip_prefix(SERVICE).unwrap_or(&path).to_string();
        if let Some(status) = refusal(self.admission, &self.peer, &path) {
            tracing::warn!(remote = %self.peer.remote, path, "refused: {}", status.message());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let permit = match self.caps.of(&path, &method) {
            Some((sem, name)) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let status = Status::resource_exhausted(format!(
                        "too many {name} calls are open on this node ({}): try again later",
                        match name {
                            "upload" => self.limits.max_upgrades,
                            DEBUG => self.limits.max_debug_sessions,
                            "Events" => self.limits.max_event_streams,
                            "Dmesg" => self.limits.max_dmesg_streams,
                            "Logs" => self.limits.max_log_streams,
                            _ => self.limits.max_open_service_streams,
                        }
                    ));
                    tracing::warn!(remote = %self.peer.remote, path, "refused: {}", status.message());
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => None,
        };
        let guard = CallGuard::new(self.activity.clone(), permit);
        let upgrade = path.starts_with(SERVICE) && UPLOADS.contains(&method.as_str());
        let debug = path.starts_with(SERVICE) && method == DEBUG;
        let limit = if upgrade || debug {
            usize::MAX
        } else {
            self.limits.max_request
        };
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(self.peer.clone());
        if let Some(a) = self.admission {
            parts.extensions.insert(a);
        }
        let req = http::Request::from_parts(parts, CappedBody::new(body, limit));
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let call = tower::Service::call(&mut inner, req);
            let reply = if upgrade {
                call.await
            } else {
                match tokio::time::timeout(REQUEST_DEADLINE, call).await {
                    Ok(r) => r,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the request was not received and answered within {}s",
                        REQUEST_DEADLINE.as_secs()
                    ))
                    .into_http()),
                }
            };
            let reply = match reply {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = reply.into_parts();
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(Guarded { body, guard }),
            ))
        })
    }
}

/// A request body that fails, with `RESOURCE_EXHAUSTED`, once more than `limit` bytes came.
pub(super) struct CappedBody<B> {
    inner: B,
    limit: usize,
    seen: usize,
}

impl<B> CappedBody<B> {
    fn new(inner: B, limit: usize) -> Self {
        CappedBody {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len());
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(Status::resource_exhausted(
                            format!(
                                "the request is larger than the node accepts ({} KiB)",
                                this.limit >> 10
                            ),
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its call's guard (stream cap, activity) until it ends.
struct Guarded {
    body: tonic::body::Body,
    guard: CallGuard,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let _ = &this.guard;
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Role;

    fn peer(role: Option<Role>) -> PeerInfo {
        PeerInfo {
            remote: ([127, 0, 0, 1], 1).into(),
            role,
            organization: role.map(|r| r.to_string()),
        }
    }

    #[test]
    fn maintenance_admits_only_its_rpcs_and_the_open_services() {
        let p = peer(None);
        let m = Some(Admission::Maintenance);
        assert!(refusal(m, &p, "/plinth.machine.v1.Machine/ApplyConfiguration").is_none());
        assert!(refusal(m, &p, "/plinth.machine.v1.Machine/Version").is_none());
        assert!(refusal(m, &p, "/grpc.health.v1.Health/Check").is_none());
        for refused in ["Reboot", "Upgrade", "Reset", "GetConfiguration", "Logs"] {
            let path = format!("{SERVICE}{refused}");
            let s = refusal(m, &p, &path).expect("refused");
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{refused}");
        }
    }

    #[test]
    fn a_certificate_without_a_role_gets_nothing() {
        let p = peer(None);
        let s = refusal(None, &p, "/plinth.machine.v1.Machine/Version").expect("refused");
        assert!(s.message().contains("no role"), "{}", s.message());
    }
}
