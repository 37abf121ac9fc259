//! Simulated machines: a directory provisioned with slot A installed and a node config on
//! STATE, run by `machined --platform sim` with its API on 127.0.0.1. Seconds to start, no
//! root, no VM: how `plinth cluster create --simulated` and the scenario tests run many nodes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use phases::platform::sim::provision::{provision, SimImage};

use crate::HarnessError;

/// The simulated image's version (slot A at first power-on).
pub const VERSION: &str = "1.0-sim";
/// Each simulated slot's size: room for a simulated image and then some.
pub const SLOT_BYTES: u64 = 16 << 20;

/// A machine's directory, as `machined --platform sim --machine` takes it.
pub fn machine_dir(node_dir: &Path) -> PathBuf {
    node_dir.join("machine")
}

/// Provisions a machine under `node_dir`: slot A of [`VERSION`] installed, `config_yaml` on
/// STATE (none: the node starts in maintenance mode), extra kernel arguments in its UKI.
pub fn provision_machine(
    node_dir: &Path,
    config_yaml: Option<&str>,
    extra_cmdline: &[String],
    slot_bytes: u64,
) -> Result<PathBuf, HarnessError> {
    let machine = machine_dir(node_dir);
    let image = SimImage {
        version: VERSION.into(),
        extra_cmdline: extra_cmdline.to_vec(),
        payload_bytes: 0,
    };
    provision(&machine, &image, config_yaml, slot_bytes)
        .map_err(|e| HarnessError::Other(format!("provisioning {}: {e}", machine.display())))?;
    Ok(machine)
}

/// Gives a machine the host's etcd and etcdctl (Debian's) as its `/usr/local/bin`, standing in
/// for the etcd extension (the simulated machine activates no extensions). `None` when the
/// host has no etcd.
pub fn link_host_etcd(machine: &Path) -> Result<Option<PathBuf>, HarnessError> {
    let Some(etcd) = host_program("etcd") else {
        return Ok(None);
    };
    let bin = machine.join("usr-local/bin");
    std::fs::create_dir_all(&bin)
        .map_err(HarnessError::io(format!("creating {}", bin.display())))?;
    for (program, found) in [
        ("etcd", Some(etcd.clone())),
        ("etcdctl", host_program("etcdctl")),
    ] {
        if let Some(found) = found {
            let link = bin.join(program);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&found, &link)
                .map_err(HarnessError::io(format!("linking {}", link.display())))?;
        }
    }
    Ok(Some(etcd))
}

/// A program on the host's `PATH`.
pub fn host_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// How to start a simulated machine.
#[derive(Debug, Clone)]
pub struct Launch {
    /// A `machined` built with the `sim` feature (a workspace's debug build is).
    pub machined: PathBuf,
    /// The machine directory.
    pub machine: PathBuf,
    /// Where its API listens (`127.0.0.1:PORT`).
    pub api: String,
    /// Its console (appended to).
    pub console: PathBuf,
    /// Environment for it (fault injection, for tests).
    pub env: Vec<(String, String)>,
    /// In a process group of its own, so it outlives the caller's terminal (a cluster made by
    /// the CLI); a test's machines stay in the test's.
    pub detached: bool,
    /// A program and its arguments to run machined under (valgrind, for a test), if any.
    pub wrapper: Vec<String>,
}

/// Starts the machine's machined. SIGTERM to it powers the machine off, its services with it.
pub fn launch(l: &Launch) -> Result<Child, HarnessError> {
    use std::os::unix::process::CommandExt;
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&l.console)
        .map_err(HarnessError::io(format!("opening {}", l.console.display())))?;
    let err = console
        .try_clone()
        .map_err(HarnessError::io("opening the console"))?;
    let mut cmd = match l.wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&l.machined);
            c
        }
        None => Command::new(&l.machined),
    };
    cmd.args(["--platform", "sim", "--machine"])
        .arg(&l.machine)
        .args(["--api", &l.api])
        .envs(l.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(err);
    if l.detached {
        cmd.process_group(0);
    }
    cmd.spawn().map_err(HarnessError::io(format!(
        "starting {}",
        l.machined.display()
    )))
}
