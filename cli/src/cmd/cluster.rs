//! `plinth cluster create/destroy`: local nodes, in QEMU with OVMF or simulated.
//!
//! One node by default (standalone, as before clusters); with `--control-planes M
//! --workers W`, a cluster from `generate_cluster`: in QEMU, every node also on one private
//! network (QEMU's multicast socket on the host's loopback, the guests' eth1 at 10.5.0.2, ...),
//! the control planes with the etcd extension signed by the cluster's own key; with
//! `--simulated`, `machined --platform sim` processes on 127.0.0.1 (seconds, no root), the
//! control planes running the host's etcd. Launching is the provisioning crate's, which the
//! tests use too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use clap::Subcommand;
use config::{ClientConfig, MachineType, NodeConfig};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use provision::node::{ensure_artifacts, prepare, wait_for_version, NodeSpec, Preset};
use provision::qemu::{free_port, process_runs, Lan};
use serde::{Deserialize, Serialize};

use crate::connect::Target;

#[derive(Subcommand, Debug)]
pub enum Cluster {
    /// Boot nodes (one by default, in QEMU, building the image if needed) and make their
    /// context the current one.
    Create(CreateArgs),
    /// Stop the cluster's nodes and remove their files.
    Destroy {
        /// Cluster name.
        #[arg(long)]
        name: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Cluster name (and the node's, for a single node).
    #[arg(long)]
    name: String,
    /// Control-plane nodes (etcd members): a cluster instead of one node. One when not given
    /// with --workers or --simulated (as `talosctl cluster create` does).
    #[arg(long)]
    control_planes: Option<usize>,
    /// Worker nodes.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Simulated nodes (`machined --platform sim`, from --machined or the machined beside this
    /// plinth) instead of QEMU VMs: seconds to start, no root, the host's etcd on control planes.
    #[arg(long)]
    simulated: bool,
    /// Where the built image is (built there if missing). QEMU only.
    #[arg(long, default_value = "out")]
    image_dir: PathBuf,
    /// The machined binary: static for QEMU (default: built from this workspace), with the
    /// simulated machine for --simulated (default: the one beside this plinth).
    #[arg(long)]
    machined: Option<PathBuf>,
    /// Guest memory in MiB. QEMU only.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// How long to wait for each node's API, in seconds.
    #[arg(long, default_value_t = 300)]
    wait: u64,
}

/// A node of a running cluster.
#[derive(Serialize, Deserialize, Debug)]
struct Member {
    name: String,
    pid: u32,
    endpoint: String,
    console: PathBuf,
    /// etcd's client URL on the host (a control plane in QEMU: its port 2379 forwarded), for
    /// Debian's etcdctl with the etcd certificates of the node's config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd: Option<String>,
}

/// What a running cluster leaves behind, to find it again.
#[derive(Serialize, Deserialize, Debug, Default)]
struct State {
    #[serde(default)]
    nodes: Vec<Member>,
    #[serde(default)]
    simulated: bool,
    /// A single node's QEMU, as clusters made before multi-node ones recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

impl State {
    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.pid).chain(self.pid).collect()
    }
}

fn clusters_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".plinth/clusters")
}

fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).ok()?).ok()
}

/// Records a node as soon as it has started, so that `destroy` (or a failed create) finds it.
fn record(dir: &Path, simulated: bool, member: &Member) -> anyhow::Result<()> {
    let mut state = read_state(dir).unwrap_or_default();
    state.simulated = simulated;
    state.nodes.push(Member {
        name: member.name.clone(),
        pid: member.pid,
        endpoint: member.endpoint.clone(),
        console: member.console.clone(),
        etcd: member.etcd.clone(),
    });
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&state)?)?;
    Ok(())
}

pub async fn run(target: &Target, c: Cluster) -> anyhow::Result<()> {
    match c {
        Cluster::Create(args) => create(target, args).await,
        Cluster::Destroy { name } => destroy(&name).await,
    }
}

