//! A whole node in a VM: its PKI and configs, its system disk, the VM, and an API client.
//!
//! Used by `plinth cluster create` and by the VM tests, so both boot nodes the same way.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::gen::{generate, GenOptions};
use api::proto::{VersionRequest, VersionResponse};
use config::{ClientConfig, Context};
use imager::disk::{DiskOptions, DEFAULT_DISK_BYTES, DEFAULT_SLOT_BYTES};
use imager::Artifacts;

use crate::qemu::{free_port, Firmware, Vm, VmSpec};
use crate::HarnessError;

/// QEMU user networking: the guest's address and gateway.
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
/// QEMU user networking's gateway.
pub const GUEST_GATEWAY: &str = "10.0.2.2";

/// eth0 on QEMU's user network (the API's way in, forwarded from the host), for a node whose
/// config was made for another network (a cluster's private segment on eth1).
pub fn user_network_interface() -> config::Interface {
    config::Interface {
        name: "eth0".into(),
        addresses: vec![GUEST_ADDRESS.into()],
        gateway: Some(GUEST_GATEWAY.into()),
        dhcp: false,
    }
}

/// A node to prepare.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name (also the client context's name).
    pub name: String,
    /// The node's directory: secrets, configs, disk, VM files.
    pub dir: PathBuf,
    /// Where the built image is (`artifacts.json`).
    pub image_dir: PathBuf,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Services for the node config.
    pub services: Vec<config::Service>,
    /// Public keys (hex) whose bundles (and extensions) the node accepts.
    pub trusted_keys: Vec<String>,
    /// System extension files for the ESP's store.
    pub extensions: Vec<PathBuf>,
    /// Containers for the node config.
    pub containers: Vec<config::Container>,
    /// Guest TCP ports to forward from free ports on the host's 127.0.0.1.
    pub forwards: Vec<u16>,
    /// A config made elsewhere (one node of a generated cluster), used as it is.
    pub preset: Option<Preset>,
    /// A second NIC, eth1, on a private network with other VMs.
    pub lan: Option<crate::qemu::Lan>,
}

/// A node config made for the node by someone else, with the admin client config for it.
#[derive(Debug, Clone)]
pub struct Preset {
    /// The host port its API certificate's endpoint names (forwarded to the API).
    pub api_port: u16,
    /// Its node config.
    pub node: config::NodeConfig,
    /// The admin client config.
    pub client: ClientConfig,
}

/// A node ready to boot.
#[derive(Debug, Clone)]
pub struct PreparedNode {
    /// What was asked.
    pub spec: NodeSpec,
    /// Host port forwarded to the API.
    pub api_port: u16,
    /// (host port, guest port) of [`NodeSpec::forwards`].
    pub forwards: Vec<(u16, u16)>,
    /// The admin client config for it.
    pub client: ClientConfig,
    /// Its system disk.
    pub disk: PathBuf,
    /// Its firmware: Secure Boot with the image's keys enrolled when the image is signed.
    pub firmware: Firmware,
}

impl PreparedNode {
    /// The endpoint clients use (`127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }

    /// The host port forwarded to guest port `guest`.
    pub fn forwarded(&self, guest: u16) -> Option<u16> {
        self.forwards
            .iter()
            .find(|(_, g)| *g == guest)
            .map(|(h, _)| *h)
    }

    /// The admin context.
    pub fn context(&self) -> Result<&Context, HarnessError> {
        self.client
            .context(None)
            .map(|(_, c)| c)
            .map_err(|e| HarnessError::Other(e.to_string()))
    }

    /// The VM for this node (not started).
    pub fn vm_spec(&self) -> VmSpec {
        VmSpec {
            name: self.spec.name.clone(),
            dir: self.spec.dir.join("vm"),
            disk: self.disk.clone(),
            api_port: self.api_port,
            forwards: self.forwards.clone(),
            memory_mb: self.spec.memory_mb,
            media: None,
            firmware: self.firmware.clone(),
            tpm: Some(self.spec.dir.join("vm/tpm")),
            lan: self.spec.lan.clone(),
        }
    }

    /// Starts the VM.
    pub fn boot(&self) -> Result<Vm, HarnessError> {
        Vm::launch(self.vm_spec())
    }
}

