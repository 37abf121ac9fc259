//! The Machine service: each RPC unpacks its request, calls the [`Node`], and packs the reply;
//! and the other services served beside it (gRPC health, server reflection).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sequencer::{Controller, Replay, SubscribeError};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::{
    denied_status, Admission, BundleSource, BundleStream, DebugOutput, Limits, LineStream, Node,
    SnapshotStream,
};
use crate::convert::to_proto;
use crate::proto::machine_server::{Machine, MachineServer};
use crate::proto::{
    self, EventsRequest, LifecycleResponse, RebootRequest, ShutdownRequest, StatusRequest,
    StatusResponse, VersionRequest, VersionResponse,
};

/// Every service the server answers: Machine, health and reflection.
pub(super) fn routes<N: Node>(node: Arc<N>, limits: &Limits) -> Routes {
    let machine = MachineServer::new(MachineService { node })
        // The largest message is an Upgrade chunk; every other request is held to
        // `max_request` by the gate (its body is capped), whatever its frames claim.
        .max_decoding_message_size(limits.max_upgrade_message + 1024);
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        reporter
            .set_serving::<MachineServer<MachineService<N>>>()
            .await;
    });
    let mut routes = Routes::new(machine).add_service(health);
    // Reflection for clients that have no copy of the proto (grpcurl); both protocol versions,
    // as grpcurl asks for v1 and older tools for v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    match reflection.build_v1() {
        Ok(r) => routes = routes.add_service(r),
        Err(e) => tracing::warn!("gRPC reflection (v1) not served: {e}"),
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    match reflection.build_v1alpha() {
        Ok(r) => routes = routes.add_service(r),
        Err(e) => tracing::warn!("gRPC reflection (v1alpha) not served: {e}"),
    }
    routes.prepare()
}

