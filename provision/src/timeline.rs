//! The boot timeline, read from the serial console.
//!
//! Host times come from when each console line arrived; the trace lines also carry the guest's
//! `CLOCK_BOOTTIME` (which starts at kernel entry). The first trace line ties the two clocks
//! together, so the kernel's start can be placed on the host axis and every phase with it.

use std::fmt::Write as _;
use std::time::Duration;

use sequencer::{trace, Event, EventKind};

use crate::serial::Line;

/// A phase as it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseSpan {
    /// Sequence name.
    pub sequence: String,
    /// Phase name.
    pub phase: String,
    /// Start on the host axis.
    pub start: Duration,
    /// Duration (from the stop event); `None` if it never stopped.
    pub duration: Option<Duration>,
    /// Error, if it failed.
    pub error: Option<String>,
}

/// The boot, stage by stage.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// The firmware's "starting Boot####" line and when it arrived.
    pub firmware_start_entry: Option<(Duration, String)>,
    /// Host time of the kernel's start (guest boot time 0).
    pub kernel_start: Option<Duration>,
    /// Trace events with their host time, in console order.
    pub events: Vec<(Duration, Event)>,
    /// When the API first answered, if known.
    pub api_ready: Option<Duration>,
}

fn us(d: u64) -> Duration {
    Duration::from_micros(d)
}

impl Timeline {
    /// Reads the console lines of one boot.
    pub fn from_lines(lines: &[Line], api_ready: Option<Duration>) -> Timeline {
        let mut t = Timeline {
            api_ready,
            ..Default::default()
        };
        for line in lines {
            if t.firmware_start_entry.is_none() && line.text.contains("BdsDxe: starting") {
                t.firmware_start_entry = Some((line.at, line.text.trim().to_string()));
            }
            if let Some(e) = trace::parse_line(&line.text) {
                if t.kernel_start.is_none() {
                    t.kernel_start = Some(line.at.saturating_sub(us(e.boot_us)));
                }
                let host = t.kernel_start.unwrap_or_default() + us(e.boot_us);
                t.events.push((host, e));
            }
        }
        t
    }

    /// Phases in the order they started.
    pub fn phases(&self) -> Vec<PhaseSpan> {
        let mut spans: Vec<PhaseSpan> = Vec::new();
        for (at, e) in &self.events {
            match &e.kind {
                EventKind::PhaseStart {
                    sequence, phase, ..
                } => spans.push(PhaseSpan {
                    sequence: sequence.clone(),
                    phase: phase.clone(),
                    start: *at,
                    duration: None,
                    error: None,
                }),
                EventKind::PhaseStop {
                    sequence,
                    phase,
                    duration_us,
                    error,
                } => {
                    if let Some(s) = spans.iter_mut().rev().find(|s| {
                        &s.sequence == sequence && &s.phase == phase && s.duration.is_none()
                    }) {
                        s.duration = Some(us(*duration_us));
                        s.error = error.clone();
                    }
                }
                _ => {}
            }
        }
        spans
    }

    /// The tasks of one phase run: name, start, duration (`None` if it never stopped).
    fn tasks_of(&self, p: &PhaseSpan) -> Vec<(String, Duration, Option<Duration>)> {
        let end = p.duration.map(|d| p.start + d);
        let mut tasks: Vec<(String, Duration, Option<Duration>)> = Vec::new();
        for (at, e) in &self.events {
            if *at < p.start || end.is_some_and(|end| *at > end) {
                continue;
            }
            match &e.kind {
                EventKind::TaskStart {
                    sequence,
                    phase,
                    task,
                } if *sequence == p.sequence && *phase == p.phase => {
                    tasks.push((task.clone(), *at, None));
                }
                EventKind::TaskStop {
                    sequence,
                    phase,
                    task,
                    duration_us,
                    ..
                } if *sequence == p.sequence && *phase == p.phase => {
                    if let Some(t) = tasks
                        .iter_mut()
                        .rev()
                        .find(|t| t.0 == *task && t.2.is_none())
                    {
                        t.2 = Some(us(*duration_us));
                    }
                }
                _ => {}
            }
        }
        tasks
    }

    /// `sequence/phase` names in start order.
    pub fn phase_order(&self) -> Vec<String> {
        self.phases()
            .into_iter()
            .map(|p| format!("{}/{}", p.sequence, p.phase))
            .collect()
    }

    /// Host time of the first event matching `f`.
    pub fn first(&self, f: impl Fn(&EventKind) -> bool) -> Option<Duration> {
        self.events
            .iter()
            .find(|(_, e)| f(&e.kind))
            .map(|(at, _)| *at)
    }

