//! The event bus: every sequence, phase and task start/stop, every lifecycle transition.
//!
//! Events get a monotonic id under one lock, go into a bounded ring (for replay), to the sinks
//! (the console trace) and to live watchers, in that order, so a watcher that subscribes with a
//! replay sees every event exactly once and in id order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::clock;

/// One thing that happened on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic id, unique for this boot.
    pub id: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Microseconds since the kernel started (`CLOCK_BOOTTIME`).
    pub boot_us: u64,
    /// The id of the request that caused this event, if a request did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What an [`Event`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A sequence started.
    SequenceStart {
        /// Sequence name.
        sequence: String,
    },
    /// A sequence stopped; `error` is set when it failed.
    SequenceStop {
        /// Sequence name.
        sequence: String,
        /// How long it ran.
        duration_us: u64,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A phase started.
    PhaseStart {
        /// Sequence name.
        sequence: String,
        /// Phase name.
        phase: String,
        /// 1-based position of the phase in its sequence.
        index: usize,
        /// Number of phases in the sequence.
        total: usize,
    },
    /// A phase stopped.
    PhaseStop {
        /// Sequence name.
        sequence: String,
        /// Phase name.
        phase: String,
        /// How long it ran.
        duration_us: u64,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A conditional phase did not run because its condition was false.
    PhaseSkip {
        /// Sequence name.
        sequence: String,
        /// Phase name.
        phase: String,
    },
    /// A task started.
    TaskStart {
        /// Sequence name.
        sequence: String,
        /// Phase name.
        phase: String,
        /// Task name.
        task: String,
    },
    /// A task stopped.
    TaskStop {
        /// Sequence name.
        sequence: String,
        /// Phase name.
        phase: String,
        /// Task name.
        task: String,
        /// How long it ran.
        duration_us: u64,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The node lifecycle machine changed state.
    StateChange {
        /// State left.
        from: String,
        /// State entered.
        to: String,
    },
    /// A request was refused by the lifecycle machine.
    RequestDenied {
        /// What was asked.
        request: String,
        /// Why it was refused.
        reason: String,
    },
    /// The API is accepting connections and reachable: at boot, once the node's addresses are
    /// configured.
    ApiReady {
        /// Address it listens on.
        endpoint: String,
    },
    /// A slot's record changed (written, pending, on trial, committed, failed).
    Slot {
        /// `A` or `B`.
        slot: String,
        /// Its state now.
        state: String,
        /// What happened.
        message: String,
    },
    /// Progress of a long step (bytes written, for instance).
    Progress {
        /// Sequence name.
        sequence: String,
        /// What is progressing.
        what: String,
        /// Done so far.
        done: u64,
        /// Total.
        total: u64,
    },
    /// A system extension was activated or refused.
    Extension {
        /// Its name.
        name: String,
        /// `active` or `refused`.
        state: String,
        /// Its version and digest, or why it was refused.
        message: String,
    },
    /// Something happened to a workload object: an image imported, a container started or
    /// stopped, a debug container run (the event's actor says who asked).
    Workload {
        /// `image`, `container` or `debug`.
        object: String,
        /// Its name (an image reference, a container name).
        name: String,
        /// What happened (`imported`, `started`, ...).
        action: String,
        /// Details: a digest, a command, an error.
        message: String,
    },
    /// Something happened in the node's part of the cluster: a reboot slot waited for, held
    /// or released.
    Cluster {
        /// What it is about (`reboot-slot`).
        what: String,
        /// Its state now (`waiting`, `held`, `released`).
        state: String,
        /// What happened.
        message: String,
    },
    /// A supervised service changed state.
    Service {
        /// Service name.
        service: String,
        /// Its state now (waiting, running, backoff, stopping, stopped, failed).
        state: String,
        /// What happened (pid, exit status, health).
        message: String,
    },
}

impl EventKind {
    /// A short dotted name for the kind, as used on the console and in the API.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SequenceStart { .. } => "sequence.start",
            EventKind::SequenceStop { .. } => "sequence.stop",
            EventKind::PhaseStart { .. } => "phase.start",
            EventKind::PhaseStop { .. } => "phase.stop",
            EventKind::PhaseSkip { .. } => "phase.skip",
            EventKind::TaskStart { .. } => "task.start",
            EventKind::TaskStop { .. } => "task.stop",
            EventKind::StateChange { .. } => "state.change",
            EventKind::RequestDenied { .. } => "request.denied",
            EventKind::ApiReady { .. } => "api.ready",
            EventKind::Service { .. } => "service",
            EventKind::Extension { .. } => "extension",
            EventKind::Workload { .. } => "workload",
            EventKind::Cluster { .. } => "cluster",
            EventKind::Slot { .. } => "slot",
            EventKind::Progress { .. } => "progress",
        }
    }
}

