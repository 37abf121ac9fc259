//! A bootchart without a running node: from a saved log, or from a made-up boot.
//!
//! ```text
//! cargo run -p cli --example bootchart -- [EVENTS_FILE [OUT_DIR]]
//! ```
//!
//! EVENTS_FILE is either a VM's serial console log (the `plinth-trace {json}` lines, e.g. the
//! vm-tests' `serial.log`) or the output of `plinth events -o json --since-id 0` (one event per
//! line); only the last boot in it is drawn. Without a file, a made-up boot is drawn, to look at
//! the layout. Writes OUT_DIR (default `target/bootchart`)/bootchart.json and .svg.
//!
//! Against a live node, `plinth bootchart -e NODE -o DIR` does the same over the API.

// The CLI is a binary crate only, so the renderer is compiled in from its source.
#[path = "../src/chart.rs"]
mod chart;

use std::path::PathBuf;

use anyhow::Context as _;
use sequencer::{trace, Event, EventKind};

/// The events of the file, from its last boot (ids start again at each boot).
fn read_events(path: &str) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut events: Vec<Event> = Vec::new();
    for line in text.lines() {
        let event = trace::parse_line(line).or_else(|| serde_json::from_str(line.trim()).ok());
        let Some(event) = event else { continue };
        if events.last().is_some_and(|last| event.id <= last.id) {
            events.clear();
        }
        events.push(event);
    }
    Ok(events)
}

/// Phases with their tasks and how long each task runs (µs).
type Phases = &'static [(&'static str, &'static [(&'static str, u64)])];

/// A plausible boot: initramfs, then PID 1's initialize and boot, with one slow task.
fn made_up_boot() -> Vec<Event> {
    let mut events = Vec::new();
    let mut push = |boot_us: u64, kind: EventKind| {
        events.push(Event {
            id: events.len() as u64 + 1,
            unix_ms: 1_700_000_000_000 + boot_us / 1_000,
            boot_us,
            actor: None,
            kind,
        })
    };
    let s = |x: &str| x.to_string();
    let sequences: [(&str, u64, Phases); 3] = [
        (
            "initramfs",
            1_180_000,
            &[
                (
                    "mountPseudoFilesystems",
                    &[
                        ("mountProc", 400),
                        ("mountSys", 300),
                        ("mountDev", 1_100),
                        ("mountRun", 200),
                    ],
                ),
                ("loadModules", &[("loadModules", 62_000)]),
                ("mountEfivarfs", &[("mountEfivarfs", 900)]),
                ("findBootDisk", &[("findBootDisk", 140_000)]),
                ("mapRoot", &[("mapRoot", 410_000)]),
                ("mountRoot", &[("mountRoot", 5_000)]),
                ("switchRoot", &[("switchRoot", 2_500)]),
            ],
        ),
        (
            "initialize",
            1_870_000,
            &[
                ("handover", &[("readBootInfo", 200), ("mountTmp", 300)]),
                (
                    "mountPartitions",
                    &[("mountState", 35_000), ("mountEphemeral", 48_000)],
                ),
                ("loadConfig", &[("loadConfig", 4_000)]),
            ],
        ),
        (
            "boot",
            1_930_000,
            &[
                (
                    "network",
                    &[("setHostname", 600), ("configureNetwork", 820_000)],
                ),
                ("startApi", &[("startApi", 70_000)]),
            ],
        ),
    ];
    for (sequence, start, phases) in sequences {
        push(
            start,
            EventKind::SequenceStart {
                sequence: s(sequence),
            },
        );
        if sequence == "initialize" {
            push(
                start + 1,
                EventKind::StateChange {
                    from: s("maintenance"),
                    to: s("booting"),
                },
            );
        }
        let mut t = start + 20;
        for (i, (phase, tasks)) in phases.iter().enumerate() {
            let phase_start = t;
            push(
                t,
                EventKind::PhaseStart {
                    sequence: s(sequence),
                    phase: s(phase),
                    index: i + 1,
                    total: phases.len(),
                },
            );
            for (task, _) in tasks.iter() {
                t += 5;
                push(
                    t,
                    EventKind::TaskStart {
                        sequence: s(sequence),
                        phase: s(phase),
                        task: s(task),
                    },
                );
            }
            let mut ends: Vec<(u64, &str)> = tasks
                .iter()
                .enumerate()
                .map(|(k, (task, dur))| (phase_start + 5 * (k as u64 + 1) + dur, *task))
                .collect();
            ends.sort();
            for (end, task) in ends {
                t = t.max(end);
                push(
                    t,
                    EventKind::TaskStop {
                        sequence: s(sequence),
                        phase: s(phase),
                        task: s(task),
                        duration_us: end - phase_start,
                        error: None,
                    },
                );
                if task == "startApi" {
                    push(
                        t + 1,
                        EventKind::ApiReady {
                            endpoint: s("10.0.2.15:50000"),
                        },
                    );
                }
            }
            t += 30;
            push(
                t,
                EventKind::PhaseStop {
                    sequence: s(sequence),
                    phase: s(phase),
                    duration_us: t - phase_start,
                    error: None,
                },
            );
            t += 40;
        }
        push(
            t,
            EventKind::SequenceStop {
                sequence: s(sequence),
                duration_us: t - start,
                error: None,
            },
        );
        if sequence == "boot" {
            push(
                t + 50,
                EventKind::StateChange {
                    from: s("booting"),
                    to: s("running"),
                },
            );
        }
    }
    events
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events = match args.first() {
        Some(path) => read_events(path)?,
        None => made_up_boot(),
    };
    anyhow::ensure!(!events.is_empty(), "no events found");
    let dir = PathBuf::from(args.get(1).map_or("target/bootchart", String::as_str));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("bootchart.json");
    let svg_path = dir.join("bootchart.svg");
    let trace = serde_json::to_vec_pretty(&chart::chrome_trace(&events))?;
    std::fs::write(&json_path, trace)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&svg_path, chart::svg(&events))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    println!("{}", json_path.display());
    println!("{}", svg_path.display());
    Ok(())
}
