//! The node role: PID 1 on the slot's root.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use api::proto::{StatusResponse, VersionResponse};
use api::server::ServerHandle;
use async_trait::async_trait;
use config::NodeConfig;
use phases::platform::linux::Linux;
use phases::reaper::{Reaper, Scope};
use phases::runtime::paths;
use phases::tasks::system::{release_version, root_mount};
use phases::{ApiLauncher, Runtime};
use sequencer::{Denied, Event, EventBus, SequenceKind, TaskError};
use tokio::signal::unix::{signal, SignalKind};

/// Runs the node; returns only on failure.
pub fn run() -> anyhow::Error {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return anyhow::Error::new(e).context("starting the async runtime"),
    };
    rt.block_on(serve())
}

async fn serve() -> anyhow::Error {
    let bus = EventBus::new(4096);
    // The initramfs's events come first so that Events replays the whole boot.
    match std::fs::read(paths::INITRAMFS_EVENTS) {
        Ok(data) => match serde_json::from_slice::<Vec<Event>>(&data) {
            Ok(events) => bus.import(events),
            Err(e) => tracing::warn!("{}: {e}", paths::INITRAMFS_EVENTS),
        },
        Err(e) => tracing::warn!("{}: {e}", paths::INITRAMFS_EVENTS),
    }
    bus.add_sink(Box::new(crate::console::trace_sink));
    // The one SIGCHLD handler: PID 1 reaps every orphan, and services' exits go to the
    // supervisor through it.
    let reaper = match Reaper::start(Scope::AllChildren) {
        Ok(r) => r,
        Err(e) => return anyhow::Error::new(e).context("listening for SIGCHLD"),
    };
    let runtime = Runtime::new(
        Arc::new(Linux),
        bus,
        Arc::new(ApiStarter::default()),
        reaper,
    );
    spawn_signal_handlers(runtime.clone());

    let chain = [
        (SequenceKind::Initialize, phases::boot::initialize()),
        (SequenceKind::Boot, phases::boot::boot()),
    ];
    for (kind, sequence) in chain {
        let started = match runtime
            .controller
            .start(kind, sequence, runtime.clone(), None, false)
        {
            Ok(s) => s,
            // Something took over the boot already (a reboot asked for by a signal).
            Err(denied) => {
                tracing::info!("{kind} not started: {denied}");
                return std::future::pending().await;
            }
        };
        match started.handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => {
                tracing::info!("{e}");
                return std::future::pending().await;
            }
            Ok(Err(e)) => return boot_failed(&runtime, anyhow::Error::new(e)).await,
            Err(e) => return boot_failed(&runtime, anyhow::anyhow!("{kind} panicked: {e}")).await,
        }
    }
    tracing::info!("node is running");
    std::future::pending::<anyhow::Error>().await
}

/// The boot failed: say why, give the operator time to read it, then reboot through the reboot
/// sequence (so file systems are unmounted cleanly). Only if even that is refused does the error
/// go back to the single fatal path.
async fn boot_failed(runtime: &Arc<Runtime>, error: anyhow::Error) -> anyhow::Error {
    crate::console::line(&format!("machined: boot failed: {error:#}"));
    crate::console::line("machined: rebooting in 10s");
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
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

/// SIGINT (Ctrl-Alt-Del) asks for a reboot, SIGTERM for a power-off.
fn spawn_signal_handlers(runtime: Arc<Runtime>) {
    // Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting at once.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        tracing::warn!("disabling Ctrl-Alt-Del: {e}");
    }
    // The ACPI power button reaches PID 1 as SIGTERM only with a daemon listening for it;
    // without one the kernel's own handler powers off. SIGTERM here is `kill -TERM 1`.
    for (kind, sequence, name) in [
        (
            SignalKind::interrupt(),
            SequenceKind::Reboot,
            "signal:SIGINT",
        ),
        (
            SignalKind::terminate(),
            SequenceKind::Shutdown,
            "signal:SIGTERM",
        ),
    ] {
        let runtime = runtime.clone();
        match signal(kind) {
            Ok(mut sig) => {
                tokio::spawn(async move {
                    while sig.recv().await.is_some() {
                        if let Err(denied) =
                            phases::power::request(&runtime, sequence, Some(name.into()), false)
                        {
                            tracing::warn!("{name}: {denied}");
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("listening for {kind:?}: {e}"),
        }
    }
}

/// Starts the API server for the boot sequence's `startApi` task.
#[derive(Default)]
struct ApiStarter {
    handle: Mutex<Option<ServerHandle>>,
}

#[async_trait]
impl ApiLauncher for ApiStarter {
    async fn start(&self, runtime: Arc<Runtime>, config: &NodeConfig) -> Result<String, TaskError> {
        let a = &config.machine.api;
        let tls = api::tls::server_config(&a.ca, &a.cert, &a.key)?;
        let addr = SocketAddr::from(([0, 0, 0, 0], a.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the API to {addr}: {e}"))?;
        let handle = api::server::serve(listener, tls, Arc::new(NodeApi::new(runtime)))?;
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

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl NodeApi {
    fn new(runtime: Arc<Runtime>) -> Self {
        let (root_fstype, root_source) =
            root_mount(&read_trimmed("/proc/self/mountinfo")).unwrap_or_default();
        let fixed = VersionResponse {
            version: release_version(&read_trimmed(paths::RELEASE))
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            node_name: runtime.config().map(|c| c.machine.name).unwrap_or_default(),
            slot: runtime
                .boot()
                .map(|b| b.slot.to_string())
                .unwrap_or_default(),
            machined_pid: std::process::id(),
            root_fstype,
            root_source,
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            arch: std::env::consts::ARCH.into(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            state: String::new(),
        };
        NodeApi { runtime, fixed }
    }
}

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
        StatusResponse {
            state: state.to_string(),
            superstate: state.superstate().into(),
            running_sequence,
            running_actor_id,
            slot: self.fixed.slot.clone(),
            boot_id: self.fixed.boot_id.clone(),
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

    fn shutdown(&self, actor: String, force: bool) -> Result<(), Denied> {
        phases::power::request(&self.runtime, SequenceKind::Shutdown, Some(actor), force)
            .map(|_| ())
    }
}
