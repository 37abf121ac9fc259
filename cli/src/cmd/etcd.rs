//! `plinth bootstrap [--recover-from FILE]` and `plinth etcd members | status | snapshot |
//! leave | remove-member`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use api::proto::etcd_recover_request::Msg;
use api::proto::{
    BootstrapRequest, EtcdMember, EtcdMemberStatus, EtcdMembersRequest, EtcdRecoverOptions,
    EtcdRecoverRequest, EtcdSnapshotRequest, EtcdStatusRequest,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::connect::{status_error, Target};
use crate::fanout::{node_column, print, Show, NODE_HEADER};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct BootstrapArgs {
    /// Start the new cluster from this snapshot (`plinth etcd snapshot` takes one): its keys
    /// come back, with this node as the only member; the others join it as usual.
    #[arg(long, value_name = "FILE")]
    recover_from: Option<PathBuf>,
}

/// Starts the cluster's etcd on the node (one control plane, once).
pub async fn bootstrap(target: &Target, args: BootstrapArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.recover_from {
        check_snapshot(file).await?;
        let kept = upload_snapshot(target, file).await?;
        eprintln!("uploaded the snapshot ({kept} bytes)");
    }
    let (endpoint, mut c) = target.connect().await?;
    c.bootstrap(BootstrapRequest {
        recover_etcd: args.recover_from.is_some(),
    })
    .await
    .map_err(|s| status_error(&endpoint, s))?;
    match &args.recover_from {
        Some(f) => println!(
            "{endpoint}: etcd bootstrapped from {} (a new one-member cluster with its keys); the other control planes join it by themselves",
            f.display()
        ),
        None => println!("{endpoint}: etcd bootstrapped (a new one-member cluster); the other control planes join it by themselves"),
    }
    Ok(())
}

/// A snapshot as etcd writes it, the database then the SHA-256 of it, checked as it streams
/// by: the last 32 bytes seen are held back from the hash.
#[derive(Default)]
struct Trailer {
    hash: Sha256,
    held: Vec<u8>,
    len: u64,
}

impl Trailer {
    fn update(&mut self, chunk: &[u8]) {
        self.len += chunk.len() as u64;
        self.held.extend_from_slice(chunk);
        let pass = self.held.len().saturating_sub(32);
        self.hash.update(&self.held[..pass]);
        self.held.drain(..pass);
    }

    fn intact(self) -> bool {
        self.held.len() == 32 && self.len > 32 && self.hash.finalize().as_slice() == self.held
    }
}

async fn check_snapshot(file: &Path) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let (mut sum, mut buf) = (Trailer::default(), vec![0u8; 1 << 20]);
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
    }
    if !sum.intact() {
        bail!(
            "{} is not an intact etcd snapshot (its last 32 bytes are not the SHA-256 of the rest)",
            file.display()
        );
    }
    Ok(())
}

async fn upload_snapshot(target: &Target, file: &Path) -> anyhow::Result<u64> {
    let opened = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let size = opened.metadata().await?.len();
    let first = EtcdRecoverRequest {
        msg: Some(Msg::Options(EtcdRecoverOptions { size })),
    };
    let bar = crate::upload::bar(size, "sending");
    let chunks = crate::upload::chunks(opened, bar.clone(), |buf| EtcdRecoverRequest {
        msg: Some(Msg::Chunk(buf)),
    });
    let stream = futures::StreamExt::chain(futures::stream::iter([first]), chunks);
    let (endpoint, mut c) = target.connect_long().await?;
    let reply = c.etcd_recover(stream).await;
    bar.finish_and_clear();
    Ok(reply
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .size)
}

