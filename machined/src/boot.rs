//! What the Linux node and the simulated one share: the boot chain, the API launcher, and
//! what the API serves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use api::proto::{StatusResponse, VersionResponse};
use api::server::ServerHandle;
use async_trait::async_trait;
use config::NodeConfig;
use phases::runtime::paths;
use phases::tasks::system::release_version;
use phases::{ApiLauncher, Runtime};
use sequencer::{Denied, EventBus, SequenceKind, TaskError};

/// How a step of the boot chain ended.
enum Step {
    Done,
    /// Taken over (a reboot during boot): the successor owns the node now.
    TakenOver,
    Failed(anyhow::Error),
}

async fn run_step(
    runtime: &Arc<Runtime>,
    kind: SequenceKind,
    sequence: sequencer::Sequence<Arc<Runtime>>,
) -> Step {
    run_step_with(runtime, kind, sequence, runtime.clone()).await
}

async fn run_step_with<C: Clone + Send + 'static>(
    runtime: &Arc<Runtime>,
    kind: SequenceKind,
    sequence: sequencer::Sequence<C>,
    ctx: C,
) -> Step {
    let started = match runtime.controller.start(kind, sequence, ctx, None, false) {
        Ok(s) => s,
        Err(denied) => {
            tracing::info!("{kind} not started: {denied}");
            return Step::TakenOver;
        }
    };
    match started.handle.await {
        Ok(Ok(())) => Step::Done,
        Ok(Err(e)) if e.is_cancelled() => {
            tracing::info!("{e}");
            Step::TakenOver
        }
        Ok(Err(e)) => Step::Failed(anyhow::Error::new(e)),
        Err(e) => Step::Failed(anyhow::anyhow!("{kind} panicked: {e}")),
    }
}

