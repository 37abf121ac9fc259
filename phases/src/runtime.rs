//! What the tasks of a running node share: the platform, the event bus, the lifecycle machine,
//! and what earlier phases found out (the boot disk, the config).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use config::NodeConfig;
use sequencer::{Controller, EventBus, TaskError};
use serde::{Deserialize, Serialize};
use upgrade::Slot;

use crate::platform::Platform;
use crate::reaper::Reaper;
use crate::services::Supervisor;

/// Where things live on a node.
pub mod paths {
    /// The initramfs hands its findings to machined here (on `/run`, which survives switch_root).
    pub const BOOT_INFO: &str = "/run/plinth/boot.json";
    /// Where the slot's root image is mounted before switch_root.
    pub const NEW_ROOT: &str = "/sysroot";
    /// The STATE partition's mount point.
    pub const STATE: &str = "/system/state";
    /// The node config on STATE.
    pub const CONFIG: &str = "/system/state/config.yaml";
    /// Service output.
    pub const SERVICE_LOGS: &str = "/var/log/services";
    /// The ESP's mount point.
    pub const ESP: &str = "/system/efi";
    /// The EPHEMERAL partition's mount point.
    pub const EPHEMERAL: &str = "/var";
    /// The cgroup v2 hierarchy.
    pub const CGROUP: &str = "/sys/fs/cgroup";
    /// The kernel modules the initramfs loads, relative to `/lib/modules/<release>/`, each
    /// with the modules it follows.
    pub const MODULE_ORDER: &str = "/lib/modules/plinth.order";
    /// The modules loaded in the background from the end of `loadModules` on (the node needs
    /// them after the initramfs), in the same form.
    pub const MODULE_LATE: &str = "/lib/modules/plinth.late";
    /// machined on the slot.
    pub const MACHINED: &str = "/sbin/machined";
    /// Facts about the image (version), written by the image builder.
    pub const RELEASE: &str = "/etc/plinth-release";
}

/// The node's containerd: its data on EPHEMERAL, its state and socket on `/run`.
pub fn containerd() -> workloads::Containerd {
    workloads::Containerd::new(Path::new(paths::EPHEMERAL), Path::new("/run"))
}

/// What the initramfs found: the slot it booted and where its disk is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// The slot the firmware booted.
    pub slot: Slot,
    /// The system disk (the one holding the ESP the firmware booted from).
    pub disk: PathBuf,
    /// The ESP's unique partition GUID (`LoaderDevicePartUUID`).
    pub esp_guid: uuid::Uuid,
    /// The slot's root partition.
    pub root_device: PathBuf,
    /// The boot disk is installer media (it has an `INSTALL` partition holding a bundle).
    #[serde(default)]
    pub installer: bool,
    /// The dm-verity root the UKI pins, and the mapped device the root is mounted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<MappedRoot>,
    /// The system disk's partitions as the initramfs read them (GPT name, device node): the
    /// boot's mounts find theirs here instead of reading the table again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<(String, PathBuf)>,
}

/// The slot's root as the initramfs mapped it through dm-verity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedRoot {
    /// The pinned root (size, salt, root hash).
    pub root: upgrade::verity::VerityRoot,
    /// The device-mapper name.
    pub name: String,
    /// The mapped device mounted as `/`.
    pub device: PathBuf,
}

impl BootInfo {
    /// Reads the hand-over file.
    pub fn load(platform: &dyn Platform, path: &Path) -> Result<BootInfo, TaskError> {
        let data = platform.read(path)?;
        serde_json::from_slice(&data)
            .map_err(|e| format!("{} is not a boot info document: {e}", path.display()).into())
    }
}

/// Starts the API once the config is known. Implemented by machined (which owns the API crate),
/// so phases need not depend on it.
#[async_trait]
pub trait ApiLauncher: Send + Sync + 'static {
    /// Starts serving; returns the endpoint it listens on.
    async fn start(&self, runtime: Arc<Runtime>, config: &NodeConfig) -> Result<String, TaskError>;
}

#[derive(Default)]
struct Found {
    boot: Option<BootInfo>,
    system_disk: Option<PathBuf>,
    config: Option<NodeConfig>,
    api_probe: Option<String>,
}

/// The node as its tasks see it.
pub struct Runtime {
    /// The machine.
    pub platform: Arc<dyn Platform>,
    /// Events.
    pub bus: Arc<EventBus>,
    /// The lifecycle machine and the sequence lock.
    pub controller: Arc<Controller>,
    /// Starts the API.
    pub api: Arc<dyn ApiLauncher>,
    /// Supervised services.
    pub services: Arc<Supervisor>,
    /// The one owner of child exits.
    pub reaper: Arc<Reaper>,
    /// Sessions callers hold open (debug containers), ended before the services stop.
    pub sessions: crate::sessions::Sessions,
    /// Signalled when a node in maintenance mode has been given its config.
    pub config_applied: tokio::sync::Notify,
    /// Where this node's etcd stands (a bootstrap and a join decide under it).
    pub etcd: tokio::sync::Mutex<crate::etcd::EtcdState>,
    /// Set once the boot's network configuration has ended (well or not): the API is
    /// announced as ready only then, since before it no peer can reach the listener.
    pub network_settled: tokio::sync::watch::Sender<bool>,
    /// Set once STATE is open, made or failed. Volumes are made one at a time, STATE first, so
    /// that a first boot's writes come in one order whatever the threads do (the power-cut
    /// tests number them); opening them is side by side.
    pub state_settled: tokio::sync::watch::Sender<bool>,
    pending_try: Mutex<Option<tokio_util::sync::CancellationToken>>,
    found: Mutex<Found>,
    config_write: Mutex<()>,
    /// Whether this boot is a slot's trial.
    trial: std::sync::atomic::AtomicBool,
    meta: Mutex<()>,
    volumes: Mutex<Vec<crate::volume::Volume>>,
    extensions: Mutex<Vec<crate::extensions::ExtensionStatus>>,
}

