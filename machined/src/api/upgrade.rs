//! Upgrade and Rollback.

use std::sync::Arc;
use std::time::Duration;

use api::server::BundleSource;
use phases::upgrade::{AdmitError, Deadlines, Options, UpgradeError, UpgradeJob};
use phases::Runtime;
use sequencer::SequenceKind;

use super::error::{ApiError, Failure};

/// What a failed upgrade had changed on the disk, by the phase it failed in: say it as it is.
fn changed(target: upgrade::Slot, phase: &str) -> String {
    match phase {
        "readBundle" | "receiveUki" => "nothing on the disk was changed".into(),
        "writeSlot" | "receiveExtensions" | "verifySlot" | "installUki" | "markPending" => format!(
            "slot {target}'s previous image and its boot entry are gone (the slot is marked empty or writing, so nothing boots it); the running slot {} and its entry are unchanged",
            target.other()
        ),
        _ => format!(
            "slot {target} holds the new image but its trial was not armed; the running slot {} and its entry are unchanged",
            target.other()
        ),
    }
}

/// Runs an upgrade to its end (or refusal); reboots into the new slot unless staged.
pub async fn upgrade(
    rt: &Arc<Runtime>,
    actor: String,
    options: api::proto::UpgradeOptions,
    bundle: BundleSource,
) -> Result<api::proto::UpgradeResponse, ApiError> {
    phases::upgrade::admit_upgrade(rt)?;
    let cfg = rt.config().ok_or(AdmitError::NoConfig)?;
    // The slot first, before a byte is read (the source's deadlines start with it): a node
    // refused one has changed nothing.
    let hold = match options.max_unavailable {
        0 => None,
        k => Some(phases::reboot_slot::acquire(rt, k, "upgrade").await?),
    };
    let policy = &cfg.machine.upgrade;
    let (source, what): (phases::upgrade::Source, String) = match bundle {
        BundleSource::Stream(s) => (s, "the upload".into()),
        BundleSource::Url(url) => {
            let ca = (!policy.ca.is_empty()).then_some(policy.ca.as_str());
            let s =
                phases::fetch::source(&url, ca).map_err(|e| AdmitError::Source(e.to_string()))?;
            (s, url)
        }
    };
    let source = Box::new(Deadlines::new(
        source,
        what,
        Duration::from_secs(policy.idle_timeout_s),
        Duration::from_secs(policy.receive_deadline_s),
    ));
    let options = Options {
        stage: options.stage,
        expected_digest: options.expected_digest,
        allow_downgrade: options.allow_downgrade,
    };
    let stage = options.stage;
    let job = UpgradeJob::new(rt.clone(), options, source)?;
    let started = rt
        .controller
        .start(
            SequenceKind::Upgrade,
            phases::upgrade::upgrade(),
            job.clone(),
            Some(actor.clone()),
            false,
        )
        .map_err(ApiError::denied(&actor))?;
    // What follows the sequence (the reboot into the trial) runs in a task of its own, so it
    // happens even if the caller hangs up once the slot is written.
    let target = job.target;
    let task_rt = rt.clone();
    let task_actor = actor.clone();
    let rebooting = tokio::spawn(async move {
        let actor = task_actor;
        match started.handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let phase = e.phase().to_string();
                return Err(match Failure::<UpgradeError>::of(e) {
                    Failure::Typed(error) => ApiError::Upgrade {
                        error,
                        changed: changed(target, &phase),
                        actor,
                    },
                    Failure::Cancelled(error) => ApiError::Cancelled { error, actor },
                    Failure::Other(e) => ApiError::Internal(format!("upgrade: {e}")),
                });
            }
            Err(e) => return Err(ApiError::Internal(format!("upgrade task: {e}"))),
        }
        if stage {
            // Not going down now: the slot is released (dropped).
            return Ok(false);
        }
        let mut hold = hold;
        if let Some(h) = hold.as_mut() {
            if let Err(e) = h.keep().await {
                return Err(ApiError::Precondition(format!(
                    "slot {target} is written and armed for its trial at the next reboot, but the node did not reboot: its reboot slot was lost ({e}); upgrade again, or reboot it (plinth reboot --max-unavailable K) to run the trial"
                )));
            }
        }
        let rebooting =
            phases::power::request(&task_rt, SequenceKind::Reboot, Some(actor), false).is_ok();
        if let (false, Some(h)) = (rebooting, hold) {
            h.abandon();
        }
        Ok(rebooting)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("upgrade task: {e}")))??;
    Ok(api::proto::UpgradeResponse {
        actor_id: actor,
        slot: job.target.to_string(),
        version: job.manifest().map(|m| m.version).unwrap_or_default(),
        rebooting,
    })
}

/// Starts a rollback to the other (good) slot, and the reboot after it. With
/// `max_unavailable` (not 0) the node first joins the cluster's reboot queue (refused at once
/// when it may not) and answers; it switches slots and reboots when its slot comes.
pub async fn rollback(
    rt: &Arc<Runtime>,
    actor: String,
    max_unavailable: u32,
) -> Result<(), ApiError> {
    phases::upgrade::admit_rollback(rt)?;
    if max_unavailable != 0 {
        let queued = phases::reboot_slot::enqueue(rt, max_unavailable, "rollback").await?;
        let node = rt.clone();
        let who = actor.clone();
        super::power::reboot_when_held(rt, queued, actor, "rollback", move || async move {
            let started = node
                .controller
                .start(
                    SequenceKind::Rollback,
                    phases::upgrade::rollback(),
                    node.clone(),
                    Some(who),
                    false,
                )
                .map_err(|d| d.to_string())?;
            match started.handle.await {
                Ok(Ok(())) => Ok(Some(
                    "the previous slot is committed and boots at the next reboot",
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the rollback's task: {e}")),
            }
        });
        return Ok(());
    }
    let started = rt
        .controller
        .start(
            SequenceKind::Rollback,
            phases::upgrade::rollback(),
            rt.clone(),
            Some(actor.clone()),
            false,
        )
        .map_err(ApiError::denied(&actor))?;
    let rt = rt.clone();
    tokio::spawn(async move {
        match started.handle.await {
            Ok(Ok(())) => {
                if let Err(d) =
                    phases::power::request(&rt, SequenceKind::Reboot, Some(actor), false)
                {
                    tracing::warn!("reboot after rollback: {d}");
                }
            }
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(e) => tracing::error!("rollback task: {e}"),
        }
    });
    Ok(())
}
