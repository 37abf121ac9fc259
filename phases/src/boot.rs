//! The boot sequence: machined as PID 1 on the slot's root, from the hand-over to serving the
//! API.

use std::sync::Arc;

use sequencer::{Sequence, Task};

use crate::runtime::Runtime;
use crate::tasks::{api, network, state, system};

/// The phase table.
pub fn sequence() -> Sequence<Arc<Runtime>> {
    Sequence::new("boot")
        .phase(
            "initialize",
            [
                Task::new("readBootInfo", system::read_boot_info),
                Task::new("mountTmp", system::mount_tmp),
            ],
        )
        .phase(
            "mountPartitions",
            [
                Task::new("mountState", state::mount_state),
                Task::new("mountEphemeral", state::mount_ephemeral),
            ],
        )
        .phase("loadConfig", [Task::new("loadConfig", state::load_config)])
        .phase(
            "network",
            [
                Task::new("setHostname", network::set_hostname),
                Task::new("configureNetwork", network::configure_network),
            ],
        )
        .phase("startApi", [Task::new("startApi", api::start_api)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_phases_are_in_order() {
        assert_eq!(
            super::sequence().phase_names(),
            [
                "initialize",
                "mountPartitions",
                "loadConfig",
                "network",
                "startApi"
            ]
        );
    }
}
