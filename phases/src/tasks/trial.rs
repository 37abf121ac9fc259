//! The trial of a new slot: noticed at boot, tracked with breadcrumbs, judged by health gates,
//! committed or left to fail back; and the detection of a trial that failed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use config::HealthCheck;
use sequencer::{Event, EventKind, TaskError};
use upgrade::meta::{BootKind, Breadcrumb, SlotState};

use crate::platform::MountSpec;
use crate::runtime::{paths, Runtime};
use crate::slots::{self, slot_event};

/// Mounts the ESP (UKIs are written there by upgrades and commits).
pub async fn mount_esp(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let dev = slots::boot_partition(&ctx, upgrade::layout::LABEL_ESP)?;
    crate::modules::wait_for(crate::modules::FOR_ESP).await?;
    let spec = MountSpec::new(&dev.display().to_string(), paths::ESP, "vfat").restricted();
    Ok(super::blocking(move || ctx.platform.mount(&spec)).await??)
}

/// Reads META and works out what this boot is: a trial of the booted slot, or a normal boot
/// (which may reveal that the other slot's trial failed), and records it there. The boot
/// entries are made to agree later ([`reconcile_entries`]).
pub async fn check_slots(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    super::blocking(move || record_boot(&ctx)).await?
}

fn record_boot(ctx: &Arc<Runtime>) -> Result<(), TaskError> {
    // Installer media have no slots of their own to check.
    if ctx.installer() {
        return Ok(());
    }
    let booted = ctx.boot().ok_or(slots::SlotError::NoBootInfo)?.slot;
    let version = slots::running_version(ctx);
    let mut kind = BootKind::Normal(None);
    slots::update_meta(ctx, |m| {
        kind = m.on_boot(booted, &version, sequencer::clock::unix_ms());
    })?;
    let trial = kind == BootKind::Trial;
    let mut failed = match kind {
        BootKind::Normal(f) => f,
        BootKind::Trial => None,
    };
    if let Some(f) = failed
        .as_mut()
        .filter(|f| f.reason == upgrade::meta::NEVER_STARTED)
    {
        if let Some(why) = refused_by_firmware(ctx, f.slot) {
            slots::update_meta(ctx, |m| m.explain_failure(f.slot, &why))?;
            f.reason = why;
        }
    }
    if let Some(f) = &failed {
        tracing::warn!(
            "the trial of slot {} ({}) failed: {}",
            f.slot,
            f.version,
            f.reason
        );
        slot_event(
            ctx,
            f.slot,
            SlotState::Failed,
            format!("trial of {} failed: {}", f.version, f.reason),
        );
    }
    if trial {
        ctx.set_trial(true);
        slot_event(
            ctx,
            booted,
            SlotState::Trial,
            format!("trial boot of {version}"),
        );
        install_breadcrumbs(ctx);
    }
    Ok(())
}

/// Makes the firmware's boot entries and BootOrder agree with META. Once the API listens, not
/// before: a dozen EFI variable reads go through SMM, slow under emulation (each stops every
/// CPU), and nothing before the health gates needs the entries (an upgrade or rollback, which
/// change them, waits for the boot to finish).
pub async fn reconcile_entries(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    if ctx.installer() {
        return Ok(());
    }
    super::blocking(move || -> Result<(), TaskError> {
        // META as checkSlots left it (no write: nothing changes).
        let m = slots::update_meta(&ctx, |_| {})?;
        slots::reconcile_entries(&ctx, &m)?;
        Ok(())
    })
    .await?
}

/// Why the firmware would not start `slot`'s UKI, if a look at it tells: with Secure Boot on,
/// an unsigned UKI, or one changed after it was signed, is refused before its kernel runs.
fn refused_by_firmware(ctx: &Runtime, slot: upgrade::Slot) -> Option<String> {
    use bootloader::secureboot::{self, Mode, Signature};
    if secureboot::mode(&ctx.platform.efivars()).ok()? != Mode::On {
        return None;
    }
    let uki = ctx.platform.read(&slots::uki_file(slot)).ok()?;
    match secureboot::check_pe(&uki)? {
        Signature::Unsigned => Some(format!(
            "the firmware refused to start it: slot {slot}'s UKI is not signed, and Secure Boot is on"
        )),
        Signature::Modified => Some(format!(
            "the firmware refused to start it: slot {slot}'s UKI was changed after it was signed (its Authenticode digest does not match), and Secure Boot is on"
        )),
        Signature::Intact => None,
    }
}

