//! machined on the simulated machine (`machined --platform sim --machine DIR`): the emulated
//! firmware picks a boot entry, the initramfs and the node run against [`Sim`], and the API
//! listens on 127.0.0.1. A reboot goes back through the firmware; a power-off ends the process.
//! Each boot runs in its own async runtime, dropped at reset like RAM at a power cut.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use phases::platform::sim::{firmware, Sim};
use phases::platform::PowerAction;
use phases::reaper::{Reaper, Scope};
use phases::tasks::initramfs::InitramfsState;
use phases::Runtime;
use sequencer::EventBus;

use crate::api::ApiStarter;
use crate::console;

/// Runs the machine until it powers off.
pub fn run(dir: &Path, api: SocketAddr) -> anyhow::Result<()> {
    crate::limits::raise_open_files();
    loop {
        heap_report();
        let booted = firmware::power_on(dir).context("firmware")?;
        kernel_says(
            dir,
            &format!(
                "SimFirmware: starting Boot{:04X} \"{}\" from {}",
                booted.entry, booted.description, booted.path
            ),
        );
        kernel_says(
            dir,
            &format!(
                "Linux version (simulated); command line: {}",
                booted.cmdline
            ),
        );
        if booted
            .cmdline
            .split_whitespace()
            .any(|a| a == "plinth.sim.panic")
        {
            // What a kernel that cannot start does with panic=1: reset.
            kernel_says(dir, "Kernel panic - not syncing: plinth.sim.panic");
            continue;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let action = rt.block_on(boot_once(dir, &booted.cmdline, api));
        rt.shutdown_timeout(Duration::from_secs(2));
        match action? {
            PowerAction::Reboot => console::line("sim: reset"),
            PowerAction::PowerOff => {
                console::line("sim: power off");
                return Ok(());
            }
        }
    }
}

/// Says how much heap is in use, between boots (every boot's state dropped): the footprint
/// benchmark tells a leak (this grows) from the allocator keeping freed memory (only RSS grows).
fn heap_report() {
    // SAFETY: mallinfo2 only reads glibc's allocator statistics; it takes no arguments and
    // returns a plain struct.
    let m = unsafe { libc::mallinfo2() };
    console::line(&format!(
        "sim: heap in use {} bytes, {} held from the OS",
        m.uordblks + m.hblkhd,
        m.arena + m.hblkhd
    ));
}

/// A line on the console and in the simulated kernel log.
fn kernel_says(dir: &Path, line: &str) {
    use std::io::Write;
    console::line(line);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kmsg"))
    {
        let _ = writeln!(f, "{line}");
    }
}

async fn boot_once(dir: &Path, cmdline: &str, api: SocketAddr) -> anyhow::Result<PowerAction> {
    let (sim, mut power) = Sim::new(dir, cmdline);
    let bus = EventBus::new(4096);
    bus.add_sink(Box::new(console::trace_sink));

    let initramfs = InitramfsState::new(sim.clone());
    initramfs.install_breadcrumbs(&bus);
    if let Err(e) = sequencer::run(&phases::initramfs::sequence(), initramfs, &bus, None).await {
        // As on the real machine: say why, then reset.
        console::line(&format!("machined: fatal: {e}"));
        return Ok(PowerAction::Reboot);
    }

    let reaper = Reaper::start(Scope::AllChildren).context("listening for SIGCHLD")?;
    let starter = Arc::new(ApiStarter::new(Some(api)));
    let runtime = Runtime::new(sim.clone(), bus, starter.clone(), reaper);
    let booting = runtime.clone();
    let api_starter = starter.clone();
    tokio::spawn(async move {
        let e = crate::boot::boot_chain(&booting, &api_starter).await;
        console::line(&format!(
            "machined: fatal: {}",
            sequencer::runner::chain(e.as_ref())
        ));
        let _ = booting.platform.power(PowerAction::Reboot);
    });
    // Being told to stop is pulling the plug: the node's processes must not outlive it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // SIGUSR1 asks for a heap report now (the footprint benchmark's probe while a node runs).
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("listening for SIGUSR1")?;
    let action = loop {
        tokio::select! {
            a = power.recv() => break a.unwrap_or(PowerAction::PowerOff),
            _ = term.recv() => break PowerAction::PowerOff,
            _ = usr1.recv() => heap_report(),
        }
    };
    starter.stop().await;
    sim.kill_children();
    Ok(action)
}
