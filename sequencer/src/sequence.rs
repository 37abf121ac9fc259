//! What to run: sequences as tables of phases, phases as sets of tasks.
//!
//! A sequence is data, built in one place and readable like a checklist:
//!
//! ```
//! # use sequencer::{Sequence, Task, TaskError};
//! # async fn mount_state(_: ()) -> Result<(), TaskError> { Ok(()) }
//! # async fn start_api(_: ()) -> Result<(), TaskError> { Ok(()) }
//! let boot: Sequence<()> = Sequence::new("boot")
//!     .phase("mountState", [Task::new("mountState", mount_state)])
//!     .phase_when("startApi", |_| true, [Task::new("startApi", start_api)]);
//! assert_eq!(boot.phase_names(), ["mountState", "startApi"]);
//! ```
//!
//! How it runs (events, timing, spans) lives in [`crate::runner`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The error a task fails with: any error, boxed, with its source chain.
pub type TaskError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a task returns.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + 'static>>;

type TaskFn<C> = Arc<dyn Fn(C) -> TaskFuture + Send + Sync>;
type Condition<C> = Arc<dyn Fn(&C) -> bool + Send + Sync>;

/// One unit of work: a stable name (part of the API: events and tests use it) and a function.
pub struct Task<C> {
    pub(crate) name: &'static str,
    pub(crate) run: TaskFn<C>,
}

impl<C> Clone for Task<C> {
    fn clone(&self) -> Self {
        Task {
            name: self.name,
            run: self.run.clone(),
        }
    }
}

impl<C: 'static> Task<C> {
    /// A task named `name` that runs `f` with the sequence's context.
    pub fn new<F, Fut, E>(name: &'static str, f: F) -> Self
    where
        F: Fn(C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<TaskError> + 'static,
    {
        Task {
            name,
            run: Arc::new(move |ctx| {
                let fut = f(ctx);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }),
        }
    }

    /// The task's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// A named step of a sequence: its tasks run concurrently; it may be conditional.
pub struct Phase<C> {
    pub(crate) name: &'static str,
    pub(crate) tasks: Vec<Task<C>>,
    pub(crate) condition: Option<Condition<C>>,
    pub(crate) interruptible: bool,
}

impl<C> Clone for Phase<C> {
    fn clone(&self) -> Self {
        Phase {
            name: self.name,
            tasks: self.tasks.clone(),
            condition: self.condition.clone(),
            interruptible: self.interruptible,
        }
    }
}

impl<C> Phase<C> {
    /// The phase's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The names of the phase's tasks, in table order.
    pub fn task_names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|t| t.name).collect()
    }

    /// The phase's tasks.
    pub fn tasks(&self) -> &[Task<C>] {
        &self.tasks
    }

    /// Whether the phase runs for this context.
    pub fn applies(&self, ctx: &C) -> bool {
        self.condition.as_ref().is_none_or(|c| c(ctx))
    }
}

/// An ordered list of phases with a name.
pub struct Sequence<C> {
    pub(crate) name: &'static str,
    pub(crate) phases: Vec<Phase<C>>,
}

impl<C> Clone for Sequence<C> {
    fn clone(&self) -> Self {
        Sequence {
            name: self.name,
            phases: self.phases.clone(),
        }
    }
}

impl<C> Sequence<C> {
    /// An empty sequence.
    pub fn new(name: &'static str) -> Self {
        Sequence {
            name,
            phases: Vec::new(),
        }
    }

    fn push(
        mut self,
        name: &'static str,
        tasks: impl IntoIterator<Item = Task<C>>,
        interruptible: bool,
    ) -> Self {
        self.phases.push(Phase {
            name,
            tasks: tasks.into_iter().collect(),
            condition: None,
            interruptible,
        });
        self
    }

    /// Appends a phase that always runs.
    pub fn phase(self, name: &'static str, tasks: impl IntoIterator<Item = Task<C>>) -> Self {
        self.push(name, tasks, false)
    }

    /// Appends a phase that only waits (for health, for a deadline) and changes nothing, so a
    /// cancel may interrupt it instead of waiting for its end.
    pub fn waiting_phase(
        self,
        name: &'static str,
        tasks: impl IntoIterator<Item = Task<C>>,
    ) -> Self {
        self.push(name, tasks, true)
    }

    /// Appends a phase whose work may be dropped half-way by a takeover the table allows at
    /// this [`Stage`](crate::Stage::Interruptible): it changes nothing that stopping in the
    /// middle could leave unbootable (a slot already marked as being written).
    pub fn interruptible_phase(
        self,
        name: &'static str,
        tasks: impl IntoIterator<Item = Task<C>>,
    ) -> Self {
        self.push(name, tasks, true)
    }

    /// Appends a phase that runs only when `condition` holds for the context at that point.
    pub fn phase_when(
        mut self,
        name: &'static str,
        condition: impl Fn(&C) -> bool + Send + Sync + 'static,
        tasks: impl IntoIterator<Item = Task<C>>,
    ) -> Self {
        self.phases.push(Phase {
            name,
            tasks: tasks.into_iter().collect(),
            condition: Some(Arc::new(condition)),
            interruptible: false,
        });
        self
    }

    /// The sequence's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The phases, in order.
    pub fn phases(&self) -> &[Phase<C>] {
        &self.phases
    }

    /// The phase names, in order (conditional phases included).
    pub fn phase_names(&self) -> Vec<&'static str> {
        self.phases.iter().map(|p| p.name).collect()
    }
}
