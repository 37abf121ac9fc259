//! The node role: PID 1 on the slot's root.

use std::sync::Arc;

use phases::platform::linux::Linux;
use phases::reaper::{Reaper, Scope};
use phases::Runtime;
use sequencer::{Event, EventBus, SequenceKind};
use tokio::signal::unix::{signal, SignalKind};

use crate::api::ApiStarter;

/// Runs the node, its event history starting with `initramfs_events` (the boot so far, when
/// this process ran the initramfs); returns only on failure.
pub fn run(initramfs_events: Vec<Event>) -> anyhow::Error {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return anyhow::Error::new(e).context("starting the async runtime"),
    };
    rt.block_on(serve(initramfs_events))
}

async fn serve(initramfs_events: Vec<Event>) -> anyhow::Error {
    let nofile = crate::limits::raise_open_files();
    tracing::info!("open-file limit {nofile}");
    let bus = EventBus::new(4096);
    // The initramfs's events come first so that Events replays the whole boot.
    bus.import(initramfs_events);
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
    let starter = Arc::new(ApiStarter::new(None));
    let runtime = Runtime::new(Arc::new(Linux), bus, starter.clone(), reaper);
    spawn_signal_handlers(runtime.clone());
    spawn_power_button(runtime.clone());

    crate::boot::boot_chain(&runtime, &starter).await
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

/// The ACPI power button shuts the node down. The kernel reports it as a key press on the
/// "Power Button" input device; with no daemon listening the press would be lost, so machined
/// reads the device itself (a blocking read of fixed-size `input_event` records: no crate
/// needed for one key on one device).
fn spawn_power_button(runtime: Arc<Runtime>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        // Its driver loads in the background once the boot has settled.
        if let Err(e) = phases::modules::wait_for_quietly(phases::modules::FOR_POWER_BUTTON).await {
            tracing::warn!("{e}");
        }
        std::thread::spawn(move || read_power_button(&tx));
    });
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            let actor = Some("acpi:power-button".to_string());
            if let Err(d) = phases::power::request(&runtime, SequenceKind::Shutdown, actor, false) {
                tracing::warn!("power button: {d}");
            }
        }
    });
}

/// `/dev/input/eventN` of the device named "Power Button" (waiting a little for it).
fn power_button_device() -> Option<std::path::PathBuf> {
    for _ in 0..50 {
        let found = std::fs::read_dir("/sys/class/input")
            .ok()?
            .flatten()
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let label = std::fs::read_to_string(e.path().join("device/name")).ok()?;
                (name.starts_with("event") && label.trim() == "Power Button")
                    .then(|| std::path::Path::new("/dev/input").join(name))
            });
        if found.is_some() {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    None
}

/// Reads the power button's key presses (a blocking read of fixed-size `input_event` records)
/// and sends one message per press until the receiver is gone.
fn read_power_button(tx: &tokio::sync::mpsc::UnboundedSender<()>) {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    // struct input_event on 64-bit: struct timeval (16), type (2), code (2), value (4).
    const EVENT_SIZE: usize = 24;
    let Some(device) = power_button_device() else {
        tracing::info!("no ACPI power button device");
        return;
    };
    let mut f = match std::fs::File::open(&device) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("opening {}: {e}", device.display());
            return;
        }
    };
    tracing::info!("listening for the power button on {}", device.display());
    let mut ev = [0u8; EVENT_SIZE];
    while std::io::Read::read_exact(&mut f, &mut ev).is_ok() {
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 && tx.send(()).is_err() {
            return;
        }
    }
}
