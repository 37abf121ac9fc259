//! `plinth dmesg` and `plinth logs`.

use api::proto::{DmesgRequest, LogsRequest};

use crate::connect::{status_error, Target};

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

async fn print(
    endpoint: &str,
    mut s: tonic::Streaming<api::proto::LogLine>,
    kernel: bool,
) -> anyhow::Result<()> {
    while let Some(l) = s.message().await.map_err(|e| status_error(endpoint, e))? {
        if kernel && l.boot_us > 0 {
            println!("[{:>12.6}] {}", l.boot_us as f64 / 1e6, l.text);
        } else {
            println!("{}", l.text);
        }
    }
    Ok(())
}

pub async fn dmesg(target: &Target, args: DmesgArgs) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let s = c
        .dmesg(DmesgRequest {
            follow: args.follow,
        })
        .await
        .map_err(|e| status_error(&endpoint, e))?
        .into_inner();
    print(&endpoint, s, true).await
}

pub async fn logs(target: &Target, args: LogsArgs) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let s = c
        .logs(LogsRequest {
            service: args.service,
            follow: args.follow,
            tail: args.tail,
        })
        .await
        .map_err(|e| status_error(&endpoint, e))?
        .into_inner();
    print(&endpoint, s, false).await
}
