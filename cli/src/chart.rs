//! The boot as pictures: one boot's events as spans on a time axis, as a Chrome trace-event file
//! (Perfetto, chrome://tracing) and as an SVG bootchart.
//!
//! Pure functions of the events, so they can be tested with made-up boots. Times are `boot_us`,
//! microseconds since the kernel started: the initramfs's events and PID 1's share that clock,
//! so every sequence of the boot sits on one axis.

use std::fmt::Write as _;

use sequencer::{Event, EventKind};
use serde_json::{json, Map, Value};

/// What a [`Span`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A run of a sequence.
    Sequence,
    /// A phase of a sequence.
    Phase,
    /// A task of a phase.
    Task,
}

impl Level {
    /// Nesting depth: 0 for a sequence, 1 for a phase, 2 for a task.
    pub fn depth(self) -> usize {
        match self {
            Level::Sequence => 0,
            Level::Phase => 1,
            Level::Task => 2,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Sequence => "sequence",
            Level::Phase => "phase",
            Level::Task => "task",
        }
    }
}

/// A sequence, phase or task as it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The sequence run it belongs to: 0 for the first sequence started, 1 for the next, ...
    pub lane: usize,
    /// Sequence, phase or task.
    pub level: Level,
    /// Sequence name.
    pub sequence: String,
    /// Phase name, for a task.
    pub phase: Option<String>,
    /// Its own name: the sequence's, the phase's or the task's.
    pub name: String,
    /// Microseconds since the kernel started.
    pub start_us: u64,
    /// How long it ran; if unfinished, up to the end of its parent or of the chart.
    pub dur_us: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// It started but never stopped: still running, or dropped with its aborted phase.
    pub unfinished: bool,
    /// A conditional phase that did not run (zero length).
    pub skipped: bool,
    /// The request that caused it, if one did.
    pub actor: Option<String>,
}

impl Span {
    /// Microseconds since the kernel started, at its end.
    pub fn end_us(&self) -> u64 {
        self.start_us.saturating_add(self.dur_us)
    }

    /// `sequence/phase/task`, as far as it goes.
    fn path(&self) -> String {
        match (self.level, &self.phase) {
            (Level::Sequence, _) => self.sequence.clone(),
            (Level::Task, Some(phase)) => format!("{}/{phase}/{}", self.sequence, self.name),
            _ => format!("{}/{}", self.sequence, self.name),
        }
    }
}

/// The time of the last event: where unfinished spans and the chart end.
fn chart_end_us(events: &[Event]) -> u64 {
    events.iter().map(|e| e.boot_us).max().unwrap_or(0)
}

struct Node {
    span: Span,
    parent: Option<usize>,
    open: bool,
}

/// Pairs starts with stops. Parents are always pushed before their children.
#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    lanes: usize,
}

impl Builder {
    fn push(
        &mut self,
        parent: Option<usize>,
        level: Level,
        (sequence, phase, name): (&str, Option<&str>, &str),
        start_us: u64,
        actor: &Option<String>,
    ) -> usize {
        let lane = match parent {
            Some(p) => self.nodes[p].span.lane,
            None => {
                self.lanes += 1;
                self.lanes - 1
            }
        };
        self.nodes.push(Node {
            span: Span {
                lane,
                level,
                sequence: sequence.to_owned(),
                phase: phase.map(str::to_owned),
                name: name.to_owned(),
                start_us,
                dur_us: 0,
                error: None,
                unfinished: false,
                skipped: false,
                actor: actor.clone(),
            },
            parent,
            open: true,
        });
        self.nodes.len() - 1
    }

    fn is(n: &Node, level: Level, (sequence, phase, name): (&str, Option<&str>, &str)) -> bool {
        n.span.level == level
            && n.span.sequence == sequence
            && n.span.phase.as_deref() == phase
            && n.span.name == name
    }

    /// The latest start of this name that has no stop yet.
    fn open(&self, level: Level, key: (&str, Option<&str>, &str)) -> Option<usize> {
        self.nodes
            .iter()
            .rposition(|n| n.open && Self::is(n, level, key))
    }

    /// The latest of this name, open ones first.
    fn latest(&self, level: Level, key: (&str, Option<&str>, &str)) -> Option<usize> {
        self.open(level, key)
            .or_else(|| self.nodes.iter().rposition(|n| Self::is(n, level, key)))
    }

    /// The sequence run a phase belongs to; made up if its start is not among the events.
    fn sequence_of(&mut self, sequence: &str, at_us: u64, actor: &Option<String>) -> usize {
        let key = (sequence, None, sequence);
        match self.latest(Level::Sequence, key) {
            Some(i) => i,
            None => self.push(None, Level::Sequence, key, at_us, actor),
        }
    }

    /// The phase run a task belongs to; made up if its start is not among the events.
    fn phase_of(
        &mut self,
        sequence: &str,
        phase: &str,
        at_us: u64,
        actor: &Option<String>,
    ) -> usize {
        let key = (sequence, None, phase);
        match self.latest(Level::Phase, key) {
            Some(i) => i,
            None => {
                let parent = self.sequence_of(sequence, at_us, actor);
                self.push(Some(parent), Level::Phase, key, at_us, actor)
            }
        }
    }

    fn start(&mut self, level: Level, key: (&str, Option<&str>, &str), e: &Event) -> usize {
        let parent = match (level, key.1) {
            (Level::Sequence, _) => None,
            (Level::Phase, _) => Some(self.sequence_of(key.0, e.boot_us, &e.actor)),
            (Level::Task, phase) => {
                Some(self.phase_of(key.0, phase.unwrap_or_default(), e.boot_us, &e.actor))
            }
        };
        self.push(parent, level, key, e.boot_us, &e.actor)
    }

    fn stop(
        &mut self,
        level: Level,
        key: (&str, Option<&str>, &str),
        e: &Event,
        duration_us: u64,
        error: &Option<String>,
    ) {
        let i = match self.open(level, key) {
            Some(i) => i,
            // The start is not among the events (it fell out of the node's ring): place the
            // span by its duration.
            None => {
                let started = Event {
                    boot_us: e.boot_us.saturating_sub(duration_us),
                    ..e.clone()
                };
                self.start(level, key, &started)
            }
        };
        let n = &mut self.nodes[i];
        n.open = false;
        // The stop's own timestamp rather than `duration_us`: with both ends read from the bus's
        // clock (in publish order), every phase lies inside its sequence and every task inside
        // its phase, which the Chrome trace's slices need.
        n.span.dur_us = e.boot_us.saturating_sub(n.span.start_us);
        n.span.error = error.clone();
    }

