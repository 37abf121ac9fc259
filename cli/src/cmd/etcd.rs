//! `plinth bootstrap` and `plinth etcd members`.

use api::proto::{BootstrapRequest, EtcdMember, EtcdMembersRequest};

use crate::connect::{status_error, Target};
use crate::fanout::{node_column, print, Show, NODE_HEADER};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct BootstrapArgs {}

/// Starts the cluster's etcd on the node (one control plane, once).
pub async fn bootstrap(target: &Target, _: BootstrapArgs) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    c.bootstrap(BootstrapRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?;
    println!("{endpoint}: etcd bootstrapped (a new one-member cluster); the other control planes join it by themselves");
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum Etcd {
    /// List the etcd cluster's members.
    Members(MembersArgs),
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
