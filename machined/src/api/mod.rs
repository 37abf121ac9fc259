//! What machined serves over the API: [`ApiStarter`] starts the server (maintenance or
//! normal), and [`NodeApi`] answers each RPC, one module per concern:
//!
//! - [`status`]: Version and Status (slots, boot entries, the last failed trial);
//! - [`power`]: Reboot and Shutdown;
//! - [`upgrade`]: Upgrade and Rollback;
//! - [`reset`]: the Reset RPC;
//! - [`config`]: ApplyConfiguration and GetConfiguration;
//! - [`logs`]: Dmesg and Logs;
//! - [`workloads`]: ImageImport, ImageList and ContainerList;
//! - [`debug`]: Debug, the audited debug container.
//!
//! Every refusal and failure is an [`error::ApiError`], turned into a gRPC status in one
//! exhaustive match.

pub mod cluster;
pub mod config;
pub mod debug;
pub mod error;
pub mod logs;
pub mod power;
pub mod reset;
pub mod status;
pub mod upgrade;
pub mod workloads;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ::config::NodeConfig;
use api::proto::{StatusResponse, VersionResponse};
use api::server::{Admission, ServerHandle};
use async_trait::async_trait;
use phases::{ApiLauncher, Runtime};
use sequencer::{Denied, EventBus, TaskError};

/// Starts the API server for the boot sequence's `startApi` task, or for maintenance mode.
pub struct ApiStarter {
    /// Where to listen instead of the config's `0.0.0.0:port` (the simulated node listens on
    /// 127.0.0.1 only).
    bind: Option<SocketAddr>,
    handle: Mutex<Option<ServerHandle>>,
}

impl ApiStarter {
    /// A launcher; `bind` overrides the listening address.
    pub fn new(bind: Option<SocketAddr>) -> Self {
        ApiStarter {
            bind,
            handle: Mutex::new(None),
        }
    }

    fn keep(&self, handle: ServerHandle) {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Starts the maintenance API with a fresh self-signed certificate; returns where it listens
    /// and the certificate's SHA-256 fingerprint.
    pub async fn start_maintenance(
        &self,
        runtime: Arc<Runtime>,
    ) -> anyhow::Result<(String, String)> {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        if !host.is_empty() {
            sans.push(host);
        }
        let id = api::pki::self_signed_server("plinth maintenance", &sans)?;
        let fingerprint = api::pki::fingerprint(&id.cert_pem).unwrap_or_default();
        let tls = api::tls::server_config_without_client_auth(&id.cert_pem, &id.key_pem)?;
        let addr = self
            .bind
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ::config::node::DEFAULT_API_PORT)));
        let endpoint = self
            .serve(addr, tls, runtime, api::server::Mode::Maintenance)
            .await
            .map_err(|e| anyhow::anyhow!("the maintenance API: {e}"))?;
        Ok((endpoint, fingerprint))
    }

    /// Binds `addr` and serves there in `mode`; returns where it listens.
    async fn serve(
        &self,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        runtime: Arc<Runtime>,
        mode: api::server::Mode,
    ) -> Result<String, TaskError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the API to {addr}: {e}"))?;
        let handle = api::server::serve(
            listener,
            tls,
            Arc::new(NodeApi::new(runtime)),
            mode,
            api::server::Limits::default(),
        )?;
        let endpoint = handle.local_addr.to_string();
        self.keep(handle);
        Ok(endpoint)
    }

    /// Stops the server, if it runs, ending every connection it has (maintenance mode ends
    /// this way, and the simulated machine's reset frees its port).
    pub async fn stop(&self) {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            h.shutdown(std::time::Duration::from_secs(1)).await;
        }
    }
}

#[async_trait]
impl ApiLauncher for ApiStarter {
    async fn start(&self, runtime: Arc<Runtime>, config: &NodeConfig) -> Result<String, TaskError> {
        let a = config.machine.api.clone();
        // Parsing the certificates and checking the key pair is tens of milliseconds of CPU
        // under TCG: off the async threads, so the tasks beside this one (the network's
        // configuration) and the runtime's timers go on meanwhile.
        let tls =
            tokio::task::spawn_blocking(move || api::tls::server_config(&a.ca, &a.cert, &a.key))
                .await
                .map_err(|e| format!("building the API's TLS config: {e}"))??;
        let addr = self
            .bind
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], a.port)));
        self.serve(addr, tls, runtime, api::server::Mode::Normal)
            .await
    }
}

/// What the API serves: facts fixed for this boot, read once, and the live runtime.
pub struct NodeApi {
    runtime: Arc<Runtime>,
    fixed: VersionResponse,
}

impl NodeApi {
    /// The API of the node `runtime` runs.
    pub fn new(runtime: Arc<Runtime>) -> Self {
        let fixed = status::fixed_version(&runtime);
        NodeApi { runtime, fixed }
    }
}