struct MachineService<N> {
    node: Arc<N>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl<N: Node> Machine for MachineService<N> {
    async fn version(
        &self,
        _: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(self.node.version()))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn reboot(
        &self,
        request: Request<RebootRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        let k = request.into_inner().max_unavailable;
        self.node.reboot(actor.clone(), k).await?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn shutdown(
        &self,
        r: Request<ShutdownRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node
            .shutdown(actor.clone(), r.into_inner().force)
            .map_err(|d| denied_status(&d, &actor))?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn service_list(
        &self,
        _: Request<proto::ServiceListRequest>,
    ) -> Result<Response<proto::ServiceListResponse>, Status> {
        Ok(Response::new(proto::ServiceListResponse {
            services: self.node.services(),
        }))
    }

    async fn extension_list(
        &self,
        _: Request<proto::ExtensionListRequest>,
    ) -> Result<Response<proto::ExtensionListResponse>, Status> {
        Ok(Response::new(self.node.extensions()))
    }

    async fn upgrade(
        &self,
        request: Request<tonic::Streaming<proto::UpgradeRequest>>,
    ) -> Result<Response<proto::UpgradeResponse>, Status> {
        let (options, bytes) = upload(request.into_inner(), "Upgrade").await?;
        let source = if options.url.is_empty() {
            BundleSource::Stream(bytes)
        } else {
            BundleSource::Url(options.url.clone())
        };
        let actor = Controller::new_actor();
        let reply = self.node.upgrade(actor, options, source).await?;
        Ok(Response::new(reply))
    }

    async fn image_import(
        &self,
        request: Request<tonic::Streaming<proto::ImageImportRequest>>,
    ) -> Result<Response<proto::ImageImportResponse>, Status> {
        let (options, archive) = upload(request.into_inner(), "ImageImport").await?;
        let actor = Controller::new_actor();
        let reply = self.node.image_import(actor, options, archive).await?;
        Ok(Response::new(reply))
    }

    async fn image_list(
        &self,
        _: Request<proto::ImageListRequest>,
    ) -> Result<Response<proto::ImageListResponse>, Status> {
        Ok(Response::new(self.node.images().await?))
    }

    async fn container_list(
        &self,
        _: Request<proto::ContainerListRequest>,
    ) -> Result<Response<proto::ContainerListResponse>, Status> {
        Ok(Response::new(self.node.containers().await?))
    }

    type DebugStream = DebugOutput;

    async fn debug(
        &self,
        request: Request<tonic::Streaming<proto::DebugRequest>>,
    ) -> Result<Response<DebugOutput>, Status> {
        use proto::debug_request::Msg;
        let mut input = request.into_inner();
        let options = match input.message().await? {
            Some(proto::DebugRequest {
                msg: Some(Msg::Options(o)),
            }) => o,
            _ => {
                return Err(Status::invalid_argument(
                    "the first Debug message must carry the options",
                ))
            }
        };
        let actor = Controller::new_actor();
        let output = self.node.debug(actor, options, Box::pin(input)).await?;
        Ok(Response::new(output))
    }

    async fn bootstrap(
        &self,
        request: Request<proto::BootstrapRequest>,
    ) -> Result<Response<proto::BootstrapResponse>, Status> {
        let recover = request.into_inner().recover_etcd;
        self.node
            .bootstrap(Controller::new_actor(), recover)
            .await?;
        Ok(Response::new(proto::BootstrapResponse {}))
    }

    async fn etcd_status(
        &self,
        _: Request<proto::EtcdStatusRequest>,
    ) -> Result<Response<proto::EtcdStatusResponse>, Status> {
        Ok(Response::new(self.node.etcd_status().await?))
    }

    type EtcdSnapshotStream = SnapshotStream;

    async fn etcd_snapshot(
        &self,
        _: Request<proto::EtcdSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        Ok(Response::new(
            self.node.etcd_snapshot(Controller::new_actor()).await?,
        ))
    }

    async fn etcd_recover(
        &self,
        request: Request<tonic::Streaming<proto::EtcdRecoverRequest>>,
    ) -> Result<Response<proto::EtcdRecoverResponse>, Status> {
        let (options, snapshot) = upload(request.into_inner(), "EtcdRecover").await?;
        let actor = Controller::new_actor();
        let reply = self.node.etcd_recover(actor, options, snapshot).await?;
        Ok(Response::new(reply))
    }

    async fn etcd_members(
        &self,
        _: Request<proto::EtcdMembersRequest>,
    ) -> Result<Response<proto::EtcdMembersResponse>, Status> {
        Ok(Response::new(self.node.etcd_members().await?))
    }

    async fn etcd_leave(
        &self,
        _: Request<proto::EtcdLeaveRequest>,
    ) -> Result<Response<proto::EtcdLeaveResponse>, Status> {
        self.node.etcd_leave(Controller::new_actor()).await?;
        Ok(Response::new(proto::EtcdLeaveResponse {}))
    }

    async fn etcd_remove_member(
        &self,
        request: Request<proto::EtcdRemoveMemberRequest>,
    ) -> Result<Response<proto::EtcdRemoveMemberResponse>, Status> {
        let id = request.into_inner().id;
        self.node
            .etcd_remove_member(Controller::new_actor(), id)
            .await?;
        Ok(Response::new(proto::EtcdRemoveMemberResponse {}))
    }

    async fn rollback(
        &self,
        r: Request<proto::RollbackRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node
            .rollback(actor.clone(), r.into_inner().max_unavailable)
            .await?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    type DmesgStream = LineStream;

    async fn dmesg(&self, r: Request<proto::DmesgRequest>) -> Result<Response<LineStream>, Status> {
        Ok(Response::new(self.node.dmesg(r.into_inner().follow)?))
    }

    type LogsStream = LineStream;

    async fn logs(&self, r: Request<proto::LogsRequest>) -> Result<Response<LineStream>, Status> {
        let r = r.into_inner();
        Ok(Response::new(self.node.logs(&r.service, r.tail, r.follow)?))
    }

    async fn reset(
        &self,
        r: Request<proto::ResetRequest>,
    ) -> Result<Response<LifecycleResponse>, Status> {
        let actor = Controller::new_actor();
        self.node.reset(actor.clone(), r.into_inner())?;
        Ok(Response::new(LifecycleResponse { actor_id: actor }))
    }

    async fn apply_configuration(
        &self,
        r: Request<proto::ApplyConfigurationRequest>,
    ) -> Result<Response<proto::ApplyConfigurationResponse>, Status> {
        // The gate put it there; a call without one never gets this far.
        let admission = r
            .extensions()
            .get::<Admission>()
            .copied()
            .ok_or_else(|| Status::permission_denied("the call was not admitted"))?;
        let actor = Controller::new_actor();
        Ok(Response::new(
            self.node
                .apply_configuration(actor, admission, r.into_inner())
                .await?,
        ))
    }

    async fn get_configuration(
        &self,
        _: Request<proto::GetConfigurationRequest>,
    ) -> Result<Response<proto::GetConfigurationResponse>, Status> {
        Ok(Response::new(self.node.get_configuration()?))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let replay = match (r.since_id, r.tail) {
            (Some(id), _) => Replay::SinceId(id),
            (None, 0) => Replay::None,
            (None, n) => Replay::Tail(n as usize),
        };
        let actor = (!r.actor_id.is_empty()).then_some(r.actor_id);
        let mut sub = self
            .node
            .events()
            .subscribe(replay, actor)
            .map_err(|e| Status::out_of_range(e.to_string()))?;
        if !r.follow {
            let backlog: Vec<_> = sub
                .drain_backlog()
                .iter()
                .map(|e| Ok(to_proto(e)))
                .collect();
            return Ok(Response::new(Box::pin(futures::stream::iter(backlog))));
        }
        let stream = futures::stream::unfold(Some(sub), |state| async move {
            let mut sub = state?;
            match sub.next().await {
                Ok(e) => Some((Ok(to_proto(&e)), Some(sub))),
                // Say so and end the stream: a watcher must never silently miss events.
                Err(e @ SubscribeError::Lagged { .. }) => {
                    Some((Err(Status::data_loss(e.to_string())), None))
                }
                Err(e) => Some((Err(Status::unavailable(e.to_string())), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A message of an upload call: its options (first), or a chunk of the bytes.
trait UploadMessage: Send + 'static {
    /// The options message.
    type Options;
    /// The options, a chunk, or neither.
    fn part(self) -> (Option<Self::Options>, Option<Vec<u8>>);
}

impl UploadMessage for proto::UpgradeRequest {
    type Options = proto::UpgradeOptions;
    fn part(self) -> (Option<Self::Options>, Option<Vec<u8>>) {
        use proto::upgrade_request::Msg;
        match self.msg {
            Some(Msg::Options(o)) => (Some(o), None),
            Some(Msg::Chunk(c)) => (None, Some(c)),
            None => (None, None),
        }
    }
}

impl UploadMessage for proto::EtcdRecoverRequest {
    type Options = proto::EtcdRecoverOptions;
    fn part(self) -> (Option<Self::Options>, Option<Vec<u8>>) {
        use proto::etcd_recover_request::Msg;
        match self.msg {
            Some(Msg::Options(o)) => (Some(o), None),
            Some(Msg::Chunk(c)) => (None, Some(c)),
            None => (None, None),
        }
    }
}

impl UploadMessage for proto::ImageImportRequest {
    type Options = proto::ImageImportOptions;
    fn part(self) -> (Option<Self::Options>, Option<Vec<u8>>) {
        use proto::image_import_request::Msg;
        match self.msg {
            Some(Msg::Options(o)) => (Some(o), None),
            Some(Msg::Chunk(c)) => (None, Some(c)),
            None => (None, None),
        }
    }
}

/// An upload call's options (its first message) and the rest of its bytes as a reader: a
/// second options message or a broken stream is a read error the node reports.
async fn upload<M: UploadMessage>(
    mut stream: tonic::Streaming<M>,
    method: &'static str,
) -> Result<(M::Options, BundleStream), Status> {
    use futures::StreamExt;
    let options = match stream.message().await?.map(M::part) {
        Some((Some(o), _)) => o,
        _ => {
            return Err(Status::invalid_argument(format!(
                "the first {method} message must carry the options"
            )))
        }
    };
    let bytes = stream.map(move |m| match m.map(M::part) {
        Ok((None, Some(c))) => Ok(bytes::Bytes::from(c)),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("options after the first {method} message"),
        )),
        Err(status) => Err(std::io::Error::other(format!(
            "upload failed: {}",
            status.message()
        ))),
    });
    Ok((options, Box::new(tokio_util::io::StreamReader::new(bytes))))
}
