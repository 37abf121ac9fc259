//! Debug: an admin's audited way into the node ([`workloads::debug`]): an imported image run
//! with the node's namespaces and its root at `/host`, its stdin and output carried by the
//! call, killed when the caller goes. Every run, and every refusal of one, is a `workload`
//! event with the actor id, the image's digest and the command.
//!
//! The session is a task of the node's ([`phases::sessions`]) from before the container is
//! made until after it is removed: a caller that goes mid-start (a deadline, a reset stream,
//! a closed connection) cannot leave a container behind, and a shutdown ends every session
//! before containerd stops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use api::proto::{
    debug_request, debug_response, DebugOptions, DebugRequest, DebugResponse, DebugStarted,
};
use api::server::{DebugInput, DebugOutput};
use futures::StreamExt;
use phases::Runtime;
use sequencer::EventKind;
use tonic::Status;
use workloads::debug::{DebugSpec, Ending, Input, Output};

use super::error::ApiError;

/// The default terminal when the caller gives no size.
const TERMINAL: (u16, u16) = (24, 80);
/// The most arguments a command has, and the most bytes they add up to.
const MAX_ARGS: usize = 64;
const MAX_COMMAND: usize = 4096;
/// How much of the command an event shows.
const EVENT_COMMAND: usize = 512;

/// Numbers the sessions of this boot.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Where a session's FIFOs are made.
const FIFOS: &str = "/run/plinth/debug";

/// What a debug container's name starts with. It has dots, which no container of the config
/// may have, so the two never meet.
const PREFIX: &str = "debug.";

fn event(rt: &Runtime, actor: &str, name: &str, action: &str, message: String) {
    rt.bus.publish(
        EventKind::Workload {
            object: "debug".into(),
            name: name.into(),
            action: action.into(),
            message,
        },
        Some(actor),
    );
}

