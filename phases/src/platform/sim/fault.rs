//! Power cuts at chosen write steps, for fault-injection tests.
//!
//! Every change the simulated machine makes to its disk or NVRAM is one numbered step (a file
//! written or renamed on a volume, a partition opened for writing, a wipe, a file system made,
//! a variable set or deleted). With `PLINTH_SIM_STEP_LOG=FILE` each step is appended to FILE as
//! `N<TAB>what`; with `PLINTH_SIM_POWER_CUT_AT=N` the process ends at step N before doing it, as
//! if the power went: everything before it is on the disk, nothing of it or after. The count
//! runs for the life of the process, across the machine's reboots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static STEP: AtomicU64 = AtomicU64::new(0);

struct Plan {
    log: Option<std::path::PathBuf>,
    cut_at: Option<u64>,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| Plan {
        log: std::env::var_os("PLINTH_SIM_STEP_LOG").map(Into::into),
        cut_at: std::env::var("PLINTH_SIM_POWER_CUT_AT")
            .ok()
            .and_then(|v| v.parse().ok()),
    })
}

/// The exit status of a process whose power was cut.
pub const POWER_CUT_STATUS: i32 = 86;

/// One write step: counted, logged, and the end of the process if the power is cut here.
pub fn step(what: &str) {
    let plan = plan();
    if plan.log.is_none() && plan.cut_at.is_none() {
        return;
    }
    let n = STEP.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(log) = &plan.log {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{n}\t{what}");
        }
    }
    if plan.cut_at == Some(n) {
        eprintln!("sim: power cut at step {n}: {what}");
        std::process::exit(POWER_CUT_STATUS);
    }
}
