//! Reset: what to wipe is checked before anything runs; the sequence then runs through the
//! lifecycle.

use std::sync::Arc;

use phases::Runtime;

use super::error::ApiError;

/// Starts a reset for `actor`.
pub fn reset(
    runtime: &Arc<Runtime>,
    actor: String,
    r: api::proto::ResetRequest,
) -> Result<(), ApiError> {
    let target = phases::reset::admit(&r.labels, r.system_disk)?;
    let method = match api::proto::WipeMethod::try_from(r.method) {
        Ok(api::proto::WipeMethod::Fast) => phases::platform::WipeMethod::Fast,
        Ok(api::proto::WipeMethod::Zero) => phases::platform::WipeMethod::Zero,
        // A method this node does not know must not quietly become another.
        Err(_) => {
            return Err(ApiError::BadRequest(format!(
                "wipe method {} is not one this node knows (fast, zero)",
                r.method
            )))
        }
    };
    let job = phases::reset::ResetJob {
        rt: runtime.clone(),
        graceful: r.graceful,
        target,
        method,
        reboot: r.reboot,
    };
    phases::reset::request(job, Some(actor.clone()))
        .map(|_| ())
        .map_err(ApiError::denied(&actor))
}
