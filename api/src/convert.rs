//! Events between the sequencer's form and the wire form, both ways (the CLI turns wire events
//! back into sequencer events to print and chart them).

use sequencer::{Event, EventKind};

use crate::proto::{self, event::Payload, Action};

fn err_str(e: &Option<String>) -> String {
    e.clone().unwrap_or_default()
}

fn err_opt(e: &str) -> Option<String> {
    (!e.is_empty()).then(|| e.to_string())
}

/// The wire form of an event.
pub fn to_proto(e: &Event) -> proto::Event {
    let payload = match &e.kind {
        EventKind::SequenceStart { sequence } => Payload::Sequence(proto::SequenceEvent {
            sequence: sequence.clone(),
            action: Action::Start as i32,
            ..Default::default()
        }),
        EventKind::SequenceStop {
            sequence,
            duration_us,
            error,
        } => Payload::Sequence(proto::SequenceEvent {
            sequence: sequence.clone(),
            action: Action::Stop as i32,
            duration_us: *duration_us,
            error: err_str(error),
        }),
        EventKind::PhaseStart {
            sequence,
            phase,
            index,
            total,
        } => Payload::Phase(proto::PhaseEvent {
            sequence: sequence.clone(),
            phase: phase.clone(),
            action: Action::Start as i32,
            index: *index as u32,
            total: *total as u32,
            ..Default::default()
        }),
        EventKind::PhaseStop {
            sequence,
            phase,
            duration_us,
            error,
        } => Payload::Phase(proto::PhaseEvent {
            sequence: sequence.clone(),
            phase: phase.clone(),
            action: Action::Stop as i32,
            duration_us: *duration_us,
            error: err_str(error),
            ..Default::default()
        }),
        EventKind::PhaseSkip { sequence, phase } => Payload::Phase(proto::PhaseEvent {
            sequence: sequence.clone(),
            phase: phase.clone(),
            action: Action::Skip as i32,
            ..Default::default()
        }),
        EventKind::TaskStart {
            sequence,
            phase,
            task,
        } => Payload::Task(proto::TaskEvent {
            sequence: sequence.clone(),
            phase: phase.clone(),
            task: task.clone(),
            action: Action::Start as i32,
            ..Default::default()
        }),
        EventKind::TaskStop {
            sequence,
            phase,
            task,
            duration_us,
            error,
        } => Payload::Task(proto::TaskEvent {
            sequence: sequence.clone(),
            phase: phase.clone(),
            task: task.clone(),
            action: Action::Stop as i32,
            duration_us: *duration_us,
            error: err_str(error),
        }),
        EventKind::StateChange { from, to } => Payload::StateChange(proto::StateChange {
            from: from.clone(),
            to: to.clone(),
        }),
        EventKind::RequestDenied { request, reason } => {
            Payload::RequestDenied(proto::RequestDenied {
                request: request.clone(),
                reason: reason.clone(),
            })
        }
        EventKind::ApiReady { endpoint } => Payload::ApiReady(proto::ApiReady {
            endpoint: endpoint.clone(),
        }),
        EventKind::Extension {
            name,
            state,
            message,
        } => Payload::Extension(proto::ExtensionEvent {
            name: name.clone(),
            state: state.clone(),
            message: message.clone(),
        }),
        EventKind::Workload {
            object,
            name,
            action,
            message,
        } => Payload::Workload(proto::WorkloadEvent {
            object: object.clone(),
            name: name.clone(),
            action: action.clone(),
            message: message.clone(),
        }),
        EventKind::Cluster {
            what,
            state,
            message,
        } => Payload::Cluster(proto::ClusterEvent {
            what: what.clone(),
            state: state.clone(),
            message: message.clone(),
        }),
        EventKind::Service {
            service,
            state,
            message,
        } => Payload::Service(proto::ServiceEvent {
            service: service.clone(),
            state: state.clone(),
            message: message.clone(),
        }),
        EventKind::Slot {
            slot,
            state,
            message,
        } => Payload::Slot(proto::SlotEvent {
            slot: slot.clone(),
            state: state.clone(),
            message: message.clone(),
        }),
        EventKind::Progress {
            sequence,
            what,
            done,
            total,
        } => Payload::Progress(proto::ProgressEvent {
            sequence: sequence.clone(),
            what: what.clone(),
            done: *done,
            total: *total,
        }),
    };
    proto::Event {
        id: e.id,
        unix_ms: e.unix_ms,
        boot_us: e.boot_us,
        actor_id: e.actor.clone().unwrap_or_default(),
        payload: Some(payload),
    }
}

