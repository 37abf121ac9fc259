//! `plinth containers`.

use api::proto::ContainerListRequest;

use crate::connect::{status_error, Target};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let list = c
        .container_list(ContainerListRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .containers;
    match args.output {
        Format::Json => {
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
            println!("{}", serde_json::Value::Array(docs));
        }
        Format::Text if list.is_empty() => {
            println!("no containers (machine.containers in the node config runs them)");
        }
        Format::Text => {
            let width = list.iter().map(|c| c.image.len()).max().unwrap_or(5).max(5);
            println!(
                "{:<20} {:<width$} {:<8} {:>7} {:<9} {:>8} {:<8} LAST EXIT",
                "CONTAINER", "IMAGE", "TASK", "PID", "STATE", "RESTARTS", "HEALTHY"
            );
            for c in list {
                let pid = if c.pid > 0 {
                    c.pid.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{:<20} {:<width$} {:<8} {:>7} {:<9} {:>8} {:<8} {}",
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
        }
    }
    Ok(())
}
