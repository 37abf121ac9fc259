//! Workloads in the VM (OVMF, TCG): what the runtime costs and how fast a container answers.
//!
//! - Boot, with the runtime extension against the same node without it: QEMU's start → `Version`
//!   answered, and (with it) → `containerd` healthy. Each node boots twice on one disk and
//!   variable store; the second boot (an installed node's) is the figure. Which node boots
//!   first alternates between runs.
//! - API call → container answering: `plinth patch config` adding a web container on a private
//!   network (the image imported), until its page comes back through its published port and
//!   QEMU's forward; then the same with the container removed first, `RUNS` times.
//! - A debug session (`plinth debug IMAGE -- cat /host/proc/1/comm`) end to end, beside the same
//!   CLI's `version` call.
//! - machined's resident memory (`Status`) with no container, then with 20.
//!
//! `PLINTH_IMAGE_DIR=$PWD/out cargo bench -p vm-tests --bench workloads [-- RUNS]` (3 by
//! default; the image in `out/` and the static machined must be built).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use api::proto::{ServiceListRequest, StatusRequest};
use vm_tests::node::{prepare, wait_for_version, NodeSpec, PreparedNode};
use vm_tests::qemu::Vm;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn node(name: &str, extensions: Vec<std::path::PathBuf>) -> PreparedNode {
    let dir = common::workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let spec = NodeSpec {
        name: name.into(),
        dir,
        image_dir: Default::default(),
        memory_mb: 1024,
        services: Vec::new(),
        trusted_keys: vec![upgrade::bundle::public_hex(
            &common::signing_key().verifying_key(),
        )],
        extensions,
        containers: Vec::new(),
        forwards: vec![8080],
        preset: None,
        lan: None,
    };
    prepare(&spec, &common::artifacts()).expect("node")
}

async fn client(
    node: &PreparedNode,
) -> api::proto::machine_client::MachineClient<tonic::transport::Channel> {
    let ctx = node.context().expect("context").clone();
    api::client::connect_context(&node.endpoint(), &ctx)
        .await
        .expect("connect")
}

