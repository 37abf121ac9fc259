//! etcd on a control-plane node: started by machined as the service `etcd` (from the etcd
//! extension's program), its data on EPHEMERAL.
//!
//! At boot a control plane with etcd data restarts its member. One without waits: it looks
//! for a cluster on the other control planes every few seconds and joins it as a learner
//! (promoted once caught up), or is told to start a new one by `plinth bootstrap`. Which of
//! them happens is decided under one lock ([`EtcdState`]), so a bootstrap and a join can
//! never both start a member.

use std::path::{Path, PathBuf};
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
    /// It left the cluster (`plinth etcd leave`, a graceful reset): until the next boot it
    /// neither joins nor is bootstrapped.
    Left,
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
    #[error("etcd is already bootstrapped: {0}")]
    AlreadyBootstrapped(String),
    /// The snapshot to recover from is not one (too large, cut short, refused by etcdctl).
    #[error("the snapshot: {0}")]
    BadSnapshot(String),
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

/// Whether etcd has data on this node (a member was started here before). Read where etcd
/// reads it; only a missing or empty directory is "no data": a node that cannot tell must not
/// join again (that would remove its own live member).
fn has_data(rt: &Runtime) -> Result<bool, String> {
    let dir = rt
        .platform
        .host_path(&Path::new(etcd::DATA_DIR).join("member"));
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("reading {}: {e}", dir.display())),
    }
}

/// Whether the etcd extension's program is there.
fn has_program(rt: &Runtime) -> bool {
    rt.platform.host_path(Path::new(etcd::PROGRAM)).is_file()
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
    let data = match has_data(rt) {
        Ok(d) => d,
        Err(e) => {
            // Neither restarted nor joined: the node stays up to be looked at.
            let message = format!("etcd not started: cannot tell whether it has data: {e}");
            tracing::error!("{message}");
            event(rt, "failed", message);
            return Ok(None);
        }
    };
    if data {
        *state = EtcdState::Started;
        drop(state);
        // A learner whose promotion a reboot cut short is promoted now.
        spawn_promote(
            rt.clone(),
            member.clone(),
            credentials.clone(),
            others(cfg, &member),
            Some(cfg.clone()),
        );
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
        let others = others(&cfg, &member);
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
            if !has_program(&rt) {
                tracing::warn!("etcd: a cluster answers, but {} is missing: the etcd extension is not installed", etcd::PROGRAM);
                continue;
            }
            let joined = match etcd
                .join(&member.name, &member.me.peer_url(), &credentials)
                .await
            {
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
            spawn_promote(rt.clone(), member, credentials, others, None);
            return;
        }
    });
}

/// Every other control plane's client URL.
fn others(cfg: &NodeConfig, member: &Member) -> Vec<String> {
    cfg.cluster
        .iter()
        .flat_map(|c| c.controlplanes.iter())
        .filter(|m| m.name != member.name)
        .map(|m| m.client_url())
        .collect()
}

/// Promotes this node's member if the cluster lists it as a learner, once etcd accepts (it
/// refuses until the learner has caught up), however long that takes: a learner left as one
/// is unhealthy and keeps every other control plane from joining (etcd takes one learner at a
/// time). Ends when the member votes, or is not listed.
fn spawn_promote(
    rt: Arc<Runtime>,
    member: Member,
    credentials: Credentials,
    others: Vec<String>,
    rejoin: Option<NodeConfig>,
) {
    let weak = Arc::downgrade(&rt);
    drop(rt);
    if others.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let peer = member.me.peer_url();
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
            let Some(rt) = weak.upgrade() else { return };
            let Ok(etcd) = Etcd::connect(&others, &credentials).await else {
                continue;
            };
            let me = match etcd.find(&peer).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // Removed while this node was away (a leave cut short, a remove-member):
                    // etcd will not run a removed member, so the data goes and the node joins
                    // anew. Not while its own etcd answers: then it is alive somewhere.
                    if let Some(cfg) = rejoin {
                        if !Etcd::answers(&member.me.client_url(), &credentials).await {
                            start_over(&rt, member, credentials, cfg).await;
                        }
                    }
                    return;
                }
                Err(_) => continue,
            };
            if !me.learner {
                return;
            }
            if etcd.promote(me.id).await.is_ok() {
                event(
                    &rt,
                    "running",
                    format!("promoted to a voting member ({:x})", me.id),
                );
                return;
            }
        }
    });
}

