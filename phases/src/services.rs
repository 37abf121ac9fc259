//! The service supervisor.
//!
//! Each service runs in its own task: wait until its dependencies are healthy, spawn it (through
//! the [`Reaper`]), watch its health, and when it exits restart it as its policy says, with
//! exponential backoff. Stopping goes in reverse dependency order: SIGTERM to the service's
//! process group, then SIGKILL once its stop timeout has passed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use config::{HealthCheck, RestartPolicy, Service};
use nix::sys::signal::Signal;
use sequencer::{EventBus, EventKind};
use tokio_util::sync::CancellationToken;

use crate::platform::Platform;
use crate::reaper::{Exit, Reaper};

/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for its dependencies to be healthy.
    Waiting,
    /// Its process runs.
    Running,
    /// Exited; waiting to be restarted.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped (asked to, or exited and not to be restarted).
    Stopped,
    /// Exited with a failure and not to be restarted, or could not be started.
    Failed,
}

impl ServiceState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Waiting => "waiting",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
            ServiceState::Failed => "failed",
        }
    }
}

/// What the API reports about a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: ServiceState,
    /// PID while running.
    pub pid: Option<i32>,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Whether its health check passes (running counts as healthy without a check).
    pub healthy: bool,
    /// How its last run ended.
    pub last_exit: Option<String>,
    /// Its dependencies.
    pub depends_on: Vec<String>,
}

struct Entry {
    config: Service,
    info: ServiceInfo,
    stop: CancellationToken,
}

/// The supervisor.
pub struct Supervisor {
    platform: Arc<dyn Platform>,
    reaper: Arc<Reaper>,
    bus: Arc<EventBus>,
    log_dir: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// The order to start services in (dependencies first); stopping uses the reverse.
pub fn start_order(services: &[Service]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    // Config validation refuses cycles; the pass limit keeps a bad list from looping anyway.
    for _ in 0..=services.len() {
        for s in services {
            if !order.contains(&s.name) && s.depends_on.iter().all(|d| order.contains(d)) {
                order.push(s.name.clone());
            }
        }
    }
    order
}

impl Supervisor {
    /// A supervisor with no services; service output goes to `log_dir/<name>.log`.
    pub fn new(
        platform: Arc<dyn Platform>,
        reaper: Arc<Reaper>,
        bus: Arc<EventBus>,
        log_dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Supervisor {
            platform,
            reaper,
            bus,
            log_dir,
            entries: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every service, in start order.
    pub fn list(&self) -> Vec<ServiceInfo> {
        let entries = self.lock();
        let configs: Vec<Service> = entries.values().map(|e| e.config.clone()).collect();
        start_order(&configs)
            .iter()
            .filter_map(|n| entries.get(n).map(|e| e.info.clone()))
            .collect()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ServiceInfo), message: String) {
        let state = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(name) else {
                return;
            };
            f(&mut e.info);
            e.info.state
        };
        tracing::info!("service {name}: {} {message}", state.as_str());
        self.bus.publish(
            EventKind::Service {
                service: name.into(),
                state: state.as_str().into(),
                message,
            },
            None,
        );
    }

    fn healthy(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|e| e.info.healthy)
    }

    fn stopping(&self, name: &str) -> bool {
        self.lock().get(name).is_none_or(|e| e.stop.is_cancelled())
    }

    /// Starts supervising `services` (each starts once its dependencies are healthy).
    pub fn start(self: &Arc<Self>, services: &[Service]) {
        {
            let mut entries = self.lock();
            for s in services {
                entries.insert(
                    s.name.clone(),
                    Entry {
                        config: s.clone(),
                        info: ServiceInfo {
                            name: s.name.clone(),
                            state: ServiceState::Waiting,
                            pid: None,
                            restarts: 0,
                            healthy: false,
                            last_exit: None,
                            depends_on: s.depends_on.clone(),
                        },
                        stop: CancellationToken::new(),
                    },
                );
            }
        }
        for s in services {
            let this = self.clone();
            let s = s.clone();
            tokio::spawn(async move { this.supervise(s).await });
        }
    }

