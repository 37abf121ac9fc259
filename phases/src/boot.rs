//! The boot sequences of PID 1 on the slot's root: `initialize` (hand-over, writable
//! partitions, config) and `boot` (network, API).

use std::sync::Arc;

use sequencer::{Sequence, Task};

use crate::runtime::Runtime;
use crate::tasks::{api, fault, network, services, state, system, trial};

/// The initialize phase table.
pub fn initialize() -> Sequence<Arc<Runtime>> {
    Sequence::new("initialize")
        .phase(
            "handover",
            [
                Task::new("readBootInfo", system::read_boot_info),
                Task::new("mountTmp", system::mount_tmp),
                Task::new("mountCgroups", system::mount_cgroups),
            ],
        )
        .phase_when(
            "mountPartitions",
            |rt: &Arc<Runtime>| !rt.installer(),
            [
                Task::new("mountState", state::mount_state),
                Task::new("mountEphemeral", state::mount_ephemeral),
                Task::new("mountEsp", trial::mount_esp),
            ],
        )
        .phase_when(
            "mountScratch",
            |rt: &Arc<Runtime>| rt.installer(),
            [Task::new("mountScratch", state::mount_scratch)],
        )
        // Three independent tasks side by side: the config; what this boot is for the slots (a
        // trial or not: recorded in META before anything can fail in a way the next boot must
        // explain); and PCR 11 moved on once the volumes are open.
        .phase(
            "loadConfig",
            [
                Task::new("loadConfig", state::load_config),
                Task::new("checkSlots", trial::check_slots),
                Task::new("extendPcr11", state::lock_volumes),
            ],
        )
}

/// The boot phase table.
pub fn boot() -> Sequence<Arc<Runtime>> {
    Sequence::new("boot")
        .phase_when(
            "faultHang",
            fault::hang_requested,
            [Task::new("hang", fault::hang)],
        )
        // The API listens on every address, so it starts while the addresses are configured.
        .phase(
            "network",
            [
                Task::new("setHostname", network::set_hostname),
                Task::new("configureNetwork", network::configure_network),
                Task::new("startApi", api::start_api),
            ],
        )
        // Extensions before the services, which may run their programs; after the API, which
        // needs none of them (checking one reads all of it).
        .phase_when(
            "mountExtensions",
            |rt: &Arc<Runtime>| !rt.installer(),
            [Task::new("mountExtensions", services::mount_extensions)],
        )
        // The boot entries are reconciled with META here, beside the services, once the API
        // listens: the health gates and the commit, which need them, come after.
        .phase(
            "startServices",
            [
                Task::new("startServices", services::start_services),
                Task::new("reconcileBootEntries", trial::reconcile_entries),
            ],
        )
        .waiting_phase(
            "waitServicesHealthy",
            [Task::new(
                "waitServicesHealthy",
                services::wait_services_healthy,
            )],
        )
        .phase_when(
            "healthGates",
            trial::on_trial,
            [Task::new("healthGates", trial::health_gates)],
        )
        .phase_when(
            "commit",
            trial::on_trial,
            [Task::new("commit", trial::commit)],
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_initialize_phases_are_in_order() {
        assert_eq!(
            super::initialize().phase_names(),
            ["handover", "mountPartitions", "mountScratch", "loadConfig"]
        );
    }

    #[test]
    fn the_boot_phases_are_in_order() {
        assert_eq!(
            super::boot().phase_names(),
            [
                "faultHang",
                "network",
                "mountExtensions",
                "startServices",
                "waitServicesHealthy",
                "healthGates",
                "commit"
            ]
        );
    }
}