/// Sets a flag when dropped: however the task holding it ends (done, failed, or its phase
/// cancelled), whoever waits for the flag does not wait for ever.
pub struct SetOnDrop<'a>(pub &'a tokio::sync::watch::Sender<bool>);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Runtime {
    /// A runtime for a node that has just started.
    pub fn new(
        platform: Arc<dyn Platform>,
        bus: Arc<EventBus>,
        api: Arc<dyn ApiLauncher>,
        reaper: Arc<Reaper>,
    ) -> Arc<Self> {
        let log_dir = PathBuf::from(paths::SERVICE_LOGS);
        Arc::new(Runtime {
            services: Supervisor::new(
                platform.clone(),
                reaper.clone(),
                bus.clone(),
                log_dir,
                containerd(),
            ),
            reaper,
            sessions: crate::sessions::Sessions::default(),
            config_applied: tokio::sync::Notify::new(),
            etcd: tokio::sync::Mutex::new(crate::etcd::EtcdState::Off),
            network_settled: tokio::sync::watch::Sender::new(false),
            state_settled: tokio::sync::watch::Sender::new(false),
            pending_try: Mutex::new(None),
            platform,
            controller: Controller::new(bus.clone()),
            bus,
            api,
            found: Mutex::new(Found::default()),
            config_write: Mutex::new(()),
            trial: std::sync::atomic::AtomicBool::new(false),
            meta: Mutex::new(()),
            volumes: Mutex::new(Vec::new()),
            extensions: Mutex::new(Vec::new()),
        })
    }

    /// The extensions found at boot and what became of each.
    pub fn extensions(&self) -> Vec<crate::extensions::ExtensionStatus> {
        self.extensions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the extensions found at boot.
    pub fn set_extensions(&self, e: Vec<crate::extensions::ExtensionStatus>) {
        *self.extensions.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn found(&self) -> MutexGuard<'_, Found> {
        self.found.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The boot info, once the boot sequence has read it.
    pub fn boot(&self) -> Option<BootInfo> {
        self.found().boot.clone()
    }

    /// Records the boot info.
    pub fn set_boot(&self, boot: BootInfo) {
        self.found().boot = Some(boot);
    }

    /// The disk holding the node's partitions (STATE, META, slots): the boot disk, or the
    /// install target while an installer writes it.
    pub fn system_disk(&self) -> Option<PathBuf> {
        let f = self.found();
        f.system_disk
            .clone()
            .or_else(|| f.boot.as_ref().map(|b| b.disk.clone()))
    }

    /// Makes `disk` the system disk (the Install sequence, once it has partitioned it).
    pub fn set_system_disk(&self, disk: PathBuf) {
        self.found().system_disk = Some(disk);
    }

    /// Whether the node booted from installer media.
    pub fn installer(&self) -> bool {
        self.found().boot.as_ref().is_some_and(|b| b.installer)
    }

    /// The node config, once loaded.
    pub fn config(&self) -> Option<NodeConfig> {
        self.found().config.clone()
    }

    /// STATE and EPHEMERAL as this boot opened them.
    pub fn volumes(&self) -> Vec<crate::volume::Volume> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records an opened volume (replacing one of the same label).
    pub fn set_volume(&self, v: crate::volume::Volume) {
        let mut vs = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        vs.retain(|x| x.label != v.label);
        vs.push(v);
    }

    /// Whether this boot is a slot's trial (its health decides whether it is committed).
    pub fn trial(&self) -> bool {
        self.trial.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks this boot as a trial, or not.
    pub fn set_trial(&self, trial: bool) {
        self.trial.store(trial, std::sync::atomic::Ordering::SeqCst);
    }

    /// Where the API can be reached from the node itself, when it does not listen on the
    /// config's port on all addresses (the simulated node).
    pub fn api_probe(&self) -> Option<String> {
        self.found().api_probe.clone()
    }

    /// Records where the API listens.
    pub fn set_api_probe(&self, endpoint: String) {
        self.found().api_probe = Some(endpoint);
    }

    /// Held while META is read, changed and written.
    pub fn meta_lock(&self) -> MutexGuard<'_, ()> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the node config (the applyConfig sequence's `writeConfig` and `loadConfig`
    /// do, with the config lock held).
    pub fn set_config(&self, config: NodeConfig) {
        self.found().config = Some(config);
    }

    /// Held while the config is checked, written and set: the one lock under which it changes.
    pub fn config_lock(&self) -> MutexGuard<'_, ()> {
        self.config_write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps the revert of the config being tried (try mode, until confirmed); returns the
    /// one it replaces.
    pub fn replace_pending_try(
        &self,
        next: Option<tokio_util::sync::CancellationToken>,
    ) -> Option<tokio_util::sync::CancellationToken> {
        std::mem::replace(
            &mut *self.pending_try.lock().unwrap_or_else(|p| p.into_inner()),
            next,
        )
    }
}
