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
use workloads::containers::ContainerSpec;

use crate::platform::Platform;
use crate::reaper::{Exit, Reaper};

/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// How often a costly probe (etcd's: a quorum read through raft, answered by the whole
/// cluster) is repeated once it passes. At [`HEALTH_INTERVAL`], with a new TLS connection
/// each time, an idle control plane spent 65 % of a core under TCG.
const COSTLY_HEALTHY_INTERVAL: Duration = Duration::from_secs(5);

/// What a probe keeps between checks: its connection, so each check is one request.
#[derive(Default)]
struct ProbeConn {
    etcd: Option<etcd::Etcd>,
}

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

/// How the supervisor tells that a running service is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Running is healthy.
    Running,
    /// A TCP connection to this address succeeds.
    Tcp(String),
    /// containerd answers its `Version` call on its socket.
    Containerd(workloads::Containerd),
    /// etcd answers a quorum read at this client URL.
    Etcd {
        /// The member's client URL.
        endpoint: String,
        /// machined's etcd credentials.
        credentials: etcd::Credentials,
    },
    /// A private container accepts TCP connections on this port of its own loopback (a TCP
    /// check of a port it publishes: machined's listener on the node port always accepts).
    Published {
        /// The container.
        container: String,
        /// Its port.
        port: u16,
    },
}

impl Probe {
    /// The probe a config service's health check asks for.
    pub fn of(s: &Service) -> Probe {
        match &s.health {
            None => Probe::Running,
            Some(HealthCheck::Tcp(addr)) => Probe::Tcp(addr.clone()),
        }
    }

    /// How long after a check the next one comes.
    fn period(&self, healthy: bool) -> Duration {
        match self {
            Probe::Etcd { .. } if healthy => COSTLY_HEALTHY_INTERVAL,
            _ => HEALTH_INTERVAL,
        }
    }

    /// Whether the service is healthy now; if not, why.
    async fn check(&self, supervisor: &Supervisor, conn: &mut ProbeConn) -> Result<(), String> {
        match self {
            Probe::Published { container, port } => {
                let netns = supervisor
                    .netns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(container)
                    .cloned()
                    .ok_or_else(|| format!("container {container} has no network yet"))?;
                let port = *port;
                match tokio::task::spawn_blocking(move || netns.accepts(port)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("nothing accepts on port {port} inside: {e}")),
                    Err(e) => Err(format!("checking port {port}: {e}")),
                }
            }
            Probe::Running => Ok(()),
            Probe::Tcp(addr) => {
                let connect = tokio::net::TcpStream::connect(addr.as_str());
                match tokio::time::timeout(Duration::from_secs(1), connect).await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(format!("no connection to {addr}")),
                }
            }
            Probe::Containerd(c) => c.version().await.map(|_| ()).map_err(|e| e.to_string()),
            Probe::Etcd {
                endpoint,
                credentials,
            } => {
                let etcd = match conn.etcd.take() {
                    Some(etcd) => etcd,
                    None => etcd::Etcd::connect(std::slice::from_ref(endpoint), credentials)
                        .await
                        .map_err(|e| e.to_string())?,
                };
                etcd.check_quorum().await.map_err(|e| e.to_string())?;
                // Kept only while it answers: a failed check connects anew next time.
                conn.etcd = Some(etcd);
                Ok(())
            }
        }
    }
}

/// What a unit runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// The service's command, as a child of machined.
    Process,
    /// A container, through containerd; its published ports (node, container) are forwarded
    /// into its network namespace.
    Container(ContainerSpec, Vec<(u16, u16)>),
}

/// A service or container, how its health is told, and what it runs.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Its name, dependencies, restart policy and stop timeout (a container's command is
    /// in its spec).
    pub service: Service,
    /// Its health check.
    pub probe: Probe,
    /// What it runs.
    pub run: Run,
}

impl From<&Service> for Unit {
    fn from(s: &Service) -> Self {
        Unit {
            service: s.clone(),
            probe: Probe::of(s),
            run: Run::Process,
        }
    }
}

