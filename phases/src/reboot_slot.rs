//! A slot of the cluster's reboot semaphore ([`etcd::slots`]), held by a node from before it
//! goes down until it is running again.
//!
//! The node holds it, not the operator's client: a client that is killed mid-rollout leaves
//! every node it started to finish (and release) on its own, and a rerun of the rollout can
//! never push the count past K. The slot's lease is kept alive by machined while it waits and
//! works; across the reboot its id is kept in a record on EPHEMERAL, and the next boot keeps
//! it alive until the node is running (its trial committed, or fallen back), then revokes it.
//! A node that never comes back frees its slot when the lease runs out ([`LEASE_TTL_S`]).

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use config::node::{Cluster, MachineType};
use etcd::slots::{Claim, Standing};
use etcd::{Credentials, Etcd, EtcdError};
use sequencer::{EventKind, NodeState};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::runtime::Runtime;

/// The record of a slot held across a reboot.
pub const RECORD: &str = "/var/lib/plinth/reboot-slot.json";
/// How long a slot outlives its holder's last word: longer than a node takes to reboot and
/// pass its trial (minutes under emulation), short enough that a dead node frees its slot.
pub const LEASE_TTL_S: i64 = 600;
/// How often the lease is renewed.
const RENEW: Duration = Duration::from_secs(10);
/// How long etcd may stay unreachable while the node waits in the queue.
const UNREACHABLE: Duration = Duration::from_secs(60);
/// How long joining the queue, or handing the slot on to the next boot, is tried again while
/// etcd fails: within the 30 s deadline of a `Reboot` call, which joins inline.
const JOIN_RETRY: Duration = Duration::from_secs(20);
/// How long releasing a slot is tried before its lease is left to run out.
const RELEASE_RETRY: Duration = Duration::from_secs(30);

/// Why a reboot slot was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// No etcd to coordinate through.
    #[error("this node is not in a cluster (its config has no cluster section): a coordinated reboot (max_unavailable) needs the cluster's etcd")]
    NotInCluster,
    /// One request per node at a time.
    #[error("this node is already waiting for or holding a reboot slot")]
    Busy,
    /// Taking this control plane down now would cost etcd its quorum, or a member is not
    /// healthy.
    #[error("{0}")]
    Quorum(String),
    /// The node's key left the queue while it waited (its lease expired).
    #[error("this node's place in the reboot queue is gone (its lease expired while etcd was unreachable)")]
    Gone,
    /// The record for the next boot could not be written.
    #[error("recording the reboot slot on EPHEMERAL: {0}")]
    Record(String),
    /// etcd could not be asked.
    #[error("the cluster's etcd: {0}")]
    Etcd(#[from] EtcdError),
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    node: String,
    lease: i64,
}

/// One request for a slot per node at a time (the queue has one key per node).
static BUSY: LazyLock<Arc<Mutex<()>>> = LazyLock::new(|| Arc::new(Mutex::new(())));

/// A slot held (or a place in the queue): released when dropped, unless [`Hold::keep`] hands
/// it on to the next boot.
pub struct Hold {
    rt: Arc<Runtime>,
    node: String,
    lease: i64,
    etcd: Etcd,
    cluster: Cluster,
    k: u32,
    spare: u32,
    renew: tokio::task::JoinHandle<()>,
    kept: bool,
    _busy: OwnedMutexGuard<()>,
}

/// Says that a slot asked for will not be had (the caller may have had its answer already).
pub fn refused(rt: &Runtime, message: impl Into<String>) {
    event(rt, "refused", message);
}

fn event(rt: &Runtime, state: &str, message: impl Into<String>) {
    rt.bus.publish(
        EventKind::Cluster {
            what: "reboot-slot".into(),
            state: state.into(),
            message: message.into(),
        },
        None,
    );
}

fn cluster(rt: &Runtime) -> Result<(String, bool, Cluster), SlotError> {
    let cfg = rt.config().ok_or(SlotError::NotInCluster)?;
    let cluster = cfg.cluster.clone().ok_or(SlotError::NotInCluster)?;
    Ok((
        cfg.machine.name.clone(),
        cfg.machine.machine_type == MachineType::Controlplane,
        cluster,
    ))
}

async fn connect(cluster: &Cluster) -> Result<Etcd, EtcdError> {
    Etcd::connect(&Etcd::endpoints_of(cluster), &Credentials::of(cluster)).await
}

