//! PID 1 under a flood, on loopback: 1000 TCP connections that never finish a TLS handshake,
//! 200 authenticated connections that each open the most streams allowed and send gRPC frames
//! claiming 4 MiB (and some just under the limit) without finishing them, and 100 Dmesg
//! followers that connect and vanish. Meanwhile a legitimate client gets Version answered, an
//! upgrade's trial boot commits, machined's RSS stays under a bound, and once the flood is over
//! its thread and descriptor counts come back to where they were.
//!
//! Every attacker comes from its own loopback address (127.0.x.y), as hosts on a LAN would, so
//! what is measured is the server's caps, not the per-address one alone.

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::pki::ClientSpec;
use api::proto::{DmesgRequest, VersionRequest};
use api::Role;
use common::raw_h2::{RawH2, HEADERS};
use common::{sim_bundle, start, SimNode};

/// The bound on machined's resident memory during the flood (it idles at about 20 MiB).
const RSS_BOUND_KIB: u64 = 96 << 10;

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(1 << 16), hard);
    }
}

fn local(a: u8, b: u8) -> IpAddr {
    [127, 0, a, b].into()
}

/// TLS client config for a client of `node`'s CA with `role`.
fn tls_as(node: &SimNode, role: Role) -> Arc<rustls::ClientConfig> {
    let id = node
        .ca
        .issue_client(&ClientSpec::new("flood", role))
        .expect("client cert");
    api::tls::client_config(node.ca.cert_pem(), Some((&id.cert_pem, &id.key_pem))).expect("tls")
}