/// During a trial, every phase that passes is written to META, so a trial that dies leaves its
/// last step behind for the next boot to report.
fn install_breadcrumbs(ctx: &Arc<Runtime>) {
    let weak: Weak<Runtime> = Arc::downgrade(ctx);
    ctx.bus.add_sink(Box::new(move |e: &Event| {
        let EventKind::PhaseStop {
            sequence,
            phase,
            error: None,
            ..
        } = &e.kind
        else {
            return;
        };
        if !matches!(sequence.as_str(), "initialize" | "boot") {
            return;
        }
        let Some(rt) = weak.upgrade() else {
            return;
        };
        if !rt.trial() {
            return;
        }
        let Some(slot) = rt.boot().map(|b| b.slot) else {
            return;
        };
        let crumb = Breadcrumb::Passed {
            sequence: sequence.clone(),
            phase: phase.clone(),
        };
        if let Err(e) = slots::update_meta(&rt, |m| m.breadcrumb(slot, crumb)) {
            tracing::warn!("writing a breadcrumb: {e}");
        }
    }));
}

/// Whether this boot is a trial (the condition of the gate and commit phases).
pub fn on_trial(ctx: &Arc<Runtime>) -> bool {
    ctx.trial()
}

async fn tcp_ok(addr: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// What still keeps the trial from passing, or `None` when every gate is open.
async fn closed_gates(ctx: &Runtime, api: &str, checks: &[HealthCheck]) -> Option<String> {
    if !tcp_ok(api).await {
        return Some(format!("the API does not answer on {api}"));
    }
    let unhealthy = ctx.services.unhealthy();
    if !unhealthy.is_empty() {
        return Some(format!("services not healthy: {}", unhealthy.join(", ")));
    }
    for HealthCheck::Tcp(addr) in checks {
        if !tcp_ok(addr).await {
            return Some(format!("health check tcp {addr} fails"));
        }
    }
    None
}

/// The trial's health gates: the API serves, every service is healthy, and the config's extra
/// checks pass, all within the trial deadline. A missed deadline fails the boot (and the node
/// reboots into the committed slot), leaving the reason as the last breadcrumb.
pub async fn health_gates(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    let deadline = Duration::from_secs(cfg.machine.upgrade.trial_timeout_s);
    let api = format!("127.0.0.1:{}", cfg.machine.api.port);
    let api = ctx.api_probe().unwrap_or(api);
    let started = tokio::time::Instant::now();
    loop {
        let closed = closed_gates(&ctx, &api, &cfg.machine.upgrade.health_checks).await;
        let Some(why) = closed else {
            return Ok(());
        };
        if started.elapsed() > deadline {
            let reason = format!(
                "health gates not passed within {}s: {why}",
                deadline.as_secs()
            );
            if let Some(slot) = ctx.boot().map(|b| b.slot) {
                let crumb = Breadcrumb::Failed(reason.clone());
                let _ = slots::update_meta(&ctx, |m| m.breadcrumb(slot, crumb));
            }
            return Err(reason.into());
        }
        // Waiting on the gates is progress; a hung machined would not get here.
        crate::watchdog::feed();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Commits the trial: META says the slot is good and committed, `BootOrder` puts it first (the
/// old slot stays as the fallback), and the removable-media path follows it.
pub async fn commit(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let slot = ctx.boot().ok_or(slots::SlotError::NoBootInfo)?.slot;
    // BootOrder and BOOTX64.EFI first, then META: a crash in between leaves META saying
    // "trial", and the next boot (of this slot, now first) simply runs the trial again.
    let mut next = slots::read_meta(&ctx)?
        .map(|l| l.meta)
        .unwrap_or_else(|| upgrade::meta::Meta::initial(slot, ""));
    next.commit(slot);
    // Each step is progress, and together they can outlast the watchdog's timeout under
    // emulation (variable writes through SMM, the UKI copied on the ESP, syncs: over 40 s on
    // a loaded host, where a trial was reset mid-commit and ran again). Each is timed.
    let mut took = Vec::new();
    let mut since = std::time::Instant::now();
    let mut step = |name: &str| {
        took.push(format!("{name} {} ms", since.elapsed().as_millis()));
        since = std::time::Instant::now();
        crate::watchdog::feed();
    };
    crate::watchdog::feed();
    slots::reconcile_entries(&ctx, &next)?;
    step("boot entries");
    slots::follow_committed(&ctx, slot)?;
    step("removable path");
    let m = slots::update_meta(&ctx, |m| m.commit(slot))?;
    ctx.set_trial(false);
    step("META");
    // What the upgrade's bundle brought becomes the store's own (until now it served this
    // slot alone). If this fails, the slot keeps using them from its directory.
    if let Err(e) = crate::extensions::promote(&ctx, slot) {
        tracing::warn!("keeping the extensions slot {slot} brought in its own directory: {e}");
    }
    step("extensions");
    tracing::info!("commit took: {}", took.join(", "));
    slot_event(
        &ctx,
        slot,
        SlotState::Good,
        format!("committed {}", m.slot(slot).version),
    );
    Ok(())
}