    fn add(&mut self, e: &Event) {
        match &e.kind {
            EventKind::SequenceStart { sequence } => {
                self.start(Level::Sequence, (sequence, None, sequence), e);
            }
            EventKind::SequenceStop {
                sequence,
                duration_us,
                error,
            } => self.stop(
                Level::Sequence,
                (sequence, None, sequence),
                e,
                *duration_us,
                error,
            ),
            EventKind::PhaseStart {
                sequence, phase, ..
            } => {
                self.start(Level::Phase, (sequence, None, phase), e);
            }
            EventKind::PhaseStop {
                sequence,
                phase,
                duration_us,
                error,
            } => self.stop(
                Level::Phase,
                (sequence, None, phase),
                e,
                *duration_us,
                error,
            ),
            EventKind::PhaseSkip { sequence, phase } => {
                let i = self.start(Level::Phase, (sequence, None, phase), e);
                self.nodes[i].open = false;
                self.nodes[i].span.skipped = true;
            }
            EventKind::TaskStart {
                sequence,
                phase,
                task,
            } => {
                self.start(Level::Task, (sequence, Some(phase.as_str()), task), e);
            }
            EventKind::TaskStop {
                sequence,
                phase,
                task,
                duration_us,
                error,
            } => self.stop(
                Level::Task,
                (sequence, Some(phase.as_str()), task),
                e,
                *duration_us,
                error,
            ),
            EventKind::StateChange { .. }
            | EventKind::RequestDenied { .. }
            | EventKind::ApiReady { .. }
            | EventKind::Service { .. }
            | EventKind::Extension { .. }
            | EventKind::Workload { .. }
            | EventKind::Cluster { .. }
            | EventKind::Slot { .. }
            | EventKind::Progress { .. } => {}
        }
    }

    /// Ends what never stopped and lists the spans parent first.
    fn finish(mut self, end_us: u64) -> Vec<Span> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].open {
                continue;
            }
            // A child cannot outlive a parent that stopped (an aborted phase drops its tasks);
            // parents come first, so the parent's end is settled already.
            let until = match self.nodes[i].parent {
                Some(p) => self.nodes[p].span.end_us(),
                None => end_us,
            };
            let span = &mut self.nodes[i].span;
            span.dur_us = until.saturating_sub(span.start_us);
            span.unfinished = true;
        }
        let mut roots = Vec::new();
        let mut children = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            match n.parent {
                Some(p) => children[p].push(i),
                None => roots.push(i),
            }
        }
        // Stable: children that start together stay in event order.
        for c in &mut children {
            c.sort_by_key(|&i| self.nodes[i].span.start_us);
        }
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<usize> = roots.into_iter().rev().collect();
        while let Some(i) = stack.pop() {
            order.push(i);
            stack.extend(children[i].iter().rev());
        }
        let mut spans: Vec<Option<Span>> = self.nodes.into_iter().map(|n| Some(n.span)).collect();
        order.into_iter().filter_map(|i| spans[i].take()).collect()
    }
}

/// The sequences, phases and tasks of `events` (in publish order, as the API and the console
/// give them), each sequence run followed by its phases in start order, each phase by its tasks.
///
/// A stop pairs with the latest start of the same sequence/phase/task that has no stop yet. A
/// start without a stop is unfinished: it runs to the end of its parent if that stopped, else to
/// the last event.
pub fn timeline(events: &[Event]) -> Vec<Span> {
    let mut b = Builder::default();
    for e in events {
        b.add(e);
    }
    b.finish(chart_end_us(events))
}

/// A display name per lane: the sequence's, with `#n` when the boot ran it more than once.
fn lane_names(spans: &[Span]) -> Vec<String> {
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.level == Level::Sequence)
        .collect();
    let mut names = vec![String::new(); roots.iter().map(|s| s.lane + 1).max().unwrap_or(0)];
    for (k, s) in roots.iter().enumerate() {
        let runs = roots.iter().filter(|r| r.name == s.name).count();
        let nth = roots[..=k].iter().filter(|r| r.name == s.name).count();
        names[s.lane] = if runs > 1 {
            format!("{} #{nth}", s.name)
        } else {
            s.name.clone()
        };
    }
    names
}

/// A stretch of time one state held: the node's lifecycle state or a service's.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Band {
    start_us: u64,
    end_us: u64,
    state: String,
    /// What the events said while it held, for tooltips.
    notes: Vec<String>,
}

/// Bands from `(time, state, note)` changes in order: each state holds until the next different
/// one, the last until `end_us`.
fn bands<'a>(changes: impl IntoIterator<Item = (u64, &'a str, String)>, end_us: u64) -> Vec<Band> {
    let mut out: Vec<Band> = Vec::new();
    for (at, state, note) in changes {
        if let Some(last) = out.last_mut() {
            if last.state == state {
                last.notes.push(note);
                continue;
            }
            last.end_us = at;
        }
        out.push(Band {
            start_us: at,
            end_us: end_us.max(at),
            state: state.to_owned(),
            notes: vec![note],
        });
    }
    out
}

/// The node's lifecycle states, from its state changes.
fn lifecycle_bands(events: &[Event]) -> Vec<Band> {
    let changes = events.iter().filter_map(|e| match &e.kind {
        EventKind::StateChange { from, to } => Some((
            e.boot_us,
            to.as_str(),
            format!("{} {from} → {to}", fmt_ms(e.boot_us)),
        )),
        _ => None,
    });
    bands(changes, chart_end_us(events))
}

