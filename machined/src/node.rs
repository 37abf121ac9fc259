//! The node role: PID 1 on the slot's root.

use std::sync::Arc;

use phases::platform::linux::Linux;
use phases::reaper::{Reaper, Scope};
use phases::runtime::paths;
use phases::Runtime;
use sequencer::{Event, EventBus, SequenceKind};
use tokio::signal::unix::{signal, SignalKind};

use crate::boot::ApiStarter;

/// Runs the node; returns only on failure.
pub fn run() -> anyhow::Error {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return anyhow::Error::new(e).context("starting the async runtime"),
    };
    rt.block_on(serve())
}

async fn serve() -> anyhow::Error {
    let bus = EventBus::new(4096);
    // The initramfs's events come first so that Events replays the whole boot.
    match std::fs::read(paths::INITRAMFS_EVENTS) {
        Ok(data) => match serde_json::from_slice::<Vec<Event>>(&data) {
            Ok(events) => bus.import(events),
            Err(e) => tracing::warn!("{}: {e}", paths::INITRAMFS_EVENTS),
        },
        Err(e) => tracing::warn!("{}: {e}", paths::INITRAMFS_EVENTS),
    }
    bus.add_sink(Box::new(crate::console::trace_sink));
    if let Some(fd) = std::fs::read_to_string(phases::watchdog::HANDOFF)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        phases::watchdog::adopt(fd);
    }
    bus.add_sink(Box::new(|_| phases::watchdog::feed()));
    // The one SIGCHLD handler: PID 1 reaps every orphan, and services' exits go to the
    // supervisor through it.
    let reaper = match Reaper::start(Scope::AllChildren) {
        Ok(r) => r,
        Err(e) => return anyhow::Error::new(e).context("listening for SIGCHLD"),
    };
    let runtime = Runtime::new(
        Arc::new(Linux),
        bus,
        Arc::new(ApiStarter::new(None)),
        reaper,
    );
    spawn_signal_handlers(runtime.clone());

    crate::boot::boot_chain(&runtime).await
}

/// SIGINT (Ctrl-Alt-Del) asks for a reboot, SIGTERM for a power-off.
fn spawn_signal_handlers(runtime: Arc<Runtime>) {
    // Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting at once.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        tracing::warn!("disabling Ctrl-Alt-Del: {e}");
    }
    // The ACPI power button reaches PID 1 as SIGTERM only with a daemon listening for it;
    // without one the kernel's own handler powers off. SIGTERM here is `kill -TERM 1`.
    for (kind, sequence, name) in [
        (
            SignalKind::interrupt(),
            SequenceKind::Reboot,
            "signal:SIGINT",
        ),
        (
            SignalKind::terminate(),
            SequenceKind::Shutdown,
            "signal:SIGTERM",
        ),
    ] {
        let runtime = runtime.clone();
        match signal(kind) {
            Ok(mut sig) => {
                tokio::spawn(async move {
                    while sig.recv().await.is_some() {
                        if let Err(denied) =
                            phases::power::request(&runtime, sequence, Some(name.into()), false)
                        {
                            tracing::warn!("{name}: {denied}");
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("listening for {kind:?}: {e}"),
        }
    }
}
