//! The cluster's etcd as machined runs it and talks to it.
//!
//! [`Member`] is how a control-plane node runs its etcd member (its command line, from the
//! node config's cluster section); [`Etcd`] is machined's client of the cluster (etcd-client
//! over mutual TLS with the node's etcd client certificate): health by a quorum read, the
//! member list, adding a learner, promoting and removing members; and the fleet's reboot
//! semaphore ([`slots`]).
#![warn(missing_docs)]

pub mod slots;

use std::path::{Path, PathBuf};
use std::time::Duration;

use config::node::{Cluster, ClusterMember};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, MemberAddOptions, TlsOptions,
};

/// Where etcd's data lives on the node (EPHEMERAL).
pub const DATA_DIR: &str = "/var/lib/etcd";
/// Where machined writes etcd's certificates from the config (a tmpfs: the key is on disk only
/// in the config, on STATE).
pub const PKI_DIR: &str = "/run/plinth/etcd";
/// The etcd program the extension provides.
pub const PROGRAM: &str = "/usr/local/bin/etcd";
/// etcd's own client, from the same extension: machined runs it only to restore a snapshot
/// into a data directory (etcd 3.4 has no API for that; it rewrites etcd's bbolt database).
pub const CTL_PROGRAM: &str = "/usr/local/bin/etcdctl";

/// Something went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The config has no cluster section, or does not name this node as a control plane.
    #[error("{0}")]
    NotAMember(String),
    /// etcd refused or could not be reached.
    #[error("etcd at {endpoints}: {source}")]
    Client {
        /// The endpoints tried.
        endpoints: String,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The cluster has a member this node cannot be (a live one of its name, or another
    /// name at its peer URL).
    #[error("{0}")]
    Conflict(String),
    /// A call took too long (no quorum, or no member answering).
    #[error("etcd at {endpoints}: no answer within {secs} s ({what})")]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// How long.
        secs: u64,
        /// The call.
        what: &'static str,
    },
}

/// How this control-plane node starts its member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new one-member cluster (`plinth bootstrap`).
    New,
    /// Joining the existing cluster whose members (name, peer URL) include this one, added as
    /// a learner before it starts.
    Join(Vec<(String, String)>),
    /// With the data directory it already has (a reboot): the flags about the cluster's
    /// membership are ignored by etcd then.
    Restart,
}

/// A control-plane node's etcd member, from its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's name (the node's).
    pub name: String,
    /// The cluster's name (etcd's cluster token).
    pub cluster: String,
    /// This member as the cluster section lists it.
    pub me: ClusterMember,
    /// The data directory (as etcd sees it).
    pub data_dir: PathBuf,
    /// The CA, certificate and key files (as etcd sees them).
    pub pki: PkiFiles,
}

/// etcd's certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The member certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl PkiFiles {
    /// The files under `dir`.
    pub fn under(dir: &Path) -> PkiFiles {
        PkiFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("member.crt"),
            key: dir.join("member.key"),
        }
    }
}

impl Member {
    /// This node's member, if the config makes it a control plane.
    pub fn of(
        node: &str,
        cluster: &Cluster,
        data_dir: &Path,
        pki: PkiFiles,
    ) -> Result<Member, EtcdError> {
        let me = cluster
            .controlplanes
            .iter()
            .find(|m| m.name == node)
            .ok_or_else(|| {
                EtcdError::NotAMember(format!("{node} is not among the cluster's control planes"))
            })?
            .clone();
        Ok(Member {
            name: node.into(),
            cluster: cluster.name.clone(),
            me,
            data_dir: data_dir.into(),
            pki,
        })
    }

    /// Where the member serves clients: every address of the node, as Talos does (machined and
    /// etcdctl on the node itself, and clients forwarded in, reach it at 127.0.0.1; its
    /// certificate names 127.0.0.1 too); only its own when that is a loopback address (members
    /// sharing one machine, as simulated nodes do).
    pub fn listen_client_url(&self) -> String {
        let loopback = self
            .me
            .address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
        if loopback {
            self.me.client_url()
        } else {
            format!("https://0.0.0.0:{}", self.me.client_port)
        }
    }

