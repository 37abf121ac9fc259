//! A node for API tests and benchmarks: constant answers, a real event bus, and a count of the
//! reboots it accepted (so a refused caller can be shown to have changed nothing).

#![allow(dead_code)]

use std::sync::Arc;

use api::proto::VersionResponse;
use api::server::Node;
use sequencer::EventBus;

pub struct FakeNode {
    pub bus: Arc<EventBus>,
    /// Reboots the node accepted: a refused caller must leave it at zero.
    pub reboots: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl Node for FakeNode {
    fn version(&self) -> VersionResponse {
        VersionResponse {
            version: "test".into(),
            slot: "A".into(),
            machined_pid: 1,
            ..Default::default()
        }
    }
    fn events(&self) -> &EventBus {
        &self.bus
    }
    fn status(&self) -> api::proto::StatusResponse {
        api::proto::StatusResponse::default()
    }
    async fn reboot(&self, _: String, _: u32) -> Result<(), tonic::Status> {
        self.reboots
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn shutdown(&self, _: String, _: bool) -> Result<(), sequencer::Denied> {
        Ok(())
    }
    fn services(&self) -> Vec<api::proto::ServiceInfo> {
        Vec::new()
    }
    fn extensions(&self) -> api::proto::ExtensionListResponse {
        api::proto::ExtensionListResponse::default()
    }
    async fn upgrade(
        &self,
        _: String,
        _: api::proto::UpgradeOptions,
        _: api::server::BundleSource,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn image_import(
        &self,
        actor: String,
        options: api::proto::ImageImportOptions,
        mut archive: api::server::BundleStream,
    ) -> Result<api::proto::ImageImportResponse, tonic::Status> {
        // Counts what arrives, so a test sees that the whole upload got through.
        let mut sink = tokio::io::sink();
        let size = tokio::io::copy(&mut archive, &mut sink)
            .await
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        Ok(api::proto::ImageImportResponse {
            actor_id: actor,
            images: vec![api::proto::ImageInfo {
                name: options.name,
                digest: String::new(),
                size,
            }],
        })
    }
    async fn images(&self) -> Result<api::proto::ImageListResponse, tonic::Status> {
        Ok(api::proto::ImageListResponse::default())
    }
    async fn containers(&self) -> Result<api::proto::ContainerListResponse, tonic::Status> {
        Ok(api::proto::ContainerListResponse::default())
    }
    async fn debug(
        &self,
        actor: String,
        _: api::proto::DebugOptions,
        input: api::server::DebugInput,
    ) -> Result<api::server::DebugOutput, tonic::Status> {
        // Echoes stdin as stdout, then exits 0: a test sees a long session get through.
        use api::proto::{debug_request, debug_response, DebugResponse, DebugStarted};
        use futures::StreamExt;
        let started = DebugResponse {
            msg: Some(debug_response::Msg::Started(DebugStarted {
                actor_id: actor,
                ..Default::default()
            })),
        };
        let echo = input.filter_map(|m| async move {
            match m {
                Ok(api::proto::DebugRequest {
                    msg: Some(debug_request::Msg::Stdin(b)),
                }) => Some(Ok(DebugResponse {
                    msg: Some(debug_response::Msg::Stdout(b)),
                })),
                Ok(_) => None,
                Err(s) => Some(Err(s)),
            }
        });
        let exit = DebugResponse {
            msg: Some(debug_response::Msg::ExitStatus(0)),
        };
        Ok(Box::pin(
            futures::stream::iter([Ok(started)])
                .chain(echo)
                .chain(futures::stream::iter([Ok(exit)])),
        ))
    }
    async fn rollback(&self, _: String, _: u32) -> Result<(), tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn bootstrap(&self, _: String, _: bool) -> Result<(), tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_status(&self) -> Result<api::proto::EtcdStatusResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_snapshot(&self, _: String) -> Result<api::server::SnapshotStream, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_recover(
        &self,
        _: String,
        _: api::proto::EtcdRecoverOptions,
        _: api::server::BundleStream,
    ) -> Result<api::proto::EtcdRecoverResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_members(&self) -> Result<api::proto::EtcdMembersResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_leave(&self, _: String) -> Result<(), tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn etcd_remove_member(&self, _: String, _: u64) -> Result<(), tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    fn dmesg(&self, _: bool) -> Result<api::server::LineStream, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    fn logs(&self, _: &str, _: u32, _: bool) -> Result<api::server::LineStream, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    fn reset(&self, _: String, _: api::proto::ResetRequest) -> Result<(), tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn apply_configuration(
        &self,
        _: String,
        _: api::server::Admission,
        _: api::proto::ApplyConfigurationRequest,
    ) -> Result<api::proto::ApplyConfigurationResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    fn get_configuration(&self) -> Result<api::proto::GetConfigurationResponse, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}