/// This node's member is not in the cluster any more: its etcd stopped, its data deleted, and
/// it waits to join again.
async fn start_over(rt: &Arc<Runtime>, member: Member, credentials: Credentials, cfg: NodeConfig) {
    let mut state = rt.etcd.lock().await;
    if *state != EtcdState::Started {
        return;
    }
    rt.services.remove(SERVICE).await;
    let data = rt.platform.host_path(Path::new(etcd::DATA_DIR));
    if let Err(e) = remove_contents(data).await {
        tracing::error!("etcd: deleting the data of a removed member: {e}");
        event(rt, "failed", format!("this node's member was removed from the cluster, and its data could not be deleted: {e}"));
        return;
    }
    *state = EtcdState::Waiting;
    drop(state);
    event(
        rt,
        "waiting",
        "this node's member is no longer in the cluster: its data is deleted and it joins again",
    );
    spawn_join(rt.clone(), member, credentials, cfg);
}

/// Where an uploaded snapshot waits for `plinth bootstrap --recover-from` (EPHEMERAL).
pub const SNAPSHOT: &str = "/var/lib/etcd-recover/snapshot.db";
/// The largest snapshot taken: etcd's own ceiling for its database is 8 GiB.
pub const MAX_SNAPSHOT: u64 = 8 << 30;

/// One snapshot upload at a time.
static UPLOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keeps an uploaded snapshot for a recovering bootstrap: only on a control plane that waits
/// for its bootstrap (the checks [`bootstrap`] makes), bounded by [`MAX_SNAPSHOT`] and by
/// EPHEMERAL's free space, written beside its place and renamed there once whole.
pub async fn keep_snapshot(
    rt: &Arc<Runtime>,
    size: u64,
    snapshot: impl tokio::io::AsyncRead + Unpin,
) -> Result<u64, BootstrapError> {
    use tokio::io::AsyncWriteExt;
    // Checked under etcd's lock, which is not held while the bytes come (a stalled upload
    // must not stall the join and the other etcd calls); `bootstrap` checks again. One upload
    // at a time.
    {
        let state = rt.etcd.lock().await;
        ready_to_bootstrap(rt, &state).await?;
    }
    let _one = UPLOADING
        .try_lock()
        .map_err(|_| BootstrapError::NotReady("another snapshot upload is under way".into()))?;
    // The upload ends by itself when it stops: 60 s without a byte, or an hour in all.
    let mut snapshot = crate::upgrade::Deadlines::new(
        snapshot,
        "the snapshot upload",
        Duration::from_secs(60),
        Duration::from_secs(3600),
    );
    let path = rt.platform.host_path(Path::new(SNAPSHOT));
    let io = |e: std::io::Error| BootstrapError::NotReady(format!("writing {SNAPSHOT}: {e}"));
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let free = rt
        .platform
        .free_bytes(Path::new(crate::runtime::paths::EPHEMERAL))
        .map_err(|e| BootstrapError::NotReady(e.to_string()))?;
    let cap = MAX_SNAPSHOT.min(free);
    if size > cap {
        return Err(BootstrapError::BadSnapshot(format!(
            "{size} bytes: this node takes at most {cap} (etcd's ceiling, or EPHEMERAL's free space)"
        )));
    }
    let part = path.with_extension("part");
    let mut file = tokio::fs::File::create(&part).await.map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let copied: Result<(), BootstrapError> = async {
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut snapshot, &mut buf)
                .await
                .map_err(|e| BootstrapError::BadSnapshot(format!("the upload broke off: {e}")))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > cap {
                return Err(BootstrapError::BadSnapshot(format!(
                    "more than {cap} bytes (etcd's ceiling, or EPHEMERAL's free space)"
                )));
            }
            file.write_all(&buf[..n]).await.map_err(io)?;
        }
        if size != 0 && written != size {
            return Err(BootstrapError::BadSnapshot(format!(
                "{written} bytes arrived of the {size} announced"
            )));
        }
        file.sync_all().await.map_err(io)?;
        std::fs::rename(&part, &path).map_err(io)
    }
    .await;
    if let Err(e) = copied {
        // Up to gigabytes: not on the runtime's worker.
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    Ok(written)
}