/// The cluster's own signing key, trusted by its nodes: `plinth upgrade` works from the start
/// with bundles (and extensions) signed by it. Returns it and its public half (hex).
fn signing_key(dir: &Path) -> anyhow::Result<(upgrade::bundle::SigningKey, PathBuf, String)> {
    let key = upgrade::bundle::generate_key()?;
    let key_path = dir.join("signing.key");
    config::client::write_private(&key_path, upgrade::bundle::key_to_pem(&key)?.as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    let public = upgrade::bundle::public_hex(&key.verifying_key());
    std::fs::write(dir.join("signing.pub"), format!("{public}\n"))?;
    Ok((key, key_path, public))
}

async fn create(target: &Target, args: CreateArgs) -> anyhow::Result<()> {
    let name = args.name.clone();
    let mut args = args;
    let cps = args
        .control_planes
        .unwrap_or(usize::from(args.workers > 0 || args.simulated));
    args.control_planes = Some(cps);
    if cps == 0 && args.workers > 0 {
        bail!("a cluster needs at least one control plane (--control-planes): its etcd runs there");
    }
    let dir = clusters_dir().join(&name);
    if let Some(s) = read_state(&dir).filter(|s| s.pids().into_iter().any(process_runs)) {
        bail!(
            "cluster {name:?} is already running (pids {:?}): run `plinth cluster destroy --name {name}` first",
            s.pids()
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (key, key_path, public) = signing_key(&dir)?;
    let made = if args.simulated {
        simulated(&args, &dir, &public).await
    } else if cps == 0 {
        vec_of_one(&args, &dir, &public).await
    } else {
        in_qemu(&args, &dir, (&key, &public)).await
    };
    let (members, client) = match made {
        Ok(m) => m,
        Err(e) => {
            // What was started is recorded as it starts: stop it rather than leave it running.
            let _ = destroy(&name).await;
            return Err(e.context(format!(
                "creating cluster {name:?} (what had started is stopped)"
            )));
        }
    };
    let state = State {
        nodes: members,
        simulated: args.simulated,
        pid: None,
    };
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&state)?)?;
    let path = target.config_path();
    let mut merged = ClientConfig::load_or_default(&path)?;
    merged.merge(client);
    merged.save(&path)?;
    eprintln!(
        "merged context {name:?} ({} node(s)) into {} and made it current",
        state.nodes.len(),
        path.display()
    );
    if cps > 0 {
        eprintln!(
            "next: plinth bootstrap (on the context's first node, {}), then plinth health --wait-timeout 5m",
            state.nodes[0].name
        );
    }
    if !args.simulated {
        eprintln!(
            "its nodes trust bundles signed with {}: plinth image bundle --key {} -o bundle.plinth",
            key_path.display(),
            key_path.display()
        );
    }
    Ok(())
}

/// One standalone node in QEMU (no cluster), as `plinth cluster create` always made.
async fn vec_of_one(
    args: &CreateArgs,
    dir: &Path,
    public: &str,
) -> anyhow::Result<(Vec<Member>, ClientConfig)> {
    let artifacts = artifacts(args)?;
    let node = prepare(
        &NodeSpec {
            name: args.name.clone(),
            dir: dir.to_path_buf(),
            image_dir: args.image_dir.clone(),
            memory_mb: args.memory,
            services: Vec::new(),
            trusted_keys: vec![public.into()],
            extensions: Vec::new(),
            containers: Vec::new(),
            forwards: Vec::new(),
            preset: None,
            lan: None,
        },
        &artifacts,
    )?;
    let member = boot_vms(std::slice::from_ref(&node), dir, args.wait)
        .await?
        .remove(0);
    Ok((vec![member], node.client))
}

fn artifacts(args: &CreateArgs) -> anyhow::Result<imager::Artifacts> {
    Ok(match imager::Artifacts::load(&args.image_dir) {
        Ok(a) => a,
        Err(_) => {
            eprintln!("no image in {}: building it", args.image_dir.display());
            let m = super::image::machined(args.machined.clone())?;
            ensure_artifacts(&args.image_dir, &m, env!("CARGO_PKG_VERSION"))?
        }
    })
}

/// Boots the prepared nodes' VMs all at once, waits for each one's API, and leaves QEMU
/// running. Each is recorded in the cluster's `dir` as it starts, so that `destroy` finds it
/// even if this process is killed while they boot.
async fn boot_vms(
    nodes: &[provision::node::PreparedNode],
    dir: &Path,
    wait: u64,
) -> anyhow::Result<Vec<Member>> {
    let mut started = Vec::new();
    for node in nodes {
        let vm = node.boot()?;
        let member = Member {
            name: node.spec.name.clone(),
            // Never 0: destroy would signal its own process group.
            pid: vm.pid().context("QEMU started without a process id")?,
            endpoint: node.endpoint(),
            console: vm.serial.path().to_path_buf(),
            etcd: node
                .forwarded(ETCD_CLIENT_PORT)
                .map(|p| format!("https://127.0.0.1:{p}")),
        };
        record(dir, false, &member)?;
        eprintln!(
            "booting {} in QEMU (OVMF, TCG): API on {}{}, console in {}",
            member.name,
            member.endpoint,
            member
                .etcd
                .as_ref()
                .map(|e| format!(", etcd clients on {e}"))
                .unwrap_or_default(),
            member.console.display()
        );
        started.push((vm, member));
    }
    let mut members = Vec::new();
    for ((mut vm, member), node) in started.into_iter().zip(nodes) {
        let ctx = node.context()?.clone();
        let (version, after) =
            wait_for_version(&mut vm, &node.endpoint(), &ctx, Duration::from_secs(wait))
                .await
                .with_context(|| format!("{} did not answer", member.name))?;
        vm.detach();
        eprintln!(
            "{} is up after {:.1}s: Plinth {} from slot {}",
            member.name,
            after.as_secs_f64(),
            version.version,
            version.slot
        );
        members.push(member);
    }
    Ok(members)
}

/// etcd's client port on a control plane.
const ETCD_CLIENT_PORT: u16 = 2379;

/// The nodes' names and roles: control planes first.
fn roles(args: &CreateArgs) -> Vec<(String, MachineType)> {
    (0..args.control_planes.unwrap_or(0))
        .map(|i| (format!("cp-{}", i + 1), MachineType::Controlplane))
        .chain((0..args.workers).map(|i| (format!("worker-{}", i + 1), MachineType::Worker)))
        .collect()
}

/// A cluster in QEMU: every node on one private network too, the control planes with the
/// etcd extension (Debian's etcd and etcdctl, signed with the cluster's key).
async fn in_qemu(
    args: &CreateArgs,
    dir: &Path,
    (key, public): (&upgrade::bundle::SigningKey, &str),
) -> anyhow::Result<(Vec<Member>, ClientConfig)> {
    let artifacts = artifacts(args)?;
    eprintln!("packing the etcd extension from Debian's etcd-server and etcd-client");
    let opts = imager::extension::ExtensionOptions {
        name: "etcd".into(),
        version: "3.4".into(),
        dir: None,
        debs: imager::extension::ETCD_DEBS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        programs: imager::extension::ETCD_PROGRAMS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        cache: args.image_dir.join("cache"),
        staging: dir.join("etcd.staging"),
        level: upgrade::extension::LEVEL,
    };
    let (bytes, _) = imager::extension::build(&opts, key)?;
    let ext = dir.join("etcd.ext");
    std::fs::write(&ext, bytes)?;
    let roles = roles(args);
    let ports = roles
        .iter()
        .map(|_| free_port())
        .collect::<Result<Vec<_>, _>>()?;
    let nodes: Vec<ClusterNode> = roles
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, ((name, kind), port))| ClusterNode {
            name: name.clone(),
            machine_type: *kind,
            address: format!("10.5.0.{}/24", i + 2),
            endpoint: format!("127.0.0.1:{port}"),
            etcd_ports: (ETCD_CLIENT_PORT, 2380),
        })
        .collect();
    let generated = generate_cluster(&ClusterOptions {
        cluster: args.name.clone(),
        nodes,
        interface: "eth1".into(),
        gateway: None,
        trusted_keys: vec![public.into()],
    })?;
    let lan = free_port()?;
    let mut prepared = Vec::new();
    for (i, cfg) in generated.nodes.iter().enumerate() {
        let mut cfg: NodeConfig = cfg.clone();
        // The API's way in: QEMU's user network on eth0, forwarded from the host.
        cfg.machine
            .network
            .interfaces
            .insert(0, provision::node::user_network_interface());
        let name = cfg.machine.name.clone();
        let cp = cfg.machine.machine_type == MachineType::Controlplane;
        prepared.push(prepare(
            &NodeSpec {
                name: name.clone(),
                dir: dir.join(&name),
                image_dir: args.image_dir.clone(),
                memory_mb: args.memory,
                services: Vec::new(),
                trusted_keys: Vec::new(),
                extensions: if cp { vec![ext.clone()] } else { Vec::new() },
                containers: Vec::new(),
                // For etcdctl on the host (etcd listens on all the node's addresses).
                forwards: if cp {
                    vec![ETCD_CLIENT_PORT]
                } else {
                    Vec::new()
                },
                preset: Some(Preset {
                    api_port: ports[i],
                    node: cfg,
                    client: generated.client.clone(),
                }),
                lan: Some(Lan {
                    port: lan,
                    mac: format!("52:54:00:12:35:{:02x}", i + 2),
                }),
            },
            &artifacts,
        )?);
    }
    Ok((boot_vms(&prepared, dir, args.wait).await?, generated.client))
}

