//! Starting and stopping the config's services.

use std::path::Path;
use std::sync::Arc;

use config::{RestartPolicy, Service};
use sequencer::TaskError;

use crate::platform::Platform;
use crate::runtime::Runtime;
use crate::services::{Probe, Run, Unit};

/// Starts supervising the config's services (each starts when its dependencies are healthy),
/// and containerd first when an active extension provides it or a service depends on it.
pub async fn start_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let cfg = ctx.config().ok_or("the node config is not loaded")?;
    let mut units: Vec<Unit> = Vec::new();
    let wanted = !cfg.machine.containers.is_empty()
        || cfg
            .machine
            .services
            .iter()
            .any(|s| s.depends_on.iter().any(|d| d == config::RUNTIME_SERVICE));
    if wanted || runtime_installed(ctx.platform.as_ref()) {
        units.push(containerd(ctx.platform.as_ref())?);
    }
    if let Some(etcd) = crate::etcd::at_boot(&ctx, &cfg).await? {
        units.push(etcd);
    }
    crate::reboot_slot::resume(&ctx);
    units.extend(cfg.machine.services.iter().map(Unit::from));
    let logs = Path::new(crate::runtime::paths::SERVICE_LOGS);
    units.extend(
        cfg.machine
            .containers
            .iter()
            .map(|c| Unit::container(c, logs)),
    );
    ctx.services.start(&units);
    spawn_log_rotation(&ctx);
    Ok(())
}

/// Applies a change of the config's containers without a reboot: those gone or changed are
/// stopped and removed, those new or changed started (containerd first, if it was not
/// supervised yet).
pub async fn apply_containers(
    ctx: &Arc<Runtime>,
    old: &[config::Container],
    new: &[config::Container],
) -> Result<(), TaskError> {
    for c in old {
        if !new.contains(c) {
            ctx.services.remove(&c.name).await;
        }
    }
    let added: Vec<&config::Container> = new.iter().filter(|c| !old.contains(c)).collect();
    if added.is_empty() {
        return Ok(());
    }
    // A service of that name runs until the next boot (services change only then).
    if let Some(c) = added.iter().find(|c| ctx.services.has(&c.name)) {
        return Err(format!(
            "a service named {:?} runs until the next boot: the container of that name can start only then",
            c.name
        )
        .into());
    }
    let mut units = Vec::new();
    if !ctx.services.has(config::RUNTIME_SERVICE) {
        units.push(containerd(ctx.platform.as_ref())?);
    }
    let logs = Path::new(crate::runtime::paths::SERVICE_LOGS);
    units.extend(added.into_iter().map(|c| Unit::container(c, logs)));
    ctx.services.start(&units);
    Ok(())
}

/// Whether an active extension put containerd on `/usr/local`.
fn runtime_installed(platform: &dyn Platform) -> bool {
    let program = Path::new(workloads::containerd::PROGRAM);
    match (program.parent(), program.file_name()) {
        (Some(dir), Some(name)) => platform
            .list_dir(dir)
            .is_ok_and(|names| names.iter().any(|n| n.as_str() == name)),
        _ => false,
    }
}

/// containerd as a service: its config written, its data directory on EPHEMERAL, restarted
/// whatever its exit, healthy when its API answers. Without the runtime extension it fails to
/// start, and says that the program is missing.
fn containerd(platform: &dyn Platform) -> Result<Unit, TaskError> {
    let c = crate::runtime::containerd();
    for dir in [&c.root, &c.state] {
        platform.mkdir_all(dir)?;
    }
    if let Some(dir) = c.config.parent() {
        platform.mkdir_all(dir)?;
    }
    platform.write(&c.config, c.config_toml().as_bytes())?;
    let service = Service {
        name: config::RUNTIME_SERVICE.to_string(),
        command: c.command(),
        environment: workloads::Containerd::environment(),
        depends_on: Vec::new(),
        restart: RestartPolicy::Always,
        // containerd stops its plugins and closes its database; its shims and their
        // containers outlive it by design, and are stopped before it.
        stop_timeout_s: 10,
        health: None,
    };
    Ok(Unit {
        service,
        probe: Probe::Containerd(c),
        run: Run::Process,
    })
}

/// Keeps every service's and container's log under [`crate::logs::MAX_SERVICE_LOG`] (checked
/// every few seconds; EPHEMERAL must not fill up with one chatty service's output). A
/// container's output is appended by its shim, so the log is copied and emptied, not moved.
fn spawn_log_rotation(ctx: &Arc<Runtime>) {
    let weak = Arc::downgrade(ctx);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let Some(rt) = weak.upgrade() else { return };
            let names: Vec<String> = rt.services.list().into_iter().map(|s| s.name).collect();
            for name in &names {
                match crate::logs::rotate_if_large(rt.platform.as_ref(), name) {
                    Ok(true) => tracing::info!("rotated the log of service {name}"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("rotating the log of service {name}: {e}"),
                }
            }
        }
    });
}

/// How long the boot waits for every service to be healthy.
pub const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits until every service is healthy. After [`HEALTH_WAIT`] the boot goes on (the node is
/// reachable to find out why) and the services stay as they are.
pub async fn wait_services_healthy(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let deadline = tokio::time::Instant::now() + HEALTH_WAIT;
    loop {
        let waiting = ctx.services.unhealthy();
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(
                "services still not healthy after {}s: {}",
                HEALTH_WAIT.as_secs(),
                waiting.join(", ")
            );
            return Ok(());
        }
        crate::watchdog::feed();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// How long the debug sessions get to end (each kills its container and removes it).
const SESSIONS_END: std::time::Duration = std::time::Duration::from_secs(15);

/// Ends the debug sessions (their containers need containerd to be removed), then stops every
/// service, dependents first, each with SIGTERM then SIGKILL at its deadline.
pub async fn stop_services(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    ctx.sessions.end_all(SESSIONS_END).await;
    ctx.services.stop_all().await;
    Ok(())
}

/// Checks the system extensions in the ESP's store and overlays those that pass on
/// `/usr/local` ([`crate::extensions`]); a refused one is reported and left out.
pub async fn mount_extensions(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    crate::extensions::activate(&ctx).await?;
    // A committed slot's own extensions become the store's (a commit cut short by a power
    // cut finishes here; normally there is nothing to do).
    if let Some(slot) = ctx.boot().map(|b| b.slot) {
        let committed = crate::slots::read_meta(&ctx)
            .ok()
            .flatten()
            .is_some_and(|l| l.meta.committed == slot);
        if committed && !ctx.trial() {
            if let Err(e) = crate::extensions::promote(&ctx, slot) {
                tracing::warn!("the extensions slot {slot} brought stay in its directory: {e}");
            }
        }
    }
    Ok(())
}
