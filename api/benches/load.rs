//! The API under load on loopback, over real mTLS: `Version` latency at a fixed request rate
//! from 50 concurrent clients, and `Events` fan-out to 100 followers with no loss.
//!
//! `cargo bench -p api --bench load [-- RATE SECONDS]` prints the figures.

#[path = "../tests/fake/mod.rs"]
mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::pki::{Ca, ClientSpec};
use api::proto::{EventsRequest, VersionRequest};
use api::{client, tls, Role};
use sequencer::{EventBus, EventKind};

const CLIENTS: usize = 50;
const WATCHERS: usize = 100;
const EVENTS: u64 = 2000;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);

    let ca = Ca::generate("bench").expect("ca");
    let server_id = ca
        .issue_server("node", &["127.0.0.1".into()])
        .expect("server cert");
    let cfg =
        tls::server_config(ca.cert_pem(), &server_id.cert_pem, &server_id.key_pem).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Room for every event of the run: fan-out, not replay, is measured.
    let bus = EventBus::new(EVENTS as usize + 16);
    let node = Arc::new(fake::FakeNode {
        bus: bus.clone(),
        reboots: Default::default(),
    });
    let server = api::server::serve(
        listener,
        cfg,
        node,
        api::server::Mode::Normal,
        Default::default(),
    )
    .expect("serve");
    let endpoint = server.local_addr.to_string();
    let admin = ca
        .issue_client(&ClientSpec::new("bench", Role::Admin))
        .expect("client");
    let connect = || {
        let tls = tls::client_config(ca.cert_pem(), Some((&admin.cert_pem, &admin.key_pem)))
            .expect("tls");
        let endpoint = endpoint.clone();
        async move { client::connect(&endpoint, tls).await.expect("connect") }
    };

    // Version: each client sends at rate/CLIENTS per second for `secs`.
    let per_client = Duration::from_secs_f64(CLIENTS as f64 / rate as f64);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..CLIENTS {
        let mut c = connect().await;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut tick = tokio::time::interval(per_client);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                tick.tick().await;
                let t = Instant::now();
                c.version(VersionRequest {}).await.expect("version");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    let wall = started.elapsed();
    lat.sort();
    println!(
        "Version over mTLS, {CLIENTS} clients, asked {rate}/s for {secs} s: {} calls, {:.0}/s achieved; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    // Events: WATCHERS followers, then EVENTS published; each must see every one, in order.
    let mut watchers = Vec::new();
    let marker = bus.publish(
        EventKind::SequenceStart {
            sequence: "marker".into(),
        },
        None,
    );
    let first = marker.id + 1;
    for _ in 0..WATCHERS {
        let mut c = connect().await;
        let mut s = c
            .events(EventsRequest {
                since_id: Some(marker.id),
                follow: true,
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner();
        watchers.push(tokio::spawn(async move {
            let mut got = 0u64;
            let mut expect = first;
            let mut gaps = 0u64;
            while got < EVENTS {
                match tokio::time::timeout(Duration::from_secs(30), s.message()).await {
                    Ok(Ok(Some(e))) => {
                        if e.id != expect {
                            gaps += 1;
                        }
                        expect = e.id + 1;
                        got += 1;
                    }
                    _ => break,
                }
            }
            (got, gaps, Instant::now())
        }));
    }
    // Let every follower's stream be established before publishing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    for i in 0..EVENTS {
        bus.publish(
            EventKind::SequenceStart {
                sequence: format!("bench-{i}"),
            },
            None,
        );
        if i % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    let mut lost = 0u64;
    let mut gaps = 0u64;
    let mut last = t;
    for w in watchers {
        let (got, g, done) = w.await.expect("watcher");
        lost += EVENTS - got;
        gaps += g;
        last = last.max(done);
    }
    println!(
        "Events fan-out: {EVENTS} events to {WATCHERS} followers over mTLS: {} delivered, {lost} lost, {gaps} out of order, all delivered {:.0} ms after the first publish ({:.0} deliveries/s)",
        EVENTS * WATCHERS as u64 - lost,
        (last - t).as_secs_f64() * 1e3,
        (EVENTS * WATCHERS as u64 - lost) as f64 / (last - t).as_secs_f64()
    );
}
