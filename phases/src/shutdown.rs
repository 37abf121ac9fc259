//! The reboot and shutdown sequences: an orderly end, then a power action.
//!
//! Both tear down the same way; only the power action differs. The power action is not a phase:
//! it is taken by [`crate::power`] once the sequence has ended (or failed: a node asked to go
//! down goes down), so a sequence is always something that returns.

use std::sync::Arc;

use sequencer::{Sequence, Task};

use crate::runtime::Runtime;
use crate::tasks::{services, teardown, upgrade};

/// Appends the teardown every terminating sequence ends with.
fn teardown(s: Sequence<Arc<Runtime>>) -> Sequence<Arc<Runtime>> {
    s.phase(
        "stopServices",
        [Task::new("stopServices", services::stop_services)],
    )
    .phase(
        "killProcesses",
        [Task::new("killProcesses", teardown::kill_processes)],
    )
    .phase(
        "unmountFilesystems",
        [Task::new(
            "unmountFilesystems",
            teardown::unmount_filesystems,
        )],
    )
    .phase("syncDisks", [Task::new("syncDisks", teardown::sync_disks)])
}

/// The reboot phase table: a staged upgrade is armed first, so this reboot is its trial.
pub fn reboot() -> Sequence<Arc<Runtime>> {
    teardown(Sequence::new("reboot").phase(
        "armStagedUpgrade",
        [Task::new("armStagedUpgrade", upgrade::arm_staged)],
    ))
}

/// The shutdown phase table.
pub fn shutdown() -> Sequence<Arc<Runtime>> {
    teardown(Sequence::new("shutdown"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reboot_and_shutdown_tear_down_in_the_same_order() {
        let mut want = vec![
            "stopServices",
            "killProcesses",
            "unmountFilesystems",
            "syncDisks",
        ];
        assert_eq!(super::shutdown().phase_names(), want);
        want.insert(0, "armStagedUpgrade");
        assert_eq!(super::reboot().phase_names(), want);
    }
}