impl Unit {
    /// A container of the config as a unit: it waits for containerd besides its own
    /// dependencies; its output is its log.
    pub fn container(c: &config::Container, log_dir: &std::path::Path) -> Unit {
        let mut depends_on = c.depends_on.clone();
        if !depends_on.iter().any(|d| d == config::RUNTIME_SERVICE) {
            depends_on.insert(0, config::RUNTIME_SERVICE.to_string());
        }
        let service = Service {
            name: c.name.clone(),
            command: Vec::new(),
            environment: Vec::new(),
            depends_on,
            restart: c.restart,
            stop_timeout_s: c.stop_timeout_s,
            health: c.health.clone(),
        };
        let spec = ContainerSpec {
            name: c.name.clone(),
            image: workloads::oci::normalize(&c.image).unwrap_or_else(|_| c.image.clone()),
            command: c.command.clone(),
            environment: c.environment.clone(),
            host_network: c.network == config::ContainerNetwork::Host,
            mounts: c
                .mounts
                .iter()
                .map(|m| (PathBuf::from(&m.source), m.destination.clone(), m.read_only))
                .collect(),
            log: log_dir.join(format!("{}.log", c.name)),
        };
        let published = c.published();
        let probe = match &c.health {
            Some(HealthCheck::Tcp(addr)) => addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .and_then(|a| published.iter().find(|(node, _)| *node == a.port()))
                .map(|(_, port)| Probe::Published {
                    container: c.name.clone(),
                    port: *port,
                })
                .unwrap_or_else(|| Probe::of(&service)),
            None => Probe::Running,
        };
        Unit {
            probe,
            service,
            run: Run::Container(spec, published),
        }
    }
}