/// Runs initialize, waits in maintenance mode if there is no config, then runs boot; returns
/// only if the boot failed and even the reboot after it was refused.
pub async fn boot_chain(runtime: &Arc<Runtime>, api: &Arc<ApiStarter>) -> anyhow::Error {
    match run_step(
        runtime,
        SequenceKind::Initialize,
        phases::boot::initialize(),
    )
    .await
    {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    if runtime.config().is_none() {
        if let Err(e) = maintenance(runtime, api).await {
            return boot_failed(runtime, e).await;
        }
    }
    if runtime.installer() {
        return install(runtime).await;
    }
    match run_step(runtime, SequenceKind::Boot, phases::boot::boot()).await {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    tracing::info!("node is running");
    // From now on the main loop feeds the watchdog.
    if phases::watchdog::armed() {
        tokio::spawn(async {
            loop {
                phases::watchdog::feed();
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    std::future::pending::<anyhow::Error>().await
}

/// Booted from installer media with a config: install onto its target, then reboot into it.
async fn install(runtime: &Arc<Runtime>) -> anyhow::Error {
    let job = match phases::install::job(runtime.clone()) {
        Ok(j) => j,
        Err(e) => return boot_failed(runtime, anyhow::anyhow!("install: {e}")).await,
    };
    let disk = job.disk.display().to_string();
    // Writing a slot under emulation can outlast the watchdog's timeout.
    if phases::watchdog::armed() {
        tokio::spawn(async {
            loop {
                phases::watchdog::feed();
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    match run_step_with(
        runtime,
        SequenceKind::Install,
        phases::install::install(),
        job,
    )
    .await
    {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    crate::console::line(&format!(
        "machined: installed on {disk}; rebooting into it (the media can be removed)"
    ));
    match phases::power::request(runtime, SequenceKind::Reboot, Some("install".into()), false) {
        Ok(_) => std::future::pending().await,
        Err(denied) => anyhow::anyhow!("rebooting after the install: {denied}"),
    }
}

/// No config: serve the maintenance API (server-only TLS, a self-signed certificate whose
/// fingerprint is on the console, only Version/Status/Events/ApplyConfiguration) until one is
/// applied.
async fn maintenance(runtime: &Arc<Runtime>, api: &Arc<ApiStarter>) -> anyhow::Result<()> {
    runtime
        .controller
        .lifecycle
        .request(sequencer::Request::EnterMaintenance, None)?;
    // A blank machine has no address of its own yet: lease one on every link, so the operator
    // can reach the API; keep trying in the background if nobody answers.
    let leased = match runtime.platform.configure_dhcp(&[]).await {
        Ok(leases) => leases
            .iter()
            .map(|(link, lease)| format!("{link} {lease}"))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => {
            crate::console::line(&format!("machined: maintenance mode: {e}; retrying"));
            let rt = runtime.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                    if let Ok(leases) = rt.platform.configure_dhcp(&[]).await {
                        for (link, lease) in leases {
                            crate::console::line(&format!("machined: {link}: {lease} (DHCP)"));
                        }
                        break;
                    }
                }
            });
            "no address yet".into()
        }
    };
    let (endpoint, fingerprint) = api.start_maintenance(runtime.clone()).await?;
    crate::console::line(&format!("machined: maintenance mode: addresses: {leased}"));
    crate::console::line(&format!(
        "machined: maintenance mode: no node config. The API on {endpoint} takes one over TLS with certificate SHA-256 {fingerprint}:"
    ));
    crate::console::line(&format!(
        "machined:   plinth apply-config --insecure --cert-fingerprint {fingerprint} -e <node address> -f node.yaml"
    ));
    loop {
        tokio::select! {
            _ = runtime.config_applied.notified() => break,
            // Waiting for an operator is not a hang.
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => phases::watchdog::feed(),
        }
    }
    api.stop().await;
    tracing::info!("config applied: leaving maintenance mode");
    Ok(())
}

/// The boot failed: say why, give the operator time to read it, then reboot through the reboot
/// sequence (so file systems are unmounted cleanly). Only if even that is refused does the error
/// go back to the single fatal path.
async fn boot_failed(runtime: &Arc<Runtime>, error: anyhow::Error) -> anyhow::Error {
    crate::console::line(&format!(
        "machined: boot failed: {}",
        sequencer::runner::chain(error.as_ref())
    ));
    // Time to read the reason on a console; the simulated machine has no one watching.
    let delay = if runtime.platform.name() == "sim" {
        1
    } else {
        10
    };
    crate::console::line(&format!("machined: rebooting in {delay}s"));
    tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
    match phases::power::request(
        runtime,
        SequenceKind::Reboot,
        Some("boot-failure".into()),
        false,
    ) {
        Ok(_) => std::future::pending().await,
        Err(denied) => error.context(format!("rebooting after the failed boot: {denied}")),
    }
}

/// Starts the API server for the boot sequence's `startApi` task.
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
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], config::node::DEFAULT_API_PORT)));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding the maintenance API to {addr}: {e}"))?;
        let handle = api::server::serve(
            listener,
            tls,
            Arc::new(NodeApi::new(runtime)),
            api::server::Mode::Maintenance,
        )?;
        let endpoint = handle.local_addr.to_string();
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok((endpoint, fingerprint))
    }

    /// Stops the server, if it runs (the simulated machine's reset frees its port this way).
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
        let a = &config.machine.api;
        let tls = api::tls::server_config(&a.ca, &a.cert, &a.key)?;
        let addr = self
            .bind
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], a.port)));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the API to {addr}: {e}"))?;
        let handle = api::server::serve(
            listener,
            tls,
            Arc::new(NodeApi::new(runtime)),
            api::server::Mode::Normal,
        )?;
        let endpoint = handle.local_addr.to_string();
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(endpoint)
    }
}

/// What the API serves: facts fixed for this boot, read once, and the live runtime.
struct NodeApi {
    runtime: Arc<Runtime>,
    fixed: VersionResponse,
}