/// Each supervised service's states, services in the order they first appear.
fn service_bands(events: &[Event]) -> Vec<(String, Vec<Band>)> {
    let mut names: Vec<&str> = Vec::new();
    for e in events {
        if let EventKind::Service { service, .. } = &e.kind {
            if !names.contains(&service.as_str()) {
                names.push(service);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let changes = events.iter().filter_map(|e| match &e.kind {
                EventKind::Service {
                    service,
                    state,
                    message,
                } if service == name => Some((
                    e.boot_us,
                    state.as_str(),
                    format!("{} {state}: {message}", fmt_ms(e.boot_us)),
                )),
                _ => None,
            });
            (name.to_owned(), bands(changes, chart_end_us(events)))
        })
        .collect()
}

const PID: u64 = 1;
/// The thread carrying lifecycle instants; sequence runs follow.
const LIFECYCLE_TID: u64 = 1;

fn metadata(name: &str, tid: u64, args: Value) -> Value {
    json!({"name": name, "ph": "M", "pid": PID, "tid": tid, "args": args})
}

fn thread(tid: u64, name: &str) -> [Value; 2] {
    [
        metadata("thread_name", tid, json!({ "name": name })),
        // Keeps the tracks in boot order rather than alphabetical.
        metadata("thread_sort_index", tid, json!({ "sort_index": tid })),
    ]
}

fn complete(s: &Span, tid: u64) -> Value {
    let mut args = Map::new();
    args.insert("sequence".into(), json!(s.sequence));
    if let Some(phase) = &s.phase {
        args.insert("phase".into(), json!(phase));
    }
    if let Some(error) = &s.error {
        args.insert("error".into(), json!(error));
    }
    if s.unfinished {
        args.insert("unfinished".into(), json!(true));
    }
    if s.skipped {
        args.insert("skipped".into(), json!(true));
    }
    if let Some(actor) = &s.actor {
        args.insert("actor".into(), json!(actor));
    }
    let mut ev = Map::new();
    ev.insert("name".into(), json!(s.name));
    ev.insert("cat".into(), json!(s.level.as_str()));
    ev.insert("ph".into(), json!("X"));
    ev.insert("ts".into(), json!(s.start_us));
    ev.insert("dur".into(), json!(s.dur_us));
    ev.insert("pid".into(), json!(PID));
    ev.insert("tid".into(), json!(tid));
    ev.insert("args".into(), Value::Object(args));
    // chrome://tracing's reserved colour names; Perfetto colours by name and ignores them.
    if s.error.is_some() {
        ev.insert("cname".into(), json!("terrible"));
    } else if s.unfinished {
        ev.insert("cname".into(), json!("grey"));
    }
    Value::Object(ev)
}

fn instant(e: &Event, name: String, scope: &str, mut args: Map<String, Value>) -> Value {
    if let Some(actor) = &e.actor {
        args.insert("actor".into(), json!(actor));
    }
    json!({
        "name": name, "cat": e.kind.name(), "ph": "i", "s": scope, "ts": e.boot_us,
        "pid": PID, "tid": LIFECYCLE_TID, "args": args,
    })
}

fn args<const N: usize>(pairs: [(&str, &str); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect()
}

/// The boot as a Chrome trace-event document (JSON object form), for Perfetto or
/// chrome://tracing: `ts`/`dur` in microseconds since kernel start.
///
/// Each sequence run is a thread holding the sequence and its phases as complete ("X") slices.
/// A phase's tasks run concurrently, and slices on one thread must nest, so tasks go on task
/// threads of their own: each takes the first one free when it starts. Each supervised service
/// is a thread of its states. State changes, denied requests and the API becoming ready are
/// instants on a "lifecycle" thread.
pub fn chrome_trace(events: &[Event]) -> Value {
    let spans = timeline(events);
    let names = lane_names(&spans);
    let mut trace = vec![metadata(
        "process_name",
        LIFECYCLE_TID,
        json!({"name": "plinth boot"}),
    )];
    trace.extend(thread(LIFECYCLE_TID, "lifecycle"));
    let mut next_tid = LIFECYCLE_TID + 1;
    for (lane, name) in names.iter().enumerate() {
        let main = next_tid;
        next_tid += 1;
        trace.extend(thread(main, name));
        let in_lane = || spans.iter().filter(move |s| s.lane == lane);
        trace.extend(
            in_lane()
                .filter(|s| s.level != Level::Task)
                .map(|s| complete(s, main)),
        );
        let mut tasks: Vec<&Span> = in_lane().filter(|s| s.level == Level::Task).collect();
        tasks.sort_by_key(|s| s.start_us);
        // (tid, busy until)
        let mut tracks: Vec<(u64, u64)> = Vec::new();
        for s in tasks {
            let tid = match tracks.iter_mut().find(|(_, until)| *until <= s.start_us) {
                Some(track) => {
                    track.1 = s.end_us();
                    track.0
                }
                None => {
                    let tid = next_tid;
                    next_tid += 1;
                    let label = match tracks.len() {
                        0 => format!("{name} tasks"),
                        n => format!("{name} tasks ({})", n + 1),
                    };
                    trace.extend(thread(tid, &label));
                    tracks.push((tid, s.end_us()));
                    tid
                }
            };
            trace.push(complete(s, tid));
        }
    }
    for (service, bands) in service_bands(events) {
        let tid = next_tid;
        next_tid += 1;
        trace.extend(thread(tid, &format!("service {service}")));
        for b in bands {
            let mut ev = json!({
                "name": b.state, "cat": "service", "ph": "X", "ts": b.start_us,
                "dur": b.end_us - b.start_us, "pid": PID, "tid": tid,
                "args": {"service": service, "events": b.notes},
            });
            if b.state == "failed" {
                ev["cname"] = json!("terrible");
            }
            trace.push(ev);
        }
    }
    for e in events {
        trace.push(match &e.kind {
            EventKind::StateChange { from, to } => instant(
                e,
                format!("{from} → {to}"),
                "t",
                args([("from", from.as_str()), ("to", to.as_str())]),
            ),
            EventKind::RequestDenied { request, reason } => instant(
                e,
                format!("{request} denied"),
                "t",
                args([("request", request.as_str()), ("reason", reason.as_str())]),
            ),
            // Global: a line across every track marks when the node became reachable.
            EventKind::ApiReady { endpoint } => instant(
                e,
                "API ready".into(),
                "g",
                args([("endpoint", endpoint.as_str())]),
            ),
            _ => continue,
        });
    }
    json!({
        "traceEvents": trace,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "plinth bootchart",
            "clock": "microseconds since kernel start (CLOCK_BOOTTIME)",
        },
    })
}

/// Text for XML: the five special characters escaped, and the control characters XML 1.0
/// forbids dropped (a task's error can carry terminal escapes).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters, with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn fmt_dur(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 10_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn fmt_ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

/// A round tick step (1, 2 or 5 times a power of ten, in µs) giving five to ten ticks, and the
/// axis end: the last event rounded up to a tick.
fn axis(end_us: u64) -> (f64, f64) {
    let end = (end_us as f64).max(1.0);
    let raw = end / 10.0;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    (step, (end / step).ceil().max(1.0) * step)
}

fn tick_label(us: f64, step_us: f64) -> String {
    let ms = us / 1e3;
    let step_ms = step_us / 1e3;
    if step_ms >= 1.0 {
        format!("{ms:.0}")
    } else {
        let decimals = (-step_ms.log10()).ceil().max(0.0) as usize;
        format!("{ms:.decimals$}")
    }
}

const PAD: f64 = 16.0;
const ROW_H: f64 = 18.0;
const BAR_H: f64 = 12.0;
const PLOT_W: f64 = 1000.0;
/// Room right of the plot for the labels of bars that end late.
const RIGHT_ROOM: f64 = 220.0;
/// Monospace at 12px: 0.6em per character.
const CHAR_W: f64 = 7.2;
const INDENT: f64 = 14.0;
const HEADER_H: f64 = 84.0;

const STYLE: &str = "
text{font-family:monospace;font-size:12px;fill:#222}
.title{font-size:16px;font-weight:bold}
.dim{fill:#666}
.name0{font-weight:bold}
.axis{stroke:#888}
.grid{stroke:#e6e6e6}
.band{fill:#f2f6fb}
.kernel{fill:#c9c9c9}
.sequence{fill:#35608f}
.phase{fill:#6c9fd2}
.task{fill:#9fcb85}
.failed{fill:#d9534f;stroke:#8f1f1c}
.unfinished{fill:url(#hatch);stroke:#b7791f;stroke-dasharray:3 2}
.skipped{fill:#fff;stroke:#888}
.err{fill:#b52b27;font-weight:bold}
.warn{fill:#9a6412}
.api{stroke:#2e8b57;stroke-width:1.5;stroke-dasharray:5 3;stroke-opacity:.7}
.apitext{fill:#2e8b57}
.denied{fill:#d9534f}
";

fn text_w(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_W
}

/// Where a bar's label goes: after the bar if it fits in the plot and its margin, else before
/// the bar if that stays clear of the names, else after it anyway (the image grows).
fn label_x(bar_x0: f64, bar_x1: f64, label: &str, plot_x0: f64) -> (f64, &'static str) {
    let w = text_w(label);
    if bar_x1 + 4.0 + w <= plot_x0 + PLOT_W + RIGHT_ROOM {
        (bar_x1 + 4.0, "start")
    } else if bar_x0 - 4.0 - w >= plot_x0 {
        (bar_x0 - 4.0, "end")
    } else {
        (bar_x1 + 4.0, "start")
    }
}

/// A colour per lifecycle or service state, so a state reads the same everywhere.
fn state_fill(state: &str) -> &'static str {
    match state {
        "running" => "#b9e0a5",
        "failed" => "#d9534f",
        "booting" | "installing" => "#d6e4f5",
        "maintenance" | "waiting" => "#fbeab0",
        "backoff" => "#f6c48f",
        "upgrading" | "rolling_back" => "#e6d8f2",
        _ => "#e6e6e6",
    }
}

/// One row of state bands, each with its tooltip and, where it fits, its name.
fn band_row(
    body: &mut String,
    what: &str,
    bands: &[Band],
    by: f64,
    ty: f64,
    x: impl Fn(u64) -> f64,
) {
    for (i, b) in bands.iter().enumerate() {
        let (x0, x1) = (x(b.start_us), x(b.end_us));
        let w = (x1 - x0).max(1.0);
        let tip = format!(
            "{what} {} from {} for {}\n{}",
            b.state,
            fmt_ms(b.start_us),
            fmt_dur(b.end_us - b.start_us),
            b.notes.join("\n")
        );
        let _ = write!(
            body,
            r##"<g><title>{}</title><rect x="{x0:.1}" y="{by:.1}" width="{w:.1}" height="{BAR_H:.1}" fill="{}" stroke="#999"/>"##,
            esc(&tip),
            state_fill(&b.state),
        );
        if text_w(&b.state) + 6.0 <= w {
            let _ = write!(
                body,
                r#"<text x="{:.1}" y="{ty:.1}">{}</text>"#,
                x0 + 3.0,
                esc(&b.state)
            );
        } else if i + 1 == bands.len() {
            // The state the chart ends in matters most (a service that just failed): name it
            // beside its band.
            let _ = write!(
                body,
                r#"<text x="{:.1}" y="{ty:.1}" class="dim">{}</text>"#,
                x0 + w + 4.0,
                esc(&b.state)
            );
        }
        body.push_str("</g>");
    }
}

/// The boot as an SVG bootchart: a time axis in milliseconds since kernel start; a row from
/// kernel start to the first event; a lifecycle row with the node's states; then one row per
/// sequence run, its phases under it and their tasks under each phase, names on the left and
/// a bar with its duration on the right; last, a row of states per supervised service. Failed
/// bars are red with the error in their label and tooltip, unfinished ones hatched, skipped
/// phases a hollow marker. A dashed green line marks when the API became ready. Every bar has a
/// `<title>` tooltip with the details.
pub fn svg(events: &[Event]) -> String {
    let spans = timeline(events);
    let names = lane_names(&spans);
    let end_us = chart_end_us(events);
    let first_us = events.iter().map(|e| e.boot_us).min().unwrap_or(0);
    let (step_us, axis_us) = axis(end_us);
    let scale = PLOT_W / axis_us;

    let states = lifecycle_bands(events);
    let services = service_bands(events);
    let denied: Vec<(&Event, &str, &str)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::RequestDenied { request, reason } => {
                Some((e, request.as_str(), reason.as_str()))
            }
            _ => None,
        })
        .collect();
    let api_ready = events.iter().find_map(|e| match &e.kind {
        EventKind::ApiReady { endpoint } => Some((e.boot_us, endpoint.as_str())),
        _ => None,
    });

    let gutter_label = |s: &Span| match s.level {
        Level::Sequence => names.get(s.lane).cloned().unwrap_or_else(|| s.name.clone()),
        _ => s.name.clone(),
    };
    let label_w = spans
        .iter()
        .map(|s| s.level.depth() as f64 * INDENT + text_w(&clip(&gutter_label(s), 40)))
        .chain(
            services
                .iter()
                .map(|(name, _)| text_w(&clip(&format!("service {name}"), 40))),
        )
        .fold(text_w("lifecycle"), f64::max);
    let plot_x0 = PAD + (label_w + 24.0).max(170.0);
    let x = |us: u64| plot_x0 + us as f64 * scale;

    let has_kernel_row = !events.is_empty();
    let has_lifecycle_row = !states.is_empty() || !denied.is_empty();
    let rows =
        usize::from(has_kernel_row) + usize::from(has_lifecycle_row) + spans.len() + services.len();
    let top = PAD + HEADER_H;
    let bottom = top + rows as f64 * ROW_H;
    let mut width = plot_x0 + PLOT_W + RIGHT_ROOM;
    let mut body = String::new();

    // Grid and axis first, so bars draw over them.
    let mut t = 0.0;
    while t <= axis_us + step_us / 2.0 {
        let tx = plot_x0 + t * scale;
        let _ = write!(
            body,
            r#"<line class="grid" x1="{tx:.1}" y1="{top:.1}" x2="{tx:.1}" y2="{bottom:.1}"/><line class="axis" x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{top:.1}"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" class="dim">{}</text>"#,
            top - 5.0,
            top - 8.0,
            tick_label(t, step_us)
        );
        t += step_us;
    }
    let _ = write!(
        body,
        r#"<line class="axis" x1="{plot_x0:.1}" y1="{top:.1}" x2="{:.1}" y2="{top:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="dim">ms since kernel start</text>"#,
        plot_x0 + PLOT_W,
        plot_x0 - 8.0,
        top - 8.0,
    );

    let mut row = 0usize;
    let row_y = |row: usize| top + row as f64 * ROW_H;
    let bar_y = |row: usize, h: f64| row_y(row) + (ROW_H - h) / 2.0;
    let text_y = |row: usize| row_y(row) + ROW_H / 2.0 + 4.0;

    if has_kernel_row {
        let (x1, by) = (x(first_us), bar_y(row, BAR_H));
        let label = fmt_dur(first_us);
        let (lx, anchor) = label_x(plot_x0, x1, &label, plot_x0);
        let _ = write!(
            body,
            r#"<g><title>kernel: from kernel start to the first event at {} (kernel init, unpacking the initramfs, starting /init)</title><text x="{PAD:.1}" y="{ty:.1}" class="dim">kernel</text><rect class="kernel" x="{plot_x0:.1}" y="{by:.1}" width="{:.1}" height="{BAR_H:.1}"/><text x="{lx:.1}" y="{ty:.1}" text-anchor="{anchor}" class="dim">{}</text></g>"#,
            fmt_ms(first_us),
            (x1 - plot_x0).max(1.0),
            esc(&label),
            ty = text_y(row),
        );
        row += 1;
    }

    if has_lifecycle_row {
        let (by, ty) = (bar_y(row, BAR_H), text_y(row));
        let _ = write!(
            body,
            r#"<text x="{PAD:.1}" y="{ty:.1}" class="dim">lifecycle</text>"#
        );
        band_row(&mut body, "node", &states, by, ty, x);
        for (e, request, reason) in &denied {
            let dx = x(e.boot_us);
            let _ = write!(
                body,
                r#"<g><title>request {} denied at {}: {}</title><path class="denied" d="M{:.1},{by:.1} l5,0 l-5,{BAR_H:.1} l-5,-{BAR_H:.1} z"/></g>"#,
                esc(request),
                fmt_ms(e.boot_us),
                esc(reason),
                dx,
            );
        }
        row += 1;
    }

    for s in &spans {
        let depth = s.level.depth();
        let (ry, ty) = (row_y(row), text_y(row));
        let mut tip = format!(
            "{} {}\nstart {}, took {}",
            s.level.as_str(),
            s.path(),
            fmt_ms(s.start_us),
            fmt_dur(s.dur_us)
        );
        if s.unfinished {
            tip.push_str(
                "\nunfinished: no stop event (drawn to the end of its parent or of the chart)",
            );
        }
        if s.skipped {
            tip.push_str("\nskipped: its condition was false");
        }
        if let Some(err) = &s.error {
            let _ = write!(tip, "\nFAILED: {err}");
        }
        if let Some(actor) = &s.actor {
            let _ = write!(tip, "\nactor {actor}");
        }
        let _ = write!(body, "<g><title>{}</title>", esc(&tip));
        if s.level == Level::Sequence {
            let _ = write!(
                body,
                r#"<rect class="band" x="{PAD:.1}" y="{ry:.1}" width="{:.1}" height="{ROW_H:.1}"/>"#,
                plot_x0 + PLOT_W - PAD
            );
        }
        let _ = write!(
            body,
            r#"<text x="{:.1}" y="{ty:.1}" class="name{depth}">{}</text>"#,
            PAD + depth as f64 * INDENT,
            esc(&clip(&gutter_label(s), 40))
        );
        let (x0, x1) = (x(s.start_us), x(s.end_us()));
        let label = if s.skipped {
            "skipped".to_string()
        } else {
            let mut l = fmt_dur(s.dur_us);
            if s.unfinished {
                l.push_str(" unfinished");
            }
            if let Some(err) = &s.error {
                let _ = write!(l, " FAILED: {}", clip(err, 60));
            }
            l
        };
        if s.skipped {
            let (cy, r) = (ry + ROW_H / 2.0, BAR_H / 2.0);
            let _ = write!(
                body,
                r#"<path class="skipped" d="M{x0:.1},{:.1} l{r:.1},{r:.1} l-{r:.1},{r:.1} l-{r:.1},-{r:.1} z"/>"#,
                cy - r
            );
        } else {
            let h = if s.level == Level::Sequence {
                BAR_H + 2.0
            } else {
                BAR_H
            };
            let class = if s.error.is_some() {
                "failed"
            } else if s.unfinished {
                "unfinished"
            } else {
                s.level.as_str()
            };
            let _ = write!(
                body,
                r#"<rect class="{class}" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}"/>"#,
                bar_y(row, h),
                (x1 - x0).max(1.0)
            );
        }
        let (lx, anchor) = if s.skipped {
            (x0 + BAR_H / 2.0 + 4.0, "start")
        } else {
            label_x(x0, x1, &label, plot_x0)
        };
        let class = if s.error.is_some() {
            "err"
        } else if s.unfinished {
            "warn"
        } else {
            "dim"
        };
        let _ = write!(
            body,
            r#"<text x="{lx:.1}" y="{ty:.1}" text-anchor="{anchor}" class="{class}">{}</text></g>"#,
            esc(&label)
        );
        if anchor == "start" {
            width = width.max(lx + text_w(&label) + PAD);
        }
        row += 1;
    }

    for (service, bands) in &services {
        let (by, ty) = (bar_y(row, BAR_H), text_y(row));
        let _ = write!(
            body,
            r#"<text x="{PAD:.1}" y="{ty:.1}" class="dim">{}</text>"#,
            esc(&clip(&format!("service {service}"), 40))
        );
        band_row(&mut body, &format!("service {service}"), bands, by, ty, x);
        row += 1;
    }

    if let Some((at, endpoint)) = api_ready {
        let ax = x(at);
        let label = format!("API ready {}", fmt_ms(at));
        let (lx, anchor) = if ax + text_w(&label) <= plot_x0 + PLOT_W + RIGHT_ROOM {
            (ax, "middle")
        } else {
            (ax, "end")
        };
        let _ = write!(
            body,
            r#"<g><title>API listening on {} at {}</title><line class="api" x1="{ax:.1}" y1="{:.1}" x2="{ax:.1}" y2="{:.1}"/><text x="{lx:.1}" y="{:.1}" text-anchor="{anchor}" class="apitext">{}</text></g>"#,
            esc(endpoint),
            fmt_ms(at),
            top,
            bottom + 4.0,
            bottom + 18.0,
            esc(&label)
        );
    }
    if spans.is_empty() {
        let _ = write!(
            body,
            r#"<text x="{plot_x0:.1}" y="{:.1}" class="dim">no sequence events</text>"#,
            bottom + 18.0
        );
    }

    let failed = spans.iter().filter(|s| s.error.is_some()).count();
    let unfinished = spans.iter().filter(|s| s.unfinished).count();
    let mut summary = format!("last event at {}", fmt_ms(end_us));
    if let Some((at, _)) = api_ready {
        let _ = write!(summary, " · API ready at {}", fmt_ms(at));
    }
    let _ = write!(summary, " · sequences: {}", names.join(", "));
    if failed > 0 {
        let _ = write!(summary, " · {failed} failed");
    }
    if unfinished > 0 {
        let _ = write!(summary, " · {unfinished} unfinished");
    }
    width = width.max(PAD * 2.0 + text_w(&summary));

    let mut legend = String::new();
    let mut lx = PAD;
    let ly = PAD + 46.0;
    for (class, label) in [
        ("sequence", "sequence"),
        ("phase", "phase"),
        ("task", "task"),
        ("failed", "failed"),
        ("unfinished", "unfinished"),
        ("skipped", "skipped"),
    ] {
        let _ = write!(
            legend,
            r#"<rect class="{class}" x="{lx:.1}" y="{:.1}" width="18" height="{BAR_H:.1}"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
            ly - 10.0,
            lx + 22.0
        );
        lx += 22.0 + text_w(label) + 16.0;
    }
    let _ = write!(
        legend,
        r#"<line class="api" x1="{lx:.1}" y1="{:.1}" x2="{lx:.1}" y2="{:.1}"/><text x="{:.1}" y="{ly:.1}">API ready</text>"#,
        ly - 11.0,
        ly + 3.0,
        lx + 6.0
    );

    let height = bottom + 18.0 + PAD + 8.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}">
<style>{STYLE}</style>
<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#f6e3b4"/><line x1="0" y1="0" x2="0" y2="6" stroke="#d9a441" stroke-width="3"/></pattern></defs>
<rect width="100%" height="100%" fill="#fff"/>
<text x="{PAD:.1}" y="{:.1}" class="title">Plinth bootchart</text>
<text x="{PAD:.1}" y="{:.1}" class="dim">{}</text>
{legend}
{body}
</svg>
"##,
        PAD + 14.0,
        PAD + 28.0,
        esc(&summary),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a boot event by event, with chosen times.
    #[derive(Default)]
    struct Boot {
        events: Vec<Event>,
    }

    /// Phases with their tasks and how long each task runs (µs).
    type Phases = &'static [(&'static str, &'static [(&'static str, u64)])];

    impl Boot {
        fn at(&mut self, boot_us: u64, kind: EventKind) -> &mut Self {
            let id = self.events.len() as u64 + 1;
            self.events.push(Event {
                id,
                unix_ms: 1_700_000_000_000 + boot_us / 1000,
                boot_us,
                actor: None,
                kind,
            });
            self
        }

        /// A whole sequence from `start_us`: its phases one after the other, each phase's tasks
        /// started together and each running for its given time. Returns the end.
        fn sequence(&mut self, name: &str, start_us: u64, phases: Phases) -> u64 {
            let s = |x: &str| x.to_string();
            self.at(start_us, EventKind::SequenceStart { sequence: s(name) });
            let mut t = start_us + 10;
            for (i, (phase, tasks)) in phases.iter().enumerate() {
                let phase_start = t;
                self.at(
                    t,
                    EventKind::PhaseStart {
                        sequence: s(name),
                        phase: s(phase),
                        index: i + 1,
                        total: phases.len(),
                    },
                );
                for (task, _) in tasks.iter() {
                    t += 1;
                    self.at(
                        t,
                        EventKind::TaskStart {
                            sequence: s(name),
                            phase: s(phase),
                            task: s(task),
                        },
                    );
                }
                let mut ends: Vec<(u64, &str, u64)> = tasks
                    .iter()
                    .enumerate()
                    .map(|(k, (task, dur))| (phase_start + 1 + k as u64 + dur, *task, *dur))
                    .collect();
                ends.sort();
                for (end, task, dur) in ends {
                    t = t.max(end);
                    self.at(
                        t,
                        EventKind::TaskStop {
                            sequence: s(name),
                            phase: s(phase),
                            task: s(task),
                            duration_us: dur,
                            error: None,
                        },
                    );
                }
                t += 2;
                self.at(
                    t,
                    EventKind::PhaseStop {
                        sequence: s(name),
                        phase: s(phase),
                        duration_us: t - phase_start,
                        error: None,
                    },
                );
                t += 5;
            }
            self.at(
                t,
                EventKind::SequenceStop {
                    sequence: s(name),
                    duration_us: t - start_us,
                    error: None,
                },
            );
            t
        }
    }

    const INITRAMFS: Phases = &[
        (
            "mountPseudoFilesystems",
            &[
                ("mountProc", 300),
                ("mountSys", 200),
                ("mountDev", 900),
                ("mountRun", 100),
            ],
        ),
        ("loadModules", &[("loadModules", 45_000)]),
        ("findBootDisk", &[("findBootDisk", 120_000)]),
        ("mapRoot", &[("mapRoot", 380_000)]),
        ("mountRoot", &[("mountRoot", 4_000)]),
        ("switchRoot", &[("switchRoot", 2_000)]),
    ];
    const INITIALIZE: Phases = &[
        ("handover", &[("readBootInfo", 150), ("mountTmp", 250)]),
        (
            "mountPartitions",
            &[("mountState", 30_000), ("mountEphemeral", 42_000)],
        ),
        ("loadConfig", &[("loadConfig", 3_000)]),
    ];
    const BOOT: Phases = &[
        (
            "network",
            &[("setHostname", 500), ("configureNetwork", 800_000)],
        ),
        ("startApi", &[("startApi", 60_000)]),
    ];

    /// A whole successful boot: initramfs, then PID 1's initialize and boot, the API ready.
    fn full_boot() -> Boot {
        let mut b = Boot::default();
        let t = b.sequence("initramfs", 1_200_000, INITRAMFS);
        b.at(
            t + 30_000,
            EventKind::StateChange {
                from: "maintenance".into(),
                to: "booting".into(),
            },
        );
        let t = b.sequence("initialize", t + 40_000, INITIALIZE);
        let t = b.sequence("boot", t + 100, BOOT);
        b.at(
            t + 10,
            EventKind::ApiReady {
                endpoint: "10.0.2.15:50000".into(),
            },
        );
        b.at(
            t + 50,
            EventKind::StateChange {
                from: "booting".into(),
                to: "running".into(),
            },
        );
        b
    }

    fn every_phase() -> Vec<(&'static str, &'static str)> {
        [
            ("initramfs", INITRAMFS),
            ("initialize", INITIALIZE),
            ("boot", BOOT),
        ]
        .iter()
        .flat_map(|(seq, phases)| phases.iter().map(move |(p, _)| (*seq, *p)))
        .collect()
    }

    fn x_events(trace: &Value) -> Vec<&Value> {
        trace["traceEvents"]
            .as_array()
            .expect("traceEvents")
            .iter()
            .filter(|e| e["ph"] == "X")
            .collect()
    }

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text") || n.has_tag_name("title"))
            .map(|n| {
                n.descendants()
                    .filter(|t| t.is_text())
                    .filter_map(|t| t.text())
                    .collect()
            })
            .collect()
    }

    fn path_stop(sequence: &str, phase: &str, error: Option<&str>) -> EventKind {
        EventKind::PhaseStop {
            sequence: sequence.into(),
            phase: phase.into(),
            duration_us: 0,
            error: error.map(Into::into),
        }
    }

    fn phase_start(sequence: &str, phase: &str) -> EventKind {
        EventKind::PhaseStart {
            sequence: sequence.into(),
            phase: phase.into(),
            index: 1,
            total: 1,
        }
    }

    fn task(sequence: &str, phase: &str, task: &str, stop: Option<Option<&str>>) -> EventKind {
        match stop {
            None => EventKind::TaskStart {
                sequence: sequence.into(),
                phase: phase.into(),
                task: task.into(),
            },
            Some(error) => EventKind::TaskStop {
                sequence: sequence.into(),
                phase: phase.into(),
                task: task.into(),
                duration_us: 0,
                error: error.map(Into::into),
            },
        }
    }

    fn seq(name: &str, stop: Option<Option<&str>>) -> EventKind {
        match stop {
            None => EventKind::SequenceStart {
                sequence: name.into(),
            },
            Some(error) => EventKind::SequenceStop {
                sequence: name.into(),
                duration_us: 0,
                error: error.map(Into::into),
            },
        }
    }

    #[test]
    fn the_timeline_lists_each_sequence_then_each_phase_followed_by_its_tasks() {
        let spans = timeline(&full_boot().events);
        let outline: Vec<String> = spans
            .iter()
            .take(8)
            .map(|s| format!("{}{}", "  ".repeat(s.level.depth()), s.name))
            .collect();
        assert_eq!(
            outline,
            [
                "initramfs",
                "  mountPseudoFilesystems",
                "    mountProc",
                "    mountSys",
                "    mountDev",
                "    mountRun",
                "  loadModules",
                "    loadModules",
            ]
        );
        let lanes: Vec<(usize, &str)> = spans
            .iter()
            .filter(|s| s.level == Level::Sequence)
            .map(|s| (s.lane, s.name.as_str()))
            .collect();
        assert_eq!(lanes, [(0, "initramfs"), (1, "initialize"), (2, "boot")]);
        for s in &spans {
            assert!(!s.unfinished && s.error.is_none(), "{s:?}");
        }
    }

    #[test]
    fn every_task_lies_inside_its_phase_and_every_phase_inside_its_sequence() {
        let spans = timeline(&full_boot().events);
        let mut parents: Vec<&Span> = Vec::new();
        for s in &spans {
            parents.truncate(s.level.depth());
            if let Some(p) = parents.last() {
                assert!(
                    p.start_us <= s.start_us && s.end_us() <= p.end_us(),
                    "{s:?} outside {p:?}"
                );
            }
            parents.push(s);
        }
    }

    #[test]
    fn the_chrome_trace_is_valid_json_with_every_phase() {
        let text = serde_json::to_string(&chrome_trace(&full_boot().events)).expect("json");
        let trace: Value = serde_json::from_str(&text).expect("parses back");
        let xs = x_events(&trace);
        for (sequence, phase) in every_phase() {
            let found = xs.iter().any(|e| {
                e["name"] == phase
                    && e["cat"] == "phase"
                    && e["args"]["sequence"] == sequence
                    && e["ts"].as_u64().is_some()
                    && e["dur"].as_u64().is_some_and(|d| d > 0)
                    && e["pid"] == 1
            });
            assert!(found, "no X event for {sequence}/{phase}");
        }
        let thread_names: Vec<&str> = trace["traceEvents"]
            .as_array()
            .expect("traceEvents")
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .filter_map(|e| e["args"]["name"].as_str())
            .collect();
        for name in ["lifecycle", "initramfs", "initialize", "boot"] {
            assert!(thread_names.contains(&name), "{thread_names:?}");
        }
        let instants: Vec<&str> = trace["traceEvents"]
            .as_array()
            .expect("traceEvents")
            .iter()
            .filter(|e| e["ph"] == "i")
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert_eq!(
            instants,
            ["maintenance → booting", "API ready", "booting → running"]
        );
    }

    #[test]
    fn slices_on_one_chrome_trace_thread_nest_even_though_tasks_run_concurrently() {
        let trace = chrome_trace(&full_boot().events);
        let xs = x_events(&trace);
        let bounds = |e: &Value| {
            let ts = e["ts"].as_u64().expect("ts");
            (ts, ts + e["dur"].as_u64().expect("dur"))
        };
        for a in &xs {
            for b in &xs {
                if a["tid"] != b["tid"] {
                    continue;
                }
                let ((a0, a1), (b0, b1)) = (bounds(a), bounds(b));
                let disjoint = a1 <= b0 || b1 <= a0;
                let nested = (a0 <= b0 && b1 <= a1) || (b0 <= a0 && a1 <= b1);
                assert!(disjoint || nested, "{a} and {b} overlap on one thread");
            }
        }
        // mountPseudoFilesystems runs four tasks at once: four task threads for initramfs.
        let task_tids: std::collections::BTreeSet<u64> = xs
            .iter()
            .filter(|e| e["cat"] == "task" && e["args"]["sequence"] == "initramfs")
            .filter_map(|e| e["tid"].as_u64())
            .collect();
        assert_eq!(task_tids.len(), 4);
    }

    #[test]
    fn the_svg_parses_and_names_every_phase() {
        let svg = svg(&full_boot().events);
        let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
        assert!(doc
            .root_element()
            .has_tag_name(("http://www.w3.org/2000/svg", "svg")));
        let texts = texts(&doc);
        for (_, phase) in every_phase() {
            assert!(texts.iter().any(|t| t == phase), "no text {phase:?}");
        }
        for name in [
            "initramfs",
            "initialize",
            "boot",
            "mountDev",
            "configureNetwork",
        ] {
            assert!(texts.iter().any(|t| t == name), "no text {name:?}");
        }
        assert!(
            texts.iter().any(|t| t.starts_with("API ready")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "ms since kernel start"));
    }

    #[test]
    fn a_phase_without_a_stop_is_drawn_as_unfinished() {
        let mut b = Boot::default();
        b.at(1_000, seq("boot", None))
            .at(1_010, phase_start("boot", "network"))
            .at(1_020, task("boot", "network", "configureNetwork", None))
            .at(
                9_000,
                EventKind::ApiReady {
                    endpoint: "x".into(),
                },
            );
        let spans = timeline(&b.events);
        let network = spans.iter().find(|s| s.name == "network").expect("network");
        assert!(network.unfinished);
        assert_eq!(network.end_us(), 9_000, "runs to the last event");
        assert!(spans.iter().all(|s| s.unfinished && s.end_us() == 9_000));

        let trace = chrome_trace(&b.events);
        let x = x_events(&trace)
            .into_iter()
            .find(|e| e["name"] == "network")
            .expect("X event");
        assert_eq!(x["args"]["unfinished"], true);
        assert_eq!(x["dur"], 9_000 - 1_010);

        let svg = svg(&b.events);
        let doc = roxmltree::Document::parse(&svg).expect("XML");
        assert!(doc
            .descendants()
            .any(|n| n.attribute("class") == Some("unfinished") && n.has_tag_name("rect")));
        assert!(texts(&doc).iter().any(|t| t.contains("unfinished")));
    }

    #[test]
    fn a_failed_task_is_marked_and_carries_its_error() {
        let error = "mounting /var: <EBUSY> & \"busy\"\u{1b}[0m";
        let mut b = Boot::default();
        b.at(1_000, seq("initialize", None))
            .at(1_010, phase_start("initialize", "mountPartitions"))
            .at(
                1_020,
                task("initialize", "mountPartitions", "mountState", None),
            )
            .at(
                1_021,
                task("initialize", "mountPartitions", "mountEphemeral", None),
            )
            .at(
                3_000,
                task("initialize", "mountPartitions", "mountState", Some(None)),
            )
            .at(
                4_000,
                task(
                    "initialize",
                    "mountPartitions",
                    "mountEphemeral",
                    Some(Some(error)),
                ),
            )
            .at(
                4_001,
                path_stop(
                    "initialize",
                    "mountPartitions",
                    Some("task mountEphemeral: busy"),
                ),
            )
            .at(
                4_002,
                seq("initialize", Some(Some("mountPartitions failed"))),
            );
        let spans = timeline(&b.events);
        let failed = spans
            .iter()
            .find(|s| s.name == "mountEphemeral")
            .expect("task");
        assert_eq!(failed.error.as_deref(), Some(error));
        assert_eq!((failed.start_us, failed.dur_us), (1_021, 2_979));
        let ok = spans.iter().find(|s| s.name == "mountState").expect("task");
        assert_eq!(ok.error, None);

        let trace = chrome_trace(&b.events);
        let x = x_events(&trace)
            .into_iter()
            .find(|e| e["name"] == "mountEphemeral")
            .expect("X event");
        assert_eq!(x["args"]["error"], error);
        assert_eq!(x["args"]["phase"], "mountPartitions");

        let svg = svg(&b.events);
        let doc = roxmltree::Document::parse(&svg).expect("XML despite <, &, quotes and escapes");
        let row = doc
            .descendants()
            .find(|n| {
                n.has_tag_name("g")
                    && n.children()
                        .any(|c| c.has_tag_name("text") && c.text() == Some("mountEphemeral"))
            })
            .expect("the task's row");
        let title = row
            .children()
            .find(|c| c.has_tag_name("title"))
            .and_then(|t| t.text())
            .expect("tooltip");
        assert!(
            title.contains("mounting /var: <EBUSY> & \"busy\"[0m"),
            "{title}"
        );
        assert!(row
            .children()
            .any(|c| c.has_tag_name("rect") && c.attribute("class") == Some("failed")));
        assert!(row.children().any(|c| c.attribute("class") == Some("err")
            && c.text().is_some_and(|t| t.contains("FAILED"))));
    }

    #[test]
    fn a_repeated_sequence_pairs_each_stop_with_its_own_start() {
        let mut b = Boot::default();
        b.at(100, seq("reboot", None))
            .at(110, phase_start("reboot", "stop"))
            .at(200, path_stop("reboot", "stop", Some("cancelled")))
            .at(210, seq("reboot", Some(Some("cancelled"))))
            .at(300, seq("reboot", None))
            .at(310, phase_start("reboot", "stop"))
            .at(500, path_stop("reboot", "stop", None))
            .at(510, seq("reboot", Some(None)));
        let spans = timeline(&b.events);
        let phases: Vec<(usize, u64, u64, bool)> = spans
            .iter()
            .filter(|s| s.level == Level::Phase)
            .map(|s| (s.lane, s.start_us, s.dur_us, s.error.is_some()))
            .collect();
        assert_eq!(phases, [(0, 110, 90, true), (1, 310, 190, false)]);
        assert_eq!(lane_names(&spans), ["reboot #1", "reboot #2"]);
    }

    #[test]
    fn tasks_dropped_by_an_aborted_phase_end_with_it() {
        let mut b = Boot::default();
        b.at(100, seq("upgrade", None))
            .at(110, phase_start("upgrade", "writeSlot"))
            .at(120, task("upgrade", "writeSlot", "copyImage", None))
            .at(
                400,
                path_stop("upgrade", "writeSlot", Some("aborted by reboot")),
            )
            .at(410, seq("upgrade", Some(Some("cancelled"))))
            .at(5_000, seq("reboot", None));
        let spans = timeline(&b.events);
        let copy = spans.iter().find(|s| s.name == "copyImage").expect("task");
        assert!(copy.unfinished);
        assert_eq!(copy.end_us(), 400);
    }

    #[test]
    fn a_stop_whose_start_was_dropped_is_placed_by_its_duration() {
        let mut b = Boot::default();
        b.at(
            5_000,
            EventKind::PhaseStop {
                sequence: "initramfs".into(),
                phase: "switchRoot".into(),
                duration_us: 1_500,
                error: None,
            },
        );
        let spans = timeline(&b.events);
        let phase = spans
            .iter()
            .find(|s| s.name == "switchRoot")
            .expect("phase");
        assert_eq!(
            (phase.start_us, phase.dur_us, phase.unfinished),
            (3_500, 1_500, false)
        );
        assert!(spans
            .iter()
            .any(|s| s.level == Level::Sequence && s.name == "initramfs"));
    }

    #[test]
    fn a_skipped_phase_is_named_in_both_outputs() {
        let mut b = Boot::default();
        b.at(100, seq("boot", None))
            .at(
                110,
                EventKind::PhaseSkip {
                    sequence: "boot".into(),
                    phase: "install".into(),
                },
            )
            .at(120, seq("boot", Some(None)));
        let spans = timeline(&b.events);
        assert!(spans
            .iter()
            .any(|s| s.name == "install" && s.skipped && s.dur_us == 0));
        let trace = chrome_trace(&b.events);
        assert!(x_events(&trace)
            .iter()
            .any(|e| e["name"] == "install" && e["args"]["skipped"] == true));
        let svg = svg(&b.events);
        let doc = roxmltree::Document::parse(&svg).expect("XML");
        assert!(texts(&doc).iter().any(|t| t == "install"));
    }

    #[test]
    fn a_service_is_drawn_as_its_states_in_both_outputs() {
        let service = |state: &str, message: &str| EventKind::Service {
            service: "containerd".into(),
            state: state.into(),
            message: message.into(),
        };
        let mut b = Boot::default();
        b.at(100, seq("boot", None))
            .at(200, service("waiting", "on network"))
            .at(300, service("running", "pid 42"))
            .at(350, service("running", "healthy"))
            .at(600, service("failed", "exit status 1"))
            .at(700, seq("boot", Some(None)));
        let bands = &service_bands(&b.events)[0];
        assert_eq!(bands.0, "containerd");
        let states: Vec<(u64, u64, &str)> = bands
            .1
            .iter()
            .map(|b| (b.start_us, b.end_us, b.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                (200, 300, "waiting"),
                (300, 600, "running"),
                (600, 700, "failed")
            ]
        );

        let trace = chrome_trace(&b.events);
        let slices: Vec<&str> = x_events(&trace)
            .into_iter()
            .filter(|e| e["cat"] == "service")
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert_eq!(slices, ["waiting", "running", "failed"]);

        let svg = svg(&b.events);
        let doc = roxmltree::Document::parse(&svg).expect("XML");
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "service containerd"));
        assert!(texts.iter().any(|t| t.contains("exit status 1")));
    }

    #[test]
    fn no_events_still_make_a_valid_trace_and_svg() {
        let trace = chrome_trace(&[]);
        assert!(x_events(&trace).is_empty());
        let svg = svg(&[]);
        roxmltree::Document::parse(&svg).expect("XML");
    }

    #[tokio::test]
    async fn a_sequence_run_on_a_real_event_bus_is_charted() {
        let bus = sequencer::EventBus::new(64);
        let sequence = sequencer::Sequence::new("initialize")
            .phase(
                "handover",
                [
                    sequencer::Task::new("readBootInfo", |_: ()| async {
                        Ok::<(), std::io::Error>(())
                    }),
                    sequencer::Task::new("mountTmp", |_: ()| async {
                        Ok::<(), std::io::Error>(())
                    }),
                ],
            )
            .phase(
                "loadConfig",
                [sequencer::Task::new("loadConfig", |_: ()| async {
                    Err(std::io::Error::other("no config"))
                })],
            );
        let result = sequencer::run(&sequence, (), &bus, Some("actor-1")).await;
        assert!(result.is_err());
        let events = bus.snapshot();
        let spans = timeline(&events);
        assert_eq!(spans.len(), 1 + 2 + 3);
        assert!(spans.iter().all(|s| !s.unfinished));
        assert!(spans.iter().all(|s| s.actor.as_deref() == Some("actor-1")));
        let failed: Vec<&str> = spans
            .iter()
            .filter(|s| s.error.is_some())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(failed, ["initialize", "loadConfig", "loadConfig"]);
        let svg = svg(&events);
        let doc = roxmltree::Document::parse(&svg).expect("XML");
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "handover"));
        assert!(texts.iter().any(|t| t.contains("no config")));
    }

    #[test]
    fn xml_text_is_escaped_and_control_characters_dropped() {
        assert_eq!(esc("a<b>&\"c'\u{7}"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }

    #[test]
    fn the_axis_ticks_are_round_and_cover_the_boot() {
        assert_eq!(axis(2_345_000), (500_000.0, 2_500_000.0));
        assert_eq!(axis(9_000), (1_000.0, 9_000.0));
        assert_eq!(tick_label(250.0, 50.0), "0.25");
    }
}