/// Runs `op` on a connection to the cluster's etcd (`first`, or a new one), and again on a new
/// connection while etcd fails, `pause` apart, until `patience` is spent: the member asked
/// may be a control plane going down for its own reboot (another rollout's). A refusal is
/// returned at once. `op` must be safe to repeat.
async fn with_etcd<T, F, Fut>(
    cluster: &Cluster,
    mut first: Option<Etcd>,
    (patience, pause): (Duration, Duration),
    what: &str,
    mut op: F,
) -> Result<T, SlotError>
where
    F: FnMut(Etcd) -> Fut,
    Fut: std::future::Future<Output = Result<T, SlotError>>,
{
    let started = Instant::now();
    loop {
        let etcd = match first.take() {
            Some(etcd) => Ok(etcd),
            None => connect(cluster).await.map_err(SlotError::from),
        };
        let done = match etcd {
            Ok(etcd) => op(etcd).await,
            Err(e) => Err(e),
        };
        match done {
            Err(SlotError::Etcd(e)) if started.elapsed() < patience => {
                tracing::warn!("reboot slot: {what}: {e}; trying again");
                tokio::time::sleep(pause).await;
            }
            done => return done,
        }
    }
}

/// How many control planes etcd can spare at once: every member voting and answering, and a
/// quorum left without the ones down. Refused (with the member at fault) otherwise.
async fn spare_controlplanes(etcd: &Etcd, creds: &Credentials) -> Result<u32, SlotError> {
    let members = etcd.members().await?;
    if let Some(l) = members.iter().find(|m| m.learner) {
        return Err(SlotError::Quorum(format!(
            "etcd member {} ({:x}) is a learner: wait until it is promoted before taking a control plane down",
            if l.name.is_empty() { "(not started)" } else { &l.name },
            l.id
        )));
    }
    for m in &members {
        let answers = match m.client_urls.first() {
            Some(url) => Etcd::answers(url, creds).await,
            None => false,
        };
        if !answers {
            return Err(SlotError::Quorum(format!(
                "etcd member {} ({:x}) is not healthy (no answer at {}): taking another control plane down could lose quorum",
                m.name,
                m.id,
                m.client_urls.join(",")
            )));
        }
    }
    let voting = members.len() as u32;
    let spare = voting - (voting / 2 + 1);
    if spare == 0 {
        return Err(SlotError::Quorum(format!(
            "etcd has {voting} voting member{}: taking this control plane down would lose quorum",
            if voting == 1 { "" } else { "s" }
        )));
    }
    Ok(spare)
}

/// Renews `lease` every [`RENEW`] until aborted (a failed renewal is tried again: etcd may be
/// between leaders, or the member asked may be the one rebooting).
fn spawn_renew(cluster: Cluster, lease: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RENEW).await;
            let renewed = async { connect(&cluster).await?.keep_alive(lease).await };
            match renewed.await {
                Ok(0) => {
                    tracing::warn!("reboot slot: lease {lease:x} has expired");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reboot slot: renewing lease {lease:x}: {e}"),
            }
        }
    })
}

/// Waits for a slot of at most `k` nodes down at once, for `reason`; a control plane is also
/// refused when etcd could not spare it. The node's key is in the queue from the first
/// moment, so it is served in turn; dropping the future (the caller hung up) releases it.
pub async fn acquire(rt: &Arc<Runtime>, k: u32, reason: &str) -> Result<Hold, SlotError> {
    enqueue(rt, k, reason).await?.wait().await
}

/// A node's place in the queue, not yet a slot: [`Queued::wait`] waits for one. Dropped, it
/// leaves the queue.
pub struct Queued {
    /// The key in the queue, with what the wait needs (its K, the spare control planes, the
    /// cluster): a [`Hold`] once the slot comes.
    hold: Hold,
    controlplane: bool,
    reason: String,
}

