//! `plinth cluster create/destroy`: a local node in QEMU with OVMF.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use config::ClientConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use vm_tests::node::{ensure_artifacts, prepare, wait_for_version, NodeSpec};

use crate::connect::Target;

#[derive(Subcommand, Debug)]
pub enum Cluster {
    /// Boot a node in QEMU (building the image if needed) and make it the current context.
    Create {
        /// Cluster (and node) name.
        #[arg(long)]
        name: String,
        /// Where the built image is (built there if missing).
        #[arg(long, default_value = "out")]
        image_dir: PathBuf,
        /// The static machined binary (default: built from this workspace).
        #[arg(long)]
        machined: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// How long to wait for the node's API, in seconds.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Stop the cluster's VM and remove its files.
    Destroy {
        /// Cluster name.
        #[arg(long)]
        name: String,
    },
}

/// What a running cluster leaves behind, to find it again.
#[derive(Serialize, Deserialize, Debug)]
struct State {
    pid: u32,
    endpoint: String,
    console: PathBuf,
}

fn clusters_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".plinth/clusters")
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok())
}

fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).ok()?).ok()
}

pub async fn run(target: &Target, c: Cluster) -> anyhow::Result<()> {
    match c {
        Cluster::Create {
            name,
            image_dir,
            machined,
            memory,
            wait,
        } => {
            let dir = clusters_dir().join(&name);
            if let Some(s) = read_state(&dir).filter(|s| alive(s.pid)) {
                bail!("cluster {name:?} is already running (QEMU pid {}): run `plinth cluster destroy --name {name}` first", s.pid);
            }
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing stale {}", dir.display()))?;
            }
            let artifacts = match imager::Artifacts::load(&image_dir) {
                Ok(a) => a,
                Err(_) => {
                    eprintln!("no image in {}: building it", image_dir.display());
                    let m = super::image::machined(machined)?;
                    ensure_artifacts(&image_dir, &m, env!("CARGO_PKG_VERSION"))?
                }
            };
            // The cluster's own signing key, trusted by its node: `plinth upgrade` works from
            // the start with bundles signed by it.
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = upgrade::bundle::generate_key()?;
            let key_path = dir.join("signing.key");
            config::client::write_private(&key_path, upgrade::bundle::key_to_pem(&key)?.as_bytes())
                .with_context(|| format!("writing {}", key_path.display()))?;
            let public = upgrade::bundle::public_hex(&key.verifying_key());
            std::fs::write(dir.join("signing.pub"), format!("{public}\n"))?;
            let node = prepare(
                &NodeSpec {
                    name: name.clone(),
                    dir: dir.clone(),
                    image_dir,
                    memory_mb: memory,
                    services: Vec::new(),
                    trusted_keys: vec![public],
                    extensions: Vec::new(),
                    containers: Vec::new(),
                    forwards: Vec::new(),
                },
                &artifacts,
            )?;
            let mut vm = node.boot()?;
            let console = vm.serial.path().to_path_buf();
            eprintln!(
                "booting node {name} in QEMU (OVMF, TCG): API on {}, console in {}",
                node.endpoint(),
                console.display()
            );

            let path = target.config_path();
            let mut client = ClientConfig::load_or_default(&path)?;
            client.merge(node.client.clone());
            client.save(&path)?;
            eprintln!(
                "merged context {name:?} into {} and made it current",
                path.display()
            );

            let ctx = node.context()?.clone();
            let (version, after) =
                wait_for_version(&mut vm, &node.endpoint(), &ctx, Duration::from_secs(wait))
                    .await?;
            let pid = vm.detach().unwrap_or_default();
            let state = State {
                pid,
                endpoint: node.endpoint(),
                console,
            };
            std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&state)?)?;
            eprintln!(
                "node {name} is up after {:.1}s: Plinth {} from slot {}",
                after.as_secs_f64(),
                version.version,
                version.slot
            );
            eprintln!(
                "it trusts bundles signed with {}: plinth image bundle --key {} -o bundle.plinth",
                key_path.display(),
                key_path.display()
            );
            Ok(())
        }
        Cluster::Destroy { name } => {
            let dir = clusters_dir().join(&name);
            let Some(state) = read_state(&dir) else {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                    eprintln!("removed {}", dir.display());
                    return Ok(());
                }
                bail!("no cluster named {name:?} (looked in {})", dir.display());
            };
            if alive(state.pid) {
                let pid = Pid::from_raw(i32::try_from(state.pid)?);
                let _ = kill(pid, Signal::SIGTERM);
                for _ in 0..50 {
                    if !alive(state.pid) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if alive(state.pid) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            eprintln!("destroyed cluster {name}");
            Ok(())
        }
    }
}
