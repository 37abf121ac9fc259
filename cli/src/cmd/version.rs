//! `plinth version`.

use api::proto::{VersionRequest, VersionResponse};

use crate::connect::{status_error, Target};
use crate::fanout::{print, Show};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
    /// Only the client's version; do not contact a node.
    #[arg(long)]
    client: bool,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let client_version = env!("CARGO_PKG_VERSION");
    if args.client {
        match args.output {
            Format::Json => println!(
                "{}",
                serde_json::json!({ "client": { "version": client_version } })
            ),
            Format::Text => println!("Client: plinth {client_version}"),
        }
        return Ok(());
    }
    let replies = target
        .each(|endpoint, mut c| async move {
            c.version(VersionRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| status_error(&endpoint, s))
        })
        .await?;
    if args.output == Format::Text {
        println!("Client:   plinth {client_version}");
    }
    let show = Show {
        json: |endpoint: &str, v: &VersionResponse| {
            serde_json::json!({
                "client": { "version": client_version },
                "node": {
                    "endpoint": endpoint,
                    "name": v.node_name,
                    "version": v.version,
                    "slot": v.slot,
                    "machined_pid": v.machined_pid,
                    "root_fstype": v.root_fstype,
                    "root_source": v.root_source,
                    "root_partition": v.root_partition,
                    "boot_id": v.boot_id,
                    "arch": v.arch,
                    "kernel": v.kernel,
                    "state": v.state,
                }
            })
        },
        key: "version",
        header: |_| {},
        render: |endpoint: &str, many: bool, v: &VersionResponse| {
            if many {
                println!("NODE: {endpoint}");
            }
            println!("Node:     {} ({endpoint})", v.node_name);
            println!("Version:  Plinth {}", v.version);
            println!("Slot:     {}", v.slot);
            println!("machined: PID {}", v.machined_pid);
            if v.root_partition.is_empty() {
                println!("Root:     {} on {}", v.root_fstype, v.root_source);
            } else {
                println!(
                    "Root:     {} on {} (dm-verity over {})",
                    v.root_fstype, v.root_source, v.root_partition
                );
            }
            println!("Kernel:   {} ({})", v.kernel, v.arch);
            println!("State:    {}", v.state);
            println!("Boot ID:  {}", v.boot_id);
        },
    };
    print(target, replies, args.output, show)
}