impl NodeApi {
    fn new(runtime: Arc<Runtime>) -> Self {
        let p = &runtime.platform;
        let (root_fstype, root_source) = p
            .mounts()
            .ok()
            .and_then(|m| m.into_iter().rev().find(|m| m.target == Path::new("/")))
            .map(|m| (m.fstype, m.source))
            .unwrap_or_default();
        let release = p
            .read(Path::new(paths::RELEASE))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let fixed = VersionResponse {
            version: release_version(&release)
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            node_name: runtime.config().map(|c| c.machine.name).unwrap_or_default(),
            slot: runtime
                .boot()
                .map(|b| b.slot.to_string())
                .unwrap_or_default(),
            machined_pid: std::process::id(),
            root_fstype,
            root_source,
            boot_id: p.boot_id(),
            arch: std::env::consts::ARCH.into(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            state: String::new(),
        };
        NodeApi { runtime, fixed }
    }
}

/// A channel of log lines as the API's stream.
fn lines(rx: tokio::sync::mpsc::Receiver<phases::logs::LogLine>) -> api::server::LineStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        let l = rx.recv().await?;
        Some((
            Ok(api::proto::LogLine {
                text: l.text,
                boot_us: l.boot_us,
                level: l.level,
            }),
            rx,
        ))
    }))
}

fn slot_status(slot: upgrade::Slot, r: &upgrade::meta::SlotRecord) -> api::proto::SlotStatus {
    api::proto::SlotStatus {
        slot: slot.to_string(),
        state: r.state.as_str().into(),
        version: r.version.clone(),
        attempts: r.attempts,
        failure: r.failure.clone().unwrap_or_default(),
        breadcrumbs: r.breadcrumbs.clone(),
    }
}

#[tonic::async_trait]
impl api::server::Node for NodeApi {
    fn version(&self) -> VersionResponse {
        VersionResponse {
            state: self.runtime.controller.state().to_string(),
            ..self.fixed.clone()
        }
    }

    fn events(&self) -> &EventBus {
        &self.runtime.bus
    }

    fn status(&self) -> StatusResponse {
        let state = self.runtime.controller.state();
        let (running_sequence, running_actor_id) = self
            .runtime
            .controller
            .running()
            .map(|(k, a)| (k.to_string(), a))
            .unwrap_or_default();
        let meta = phases::slots::read_meta(&self.runtime)
            .ok()
            .flatten()
            .map(|l| l.meta);
        let vars = self.runtime.platform.efivars();
        let boot_entries = vars
            .boot_entries()
            .unwrap_or_default()
            .into_iter()
            .map(|(n, o)| api::proto::BootEntry {
                number: u32::from(n),
                description: o.description.to_string_lossy(),
                path: o.file_path_list.to_string(),
                active: o.is_active(),
            })
            .collect();
        StatusResponse {
            state: state.to_string(),
            superstate: state.superstate().into(),
            running_sequence,
            running_actor_id,
            slot: self.fixed.slot.clone(),
            boot_id: self.fixed.boot_id.clone(),
            slots: meta
                .as_ref()
                .map(|m| {
                    upgrade::Slot::ALL
                        .iter()
                        .map(|s| slot_status(*s, m.slot(*s)))
                        .collect()
                })
                .unwrap_or_default(),
            committed: meta
                .as_ref()
                .map(|m| m.committed.to_string())
                .unwrap_or_default(),
            boot_entries,
            boot_order: vars
                .boot_order()
                .unwrap_or_default()
                .into_iter()
                .map(u32::from)
                .collect(),
            boot_current: vars.boot_current().ok().flatten().map(u32::from),
            boot_next: vars.boot_next().ok().flatten().map(u32::from),
            last_failure: meta
                .and_then(|m| m.last_failure)
                .map(|f| api::proto::TrialFailure {
                    slot: f.slot.to_string(),
                    version: f.version,
                    reason: f.reason,
                    unix_ms: f.unix_ms,
                }),
            trial: self.runtime.trial(),
        }
    }

    fn reboot(&self, actor: String) -> Result<(), Denied> {
        phases::power::request(&self.runtime, SequenceKind::Reboot, Some(actor), false).map(|_| ())
    }

    fn services(&self) -> Vec<api::proto::ServiceInfo> {
        self.runtime
            .services
            .list()
            .into_iter()
            .map(|s| api::proto::ServiceInfo {
                name: s.name,
                state: s.state.as_str().into(),
                pid: s.pid.unwrap_or(0),
                restarts: s.restarts,
                healthy: s.healthy,
                last_exit: s.last_exit.unwrap_or_default(),
                depends_on: s.depends_on,
            })
            .collect()
    }

