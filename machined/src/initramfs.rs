//! The initramfs role: run the initramfs sequence, hand over, and go on as the node's PID 1 on
//! the new root.
//!
//! The node role runs in this same process rather than an `exec` of the root's
//! `/sbin/machined`: both are the same build (the signed UKI carries this binary and pins the
//! root by its verity hash), and reading 7.5 MiB back through SquashFS and dm-verity cost a
//! second of boot under TCG (BENCHMARKS.md).

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
    tracing::info!(
        "machined: main at {} us after the kernel's start, the initramfs role at {} us",
        crate::started_us(),
        sequencer::clock::boot_us()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let bus = EventBus::new(1024);
    bus.add_sink(Box::new(crate::console::trace_sink));
    // Every event is progress: it feeds the watchdog (once armed).
    bus.add_sink(Box::new(|_| phases::watchdog::feed()));
    let ctx = InitramfsState::new(std::sync::Arc::new(Linux));
    ctx.install_breadcrumbs(&bus);
    rt.block_on(sequencer::run(
        &phases::initramfs::sequence(),
        ctx,
        &bus,
        None,
    ))?;
    // Now on the new root: the node role, in this process, replays these events first.
    let events = bus.snapshot();
    drop(rt);
    if !Path::new(paths::MACHINED).exists() {
        return Err(anyhow!(
            "{} is missing from the root image",
            paths::MACHINED
        ));
    }
    Err(crate::node::run(events))
}