/// The first half of [`acquire`]: the checks and the key in the queue, quickly (a caller
/// that must answer soon, like `Reboot`, waits for the slot on a task of its own).
pub async fn enqueue(rt: &Arc<Runtime>, k: u32, reason: &str) -> Result<Queued, SlotError> {
    let (node, controlplane, cluster) = cluster(rt)?;
    let busy = BUSY.clone().try_lock_owned().map_err(|_| SlotError::Busy)?;
    // A slot handed on to the next boot is still this node's until it runs again (its record
    // says so): a second request now would take over its key.
    if rt.controller.state() != NodeState::Running {
        return Err(SlotError::Busy);
    }
    // Running again, the node releases the slot of its last reboot within a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.platform.read(Path::new(RECORD)).is_ok() {
        if Instant::now() > deadline {
            return Err(SlotError::Busy);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let claim = Claim {
        node: node.clone(),
        controlplane,
        reason: reason.into(),
        max_unavailable: k,
    };
    // Repeating is safe: the put keeps the key's place, and a lease granted whose answer was
    // lost expires unused.
    let creds = Credentials::of(&cluster);
    let (etcd, spare, lease) = with_etcd(
        &cluster,
        None,
        (JOIN_RETRY, Duration::from_secs(1)),
        "joining the queue",
        |etcd| {
            let (claim, creds) = (&claim, &creds);
            async move {
                let spare = if controlplane {
                    spare_controlplanes(&etcd, creds).await?
                } else {
                    0
                };
                let lease = etcd.grant(LEASE_TTL_S).await?;
                etcd.enqueue(claim, lease).await?;
                Ok((etcd, spare, lease))
            }
        },
    )
    .await?;
    let hold = Hold {
        rt: rt.clone(),
        node,
        lease,
        etcd,
        renew: spawn_renew(cluster.clone(), lease),
        cluster,
        k,
        spare,
        kept: false,
        _busy: busy,
    };
    Ok(Queued {
        hold,
        controlplane,
        reason: reason.into(),
    })
}

impl Queued {
    /// Waits for the slot (a control plane is checked again when its turn comes); a refusal
    /// is a `refused` event too (a reboot's caller has had its answer already).
    pub async fn wait(self) -> Result<Hold, SlotError> {
        let (rt, reason) = (self.hold.rt.clone(), self.reason.clone());
        let held = self.wait_inner().await;
        if let Err(e) = &held {
            event(&rt, "refused", format!("{reason}: {e}"));
        }
        held
    }

    async fn wait_inner(self) -> Result<Hold, SlotError> {
        let Queued {
            mut hold,
            controlplane,
            reason,
        } = self;
        let (rt, node) = (hold.rt.clone(), hold.node.clone());
        let (k, spare, cluster) = (hold.k, hold.spare, hold.cluster.clone());
        let creds = Credentials::of(&cluster);
        let mut etcd = hold.etcd.clone();
        let mut said: Option<Vec<String>> = None;
        let mut reachable = Instant::now();
        loop {
            match etcd.standing(&node, k, spare).await {
                Ok(Standing::Held) => break,
                Ok(Standing::Gone) => return Err(SlotError::Gone),
                Ok(Standing::Waiting(ahead)) => {
                    reachable = Instant::now();
                    if said.as_ref() != Some(&ahead) {
                        event(
                        &rt,
                        "waiting",
                        format!(
                            "{reason}: waiting for a reboot slot (at most {k} nodes down) behind {}",
                            ahead.join(", ")
                        ),
                    );
                        said = Some(ahead);
                    }
                }
                Err(e) => {
                    // The member asked may be one going down: ask another.
                    if reachable.elapsed() > UNREACHABLE {
                        return Err(e.into());
                    }
                    if let Ok(other) = connect(&cluster).await {
                        etcd = other;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if controlplane {
            // Ahead of it in the queue there may have been control planes that are back but not
            // yet healthy.
            spare_controlplanes(&etcd, &creds).await?;
        }
        hold.etcd = etcd;
        event(
            &rt,
            "held",
            format!("{reason}: holds a reboot slot (at most {k} nodes down)"),
        );
        Ok(hold)
    }
}

impl Hold {
    /// Hands the slot on to the next boot (the node is about to reboot): the record on
    /// EPHEMERAL says which lease to renew and release once the node runs again. The slot is
    /// checked first: a lease that ran out while the node wrote its slot (etcd unreachable)
    /// may have let another node in, and then this one must not go down.
    pub async fn keep(&mut self) -> Result<(), SlotError> {
        let (node, lease, k, spare) = (&self.node, self.lease, self.k, self.spare);
        with_etcd(
            &self.cluster,
            Some(self.etcd.clone()),
            (JOIN_RETRY, Duration::from_secs(1)),
            "checking the slot before the reboot",
            |etcd| async move {
                if etcd.keep_alive(lease).await? == 0 {
                    return Err(SlotError::Gone);
                }
                match etcd.standing(node, k, spare).await? {
                    Standing::Held => Ok(()),
                    _ => Err(SlotError::Gone),
                }
            },
        )
        .await?;
        let record = Record {
            node: self.node.clone(),
            lease: self.lease,
        };
        let json = serde_json::to_vec(&record).unwrap_or_default();
        let path = Path::new(RECORD);
        let written = match path.parent() {
            Some(dir) => self.rt.platform.mkdir_all(dir),
            None => Ok(()),
        }
        .and_then(|()| self.rt.platform.replace(path, &json));
        if let Err(e) = written {
            // The slot is still released when this is dropped: better than holding it for
            // the lease's whole life.
            return Err(SlotError::Record(e.to_string()));
        }
        self.kept = true;
        Ok(())
    }

    /// The reboot it was kept for did not start: the record goes, and the slot is released.
    pub fn abandon(mut self) {
        if let Err(e) = self.rt.platform.remove(Path::new(RECORD)) {
            tracing::warn!("reboot slot: removing {RECORD}: {e}");
        }
        self.kept = false;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.kept {
            // Renewed until the reboot ends this boot's tasks.
            return;
        }
        self.renew.abort();
        let (etcd, lease, cluster) = (self.etcd.clone(), self.lease, self.cluster.clone());
        // Said before it is done: the events' intervals of holding lie within the true ones,
        // so counting them never exceeds what etcd allowed.
        event(&self.rt, "released", "released the reboot slot");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let revoked = with_etcd(
                    &cluster,
                    Some(etcd),
                    (RELEASE_RETRY, Duration::from_secs(5)),
                    "releasing the slot",
                    |etcd| async move {
                        match etcd.revoke(lease).await {
                            // Gone already (expired).
                            Err(e) if e.grpc_code() == Some(tonic_not_found()) => Ok(()),
                            r => r.map_err(SlotError::from),
                        }
                    },
                )
                .await;
                if let Err(e) = revoked {
                    tracing::warn!(
                        "reboot slot: lease {lease:x} not revoked ({e}): it expires by itself"
                    );
                }
            });
        }
    }
}

/// gRPC's NOT_FOUND, etcd's answer for a lease it no longer has.
const fn tonic_not_found() -> i32 {
    5
}

/// At boot: a slot held across the reboot is renewed until the node is running, then
/// released (its record removed). Etcd may be slow to answer while its members come back, so
/// both are tried until the lease would have run out anyway.
pub fn resume(rt: &Arc<Runtime>) {
    let path = Path::new(RECORD);
    let Ok(bytes) = rt.platform.read(path) else {
        return;
    };
    let record: Option<Record> = serde_json::from_slice(&bytes).ok();
    let rt = rt.clone();
    tokio::spawn(async move {
        let forget = |rt: &Runtime| {
            if let Err(e) = rt.platform.remove(Path::new(RECORD)) {
                tracing::warn!("reboot slot: removing {RECORD}: {e}");
            }
        };
        let (Some(record), Ok((_, _, cluster))) = (record, cluster(&rt)) else {
            forget(&rt);
            return;
        };
        // However long the trial may take (its gates' timeout), and then the lease's life.
        let trial = rt
            .config()
            .map(|c| c.machine.upgrade.trial_timeout_s)
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(LEASE_TTL_S as u64 + trial);
        let mut renewed = Instant::now() - RENEW;
        let mut said = false;
        while Instant::now() < deadline {
            let running = rt.controller.state() == NodeState::Running;
            if running && !said {
                // Said first, as when a hold is dropped.
                event(
                    &rt,
                    "released",
                    format!("{} is running again: released its reboot slot", record.node),
                );
                said = true;
            }
            if running || renewed.elapsed() >= RENEW {
                if let Ok(etcd) = connect(&cluster).await {
                    if running {
                        match etcd.revoke(record.lease).await {
                            Ok(()) => break,
                            // Gone already (expired, or revoked before a power cut).
                            Err(e) if e.grpc_code() == Some(tonic_not_found()) => break,
                            Err(e) => tracing::warn!("reboot slot: releasing: {e}"),
                        }
                    } else if etcd.keep_alive(record.lease).await.is_ok() {
                        renewed = Instant::now();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        forget(&rt);
    });
}
