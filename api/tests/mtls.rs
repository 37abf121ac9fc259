//! The API over real TLS on loopback: who gets in, who is refused, and how the refusal reads.

use std::sync::Arc;
use std::time::Duration;

use api::pki::{Ca, ClientSpec, Identity};
use api::proto::{EventsRequest, VersionRequest, VersionResponse};
use api::server::{serve, ServerHandle};
use api::{client, tls, Role};
use sequencer::{EventBus, EventKind};

mod fake;

use fake::FakeNode;

struct Fixture {
    ca: Ca,
    server: ServerHandle,
    bus: Arc<EventBus>,
    reboots: Arc<std::sync::atomic::AtomicUsize>,
}

async fn start() -> Fixture {
    let ca = Ca::generate("test").expect("ca");
    let server_id = ca
        .issue_server("node", &["127.0.0.1".into()])
        .expect("server cert");
    let cfg =
        tls::server_config(ca.cert_pem(), &server_id.cert_pem, &server_id.key_pem).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bus = EventBus::new(64);
    let reboots = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = serve(
        listener,
        cfg,
        Arc::new(FakeNode {
            bus: bus.clone(),
            reboots: reboots.clone(),
        }),
        api::server::Mode::Normal,
        api::server::Limits::default(),
    )
    .expect("serve");
    Fixture {
        ca,
        server,
        bus,
        reboots,
    }
}

fn endpoint(f: &Fixture) -> String {
    f.server.local_addr.to_string()
}