/// What a bootstrap (and a snapshot upload for one) needs: a control plane that waits, with
/// no data, and no cluster answering on the other control planes. Returns its member.
async fn ready_to_bootstrap(
    rt: &Arc<Runtime>,
    state: &EtcdState,
) -> Result<(Member, Credentials, NodeConfig), BootstrapError> {
    let cfg = rt
        .config()
        .ok_or_else(|| BootstrapError::NotReady("no node config loaded".into()))?;
    let kind = cfg.machine.machine_type;
    let (member, credentials) = match member(rt, &cfg) {
        Ok(Some(m)) => m,
        Ok(None) => return Err(BootstrapError::NotControlPlane(kind.as_str())),
        Err(e) => return Err(BootstrapError::NotReady(e)),
    };
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
        EtcdState::Left => {
            return Err(BootstrapError::NotReady(
                "this node left the cluster: it joins again after a reboot".into(),
            ))
        }
        EtcdState::Waiting => {}
    }
    if has_data(rt).map_err(BootstrapError::NotReady)? {
        return Err(BootstrapError::AlreadyBootstrapped(format!(
            "{} holds data",
            etcd::DATA_DIR
        )));
    }
    if !has_program(rt) {
        return Err(BootstrapError::NotReady(format!(
            "{} is missing: the etcd extension is not installed",
            etcd::PROGRAM
        )));
    }
    // A cluster on the other control planes is joined, never split by a second one.
    let others = others(&cfg, &member);
    if let Ok(etcd) = Etcd::connect(&others, &credentials).await {
        let names: Vec<String> = etcd
            .members()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.name)
            .filter(|n| !n.is_empty())
            .collect();
        return Err(BootstrapError::AlreadyBootstrapped(format!(
            "the cluster's etcd answers on the other control planes (members {}): this node joins it by itself",
            names.join(", ")
        )));
    }
    Ok((member, credentials, cfg))
}

/// Restores the uploaded snapshot into the data directory with etcdctl, as a one-member
/// cluster of this node: into a directory beside the data, moved into place once whole, so a
/// failed restore leaves no data behind (the node still waits for a bootstrap).
async fn restore(rt: &Arc<Runtime>, member: &Member) -> Result<(), BootstrapError> {
    let host = |p: &str| rt.platform.host_path(Path::new(p));
    let snapshot = host(SNAPSHOT);
    if !snapshot.is_file() {
        return Err(BootstrapError::NotReady(
            "no snapshot was uploaded (plinth bootstrap --recover-from FILE uploads it)".into(),
        ));
    }
    if !host(etcd::CTL_PROGRAM).is_file() {
        return Err(BootstrapError::NotReady(format!(
            "{} is missing: the etcd extension is not installed",
            etcd::CTL_PROGRAM
        )));
    }
    let data = host(etcd::DATA_DIR);
    let scratch = data.join("restore");
    // A restore cut short left a whole data directory there: deleted on a blocking thread.
    let left = scratch.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(left)).await;
    let mut argv = vec![etcd::CTL_PROGRAM.to_string()];
    argv.extend(member.restore_args(&snapshot, &scratch));
    let log = Path::new("/run/plinth/etcd-restore.log");
    let run = async {
        let (pid, exit) = rt
            .reaper
            .spawn(|| rt.platform.spawn(&argv, &["ETCDCTL_API=3".into()], log))
            .map_err(|e| BootstrapError::NotReady(format!("starting etcdctl: {e}")))?;
        let exit = exit.await.map_err(|_| {
            BootstrapError::NotReady(format!("lost the exit of etcdctl (pid {pid})"))
        })?;
        if !exit.success() {
            let out = rt
                .platform
                .read(log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let last = out
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(BootstrapError::BadSnapshot(format!(
                "etcdctl snapshot restore: {exit}: {}",
                last.trim()
            )));
        }
        std::fs::rename(scratch.join("member"), data.join("member")).map_err(|e| {
            BootstrapError::NotReady(format!("moving the restored data into place: {e}"))
        })
    };
    let result = run.await;
    // Used, or refused by etcdctl: either way it is not kept (it takes EPHEMERAL's space).
    // Up to gigabytes each: deleted on a blocking thread.
    let used = matches!(result, Ok(()) | Err(BootstrapError::BadSnapshot(_)));
    let _ = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&scratch);
        if used {
            let _ = std::fs::remove_file(&snapshot);
        }
    })
    .await;
    result
}

