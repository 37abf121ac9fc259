//! Maintenance mode: a node without a config serves a narrow API with server-only TLS until it
//! is given one; config changes on a running node.

mod common;

use std::time::Duration;

use api::proto::*;
use common::{start, start_unconfigured};

#[tokio::test]
async fn a_node_without_config_waits_in_maintenance_mode_and_boots_once_given_one() {
    let (node, config) = start_unconfigured();
    let fp = node.maintenance_fingerprint().await;

    // Anyone may reach it, without a client certificate, pinning the printed fingerprint.
    let mut c = api::client::connect_insecure(&node.endpoint, Some(fp.clone()))
        .await
        .expect("connect");
    let s = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (s.state.as_str(), s.superstate.as_str()),
        ("maintenance", "maintenance")
    );
    c.version(VersionRequest {})
        .await
        .expect("version is served");
    c.events(EventsRequest {
        tail: 5,
        ..Default::default()
    })
    .await
    .expect("events are served");
    // ... but nothing else.
    for code in [
        c.reboot(RebootRequest::default())
            .await
            .err()
            .map(|s| s.code()),
        c.service_list(ServiceListRequest {})
            .await
            .err()
            .map(|s| s.code()),
        c.dmesg(DmesgRequest { follow: false })
            .await
            .err()
            .map(|s| s.code()),
    ] {
        assert_eq!(code, Some(tonic::Code::PermissionDenied));
    }

    // A client expecting another certificate refuses to talk.
    let wrong = "00".repeat(32);
    let refused = async {
        let mut c = api::client::connect_insecure(&node.endpoint, Some(wrong))
            .await
            .map_err(|e| e.to_string())?;
        c.version(VersionRequest {})
            .await
            .map(|_| ())
            .map_err(|s| api::client::describe_status(&s))
    }
    .await;
    assert!(refused.is_err_and(|e| e.contains("fingerprint")));

    // An invalid config names the field and changes nothing.
    let mut bad = config.clone();
    bad.machine.network.interfaces[0].addresses = vec!["10.0.2.300/24".into()];
    let err = c
        .apply_configuration(ApplyConfigurationRequest {
            data: bad.to_yaml().expect("yaml"),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("machine.network.interfaces[0].addresses[0]"),
        "{}",
        err.message()
    );
    let s = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.state, "maintenance");

    // The real one: the node boots with it and answers over mTLS.
    c.apply_configuration(ApplyConfigurationRequest {
        data: config.to_yaml().expect("yaml"),
        ..Default::default()
    })
    .await
    .expect("applied");
    let v = node.version_after(None).await;
    assert_eq!((v.state.as_str(), v.node_name.as_str()), ("running", "sim"));
}

#[tokio::test]
async fn a_config_being_tried_goes_back_by_itself_unless_confirmed() {
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    // The config on STATE, as the node keeps it.
    let on_state = || {
        let path = std::fs::read_dir(node.machine().join("volumes"))
            .expect("volumes")
            .flatten()
            .map(|e| e.path().join("config.yaml"))
            .find(|p| p.exists())
            .expect("config on STATE");
        config::NodeConfig::from_yaml(&std::fs::read_to_string(path).expect("read")).expect("valid")
    };
    let current = on_state();
    assert_eq!(current.machine.name, "sim");
    let mut tried = current.clone();
    tried.machine.name = "renamed".into();
    let try_it = |c: config::NodeConfig| ApplyConfigurationRequest {
        data: c.to_yaml().expect("yaml"),
        mode: ApplyMode::Try as i32,
        try_timeout_s: 1,
        ..Default::default()
    };
    let r = c
        .apply_configuration(try_it(tried.clone()))
        .await
        .expect("try")
        .into_inner();
    assert!(r.summary.contains("reverted"), "{}", r.summary);
    assert_eq!(on_state().machine.name, "renamed");

    // Not confirmed: back to the old config after the timeout, and nothing left to confirm.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(on_state().machine.name, "sim");
    let confirm = ApplyConfigurationRequest {
        confirm: true,
        ..Default::default()
    };
    let err = c
        .apply_configuration(confirm.clone())
        .await
        .expect_err("nothing to confirm");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // Tried and confirmed: it stays.
    c.apply_configuration(try_it(tried.clone()))
        .await
        .expect("try");
    c.apply_configuration(confirm).await.expect("confirmed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(on_state().machine.name, "renamed");

    // A normal apply while a try is pending keeps the new config: the try's revert is gone.
    let mut third = tried.clone();
    third.machine.name = "third".into();
    c.apply_configuration(try_it(current.clone()))
        .await
        .expect("try");
    c.apply_configuration(ApplyConfigurationRequest {
        data: third.to_yaml().expect("yaml"),
        ..Default::default()
    })
    .await
    .expect("no-reboot over a try");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(on_state().machine.name, "third");

    // A try over a try goes back to the config before both.
    let mut first_try = third.clone();
    first_try.machine.name = "try-one".into();
    let mut second_try = third.clone();
    second_try.machine.name = "try-two".into();
    c.apply_configuration(ApplyConfigurationRequest {
        try_timeout_s: 30,
        ..try_it(first_try)
    })
    .await
    .expect("try one");
    c.apply_configuration(try_it(second_try))
        .await
        .expect("try two");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(on_state().machine.name, "third");
    let tried = third;

    // A change that only a boot can apply says so.
    let mut moved = tried.clone();
    moved.machine.network.interfaces[0].addresses = vec!["10.0.2.16/24".into()];
    let r = c
        .apply_configuration(ApplyConfigurationRequest {
            data: moved.to_yaml().expect("yaml"),
            ..Default::default()
        })
        .await
        .expect("no-reboot")
        .into_inner();
    assert_eq!(r.needs_reboot, ["machine.network"]);
}

#[tokio::test]
async fn a_config_refusing_unencrypted_volumes_is_refused_by_a_node_running_on_plain_ones() {
    // The simulated machine has no TPM: its volumes are plain, and Status says why.
    let node = start(vec![], &[]);
    node.version_after(None).await;
    let s = node.status().await;
    let trust = s.trust.expect("trust");
    assert_eq!(trust.tpm, "none");
    for v in &trust.volumes {
        assert!(!v.encrypted, "{v:?}");
        assert!(v.detail.contains("not encrypted"), "{}", v.detail);
    }
    let mut c = node.client().await;
    let mut cfg = node.config_on_state().expect("config");
    cfg.machine.encryption.without_tpm = config::WithoutTpm::Refuse;
    let err = c
        .apply_configuration(ApplyConfigurationRequest {
            data: cfg.to_yaml().expect("yaml"),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is not encrypted") && err.message().contains("refuse"),
        "{}",
        err.message()
    );
    // Nothing changed.
    assert_eq!(
        node.config_on_state().expect("config").machine.encryption,
        config::Encryption::default()
    );
}
