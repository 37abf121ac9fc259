//! Simulated nodes for scenario tests: `machined --platform sim` on a provisioned machine
//! directory, driven through the real API on 127.0.0.1.

#![allow(dead_code)]

pub mod cluster;
pub mod raw_h2;
pub mod serve;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use api::gen::{generate, GenOptions};
use api::proto::machine_client::MachineClient;
use api::proto::{EventsRequest, VersionRequest, VersionResponse};
use phases::platform::sim::provision::{provision_installer, SimImage};
use sequencer::{Event, EventKind};
use tonic::transport::Channel;

/// A simulated node.
pub struct SimNode {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    pub ctx: config::Context,
    /// The node's CA (to make clients with other roles).
    pub ca: api::pki::Ca,
    child: Option<Child>,
}

/// A port on 127.0.0.1 that nothing listens on now, never the same twice in one test process
/// (a cluster of twenty nodes asks for sixty).
pub fn free_port() -> u16 {
    provision::qemu::free_port().expect("a free port")
}

/// The key test bundles are signed with (the nodes trust it).
pub fn signing_key() -> upgrade::bundle::SigningKey {
    upgrade::bundle::SigningKey::from_bytes(&[42u8; 32])
}

/// A simulated image's bundle, signed with [`signing_key`].
pub fn sim_bundle(version: &str, extra_cmdline: &[&str]) -> Vec<u8> {
    sim_bundle_of(SimImage {
        version: version.into(),
        extra_cmdline: extra_cmdline.iter().map(|s| s.to_string()).collect(),
        payload_bytes: 0,
    })
}

/// A signed bundle of `version` at `security_version`, expiring at `expires_unix_s`.
pub fn sim_release(version: &str, security_version: u64, expires_unix_s: Option<u64>) -> Vec<u8> {
    let image = SimImage {
        version: version.into(),
        extra_cmdline: vec![],
        payload_bytes: 0,
    };
    let (root, pin) = image.root();
    upgrade::bundle::build_release(
        &upgrade::bundle::Release {
            version: version.into(),
            arch: std::env::consts::ARCH.into(),
            security_version,
            expires_unix_s,
            extension_level: upgrade::extension::LEVEL,
        },
        &image.uki_pinning(upgrade::Slot::A, &pin),
        &image.uki_pinning(upgrade::Slot::B, &pin),
        &root,
        &[],
        &signing_key(),
    )
    .expect("bundle")
}

/// A signed bundle of `image`.
pub fn sim_bundle_of(image: SimImage) -> Vec<u8> {
    let (root, pin) = image.root();
    upgrade::bundle::build(
        &image.version,
        std::env::consts::ARCH,
        &image.uki_pinning(upgrade::Slot::A, &pin),
        &image.uki_pinning(upgrade::Slot::B, &pin),
        &root,
        &signing_key(),
    )
    .expect("bundle")
}

/// Provisions and starts a node with `services` and extra kernel arguments.
pub fn start(services: Vec<config::Service>, extra_cmdline: &[&str]) -> SimNode {
    start_with(services, extra_cmdline, |_| {})
}

/// A node whose STATE holds no config: it waits in maintenance mode. Its config (to apply)
/// comes back too.
pub fn start_unconfigured() -> (SimNode, config::NodeConfig) {
    let mut config = None;
    let node = start_inner(vec![], &[], |c| config = Some(c.clone()), false);
    (node, config.expect("generated config"))
}

/// Like [`start`], with a last word on the node config.
pub fn start_with(
    services: Vec<config::Service>,
    extra_cmdline: &[&str],
    tweak: impl FnOnce(&mut config::NodeConfig),
) -> SimNode {
    start_inner(services, extra_cmdline, tweak, true)
}

/// A configured node started with `env` (the fault-injection variables, for one).
pub fn start_env(env: &[(&str, String)]) -> SimNode {
    start_inner_env(vec![], &[], |_| {}, Disk::Installed(true, SLOT_BYTES), env)
}

/// A new machine: a blank system disk and installer media carrying [`sim_bundle`] of
/// `version`. Its config (to apply, without an install target yet) comes back too.
pub fn start_installer(version: &str) -> (SimNode, config::NodeConfig) {
    let mut config = None;
    let node = start_inner_env(
        vec![],
        &[],
        |c| config = Some(c.clone()),
        Disk::Blank(sim_bundle(version, &[])),
        &[],
    );
    (node, config.expect("generated config"))
}

/// A configured node whose slots are `slot_bytes` long (the tests' default is [`SLOT_BYTES`]).
pub fn start_with_slots(slot_bytes: u64) -> SimNode {
    start_with_slots_and(slot_bytes, |_| {})
}

/// [`start_with_slots`], with a last word on the node config.
pub fn start_with_slots_and(
    slot_bytes: u64,
    tweak: impl FnOnce(&mut config::NodeConfig),
) -> SimNode {
    start_inner_env(vec![], &[], tweak, Disk::Installed(true, slot_bytes), &[])
}

