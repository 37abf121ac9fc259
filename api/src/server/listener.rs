//! Accepting connections within the caps, handshaking, and serving HTTP/2 on each, all as tasks
//! the server owns (so shutting it down ends every one of them).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use super::authorize::{admission, Activity, Authorize, StreamCaps};
use super::{Limits, Mode, PeerInfo};

/// Open connections: from each peer address (handshaking or established), and established.
#[derive(Default)]
struct Tracker {
    established: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// A connection's place under the per-peer cap, given back when it closes.
struct Slot {
    tracker: Arc<Mutex<Tracker>>,
    ip: IpAddr,
    established: bool,
}

impl Slot {
    /// Counts the connection as established, unless the cap on those is reached.
    fn establish(&mut self, limits: &Limits) -> bool {
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        if t.established >= limits.max_connections {
            return false;
        }
        t.established += 1;
        self.established = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        if self.established {
            t.established = t.established.saturating_sub(1);
        }
        if let Some(n) = t.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_peer.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Established,
    Peer,
    Silent,
    Evicted,
}

fn admit(tracker: &Arc<Mutex<Tracker>>, ip: IpAddr, limits: &Limits) -> Result<Slot, Over> {
    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
    let n = t.per_peer.entry(ip).or_insert(0);
    if *n >= limits.max_connections_per_peer {
        return Err(Over::Peer);
    }
    *n += 1;
    Ok(Slot {
        tracker: tracker.clone(),
        ip,
        established: false,
    })
}

/// Connections waiting on their peer, oldest first, at most `max`: when full, a newcomer
/// evicts the oldest. There are two: connections whose peer has not sent a byte yet, and
/// TLS handshakes in progress. A peer that opens connections and never speaks can only push
/// out others like it; a client's ClientHello moves it on at once, to compete only with
/// peers that handshake.
struct Pool {
    max: usize,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    next: u64,
    waiting: std::collections::VecDeque<(u64, CancellationToken)>,
}

/// A place in a [`Pool`]; given back when dropped.
struct Place {
    pool: Arc<Pool>,
    id: u64,
    evicted: CancellationToken,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut p = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        p.waiting.retain(|(id, _)| *id != self.id);
    }
}

impl Pool {
    fn new(max: usize) -> Arc<Pool> {
        Arc::new(Pool {
            max: max.max(1),
            state: Mutex::new(PoolState::default()),
        })
    }

    /// A place, evicting the oldest when there is none; says whether one was evicted.
    fn enter(self: &Arc<Self>) -> (Place, bool) {
        let mut p = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = false;
        while p.waiting.len() >= self.max {
            if let Some((_, oldest)) = p.waiting.pop_front() {
                oldest.cancel();
                evicted = true;
            }
        }
        p.next += 1;
        let id = p.next;
        let token = CancellationToken::new();
        p.waiting.push_back((id, token.clone()));
        (
            Place {
                pool: self.clone(),
                id,
                evicted: token,
            },
            evicted,
        )
    }
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
            Over::Established => "the cap on established connections is reached",
            Over::Peer => "the cap on connections from one address is reached",
            Over::Silent => "the oldest connection that had sent nothing made room for a newer one",
            Over::Evicted => "the oldest TLS handshake in progress made room for a newer one",
        };
        tracing::warn!(%remote, "connection closed: {what} ({} since the last report)", self.since);
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
    let silent = Pool::new(limits.max_silent);
    let handshakes = Pool::new(limits.max_handshakes);
    let caps = Arc::new(StreamCaps::new(&limits));
    let drain = CancellationToken::new();
    let mut conns = JoinSet::new();
    let refused = Arc::new(Mutex::new(RefusalLog {
        last: None,
        since: 0,
    }));
    let note = |remote, why| {
        refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(remote, why)
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
                note(remote, why);
                continue;
            }
        };
        let (place, evicted) = silent.enter();
        if evicted {
            note(remote, Over::Silent);
        }
        let conn = Connection {
            acceptor: acceptor.clone(),
            routes: routes.clone(),
            mode,
            limits: limits.clone(),
            caps: caps.clone(),
            drain: drain.clone(),
            refused: refused.clone(),
            handshakes: handshakes.clone(),
        };
        conns.spawn(conn.serve(tcp, remote, slot, place));
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
    refused: Arc<Mutex<RefusalLog>>,
    handshakes: Arc<Pool>,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, remote: SocketAddr, mut slot: Slot, silent: Place) {
        let _ = tcp.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        // Wait for the peer's first bytes among the silent; then handshake among those who do.
        let mut first = [0u8; 1];
        tokio::select! {
            // `peek`, not `readable`: readiness can be reported without a byte to read.
            r = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::info!(%remote, "TLS handshake timed out (nothing sent)");
                    return;
                }
            },
            _ = self.drain.cancelled() => return,
            _ = silent.evicted.cancelled() => return,
        }
        drop(silent);
        let (handshake, evicted) = self.handshakes.enter();
        if evicted {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(remote, Over::Evicted);
        }
        let tls = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.acceptor.accept(tcp)) => match r {
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
            _ = handshake.evicted.cancelled() => return,
        };
        drop(handshake);
        if !slot.establish(&self.limits) {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(remote, Over::Established);
            return;
        }
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
    fn connections_are_capped_per_peer_and_established_and_the_caps_free_up() {
        let limits = Limits {
            max_connections: 2,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let t = Arc::new(Mutex::new(Tracker::default()));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut a1 = admit(&t, a, &limits).expect("a1");
        let mut a2 = admit(&t, a, &limits).expect("a2");
        assert_eq!(admit(&t, a, &limits).err(), Some(Over::Peer));
        let mut b1 = admit(&t, b, &limits).expect("b1");
        assert!(a1.establish(&limits) && a2.establish(&limits));
        assert!(!b1.establish(&limits), "over the established cap");
        drop(a1);
        assert!(b1.establish(&limits));
        assert!(admit(&t, a, &limits).is_ok());
    }

    #[test]
    fn a_full_pool_evicts_its_oldest_not_the_newcomer() {
        let pool = Pool::new(2);
        let (p1, e1) = pool.enter();
        let (p2, e2) = pool.enter();
        assert!(!e1 && !e2);
        let (p3, e3) = pool.enter();
        assert!(e3, "the third made room");
        assert!(p1.evicted.is_cancelled() && !p2.evicted.is_cancelled());
        drop((p1, p2));
        let (_p4, e4) = pool.enter();
        assert!(!e4, "places given back are free again");
        assert!(!p3.evicted.is_cancelled());
    }
}
