//! Debug: an admin's audited way into the node ([`workloads::debug`]): an imported image run
//! with the node's namespaces and its root at `/host`, its stdin and output carried by the
//! call, killed when the caller goes. Every run, and every refusal of one, is a `workload`
//! event with the actor id, the image's digest and the command.

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

/// Numbers the sessions of this boot. A debug container's name has a dot, which no
/// container of the config may have, so the two never meet.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Where a session's FIFOs are made.
const FIFOS: &str = "/run/plinth/debug";

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

/// Starts a debug session; its output is the call's answer.
pub async fn debug(
    rt: &Arc<Runtime>,
    actor: String,
    options: DebugOptions,
    input: DebugInput,
) -> Result<DebugOutput, ApiError> {
    let containerd = super::workloads::containerd(rt)?;
    let name = format!("debug.{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let command = format!("{:?}", options.command);
    let refused = |e: &dyn std::fmt::Display| {
        event(
            rt,
            &actor,
            &name,
            "refused",
            format!("image {:?}, command {command}: {e}", options.image),
        )
    };
    let image = match workloads::oci::normalize(&options.image) {
        Ok(i) => i,
        Err(e) => {
            refused(&e);
            return Err(ApiError::BadRequest(format!("the debug image: {e}")));
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
    let dir = std::path::Path::new(FIFOS).join(&name);
    let task = match containerd.start_debug(&spec, &dir).await {
        Ok(t) => t,
        Err(e) => {
            refused(&e);
            return Err(e.into());
        }
    };
    event(
        rt,
        &actor,
        &name,
        "started",
        format!(
            "image {image} ({}), command {command}, PID {}",
            task.digest, task.pid
        ),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<DebugResponse, Status>>(16);
    let started = DebugResponse {
        msg: Some(debug_response::Msg::Started(DebugStarted {
            actor_id: actor.clone(),
            name: name.clone(),
            image_digest: task.digest.clone(),
            pid: task.pid,
        })),
    };
    // Room for it: the channel is new.
    let _ = tx.try_send(Ok(started));
    let session_rt = rt.clone();
    let spawned = rt.sessions.spawn(move |stop| async move {
        let input = input.map(|m| match m {
            Ok(DebugRequest {
                msg: Some(debug_request::Msg::Stdin(b)),
            }) => Ok(Input::Stdin(b)),
            Ok(DebugRequest {
                msg: Some(debug_request::Msg::Resize(s)),
            }) => Ok(Input::Resize(clamp(s.rows), clamp(s.cols))),
            Ok(_) => Err("a Debug message after the first carried options".to_string()),
            Err(s) => Err(s.message().to_string()),
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
        let how = match ending {
            Ending::Exited(status) => {
                let _ = tx
                    .send(Ok(DebugResponse {
                        msg: Some(debug_response::Msg::ExitStatus(status)),
                    }))
                    .await;
                format!("exit status {status}")
            }
            Ending::CallerGone => "the caller went away: killed".to_string(),
            Ending::Cancelled => {
                let _ = tx
                    .send(Err(Status::aborted(
                        "the node is going down: the debug container was killed",
                    )))
                    .await;
                "the node is going down: killed".to_string()
            }
        };
        event(&session_rt, &actor, &name, "ended", how);
    });
    if spawned.is_err() {
        // The node began going down between the start and now: the container goes with it.
        let _ = containerd.remove_container(&spec.name).await;
        let _ = std::fs::remove_dir_all(&dir);
        return Err(ApiError::Precondition(
            "the node is going down: no debug session starts".into(),
        ));
    }
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    })))
}

/// A terminal dimension as the runtime takes it.
fn clamp(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}