    /// etcdctl's command line (without the program) to restore `snapshot` into `data_dir` as a
    /// new one-member cluster of this member (etcd then starts from that directory).
    pub fn restore_args(&self, snapshot: &Path, data_dir: &Path) -> Vec<String> {
        let peer = self.me.peer_url();
        vec![
            "snapshot".into(),
            "restore".into(),
            snapshot.display().to_string(),
            format!("--name={}", self.name),
            format!("--initial-cluster={}={peer}", self.name),
            format!("--initial-cluster-token={}", self.cluster),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--data-dir={}", data_dir.display()),
        ]
    }

    /// etcd's command line (without the program) to start this member as `start` says.
    pub fn args(&self, start: &Start) -> Vec<String> {
        let (client, peer) = (self.me.client_url(), self.me.peer_url());
        let p = |f: &Path| f.display().to_string();
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", p(&self.data_dir)),
            format!("--listen-client-urls={}", self.listen_client_url()),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster-token={}", self.cluster),
            format!("--cert-file={}", p(&self.pki.cert)),
            format!("--key-file={}", p(&self.pki.key)),
            format!("--trusted-ca-file={}", p(&self.pki.ca)),
            "--client-cert-auth".into(),
            format!("--peer-cert-file={}", p(&self.pki.cert)),
            format!("--peer-key-file={}", p(&self.pki.key)),
            format!("--peer-trusted-ca-file={}", p(&self.pki.ca)),
            "--peer-client-cert-auth".into(),
            // A learner catches up from a snapshot of the leader; small clusters snapshot
            // often enough at the default.
            "--logger=zap".into(),
        ];
        match start {
            Start::New => {
                args.push(format!("--initial-cluster={}={peer}", self.name));
                args.push("--initial-cluster-state=new".into());
            }
            Start::Join(members) => {
                let list: Vec<String> = members.iter().map(|(n, u)| format!("{n}={u}")).collect();
                args.push(format!("--initial-cluster={}", list.join(",")));
                args.push("--initial-cluster-state=existing".into());
            }
            Start::Restart => {}
        }
        args
    }
}

/// A member's own account of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its id.
    pub id: u64,
    /// The leader's id, as it sees it.
    pub leader: u64,
    /// Its etcd version.
    pub version: String,
    /// Its database's size in bytes.
    pub db_size: u64,
    /// Its raft index.
    pub raft_index: u64,
    /// Its raft term.
    pub raft_term: u64,
    /// Whether it is a learner.
    pub learner: bool,
}

/// A snapshot being read from a member.
pub struct Snapshot {
    stream: etcd_client::SnapshotStreaming,
    endpoint: String,
}

impl Snapshot {
    /// The next piece, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, EtcdError> {
        let r = timed(&self.endpoint, "reading a snapshot", self.stream.message()).await?;
        Ok(r.map(|r| r.blob().to_vec()))
    }
}

/// A member as the cluster lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its id.
    pub id: u64,
    /// Its name (empty until a learner has started).
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// Its client URLs (empty until it has started).
    pub client_urls: Vec<String>,
    /// Whether it is a learner (not voting yet).
    pub learner: bool,
}

impl EtcdError {
    /// The gRPC code etcd answered with, if it answered (a refusal, not an unreachable
    /// member): `FAILED_PRECONDITION` for removing the last started member, for instance.
    pub fn grpc_code(&self) -> Option<i32> {
        match self {
            EtcdError::Client {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => Some(status.code() as i32),
            _ => None,
        }
    }
}

/// A member added to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Its id.
    pub id: u64,
    /// `--initial-cluster` for its first start: (name, peer URL) of every member.
    pub initial: Vec<(String, String)>,
}

/// machined's credentials for etcd (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// etcd's CA.
    pub ca: String,
    /// The node's etcd client certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
}

impl std::fmt::Debug for Credentials {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

impl Credentials {
    /// The node's, from its cluster section.
    pub fn of(cluster: &Cluster) -> Credentials {
        Credentials {
            ca: cluster.etcd.ca.clone(),
            cert: cluster.etcd.client.cert.clone(),
            key: cluster.etcd.client.key.clone(),
        }
    }
}

/// How long one call to etcd may take.
const CALL: Duration = Duration::from_secs(5);

/// machined's client of the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: String,
}

