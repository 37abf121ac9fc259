//! Services: started after their dependencies are healthy, restarted by policy, stopped in
//! reverse dependency order, and killed at their deadline when they ignore SIGTERM.

mod common;

use std::time::Duration;

use api::proto::{ServiceListRequest, ShutdownRequest};
use common::{node_with_services, BOOT_TIMEOUT};
use config::{HealthCheck, RestartPolicy, Service};
use sequencer::{trace, EventKind};
use vm_tests::node::wait_for_version;

fn service(name: &str, args: &[&str]) -> Service {
    let mut command = vec!["/sbin/machined".to_string()];
    command.extend(args.iter().map(|a| a.to_string()));
    common::service(name, command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_start_in_dependency_order_restart_on_failure_and_a_service_ignoring_sigterm_is_killed_at_its_deadline(
) {
    // stubborn ignores SIGTERM; web needs stubborn and is healthy when its port answers; flaky
    // exits at once with an error and is restarted with backoff.
    let stubborn = service("stubborn", &["pause", "--ignore-sigterm"]);
    let mut web = service("web", &["pause", "--listen", "127.0.0.1:8080"]);
    web.depends_on = vec!["stubborn".into()];
    web.health = Some(HealthCheck::Tcp("127.0.0.1:8080".into()));
    let mut flaky = service("flaky", &["pause", "--no-such-flag"]);
    flaky.restart = RestartPolicy::OnFailure;
    let ticker = service("ticker", &["pause", "--tick", "--list-fds"]);
    let node = node_with_services("services", vec![stubborn, web, flaky, ticker]);
    let ctx = node.context().expect("context").clone();
    let mut vm = node.boot().expect("launch");
    wait_for_version(&mut vm, &node.endpoint(), &ctx, BOOT_TIMEOUT)
        .await
        .expect("boot");

    // ServiceList shows web healthy, stubborn running, flaky restarted after failing.
    let list = common::poll_api(
        &node,
        60,
        "services never settled",
        |mut client| async move {
            let list = client
                .service_list(ServiceListRequest {})
                .await?
                .into_inner()
                .services;
            let get = |n: &str| list.iter().find(|s| s.name == n).cloned();
            let ready = get("web").is_some_and(|s| s.healthy)
                && get("stubborn").is_some_and(|s| s.state == "running")
                && get("flaky").is_some_and(|s| s.restarts >= 1);
            Ok(if ready {
                Ok(list)
            } else {
                Err(format!("{list:?}"))
            })
        },
    )
    .await;
    let flaky = list.iter().find(|s| s.name == "flaky").expect("flaky");
    assert!(flaky.last_exit.contains("exit code 2"), "{flaky:?}");

    // `plinth logs -f` follows a service's output as it grows.
    let mut follow = std::process::Command::new(common::plinth_cli())
        .args([
            "-e",
            &node.endpoint(),
            "logs",
            "ticker",
            "-f",
            "--tail",
            "0",
        ])
        .env("PLINTHCONFIG", node.spec.dir.join("plinthconfig"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("plinth logs");
    let stdout = follow.stdout.take().expect("stdout");
    let ticks = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut fds = None;
        let mut ticks = Vec::new();
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(list) = l.strip_prefix("fds: ") {
                fds.get_or_insert(list.to_string());
            } else if let Some(n) = l.strip_prefix("tick ").and_then(|n| n.parse::<u64>().ok()) {
                ticks.push(n);
                if ticks.len() == 4 {
                    break;
                }
            }
        }
        (fds, ticks)
    });
    let (fds, ticks) = tokio::time::timeout(Duration::from_secs(30), ticks)
        .await
        .expect("lines in time")
        .expect("reader");
    // The watchdog crossed machined's own exec, and no further: a service does not hold it.
    let fds = fds.expect("the ticker listed its descriptors");
    assert!(
        !fds.contains("watchdog"),
        "a service inherited the watchdog: {fds}"
    );
    assert!(fds.starts_with("0=/dev/null 1="), "{fds}");
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(ticks.len(), 4);
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");

    // Shut down: QEMU exits on its own.
    api::client::connect_context(&node.endpoint(), &ctx)
        .await
        .expect("connect")
        .shutdown(ShutdownRequest { force: false })
        .await
        .expect("shutdown");
    vm.wait_exit(Duration::from_secs(120)).expect("QEMU exits");

    // From the console trace: web stopped before stubborn was asked to; stubborn ignored
    // SIGTERM and was killed at its 3 s deadline.
    let events: Vec<_> = vm
        .serial
        .lines()
        .iter()
        .filter_map(|l| trace::parse_line(&l.text))
        .collect();
    let service_event = |name: &str, needle: &str| {
        events.iter().find_map(|e| match &e.kind {
            EventKind::Service {
                service,
                message,
                state,
            } if service == name && (message.contains(needle) || state == needle) => {
                Some(e.clone())
            }
            _ => None,
        })
    };
    // Started in dependency order, as the trace shows it (not as the supervisor sorts it).
    let stubborn_up = service_event("stubborn", "running").expect("stubborn ran");
    let web_up = service_event("web", "running").expect("web ran");
    assert!(
        stubborn_up.id < web_up.id,
        "web started before the service it depends on"
    );
    let web_stopped = service_event("web", "stopped").expect("web stopped");
    let stubborn_term = service_event("stubborn", "SIGTERM").expect("stubborn got SIGTERM");
    let stubborn_kill = service_event("stubborn", "SIGKILL").expect("stubborn got SIGKILL");
    assert!(
        web_stopped.id < stubborn_term.id,
        "web must stop before its dependency"
    );
    let waited = Duration::from_micros(stubborn_kill.boot_us - stubborn_term.boot_us);
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(6),
        "killed after {waited:?}"
    );
    let killed = service_event("stubborn", "killed by SIGKILL").expect("stubborn's exit");
    assert!(killed.id > stubborn_kill.id);
}
