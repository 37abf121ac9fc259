//! The node's API through a gRPC client that is not Plinth's own (Python's grpcio, as grpcurl
//! or a load balancer would use it): server reflection lists the services and gives the
//! descriptors to call Version with, and the standard health service answers, all over the
//! node's mTLS. `./x test` installs grpcio into `target/pyenv` (PLINTH_PYTHON).

mod common;

use std::process::Command;

use api::pki::ClientSpec;
use api::Role;
use common::start;

fn python() -> String {
    std::env::var("PLINTH_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pyenv/bin/python").to_string()
    })
}

#[tokio::test]
async fn a_third_party_grpc_client_reflects_calls_and_checks_health_over_mtls() {
    let py = python();
    assert!(
        std::path::Path::new(&py).exists(),
        "{py} is missing: ./x test makes it (python3 -m venv target/pyenv; pip install grpcio grpcio-reflection grpcio-health-checking)"
    );
    let node = start(vec![], &[]);
    node.version_after(None).await;
    // A reader: reflection and health are open to every role.
    let id = node
        .ca
        .issue_client(&ClientSpec::new("grpcio", Role::Reader))
        .expect("cert");
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, data: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).expect("write");
        p.display().to_string()
    };
    let (ca, cert, key) = (
        write("ca.pem", node.ca.cert_pem()),
        write("cert.pem", &id.cert_pem),
        write("key.pem", &id.key_pem),
    );
    let endpoint = node.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/grpc_reflect.py"
            ))
            .args([&endpoint, &ca, &cert, &key])
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "service plinth.machine.v1.Machine",
        "service grpc.health.v1.Health",
        "version 1.0-sim A",
        "health (server) SERVING",
        "health plinth.machine.v1.Machine SERVING",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn health_watches_are_capped_like_the_other_open_streams() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let channel = |_| async {
        let tls = api::client::context_tls(&node.ctx).expect("tls");
        api::client::channel(&node.endpoint, tls)
            .await
            .expect("channel")
    };
    // Sixteen watches (the cap for health and reflection together) hold; the next is refused.
    let mut held = Vec::new();
    for i in 0..16 {
        let mut h = HealthClient::new(channel(i).await);
        let s = h
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("watch {i}: {e:?}"))
            .into_inner();
        held.push(s);
    }
    let mut h = HealthClient::new(channel(16).await);
    let err = h
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // A watch given up frees its place.
    held.pop();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match h
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place was never freed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
