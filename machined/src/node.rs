//! The node role: PID 1 on the slot's root.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use api::proto::VersionResponse;
use api::server::ServerHandle;
use async_trait::async_trait;
use config::NodeConfig;
use phases::platform::linux::Linux;
use phases::runtime::paths;
use phases::tasks::system::{release_version, root_mount};
use phases::{ApiLauncher, Runtime};
use sequencer::{Event, EventBus, Request, TaskError};
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
    let runtime = Runtime::new(Arc::new(Linux), bus, Arc::new(ApiStarter::default()));
    if let Err(e) = spawn_reaper() {
        return e;
    }
    spawn_signal_handlers(runtime.clone());

    let boot = sequencer::run(
        &phases::boot::sequence(),
        runtime.clone(),
        &runtime.bus,
        None,
    )
    .await;
    if let Err(e) = boot {
        let _ = runtime.lifecycle.request(Request::BootFailed, None);
        return anyhow::Error::new(e);
    }
    if let Err(e) = runtime.lifecycle.request(Request::BootSucceeded, None) {
        tracing::warn!("{e}");
    }
    tracing::info!("node is running");
    std::future::pending::<anyhow::Error>().await
}

/// Reaps every child that exits: orphans are re-parented to PID 1, and a zombie nobody waits
/// for would stay forever.
fn spawn_reaper() -> anyhow::Result<()> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut sigchld = signal(SignalKind::child()).context("listening for SIGCHLD")?;
    tokio::spawn(async move {
        loop {
            sigchld.recv().await;
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => tracing::debug!("reaped {status:?}"),
                }
            }
        }
    });
    Ok(())
}

/// SIGINT (Ctrl-Alt-Del) asks for a reboot, SIGTERM for a power-off.
fn spawn_signal_handlers(runtime: Arc<Runtime>) {
    // Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting at once.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        tracing::warn!("disabling Ctrl-Alt-Del: {e}");
    }
    for (kind, request) in [
        (SignalKind::interrupt(), Request::Reboot),
        (SignalKind::terminate(), Request::Shutdown),
    ] {
        let runtime = runtime.clone();
        match signal(kind) {
            Ok(mut sig) => {
                tokio::spawn(async move {
                    while sig.recv().await.is_some() {
                        if runtime.lifecycle.request(request, Some("signal")).is_ok() {
                            terminate(request);
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("listening for {kind:?}: {e}"),
        }
    }
}

/// Flushes and unmounts the writable file systems, then restarts or powers off.
fn terminate(request: Request) {
    for target in [paths::EPHEMERAL, paths::STATE] {
        if let Err(e) = nix::mount::umount(target) {
            tracing::warn!("unmounting {target}: {e}");
        }
    }
    nix::unistd::sync();
    let mode = match request {
        Request::Shutdown => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        _ => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
    };
    let Err(e) = nix::sys::reboot::reboot(mode);
    tracing::error!("reboot(2): {e}");
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
            state: self.runtime.lifecycle.state().to_string(),
            ..self.fixed.clone()
        }
    }

    fn events(&self) -> &EventBus {
        &self.runtime.bus
    }
}
