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
            "lockVolumes",
            |rt: &Arc<Runtime>| !rt.installer(),
            [Task::new("extendPcr11", state::lock_volumes)],
        )
        .phase_when(
            "mountScratch",
            |rt: &Arc<Runtime>| rt.installer(),
            [Task::new("mountScratch", state::mount_scratch)],
        )
        .phase("loadConfig", [Task::new("loadConfig", state::load_config)])
        .phase_when(
            "checkSlots",
            |rt: &Arc<Runtime>| !rt.installer(),
            [Task::new("checkSlots", trial::check_slots)],
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
            [
                "handover",
                "mountPartitions",
                "lockVolumes",
                "mountScratch",
                "loadConfig",
                "checkSlots"
            ]
        );
    }

    #[test]
    fn the_boot_phases_are_in_order() {
        assert_eq!(
            super::boot().phase_names(),
            [
                "faultHang",
                "network",
                "startApi",
                "startServices",
                "waitServicesHealthy",
                "healthGates",
                "commit"
            ]
        );
    }
}