/// The command as events show it (shortened: events are kept in PID 1's memory).
fn shown(command: &[String]) -> String {
    let mut s = format!("{command:?}");
    if s.len() > EVENT_COMMAND {
        let mut cut = EVENT_COMMAND;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Checks the options: an image reference, a bounded command without NUL bytes.
fn check(options: &DebugOptions) -> Result<String, String> {
    if options.command.len() > MAX_ARGS
        || options.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND
    {
        return Err(format!(
            "the command is too long (at most {MAX_ARGS} arguments and {MAX_COMMAND} bytes)"
        ));
    }
    if options.command.iter().any(|a| a.contains('\0')) {
        return Err("the command has an argument with a NUL byte".into());
    }
    workloads::oci::normalize(&options.image).map_err(|e| format!("the debug image: {e}"))
}

/// Starts a debug session; its output is the call's answer.
pub async fn debug(
    rt: &Arc<Runtime>,
    actor: String,
    options: DebugOptions,
    input: DebugInput,
) -> Result<DebugOutput, ApiError> {
    let boot: String = rt.platform.boot_id().chars().take(8).collect();
    let name = format!("{PREFIX}{boot}.{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let command = shown(&options.command);
    let refused = |why: &str| {
        event(
            rt,
            &actor,
            &name,
            "refused",
            format!("image {:?}, command {command}: {why}", options.image),
        )
    };
    let containerd = match super::workloads::containerd(rt) {
        Ok(c) => c,
        Err(e) => {
            refused(&e.to_string());
            return Err(e);
        }
    };
    let image = match check(&options) {
        Ok(i) => i,
        Err(e) => {
            refused(&e);
            return Err(ApiError::BadRequest(e));
        }
    };
    let terminal = options.tty.then(|| match options.size {
        Some(s) if s.rows > 0 && s.cols > 0 => (clamp(s.rows), clamp(s.cols)),
        _ => TERMINAL,
    });
    let spec = DebugSpec {
        name: name.clone(),
        image: image.clone(),
        command: options.command.clone(),
        terminal,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<DebugResponse, Status>>(16);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let session_rt = rt.clone();
    let session_actor = actor.clone();
    let session_boot = boot.clone();
    let spawned = rt.sessions.spawn(move |stop| async move {
        let (rt, actor) = (session_rt, session_actor);
        remove_stale(&containerd, &name, &session_boot).await;
        let dir = std::path::Path::new(FIFOS).join(&name);
        let task = match containerd.start_debug(&spec, &dir).await {
            Ok(t) => t,
            Err(e) => {
                event(
                    &rt,
                    &actor,
                    &name,
                    "refused",
                    format!("image {image}, command {command}: {e}"),
                );
                let _ = started_tx.send(Err(ApiError::from(e)));
                return;
            }
        };
        event(
            &rt,
            &actor,
            &name,
            "started",
            format!(
                "image {image} ({}), command {command}, PID {}",
                task.digest, task.pid
            ),
        );
        let started = DebugResponse {
            msg: Some(debug_response::Msg::Started(DebugStarted {
                actor_id: actor.clone(),
                name: name.clone(),
                image_digest: task.digest.clone(),
                pid: task.pid,
            })),
        };
        // The channel is new, so there is room; a caller already gone is found by the relay.
        let _ = tx.try_send(Ok(started));
        let _ = started_tx.send(Ok(()));
        let input = input.map(|m| match m {
            Ok(DebugRequest {
                msg: Some(debug_request::Msg::Stdin(b)),
            }) => Ok(Input::Stdin(b)),
            Ok(DebugRequest {
                msg: Some(debug_request::Msg::Resize(s)),
            }) => Ok(Input::Resize(clamp(s.rows), clamp(s.cols))),
            Ok(_) => Err("a Debug message after the first carried options, or nothing".to_string()),
            Err(s) => Err(format!("the call broke: {}", s.message())),
        });
        let wrap = |o: Output| {
            Ok(DebugResponse {
                msg: Some(match o {
                    Output::Stdout(b) => debug_response::Msg::Stdout(b),
                    Output::Stderr(b) => debug_response::Msg::Stderr(b),
                }),
            })
        };
        let ending = task.run(Box::pin(input), tx.clone(), wrap, stop).await;
        let (last, how) = match ending {
            Ending::Exited(status) => (
                Ok(DebugResponse {
                    msg: Some(debug_response::Msg::ExitStatus(status)),
                }),
                format!("exit status {status}"),
            ),
            Ending::CallerGone => (
                Err(Status::cancelled("the caller went away")),
                "the caller went away: killed".to_string(),
            ),
            Ending::BadInput(e) => (
                Err(Status::invalid_argument(format!(
                    "{e}: the debug container was killed"
                ))),
                format!("{e}: killed"),
            ),
            Ending::Cancelled => (
                Err(Status::aborted(
                    "the node is going down: the debug container was killed",
                )),
                "the node is going down: killed".to_string(),
            ),
            Ending::RuntimeLost(e) => (
                Err(Status::unavailable(format!(
                    "containerd stopped answering ({e}): the debug container was killed"
                ))),
                format!("containerd stopped answering ({e}): killed"),
            ),
        };
        let _ = tx.send(last).await;
        event(&rt, &actor, &name, "ended", how);
    });
    if let Err(e) = spawned {
        let why = e.to_string();
        event(
            rt,
            &actor,
            &format!("{PREFIX}{boot}"),
            "refused",
            format!(
                "image {:?}, command {}: {why}",
                options.image,
                shown(&options.command)
            ),
        );
        return Err(match e {
            phases::sessions::Refused::Stopping => ApiError::Precondition(why),
            phases::sessions::Refused::Full => ApiError::Busy(why),
        });
    }
    match started_rx.await {
        Ok(Ok(())) => Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::Internal(
            "the debug session ended before it started".into(),
        )),
    }
}

/// Removes debug containers an earlier boot left (a power cut does not let a session clean
/// up; the records and snapshots stay on EPHEMERAL).
async fn remove_stale(containerd: &workloads::Containerd, name: &str, boot: &str) {
    let Ok(held) = containerd.containers().await else {
        return;
    };
    let this_boot = format!("{PREFIX}{boot}.");
    for c in held {
        if c.name.starts_with(PREFIX) && !c.name.starts_with(&this_boot) && c.name != name {
            let _ = containerd.remove_container(&c.name).await;
        }
    }
}

/// A terminal dimension as the runtime takes it.
fn clamp(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_bounded_and_without_nul_bytes() {
        let opts = |command: Vec<String>| DebugOptions {
            image: "busybox".into(),
            command,
            ..Default::default()
        };
        assert_eq!(
            check(&opts(vec!["cat".into()])),
            Ok("docker.io/library/busybox:latest".into())
        );
        assert!(check(&opts(vec!["a".into(); MAX_ARGS + 1]))
            .unwrap_err()
            .contains("too long"));
        assert!(check(&opts(vec!["x".repeat(MAX_COMMAND + 1)]))
            .unwrap_err()
            .contains("too long"));
        assert!(check(&opts(vec!["a\0b".into()]))
            .unwrap_err()
            .contains("NUL"));
        let long = shown(&["é".repeat(400)]);
        assert!(long.len() <= EVENT_COMMAND + '…'.len_utf8() && long.ends_with('…'));
    }
}
