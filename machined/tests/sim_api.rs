//! The API's roles, walked over the whole RPC table, and the log RPCs, on a simulated node.

mod common;

use std::time::Duration;

use api::pki::ClientSpec;
use api::proto::machine_client::MachineClient;
use api::proto::*;
use api::role::{allowed_roles, RPCS};
use api::Role;
use common::{start, SimNode};
use config::{RestartPolicy, Service};
use tonic::transport::Channel;

fn ticker() -> Service {
    Service {
        name: "ticker".into(),
        command: vec!["/sbin/machined".into(), "pause".into(), "--tick".into()],
        depends_on: vec![],
        environment: vec![],
        restart: RestartPolicy::Always,
        stop_timeout_s: 2,
        health: None,
    }
}

/// A client with `org` as its certificate's Organization (`None`: a certificate without one).
async fn client_as(node: &SimNode, org: Option<&str>) -> MachineClient<Channel> {
    let mut spec = ClientSpec::new("tester", Role::Reader);
    spec.organization = org.map(str::to_owned);
    let id = node.ca.issue_client(&spec).expect("client cert");
    let ctx = config::Context {
        cert: Some(id.cert_pem),
        key: Some(id.key_pem),
        ..node.ctx.clone()
    };
    api::client::connect_context(&node.endpoint, &ctx)
        .await
        .expect("connect")
}

/// Calls `rpc` with harmless arguments; returns the status code (Ok for success).
async fn call(c: &mut MachineClient<Channel>, rpc: &str) -> tonic::Code {
    fn code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    }
    match rpc {
        "Version" => code(c.version(VersionRequest {}).await),
        "Events" => code(
            c.events(EventsRequest {
                tail: 1,
                ..Default::default()
            })
            .await,
        ),
        "Status" => code(c.status(StatusRequest {}).await),
        "ServiceList" => code(c.service_list(ServiceListRequest {}).await),
        "ExtensionList" => code(c.extension_list(ExtensionListRequest {}).await),
        // The simulated node has no container runtime: refused after authorization.
        "ImageList" => code(c.image_list(api::proto::ImageListRequest {}).await),
        "ContainerList" => code(c.container_list(api::proto::ContainerListRequest {}).await),
        "ImageImport" => {
            use api::proto::image_import_request::Msg;
            let msgs = vec![
                api::proto::ImageImportRequest {
                    msg: Some(Msg::Options(api::proto::ImageImportOptions::default())),
                },
                api::proto::ImageImportRequest {
                    msg: Some(Msg::Chunk(b"not an archive".to_vec())),
                },
            ];
            code(c.image_import(tokio_stream::iter(msgs)).await)
        }
        // Refused after authorization: the simulated node has no container runtime.
        "Debug" => {
            let msgs = vec![api::proto::DebugRequest {
                msg: Some(api::proto::debug_request::Msg::Options(
                    api::proto::DebugOptions {
                        image: "plinth.local/busybox:latest".into(),
                        ..Default::default()
                    },
                )),
            }];
            code(c.debug(tokio_stream::iter(msgs)).await)
        }
        "Dmesg" => code(c.dmesg(DmesgRequest { follow: false }).await),
        "Logs" => code(
            c.logs(LogsRequest {
                service: "ticker".into(),
                follow: false,
                tail: 1,
            })
            .await,
        ),
        // Refused after authorization, for a reason of its own: a bundle that is not one.
        "Upgrade" => {
            let msgs = vec![
                UpgradeRequest {
                    msg: Some(upgrade_request::Msg::Options(UpgradeOptions::default())),
                },
                UpgradeRequest {
                    msg: Some(upgrade_request::Msg::Chunk(b"garbage".to_vec())),
                },
            ];
            code(c.upgrade(tokio_stream::iter(msgs)).await)
        }
        // Refused after authorization: slot B is empty.
        "Rollback" => code(c.rollback(RollbackRequest::default()).await),
        // Refused after authorization: not a config.
        "ApplyConfiguration" => code(
            c.apply_configuration(ApplyConfigurationRequest {
                data: "not: [a config".into(),
                ..Default::default()
            })
            .await,
        ),
        // Refused after authorization: a label a reset may not wipe.
        "Reset" => code(
            c.reset(ResetRequest {
                labels: vec!["ROOT-A".into()],
                ..Default::default()
            })
            .await,
        ),
        "GetConfiguration" => code(c.get_configuration(GetConfigurationRequest {}).await),
        // Refused after authorization: a standalone node runs no etcd and is in no cluster.
        "Bootstrap" => code(c.bootstrap(api::proto::BootstrapRequest::default()).await),
        "EtcdMembers" => code(c.etcd_members(api::proto::EtcdMembersRequest {}).await),
        "EtcdLeave" => code(c.etcd_leave(api::proto::EtcdLeaveRequest {}).await),
        "EtcdRemoveMember" => code(
            c.etcd_remove_member(api::proto::EtcdRemoveMemberRequest { id: 1 })
                .await,
        ),
        "EtcdStatus" => code(c.etcd_status(api::proto::EtcdStatusRequest {}).await),
        "EtcdSnapshot" => code(c.etcd_snapshot(api::proto::EtcdSnapshotRequest {}).await),
        // Refused after authorization: no control plane waits for a bootstrap here.
        "EtcdRecover" => {
            use api::proto::etcd_recover_request::Msg;
            let msgs = vec![
                api::proto::EtcdRecoverRequest {
                    msg: Some(Msg::Options(api::proto::EtcdRecoverOptions::default())),
                },
                api::proto::EtcdRecoverRequest {
                    msg: Some(Msg::Chunk(b"not a snapshot".to_vec())),
                },
            ];
            code(c.etcd_recover(tokio_stream::iter(msgs)).await)
        }
        "Reboot" => code(c.reboot(RebootRequest::default()).await),
        "Shutdown" => code(c.shutdown(ShutdownRequest { force: false }).await),
        other => panic!("no call for {other}"),
    }
}

