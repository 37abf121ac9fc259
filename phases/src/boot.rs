//! The boot sequences of PID 1 on the slot's root: `initialize` (hand-over, writable
//! partitions, config) and `boot` (network, API).

use std::sync::Arc;

use sequencer::{Sequence, Task};

use crate::runtime::Runtime;
use crate::tasks::{api, network, services, state, system};

/// The initialize phase table.
pub fn initialize() -> Sequence<Arc<Runtime>> {
    Sequence::new("initialize")
        .phase(
            "handover",
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
}

/// The boot phase table.
pub fn boot() -> Sequence<Arc<Runtime>> {
    Sequence::new("boot")
        .phase(
            "network",
            [
                Task::new("setHostname", network::set_hostname),
                Task::new("configureNetwork", network::configure_network),
            ],
        )
        .phase("startApi", [Task::new("startApi", api::start_api)])
        .phase(
            "startServices",
            [Task::new("startServices", services::start_services)],
        )
        .waiting_phase(
            "waitServicesHealthy",
            [Task::new(
                "waitServicesHealthy",
                services::wait_services_healthy,
            )],
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_initialize_phases_are_in_order() {
        assert_eq!(
            super::initialize().phase_names(),
            ["handover", "mountPartitions", "loadConfig"]
        );
    }

    #[test]
    fn the_boot_phases_are_in_order() {
        assert_eq!(
            super::boot().phase_names(),
            [
                "network",
                "startApi",
                "startServices",
                "waitServicesHealthy"
            ]
        );
    }
}
