//! `plinth bootchart`: the boot's timeline as a Chrome trace and an SVG chart.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use api::proto::EventsRequest;
use sequencer::{Event, EventKind};

use crate::chart;
use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the files to (created if missing).
    #[arg(short = 'o', long, value_name = "DIR", default_value = ".")]
    output_dir: PathBuf,
    /// File name without extension: writes NAME.json and NAME.svg.
    #[arg(long, default_value = "bootchart")]
    name: String,
}

/// Every event the node still keeps; they are all of the current boot, since the bus starts
/// afresh at each boot (with the initramfs's events handed over first).
async fn fetch(target: &Target) -> anyhow::Result<Vec<Event>> {
    let (endpoint, mut c) = target.connect().await?;
    let request = EventsRequest {
        tail: 0,
        // Every kept event, or an error if the start of the boot has already been dropped: a
        // chart without its beginning would mislead.
        since_id: Some(0),
        actor_id: String::new(),
        follow: false,
    };
    let mut stream = match c.events(request).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::OutOfRange => {
            return Err(status_error(&endpoint, s)
                .context("the node no longer keeps the start of this boot's events"))
        }
        Err(s) => return Err(status_error(&endpoint, s)),
    };
    let mut events = Vec::new();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| status_error(&endpoint, s))?
    {
        events.extend(api::convert::from_proto(&msg));
    }
    let has_sequences = events
        .iter()
        .any(|e| matches!(e.kind, EventKind::SequenceStart { .. }));
    if !has_sequences {
        bail!("{endpoint}: the node reported no sequence events");
    }
    Ok(events)
}

fn write(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    if args.name.is_empty() || args.name.contains(std::path::is_separator) {
        return Err(anyhow!(
            "--name {:?}: a file name without directories (use -o for the directory)",
            args.name
        ));
    }
    let events = fetch(target).await?;
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let json_path = args.output_dir.join(format!("{}.json", args.name));
    let svg_path = args.output_dir.join(format!("{}.svg", args.name));
    let trace = serde_json::to_vec_pretty(&chart::chrome_trace(&events))?;
    write(&json_path, &trace)?;
    write(&svg_path, chart::svg(&events).as_bytes())?;
    println!("{}", json_path.display());
    println!("{}", svg_path.display());
    Ok(())
}