    /// The timeline as a table (milliseconds since QEMU started).
    pub fn render(&self) -> String {
        let ms = |d: Duration| d.as_millis();
        let mut out = String::from("boot timeline (ms since QEMU started)\n");
        let fw_end = self.firmware_start_entry.as_ref().map(|(at, _)| *at);
        if let Some((at, line)) = &self.firmware_start_entry {
            let _ = writeln!(
                out,
                "  {:<34} {:>7} → {:>7}   {line}",
                "firmware (OVMF)",
                0,
                ms(*at)
            );
        }
        if let Some(k) = self.kernel_start {
            let _ = writeln!(
                out,
                "  {:<34} {:>7} → {:>7}",
                "systemd-stub + kernel load",
                ms(fw_end.unwrap_or_default()),
                ms(k)
            );
        }
        let mut current_seq = String::new();
        for p in self.phases() {
            if p.sequence != current_seq {
                let seq_start = self.first(|k| matches!(k, EventKind::SequenceStart { sequence } if *sequence == p.sequence));
                let seq_dur = self.events.iter().find_map(|(_, e)| match &e.kind {
                    EventKind::SequenceStop {
                        sequence,
                        duration_us,
                        ..
                    } if *sequence == p.sequence => Some(us(*duration_us)),
                    _ => None,
                });
                let start = seq_start.unwrap_or(p.start);
                let end = seq_dur
                    .map(|d| ms(start + d).to_string())
                    .unwrap_or_else(|| "…".into());
                let label = if p.sequence == "initramfs" {
                    "initramfs (machined as /init)".to_string()
                } else {
                    format!("{} (machined, PID 1)", p.sequence)
                };
                let _ = writeln!(out, "  {label:<34} {:>7} → {end:>7}", ms(start));
                current_seq = p.sequence.clone();
            }
            let dur = p
                .duration
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "did not finish".into());
            let err = p
                .error
                .as_ref()
                .map(|e| format!("  FAILED: {e}"))
                .unwrap_or_default();
            let _ = writeln!(out, "    {:<32} {:>7}   {dur}{err}", p.phase, ms(p.start));
            // A phase's tasks run side by side: which one held the phase is the question.
            for (task, start, took) in self.tasks_of(&p) {
                let took = took
                    .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_else(|| "did not finish".into());
                let _ = writeln!(out, "      {task:<30} {:>7}   {took}", ms(start));
            }
        }
        if let Some(at) = self.first(|k| matches!(k, EventKind::ApiReady { .. })) {
            let _ = writeln!(out, "  {:<34} {:>7}", "API ready", ms(at));
        }
        if let Some(at) = self.api_ready {
            let _ = writeln!(out, "  {:<34} {:>7}", "API answered Version (host)", ms(at));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at_ms: u64, text: String) -> Line {
        Line {
            at: Duration::from_millis(at_ms),
            text,
        }
    }

    fn ev(id: u64, boot_ms: u64, kind: EventKind) -> String {
        trace::format_line(&Event {
            id,
            unix_ms: 0,
            boot_us: boot_ms * 1000,
            actor: None,
            kind,
        })
    }

    #[test]
    fn the_first_trace_line_places_the_kernel_start_and_phases_follow_in_order() {
        let phase = |s: &str, p: &str| EventKind::PhaseStart {
            sequence: s.into(),
            phase: p.into(),
            index: 1,
            total: 1,
        };
        let stop = |s: &str, p: &str| EventKind::PhaseStop {
            sequence: s.into(),
            phase: p.into(),
            duration_us: 5000,
            error: None,
        };
        let lines = vec![
            line(
                100,
                "BdsDxe: starting Boot0002 \"UEFI QEMU NVMe Ctrl plinth0 1\"".into(),
            ),
            line(
                3000,
                ev(
                    1,
                    2000,
                    EventKind::SequenceStart {
                        sequence: "initramfs".into(),
                    },
                ),
            ),
            line(
                3000,
                ev(2, 2000, phase("initramfs", "mountPseudoFilesystems")),
            ),
            line(
                3010,
                ev(3, 2005, stop("initramfs", "mountPseudoFilesystems")),
            ),
            line(3500, ev(4, 2400, phase("boot", "mountPartitions"))),
            line(3600, "random kernel noise".into()),
        ];
        let t = Timeline::from_lines(&lines, Some(Duration::from_millis(4000)));
        assert_eq!(t.kernel_start, Some(Duration::from_millis(1000)));
        assert_eq!(
            t.phase_order(),
            ["initramfs/mountPseudoFilesystems", "boot/mountPartitions"]
        );
        assert_eq!(t.phases()[0].duration, Some(Duration::from_millis(5)));
        let text = t.render();
        assert!(
            text.contains("firmware (OVMF)") && text.contains("mountPseudoFilesystems"),
            "{text}"
        );
    }

    #[test]
    fn a_phases_tasks_are_listed_under_it_with_their_own_times() {
        let task = |t: &str| EventKind::TaskStart {
            sequence: "initialize".into(),
            phase: "mountPartitions".into(),
            task: t.into(),
        };
        let done = |t: &str, ms: u64| EventKind::TaskStop {
            sequence: "initialize".into(),
            phase: "mountPartitions".into(),
            task: t.into(),
            duration_us: ms * 1000,
            error: None,
        };
        let lines = vec![
            line(
                1000,
                ev(
                    1,
                    1000,
                    EventKind::PhaseStart {
                        sequence: "initialize".into(),
                        phase: "mountPartitions".into(),
                        index: 1,
                        total: 1,
                    },
                ),
            ),
            line(1001, ev(2, 1001, task("mountState"))),
            line(1002, ev(3, 1002, task("mountEsp"))),
            line(1020, ev(4, 1020, done("mountEsp", 18))),
            line(1060, ev(5, 1060, done("mountState", 59))),
            line(
                1061,
                ev(
                    6,
                    1061,
                    EventKind::PhaseStop {
                        sequence: "initialize".into(),
                        phase: "mountPartitions".into(),
                        duration_us: 61_000,
                        error: None,
                    },
                ),
            ),
            // The same task name in a later phase is not this phase's.
            line(1100, ev(7, 1100, task("mountState"))),
        ];
        let t = Timeline::from_lines(&lines, None);
        let text = t.render();
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("      ")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(
            rows[0].contains("mountState") && rows[0].ends_with("59.0 ms"),
            "{text}"
        );
        assert!(
            rows[1].contains("mountEsp") && rows[1].ends_with("18.0 ms"),
            "{text}"
        );
    }
}
