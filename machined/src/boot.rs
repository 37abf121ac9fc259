//! The boot chain the Linux node and the simulated one share: initialize, then maintenance
//! mode (no config) until a config is applied, then install (installer media) or boot.

use std::sync::Arc;

use phases::Runtime;
use sequencer::SequenceKind;

use crate::api::ApiStarter;

/// How a step of the boot chain ended.
enum Step {
    Done,
    /// Taken over (a reboot during boot): the successor owns the node now.
    TakenOver,
    Failed(anyhow::Error),
}

async fn run_step(
    runtime: &Arc<Runtime>,
    kind: SequenceKind,
    sequence: sequencer::Sequence<Arc<Runtime>>,
) -> Step {
    run_step_with(runtime, kind, sequence, runtime.clone()).await
}

async fn run_step_with<C: Clone + Send + 'static>(
    runtime: &Arc<Runtime>,
    kind: SequenceKind,
    sequence: sequencer::Sequence<C>,
    ctx: C,
) -> Step {
    let started = match runtime.controller.start(kind, sequence, ctx, None, false) {
        Ok(s) => s,
        Err(denied) => {
            tracing::info!("{kind} not started: {denied}");
            return Step::TakenOver;
        }
    };
    match started.handle.await {
        Ok(Ok(())) => Step::Done,
        Ok(Err(e)) if e.is_cancelled() => {
            tracing::info!("{e}");
            Step::TakenOver
        }
        Ok(Err(e)) => Step::Failed(anyhow::Error::new(e)),
        Err(e) => Step::Failed(anyhow::anyhow!("{kind} panicked: {e}")),
    }
}

/// Runs initialize, waits in maintenance mode if there is no config, then runs boot; returns
/// only if the boot failed and even the reboot after it was refused.
pub async fn boot_chain(runtime: &Arc<Runtime>, api: &Arc<ApiStarter>) -> anyhow::Error {
    match run_step(
        runtime,
        SequenceKind::Initialize,
        phases::boot::initialize(),
    )
    .await
    {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    // The modules nothing has asked for yet (the power button's; dm-crypt's when no volume is
    // encrypted) load once the node has had time to answer its first calls.
    phases::modules::release_after(std::time::Duration::from_secs(3));
    if runtime.config().is_none() {
        if let Err(e) = maintenance(runtime, api).await {
            return boot_failed(runtime, e).await;
        }
    }
    if runtime.installer() {
        return install(runtime).await;
    }
    match run_step(runtime, SequenceKind::Boot, phases::boot::boot()).await {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    tracing::info!("node is running");
    // From now on the main loop feeds the watchdog.
    if phases::watchdog::armed() {
        tokio::spawn(async {
            loop {
                phases::watchdog::feed();
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    std::future::pending::<anyhow::Error>().await
}

/// Booted from installer media with a config: install onto its target, then reboot into it.
async fn install(runtime: &Arc<Runtime>) -> anyhow::Error {
    let job = match phases::install::job(runtime.clone()) {
        Ok(j) => j,
        Err(e) => return boot_failed(runtime, anyhow::anyhow!("install: {e}")).await,
    };
    let disk = job.disk.display().to_string();
    // Writing a slot under emulation can outlast the watchdog's timeout.
    if phases::watchdog::armed() {
        tokio::spawn(async {
            loop {
                phases::watchdog::feed();
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    match run_step_with(
        runtime,
        SequenceKind::Install,
        phases::install::install(),
        job,
    )
    .await
    {
        Step::Done => {}
        Step::TakenOver => return std::future::pending().await,
        Step::Failed(e) => return boot_failed(runtime, e).await,
    }
    crate::console::line(&format!(
        "machined: installed on {disk}; rebooting into it (the media can be removed)"
    ));
    match phases::power::request(runtime, SequenceKind::Reboot, Some("install".into()), false) {
        Ok(_) => std::future::pending().await,
        Err(denied) => anyhow::anyhow!("rebooting after the install: {denied}"),
    }
}

/// No config: serve the maintenance API (server-only TLS, a self-signed certificate whose
/// fingerprint is on the console, only Version/Status/Events/ApplyConfiguration) until one is
/// applied.
async fn maintenance(runtime: &Arc<Runtime>, api: &Arc<ApiStarter>) -> anyhow::Result<()> {
    runtime
        .controller
        .lifecycle
        .request(sequencer::Request::EnterMaintenance, None)?;
    // A blank machine has no address of its own yet: lease one on every link, so the operator
    // can reach the API; keep trying in the background if nobody answers.
    // The network driver (and the ESP's file system, which the install's checks read) may
    // still be loading in the background.
    for needed in [phases::modules::FOR_NETWORK, phases::modules::FOR_ESP] {
        if let Err(e) = phases::modules::wait_for(needed).await {
            tracing::warn!("{e}");
        }
    }
    let leased = match runtime.platform.configure_dhcp(&[]).await {
        Ok(leases) => leases
            .iter()
            .map(|(link, lease)| format!("{link} {lease}"))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => {
            crate::console::line(&format!("machined: maintenance mode: {e}; retrying"));
            let rt = runtime.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                    if let Ok(leases) = rt.platform.configure_dhcp(&[]).await {
                        for (link, lease) in leases {
                            crate::console::line(&format!("machined: {link}: {lease} (DHCP)"));
                        }
                        break;
                    }
                }
            });
            "no address yet".into()
        }
    };
    let (endpoint, fingerprint) = api.start_maintenance(runtime.clone()).await?;
    crate::console::line(&format!("machined: maintenance mode: addresses: {leased}"));
    crate::console::line(&format!(
        "machined: maintenance mode: no node config. The API on {endpoint} takes one over TLS with certificate SHA-256 {fingerprint}:"
    ));
    crate::console::line(&format!(
        "machined:   plinth apply-config --insecure --cert-fingerprint {fingerprint} -e <node address> -f node.yaml"
    ));
    loop {
        tokio::select! {
            _ = runtime.config_applied.notified() => break,
            // Waiting for an operator is not a hang.
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => phases::watchdog::feed(),
        }
    }
    api.stop().await;
    tracing::info!("config applied: leaving maintenance mode");
    Ok(())
}

/// The boot failed: say why, give the operator time to read it, then reboot through the reboot
/// sequence (so file systems are unmounted cleanly). Only if even that is refused does the error
/// go back to the single fatal path.
async fn boot_failed(runtime: &Arc<Runtime>, error: anyhow::Error) -> anyhow::Error {
    crate::console::line(&format!(
        "machined: boot failed: {}",
        sequencer::runner::chain(error.as_ref())
    ));
    // Time to read the reason on a console; the simulated machine has no one watching.
    let delay = if runtime.platform.name() == "sim" {
        1
    } else {
        10
    };
    crate::console::line(&format!("machined: rebooting in {delay}s"));
    tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
    match phases::power::request(
        runtime,
        SequenceKind::Reboot,
        Some("boot-failure".into()),
        false,
    ) {
        Ok(_) => std::future::pending().await,
        Err(denied) => error.context(format!("rebooting after the failed boot: {denied}")),
    }
}