impl Etcd {
    /// Connects to the first of `endpoints` (client URLs) that answers. One endpoint at a time,
    /// not etcd-client's balanced channel: that one sends each call to the next endpoint in
    /// turn, and a member that is down fails the call instead of another member taking it.
    pub async fn connect(endpoints: &[String], creds: &Credentials) -> Result<Etcd, EtcdError> {
        let mut last = None;
        for endpoint in endpoints {
            match Etcd::connect_one(endpoint, creds).await {
                Ok(e) => return Ok(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::NotAMember("no etcd endpoints to connect to".into())))
    }

    async fn connect_one(endpoint: &str, creds: &Credentials) -> Result<Etcd, EtcdError> {
        let client = Etcd::client_at(endpoint, creds).await?;
        // A voting member answers (the channel may connect lazily; a learner serves only
        // status and serializable reads, and is passed over for the next endpoint).
        timed(
            endpoint,
            "listing members",
            client.cluster_client().member_list(),
        )
        .await?;
        Ok(Etcd {
            client,
            endpoints: endpoint.into(),
        })
    }

    /// The id of the member serving at `client_url` (learners too), from its own status: how a
    /// node knows which member is its own whatever its config says now.
    pub async fn member_id_at(client_url: &str, creds: &Credentials) -> Result<u64, EtcdError> {
        let mut client = Etcd::client_at(client_url, creds).await?;
        let status = timed(client_url, "asking its status", client.status()).await?;
        Ok(status.header().map(|h| h.member_id()).unwrap_or_default())
    }

    /// The member's own status at `client_url` (a learner too).
    pub async fn status_at(
        client_url: &str,
        creds: &Credentials,
    ) -> Result<MemberStatus, EtcdError> {
        let mut client = Etcd::client_at(client_url, creds).await?;
        let s = timed(client_url, "asking its status", client.status()).await?;
        Ok(MemberStatus {
            id: s.header().map(|h| h.member_id()).unwrap_or_default(),
            leader: s.leader(),
            version: s.version().into(),
            db_size: u64::try_from(s.db_size()).unwrap_or_default(),
            raft_index: s.raft_index(),
            raft_term: s.raft_term(),
            learner: s.is_learner(),
        })
    }

    /// A snapshot of the keyspace from the member at `client_url` (etcd appends its SHA-256).
    pub async fn snapshot_at(client_url: &str, creds: &Credentials) -> Result<Snapshot, EtcdError> {
        let mut client = Etcd::client_at(client_url, creds).await?;
        let stream = timed(client_url, "starting a snapshot", client.snapshot()).await?;
        Ok(Snapshot {
            stream,
            endpoint: client_url.into(),
        })
    }

    /// Whether a member answers at `client_url` (a learner too).
    pub async fn answers(client_url: &str, creds: &Credentials) -> bool {
        Etcd::member_id_at(client_url, creds).await.is_ok()
    }

    async fn client_at(endpoint: &str, creds: &Credentials) -> Result<Client, EtcdError> {
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&creds.ca))
            .identity(Identity::from_pem(&creds.cert, &creds.key));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL);
        timed(
            endpoint,
            "connecting",
            Client::connect([endpoint], Some(options)),
        )
        .await
    }

    /// The cluster's endpoints for this node: every control plane's client URL.
    pub fn endpoints_of(cluster: &Cluster) -> Vec<String> {
        cluster
            .controlplanes
            .iter()
            .map(ClusterMember::client_url)
            .collect()
    }

    /// Healthy when a linearizable read (one that needs the leader and a quorum) answers.
    pub async fn check_quorum(&self) -> Result<(), EtcdError> {
        let mut kv = self.client.kv_client();
        timed(
            &self.endpoints,
            "a quorum read",
            kv.get("/plinth/health", Some(GetOptions::new().with_count_only())),
        )
        .await
        .map(drop)
    }

    /// The members.
    pub async fn members(&self) -> Result<Vec<MemberInfo>, EtcdError> {
        let mut c = self.client.cluster_client();
        let list = timed(&self.endpoints, "listing members", c.member_list()).await?;
        Ok(list.members().iter().map(info).collect())
    }

    /// Adds a learner at `peer_url`; returns its id.
    pub async fn add_learner(&self, peer_url: &str) -> Result<u64, EtcdError> {
        let mut c = self.client.cluster_client();
        let r = timed(
            &self.endpoints,
            "adding a learner",
            c.member_add(
                [peer_url.to_string()],
                Some(MemberAddOptions::new().with_is_learner()),
            ),
        )
        .await?;
        Ok(r.member().map(|m| m.id()).unwrap_or_default())
    }

    /// Adds the member `name` at `peer_url` as a learner and returns its id and the
    /// `--initial-cluster` it starts with (every member's peer URLs, as `etcdctl member add`
    /// prints them). A learner already listed at that URL that never started (a join cut
    /// short) is reused. A member of the same name that does not answer (this node before its
    /// data was wiped) is removed first, as etcd would not take it back; one that answers, or
    /// another name at this peer URL, is a conflict and nothing is changed.
    pub async fn join(
        &self,
        name: &str,
        peer_url: &str,
        creds: &Credentials,
    ) -> Result<Joined, EtcdError> {
        let members = self.members().await?;
        let mut reuse = None;
        let mut stale = None;
        for m in &members {
            let same_url = m.peer_urls.iter().any(|u| u == peer_url);
            if same_url && m.name.is_empty() {
                reuse = Some(m.id);
            } else if m.name == name {
                let live = match m.client_urls.first() {
                    Some(url) => Etcd::answers(url, creds).await,
                    None => false,
                };
                if live {
                    return Err(EtcdError::Conflict(format!(
                        "a live member named {name} ({:x}) answers at {}: another machine with this node's name?",
                        m.id,
                        m.client_urls.join(",")
                    )));
                }
                stale = Some(m.id);
            } else if same_url {
                return Err(EtcdError::Conflict(format!(
                    "member {} ({:x}) has this node's peer URL {peer_url}",
                    m.name, m.id
                )));
            }
        }
        if let Some(id) = stale {
            tracing::info!("removing the stale etcd member {name} ({id:x}): it does not answer");
            self.remove(id).await?;
        }
        let (id, added) = match reuse {
            Some(id) => (id, false),
            None => (self.add_learner(peer_url).await?, true),
        };
        let initial = match self.members().await {
            Ok(list) => list
                .into_iter()
                .flat_map(|m| {
                    let n = if m.id == id { name.to_string() } else { m.name };
                    m.peer_urls.into_iter().map(move |u| (n.clone(), u))
                })
                .collect(),
            Err(e) => {
                // Not left behind: a learner that never starts blocks every later join.
                if added {
                    let _ = self.remove(id).await;
                }
                return Err(e);
            }
        };
        Ok(Joined { id, initial })
    }

    /// This node's member, by its peer URL, if the cluster lists it.
    pub async fn find(&self, peer_url: &str) -> Result<Option<MemberInfo>, EtcdError> {
        Ok(self
            .members()
            .await?
            .into_iter()
            .find(|m| m.peer_urls.iter().any(|u| u == peer_url)))
    }

    /// Promotes learner `id` to a voting member (etcd refuses until it has caught up).
    pub async fn promote(&self, id: u64) -> Result<(), EtcdError> {
        let mut c = self.client.cluster_client();
        timed(&self.endpoints, "promoting a learner", c.member_promote(id))
            .await
            .map(drop)
    }

    /// Removes member `id`.
    pub async fn remove(&self, id: u64) -> Result<(), EtcdError> {
        let mut c = self.client.cluster_client();
        timed(&self.endpoints, "removing a member", c.member_remove(id))
            .await
            .map(drop)
    }

    /// Writes `value` at `key` (tests and the fleet's own records).
    pub async fn put(&self, key: &str, value: &str) -> Result<(), EtcdError> {
        let mut kv = self.client.kv_client();
        timed(&self.endpoints, "a write", kv.put(key, value, None))
            .await
            .map(drop)
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<String>, EtcdError> {
        let mut kv = self.client.kv_client();
        let r = timed(&self.endpoints, "a read", kv.get(key, None)).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

fn info(m: &etcd_client::Member) -> MemberInfo {
    MemberInfo {
        id: m.id(),
        name: m.name().into(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        learner: m.is_learner(),
    }
}

async fn timed<T>(
    endpoints: &str,
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL * 2, call).await {
        Ok(r) => r.map_err(|source| EtcdError::Client {
            endpoints: endpoints.into(),
            source,
        }),
        Err(_) => Err(EtcdError::Timeout {
            endpoints: endpoints.into(),
            secs: (CALL * 2).as_secs(),
            what,
        }),
    }
}