/// Connects from `ip` and sits there, never sending a ClientHello; reconnects when closed.
async fn sitter(endpoint: String, ip: IpAddr, stop: Arc<AtomicBool>, closed: Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    while !stop.load(Ordering::Relaxed) {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if sock.bind((ip, 0).into()).is_err() {
            return;
        }
        let Ok(addr) = endpoint.parse() else { return };
        if let Ok(mut tcp) = sock.connect(addr).await {
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut b)).await;
            closed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An authenticated connection from `ip` that opens `streams` Version calls, each with a gRPC
/// frame that claims more than it sends; reconnects when the node closes it.
async fn hog(
    endpoint: String,
    ip: IpAddr,
    tls: Arc<rustls::ClientConfig>,
    streams: u32,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut c) = RawH2::connect(&endpoint, tls.clone(), Some(ip)).await {
            let mut ok = true;
            for i in 0..streams {
                let id = 2 * i + 1;
                // Half claim 4 MiB, half just under the 64 KiB limit; each sends 16 KiB of it.
                let claim: u32 = if i % 2 == 0 { 4 << 20 } else { (64 << 10) - 64 };
                let mut frame = vec![0u8];
                frame.extend_from_slice(&claim.to_be_bytes());
                frame.extend(std::iter::repeat_n(0x5a, 16 << 10));
                if c.open_call(id, "/plinth.machine.v1.Machine/Version")
                    .await
                    .is_err()
                    || c.data(id, &frame, false).await.is_err()
                {
                    ok = false;
                    break;
                }
            }
            // A good HTTP/2 citizen otherwise: it reads, and acknowledges PINGs.
            while ok && !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(500), c.read(true)).await {
                    Ok(Ok(f)) if f.kind == HEADERS => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(_)) => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_leaves_the_api_answering_a_trial_committing_and_pid_1_bounded() {
    raise_fd_limit();
    let node = start(vec![], &[]);
    let before = node.version_after(None).await;
    let pid = node.pid().expect("machined runs");
    // Idle, for the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (threads0, fds0, rss0) = (
        proc_status(pid, "Threads:"),
        fds(pid),
        proc_status(pid, "VmRSS:"),
    );
    eprintln!("baseline: {threads0} threads, {fds0} descriptors, RSS {rss0} KiB");

    let flood = Flood::start(&node, pid);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 100 Dmesg followers, ten at a time: each follows, reads a line, and is gone.
    let operator = {
        let id = node
            .ca
            .issue_client(&ClientSpec::new("follower", Role::Operator))
            .expect("cert");
        config::Context {
            cert: Some(id.cert_pem),
            key: Some(id.key_pem),
            ..node.ctx.clone()
        }
    };
    let mut followed = 0;
    for _ in 0..10 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (endpoint, ctx) = (node.endpoint.clone(), operator.clone());
            batch.spawn(async move {
                let mut c = api::client::connect_context(&endpoint, &ctx).await.ok()?;
                let mut s = c
                    .dmesg(DmesgRequest { follow: true })
                    .await
                    .ok()?
                    .into_inner();
                tokio::time::timeout(Duration::from_secs(5), s.message())
                    .await
                    .ok()?
                    .ok()?
            });
        }
        while let Some(r) = batch.join_next().await {
            followed += usize::from(matches!(r, Ok(Some(_))));
        }
    }

    // A legitimate client is answered.
    let asked = Instant::now();
    let v = loop {
        let attempt = async {
            let mut c = api::client::connect_context(&node.endpoint, &node.ctx)
                .await
                .ok()?;
            c.version(VersionRequest {}).await.ok()
        };
        if let Ok(Some(v)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            break v.into_inner();
        }
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "Version was never answered under the flood"
        );
    };
    let version_latency = asked.elapsed();
    assert_eq!(v.boot_id, before.boot_id);

    // The flood ends: the node lets go of everything it held for it (same boot, so nothing
    // was dropped by a restart).
    let first = flood.stop().await;
    let settle = Instant::now();
    let (threads, descriptors) = loop {
        let (t, f) = (proc_status(pid, "Threads:"), fds(pid));
        if (t <= threads0 + 2 && f <= fds0 + 2) || settle.elapsed() > Duration::from_secs(45) {
            break (t, f);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "flood: Version answered after {version_latency:?}; {followed} of 100 Dmesg followers got a line; {first}; after it, within {:?}: {threads} threads (baseline {threads0}), {descriptors} descriptors (baseline {fds0}), RSS {} KiB",
        settle.elapsed(),
        proc_status(pid, "VmRSS:")
    );
    assert_eq!(
        node.version_after(None).await.boot_id,
        before.boot_id,
        "the flood restarted the node"
    );
    assert!(
        threads <= threads0 + 2,
        "threads: {threads}, baseline {threads0}"
    );
    assert!(
        descriptors <= fds0 + 2,
        "descriptors: {descriptors}, baseline {fds0}"
    );
    assert!(followed > 0, "no Dmesg follower got a line");

    // Again, and an upgrade's trial boot commits under it. Like any client of a node under a
    // flood, the operator's tool tries again when its connection is turned away.
    let flood = Flood::start(&node, pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let upgraded = Instant::now();
    let bundle = sim_bundle("2.0-sim", &[]);
    let mut attempts = 0;
    let reply = loop {
        attempts += 1;
        match node.upgrade(&bundle, false).await {
            Ok(r) => break r,
            Err(e) if attempts < 10 && e.message().contains("transport error") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("upgrade (attempt {attempts}): {e:?}"),
        }
    };
    assert_eq!(reply.slot, "B");
    node.running_on("B", &before.boot_id).await;
    let status = node.status().await;
    assert_eq!(
        status.committed, "B",
        "the trial did not commit under the flood"
    );
    let commit_time = upgraded.elapsed();
    let second = flood.stop().await;
    eprintln!(
        "flood: upgrade to a committed trial in {commit_time:?} ({attempts} attempt(s)); {second}"
    );
}

/// The attackers, and the RSS they make machined reach.
struct Flood {
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    attackers: tokio::task::JoinSet<()>,
}

impl Flood {
    fn start(node: &SimNode, pid: u32) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let mut attackers = tokio::task::JoinSet::new();
        // 200 authenticated connections, 20 from each of 10 addresses, 16 streams each.
        let reader = tls_as(node, Role::Reader);
        for i in 0..200u32 {
            attackers.spawn(hog(
                node.endpoint.clone(),
                local(1, 1 + (i / 20) as u8),
                reader.clone(),
                16,
                stop.clone(),
                answered.clone(),
            ));
        }
        // 1000 connections that never handshake, 20 from each of 50 addresses.
        for i in 0..1000u32 {
            attackers.spawn(sitter(
                node.endpoint.clone(),
                local(2, 1 + (i / 20) as u8),
                stop.clone(),
                closed.clone(),
            ));
        }
        // RSS sampled while it lasts.
        let peak = Arc::new(AtomicU64::new(0));
        {
            let (peak, stop) = (peak.clone(), stop.clone());
            attackers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(proc_status(pid, "VmRSS:"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Flood {
            stop,
            closed,
            answered,
            peak,
            attackers,
        }
    }

    /// Stops the attackers; says what they saw, and checks the peak RSS against the bound.
    async fn stop(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.attackers.abort_all();
        while self.attackers.join_next().await.is_some() {}
        let peak = self.peak.load(Ordering::Relaxed);
        assert!(
            peak < RSS_BOUND_KIB,
            "peak RSS {peak} KiB is over {RSS_BOUND_KIB} KiB"
        );
        format!(
            "{} handshake sitters closed by the node, {} answers to hog streams, peak RSS {peak} KiB (bound {RSS_BOUND_KIB})",
            self.closed.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed)
        )
    }
}
