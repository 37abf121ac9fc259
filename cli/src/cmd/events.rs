//! `plinth events`.

use api::proto::EventsRequest;
use sequencer::{Event, EventKind};

use crate::connect::{status_error, Target};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Replay the last N kept events.
    #[arg(long, default_value_t = 100)]
    tail: u32,
    /// Replay every kept event after this id (instead of --tail).
    #[arg(long)]
    since_id: Option<u64>,
    /// Only events caused by this actor id.
    #[arg(long)]
    actor: Option<String>,
    /// Keep watching for new events.
    #[arg(short, long)]
    follow: bool,
    /// Output format (json: one event per line).
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

fn dur(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

fn err(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!(" FAILED: {e}"))
        .unwrap_or_default()
}

/// One event as a line of text.
pub fn describe(e: &Event) -> String {
    let what = match &e.kind {
        EventKind::SequenceStart { sequence } => format!("sequence {sequence} started"),
        EventKind::SequenceStop {
            sequence,
            duration_us,
            error,
        } => {
            format!(
                "sequence {sequence} stopped after {}{}",
                dur(*duration_us),
                err(error)
            )
        }
        EventKind::PhaseStart {
            sequence,
            phase,
            index,
            total,
        } => {
            format!("phase {index}/{total} {sequence}/{phase} started")
        }
        EventKind::PhaseStop {
            sequence,
            phase,
            duration_us,
            error,
        } => {
            format!(
                "phase {sequence}/{phase} stopped after {}{}",
                dur(*duration_us),
                err(error)
            )
        }
        EventKind::PhaseSkip { sequence, phase } => format!("phase {sequence}/{phase} skipped"),
        EventKind::TaskStart {
            sequence,
            phase,
            task,
        } => format!("task {sequence}/{phase}/{task} started"),
        EventKind::TaskStop {
            sequence,
            phase,
            task,
            duration_us,
            error,
        } => {
            format!(
                "task {sequence}/{phase}/{task} stopped after {}{}",
                dur(*duration_us),
                err(error)
            )
        }
        EventKind::StateChange { from, to } => format!("state {from} → {to}"),
        EventKind::RequestDenied { request, reason } => {
            format!("request {request} denied: {reason}")
        }
        EventKind::ApiReady { endpoint } => format!("API listening on {endpoint}"),
        EventKind::Service {
            service,
            state,
            message,
        } => format!("service {service} {state}: {message}"),
        EventKind::Extension {
            name,
            state,
            message,
        } => format!("extension {name} {state}: {message}"),
        EventKind::Workload {
            object,
            name,
            action,
            message,
        } => format!("{object} {name} {action}: {message}"),
        EventKind::Slot {
            slot,
            state,
            message,
        } => format!("slot {slot} {state}: {message}"),
        EventKind::Cluster {
            what,
            state,
            message,
        } => format!("{what} {state}: {message}"),
        EventKind::Progress {
            sequence,
            what,
            done,
            total,
        } => format!("{sequence}: {what} {done}/{total}"),
    };
    let actor = e
        .actor
        .as_ref()
        .map(|a| format!(" [actor {a}]"))
        .unwrap_or_default();
    format!(
        "{:>6} {:>10.3}s  {what}{actor}",
        e.id,
        e.boot_us as f64 / 1e6
    )
}

/// With `-n`, every node's events as they come, each line after its NODE column (JSON: each
/// event under `event`, beside `node`).
pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let many = target.fans_out();
    let replies = target
        .each(|endpoint, c| one(endpoint, c, &args, many))
        .await?;
    if many {
        return crate::fanout::report(replies);
    }
    replies.into_iter().try_for_each(|r| r.result)
}

async fn one(
    endpoint: String,
    mut c: api::proto::machine_client::MachineClient<tonic::transport::Channel>,
    args: &Args,
    many: bool,
) -> anyhow::Result<()> {
    let prefix = crate::fanout::node_column(&endpoint, many);
    let mut stream = c
        .events(EventsRequest {
            tail: args.tail,
            since_id: args.since_id,
            actor_id: args.actor.clone().unwrap_or_default(),
            follow: args.follow,
        })
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| status_error(&endpoint, s))?
    {
        let Some(event) = api::convert::from_proto(&msg) else {
            continue;
        };
        match (args.output, many) {
            (Format::Json, false) => println!("{}", serde_json::to_string(&event)?),
            (Format::Json, true) => println!(
                "{}",
                serde_json::json!({ "node": endpoint, "event": event })
            ),
            (Format::Text, _) => println!("{prefix}{}", describe(&event)),
        }
    }
    Ok(())
}
