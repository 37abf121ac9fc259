//! The container runtime, the way an operator uses it: a node with the runtime extension
//! (containerd, its runc shim, runc and libseccomp from Debian's packages) runs containerd as a
//! service, healthy when its own API answers; `plinth image import` streams a busybox image
//! into it (a corrupt archive is refused and changes nothing); the config's containers start
//! once their image is there: a web server on a private network reached from the host through
//! its published port, a container that keeps exiting and is restarted; `plinth patch config`
//! changes the containers without a reboot; `plinth debug` reads the node's PID 1 through
//! /host (a reader may not, every run is an event); an A/B upgrade carries the extension, the image and
//! the containers over to slot B; an orderly shutdown ends an open debug session, stops the
//! containers and containerd.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::proto::ServiceListRequest;
use common::{node_with_workloads, workspace, BOOT_TIMEOUT};
use config::{Container, ContainerMount, ContainerNetwork, HealthCheck, RestartPolicy};
use vm_tests::node::{wait_for_version, PreparedNode};

fn work() -> PathBuf {
    workspace().join("target/vm-tests/workloads-build")
}

fn container(name: &str, command: &[&str]) -> Container {
    Container {
        name: name.into(),
        image: imager::container::BUSYBOX_NAME.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        environment: vec![],
        network: ContainerNetwork::Private,
        ports: vec![],
        mounts: vec![],
        depends_on: vec![],
        restart: RestartPolicy::Always,
        stop_timeout_s: 5,
        health: None,
    }
}

/// The plinth CLI against the node, off the async runtime.
async fn cli(node: &PreparedNode, args: &[&str]) -> (bool, String) {
    let node = node.clone();
    let mut full = vec!["-e".to_string(), node.endpoint()];
    full.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || common::plinth_output(&node, &full))
        .await
        .expect("cli")
}

/// Waits until `ok` holds for the service list, or panics after `secs` with the list.
async fn wait_services(
    node: &PreparedNode,
    secs: u64,
    what: &str,
    ok: impl Fn(&[api::proto::ServiceInfo]) -> bool,
) -> Vec<api::proto::ServiceInfo> {
    common::poll_api(node, secs, what, |mut client| {
        let ok = &ok;
        async move {
            let services = client
                .service_list(ServiceListRequest {})
                .await?
                .into_inner()
                .services;
            Ok(if ok(&services) {
                Ok(services)
            } else {
                Err(format!("{services:?}"))
            })
        }
    })
    .await
}

fn healthy(services: &[api::proto::ServiceInfo], name: &str) -> bool {
    services.iter().any(|s| s.name == name && s.healthy)
}

