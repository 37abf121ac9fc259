//! `plinth dmesg` and `plinth logs`.

use api::proto::{DmesgRequest, LogsRequest};

use crate::connect::{status_error, Target};
use crate::fanout::{node_column, report};

#[derive(clap::Args, Debug)]
pub struct DmesgArgs {
    /// Keep printing new records.
    #[arg(short, long)]
    follow: bool,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The service.
    service: String,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
    /// Start with the last N lines (0: all).
    #[arg(long, default_value_t = 0)]
    tail: u32,
}

/// Prints the lines as they come, each after `prefix` (the node's column with `-n`).
async fn print(
    endpoint: &str,
    mut s: tonic::Streaming<api::proto::LogLine>,
    kernel: bool,
    prefix: &str,
) -> anyhow::Result<()> {
    while let Some(l) = s.message().await.map_err(|e| status_error(endpoint, e))? {
        if kernel && l.boot_us > 0 {
            println!("{prefix}[{:>12.6}] {}", l.boot_us as f64 / 1e6, l.text);
        } else {
            println!("{prefix}{}", l.text);
        }
    }
    Ok(())
}

/// With `-n`, every node's lines as they come, each after its NODE column.
pub async fn dmesg(target: &Target, args: DmesgArgs) -> anyhow::Result<()> {
    let many = target.fans_out();
    let replies = target
        .each(|endpoint, mut c| async move {
            let s = c
                .dmesg(DmesgRequest {
                    follow: args.follow,
                })
                .await
                .map_err(|e| status_error(&endpoint, e))?
                .into_inner();
            print(&endpoint, s, true, &node_column(&endpoint, many)).await
        })
        .await?;
    one_or_all(many, replies)
}

/// With `-n`, every node's lines of the service as they come, each after its NODE column.
pub async fn logs(target: &Target, args: LogsArgs) -> anyhow::Result<()> {
    let many = target.fans_out();
    let replies = target
        .each(|endpoint, mut c| {
            let service = args.service.clone();
            async move {
                let s = c
                    .logs(LogsRequest {
                        service,
                        follow: args.follow,
                        tail: args.tail,
                    })
                    .await
                    .map_err(|e| status_error(&endpoint, e))?
                    .into_inner();
                print(&endpoint, s, false, &node_column(&endpoint, many)).await
            }
        })
        .await?;
    one_or_all(many, replies)
}

/// One node's result as it is; many nodes' through [`report`].
fn one_or_all(many: bool, replies: Vec<crate::fanout::Reply<()>>) -> anyhow::Result<()> {
    if many {
        return report(replies);
    }
    replies.into_iter().try_for_each(|r| r.result)
}