/// A cluster of simulated machines on 127.0.0.1.
async fn simulated(
    args: &CreateArgs,
    dir: &Path,
    public: &str,
) -> anyhow::Result<(Vec<Member>, ClientConfig)> {
    let machined = match &args.machined {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("machined"),
    };
    if !machined.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p machined` (its simulated machine), or pass --machined",
            machined.display()
        );
    }
    let roles = roles(args);
    if roles.is_empty() {
        bail!("--simulated makes a cluster: say how many with --control-planes (and --workers)");
    }
    let free = || free_port().map_err(anyhow::Error::from);
    let mut nodes = Vec::new();
    for (name, kind) in &roles {
        let etcd_ports = if *kind == MachineType::Controlplane {
            (free()?, free()?)
        } else {
            (2379, 2380)
        };
        nodes.push(ClusterNode {
            name: name.clone(),
            machine_type: *kind,
            address: "127.0.0.1/8".into(),
            endpoint: format!("127.0.0.1:{}", free()?),
            etcd_ports,
        });
    }
    let generated = generate_cluster(&ClusterOptions {
        cluster: args.name.clone(),
        nodes: nodes.clone(),
        interface: "eth0".into(),
        gateway: None,
        trusted_keys: vec![public.into()],
    })?;
    let ctx = generated.client.context(None)?.1.clone();
    let mut members = Vec::new();
    for (cfg, node) in generated.nodes.iter().zip(&nodes) {
        let node_dir = dir.join(&node.name);
        std::fs::create_dir_all(&node_dir)?;
        let machine = provision::sim::provision_machine(
            &node_dir,
            Some(&cfg.to_yaml()?),
            &[],
            provision::sim::SLOT_BYTES,
        )?;
        if node.machine_type == MachineType::Controlplane
            && provision::sim::link_host_etcd(&machine)?.is_none()
        {
            eprintln!("warning: no etcd on this machine's PATH (apt-get install etcd-server etcd-client): {} will say it is missing", node.name);
        }
        let console = node_dir.join("console.log");
        let child = provision::sim::launch(&provision::sim::Launch {
            machined: machined.clone(),
            machine,
            api: node.endpoint.clone(),
            console: console.clone(),
            env: Vec::new(),
            detached: true,
            wrapper: Vec::new(),
        })?;
        let member = Member {
            name: node.name.clone(),
            pid: child.id(),
            endpoint: node.endpoint.clone(),
            console,
            etcd: (node.machine_type == MachineType::Controlplane)
                .then(|| format!("https://127.0.0.1:{}", node.etcd_ports.0)),
        };
        record(dir, true, &member)?;
        members.push(member);
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    for m in &members {
        loop {
            if let Ok(mut c) = api::client::connect_context(&m.endpoint, &ctx).await {
                if c.version(api::proto::VersionRequest {}).await.is_ok() {
                    eprintln!(
                        "{} answers on {} (simulated, console in {})",
                        m.name,
                        m.endpoint,
                        m.console.display()
                    );
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer within {}s: see {}",
                    m.name,
                    args.wait,
                    m.console.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok((members, generated.client))
}

/// Processes whose command line names a path under `dir`.
fn running_from(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Removes the socket directories of the VMs under the cluster's `dir` (they are elsewhere:
/// `sun_path` is short): a node's VM is in `<cluster>/<node>/vm`, a single node's made before
/// clusters in `<cluster>/vm`.
fn remove_sockets(dir: &Path) {
    let vms = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("vm"))
        .chain([dir.join("vm")]);
    for vm in vms.filter(|v| v.is_dir()) {
        for sockets in provision::qemu::socket_dirs(&vm) {
            if let Err(e) = std::fs::remove_dir_all(&sockets) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("warning: removing {}: {e}", sockets.display());
                }
            }
        }
    }
}

async fn destroy(name: &str) -> anyhow::Result<()> {
    let dir = clusters_dir().join(name);
    let Some(state) = read_state(&dir) else {
        if dir.exists() {
            remove_sockets(&dir);
            std::fs::remove_dir_all(&dir)?;
            eprintln!("removed {}", dir.display());
            return Ok(());
        }
        bail!("no cluster named {name:?} (looked in {})", dir.display());
    };
    // SIGTERM to all at once (a simulated machine powers off with its services, QEMU ends),
    // then SIGKILL to what is left after 15 s.
    let pids: Vec<u32> = state
        .pids()
        .into_iter()
        .filter(|&p| process_runs(p))
        .collect();
    for &pid in &pids {
        let _ = kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&p| process_runs(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for &pid in pids.iter().filter(|&&p| process_runs(p)) {
        let _ = kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL);
    }
    // A simulated machine killed that way leaves its services (etcd) running in their own
    // process groups: anything still running from the cluster's directory goes too.
    for pid in running_from(&dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    remove_sockets(&dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    eprintln!("destroyed cluster {name} ({} node(s))", state.pids().len());
    Ok(())
}