/// The simulated machine's slot size: room for the simulated images, and quick to provision.
pub const SLOT_BYTES: u64 = 16 << 20;

/// What the machine's system disk holds at first power-on.
enum Disk {
    /// Slot A installed; with the config on STATE or not; slots of this many bytes.
    Installed(bool, u64),
    /// Nothing; installer media with this bundle is attached.
    Blank(Vec<u8>),
}

fn start_inner(
    services: Vec<config::Service>,
    extra_cmdline: &[&str],
    tweak: impl FnOnce(&mut config::NodeConfig),
    configured: bool,
) -> SimNode {
    start_inner_env(
        services,
        extra_cmdline,
        tweak,
        Disk::Installed(configured, SLOT_BYTES),
        &[],
    )
}

fn start_inner_env(
    services: Vec<config::Service>,
    extra_cmdline: &[&str],
    tweak: impl FnOnce(&mut config::NodeConfig),
    disk: Disk,
    env: &[(&str, String)],
) -> SimNode {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let mut g = generate(&GenOptions {
        name: "sim".into(),
        endpoint: endpoint.clone(),
        interface: "eth0".into(),
        address: Some("10.0.2.15/24".into()),
        gateway: None,
        trusted_keys: vec![],
    })
    .expect("configs");
    g.node.machine.services = services;
    g.node.machine.upgrade.trusted_keys =
        vec![upgrade::bundle::public_hex(&signing_key().verifying_key())];
    tweak(&mut g.node);
    let ctx = g.client.context(None).expect("ctx").1.clone();
    start_provisioned(
        dir,
        endpoint,
        &g.node,
        (disk, extra_cmdline, env),
        ctx,
        g.ca,
        |_| {},
    )
}

/// Starts a simulated node whose config is `node` (its API on `endpoint`, on 127.0.0.1) with
/// slot A installed: for nodes made together, like a cluster's.
pub fn start_configured(
    node: &config::NodeConfig,
    endpoint: String,
    ctx: config::Context,
    ca: api::pki::Ca,
) -> SimNode {
    start_configured_with(node, endpoint, ctx, ca, |_| {})
}

/// [`start_configured`], with `prepare` given the machine directory before machined starts.
pub fn start_configured_with(
    node: &config::NodeConfig,
    endpoint: String,
    ctx: config::Context,
    ca: api::pki::Ca,
    prepare: impl FnOnce(&std::path::Path),
) -> SimNode {
    let dir = tempfile::tempdir().expect("tmp");
    start_provisioned(
        dir,
        endpoint,
        node,
        (Disk::Installed(true, SLOT_BYTES), &[], &[]),
        ctx,
        ca,
        prepare,
    )
}

fn start_provisioned(
    dir: tempfile::TempDir,
    endpoint: String,
    node: &config::NodeConfig,
    (disk, extra_cmdline, env): (Disk, &[&str], &[(&str, String)]),
    ctx: config::Context,
    ca: api::pki::Ca,
    prepare: impl FnOnce(&std::path::Path),
) -> SimNode {
    let image = SimImage {
        version: "1.0-sim".into(),
        extra_cmdline: extra_cmdline.iter().map(|s| s.to_string()).collect(),
        payload_bytes: 0,
    };
    let machine = dir.path().join("machine");
    let yaml = node.to_yaml().expect("yaml");
    match disk {
        Disk::Installed(configured, slot_bytes) => {
            provision::sim::provision_machine(
                dir.path(),
                configured.then_some(yaml.as_str()),
                &image.extra_cmdline,
                slot_bytes,
            )
            .expect("provision");
        }
        Disk::Blank(bundle) => {
            // Room for the installed layout's 256 MiB slots (the file stays sparse).
            provision_installer(&machine, &image, &bundle, 1 << 30).expect("provision");
        }
    }
    prepare(&machine);
    let mut node = SimNode {
        dir,
        endpoint,
        ctx,
        ca,
        child: None,
    };
    node.launch(env);
    node
}

impl SimNode {
    /// Starts machined on the machine (ending the one running, as a power cut would), with
    /// `env`; the console log goes on.
    pub fn launch(&mut self, env: &[(&str, String)]) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let child = provision::sim::launch(&provision::sim::Launch {
            machined: env!("CARGO_BIN_EXE_machined").into(),
            machine: self.machine(),
            api: self.endpoint.clone(),
            console: self.dir.path().join("console.log"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            detached: false,
            wrapper: wrapper(),
        })
        .expect("start machined");
        self.child = Some(child);
    }

    /// The machine directory.
    pub fn machine(&self) -> PathBuf {
        self.dir.path().join("machine")
    }

