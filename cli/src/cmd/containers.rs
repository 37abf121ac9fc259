//! `plinth containers`.

use api::proto::{ContainerInfo, ContainerListRequest};

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
            c.container_list(ContainerListRequest {})
                .await
                .map(|r| r.into_inner().containers)
                .map_err(|s| status_error(&endpoint, s))
        })
        .await?;
    // One IMAGE column for every node's rows.
    let width = replies
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .flatten()
        .map(|c| c.image.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let none = replies
        .iter()
        .all(|r| r.result.as_ref().is_ok_and(Vec::is_empty));
    let show = Show {
        json: |_: &str, list: &Vec<ContainerInfo>| {
            let docs: Vec<_> = list
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c.name, "image": c.image, "task": c.task, "pid": c.pid,
                        "state": c.state, "restarts": c.restarts, "healthy": c.healthy,
                        "last_exit": c.last_exit,
                    })
                })
                .collect();
            serde_json::Value::Array(docs)
        },
        key: "containers",
        header: |many: bool| {
            if none {
                println!("no containers (machine.containers in the node config runs them)");
                return;
            }
            println!(
                "{}{:<20} {:<width$} {:<8} {:>7} {:<9} {:>8} {:<8} LAST EXIT",
                if many { NODE_HEADER } else { "" },
                "CONTAINER",
                "IMAGE",
                "TASK",
                "PID",
                "STATE",
                "RESTARTS",
                "HEALTHY"
            );
        },
        render: |endpoint: &str, many: bool, list: &Vec<ContainerInfo>| {
            for c in list {
                let pid = if c.pid > 0 {
                    c.pid.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{}{:<20} {:<width$} {:<8} {:>7} {:<9} {:>8} {:<8} {}",
                    node_column(endpoint, many),
                    c.name,
                    c.image,
                    c.task,
                    pid,
                    c.state,
                    c.restarts,
                    if c.healthy { "yes" } else { "no" },
                    if c.last_exit.is_empty() {
                        "-"
                    } else {
                        &c.last_exit
                    },
                );
            }
        },
    };
    print(target, replies, args.output, show)
}
