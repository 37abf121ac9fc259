//! `plinth services`.

use api::proto::ServiceListRequest;

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
        .service_list(ServiceListRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .services;
    match args.output {
        Format::Json => {
            let docs: Vec<_> = list
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name, "state": s.state, "pid": s.pid, "restarts": s.restarts,
                        "healthy": s.healthy, "last_exit": s.last_exit, "depends_on": s.depends_on,
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(docs));
        }
        Format::Text => {
            println!(
                "{:<20} {:<9} {:>7} {:>8} {:<8} {:<24} DEPENDS ON",
                "SERVICE", "STATE", "PID", "RESTARTS", "HEALTHY", "LAST EXIT"
            );
            for s in list {
                let pid = if s.pid > 0 {
                    s.pid.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{:<20} {:<9} {:>7} {:>8} {:<8} {:<24} {}",
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
        }
    }
    Ok(())
}
