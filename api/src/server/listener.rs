//! Accepting connections within the caps, handshaking, and serving HTTP/2 on each, all as tasks
//! the server owns (so shutting it down ends every one of them).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use super::authorize::{admission, Activity, Authorize, StreamCaps};
use super::{Limits, Mode, PeerInfo};

/// Open connections, all together and per peer address.
#[derive(Default)]
struct Tracker {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// A connection's place under the caps, given back when it closes.
struct Slot {
    tracker: Arc<Mutex<Tracker>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_peer.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was turned away before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Total,
    Peer,
    Handshakes,
}

fn admit(tracker: &Arc<Mutex<Tracker>>, ip: IpAddr, limits: &Limits) -> Result<Slot, Over> {
    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
    if t.total >= limits.max_connections {
        return Err(Over::Total);
    }
    let n = t.per_peer.entry(ip).or_insert(0);
    if *n >= limits.max_connections_per_peer {
        return Err(Over::Peer);
    }
    *n += 1;
    t.total += 1;
    Ok(Slot {
        tracker: tracker.clone(),
        ip,
    })
}

/// Says at most once a second that connections are being turned away (a flood must not turn
/// into a flood of log lines).
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, remote: SocketAddr, why: Over) {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let what = match why {
            Over::Total => "the server's connection cap",
            Over::Peer => "the cap on connections from one address",
            Over::Handshakes => "the cap on TLS handshakes in progress",
        };
        tracing::warn!(%remote, "connection closed at once: {what} is reached ({} turned away since the last report)", self.since);
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// The server task: accepts until `stop`, then drains. Every connection task lives in one
/// `JoinSet`, dropped (aborting them) when this future is.
pub(super) async fn run(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    routes: Routes,
    mode: Mode,
    limits: Arc<Limits>,
    stop: CancellationToken,
) {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let caps = Arc::new(StreamCaps::new(&limits));
    let drain = CancellationToken::new();
    let mut conns = JoinSet::new();
    let mut refused = RefusalLog {
        last: None,
        since: 0,
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        while conns.try_join_next().is_some() {}
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match admit(&tracker, remote.ip(), &limits) {
            Ok(s) => s,
            Err(why) => {
                refused.note(remote, why);
                continue;
            }
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            refused.note(remote, Over::Handshakes);
            continue;
        };
        let conn = Connection {
            acceptor: acceptor.clone(),
            routes: routes.clone(),
            mode,
            limits: limits.clone(),
            caps: caps.clone(),
            drain: drain.clone(),
        };
        conns.spawn(async move {
            let _slot = slot;
            conn.serve(tcp, remote, handshake).await;
        });
    }
    // Stopped: no more accepts (the listener closes here), GOAWAY to every connection; the
    // caller's grace period ends the rest by dropping this future.
    drop(listener);
    drain.cancel();
    while conns.join_next().await.is_some() {}
}

/// Waits up to `grace` for the server task to drain, then aborts it (and so every connection).
pub(super) async fn finish(mut task: tokio::task::JoinHandle<()>, grace: Duration) {
    if tokio::time::timeout(grace, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

/// What a connection task needs.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    routes: Routes,
    mode: Mode,
    limits: Arc<Limits>,
    caps: Arc<StreamCaps>,
    drain: CancellationToken,
}

impl Connection {
    async fn serve(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
        handshake: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = tcp.set_nodelay(true);
        let tls = tokio::select! {
            r = tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp)) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%remote, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.drain.cancelled() => return,
        };
        drop(handshake);
        let peer = peer_info(remote, &tls);
        let activity = Arc::new(Activity::default());
        let gate = Authorize {
            inner: self.routes,
            admission: admission(self.mode, &peer),
            peer,
            caps: self.caps,
            limits: self.limits.clone(),
            activity: activity.clone(),
        };
        let l = &self.limits;
        let calls = CallTasks::default();
        let mut h2 = hyper::server::conn::http2::Builder::new(calls.clone());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(l.max_streams)
            // A peer resetting streams as fast as it opens them (CVE-2023-44487) is cut off.
            .max_pending_accept_reset_streams(l.max_streams as usize)
            .max_local_error_reset_streams(Some(64))
            .initial_stream_window_size(l.stream_window)
            .initial_connection_window_size(
                l.stream_window
                    .saturating_add(l.max_streams.saturating_mul(l.max_request as u32)),
            )
            .max_header_list_size(16 << 10)
            .keep_alive_interval(l.keepalive_interval)
            .keep_alive_timeout(l.keepalive_timeout);
        let conn = h2.serve_connection(
            TokioIo::new(tls),
            hyper_util::service::TowerToHyperService::new(gate),
        );
        tokio::pin!(conn);
        let started = Instant::now();
        let mut draining = false;
        let mut idle_check = tokio::time::interval(l.idle_timeout / 4);
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%remote, "connection ended: {e}");
                    }
                    return;
                }
                _ = self.drain.cancelled(), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = idle_check.tick(), if !draining => {
                    if activity.idle_for(started).is_some_and(|d| d >= l.idle_timeout) {
                        tracing::info!(%remote, "closing a connection idle for {}s", l.idle_timeout.as_secs());
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        }
    }
}

/// Where hyper runs a connection's calls: tasks owned by the connection, so that when it ends
/// (closed, drained, or dropped by the server's shutdown) no call of it runs on. Tokio's own
/// executor would leave them detached.
#[derive(Clone, Default)]
struct CallTasks(Arc<Mutex<JoinSet<()>>>);

impl<F> hyper::rt::Executor<F> for CallTasks
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_all_and_per_peer_and_the_caps_free_up() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let t = Arc::new(Mutex::new(Tracker::default()));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = admit(&t, a, &limits).expect("a1");
        let _a2 = admit(&t, a, &limits).expect("a2");
        assert_eq!(admit(&t, a, &limits).err(), Some(Over::Peer));
        let _b1 = admit(&t, b, &limits).expect("b1");
        assert_eq!(admit(&t, b, &limits).err(), Some(Over::Total));
        drop(a1);
        assert!(admit(&t, b, &limits).is_ok());
    }
}