/// The sequencer form of a wire event; `None` for payloads this build does not know.
pub fn from_proto(e: &proto::Event) -> Option<Event> {
    let kind = match e.payload.as_ref()? {
        Payload::Sequence(s) => match Action::try_from(s.action).ok()? {
            Action::Start => EventKind::SequenceStart {
                sequence: s.sequence.clone(),
            },
            Action::Stop => EventKind::SequenceStop {
                sequence: s.sequence.clone(),
                duration_us: s.duration_us,
                error: err_opt(&s.error),
            },
            _ => return None,
        },
        Payload::Phase(p) => match Action::try_from(p.action).ok()? {
            Action::Start => EventKind::PhaseStart {
                sequence: p.sequence.clone(),
                phase: p.phase.clone(),
                index: p.index as usize,
                total: p.total as usize,
            },
            Action::Stop => EventKind::PhaseStop {
                sequence: p.sequence.clone(),
                phase: p.phase.clone(),
                duration_us: p.duration_us,
                error: err_opt(&p.error),
            },
            Action::Skip => EventKind::PhaseSkip {
                sequence: p.sequence.clone(),
                phase: p.phase.clone(),
            },
            Action::Unspecified => return None,
        },
        Payload::Task(t) => match Action::try_from(t.action).ok()? {
            Action::Start => EventKind::TaskStart {
                sequence: t.sequence.clone(),
                phase: t.phase.clone(),
                task: t.task.clone(),
            },
            Action::Stop => EventKind::TaskStop {
                sequence: t.sequence.clone(),
                phase: t.phase.clone(),
                task: t.task.clone(),
                duration_us: t.duration_us,
                error: err_opt(&t.error),
            },
            _ => return None,
        },
        Payload::StateChange(s) => EventKind::StateChange {
            from: s.from.clone(),
            to: s.to.clone(),
        },
        Payload::RequestDenied(r) => EventKind::RequestDenied {
            request: r.request.clone(),
            reason: r.reason.clone(),
        },
        Payload::ApiReady(a) => EventKind::ApiReady {
            endpoint: a.endpoint.clone(),
        },
        Payload::Extension(x) => EventKind::Extension {
            name: x.name.clone(),
            state: x.state.clone(),
            message: x.message.clone(),
        },
        Payload::Workload(w) => EventKind::Workload {
            object: w.object.clone(),
            name: w.name.clone(),
            action: w.action.clone(),
            message: w.message.clone(),
        },
        Payload::Cluster(c) => EventKind::Cluster {
            what: c.what.clone(),
            state: c.state.clone(),
            message: c.message.clone(),
        },
        Payload::Service(s) => EventKind::Service {
            service: s.service.clone(),
            state: s.state.clone(),
            message: s.message.clone(),
        },
        Payload::Slot(s) => EventKind::Slot {
            slot: s.slot.clone(),
            state: s.state.clone(),
            message: s.message.clone(),
        },
        Payload::Progress(p) => EventKind::Progress {
            sequence: p.sequence.clone(),
            what: p.what.clone(),
            done: p.done,
            total: p.total,
        },
    };
    Some(Event {
        id: e.id,
        unix_ms: e.unix_ms,
        boot_us: e.boot_us,
        actor: err_opt(&e.actor_id),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_survives_the_wire() {
        let kinds = vec![
            EventKind::SequenceStart {
                sequence: "boot".into(),
            },
            EventKind::SequenceStop {
                sequence: "boot".into(),
                duration_us: 5,
                error: Some("x".into()),
            },
            EventKind::PhaseStart {
                sequence: "boot".into(),
                phase: "p".into(),
                index: 2,
                total: 3,
            },
            EventKind::PhaseStop {
                sequence: "boot".into(),
                phase: "p".into(),
                duration_us: 7,
                error: None,
            },
            EventKind::PhaseSkip {
                sequence: "boot".into(),
                phase: "p".into(),
            },
            EventKind::TaskStart {
                sequence: "boot".into(),
                phase: "p".into(),
                task: "t".into(),
            },
            EventKind::TaskStop {
                sequence: "boot".into(),
                phase: "p".into(),
                task: "t".into(),
                duration_us: 9,
                error: Some("e".into()),
            },
            EventKind::StateChange {
                from: "booting".into(),
                to: "running".into(),
            },
            EventKind::RequestDenied {
                request: "reboot".into(),
                reason: "r".into(),
            },
            EventKind::ApiReady {
                endpoint: "0.0.0.0:50000".into(),
            },
            EventKind::Service {
                service: "web".into(),
                state: "running".into(),
                message: "pid 7".into(),
            },
            EventKind::Extension {
                name: "containerd".into(),
                state: "refused".into(),
                message: "signature".into(),
            },
            EventKind::Workload {
                object: "image".into(),
                name: "plinth.local/busybox:1".into(),
                action: "imported".into(),
                message: "sha256:00".into(),
            },
            EventKind::Slot {
                slot: "B".into(),
                state: "failed".into(),
                message: "failed before machined started".into(),
            },
            EventKind::Cluster {
                what: "reboot-slot".into(),
                state: "held".into(),
                message: "upgrade: holds a reboot slot".into(),
            },
            EventKind::Progress {
                sequence: "upgrade".into(),
                what: "rootfs".into(),
                done: 5,
                total: 9,
            },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let e = Event {
                id: i as u64 + 1,
                unix_ms: 10,
                boot_us: 20,
                actor: Some("a".into()),
                kind,
            };
            assert_eq!(from_proto(&to_proto(&e)), Some(e));
        }
    }
}