/// `plinth bootstrap`: starts a new one-member cluster on this control plane, empty or (with
/// `recover`) from the uploaded snapshot.
pub async fn bootstrap(rt: &Arc<Runtime>, recover: bool) -> Result<(), BootstrapError> {
    // On a task of the node's: a caller that goes (the API's request deadline, a big restore)
    // does not stop a restore half-way; the caller gets its end if it is still there.
    let rt = rt.clone();
    tokio::spawn(async move { bootstrap_now(&rt, recover).await })
        .await
        .map_err(|e| BootstrapError::NotReady(format!("the bootstrap task: {e}")))?
}

async fn bootstrap_now(rt: &Arc<Runtime>, recover: bool) -> Result<(), BootstrapError> {
    let mut state = rt.etcd.lock().await;
    let (member, credentials, _) = ready_to_bootstrap(rt, &state).await?;
    let start = if recover {
        restore(rt, &member).await?;
        Start::Restart
    } else {
        Start::New
    };
    rt.services.start(&[unit(&member, &credentials, &start)]);
    *state = EtcdState::Started;
    Ok(())
}

/// Why leaving or removing a member was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// Not a control plane, or its member is not running here.
    #[error("{0}")]
    NotReady(String),
    /// The member named is this node's own (`leave` is for that), or alive on its node.
    #[error("{0}")]
    Own(String),
    /// No such member.
    #[error("no etcd member {0:x}")]
    NotFound(u64),
    /// etcd refused or did not answer.
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
}

/// This node's member, its credentials and every control plane's client URL; refused unless
/// the member has been started here.
async fn running_member(rt: &Runtime) -> Result<(Member, Credentials, Vec<String>), MemberError> {
    let cfg = rt
        .config()
        .ok_or_else(|| MemberError::NotReady("no node config loaded".into()))?;
    let (member, credentials) = member(rt, &cfg)
        .map_err(MemberError::NotReady)?
        .ok_or_else(|| {
            MemberError::NotReady(format!(
                "this node is a {}: it has no etcd member",
                cfg.machine.machine_type.as_str()
            ))
        })?;
    let state = *rt.etcd.lock().await;
    if state != EtcdState::Started {
        return Err(MemberError::NotReady(format!(
            "this node's etcd member is not running ({state:?})"
        )));
    }
    let endpoints = cfg
        .cluster
        .iter()
        .flat_map(|c| c.controlplanes.iter())
        .map(|m| m.client_url())
        .collect();
    Ok((member, credentials, endpoints))
}

/// Takes this control plane out of the cluster: its member removed (through any member),
/// its etcd stopped and its data deleted (a later boot joins anew instead of restarting a
/// removed member). Until the next boot the node neither joins nor is bootstrapped.
pub async fn leave(rt: &Arc<Runtime>) -> Result<(), MemberError> {
    let (member, credentials, endpoints) = running_member(rt).await?;
    // The member this node runs, by the id its own etcd reports: not by the config, which may
    // have changed since the boot.
    let own = Etcd::member_id_at(&member.me.client_url(), &credentials)
        .await
        .map_err(|e| {
            MemberError::NotReady(format!(
                "this node's etcd does not answer at {}: {e}",
                member.me.client_url()
            ))
        })?;
    let etcd = Etcd::connect(&endpoints, &credentials).await?;
    let mut state = rt.etcd.lock().await;
    if *state != EtcdState::Started {
        return Err(MemberError::NotReady(format!(
            "this node's etcd member is not running ({:?})",
            *state
        )));
    }
    let members = etcd.members().await?;
    if members.iter().any(|m| m.id == own) {
        if !members.iter().any(|m| m.id != own && !m.learner) {
            return Err(MemberError::NotReady(
                "this is the cluster's only voting member: it cannot leave (reset it to end the cluster)"
                    .into(),
            ));
        }
        remove_when_healthy(&etcd, own).await?;
    }
    *state = EtcdState::Left;
    drop(state);
    event(
        rt,
        "leaving",
        format!("member {own:x} removed from the cluster"),
    );
    // Stopping and deleting on the node's own time, not the caller's: a caller that goes
    // must not leave a removed member's data behind (a boot that finds it anyway sees its
    // member gone and starts over).
    let rt = rt.clone();
    tokio::spawn(async move {
        rt.services.remove(SERVICE).await;
        let data = rt.platform.host_path(Path::new(etcd::DATA_DIR));
        match remove_contents(data).await {
            Ok(()) => event(&rt, "left", "left the cluster; its data is deleted"),
            Err(e) => {
                tracing::warn!("etcd: deleting its data after leaving: {e}");
                event(
                    &rt,
                    "failed",
                    format!("left the cluster; its data could not be deleted: {e}"),
                );
            }
        }
    })
    .await
    .map_err(|e| MemberError::NotReady(format!("stopping etcd after leaving: {e}")))?;
    Ok(())
}

