//! etcd on a control-plane node: started by machined as the service `etcd` (from the etcd
//! extension's program), its data on EPHEMERAL.
//!
//! At boot a control plane with etcd data restarts its member. One without waits: it looks
//! for a cluster on the other control planes every few seconds and joins it as a learner
//! (promoted once caught up), or is told to start a new one by `plinth bootstrap`. Which of
//! them happens is decided under one lock ([`EtcdState`]), so a bootstrap and a join can
//! never both start a member.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use config::node::{MachineType, NodeConfig};
use config::{RestartPolicy, Service};
use etcd::{Credentials, Etcd, Member, PkiFiles, Start};
use sequencer::EventKind;

use crate::runtime::Runtime;
use crate::services::{Probe, Run, Unit};

/// The service's name.
pub const SERVICE: &str = "etcd";

/// Where this node's etcd stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EtcdState {
    /// Not a control plane (or not booted that far).
    #[default]
    Off,
    /// A control plane without etcd data: waiting for `plinth bootstrap` or a cluster to join.
    Waiting,
    /// Its member has been started (bootstrapped, joined or restarted).
    Started,
}

/// Why `plinth bootstrap` was refused.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A worker or a standalone node runs no etcd.
    #[error("this node is a {0}: only a control-plane node runs etcd")]
    NotControlPlane(&'static str),
    /// Not booted that far.
    #[error("the node is not ready to bootstrap: {0}")]
    NotReady(String),
    /// There is a cluster already.
    #[error("etcd is already bootstrapped here: {0}")]
    AlreadyBootstrapped(String),
    /// Writing the member's files failed.
    #[error("starting etcd: {0}")]
    Failed(String),
}

/// This node's member and machined's credentials, if the config makes it a control plane.
fn member(rt: &Runtime, cfg: &NodeConfig) -> Result<Option<(Member, Credentials)>, String> {
    let Some(cluster) = cfg.cluster.as_ref() else {
        return Ok(None);
    };
    if cfg.machine.machine_type != MachineType::Controlplane {
        return Ok(None);
    }
    let host = |p: &str| rt.platform.host_path(Path::new(p));
    let m = Member::of(
        &cfg.machine.name,
        cluster,
        &host(etcd::DATA_DIR),
        PkiFiles::under(&host(etcd::PKI_DIR)),
    )
    .map_err(|e| e.to_string())?;
    Ok(Some((m, Credentials::of(cluster))))
}

/// Whether etcd has data on this node (a member was started here before).
fn has_data(rt: &Runtime) -> bool {
    rt.platform
        .list_dir(&Path::new(etcd::DATA_DIR).join("member"))
        .is_ok_and(|names| !names.is_empty())
}

/// The member's certificate files, written from the config (on a tmpfs).
fn write_pki(rt: &Runtime, cfg: &NodeConfig) -> Result<(), String> {
    let Some(c) = cfg.cluster.as_ref() else {
        return Ok(());
    };
    let Some(member) = c.etcd.member.as_ref() else {
        return Ok(());
    };
    let files = PkiFiles::under(Path::new(etcd::PKI_DIR));
    let w = |p: &Path, data: &str| {
        rt.platform
            .write(p, data.as_bytes())
            .map_err(|e| e.to_string())
    };
    rt.platform
        .mkdir_all(Path::new(etcd::PKI_DIR))
        .map_err(|e| e.to_string())?;
    w(&files.ca, &c.etcd.ca)?;
    w(&files.cert, &member.cert)?;
    w(&files.key, &member.key)
}

/// The service for this member, started as `start` says: restarted whatever its exit, healthy
/// when a quorum read through its own client URL answers.
fn unit(member: &Member, credentials: &Credentials, start: &Start) -> Unit {
    let mut command = vec![etcd::PROGRAM.to_string()];
    command.extend(member.args(start));
    Unit {
        service: Service {
            name: SERVICE.into(),
            command,
            environment: Vec::new(),
            depends_on: Vec::new(),
            restart: RestartPolicy::Always,
            // etcd syncs its WAL and leaves the raft group's leadership in order.
            stop_timeout_s: 15,
            health: None,
        },
        probe: Probe::Etcd {
            endpoint: member.me.client_url(),
            credentials: credentials.clone(),
        },
        run: Run::Process,
    }
}

fn event(rt: &Runtime, state: &str, message: impl Into<String>) {
    rt.bus.publish(
        EventKind::Service {
            service: SERVICE.into(),
            state: state.into(),
            message: message.into(),
        },
        None,
    );
}

