//! How a sequence runs: phases in order, a phase's tasks concurrently, every start and stop an
//! event and a `tracing` span, and a failure that names where it happened.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::event::{EventBus, EventKind};
use crate::sequence::{Sequence, TaskError};

/// A sequence did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    /// A task failed: which phase and task, and why.
    #[error("sequence {sequence:?} failed in phase {phase:?}, task {task:?}: {}", chain(source.as_ref()))]
    Failed {
        /// Sequence name.
        sequence: String,
        /// Phase that failed.
        phase: String,
        /// First task (in table order) that failed.
        task: String,
        /// The task's error.
        #[source]
        source: TaskError,
    },
    /// Another sequence took over.
    #[error("sequence {sequence:?} was cancelled by {by} at phase {phase:?}")]
    Cancelled {
        /// Sequence name.
        sequence: String,
        /// The phase it stopped before (or, when aborted, in).
        phase: String,
        /// What cancelled it.
        by: String,
    },
}

impl SequenceError {
    /// Whether the sequence was cancelled rather than failed.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, SequenceError::Cancelled { .. })
    }

    /// The phase it failed or stopped in.
    pub fn phase(&self) -> &str {
        match self {
            SequenceError::Failed { phase, .. } | SequenceError::Cancelled { phase, .. } => phase,
        }
    }
}

/// How a running sequence is stopped by another.
///
/// `cancel` stops it at the next phase boundary, so the phase in progress (an upgrade's slot
/// write) always completes; `abort` (a forced shutdown) also drops the phase in progress.
#[derive(Clone, Default)]
pub struct Cancel {
    soft: CancellationToken,
    hard: CancellationToken,
    by: Arc<Mutex<Option<String>>>,
    /// Whether the phase running now is interruptible (what a takeover is allowed to cut).
    interruptible: Arc<std::sync::atomic::AtomicBool>,
}

impl Cancel {
    /// A token nobody has cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    fn set_by(&self, by: &str) {
        let mut b = self.by.lock().unwrap_or_else(|p| p.into_inner());
        b.get_or_insert_with(|| by.to_string());
    }

    fn by(&self) -> String {
        self.by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "request".into())
    }

    /// Stop at the next phase boundary.
    pub fn cancel(&self, by: &str) {
        self.set_by(by);
        self.soft.cancel();
    }

    /// Stop now, dropping the phase in progress.
    pub fn abort(&self, by: &str) {
        self.set_by(by);
        self.soft.cancel();
        self.hard.cancel();
    }

    /// Whether a cancel or abort was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.soft.is_cancelled()
    }

    /// Where the sequence is now, for the takeover table.
    pub fn stage(&self) -> crate::lifecycle::Stage {
        if self.interruptible.load(std::sync::atomic::Ordering::SeqCst) {
            crate::lifecycle::Stage::Interruptible
        } else {
            crate::lifecycle::Stage::Critical
        }
    }

    fn set_interruptible(&self, yes: bool) {
        self.interruptible
            .store(yes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An error and its sources as one line: "a: b: c".
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let s = e.to_string();
        // Wrappers often repeat their source's text; say it once.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

/// Publishes the stop of a phase dropped by a cancel and returns the cancellation.
fn aborted(
    bus: &EventBus,
    sequence: &str,
    phase: &str,
    started: Instant,
    actor: Option<&str>,
    cancel: &Cancel,
) -> SequenceError {
    let by = cancel.by();
    bus.publish(
        EventKind::PhaseStop {
            sequence: sequence.into(),
            phase: phase.into(),
            duration_us: micros(started),
            error: Some(format!("interrupted by {by}")),
        },
        actor,
    );
    SequenceError::Cancelled {
        sequence: sequence.into(),
        phase: phase.into(),
        by,
    }
}

/// What a panicking task said.
fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Blocking work begun by tasks ([`blocking`]), so that an interrupted phase can wait for it.
fn blocking_work() -> &'static TaskTracker {
    static TRACKER: std::sync::OnceLock<TaskTracker> = std::sync::OnceLock::new();
    TRACKER.get_or_init(TaskTracker::new)
}

/// Runs a task's blocking work (mounts, reads and writes, the TPM, firmware variables) on a
/// thread of its own. A thread cannot be stopped: a phase interrupted while such work runs
/// waits for it to end before the sequence that interrupted it starts (one sequence runs at a
/// time, so what is waited for is the interrupted one's). It logs in the caller's span.
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    let span = tracing::Span::current();
    blocking_work()
        .spawn_blocking(move || span.in_scope(f))
        .await
}

