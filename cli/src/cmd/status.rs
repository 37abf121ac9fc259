//! `plinth status`.

use api::proto::StatusRequest;

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
    let s = c
        .status(StatusRequest {})
        .await
        .map_err(|e| status_error(&endpoint, e))?
        .into_inner();
    match args.output {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "endpoint": endpoint,
                "state": s.state,
                "superstate": s.superstate,
                "running_sequence": s.running_sequence,
                "running_actor_id": s.running_actor_id,
                "slot": s.slot,
                "boot_id": s.boot_id,
            })
        ),
        Format::Text => {
            println!("Node:     {endpoint}");
            println!("State:    {} ({})", s.state, s.superstate);
            if !s.running_sequence.is_empty() {
                println!(
                    "Running:  {} (actor {})",
                    s.running_sequence, s.running_actor_id
                );
            }
            println!("Slot:     {}", s.slot);
            println!("Boot ID:  {}", s.boot_id);
        }
    }
    Ok(())
}
