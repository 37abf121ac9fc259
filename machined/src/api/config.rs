//! ApplyConfiguration and GetConfiguration.
//!
//! A config is applied by the applyConfig sequence (`phases::apply`), admitted through the
//! lifecycle like any other: refused at once (`ABORTED`) while an upgrade, reset or install
//! runs. A call admitted in maintenance mode may only give the node its first config: the
//! check here answers early, and the sequence checks again under the config lock, so no race
//! and no call let in before the config existed can replace it.

use std::sync::Arc;
use std::time::Duration;

use api::proto::{ApplyConfigurationRequest, ApplyConfigurationResponse, ApplyMode};
use api::server::Admission;
use phases::apply::{self, ApplyError, ApplyJob, Mode};
use phases::Runtime;
use sequencer::{SequenceError, SequenceKind};

use super::error::{ApiError, Failure};

fn failed(actor: &str, e: SequenceError) -> ApiError {
    match Failure::<ApplyError>::of(e) {
        Failure::Typed(error) => ApiError::Apply {
            error,
            actor: actor.into(),
        },
        Failure::Cancelled(error) => ApiError::Cancelled {
            error,
            actor: actor.into(),
        },
        Failure::Other(e) => ApiError::Internal(format!("applyConfig: {e}")),
    }
}

/// Runs `sequence` for `job` as applyConfig, to its end.
async fn run<C: Clone + Send + 'static>(
    rt: &Arc<Runtime>,
    actor: &str,
    sequence: sequencer::Sequence<C>,
    ctx: C,
) -> Result<(), ApiError> {
    let started = rt
        .controller
        .start(
            SequenceKind::ApplyConfig,
            sequence,
            ctx,
            Some(actor.into()),
            false,
        )
        .map_err(ApiError::denied(actor))?;
    match started.handle.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(failed(actor, e)),
        Err(e) => Err(ApiError::Internal(format!("applyConfig task: {e}"))),
    }
}

/// Applies (or confirms) a config.
pub async fn apply(
    rt: &Arc<Runtime>,
    actor: String,
    admission: Admission,
    req: ApplyConfigurationRequest,
) -> Result<ApplyConfigurationResponse, ApiError> {
    let reply = |summary: String, needs_reboot: Vec<String>| ApplyConfigurationResponse {
        actor_id: actor.clone(),
        summary,
        needs_reboot,
    };
    let first = match admission {
        // Answered early; `writeConfig` checks again under the config lock.
        Admission::Maintenance if rt.config().is_some() => {
            return Err(ApiError::Apply {
                error: ApplyError::AlreadyConfigured,
                actor,
            })
        }
        Admission::Maintenance => true,
        Admission::Role(_) => false,
    };
    if req.confirm && req.data.is_empty() {
        if first {
            return Err(ApiError::BadRequest(
                "a node in maintenance mode has no config being tried".into(),
            ));
        }
        run(rt, &actor, apply::confirm_sequence(), rt.clone()).await?;
        return Ok(reply("the config being tried is kept".into(), vec![]));
    }
    // An invalid config changes nothing: it is refused before anything runs.
    let new = ::config::NodeConfig::from_yaml(&req.data)
        .map_err(|e| ApiError::BadRequest(format!("invalid node config: {e}")))?;
    let mode = match ApplyMode::try_from(req.mode) {
        Ok(ApplyMode::NoReboot) => Mode::NoReboot,
        Ok(ApplyMode::Reboot) => Mode::Reboot,
        Ok(ApplyMode::Try) => Mode::Try(match req.try_timeout_s {
            0 => apply::DEFAULT_TRY,
            s => Duration::from_secs(u64::from(s)),
        }),
        Err(_) => {
            return Err(ApiError::BadRequest(format!(
                "apply mode {} is not one this node knows (no-reboot, reboot, try)",
                req.mode
            )))
        }
    };
    if first && mode != Mode::NoReboot {
        return Err(ApiError::BadRequest(
            "a node in maintenance mode boots with its first config: modes reboot and try do not apply".into(),
        ));
    }
    if req.max_unavailable != 0 && mode != Mode::Reboot {
        return Err(ApiError::BadRequest(
            "max_unavailable applies to mode reboot only (no other mode reboots the node)".into(),
        ));
    }
    let job = ApplyJob::new(rt.clone(), new, mode, first);
    if req.max_unavailable != 0 {
        // In the queue first, and the config written only once the slot is held, just before
        // the reboot: a refusal, now or while waiting, changes nothing.
        let queued = phases::reboot_slot::enqueue(rt, req.max_unavailable, "apply-config").await?;
        let (node, who) = (rt.clone(), actor.clone());
        super::power::reboot_when_held(
            rt,
            queued,
            actor.clone(),
            "apply-config",
            move || async move {
                run(&node, &who, apply::sequence(), job)
                    .await
                    .map(|_| Some("the config is written and takes effect at the next reboot"))
                    .map_err(|e| format!("the config was not applied: {e}"))
            },
        );
        return Ok(reply(
            "queued for a reboot slot: the config is written and the node reboots when its slot comes (reboot-slot events); a refusal changes nothing".into(),
            vec![],
        ));
    }
    run(rt, &actor, apply::sequence(), job.clone()).await?;
    if first {
        rt.config_applied.notify_one();
        return Ok(reply(
            "config applied: the node is booting with it".into(),
            vec![],
        ));
    }
    match mode {
        Mode::Reboot => {
            phases::power::request(rt, SequenceKind::Reboot, Some(actor.clone()), false)
                .map_err(ApiError::denied(&actor))?;
            Ok(reply("config written; rebooting".into(), vec![]))
        }
        Mode::NoReboot => Ok(reply("config applied".into(), job.needs_reboot())),
        Mode::Try(after) => Ok(reply(
            format!(
                "config applied for {}s: confirm it (apply-config --confirm) or it is reverted",
                after.as_secs()
            ),
            job.needs_reboot(),
        )),
    }
}

/// The running config.
pub fn get(rt: &Arc<Runtime>) -> Result<api::proto::GetConfigurationResponse, ApiError> {
    let config = rt
        .config()
        .ok_or_else(|| ApiError::Unavailable("the node has no config yet".into()))?;
    let data = config
        .to_yaml()
        .map_err(|e| ApiError::Internal(format!("writing the config as YAML: {e}")))?;
    Ok(api::proto::GetConfigurationResponse { data })
}
