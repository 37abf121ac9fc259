//! The initramfs role: run the initramfs sequence, hand over, exec machined on the new root.

use std::ffi::CString;
use std::path::Path;

use anyhow::{anyhow, Context};
use phases::platform::linux::Linux;
use phases::runtime::paths;
use phases::tasks::initramfs::InitramfsState;
use sequencer::EventBus;

/// Runs the initramfs; returns only on failure.
pub fn run() -> anyhow::Error {
    match try_run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_run() -> anyhow::Result<std::convert::Infallible> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let bus = EventBus::new(1024);
    bus.add_sink(Box::new(crate::console::trace_sink));
    // Every event is progress: it feeds the watchdog (once armed).
    bus.add_sink(Box::new(|_| phases::watchdog::feed()));
    let ctx = InitramfsState::new(std::sync::Arc::new(Linux));
    rt.block_on(sequencer::run(
        &phases::initramfs::sequence(),
        ctx,
        &bus,
        None,
    ))?;
    // Now on the new root, /run carried over: leave our events for machined to replay.
    let events = serde_json::to_vec(&bus.snapshot()).context("encoding the initramfs events")?;
    std::fs::write(paths::INITRAMFS_EVENTS, events)
        .with_context(|| format!("writing {}", paths::INITRAMFS_EVENTS))?;
    drop(rt);
    let prog = CString::new(paths::MACHINED).context("machined path")?;
    let argv = [prog.clone()];
    let env: [CString; 0] = [];
    if !Path::new(paths::MACHINED).exists() {
        return Err(anyhow!(
            "{} is missing from the root image",
            paths::MACHINED
        ));
    }
    let never = nix::unistd::execve(&prog, &argv, &env)
        .with_context(|| format!("executing {}", paths::MACHINED))?;
    match never {}
}