/// Generates the node's PKI and configs and writes its system disk from the built image.
pub fn prepare(spec: &NodeSpec, artifacts: &Artifacts) -> Result<PreparedNode, HarnessError> {
    std::fs::create_dir_all(&spec.dir)
        .map_err(HarnessError::io(format!("creating {}", spec.dir.display())))?;
    let write = |name: &str, data: &str| -> Result<(), HarnessError> {
        let p = spec.dir.join(name);
        config::client::write_private(&p, data.as_bytes())
            .map_err(HarnessError::io(format!("writing {}", p.display())))
    };
    let (api_port, mut node, client) = match &spec.preset {
        Some(p) => (p.api_port, p.node.clone(), p.client.clone()),
        None => {
            let api_port = free_port()?;
            let generated = generate(&GenOptions {
                name: spec.name.clone(),
                endpoint: format!("127.0.0.1:{api_port}"),
                interface: "eth0".into(),
                address: Some(GUEST_ADDRESS.into()),
                gateway: Some(GUEST_GATEWAY.into()),
                trusted_keys: spec.trusted_keys.clone(),
            })
            .map_err(|e| HarnessError::Other(format!("generating configs: {e}")))?;
            write("ca.crt", generated.ca.cert_pem())?;
            write("ca.key", &generated.ca.0.key_pem)?;
            (api_port, generated.node, generated.client)
        }
    };
    node.machine.services.extend(spec.services.iter().cloned());
    node.machine
        .containers
        .extend(spec.containers.iter().cloned());
    node.validate()
        .map_err(|e| HarnessError::Other(format!("node config: {e}")))?;
    let node_yaml = node.to_yaml()?;
    write("node.yaml", &node_yaml)?;
    client
        .save(&spec.dir.join("plinthconfig"))
        .map_err(|e| HarnessError::Other(e.to_string()))?;
    let disk = spec.dir.join("disk.raw");
    imager::disk::assemble(
        artifacts,
        &DiskOptions {
            out: disk.clone(),
            disk_bytes: DEFAULT_DISK_BYTES,
            slot_bytes: DEFAULT_SLOT_BYTES,
            config_yaml: Some(node_yaml),
            work_dir: spec.dir.join("work"),
            extensions: spec.extensions.clone(),
        },
    )?;
    let forwards = spec
        .forwards
        .iter()
        .map(|g| free_port().map(|h| (h, *g)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PreparedNode {
        spec: spec.clone(),
        api_port,
        forwards,
        client,
        disk,
        firmware: firmware_for(artifacts)?,
    })
}

/// The firmware that boots `artifacts`: OVMF's Secure Boot build with their keys enrolled if
/// they are signed, plain OVMF otherwise.
pub fn firmware_for(artifacts: &Artifacts) -> Result<Firmware, HarnessError> {
    Ok(match &artifacts.secureboot {
        Some(keys) => Firmware::SecureBoot {
            vars: crate::firmware::enrolled_vars(keys)?,
        },
        None => Firmware::Plain,
    })
}

/// How [`wait_for_version_with`] tries.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    /// A new attempt this often (the earlier ones left running).
    pub every: Duration,
    /// An attempt gives up after this long.
    pub attempt: Duration,
    /// Attempts start once the console shows this (the node saying it listens), not before.
    pub after_line: Option<&'static str>,
    /// After an attempt fails, the next starts this soon (if sooner than `every`).
    pub after_failure: Duration,
}

impl Polling {
    /// For tests: an attempt every 0.5 s, each given 15 s (a TLS handshake on a loaded machine
    /// under TCG can take seconds), so at most a few dozen are ever open at once.
    pub const PATIENT: Polling = Polling {
        every: Duration::from_millis(500),
        attempt: Duration::from_secs(15),
        after_line: None,
        after_failure: Duration::from_millis(500),
    };
    /// For the boot benchmark (one VM, a quiet machine), as one client would: nothing until
    /// the node's trace says its API is ready (listening, its addresses configured), then one
    /// attempt, the next 20 ms after one fails, or 0.5 s after one that has not answered (one
    /// stuck in QEMU's port forward), each given 3 s. Blind attempts from the start would pile
    /// up in the port forward, and attempts every 20 ms regardless had up to 14 TLS handshakes
    /// at once on the node's two emulated CPUs, timing the client's own load.
    pub const EAGER: Polling = Polling {
        every: Duration::from_millis(500),
        attempt: Duration::from_secs(3),
        after_line: Some("\"kind\":\"api_ready\""),
        after_failure: Duration::from_millis(20),
    };
}

/// Calls `Version` until it answers (the node is booting) or `timeout` passes; returns the reply
/// and when it came, relative to the VM's start. Fails at once if the VM exits.
pub async fn wait_for_version(
    vm: &mut Vm,
    endpoint: &str,
    ctx: &Context,
    timeout: Duration,
) -> Result<(VersionResponse, Duration), HarnessError> {
    wait_for_version_with(vm, endpoint, ctx, timeout, Polling::PATIENT).await
}