struct Entry {
    config: Service,
    info: ServiceInfo,
    stop: CancellationToken,
    container: bool,
    /// The task supervising it.
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The supervisor.
pub struct Supervisor {
    platform: Arc<dyn Platform>,
    containerd: workloads::Containerd,
    /// The network namespace of each private container's current run.
    netns: Mutex<BTreeMap<String, workloads::network::Netns>>,
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

/// The units in the order they stop: groups that may stop together, each after every unit
/// that depends on one of its members (the deepest dependents first).
pub fn stop_levels(services: &[Service]) -> Vec<Vec<String>> {
    let mut depth: BTreeMap<String, usize> = BTreeMap::new();
    for name in start_order(services) {
        let d = services
            .iter()
            .find(|s| s.name == name)
            .map(|s| {
                s.depends_on
                    .iter()
                    .filter_map(|dep| depth.get(dep))
                    .map(|d| d + 1)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        depth.insert(name, d);
    }
    let top = depth.values().copied().max().unwrap_or(0);
    (0..=top)
        .rev()
        .map(|l| {
            depth
                .iter()
                .filter(|(_, d)| **d == l)
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>()
        })
        .filter(|level| !level.is_empty())
        .collect()
}

impl Supervisor {
    /// A supervisor with no services; service output goes to `log_dir/<name>.log`;
    /// containers run through `containerd`.
    pub fn new(
        platform: Arc<dyn Platform>,
        reaper: Arc<Reaper>,
        bus: Arc<EventBus>,
        log_dir: PathBuf,
        containerd: workloads::Containerd,
    ) -> Arc<Self> {
        Arc::new(Supervisor {
            platform,
            containerd,
            netns: Mutex::new(BTreeMap::new()),
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

    /// Starts supervising `units` (each starts once its dependencies are healthy). A unit
    /// whose name is already supervised is left out; the names left out are returned.
    pub fn start(self: &Arc<Self>, units: &[Unit]) -> Vec<String> {
        let mut taken = Vec::new();
        for u in units {
            let mut entries = self.lock();
            if entries.contains_key(&u.service.name) {
                tracing::warn!("{} is already supervised: left out", u.service.name);
                taken.push(u.service.name.clone());
                continue;
            }
            let s = &u.service;
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
                    container: matches!(u.run, Run::Container(..)),
                    task: None,
                },
            );
            let this = self.clone();
            let u = u.clone();
            let name = u.service.name.clone();
            // Under the lock: the task finds its entry, and `remove` finds the task.
            let task = tokio::spawn(async move { this.supervise(u.service, u.probe, u.run).await });
            if let Some(e) = entries.get_mut(&name) {
                e.task = Some(task);
            }
        }
        taken
    }

    async fn supervise(self: Arc<Self>, s: Service, probe: Probe, run: Run) {
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
            let spawned = match &run {
                Run::Process => self
                    .reaper
                    .spawn(|| self.platform.spawn(&s.command, &s.environment, &log))
                    .map_err(|e| e.to_string()),
                Run::Container(spec, ports) => self.start_container(spec, ports, &stop).await,
            };
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
            if stop.is_cancelled() {
                // Stopped while it started: `stop` found no PID to signal.
                self.signal(
                    &s.name,
                    pid,
                    matches!(run, Run::Container(..)),
                    Signal::SIGKILL,
                )
                .await;
            }
            self.update(
                &s.name,
                |i| {
                    i.state = ServiceState::Running;
                    i.pid = Some(pid);
                    i.healthy = probe == Probe::Running;
                },
                format!("pid {pid}"),
            );
            let exit = self.watch(&s.name, &probe, exit_rx).await;
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
                // A container that ended by itself goes, with its rootfs mount (which would
                // keep EPHEMERAL busy); one being stopped (asked now, or during the backoff) is
                // removed by `stop` or `remove`.
                if matches!(run, Run::Container(..)) && !self.stopping(&s.name) {
                    self.remove_container(&s.name).await;
                }
                return;
            }
        }
    }

    /// Starts a container and a task that reports its exit (asking containerd again if it
    /// restarts meanwhile: the container outlives it in its shim). Its published ports are
    /// forwarded until it exits.
    async fn start_container(
        &self,
        spec: &ContainerSpec,
        ports: &[(u16, u16)],
        stop: &CancellationToken,
    ) -> Result<(i32, tokio::sync::oneshot::Receiver<Exit>), String> {
        for (source, _, _) in &spec.mounts {
            workloads::containers::check_mount_source(source).map_err(|e| e.to_string())?;
            self.platform.mkdir_all(source).map_err(|e| e.to_string())?;
        }
        if let Some(dir) = spec.log.parent() {
            self.platform.mkdir_all(dir).map_err(|e| e.to_string())?;
        }
        let pid = self
            .containerd
            .start_container(spec)
            .await
            .map_err(|e| e.to_string())?;
        let ended = stop.child_token();
        if let Err(e) = self.private_network(spec, pid, ports, &ended).await {
            ended.cancel();
            self.remove_container(&spec.name).await;
            return Err(e);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let containerd = self.containerd.clone();
        let name = spec.name.clone();
        tokio::spawn(async move {
            let exit = loop {
                match containerd.wait(&name).await {
                    // runc reports a process a signal killed as 128 + the signal.
                    Ok(status @ 129..=192) => break Exit::Signal(status as i32 - 128),
                    Ok(status) => break Exit::Code(status as i32),
                    // Gone (removed meanwhile): how it ended is not known.
                    Err(e) if e.is_not_found() => break Exit::Code(-1),
                    Err(e) => {
                        // containerd is away (it restarts: the container lives on in its
                        // shim). If the container's init is gone meanwhile, so is the run.
                        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                            tracing::warn!(
                                "container {name}: ended while containerd was away ({e})"
                            );
                            break Exit::Code(-1);
                        }
                        tracing::warn!("container {name}: waiting for its exit: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            ended.cancel();
            let _ = tx.send(exit);
        });
        Ok((pid as i32, rx))
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
    async fn watch(
        &self,
        name: &str,
        probe: &Probe,
        mut exit_rx: tokio::sync::oneshot::Receiver<Exit>,
    ) -> Exit {
        let mut conn = ProbeConn::default();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                exit = &mut exit_rx => return exit.unwrap_or(Exit::Code(-1)),
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + probe.period(self.healthy(name));
                    if *probe == Probe::Running {
                        continue;
                    }
                    // The exit wins over a probe still in flight: a dead service is not
                    // reported unhealthy first.
                    let checked = tokio::select! {
                        exit = &mut exit_rx => return exit.unwrap_or(Exit::Code(-1)),
                        r = probe.check(self, &mut conn) => r,
                    };
                    let ok = checked.is_ok();
                    if ok != self.healthy(name) {
                        let message = match checked {
                            Ok(()) => "healthy".to_string(),
                            Err(why) => format!("unhealthy: {why}"),
                        };
                        self.update(name, |i| i.healthy = ok, message);
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
        for level in stop_levels(&configs) {
            // One level at once: twenty containers that ignore SIGTERM take one stop timeout,
            // not twenty.
            futures::future::join_all(level.iter().map(|n| self.stop(n))).await;
        }
    }

    /// Signals a service's process group, or every process of a container.
    async fn signal(&self, name: &str, pid: i32, container: bool, signal: Signal) {
        if container {
            if let Err(e) = self.containerd.kill(name, signal as i32).await {
                // containerd away: its init is a process of the node all the same.
                tracing::warn!("container {name}: sending {signal} through containerd: {e}");
                let _ = self.platform.kill(pid, signal);
            }
        } else {
            // The service leads its own process group: signal the group, so its children go
            // too.
            let _ = self.platform.kill(-pid, signal);
        }
    }

    /// Stops one service: no more restarts, SIGTERM to its process group, SIGKILL after its
    /// stop timeout.
    pub async fn stop(&self, name: &str) {
        let (pid, timeout, container) = {
            let entries = self.lock();
            let Some(e) = entries.get(name) else {
                return;
            };
            e.stop.cancel();
            (
                e.info.pid,
                Duration::from_secs(e.config.stop_timeout_s),
                e.container,
            )
        };
        let Some(pid) = pid else {
            return;
        };
        self.update(name, |i| i.state = ServiceState::Stopping, "SIGTERM".into());
        self.signal(name, pid, container, Signal::SIGTERM).await;
        let deadline = Instant::now() + timeout;
        while self
            .lock()
            .get(name)
            .is_some_and(|e| e.info.pid == Some(pid))
        {
            if Instant::now() > deadline {
                self.signal(name, pid, container, Signal::SIGKILL).await;
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
        if container {
            self.remove_container(name).await;
        }
    }

    /// A private container's network: its loopback up, its namespace kept for its health
    /// check, its ports published until `ended`.
    async fn private_network(
        &self,
        spec: &ContainerSpec,
        pid: u32,
        ports: &[(u16, u16)],
        ended: &CancellationToken,
    ) -> Result<(), String> {
        if spec.host_network {
            return Ok(());
        }
        let netns = workloads::network::Netns::of_pid(pid).map_err(|e| e.to_string())?;
        // A thread of its own enters the namespace and is joined: not on a runtime worker.
        let up = netns.clone();
        tokio::task::spawn_blocking(move || up.loopback_up())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), netns.clone());
        if !ports.is_empty() {
            let any = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
            workloads::network::publish(netns, any, ports, ended.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Deletes a container's task (unmounting its rootfs), record and snapshot.
    async fn remove_container(&self, name: &str) {
        self.netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Err(e) = self.containerd.remove_container(name).await {
            tracing::warn!("removing container {name}: {e}");
        }
    }

    /// Stops a unit and forgets it (a container changed or gone from the config). Returns once
    /// its supervising task has ended, so a unit of the same name started next cannot meet
    /// the old one's late steps.
    pub async fn remove(&self, name: &str) {
        self.stop(name).await;
        let Some(entry) = self.lock().remove(name) else {
            return;
        };
        if let Some(task) = entry.task {
            // Bounded: a start in flight ends at containerd's call timeouts, and what it
            // started is killed at once (the unit is stopped).
            let grace = Duration::from_secs(entry.config.stop_timeout_s + 30);
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("{name}: its supervisor did not end within {grace:?}: aborted");
                abort.abort();
            }
        }
        if entry.container {
            // Also when it was not running (stopped by itself, or waiting).
            self.remove_container(name).await;
        }
    }

    /// Whether a unit of this name is supervised.
    pub fn has(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, deps: &[&str]) -> Service {
        Service {
            name: name.into(),
            command: vec!["/bin/true".into()],
            environment: vec![],
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            restart: RestartPolicy::Never,
            stop_timeout_s: 1,
            health: None,
        }
    }

    #[test]
    fn dependents_stop_a_level_before_what_they_depend_on_and_peers_together() {
        let units = [
            unit("containerd", &[]),
            unit("web", &["containerd"]),
            unit("db", &["containerd"]),
            unit("app", &["web", "db"]),
            unit("lone", &[]),
        ];
        assert_eq!(
            stop_levels(&units),
            vec![
                vec!["app".to_string()],
                vec!["db".to_string(), "web".to_string()],
                vec!["containerd".to_string(), "lone".to_string()],
            ]
        );
    }
}