async fn settle_blocking() {
    let tracker = blocking_work();
    tracker.close();
    tracker.wait().await;
    tracker.reopen();
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().min(u64::MAX as u128) as u64
}

/// Runs `sequence` with `ctx`, publishing events on `bus` tagged with `actor`.
///
/// Phases run in table order; a conditional phase whose condition is false is skipped (and says
/// so). All tasks of a phase run concurrently, each a tokio task of its own, and the phase waits
/// for every one of them, so no task is abandoned half-way; if any failed, the sequence stops
/// there.
pub async fn run<C: Clone + Send + 'static>(
    sequence: &Sequence<C>,
    ctx: C,
    bus: &EventBus,
    actor: Option<&str>,
) -> Result<(), SequenceError> {
    run_with(sequence, ctx, bus, actor, &Cancel::new()).await
}

/// Like [`run`], stoppable through `cancel`.
pub async fn run_with<C: Clone + Send + 'static>(
    sequence: &Sequence<C>,
    ctx: C,
    bus: &EventBus,
    actor: Option<&str>,
    cancel: &Cancel,
) -> Result<(), SequenceError> {
    let seq_name = sequence.name();
    let started = Instant::now();
    bus.publish(
        EventKind::SequenceStart {
            sequence: seq_name.into(),
        },
        actor,
    );
    let result = run_phases(sequence, ctx, bus, actor, cancel)
        .instrument(tracing::info_span!("sequence", name = seq_name))
        .await;
    bus.publish(
        EventKind::SequenceStop {
            sequence: seq_name.into(),
            duration_us: micros(started),
            error: result.as_ref().err().map(|e| e.to_string()),
        },
        actor,
    );
    result
}