/// Waits until the service list satisfies `ok`.
async fn until_services(node: &PreparedNode, ok: impl Fn(&[api::proto::ServiceInfo]) -> bool) {
    let mut c = client(node).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = c.service_list(ServiceListRequest {}).await {
            if ok(&r.into_inner().services) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "services never got there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn healthy(s: &[api::proto::ServiceInfo], name: &str) -> bool {
    s.iter().any(|x| x.name == name && x.healthy)
}

/// Boots `node` twice; returns (QEMU start → Version, QEMU start → containerd healthy) of the
/// second boot, and the running VM.
async fn boot_twice(node: &PreparedNode, runtime: bool) -> (Duration, Option<Duration>, Vm) {
    let ctx = node.context().expect("context").clone();
    let mut last = None;
    for boot in 0..2 {
        let mut vm = Vm::launch(node.vm_spec()).expect("launch");
        let start = Instant::now();
        wait_for_version(&mut vm, &node.endpoint(), &ctx, common::BOOT_TIMEOUT)
            .await
            .expect("boot");
        let answered = start.elapsed();
        let containerd = if runtime {
            until_services(node, |s| healthy(s, "containerd")).await;
            Some(start.elapsed())
        } else {
            None
        };
        if boot == 0 {
            let _ = common::shutdown_failures(node, &mut vm).await;
        } else {
            last = Some((answered, containerd, vm));
        }
    }
    last.expect("two boots")
}

async fn cli(node: &PreparedNode, args: &[&str]) -> String {
    let node = node.clone();
    let mut full = vec!["-e".to_string(), node.endpoint()];
    full.extend(args.iter().map(|a| a.to_string()));
    let (ok, out) = tokio::task::spawn_blocking(move || common::plinth_output(&node, &full))
        .await
        .expect("cli");
    assert!(ok, "{out}");
    out
}

/// GET / through the forward, until it answers.
async fn until_page(port: u16, deadline: Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            std::io::Result::Ok(out)
        };
        if let Ok(Ok(page)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            if page.contains("200 OK") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the page never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn containers_patch(containers: serde_json::Value) -> String {
    serde_json::json!({"machine": {"containers": containers}}).to_string()
}

fn web() -> serde_json::Value {
    serde_json::json!({
        "name": "web",
        "image": imager::container::BUSYBOX_NAME,
        "command": ["/bin/sh", "-c", "echo hello > /tmp/index.html && exec httpd -f -p 80 -h /tmp"],
        "ports": ["8080:80"],
    })
}

async fn rss(node: &PreparedNode) -> u64 {
    client(node)
        .await
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .machined_rss_kib
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let work = common::workspace().join("target/vm-tests/bench-workloads-build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("mkdir");
    let runtime_ext = common::runtime_extension(&work);
    let image = common::busybox_image(&work);
    println!(
        "runtime extension: {} bytes; busybox image: {} bytes",
        std::fs::metadata(&runtime_ext)
            .map(|m| m.len())
            .unwrap_or(0),
        std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0)
    );

    // Boot with the runtime against without it.
    let plain = node("bench-plain", Vec::new());
    let with = node("bench-runtime", vec![runtime_ext.clone()]);
    let (mut plain_times, mut with_times, mut containerd_times) =
        (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let order: [bool; 2] = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for runtime in order {
            let n = if runtime { &with } else { &plain };
            let (answered, containerd, mut vm) = boot_twice(n, runtime).await;
            let _ = common::shutdown_failures(n, &mut vm).await;
            if runtime {
                with_times.push(answered);
                containerd_times.push(containerd.expect("containerd"));
            } else {
                plain_times.push(answered);
            }
            println!(
                "run {}: {} Version answered {}{}",
                run + 1,
                if runtime {
                    "with the runtime:   "
                } else {
                    "without the runtime:"
                },
                ms(answered),
                containerd
                    .map(|c| format!(", containerd healthy {}", ms(c)))
                    .unwrap_or_default()
            );
        }
    }
    let (p, w, c) = (
        median(plain_times),
        median(with_times),
        median(containerd_times),
    );
    println!(
        "boot (QEMU start, second boot, medians of {runs}): without {} | with {} (cost {}) | containerd healthy {}",
        ms(p),
        ms(w),
        ms(w.saturating_sub(p)),
        ms(c)
    );

    // API call → container answering, and machined's memory.
    let (_, _, mut vm) = boot_twice(&with, true).await;
    let port = with.forwarded(8080).expect("forward");
    let started = Instant::now();
    cli(&with, &["image", "import", image.to_str().expect("path")]).await;
    println!("image import (2 MB archive): {}", ms(started.elapsed()));
    // A debug session end to end (CLI start, TLS, container made, run, removed) beside the
    // floor: the same CLI's Version call.
    let (mut floor, mut debug) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        cli(&with, &["version"]).await;
        floor.push(t.elapsed());
        let t = Instant::now();
        let out = cli(
            &with,
            &[
                "debug",
                imager::container::BUSYBOX_NAME,
                "--",
                "cat",
                "/host/proc/1/comm",
            ],
        )
        .await;
        debug.push(t.elapsed());
        assert!(out.contains("machined"), "{out}");
    }
    println!(
        "plinth debug -- cat /host/proc/1/comm (median of {runs}): {}; plinth version (the floor): {}",
        ms(median(debug)),
        ms(median(floor))
    );
    let rss_idle = rss(&with).await;
    let mut answers = Vec::new();
    for run in 0..runs {
        if run > 0 {
            cli(
                &with,
                &[
                    "patch",
                    "config",
                    "-p",
                    &containers_patch(serde_json::json!([])),
                ],
            )
            .await;
            until_services(&with, |s| !s.iter().any(|x| x.name == "web")).await;
        }
        let t = Instant::now();
        cli(
            &with,
            &[
                "patch",
                "config",
                "-p",
                &containers_patch(serde_json::json!([web()])),
            ],
        )
        .await;
        until_page(port, t + Duration::from_secs(120)).await;
        let took = t.elapsed();
        println!(
            "run {}: patch config → page through the published port: {}",
            run + 1,
            ms(took)
        );
        answers.push(took);
    }
    println!(
        "API call → container answering (median of {runs}): {}",
        ms(median(answers))
    );
    let twenty: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "name": format!("sleeper-{i}"),
                "image": imager::container::BUSYBOX_NAME,
                "command": ["/bin/sleep", "100000"],
            })
        })
        .collect();
    let t = Instant::now();
    cli(
        &with,
        &[
            "patch",
            "config",
            "-p",
            &containers_patch(serde_json::Value::Array(twenty)),
        ],
    )
    .await;
    until_services(&with, |s| {
        s.iter()
            .filter(|x| x.name.starts_with("sleeper-") && x.state == "running")
            .count()
            == 20
    })
    .await;
    println!("20 containers running: {} after the call", ms(t.elapsed()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_20 = rss(&with).await;
    println!(
        "machined RSS: {rss_idle} KiB with containerd and no container, {rss_20} KiB with 20 containers"
    );
    let _ = common::shutdown_failures(&with, &mut vm).await;
}