/// Which past events a new watcher gets before the live ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Only events published after subscribing.
    None,
    /// The last `n` events kept.
    Tail(usize),
    /// Every kept event with an id greater than this one.
    SinceId(u64),
    /// Every kept event.
    All,
}

/// Why a subscription could not start or cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The asked-for events fell out of the ring buffer.
    #[error("events after id {since} are no longer kept (the oldest kept is {oldest})")]
    Expired {
        /// The id asked for.
        since: u64,
        /// The oldest id still kept.
        oldest: u64,
    },
    /// The watcher read too slowly and the bus dropped events it had not read.
    #[error("watcher fell behind and missed {missed} events")]
    Lagged {
        /// How many events were missed.
        missed: u64,
    },
    /// The bus is gone.
    #[error("event bus closed")]
    Closed,
}

/// A function that sees every event as it is published (the console trace).
pub type Sink = Box<dyn Fn(&Event) + Send + Sync>;

struct Ring {
    events: VecDeque<Event>,
    capacity: usize,
    next_id: u64,
    sinks: Vec<Sink>,
}

/// The node's event bus. Cheap to share behind an `Arc`.
pub struct EventBus {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Event>,
}

/// A watcher: the replayed backlog first, then live events.
pub struct Subscription {
    backlog: VecDeque<Event>,
    live: broadcast::Receiver<Event>,
    actor: Option<String>,
}

impl EventBus {
    /// A bus keeping the last `capacity` events; live watchers may lag by as much before they
    /// get [`SubscribeError::Lagged`].
    pub fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        let (live, _) = broadcast::channel(capacity);
        Arc::new(EventBus {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity),
                capacity,
                next_id: 1,
                sinks: Vec::new(),
            }),
            live,
        })
    }

    // A panic while holding the lock must not take the event bus down with it: PID 1 keeps
    // publishing, so a poisoned lock is taken over as is (the ring is always consistent).
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a sink that sees every event published from now on.
    pub fn add_sink(&self, sink: Sink) {
        self.lock().sinks.push(sink);
    }

    /// Publishes an event now and returns it.
    pub fn publish(&self, kind: EventKind, actor: Option<&str>) -> Event {
        let mut ring = self.lock();
        let event = Event {
            id: ring.next_id,
            unix_ms: clock::unix_ms(),
            boot_us: clock::boot_us(),
            actor: actor.map(str::to_owned),
            kind,
        };
        ring.next_id += 1;
        Self::keep(&mut ring, event.clone());
        for sink in &ring.sinks {
            sink(&event);
        }
        // No receivers is not an error: nobody is watching.
        let _ = self.live.send(event.clone());
        event
    }

    /// Adds events that happened before this bus existed (the initramfs's, handed over through
    /// `/run`), keeping their ids and times; later events continue after the highest id.
    pub fn import(&self, events: impl IntoIterator<Item = Event>) {
        let mut ring = self.lock();
        for event in events {
            ring.next_id = ring.next_id.max(event.id + 1);
            Self::keep(&mut ring, event);
        }
    }

    fn keep(ring: &mut Ring, event: Event) {
        if ring.events.len() == ring.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
    }

    /// Every event still kept, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// Starts watching: the events `replay` selects, then every new one. With `actor`, only
    /// events caused by that actor id are delivered.
    pub fn subscribe(
        &self,
        replay: Replay,
        actor: Option<String>,
    ) -> Result<Subscription, SubscribeError> {
        // Subscribing under the ring lock means no event is both replayed and received live,
        // and none falls between the two.
        let ring = self.lock();
        let live = self.live.subscribe();
        let kept = &ring.events;
        let backlog: VecDeque<Event> = match replay {
            Replay::None => VecDeque::new(),
            Replay::All => kept.iter().cloned().collect(),
            Replay::Tail(n) => kept
                .iter()
                .skip(kept.len().saturating_sub(n))
                .cloned()
                .collect(),
            Replay::SinceId(since) => {
                let oldest = kept.front().map(|e| e.id).unwrap_or(ring.next_id);
                // Ids since+1 .. oldest-1 existed and were dropped: the watcher would miss them.
                if since + 1 < oldest {
                    return Err(SubscribeError::Expired { since, oldest });
                }
                kept.iter().filter(|e| e.id > since).cloned().collect()
            }
        };
        Ok(Subscription {
            backlog,
            live,
            actor,
        })
    }
}