/// Saves a snapshot from the node's member into `file` (written beside it and renamed once
/// whole and checked: an interrupted one never looks like a snapshot).
async fn snapshot(target: &Target, file: &Path) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect_long().await?;
    let mut stream = c
        .etcd_snapshot(EtcdSnapshotRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner();
    let part = file.with_extension("part");
    let mut out = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut sum = Trailer::default();
    let got: anyhow::Result<u64> = async {
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| status_error(&endpoint, s))?
        {
            out.write_all(&chunk.data).await?;
            sum.update(&chunk.data);
        }
        out.sync_all().await?;
        let len = sum.len;
        if !std::mem::take(&mut sum).intact() {
            bail!("the snapshot arrived damaged (its SHA-256 does not match)");
        }
        tokio::fs::rename(&part, file).await?;
        Ok(len)
    }
    .await;
    let len = match got {
        Ok(len) => len,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    println!(
        "{endpoint}: snapshot saved to {} ({len} bytes)",
        file.display()
    );
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum Etcd {
    /// List the etcd cluster's members.
    Members(MembersArgs),
    /// Each member's own status: leader, raft index and term, database size, version.
    Status(MembersArgs),
    /// Save a snapshot of etcd's keyspace (from this control plane's member) to FILE, for
    /// `plinth bootstrap --recover-from`.
    Snapshot {
        /// Where to save it.
        file: PathBuf,
    },
    /// Take this control plane out of the etcd cluster: its member removed, its etcd stopped,
    /// its data deleted (it joins again after a reboot; a graceful reset leaves by itself).
    Leave,
    /// Remove another node's member (one that is gone) from the etcd cluster, by its id as
    /// `plinth etcd members` shows it.
    RemoveMember {
        /// The member's id (hex).
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct MembersArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

pub async fn run(target: &Target, e: Etcd) -> anyhow::Result<()> {
    match e {
        Etcd::Members(args) => members(target, args).await,
        Etcd::Status(args) => status(target, args).await,
        Etcd::Snapshot { file } => snapshot(target, &file).await,
        Etcd::Leave => {
            let (endpoint, mut c) = target.connect().await?;
            c.etcd_leave(api::proto::EtcdLeaveRequest {})
                .await
                .map_err(|s| status_error(&endpoint, s))?;
            println!("{endpoint}: left the etcd cluster");
            Ok(())
        }
        Etcd::RemoveMember { id } => {
            let hex = id.trim_start_matches("0x");
            let id = u64::from_str_radix(hex, 16).map_err(|_| {
                anyhow::anyhow!("{id:?} is not a member id (hex, as plinth etcd members shows it)")
            })?;
            let (endpoint, mut c) = target.connect().await?;
            c.etcd_remove_member(api::proto::EtcdRemoveMemberRequest { id })
                .await
                .map_err(|s| status_error(&endpoint, s))?;
            println!("{endpoint}: member {id:x} removed");
            Ok(())
        }
    }
}

async fn members(target: &Target, args: MembersArgs) -> anyhow::Result<()> {
    let replies = target
        .each(|endpoint, mut c| async move {
            c.etcd_members(EtcdMembersRequest {})
                .await
                .map(|r| r.into_inner().members)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await?;
    let show = Show {
        json: |_: &str, list: &Vec<EtcdMember>| {
            serde_json::Value::Array(
                list.iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": format!("{:x}", m.id), "name": m.name, "peer_urls": m.peer_urls,
                            "client_urls": m.client_urls, "learner": m.learner,
                        })
                    })
                    .collect(),
            )
        },
        key: "members",
        header: |many: bool| {
            println!(
                "{}{:<16} {:<20} {:<8} {:<30} CLIENT URLS",
                if many { NODE_HEADER } else { "" },
                "ID",
                "NAME",
                "LEARNER",
                "PEER URLS"
            );
        },
        render: |endpoint: &str, many: bool, list: &Vec<EtcdMember>| {
            for m in list {
                println!(
                    "{}{:<16x} {:<20} {:<8} {:<30} {}",
                    node_column(endpoint, many),
                    m.id,
                    if m.name.is_empty() {
                        "(not started)"
                    } else {
                        &m.name
                    },
                    if m.learner { "yes" } else { "no" },
                    m.peer_urls.join(","),
                    m.client_urls.join(",")
                );
            }
        },
    };
    print(target, replies, args.output, show)
}

async fn status(target: &Target, args: MembersArgs) -> anyhow::Result<()> {
    let replies = target
        .each(|endpoint, mut c| async move {
            c.etcd_status(EtcdStatusRequest {})
                .await
                .map(|r| r.into_inner().members)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await?;
    let show = Show {
        json: |_: &str, list: &Vec<EtcdMemberStatus>| {
            serde_json::Value::Array(
                list.iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": format!("{:x}", m.id), "name": m.name, "client_url": m.client_url,
                            "error": m.error, "leader": format!("{:x}", m.leader), "version": m.version,
                            "db_size": m.db_size, "raft_index": m.raft_index, "raft_term": m.raft_term,
                            "learner": m.learner,
                        })
                    })
                    .collect(),
            )
        },
        key: "members",
        header: |many: bool| {
            println!(
                "{}{:<16} {:<12} {:<7} {:<8} {:>10} {:>10} {:>6} ERROR",
                if many { NODE_HEADER } else { "" },
                "ID",
                "NAME",
                "LEADER",
                "VERSION",
                "DB SIZE",
                "RAFT IDX",
                "TERM"
            );
        },
        render: |endpoint: &str, many: bool, list: &Vec<EtcdMemberStatus>| {
            for m in list {
                let answered = m.error.is_empty();
                println!(
                    "{}{:<16x} {:<12} {:<7} {:<8} {:>10} {:>10} {:>6} {}",
                    node_column(endpoint, many),
                    m.id,
                    m.name,
                    if !answered {
                        "?"
                    } else if m.leader == m.id {
                        "yes"
                    } else {
                        "no"
                    },
                    m.version,
                    m.db_size,
                    m.raft_index,
                    m.raft_term,
                    m.error
                );
            }
        },
    };
    print(target, replies, args.output, show)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_intact_only_with_the_sha256_of_its_database_at_its_end() {
        let db = vec![7u8; 100_000];
        let mut file = db.clone();
        file.extend_from_slice(&Sha256::digest(&db));
        for split in [1, 31, 32, 33, 4096, 99_999] {
            let mut t = Trailer::default();
            for part in file.chunks(split) {
                t.update(part);
            }
            assert!(t.intact(), "in chunks of {split}");
        }
        file[10] ^= 1;
        let mut t = Trailer::default();
        t.update(&file);
        assert!(!t.intact());
        let mut t = Trailer::default();
        t.update(&[0u8; 32]);
        assert!(!t.intact(), "nothing but a trailer");
    }
}