/// GET / through the host's forwarded port.
async fn get(port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: node\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_from_the_config_with_images_imported_through_the_api() {
    let _ = std::fs::remove_dir_all(work());
    std::fs::create_dir_all(work()).expect("mkdir");
    let runtime = common::runtime_extension(&work());
    let image = common::busybox_image(&work());
    // The next release raises the extension level: its bundle alone would leave the runtime
    // behind; with the runtime built for level 2 it carries it over.
    let next_os = common::image_at_level("workloads-next", "0.2.0-workloads", 2);
    let orphaning = common::bundle_of(&next_os, &[], "orphaning.plinth");
    let runtime2 = common::runtime_extension_at(&work(), 2);
    let next = common::bundle_of(&next_os, &[runtime2], "with-runtime.plinth");

    // A service that needs containerd waits for it to answer.
    let mut after = common::service(
        "after-containerd",
        vec!["/sbin/machined".into(), "pause".into()],
    );
    after.depends_on = vec![config::RUNTIME_SERVICE.into()];
    // A web server on its own network, reached only through its published port; its page
    // is written into a directory of EPHEMERAL mounted into it.
    let mut web = container(
        "web",
        &[
            "/bin/sh",
            "-c",
            "echo served from a container > /www/index.html && exec httpd -f -p 80 -h /www",
        ],
    );
    web.ports = vec!["8080:80".into()];
    web.mounts = vec![ContainerMount {
        source: "/var/lib/web".into(),
        destination: "/www".into(),
        read_only: false,
    }];
    web.health = Some(HealthCheck::Tcp("127.0.0.1:8080".into()));
    // One that exits every few seconds, restarted each time.
    let ticker = container("ticker", &["/bin/sh", "-c", "echo tick; sleep 2; exit 1"]);
    let node = node_with_workloads(
        "workloads",
        vec![runtime],
        vec![after],
        vec![web, ticker],
        vec![8080],
    );
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");

    // containerd answers its API; what depends on it starts after.
    wait_services(&node, 180, "containerd never became healthy", |s| {
        healthy(s, "containerd") && healthy(s, "after-containerd")
    })
    .await;
    // The containers cannot start yet, and say why.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, events) = cli(&node, &["events", "--tail", "400"]).await;
        if events.contains("image plinth.local/busybox:latest is not on this node") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal naming the image: {events}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A corrupt archive is refused by name and imports nothing.
    let corrupt = work().join("corrupt.tar");
    let mut bytes = std::fs::read(&image).expect("read");
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&corrupt, bytes).expect("write");
    let (ok, out) = cli(&node, &["image", "import", corrupt.to_str().expect("path")]).await;
    assert!(!ok, "a corrupt archive must be refused: {out}");
    assert!(
        out.contains("InvalidArgument") && out.contains("corrupt"),
        "{out}"
    );
    let (_, list) = cli(&node, &["image", "list"]).await;
    assert!(list.contains("no images"), "{list}");

    // The good one goes in, and the containers start from it.
    let (ok, out) = cli(&node, &["image", "import", image.to_str().expect("path")]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("imported plinth.local/busybox:latest"),
        "{out}"
    );
    let (_, list) = cli(&node, &["image", "list"]).await;
    assert!(list.contains("plinth.local/busybox:latest"), "{list}");
    wait_services(&node, 180, "web never became healthy", |s| {
        healthy(s, "web")
    })
    .await;

    // The host reaches the web server: host → QEMU's forward → node port 8080 → machined →
    // the container's own loopback.
    let port = node.forwarded(8080).expect("forwarded");
    let page = get(port).await.expect("GET");
    assert!(page.contains("served from a container"), "{page}");

    // The ticker exits (exit code 1) and comes back: its output is in its log twice.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, logs) = cli(&node, &["logs", "ticker"]).await;
        if logs.matches("tick").count() >= 2 {
            break;
        }
        if Instant::now() > deadline {
            let (_, table) = cli(&node, &["containers"]).await;
            let (_, services) = cli(&node, &["services"]).await;
            let (_, containerd) = cli(&node, &["logs", "containerd", "--tail", "40"]).await;
            panic!("the ticker did not run twice: {logs}\n{table}\n{services}\n{containerd}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ticker = wait_services(&node, 10, "ticker", |s| {
        s.iter().any(|x| x.name == "ticker")
    })
    .await;
    let ticker = ticker.iter().find(|x| x.name == "ticker").expect("ticker");
    assert!(ticker.restarts >= 2, "{ticker:?}");
    let (_, table) = cli(&node, &["containers"]).await;
    println!("{table}");
    let web_line = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no web in {table}"));
    assert!(
        web_line.contains("running") && web_line.contains("yes"),
        "{table}"
    );

    // Without a reboot: the ticker goes, another container comes.
    let patch = serde_json::json!({"machine": {"containers": [
        serde_json::to_value(&node.spec.containers[0]).expect("json"),
        serde_json::to_value(container("hello", &["/bin/sh", "-c", "echo hello from the patch; exec sleep 100000"])).expect("json"),
    ]}})
    .to_string();
    let (ok, out) = cli(&node, &["patch", "config", "-p", &patch]).await;
    assert!(ok, "{out}");
    assert!(!out.contains("next boot"), "no reboot is needed: {out}");
    wait_services(&node, 120, "hello never ran, or ticker stayed", |s| {
        s.iter().any(|x| x.name == "hello" && x.state == "running")
            && !s.iter().any(|x| x.name == "ticker")
    })
    .await;
    let (_, table) = cli(&node, &["containers"]).await;
    assert!(
        table.contains("hello") && !table.contains("ticker"),
        "{table}"
    );
    assert!(get(port)
        .await
        .expect("GET")
        .contains("served from a container"));

    // The debug container: the node's PID 1 seen through /host, from an image archive
    // imported on the way; the run is an event with its actor, the image's digest and the
    // command.
    let (ok, out) = cli(
        &node,
        &[
            "debug",
            image.to_str().expect("path"),
            "--",
            "cat",
            "/host/proc/1/comm",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l == "machined"), "{out}");
    let actor = out
        .split("actor id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no actor id in {out}"))
        .to_string();
    let (_, events) = cli(&node, &["events", "--actor", &actor]).await;
    assert!(
        events.contains("debug debug.")
            && events.contains("started: image plinth.local/busybox:latest (sha256:")
            && events.contains(r#"command ["cat", "/host/proc/1/comm"]"#)
            && events.contains("ended: exit status 0"),
        "{events}"
    );
    // The program's exit status is the CLI's.
    let (ok, out) = cli(
        &node,
        &[
            "debug",
            imager::container::BUSYBOX_NAME,
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    // Killed (SIGKILL from a debug container, which sees the node's processes), the web
    // container is restarted and serves again.
    let (_, table) = cli(&node, &["containers"]).await;
    let fields: Vec<String> = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no web in {table}"))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let (pid, restarts) = (
        fields[3].clone(),
        fields[5].parse::<u32>().expect("restarts"),
    );
    let (ok, out) = cli(
        &node,
        &[
            "debug",
            imager::container::BUSYBOX_NAME,
            "--",
            "kill",
            "-9",
            &pid,
        ],
    )
    .await;
    assert!(ok, "{out}");
    wait_services(&node, 120, "web was not restarted after SIGKILL", |s| {
        s.iter()
            .any(|x| x.name == "web" && x.restarts > restarts && x.healthy)
    })
    .await;
    assert!(get(port)
        .await
        .expect("GET after the restart")
        .contains("served from a container"));
    let (_, events) = cli(&node, &["events", "--tail", "400"]).await;
    assert!(events.contains("SIGKILL"), "{events}");

    // A reader may not.
    let reader = node.spec.dir.join("reader-config");
    common::plinth(
        &node,
        &[
            "gen",
            "client",
            "--name",
            "viewer",
            "--role",
            "os:reader",
            "--secrets",
            node.spec.dir.to_str().expect("dir"),
            "--from",
            node.spec.dir.join("plinthconfig").to_str().expect("path"),
            "-o",
            reader.to_str().expect("path"),
            "--force",
        ],
    );
    let refused = std::process::Command::new(common::plinth_cli())
        .args([
            "-e",
            &node.endpoint(),
            "debug",
            imager::container::BUSYBOX_NAME,
        ])
        .args(["--", "cat", "/host/proc/1/comm"])
        .env("PLINTHCONFIG", &reader)
        .output()
        .expect("plinth");
    let text = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "a reader ran a debug container");
    assert!(
        text.contains("PermissionDenied") && text.contains("may not call Debug"),
        "{text}"
    );

    // An upgrade to an OS of another extension level that brings no runtime for it is refused
    // before anything is written: slot B stays as it was.
    let (_, before) = cli(&node, &["status"]).await;
    let (ok, out) = cli(
        &node,
        &[
            "upgrade",
            "--image",
            orphaning.to_str().expect("path"),
            "--wait",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("FailedPrecondition")
            && out.contains("extension level 2")
            && out.contains("runtime 1.0 (level 1)")
            && out.contains("nothing on the disk was changed"),
        "{out}"
    );
    let (_, after) = cli(&node, &["status"]).await;
    let slots = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("A ") || l.starts_with("B "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(slots(&before).len(), 2, "{before}");
    assert_eq!(slots(&before), slots(&after), "{before}\n{after}");

    // An A/B upgrade to it with the runtime for its level: the extension goes into the
    // store for slot B, the image (on EPHEMERAL) and the config carry over, and B's trial
    // commits only once its containers are healthy again.
    let (ok, out) = cli(
        &node,
        &["upgrade", "--image", next.to_str().expect("path"), "--wait"],
    )
    .await;
    assert!(
        ok && out.contains("upgrade committed: slot B runs Plinth 0.2.0-workloads"),
        "{out}"
    );
    let (v, _) = wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("B answers");
    assert_eq!(v.slot, "B");
    wait_services(&node, 180, "web and hello did not come back on B", |s| {
        healthy(s, "web") && s.iter().any(|x| x.name == "hello" && x.state == "running")
    })
    .await;
    assert!(get(port)
        .await
        .expect("GET on B")
        .contains("served from a container"));
    let (_, extensions) = cli(&node, &["get", "extensions"]).await;
    // The runtime built for level 2 runs; the one for level 1 stays for slot A.
    assert!(
        extensions.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 4 && w[0] == "runtime" && w[2] == "2" && w[3] == "active"
        }),
        "{extensions}"
    );

    // A debug session still open when the node goes down is ended first (its container
    // would hold EPHEMERAL): the shutdown has no failure, and the session says why it ended.
    let open = std::process::Command::new(common::plinth_cli())
        .args([
            "-e",
            &node.endpoint(),
            "debug",
            imager::container::BUSYBOX_NAME,
        ])
        .args(["--", "sleep", "100000"])
        .env("PLINTHCONFIG", node.spec.dir.join("plinthconfig"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("plinth debug");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, table) = cli(&node, &["containers"]).await;
        if table
            .lines()
            .any(|l| l.starts_with("debug.") && l.contains("running"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no debug container: {table}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failed = common::shutdown_failures(&node, &mut vm).await;
    assert!(failed.is_empty(), "shutdown phases failed: {failed:?}");
    // B committed: the runtime it brought is the store's own now; A's stays as A ran it.
    let mut store = common::esp_dir(&node, "::/EFI/plinth/extensions");
    store.sort();
    assert!(
        store.contains(&"runtime@1.ext".to_string())
            && store.contains(&"runtime@2.ext".to_string()),
        "{store:?}"
    );
    assert!(common::esp_dir(&node, "::/EFI/plinth/extensions/B").is_empty());
    let ended = tokio::task::spawn_blocking(move || open.wait_with_output())
        .await
        .expect("join")
        .expect("plinth debug ends");
    let text = String::from_utf8_lossy(&ended.stderr);
    assert!(
        !ended.status.success() && text.contains("going down"),
        "{text}"
    );
}