impl Subscription {
    /// The next event for this watcher.
    pub async fn next(&mut self) -> Result<Event, SubscribeError> {
        loop {
            let event = match self.backlog.pop_front() {
                Some(e) => e,
                None => match self.live.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        return Err(SubscribeError::Lagged { missed })
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(SubscribeError::Closed),
                },
            };
            if self.matches(&event) {
                return Ok(event);
            }
        }
    }

    /// The replayed events not yet read, without waiting for live ones.
    pub fn drain_backlog(&mut self) -> Vec<Event> {
        let actor = self.actor.clone();
        self.backlog
            .drain(..)
            .filter(|e| actor.is_none() || e.actor == actor)
            .collect()
    }

    fn matches(&self, event: &Event) -> bool {
        self.actor.is_none() || event.actor == self.actor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(name: &str) -> EventKind {
        EventKind::SequenceStart {
            sequence: name.into(),
        }
    }

    #[test]
    fn ids_are_monotonic_and_start_at_one() {
        let bus = EventBus::new(8);
        let ids: Vec<u64> = (0..5)
            .map(|_| bus.publish(start("boot"), None).id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn ring_keeps_only_the_newest_events() {
        let bus = EventBus::new(3);
        for _ in 0..5 {
            bus.publish(start("boot"), None);
        }
        let ids: Vec<u64> = bus.snapshot().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
    }

    #[tokio::test]
    async fn tail_replay_then_live_events_arrive_in_order_without_gaps() {
        let bus = EventBus::new(16);
        for _ in 0..4 {
            bus.publish(start("boot"), None);
        }
        let mut sub = bus.subscribe(Replay::Tail(2), None).expect("subscribe");
        bus.publish(start("reboot"), None);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(sub.next().await.expect("event").id);
        }
        assert_eq!(ids, vec![3, 4, 5]);
    }

    #[tokio::test]
    async fn since_id_replays_only_newer_events() {
        let bus = EventBus::new(16);
        for _ in 0..4 {
            bus.publish(start("boot"), None);
        }
        let mut sub = bus.subscribe(Replay::SinceId(2), None).expect("subscribe");
        let ids: Vec<u64> = sub.drain_backlog().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![3, 4]);
    }

    #[test]
    fn since_an_id_that_fell_out_of_the_ring_is_refused() {
        let bus = EventBus::new(2);
        for _ in 0..5 {
            bus.publish(start("boot"), None);
        }
        let err = bus.subscribe(Replay::SinceId(1), None).err();
        assert_eq!(
            err,
            Some(SubscribeError::Expired {
                since: 1,
                oldest: 4
            })
        );
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_gets_an_error_not_silent_loss() {
        let bus = EventBus::new(2);
        let mut sub = bus.subscribe(Replay::None, None).expect("subscribe");
        for _ in 0..5 {
            bus.publish(start("boot"), None);
        }
        assert!(matches!(
            sub.next().await,
            Err(SubscribeError::Lagged { .. })
        ));
    }

    #[tokio::test]
    async fn actor_filter_delivers_only_that_actors_events() {
        let bus = EventBus::new(16);
        bus.publish(start("boot"), Some("a1"));
        bus.publish(start("reboot"), Some("a2"));
        let mut sub = bus
            .subscribe(Replay::All, Some("a2".into()))
            .expect("subscribe");
        let e = sub.next().await.expect("event");
        assert_eq!(e.actor.as_deref(), Some("a2"));
    }

    #[test]
    fn imported_events_keep_their_ids_and_new_ones_follow() {
        let bus = EventBus::new(16);
        let early = EventBus::new(16);
        early.publish(start("initramfs"), None);
        early.publish(start("initramfs"), None);
        bus.import(early.snapshot());
        assert_eq!(bus.publish(start("boot"), None).id, 3);
    }

    #[test]
    fn sinks_see_every_event_in_order() {
        let bus = EventBus::new(4);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.add_sink(Box::new(move |e| s.lock().expect("lock").push(e.id)));
        for _ in 0..3 {
            bus.publish(start("boot"), None);
        }
        assert_eq!(*seen.lock().expect("lock"), vec![1, 2, 3]);
    }

    #[test]
    fn events_serialize_with_a_flat_kind_tag() {
        let bus = EventBus::new(4);
        let e = bus.publish(start("boot"), Some("x"));
        let json = serde_json::to_string(&e).expect("json");
        assert!(json.contains("\"kind\":\"sequence_start\""), "{json}");
        let back: Event = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, e);
    }
}