async fn version_with(
    f: &Fixture,
    ca_pem: &str,
    id: Option<&Identity>,
) -> Result<VersionResponse, String> {
    let tls = tls::client_config(
        ca_pem,
        id.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
    )
    .map_err(|e| e.to_string())?;
    let call = async {
        let mut c = client::connect(&endpoint(f), tls)
            .await
            .map_err(|e| e.to_string())?;
        c.version(VersionRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| client::describe_status(&s))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .map_err(|_| "hung".to_string())?
}

#[tokio::test]
async fn an_admin_client_gets_the_version() {
    let f = start().await;
    let admin =
        f.ca.issue_client(&ClientSpec::new("admin", Role::Admin))
            .expect("client");
    let v = version_with(&f, f.ca.cert_pem(), Some(&admin))
        .await
        .expect("version");
    assert_eq!((v.slot.as_str(), v.machined_pid), ("A", 1));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_with_a_clear_error_not_a_hang() {
    let f = start().await;
    let err = version_with(&f, f.ca.cert_pem(), None)
        .await
        .expect_err("refused");
    assert!(err.contains("requires a client certificate"), "{err}");
}

#[tokio::test]
async fn a_client_signed_by_another_ca_is_refused() {
    let f = start().await;
    let other = Ca::generate("other").expect("ca");
    let id = other
        .issue_client(&ClientSpec::new("mallory", Role::Admin))
        .expect("client");
    let err = version_with(&f, f.ca.cert_pem(), Some(&id))
        .await
        .expect_err("refused");
    assert!(err.contains("not signed by the node's CA"), "{err}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_node_refuses_to_talk() {
    let f = start().await;
    let other = Ca::generate("other").expect("ca");
    let admin =
        f.ca.issue_client(&ClientSpec::new("admin", Role::Admin))
            .expect("client");
    let err = version_with(&f, other.cert_pem(), Some(&admin))
        .await
        .expect_err("refused");
    assert!(err.contains("node's certificate is not signed"), "{err}");
}

#[tokio::test]
async fn a_certificate_without_a_role_is_refused_with_permission_denied() {
    let f = start().await;
    let mut spec = ClientSpec::new("nobody", Role::Admin);
    spec.organization = Some("acme".into());
    let id = f.ca.issue_client(&spec).expect("client");
    let err = version_with(&f, f.ca.cert_pem(), Some(&id))
        .await
        .expect_err("refused");
    assert!(
        err.contains("PermissionDenied") && err.contains("acme"),
        "{err}"
    );
}

#[tokio::test]
async fn events_replay_the_tail_then_follow_live_events() {
    let f = start().await;
    for i in 0..5 {
        f.bus.publish(
            EventKind::SequenceStart {
                sequence: format!("s{i}"),
            },
            None,
        );
    }
    let reader =
        f.ca.issue_client(&ClientSpec::new("r", Role::Reader))
            .expect("client");
    let tls = tls::client_config(f.ca.cert_pem(), Some((&reader.cert_pem, &reader.key_pem)))
        .expect("tls");
    let mut c = client::connect(&endpoint(&f), tls).await.expect("connect");
    let mut stream = c
        .events(EventsRequest {
            tail: 2,
            follow: true,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner();
    let mut ids = vec![];
    for _ in 0..2 {
        ids.push(stream.message().await.expect("msg").expect("event").id);
    }
    f.bus.publish(
        EventKind::SequenceStart {
            sequence: "live".into(),
        },
        None,
    );
    ids.push(stream.message().await.expect("msg").expect("event").id);
    assert_eq!(ids, vec![4, 5, 6]);
}

/// Calls `Reboot` (a write) as `id`; the error text as the CLI would show it.
async fn reboot_with(f: &Fixture, id: Option<&Identity>) -> Result<(), String> {
    let tls = tls::client_config(
        f.ca.cert_pem(),
        id.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
    )
    .map_err(|e| e.to_string())?;
    let call = async {
        let mut c = client::connect(&endpoint(f), tls)
            .await
            .map_err(|e| e.to_string())?;
        c.reboot(api::proto::RebootRequest::default())
            .await
            .map(drop)
            .map_err(|s| client::describe_status(&s))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .map_err(|_| "hung".to_string())?
}

#[tokio::test]
async fn every_bad_credential_is_refused_with_its_reason_and_changes_nothing() {
    use time::{Duration as D, OffsetDateTime};
    let f = start().await;
    let now = OffsetDateTime::now_utc();
    let other = Ca::generate("other").expect("ca");
    let admin = |f: &Fixture, edit: &dyn Fn(&mut ClientSpec)| {
        let mut spec = ClientSpec::new("mallory", Role::Admin);
        edit(&mut spec);
        f.ca.issue_client(&spec).expect("client")
    };
    let cases: Vec<(&str, Option<Identity>, &str)> = vec![
        ("no certificate", None, "requires a client certificate"),
        (
            "signed by another CA",
            Some(
                other
                    .issue_client(&ClientSpec::new("mallory", Role::Admin))
                    .expect("client"),
            ),
            "not signed by the node's CA",
        ),
        (
            "expired",
            Some(admin(&f, &|s| {
                s.not_before = now - D::days(30);
                s.not_after = now - D::days(1);
            })),
            "client's certificate: it is expired or not valid yet",
        ),
        (
            "not yet valid",
            Some(admin(&f, &|s| {
                s.not_before = now + D::days(1);
                s.not_after = now + D::days(30);
            })),
            "client's certificate: it is expired or not valid yet",
        ),
        (
            "without client-auth usage",
            Some(admin(&f, &|s| s.client_auth = false)),
            "it is not marked for client authentication",
        ),
        (
            "a reader calling a write",
            Some(
                f.ca.issue_client(&ClientSpec::new("r", Role::Reader))
                    .expect("client"),
            ),
            "PermissionDenied",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, id, expect) in &cases {
        match reboot_with(&f, id.as_ref()).await {
            Ok(()) => wrong.push(format!("{what}: accepted")),
            Err(e) if !e.contains(expect) => wrong.push(format!(
                "{what}: refused, but the error does not say {expect:?}: {e}"
            )),
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        f.reboots.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused caller rebooted the node"
    );
    // The control: an admin's reboot goes through, so the count above could have moved.
    reboot_with(&f, Some(&admin(&f, &|_| {})))
        .await
        .expect("admin reboots");
    assert_eq!(f.reboots.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// An ImageImport call from `id` carrying `size` bytes of archive.
async fn import_with(f: &Fixture, id: &Identity, size: usize) -> Result<u64, String> {
    use api::proto::image_import_request::Msg;
    use api::proto::{ImageImportOptions, ImageImportRequest};
    let tls = tls::client_config(f.ca.cert_pem(), Some((&id.cert_pem, &id.key_pem)))
        .map_err(|e| e.to_string())?;
    let mut c = client::connect(&endpoint(f), tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut msgs = vec![ImageImportRequest {
        msg: Some(Msg::Options(ImageImportOptions {
            name: "plinth.local/x:1".into(),
            size: size as u64,
        })),
    }];
    for chunk in vec![7u8; size].chunks(256 << 10) {
        msgs.push(ImageImportRequest {
            msg: Some(Msg::Chunk(chunk.to_vec())),
        });
    }
    c.image_import(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().images.first().map(|i| i.size).unwrap_or(0))
        .map_err(|s| client::describe_status(&s))
}

#[tokio::test]
async fn an_image_import_is_an_upload_for_admins_only() {
    let f = start().await;
    let admin =
        f.ca.issue_client(&ClientSpec::new("admin", Role::Admin))
            .expect("client");
    // Far past the 64 KiB other requests are held to: the whole archive gets through.
    let size = 3 << 20;
    assert_eq!(import_with(&f, &admin, size).await, Ok(size as u64));
    for role in [Role::Reader, Role::Operator] {
        let id =
            f.ca.issue_client(&ClientSpec::new("someone", role))
                .expect("client");
        let err = import_with(&f, &id, 1024).await.expect_err("refused");
        assert!(err.contains("PermissionDenied"), "{role}: {err}");
    }
}

/// Opens a Debug session as `id` whose stdin is `stdin`, then whatever `more` sends; returns
/// the answer's stream once the node has sent its first message.
async fn open_debug(
    f: &Fixture,
    id: &Identity,
    stdin: usize,
    more: impl futures::Stream<Item = api::proto::DebugRequest> + Send + 'static,
) -> Result<tonic::Streaming<api::proto::DebugResponse>, String> {
    use api::proto::{debug_request, DebugOptions, DebugRequest};
    use futures::StreamExt;
    let tls = tls::client_config(f.ca.cert_pem(), Some((&id.cert_pem, &id.key_pem)))
        .map_err(|e| e.to_string())?;
    let mut c = client::connect(&endpoint(f), tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut msgs = vec![DebugRequest {
        msg: Some(debug_request::Msg::Options(DebugOptions {
            image: "plinth.local/busybox:latest".into(),
            command: vec!["cat".into()],
            ..Default::default()
        })),
    }];
    for chunk in vec![7u8; stdin].chunks(16 << 10) {
        msgs.push(DebugRequest {
            msg: Some(debug_request::Msg::Stdin(chunk.to_vec())),
        });
    }
    let mut out = c
        .debug(futures::stream::iter(msgs).chain(more))
        .await
        .map_err(|s| client::describe_status(&s))?
        .into_inner();
    out.message()
        .await
        .map_err(|s| client::describe_status(&s))?
        .ok_or("the session ended at once")?;
    Ok(out)
}

/// Bytes of stdout until the exit status.
async fn debug_output(
    mut out: tonic::Streaming<api::proto::DebugResponse>,
) -> Result<usize, String> {
    use api::proto::debug_response::Msg;
    let mut got = 0;
    while let Some(m) = out
        .message()
        .await
        .map_err(|s| client::describe_status(&s))?
    {
        match m.msg {
            Some(Msg::Stdout(b)) => got += b.len(),
            Some(Msg::ExitStatus(_)) => return Ok(got),
            _ => {}
        }
    }
    Err("the session ended without an exit status".into())
}

#[tokio::test]
async fn debug_sessions_are_for_admins_carry_long_input_and_are_capped() {
    let f = start().await;
    let admin =
        f.ca.issue_client(&ClientSpec::new("admin", Role::Admin))
            .expect("client");
    // A session's stdin is not held to the 64 KiB other requests are.
    let size = 1 << 20;
    let out = open_debug(&f, &admin, size, futures::stream::empty())
        .await
        .expect("opens");
    assert_eq!(debug_output(out).await, Ok(size));
    for role in [Role::Reader, Role::Operator] {
        let id =
            f.ca.issue_client(&ClientSpec::new("someone", role))
                .expect("client");
        let err = open_debug(&f, &id, 10, futures::stream::empty())
            .await
            .expect_err("refused");
        assert!(
            err.contains("PermissionDenied") && err.contains("Debug"),
            "{role}: {err}"
        );
    }
    // Sessions held open fill the cap; one more is refused at once, not queued.
    let cap = api::server::Limits::default().max_debug_sessions;
    let mut open = Vec::new();
    for _ in 0..cap {
        // Its stdin stays open until the sender goes.
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let more = futures::StreamExt::filter_map(futures::stream::once(closed), |_| async {
            None::<api::proto::DebugRequest>
        });
        let out = open_debug(&f, &admin, 0, more).await.expect("opens");
        open.push((close, out));
    }
    let err = open_debug(&f, &admin, 0, futures::stream::empty())
        .await
        .expect_err("over the cap");
    assert!(
        err.contains("ResourceExhausted") && err.contains("Debug"),
        "{err}"
    );
    // A session that ends makes room.
    let (close, out) = open.pop().expect("one");
    drop(close);
    assert_eq!(debug_output(out).await, Ok(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open_debug(&f, &admin, 0, futures::stream::empty()).await {
            Ok(out) => {
                assert_eq!(debug_output(out).await, Ok(0));
                break;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("no room: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
