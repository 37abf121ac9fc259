//! `plinth services`.

use api::proto::{ServiceInfo, ServiceListRequest};

use crate::connect::{status_error, Target};
use crate::fanout::{node_column, print, Show, NODE_HEADER};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let replies = target
        .each(|endpoint, mut c| async move {
            c.service_list(ServiceListRequest {})
                .await
                .map(|r| r.into_inner().services)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await?;
    let show = Show {
        json: |_: &str, list: &Vec<ServiceInfo>| {
            let docs: Vec<_> = list
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name, "state": s.state, "pid": s.pid, "restarts": s.restarts,
                        "healthy": s.healthy, "last_exit": s.last_exit, "depends_on": s.depends_on,
                    })
                })
                .collect();
            serde_json::Value::Array(docs)
        },
        key: "services",
        header: |many: bool| {
            println!(
                "{}{:<20} {:<9} {:>7} {:>8} {:<8} {:<24} DEPENDS ON",
                if many { NODE_HEADER } else { "" },
                "SERVICE",
                "STATE",
                "PID",
                "RESTARTS",
                "HEALTHY",
                "LAST EXIT"
            );
        },
        render: |endpoint: &str, many: bool, list: &Vec<ServiceInfo>| {
            for s in list {
                let pid = if s.pid > 0 {
                    s.pid.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{}{:<20} {:<9} {:>7} {:>8} {:<8} {:<24} {}",
                    node_column(endpoint, many),
                    s.name,
                    s.state,
                    pid,
                    s.restarts,
                    if s.healthy { "yes" } else { "no" },
                    if s.last_exit.is_empty() {
                        "-"
                    } else {
                        &s.last_exit
                    },
                    s.depends_on.join(",")
                );
            }
        },
    };
    print(target, replies, args.output, show)
}