    async fn upgrade(
        &self,
        actor: String,
        stage: bool,
        bundle: api::server::BundleSource,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        let rt = &self.runtime;
        phases::upgrade::admit_upgrade(rt).map_err(tonic::Status::failed_precondition)?;
        let bundle = match bundle {
            api::server::BundleSource::Stream(s) => s,
            api::server::BundleSource::Url(url) => phases::fetch::http_source(&url)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?,
        };
        let job = phases::upgrade::UpgradeJob::new(rt.clone(), stage, bundle)
            .map_err(tonic::Status::failed_precondition)?;
        let started = rt
            .controller
            .start(
                SequenceKind::Upgrade,
                phases::upgrade::upgrade(),
                job.clone(),
                Some(actor.clone()),
                false,
            )
            .map_err(|d| api::server::denied_status(&d, &actor))?;
        match started.handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => return Err(tonic::Status::aborted(format!("{e} (actor id {actor})"))),
            Ok(Err(e)) => {
                return Err(tonic::Status::invalid_argument(format!(
                    "upgrade refused: {e}; the running slot and the boot entries are unchanged (actor id {actor})"
                )))
            }
            Err(e) => return Err(tonic::Status::internal(format!("upgrade task: {e}"))),
        }
        let rebooting = !stage
            && phases::power::request(rt, SequenceKind::Reboot, Some(actor.clone()), false).is_ok();
        Ok(api::proto::UpgradeResponse {
            actor_id: actor,
            slot: job.target.to_string(),
            version: job.manifest().map(|m| m.version).unwrap_or_default(),
            rebooting,
        })
    }

    fn dmesg(&self, follow: bool) -> Result<api::server::LineStream, tonic::Status> {
        let rx = phases::logs::kernel_log(&self.runtime.platform, follow)
            .map_err(tonic::Status::unavailable)?;
        Ok(lines(rx))
    }

    fn logs(
        &self,
        service: &str,
        tail: u32,
        follow: bool,
    ) -> Result<api::server::LineStream, tonic::Status> {
        if !self
            .runtime
            .services
            .list()
            .iter()
            .any(|s| s.name == service)
        {
            return Err(tonic::Status::not_found(format!(
                "no service named {service:?}"
            )));
        }
        let rx =
            phases::logs::service_lines(&self.runtime.platform, service, tail as usize, follow)
                .map_err(tonic::Status::unavailable)?;
        Ok(lines(rx))
    }

    fn reset(&self, actor: String, r: api::proto::ResetRequest) -> Result<(), tonic::Status> {
        let target = phases::reset::admit(&r.labels, r.system_disk)
            .map_err(tonic::Status::invalid_argument)?;
        let method = match api::proto::WipeMethod::try_from(r.method) {
            Ok(api::proto::WipeMethod::Zero) => phases::platform::WipeMethod::Zero,
            _ => phases::platform::WipeMethod::Fast,
        };
        let job = phases::reset::ResetJob {
            rt: self.runtime.clone(),
            graceful: r.graceful,
            target,
            method,
            reboot: r.reboot,
        };
        phases::reset::request(job, Some(actor.clone()))
            .map(|_| ())
            .map_err(|d| api::server::denied_status(&d, &actor))
    }

    async fn apply_configuration(
        &self,
        actor: String,
        req: api::proto::ApplyConfigurationRequest,
    ) -> Result<api::proto::ApplyConfigurationResponse, tonic::Status> {
        use api::proto::ApplyMode;
        let rt = &self.runtime;
        let reply =
            |summary: String, needs_reboot: Vec<String>| api::proto::ApplyConfigurationResponse {
                actor_id: actor.clone(),
                summary,
                needs_reboot,
            };
        if req.confirm && req.data.is_empty() {
            let pending = rt
                .pending_try
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return match pending {
                Some(t) => {
                    t.cancel();
                    Ok(reply("the config being tried is kept".into(), vec![]))
                }
                None => Err(tonic::Status::failed_precondition(
                    "no config is being tried",
                )),
            };
        }
        // An invalid config changes nothing: it is refused before anything is written.
        let new = config::NodeConfig::from_yaml(&req.data)
            .map_err(|e| tonic::Status::invalid_argument(format!("invalid node config: {e}")))?;
        let old = rt.config();
        let write = |c: &config::NodeConfig| -> Result<(), tonic::Status> {
            rt.platform
                .write(
                    std::path::Path::new(phases::runtime::paths::CONFIG),
                    c.to_yaml().as_bytes(),
                )
                .map_err(|e| tonic::Status::internal(format!("writing the config: {e}")))
        };
        let Some(old) = old else {
            // On installer media the config must name a target that can be installed on:
            // refused here, with the reason, rather than failing after the call returned.
            if rt.installer() {
                phases::install::admit(rt, &new).map_err(tonic::Status::failed_precondition)?;
            }
            // Maintenance mode: this is the node's first config; the boot goes on with it.
            write(&new)?;
            rt.set_config(new);
            rt.config_applied.notify_one();
            return Ok(reply(
                "config applied: the node is booting with it".into(),
                vec![],
            ));
        };
        let mode = ApplyMode::try_from(req.mode).unwrap_or(ApplyMode::NoReboot);
        write(&new)?;
        rt.set_config(new.clone());
        // Live: the host name and the upgrade policy (read at each upgrade). The rest is read
        // at boot.
        if new.machine.name != old.machine.name {
            let _ = rt.platform.set_hostname(&new.machine.name);
        }
        let mut needs_reboot = Vec::new();
        if new.machine.network != old.machine.network {
            needs_reboot.push("machine.network".to_string());
        }
        if new.machine.api != old.machine.api {
            needs_reboot.push("machine.api".to_string());
        }
        if new.machine.services != old.machine.services {
            needs_reboot.push("machine.services".to_string());
        }
        match mode {
            ApplyMode::Reboot => {
                phases::power::request(rt, SequenceKind::Reboot, Some(actor.clone()), false)
                    .map_err(|d| api::server::denied_status(&d, &actor))?;
                Ok(reply("config written; rebooting".into(), vec![]))
            }
            ApplyMode::NoReboot => Ok(reply("config applied".into(), needs_reboot)),
            ApplyMode::Try => {
                let timeout =
                    std::time::Duration::from_secs(u64::from(if req.try_timeout_s == 0 {
                        60
                    } else {
                        req.try_timeout_s
                    }));
                let token = tokio_util::sync::CancellationToken::new();
                if let Some(previous) = rt
                    .pending_try
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(token.clone())
                {
                    previous.cancel();
                }
                let rt2 = rt.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::sleep(timeout) => {
                            let path = std::path::Path::new(phases::runtime::paths::CONFIG);
                            match rt2.platform.write(path, old.to_yaml().as_bytes()) {
                                Ok(()) => {
                                    if old.machine.name != rt2.config().map(|c| c.machine.name).unwrap_or_default() {
                                        let _ = rt2.platform.set_hostname(&old.machine.name);
                                    }
                                    rt2.set_config(old);
                                    tracing::warn!("the config being tried was not confirmed: reverted");
                                }
                                Err(e) => tracing::error!("reverting the config being tried: {e}"),
                            }
                            rt2.pending_try.lock().unwrap_or_else(|p| p.into_inner()).take();
                        }
                    }
                });
                Ok(reply(
                    format!("config applied for {}s: confirm it (apply-config --confirm) or it is reverted", timeout.as_secs()),
                    needs_reboot,
                ))
            }
        }
    }

    fn rollback(&self, actor: String) -> Result<(), tonic::Status> {
        let rt = self.runtime.clone();
        phases::upgrade::admit_rollback(&rt).map_err(tonic::Status::failed_precondition)?;
        let started = rt
            .controller
            .start(
                SequenceKind::Rollback,
                phases::upgrade::rollback(),
                rt.clone(),
                Some(actor.clone()),
                false,
            )
            .map_err(|d| api::server::denied_status(&d, &actor))?;
        tokio::spawn(async move {
            match started.handle.await {
                Ok(Ok(())) => {
                    if let Err(d) =
                        phases::power::request(&rt, SequenceKind::Reboot, Some(actor), false)
                    {
                        tracing::warn!("reboot after rollback: {d}");
                    }
                }
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("rollback task: {e}"),
            }
        });
        Ok(())
    }

    fn shutdown(&self, actor: String, force: bool) -> Result<(), Denied> {
        phases::power::request(&self.runtime, SequenceKind::Shutdown, Some(actor), force)
            .map(|_| ())
    }
}