    /// The maintenance API's certificate fingerprint, from the console.
    pub async fn maintenance_fingerprint(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.console().lines().find_map(|l| {
                l.split("certificate SHA-256 ")
                    .nth(1)
                    .map(|r| r.trim_end_matches(':').trim().to_string())
            });
            if let Some(fp) = found {
                return fp;
            }
            assert!(
                Instant::now() < deadline,
                "no maintenance fingerprint on the console:\n{}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node config on STATE, as the node keeps it (`None` when there is none).
    pub fn config_on_state(&self) -> Option<config::NodeConfig> {
        let path = std::fs::read_dir(self.machine().join("volumes"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("config.yaml"))
            .find(|p| p.exists())?;
        let text = std::fs::read_to_string(path).expect("read config");
        Some(config::NodeConfig::from_yaml(&text).expect("the config on STATE is valid"))
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// An API client (retrying until the node listens).
    pub async fn client(&self) -> MachineClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match api::client::connect_context(&self.endpoint, &self.ctx).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("{e}\nconsole:\n{}", self.console()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Version, once the node answers with a boot id other than `not`.
    pub async fn version_after(&self, not: Option<&str>) -> VersionResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = api::client::connect_context(&self.endpoint, &self.ctx).await {
                if let Ok(v) = c.version(VersionRequest {}).await {
                    let v = v.into_inner();
                    if Some(v.boot_id.as_str()) != not && v.state == "running" {
                        return v;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no answer; console:\n{}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams `bundle` to the node's Upgrade RPC.
    pub async fn upgrade(
        &self,
        bundle: &[u8],
        stage: bool,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        let options = api::proto::UpgradeOptions {
            stage,
            ..Default::default()
        };
        self.upgrade_with(bundle, options).await
    }

    /// Streams `bundle` with `options` (its `url` must be empty).
    pub async fn upgrade_with(
        &self,
        bundle: &[u8],
        options: api::proto::UpgradeOptions,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        use api::proto::{upgrade_request::Msg, UpgradeRequest};
        let mut msgs = vec![UpgradeRequest {
            msg: Some(Msg::Options(options)),
        }];
        msgs.extend(bundle.chunks(64 * 1024).map(|c| UpgradeRequest {
            msg: Some(Msg::Chunk(c.to_vec())),
        }));
        let mut c = self.client().await;
        c.upgrade(tokio_stream::iter(msgs))
            .await
            .map(|r| r.into_inner())
    }

    /// Asks the node to pull its bundle from `url`, with `options` (their `url` is set here).
    pub async fn upgrade_url_with(
        &self,
        url: &str,
        options: api::proto::UpgradeOptions,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        use api::proto::{upgrade_request::Msg, UpgradeOptions, UpgradeRequest};
        let msgs = vec![UpgradeRequest {
            msg: Some(Msg::Options(UpgradeOptions {
                url: url.into(),
                ..options
            })),
        }];
        let mut c = self.client().await;
        c.upgrade(tokio_stream::iter(msgs))
            .await
            .map(|r| r.into_inner())
    }

    /// Asks the node to pull its bundle from `url`.
    pub async fn upgrade_url(
        &self,
        url: &str,
    ) -> Result<api::proto::UpgradeResponse, tonic::Status> {
        self.upgrade_url_with(url, Default::default()).await
    }

    /// Status, once the node answers.
    pub async fn status(&self) -> api::proto::StatusResponse {
        let mut c = self.client().await;
        c.status(api::proto::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// Waits for a running node on `slot` with a boot id other than `not`.
    pub async fn running_on(&self, slot: &str, not: &str) -> VersionResponse {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.version_after(Some(not)).await;
            if v.slot == slot {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "never ran on {slot}; console:\n{}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event the node keeps.
    pub async fn events(&self) -> Vec<Event> {
        let mut c = self.client().await;
        let mut s = c
            .events(EventsRequest {
                since_id: Some(0),
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = s.message().await.expect("stream") {
            out.extend(api::convert::from_proto(&e));
        }
        out
    }

    /// machined's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills machined at once, as a power cut would (no-op when none runs).
    pub fn wait_exit_quiet(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for machined to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "machined did not exit; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `PLINTH_SIM_WRAPPER`: a command line machined runs under (for one, `valgrind
/// --leak-check=full --show-leak-kinds=all --log-file=vg.log`, to see what a node keeps across
/// its boots). Empty: machined itself.
fn wrapper() -> Vec<String> {
    std::env::var("PLINTH_SIM_WRAPPER")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM powers the simulated machine off (its services with it).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            // A wrapper such as valgrind reports at exit, and takes its time.
            let grace = if wrapper().is_empty() { 5 } else { 120 };
            let deadline = Instant::now() + Duration::from_secs(grace);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Names of sequences stopped with an error containing `needle`.
pub fn stopped_with(events: &[Event], sequence: &str, needle: &str) -> bool {
    events.iter().any(|e| matches!(&e.kind, EventKind::SequenceStop { sequence: s, error: Some(err), .. } if s == sequence && err.contains(needle)))
}

/// A config for the same node made by someone else: its own name, CA and node key.
pub fn foreign_config(name: &str, endpoint: &str) -> config::NodeConfig {
    let g = generate(&GenOptions {
        name: name.into(),
        endpoint: endpoint.into(),
        interface: "eth0".into(),
        address: Some("10.0.2.99/24".into()),
        gateway: None,
        trusted_keys: vec![],
    })
    .expect("configs");
    g.node
}