/// [`wait_for_version`], polling as `polling` says.
pub async fn wait_for_version_with(
    vm: &mut Vm,
    endpoint: &str,
    ctx: &Context,
    timeout: Duration,
    polling: Polling,
) -> Result<(VersionResponse, Duration), HarnessError> {
    let mut deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    // New attempts while the earlier ones run: one that connected before the guest listened
    // can hang in QEMU's port forward for seconds, and must not delay the call that would
    // succeed now.
    let mut attempts = tokio::task::JoinSet::new();
    let mut next = tokio::time::Instant::now();
    let mut listening = polling.after_line.is_none();
    let mut reset = false;
    loop {
        if let Some(status) = vm.exited() {
            return Err(HarnessError::Exited {
                what: format!("Version from {endpoint}"),
                status: status.to_string(),
                tail: vm.diagnostics(),
            });
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout {
                what: format!("Version from {endpoint} (last error: {last})"),
                secs: timeout.as_secs(),
                tail: format!("{}\n--- vCPUs:\n{}", vm.diagnostics(), vm.cpu_state()),
            });
        }
        if !reset && stalled_at_handoff(vm) {
            // Seen once in CI (one boot in hundreds): the firmware started the UKI and the
            // guest printed nothing more for minutes, before any of Plinth's code ran (the
            // kernel's first line comes 3 s into its boot). A reset is a power cycle, which
            // the node must survive anyway; a boot that stalls again still fails the test.
            eprintln!(
                "{}: nothing on the console for {} s after the firmware started the boot \
                 entry; vCPUs: {}; pressing reset (once)",
                vm.spec.name,
                HANDOFF_STALL.as_secs(),
                vm.cpu_state()
            );
            vm.press_reset()?;
            reset = true;
            deadline = Instant::now() + timeout;
        }
        if !listening {
            listening = polling
                .after_line
                .is_some_and(|line| vm.serial.find(line, 0).is_some());
            next = tokio::time::Instant::now();
        }
        if listening && tokio::time::Instant::now() >= next {
            let (endpoint, ctx) = (endpoint.to_string(), ctx.clone());
            attempts.spawn(async move {
                let attempt = async {
                    let mut c = api::client::connect_context(&endpoint, &ctx)
                        .await
                        .map_err(|e| e.to_string())?;
                    c.version(VersionRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| api::client::describe_status(&s))
                };
                tokio::time::timeout(polling.attempt, attempt)
                    .await
                    .unwrap_or_else(|_| Err("call timed out".into()))
            });
            next += polling.every;
        }
        tokio::select! {
            Some(done) = attempts.join_next() => match done {
                Ok(Ok(v)) => return Ok((v, vm.started.elapsed())),
                Ok(Err(e)) => {
                    last = e;
                    next = next.min(tokio::time::Instant::now() + polling.after_failure);
                }
                Err(e) => last = e.to_string(),
            },
            _ = tokio::time::sleep_until(if listening {
                next
            } else {
                tokio::time::Instant::now() + Duration::from_millis(5)
            }) => {}
        }
    }
}

/// How long the console may stay silent after the firmware starts a boot entry: the kernel's
/// first line comes about 3 s later under TCG, 10 s on a loaded host.
const HANDOFF_STALL: Duration = Duration::from_secs(90);

/// Whether the console's last line, printed more than [`HANDOFF_STALL`] ago, is the firmware
/// starting a boot entry.
fn stalled_at_handoff(vm: &Vm) -> bool {
    vm.serial.last().is_some_and(|l| {
        l.text.contains("BdsDxe: starting Boot")
            && vm.started.elapsed().saturating_sub(l.at) > HANDOFF_STALL
    })
}

/// The Secure Boot keys for images built in `image_dir` (`IMAGE_DIR/secureboot`), generated
/// the first time.
pub fn image_keys(image_dir: &Path) -> Result<PathBuf, HarnessError> {
    let dir = image_dir.join("secureboot");
    if imager::secureboot::Keys::load(&dir).is_err() {
        imager::secureboot::generate(&dir, "Plinth dev")?;
    }
    Ok(dir)
}

/// The built image in `image_dir` (signed with [`image_keys`]), building it with `machined` if
/// there is none yet.
pub fn ensure_artifacts(
    image_dir: &Path,
    machined: &Path,
    version: &str,
) -> Result<Artifacts, HarnessError> {
    // Tests in several processes at once (nextest runs each VM test in its own) ask for the
    // image together: one checks or builds it while the others wait, then find it fresh.
    std::fs::create_dir_all(image_dir).map_err(HarnessError::io(format!(
        "creating {}",
        image_dir.display()
    )))?;
    let lock_path = image_dir.join(".build.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(HarnessError::io(format!("opening {}", lock_path.display())))?;
    let _built = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| HarnessError::io(format!("locking {}", lock_path.display()))(e.into()))?;
    if let Ok(a) = Artifacts::load(image_dir) {
        // Rebuilt when machined changed since: a test must never boot a stale binary.
        let newer = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let fresh = matches!((newer(machined), newer(&a.rootfs)), (Some(m), Some(r)) if m <= r);
        if a.uki_a.is_file() && a.uki_b.is_file() && fresh && a.secureboot.is_some() {
            return Ok(a);
        }
    }
    let keys = image_keys(image_dir)?;
    let cache_dir = image_dir.join("cache");
    Ok(imager::build(&imager::BuildOptions {
        out_dir: image_dir.to_path_buf(),
        cache_dir,
        machined: machined.to_path_buf(),
        version: version.into(),
        kernel_package: None,
        extra_cmdline: Vec::new(),
        filler_bytes: 0,
        secureboot: Some(keys),
        initramfs_ballast: None,
        extension_level: upgrade::extension::LEVEL,
    })?)
}