/// The RPCs in the order they are walked: the ones that end the boot last.
const ORDER: [&str; 25] = [
    "ApplyConfiguration",
    "GetConfiguration",
    "Bootstrap",
    "EtcdMembers",
    "EtcdStatus",
    "EtcdSnapshot",
    "EtcdRecover",
    "EtcdLeave",
    "EtcdRemoveMember",
    "Reset",
    "Version",
    "Events",
    "Status",
    "ServiceList",
    "ExtensionList",
    "ImageList",
    "ContainerList",
    "ImageImport",
    "Debug",
    "Dmesg",
    "Logs",
    "Upgrade",
    "Rollback",
    "Reboot",
    "Shutdown",
];

#[test]
fn the_walk_covers_every_rpc() {
    let mut a: Vec<&str> = ORDER.to_vec();
    let mut b: Vec<&str> = RPCS.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
}

#[tokio::test]
async fn every_rpc_is_allowed_exactly_for_the_roles_in_the_table_and_a_refusal_changes_nothing() {
    // One node per role allowed to end the boot (its Reboot and Shutdown really run).
    for final_role in [Role::Operator, Role::Admin] {
        let node = start(vec![ticker()], &[]);
        let before = node.version_after(None).await;
        for org in [
            None,
            Some("acme"),
            Some(Role::Reader.as_str()),
            Some(final_role.as_str()),
        ] {
            let role: Option<Role> = org.and_then(|o| o.parse().ok());
            let mut c = client_as(&node, org).await;
            for rpc in ORDER {
                let allowed = role.is_some_and(|r| allowed_roles(rpc).contains(&r));
                let got = call(&mut c, rpc).await;
                if allowed {
                    assert_ne!(
                        got,
                        tonic::Code::PermissionDenied,
                        "{org:?} must be allowed {rpc}"
                    );
                    if rpc == "Reboot" {
                        // Allowed and done: wait for the node to come back for the next calls.
                        let v = node.version_after(Some(&before.boot_id)).await;
                        assert_ne!(v.boot_id, before.boot_id);
                        c = client_as(&node, org).await;
                    }
                } else {
                    assert_eq!(
                        got,
                        tonic::Code::PermissionDenied,
                        "{org:?} must be refused {rpc}"
                    );
                }
            }
            if role.is_none() || role == Some(Role::Reader) {
                // Every refused call changed nothing: same boot, still running, B untouched.
                let v = node.version_after(None).await;
                assert_eq!(
                    (v.boot_id.as_str(), v.state.as_str()),
                    (before.boot_id.as_str(), "running"),
                    "{org:?}"
                );
                let s = node.status().await;
                assert!(
                    s.slots.iter().all(|x| x.slot == "A" || x.state == "empty"),
                    "{org:?}: {:?}",
                    s.slots
                );
            }
        }
    }
}

#[tokio::test]
async fn dmesg_shows_the_kernel_log_and_logs_follows_a_service() {
    let node = start(vec![ticker()], &[]);
    node.version_after(None).await;
    let mut c = node.client().await;
    let mut s = c
        .dmesg(DmesgRequest { follow: false })
        .await
        .expect("dmesg")
        .into_inner();
    let mut text = String::new();
    while let Some(l) = s.message().await.expect("line") {
        text.push_str(&l.text);
        text.push('\n');
    }
    assert!(
        text.contains("Linux version") && text.contains("SimFirmware: starting"),
        "{text}"
    );

    // Follow the ticker: lines keep coming.
    let mut s = c
        .logs(LogsRequest {
            service: "ticker".into(),
            follow: true,
            tail: 1,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let l = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("a line in time")
            .expect("ok")
            .expect("open");
        seen.push(l.text);
    }
    let n: Vec<u64> = seen
        .iter()
        .filter_map(|t| t.strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(n.len(), 4, "{seen:?}");
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive lines: {seen:?}"
    );

    let err = c
        .logs(LogsRequest {
            service: "nope".into(),
            follow: false,
            tail: 0,
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn an_unknown_apply_mode_or_wipe_method_or_an_oversized_request_is_refused_and_changes_nothing(
) {
    let node = start(vec![], &[]);
    let before = node.version_after(None).await;
    let config = node.config_on_state().expect("a config on STATE");
    let yaml = config.to_yaml().expect("yaml");

    // Enum values the node does not know must not quietly become the default.
    let mut c = node.client().await;
    let err = c
        .apply_configuration(ApplyConfigurationRequest {
            data: yaml.clone(),
            mode: 7,
            ..Default::default()
        })
        .await
        .expect_err("an unknown apply mode");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("apply mode 7"), "{}", err.message());
    let err = c
        .reset(ResetRequest {
            method: 9,
            ..Default::default()
        })
        .await
        .expect_err("an unknown wipe method");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("wipe method 9"), "{}", err.message());

    // A request over the 64 KiB every RPC but Upgrade accepts: a valid config with a long
    // comment, so only its size is wrong.
    let big = format!("{yaml}\n# {}\n", "x".repeat(100 << 10));
    let err = node
        .client()
        .await
        .apply_configuration(ApplyConfigurationRequest {
            data: big,
            ..Default::default()
        })
        .await
        .expect_err("an oversized request");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("64 KiB"), "{}", err.message());

    // Nothing changed: the same boot, still running, the same config on STATE.
    let v = node.version_after(None).await;
    assert_eq!(
        (v.boot_id.as_str(), v.state.as_str()),
        (before.boot_id.as_str(), "running")
    );
    assert_eq!(node.config_on_state(), Some(config));
}