/// At boot, on a control plane: restarts the member that has data here, or starts waiting
/// for a bootstrap or a cluster to join. Returns the unit to start with the other services,
/// if there is one now.
pub async fn at_boot(rt: &Arc<Runtime>, cfg: &NodeConfig) -> Result<Option<Unit>, String> {
    let Some((member, credentials)) = member(rt, cfg)? else {
        return Ok(None);
    };
    rt.platform
        .mkdir_all(Path::new(etcd::DATA_DIR))
        .map_err(|e| e.to_string())?;
    write_pki(rt, cfg)?;
    let mut state = rt.etcd.lock().await;
    if has_data(rt) {
        *state = EtcdState::Started;
        return Ok(Some(unit(&member, &credentials, &Start::Restart)));
    }
    *state = EtcdState::Waiting;
    drop(state);
    let message = "no etcd data here: run `plinth bootstrap` on one control plane to start the cluster (a cluster found on the other control planes is joined without it)";
    tracing::info!("etcd: {message}");
    event(rt, "waiting", message);
    spawn_join(rt.clone(), member, credentials, cfg.clone());
    Ok(None)
}

/// How often a waiting control plane looks for a cluster to join.
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// Looks for a cluster on the other control planes until one answers (then joins it) or this
/// node is bootstrapped.
fn spawn_join(rt: Arc<Runtime>, member: Member, credentials: Credentials, cfg: NodeConfig) {
    let weak = Arc::downgrade(&rt);
    drop(rt);
    tokio::spawn(async move {
        let Some(cluster) = cfg.cluster.as_ref() else {
            return;
        };
        let others: Vec<String> = cluster
            .controlplanes
            .iter()
            .filter(|m| m.name != member.name)
            .map(|m| m.client_url())
            .collect();
        if others.is_empty() {
            return;
        }
        loop {
            tokio::time::sleep(LOOK_EVERY).await;
            let Some(rt) = weak.upgrade() else { return };
            if *rt.etcd.lock().await != EtcdState::Waiting {
                return;
            }
            // A cluster exists when its members answer a quorum read (until it has been
            // healthy a few seconds etcd refuses new members, and the next round tries again).
            let Ok(etcd) = Etcd::connect(&others, &credentials).await else {
                continue;
            };
            if etcd.check_quorum().await.is_err() {
                continue;
            }
            // Decided under the lock: a bootstrap in the meantime wins.
            let mut state = rt.etcd.lock().await;
            if *state != EtcdState::Waiting {
                return;
            }
            let joined = match etcd.join(&member.name, &member.me.peer_url()).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::info!("etcd: joining the cluster: {e} (trying again)");
                    continue;
                }
            };
            event(
                &rt,
                "joining",
                format!("added to the cluster as learner {:x}", joined.id),
            );
            rt.services
                .start(&[unit(&member, &credentials, &Start::Join(joined.initial))]);
            *state = EtcdState::Started;
            drop(state);
            promote(&rt, &etcd, joined.id).await;
            return;
        }
    });
}

/// Promotes the learner once it has caught up (etcd refuses before), then says so.
async fn promote(rt: &Runtime, etcd: &Etcd, id: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        match etcd.promote(id).await {
            Ok(()) => {
                event(
                    rt,
                    "running",
                    format!("promoted to a voting member ({id:x})"),
                );
                return;
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                tracing::warn!("etcd: learner {id:x} not promoted after 600 s: {e}");
                event(rt, "failed", format!("learner {id:x} not promoted: {e}"));
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// `plinth bootstrap`: starts a new one-member cluster on this control plane.
pub async fn bootstrap(rt: &Arc<Runtime>) -> Result<(), BootstrapError> {
    let cfg = rt
        .config()
        .ok_or_else(|| BootstrapError::NotReady("no node config loaded".into()))?;
    let kind = cfg.machine.machine_type;
    let (member, credentials) = match member(rt, &cfg) {
        Ok(Some(m)) => m,
        Ok(None) => return Err(BootstrapError::NotControlPlane(kind.as_str())),
        Err(e) => return Err(BootstrapError::NotReady(e)),
    };
    let mut state = rt.etcd.lock().await;
    match *state {
        EtcdState::Off => {
            return Err(BootstrapError::NotReady(
                "the boot has not reached etcd yet".into(),
            ))
        }
        EtcdState::Started => {
            return Err(BootstrapError::AlreadyBootstrapped(
                "its member runs (bootstrapped, joined, or restarted from its data)".into(),
            ))
        }
        EtcdState::Waiting => {}
    }
    if has_data(rt) {
        return Err(BootstrapError::AlreadyBootstrapped(format!(
            "{} holds data",
            etcd::DATA_DIR
        )));
    }
    rt.services
        .start(&[unit(&member, &credentials, &Start::New)]);
    *state = EtcdState::Started;
    drop(state);
    event(rt, "starting", "bootstrapped: a new one-member cluster");
    Ok(())
}