#[tonic::async_trait]
impl api::server::Node for NodeApi {
    fn version(&self) -> VersionResponse {
        status::version(&self.runtime, &self.fixed)
    }

    fn events(&self) -> &EventBus {
        &self.runtime.bus
    }

    fn status(&self) -> StatusResponse {
        status::status(&self.runtime, &self.fixed)
    }

    async fn reboot(&self, actor: String, max_unavailable: u32) -> Result<(), tonic::Status> {
        Ok(power::reboot(&self.runtime, actor, max_unavailable).await?)
    }

    fn shutdown(&self, actor: String, force: bool) -> Result<(), Denied> {
        power::shutdown(&self.runtime, actor, force)
    }

    fn services(&self) -> Vec<api::proto::ServiceInfo> {
        status::services(&self.runtime)
    }

    fn extensions(&self) -> api::proto::ExtensionListResponse {
        status::extensions(&self.runtime)
    }

    async fn upgrade(
        &self,
        actor: String,
        options: api::proto::UpgradeOptions,
        bundle: api::server::BundleSource,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        Ok(upgrade::upgrade(&self.runtime, actor, options, bundle).await?)
    }

    async fn image_import(
        &self,
        actor: String,
        options: api::proto::ImageImportOptions,
        archive: api::server::BundleStream,
    ) -> Result<api::proto::ImageImportResponse, tonic::Status> {
        Ok(workloads::import(&self.runtime, actor, options, archive).await?)
    }

    async fn images(&self) -> Result<api::proto::ImageListResponse, tonic::Status> {
        Ok(workloads::images(&self.runtime).await?)
    }

    async fn containers(&self) -> Result<api::proto::ContainerListResponse, tonic::Status> {
        Ok(workloads::containers(&self.runtime).await?)
    }

    async fn debug(
        &self,
        actor: String,
        options: api::proto::DebugOptions,
        input: api::server::DebugInput,
    ) -> Result<api::server::DebugOutput, tonic::Status> {
        Ok(debug::debug(&self.runtime, actor, options, input).await?)
    }

    async fn rollback(&self, actor: String, max_unavailable: u32) -> Result<(), tonic::Status> {
        Ok(upgrade::rollback(&self.runtime, actor, max_unavailable).await?)
    }

    async fn bootstrap(&self, actor: String, recover: bool) -> Result<(), tonic::Status> {
        Ok(cluster::bootstrap(&self.runtime, actor, recover).await?)
    }

    async fn etcd_status(&self) -> Result<api::proto::EtcdStatusResponse, tonic::Status> {
        Ok(cluster::status(&self.runtime).await?)
    }

    async fn etcd_snapshot(
        &self,
        actor: String,
    ) -> Result<api::server::SnapshotStream, tonic::Status> {
        Ok(cluster::snapshot(&self.runtime, actor).await?)
    }

    async fn etcd_recover(
        &self,
        actor: String,
        options: api::proto::EtcdRecoverOptions,
        snapshot: api::server::BundleStream,
    ) -> Result<api::proto::EtcdRecoverResponse, tonic::Status> {
        Ok(cluster::recover(&self.runtime, actor, options, snapshot).await?)
    }

    async fn etcd_members(&self) -> Result<api::proto::EtcdMembersResponse, tonic::Status> {
        Ok(cluster::members(&self.runtime).await?)
    }

    async fn etcd_leave(&self, actor: String) -> Result<(), tonic::Status> {
        Ok(cluster::leave(&self.runtime, actor).await?)
    }

    async fn etcd_remove_member(&self, actor: String, id: u64) -> Result<(), tonic::Status> {
        Ok(cluster::remove_member(&self.runtime, actor, id).await?)
    }

    fn dmesg(&self, follow: bool) -> Result<api::server::LineStream, tonic::Status> {
        Ok(logs::dmesg(&self.runtime, follow)?)
    }

    fn logs(
        &self,
        service: &str,
        tail: u32,
        follow: bool,
    ) -> Result<api::server::LineStream, tonic::Status> {
        Ok(logs::logs(&self.runtime, service, tail, follow)?)
    }

    fn reset(&self, actor: String, r: api::proto::ResetRequest) -> Result<(), tonic::Status> {
        Ok(reset::reset(&self.runtime, actor, r)?)
    }

    async fn apply_configuration(
        &self,
        actor: String,
        admission: Admission,
        req: api::proto::ApplyConfigurationRequest,
    ) -> Result<api::proto::ApplyConfigurationResponse, tonic::Status> {
        Ok(config::apply(&self.runtime, actor, admission, req).await?)
    }

    fn get_configuration(&self) -> Result<api::proto::GetConfigurationResponse, tonic::Status> {
        Ok(config::get(&self.runtime)?)
    }
}