    async fn supervise(self: Arc<Self>, s: Service) {
        let stop = match self.lock().get(&s.name) {
            Some(e) => e.stop.clone(),
            None => return,
        };
        // Wait for the dependencies.
        while !s.depends_on.iter().all(|d| self.healthy(d)) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let log = self.log_dir.join(format!("{}.log", s.name));
        let mut restarts = 0u32;
        loop {
            let spawned = self.reaper.spawn(|| self.platform.spawn(&s.command, &log));
            let (pid, exit_rx) = match spawned {
                Ok(p) => p,
                Err(e) => {
                    self.update(
                        &s.name,
                        |i| i.state = ServiceState::Failed,
                        format!("could not start: {e}"),
                    );
                    if s.restart == RestartPolicy::Never
                        || !self.backoff(&s.name, &stop, &mut restarts).await
                    {
                        return;
                    }
                    continue;
                }
            };
            self.update(
                &s.name,
                |i| {
                    i.state = ServiceState::Running;
                    i.pid = Some(pid);
                    i.healthy = s.health.is_none();
                },
                format!("pid {pid}"),
            );
            let exit = self.watch(&s, exit_rx).await;
            let failed = !exit.success();
            let stopping = self.stopping(&s.name);
            let restart = !stopping
                && match s.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => failed,
                    RestartPolicy::Never => false,
                };
            let state = match (restart, stopping, failed) {
                (true, _, _) => ServiceState::Backoff,
                (false, true, _) | (false, false, false) => ServiceState::Stopped,
                (false, false, true) => ServiceState::Failed,
            };
            self.update(
                &s.name,
                |i| {
                    i.state = state;
                    i.pid = None;
                    i.healthy = false;
                    i.last_exit = Some(exit.to_string());
                },
                exit.to_string(),
            );
            if !restart || !self.backoff(&s.name, &stop, &mut restarts).await {
                return;
            }
        }
    }

    /// Waits out the backoff; false if the service is being stopped.
    async fn backoff(&self, name: &str, stop: &CancellationToken, restarts: &mut u32) -> bool {
        let delay = Duration::from_secs(1u64 << (*restarts).min(5)).min(MAX_BACKOFF);
        *restarts += 1;
        let n = *restarts;
        self.update(
            name,
            |i| {
                i.state = ServiceState::Backoff;
                i.restarts = n;
            },
            format!("restarting in {}s", delay.as_secs()),
        );
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Checks health until the process exits; returns how it exited.
    async fn watch(&self, s: &Service, mut exit_rx: tokio::sync::oneshot::Receiver<Exit>) -> Exit {
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        loop {
            tokio::select! {
                exit = &mut exit_rx => return exit.unwrap_or(Exit::Code(-1)),
                _ = tick.tick() => {
                    if let Some(HealthCheck::Tcp(addr)) = &s.health {
                        let ok = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                            .await
                            .is_ok_and(|r| r.is_ok());
                        if ok != self.healthy(&s.name) {
                            self.update(&s.name, |i| i.healthy = ok, if ok { "healthy".into() } else { format!("unhealthy: no connection to {addr}") });
                        }
                    }
                }
            }
        }
    }

    /// The services not healthy now.
    pub fn unhealthy(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|e| !e.info.healthy)
            .map(|e| e.info.name.clone())
            .collect()
    }

    /// Stops every service, dependents before their dependencies.
    pub async fn stop_all(&self) {
        let configs: Vec<Service> = self.lock().values().map(|e| e.config.clone()).collect();
        for name in start_order(&configs).into_iter().rev() {
            self.stop(&name).await;
        }
    }

    /// Stops one service: no more restarts, SIGTERM to its process group, SIGKILL after its
    /// stop timeout.
    pub async fn stop(&self, name: &str) {
        let (pid, timeout) = {
            let entries = self.lock();
            let Some(e) = entries.get(name) else {
                return;
            };
            e.stop.cancel();
            (e.info.pid, Duration::from_secs(e.config.stop_timeout_s))
        };
        let Some(pid) = pid else {
            return;
        };
        self.update(name, |i| i.state = ServiceState::Stopping, "SIGTERM".into());
        // The service leads its own process group: signal the group, so its children go too.
        let _ = self.platform.kill(-pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while self
            .lock()
            .get(name)
            .is_some_and(|e| e.info.pid == Some(pid))
        {
            if Instant::now() > deadline {
                let _ = self.platform.kill(-pid, Signal::SIGKILL);
                self.update(
                    name,
                    |_| {},
                    format!(
                        "did not stop within {}s of SIGTERM: SIGKILL",
                        timeout.as_secs()
                    ),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // After SIGKILL the exit is certain; wait for the reaper to record it.
        while self
            .lock()
            .get(name)
            .is_some_and(|e| e.info.pid == Some(pid))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