async fn run_phases<C: Clone + Send + 'static>(
    sequence: &Sequence<C>,
    ctx: C,
    bus: &EventBus,
    actor: Option<&str>,
    cancel: &Cancel,
) -> Result<(), SequenceError> {
    let seq_name = sequence.name();
    let total = sequence.phases().len();
    for (i, phase) in sequence.phases().iter().enumerate() {
        let phase_name = phase.name();
        // The phase boundary: the only place a (non-forced) cancel takes effect.
        if cancel.is_cancelled() {
            return Err(SequenceError::Cancelled {
                sequence: seq_name.into(),
                phase: phase_name.into(),
                by: cancel.by(),
            });
        }
        if !phase.applies(&ctx) {
            bus.publish(
                EventKind::PhaseSkip {
                    sequence: seq_name.into(),
                    phase: phase_name.into(),
                },
                actor,
            );
            continue;
        }
        let span = tracing::info_span!("phase", name = phase_name, index = i + 1, total);
        let phase_started = Instant::now();
        bus.publish(
            EventKind::PhaseStart {
                sequence: seq_name.into(),
                phase: phase_name.into(),
                index: i + 1,
                total,
            },
            actor,
        );
        tracing::info!(parent: &span, "phase {}/{} {}", i + 1, total, phase_name);
        let tracker = TaskTracker::new();
        let runs = phase.tasks.iter().map(|task| {
            let tracker = tracker.clone();
            let ctx = ctx.clone();
            let run = task.run.clone();
            let task_name = task.name;
            let task_span = tracing::info_span!(parent: &span, "task", name = task_name);
            let work_span = task_span.clone();
            async move {
                let task_started = Instant::now();
                bus.publish(
                    EventKind::TaskStart {
                        sequence: seq_name.into(),
                        phase: phase_name.into(),
                        task: task_name.into(),
                    },
                    actor,
                );
                // Each task is a tokio task of its own: one that computes between its awaits
                // does not hold up the others (a multi-threaded runtime polls them on other
                // threads), and the phase dropped (a hard cancel) aborts them all.
                let work = tracker.track_future(run(ctx).instrument(work_span));
                let result = match AbortOnDropHandle::new(tokio::spawn(work)).await {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => {
                        Err(format!("task {task_name} panicked: {}", panic_message(e)).into())
                    }
                    Err(e) => Err(e.into()),
                };
                bus.publish(
                    EventKind::TaskStop {
                        sequence: seq_name.into(),
                        phase: phase_name.into(),
                        task: task_name.into(),
                        duration_us: micros(task_started),
                        error: result.as_ref().err().map(|e| chain(e.as_ref())),
                    },
                    actor,
                );
                if let Err(e) = &result {
                    tracing::error!("task {task_name} failed: {}", chain(e.as_ref()));
                }
                (task_name, result)
            }
            .instrument(task_span)
        });
        cancel.set_interruptible(phase.interruptible);
        let finished = tokio::select! {
            results = join_all(runs).instrument(span.clone()) => Some(results),
            _ = cancel.hard.cancelled() => None,
            _ = cancel.soft.cancelled(), if phase.interruptible => None,
        };
        let Some(results) = finished else {
            // The phase was dropped, and each task's handle with it (which aborts the task):
            // nothing of it may still run when the sequence that interrupted it starts, so
            // wait for every task to have stopped and for the blocking work they began.
            tracker.close();
            tracker.wait().await;
            settle_blocking().await;
            return Err(aborted(
                bus,
                seq_name,
                phase_name,
                phase_started,
                actor,
                cancel,
            ));
        };
        cancel.set_interruptible(false);
        let failed = results
            .into_iter()
            .find_map(|(name, r)| r.err().map(|e| (name, e)));
        bus.publish(
            EventKind::PhaseStop {
                sequence: seq_name.into(),
                phase: phase_name.into(),
                duration_us: micros(phase_started),
                error: failed
                    .as_ref()
                    .map(|(t, e)| format!("task {t}: {}", chain(e.as_ref()))),
            },
            actor,
        );
        if let Some((task, source)) = failed {
            return Err(SequenceError::Failed {
                sequence: seq_name.into(),
                phase: phase_name.into(),
                task: task.into(),
                source,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::sequence::Task;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<&'static str>>>);

    impl Log {
        fn push(&self, s: &'static str) {
            self.0.lock().expect("lock").push(s);
        }
        fn get(&self) -> Vec<&'static str> {
            self.0.lock().expect("lock").clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire")]
    struct Fire;

    fn ok(name: &'static str) -> Task<Log> {
        Task::new(name, move |log: Log| async move {
            log.push(name);
            Ok::<(), Fire>(())
        })
    }

    fn kinds(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.kind {
                EventKind::SequenceStart { sequence } => format!("seq+ {sequence}"),
                EventKind::SequenceStop {
                    sequence, error, ..
                } => {
                    format!("seq- {sequence} {}", error.is_some())
                }
                EventKind::PhaseStart { phase, .. } => format!("phase+ {phase}"),
                EventKind::PhaseStop { phase, error, .. } => {
                    format!("phase- {phase} {}", error.is_some())
                }
                EventKind::PhaseSkip { phase, .. } => format!("skip {phase}"),
                EventKind::TaskStart { task, .. } => format!("task+ {task}"),
                EventKind::TaskStop { task, error, .. } => {
                    format!("task- {task} {}", error.is_some())
                }
                other => other.name().to_string(),
            })
            .collect()
    }

    #[tokio::test]
    async fn phases_run_in_order_and_every_start_and_stop_is_an_event() {
        let bus = EventBus::new(64);
        let seq = Sequence::new("boot")
            .phase("one", [ok("a")])
            .phase("two", [ok("b")]);
        let log = Log::default();
        run(&seq, log.clone(), &bus, None).await.expect("runs");
        assert_eq!(log.get(), vec!["a", "b"]);
        assert_eq!(
            kinds(&bus.snapshot()),
            vec![
                "seq+ boot",
                "phase+ one",
                "task+ a",
                "task- a false",
                "phase- one false",
                "phase+ two",
                "task+ b",
                "task- b false",
                "phase- two false",
                "seq- boot false",
            ]
        );
    }

    #[tokio::test]
    async fn tasks_of_a_phase_run_concurrently() {
        // Each task waits for the other: only concurrent execution finishes.
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let task = |name| {
            let b = barrier.clone();
            Task::new(name, move |_: ()| {
                let b = b.clone();
                async move {
                    b.wait().await;
                    Ok::<(), Fire>(())
                }
            })
        };
        let seq = Sequence::new("s").phase("p", [task("x"), task("y")]);
        let bus = EventBus::new(64);
        tokio::time::timeout(Duration::from_secs(5), run(&seq, (), &bus, None))
            .await
            .expect("tasks did not run concurrently")
            .expect("runs");
    }

    #[tokio::test]
    async fn a_failing_task_fails_its_phase_and_sequence_and_names_all_three() {
        let bus = EventBus::new(64);
        let fail = Task::new("burn", |_: Log| async { Err::<(), _>(Fire) });
        let seq = Sequence::new("boot")
            .phase("mount", [ok("a"), fail])
            .phase("never", [ok("b")]);
        let log = Log::default();
        let err = run(&seq, log.clone(), &bus, None).await.expect_err("fails");
        let SequenceError::Failed {
            sequence,
            phase,
            task,
            ..
        } = &err
        else {
            panic!("not a failure: {err}");
        };
        assert_eq!(
            (sequence.as_str(), phase.as_str(), task.as_str()),
            ("boot", "mount", "burn")
        );
        let msg = err.to_string();
        assert!(
            msg.contains("\"boot\"")
                && msg.contains("\"mount\"")
                && msg.contains("\"burn\"")
                && msg.contains("disk on fire"),
            "{msg}"
        );
        // The sibling task still ran to completion; the next phase never started.
        assert_eq!(log.get(), vec!["a"]);
        let k = kinds(&bus.snapshot());
        assert!(k.contains(&"task- burn true".to_string()));
        assert!(k.contains(&"phase- mount true".to_string()));
        assert_eq!(k.last().map(String::as_str), Some("seq- boot true"));
        assert!(!k.iter().any(|s| s.contains("never")));
    }

    #[tokio::test]
    async fn a_conditional_phase_whose_condition_is_false_is_skipped_and_says_so() {
        let bus = EventBus::new(64);
        let seq = Sequence::new("boot")
            .phase_when("install", |_: &Log| false, [ok("x")])
            .phase("run", [ok("y")]);
        let log = Log::default();
        run(&seq, log.clone(), &bus, None).await.expect("runs");
        assert_eq!(log.get(), vec!["y"]);
        assert!(kinds(&bus.snapshot()).contains(&"skip install".to_string()));
    }

    #[tokio::test]
    async fn a_cancel_stops_the_sequence_at_the_next_phase_boundary_not_mid_phase() {
        let bus = EventBus::new(64);
        let cancel = Cancel::new();
        let c = cancel.clone();
        // The first phase asks for the cancel while it runs, then finishes its work anyway.
        let first = Task::new("write", move |log: Log| {
            let c = c.clone();
            async move {
                c.cancel("shutdown");
                tokio::time::sleep(Duration::from_millis(20)).await;
                log.push("write done");
                Ok::<(), Fire>(())
            }
        });
        let seq = Sequence::new("upgrade")
            .phase("writeSlot", [first])
            .phase("commit", [ok("commit")]);
        let log = Log::default();
        let err = run_with(&seq, log.clone(), &bus, None, &cancel)
            .await
            .expect_err("cancelled");
        assert_eq!(log.get(), vec!["write done"]);
        assert!(err.is_cancelled());
        assert_eq!(
            err.to_string(),
            "sequence \"upgrade\" was cancelled by shutdown at phase \"commit\""
        );
    }

    #[tokio::test]
    async fn an_abort_drops_the_phase_in_progress() {
        let bus = EventBus::new(64);
        let cancel = Cancel::new();
        let c = cancel.clone();
        let slow = Task::new("write", move |log: Log| {
            let c = c.clone();
            async move {
                c.abort("forced shutdown");
                tokio::time::sleep(Duration::from_secs(30)).await;
                log.push("never");
                Ok::<(), Fire>(())
            }
        });
        let seq = Sequence::new("upgrade").phase("writeSlot", [slow]);
        let log = Log::default();
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            run_with(&seq, log.clone(), &bus, None, &cancel),
        )
        .await
        .expect("abort is immediate")
        .expect_err("aborted");
        assert!(err.is_cancelled());
        assert!(log.get().is_empty());
    }

    #[tokio::test]
    async fn a_cancel_interrupts_a_waiting_phase_at_once() {
        let bus = EventBus::new(64);
        let cancel = Cancel::new();
        let c = cancel.clone();
        let wait = Task::new("waitHealthy", move |_: Log| {
            let c = c.clone();
            async move {
                c.cancel("reboot");
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<(), Fire>(())
            }
        });
        let seq = Sequence::new("boot").waiting_phase("waitHealthy", [wait]);
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            run_with(&seq, Log::default(), &bus, None, &cancel),
        )
        .await
        .expect("interrupted at once")
        .expect_err("cancelled");
        assert!(err.is_cancelled());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_holds_its_thread_does_not_hold_up_the_others_of_its_phase() {
        // `holds` blocks its thread until `answers` has run: polled in one future with it,
        // it would wait out the timeout and fail.
        let bus = EventBus::new(64);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let holds = Task::new("holds", move |_: ()| {
            let rx = rx.clone();
            async move {
                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv_timeout(Duration::from_secs(10)).map_err(|_| Fire)
            }
        });
        let answers = Task::new("answers", move |_: ()| {
            let tx = tx.clone();
            async move { tx.send(()).map_err(|_| Fire) }
        });
        let seq = Sequence::new("s").phase("p", [holds, answers]);
        run(&seq, (), &bus, None).await.expect("both ran");
    }

    #[tokio::test]
    async fn an_interrupted_phase_stops_its_tasks() {
        let bus = EventBus::new(64);
        let cancel = Cancel::new();
        let c = cancel.clone();
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticking = Task::new("ticking", move |_: ()| {
            let (c, t) = (c.clone(), t.clone());
            async move {
                c.abort("reset");
                for _ in 0..10_000 {
                    t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok::<(), Fire>(())
            }
        });
        let seq = Sequence::new("s").phase("p", [ticking]);
        let err = run_with(&seq, (), &bus, None, &cancel)
            .await
            .expect_err("aborted");
        assert!(err.is_cancelled());
        let at_abort = ticks.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ticks.load(std::sync::atomic::Ordering::SeqCst),
            at_abort,
            "the task went on after its phase was dropped"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_phase_waits_for_the_blocking_work_its_tasks_began() {
        let bus = EventBus::new(64);
        let cancel = Cancel::new();
        let c = cancel.clone();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let e = ended.clone();
        let writes = Task::new("writes", move |_: ()| {
            let (c, e) = (c.clone(), e.clone());
            async move {
                let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
                let work = blocking(move || {
                    let _ = started_tx.send(());
                    std::thread::sleep(Duration::from_millis(300));
                    e.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                tokio::pin!(work);
                // Polled once, the work is on its thread.
                let _ = futures::poll!(&mut work);
                let _ = started_rx.await;
                c.abort("forced shutdown");
                work.await.map_err(|_| Fire)
            }
        });
        let seq = Sequence::new("s").phase("p", [writes]);
        let err = run_with(&seq, (), &bus, None, &cancel)
            .await
            .expect_err("aborted");
        assert!(err.is_cancelled());
        assert!(
            ended.load(std::sync::atomic::Ordering::SeqCst),
            "the sequence ended while its blocking work still ran"
        );
    }

    #[tokio::test]
    async fn a_panicking_task_fails_saying_what_it_said() {
        let bus = EventBus::new(64);
        let panics = Task::new("panics", |_: ()| async {
            if std::hint::black_box(true) {
                panic!("the disk is on fire");
            }
            Ok::<(), Fire>(())
        });
        let seq = Sequence::new("s").phase("p", [panics]);
        let err = run(&seq, (), &bus, None).await.expect_err("failed");
        let text = chain(&err);
        assert!(text.contains("the disk is on fire"), "{text}");
    }

    #[tokio::test]
    async fn stop_events_carry_durations_and_the_actor() {
        let bus = EventBus::new(64);
        let slow = Task::new("slow", |_: ()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<(), Fire>(())
        });
        let seq = Sequence::new("s").phase("p", [slow]);
        run(&seq, (), &bus, Some("actor-1")).await.expect("runs");
        let events = bus.snapshot();
        assert!(events.iter().all(|e| e.actor.as_deref() == Some("actor-1")));
        let task_us = events.iter().find_map(|e| match e.kind {
            EventKind::TaskStop { duration_us, .. } => Some(duration_us),
            _ => None,
        });
        assert!(task_us.is_some_and(|us| us >= 20_000), "{task_us:?}");
    }
}
