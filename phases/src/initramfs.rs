//! The initramfs sequence: from the kernel handing over to `/init` to exec'ing machined on the
//! slot's root.

use sequencer::{Sequence, Task};

use crate::tasks::initramfs::{self as t, Initramfs};

/// The phase table.
pub fn sequence() -> Sequence<Initramfs> {
    Sequence::new("initramfs")
        .phase(
            "mountPseudoFilesystems",
            [
                Task::new("mountProc", t::mount_proc),
                Task::new("mountSys", t::mount_sys),
                Task::new("mountDev", t::mount_dev),
                Task::new("mountRun", t::mount_run),
            ],
        )
        .phase("loadModules", [Task::new("loadModules", t::load_modules)])
        // The watchdog is armed beside the search for the boot disk: it waits for its own
        // driver, which nothing else waits for.
        .phase(
            "findBootDisk",
            [
                Task::new("findBootDisk", t::find_boot_disk),
                Task::new("armWatchdog", t::arm_watchdog),
            ],
        )
        .phase("mapRoot", [Task::new("mapRoot", t::map_root)])
        .phase("mountRoot", [Task::new("mountRoot", t::mount_root)])
        .phase("switchRoot", [Task::new("switchRoot", t::switch_root)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_initramfs_phases_are_in_boot_order() {
        assert_eq!(
            super::sequence().phase_names(),
            [
                "mountPseudoFilesystems",
                "loadModules",
                "findBootDisk",
                "mapRoot",
                "mountRoot",
                "switchRoot"
            ]
        );
    }
}