/// Removes member `id`, trying again for a while when etcd says the cluster is not healthy
/// yet: it refuses a membership change until the members have been connected for a few
/// seconds (after a start, or another change).
async fn remove_when_healthy(etcd: &Etcd, id: u64) -> Result<(), etcd::EtcdError> {
    const UNAVAILABLE: i32 = 14;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match etcd.remove(id).await {
            Err(e)
                if e.grpc_code() == Some(UNAVAILABLE) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Deletes what `dir` holds (the directory itself is EPHEMERAL's, kept), on a blocking
/// thread: etcd's data may be gigabytes.
async fn remove_contents(dir: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Removes another member (one whose node is gone) from the cluster.
pub async fn remove_member(rt: &Arc<Runtime>, id: u64) -> Result<(), MemberError> {
    let cfg = rt
        .config()
        .ok_or_else(|| MemberError::NotReady("no node config loaded".into()))?;
    let cluster = cfg.cluster.as_ref().ok_or_else(|| {
        MemberError::NotReady("this node is standalone: it belongs to no cluster".into())
    })?;
    let credentials = Credentials::of(cluster);
    let etcd = Etcd::connect(&Etcd::endpoints_of(cluster), &credentials).await?;
    let members = etcd.members().await?;
    let m = members
        .iter()
        .find(|m| m.id == id)
        .ok_or(MemberError::NotFound(id))?;
    // This node's own member, by the id its etcd reports (an unstarted learner has no name).
    if let Ok(Some((member, _))) = member(rt, &cfg) {
        let own = Etcd::member_id_at(&member.me.client_url(), &credentials).await;
        if own.is_ok_and(|own| own == id) || m.name == cfg.machine.name {
            return Err(MemberError::Own(format!(
                "{id:x} is this node's own member: use plinth etcd leave"
            )));
        }
    }
    // A member whose etcd answers is alive: removing it would leave its node restarting a
    // removed member. It leaves from its own node (or a graceful reset there).
    for url in &m.client_urls {
        if Etcd::answers(url, &credentials).await {
            return Err(MemberError::Own(format!(
                "member {} ({id:x}) answers at {url}: run plinth etcd leave on that node, or reset it",
                m.name
            )));
        }
    }
    remove_when_healthy(&etcd, id).await?;
    event(
        rt,
        "running",
        format!("member {} ({id:x}) removed from the cluster", m.name),
    );
    Ok(())
}

/// A graceful reset's first step on a control plane: leave the cluster. Best effort: a member
/// left behind is removed when the wiped node joins again (it no longer answers), and the
/// reset must go on either way.
pub async fn leave_before_reset(rt: Arc<Runtime>) -> Result<(), sequencer::TaskError> {
    if *rt.etcd.lock().await != EtcdState::Started {
        return Ok(());
    }
    let outcome = match tokio::time::timeout(LEAVE_BEFORE_RESET, leave(&rt)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} s",
            LEAVE_BEFORE_RESET.as_secs()
        )),
    };
    if let Err(e) = outcome {
        tracing::warn!("etcd: leaving the cluster before the reset: {e} (going on)");
        event(
            &rt,
            "failed",
            format!("did not leave the cluster before the reset: {e}"),
        );
    }
    Ok(())
}

/// How long a reset waits to leave etcd before it goes on without.
const LEAVE_BEFORE_RESET: Duration = Duration::from_secs(30);
