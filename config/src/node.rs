//! The node config: YAML on the STATE partition (`/system/state/config.yaml`).
//!
//! ```yaml
//! version: v1alpha1
//! machine:
//!   name: node-1
//!   network:
//!     interfaces:
//!       - name: eth0
//!         addresses: [10.0.2.15/24]
//!         gateway: 10.0.2.2
//!   api:
//!     port: 50000
//!     ca: |
//!       -----BEGIN CERTIFICATE-----
//!     cert: |
//!       -----BEGIN CERTIFICATE-----
//!     key: |
//!       -----BEGIN PRIVATE KEY-----
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{parse_yaml, ConfigError};

/// The only config version this build understands.
pub const VERSION: &str = "v1alpha1";

/// The port the API listens on unless the config says otherwise.
pub const DEFAULT_API_PORT: u16 = 50000;

/// A node's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Document version; must be [`VERSION`].
    pub version: String,
    /// The machine's settings.
    pub machine: Machine,
    /// The cluster the node belongs to: required for a control-plane node or a worker,
    /// refused on a standalone one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
}

/// What the node is in a cluster (`machine.type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// A node on its own: no cluster, no etcd.
    #[default]
    Standalone,
    /// An etcd member of its cluster (`plinth bootstrap` starts the cluster on one of them).
    Controlplane,
    /// Runs workloads; reaches the cluster's etcd as a client only.
    Worker,
}

impl MachineType {
    fn is_standalone(&self) -> bool {
        *self == MachineType::Standalone
    }

    /// As written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            MachineType::Standalone => "standalone",
            MachineType::Controlplane => "controlplane",
            MachineType::Worker => "worker",
        }
    }
}

/// The etcd client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// The etcd peer port.
pub const ETCD_PEER_PORT: u16 = 2380;

/// The cluster section: its name, its control-plane nodes (the etcd members), and this node's
/// etcd credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The cluster's name (also the etcd cluster token).
    pub name: String,
    /// Every control-plane node, by name and address: where etcd's members are.
    pub controlplanes: Vec<ClusterMember>,
    /// etcd's PKI as this node holds it.
    pub etcd: EtcdPki,
}

/// A control-plane node as the cluster section names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMember {
    /// Its `machine.name` (its etcd member name).
    pub name: String,
    /// The address its etcd listens on (peers and clients), without a prefix.
    pub address: String,
    /// etcd's client port on it.
    #[serde(
        default = "etcd_client_port",
        skip_serializing_if = "is_etcd_client_port"
    )]
    pub client_port: u16,
    /// etcd's peer port on it.
    #[serde(default = "etcd_peer_port", skip_serializing_if = "is_etcd_peer_port")]
    pub peer_port: u16,
}

impl ClusterMember {
    /// Its etcd client URL.
    pub fn client_url(&self) -> String {
        format!(
            "https://{}",
            join_host_port(&self.address, self.client_port)
        )
    }

    /// Its etcd peer URL.
    pub fn peer_url(&self) -> String {
        format!("https://{}", join_host_port(&self.address, self.peer_port))
    }
}

impl std::fmt::Debug for CertKey {
    // The key stays out of logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey")
            .field("cert", &self.cert)
            .field("key", &"(redacted)")
            .finish()
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn etcd_client_port() -> u16 {
    ETCD_CLIENT_PORT
}

fn etcd_peer_port() -> u16 {
    ETCD_PEER_PORT
}

fn is_etcd_client_port(p: &u16) -> bool {
    *p == ETCD_CLIENT_PORT
}

fn is_etcd_peer_port(p: &u16) -> bool {
    *p == ETCD_PEER_PORT
}

/// etcd's CA and the node's certificates for it (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdPki {
    /// The etcd CA's certificate: peers, servers and clients must chain to it.
    pub ca: String,
    /// A control-plane node's etcd member certificate (server and peer, for its name and
    /// address) and key; a worker has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<CertKey>,
    /// machined's etcd client certificate and key.
    pub client: CertKey,
}

/// A certificate and its key (PEM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKey {
    /// Certificate, PEM.
    pub cert: String,
    /// Private key, PEM.
    pub key: String,
}

/// The machine section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Node name; also the hostname.
    pub name: String,
    /// What the node is in a cluster; standalone when absent.
    #[serde(
        default,
        rename = "type",
        skip_serializing_if = "MachineType::is_standalone"
    )]
    pub machine_type: MachineType,
    /// Network settings.
    #[serde(default)]
    pub network: Network,
    /// The API's identity.
    pub api: ApiConfig,
    /// Extra services machined supervises.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Containers machined runs through the runtime extension's containerd, supervised like
    /// the services (and listed with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    /// Upgrade policy.
    #[serde(default)]
    pub upgrade: Upgrade,
    /// Where to install when booted from installer media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<Install>,
    /// Disk encryption of STATE and EPHEMERAL.
    #[serde(default, skip_serializing_if = "Encryption::is_default")]
    pub encryption: Encryption,
}

/// Disk encryption: STATE and EPHEMERAL are made encrypted (dm-crypt) with keys sealed to the
/// TPM whenever the machine has one and boots a signed image; this says what a machine
/// without one does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Without a TPM: `refuse` (the node will not be installed or run with unencrypted
    /// volumes) or `unencrypted` (plain ext4, and `plinth status` says so).
    #[serde(default)]
    pub without_tpm: WithoutTpm,
}

impl Encryption {
    fn is_default(&self) -> bool {
        *self == Encryption::default()
    }
}

/// What a node without a TPM does with its volumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WithoutTpm {
    /// Run with plain volumes (`plinth status` shows them unencrypted).
    #[default]
    Unencrypted,
    /// Refuse: no install, and no boot with unencrypted volumes.
    Refuse,
}

/// The install target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// The whole disk to install on, e.g. `/dev/nvme0n1`.
    pub disk: String,
    /// Install even if the disk holds a Plinth install or other data (it is lost).
    #[serde(default)]
    pub wipe: bool,
}

/// Upgrade policy: whose bundles to accept and what a new slot must prove before it is
/// committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// ed25519 public keys (hex) whose signatures the node accepts on bundles.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Seconds a trial boot has to pass its health gates before the node reboots into the old
    /// slot.
    #[serde(default = "default_trial_timeout")]
    pub trial_timeout_s: u64,
    /// Checks that must pass (besides the API and every service) before a trial commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_checks: Vec<HealthCheck>,
    /// An upgrade whose bundle source (an upload or a URL) sends nothing for this many
    /// seconds fails by itself.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_s: u64,
    /// An upgrade that has not received its whole bundle within this many seconds fails.
    #[serde(default = "default_receive_deadline")]
    pub receive_deadline_s: u64,
    /// CA certificates (PEM) that https:// bundle URLs are checked against; without them the
    /// node refuses https:// URLs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca: String,
}

impl Default for Upgrade {
    fn default() -> Self {
        Upgrade {
            trusted_keys: Vec::new(),
            trial_timeout_s: default_trial_timeout(),
            health_checks: Vec::new(),
            idle_timeout_s: default_idle_timeout(),
            receive_deadline_s: default_receive_deadline(),
            ca: String::new(),
        }
    }
}

fn default_trial_timeout() -> u64 {
    300
}

fn default_idle_timeout() -> u64 {
    30
}

fn default_receive_deadline() -> u64 {
    3600
}

/// A service: a process machined starts after its dependencies are healthy, keeps running as
/// its restart policy says, and stops in reverse dependency order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name.
    pub name: String,
    /// Program and arguments (absolute program path).
    pub command: Vec<String>,
    /// Environment variables, `KEY=VALUE`, besides a `PATH` of the root's program directories
    /// (which one of these may replace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<String>,
    /// Services that must be healthy before this one starts (`containerd` is the runtime
    /// extension's, which machined runs when an active extension provides it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// When to restart it after it exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when stopping it.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// How to tell it is healthy; without one, running is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "health_form")]
    pub health: Option<HealthCheck>,
}

/// A container: an image from the node's containerd (`plinth image import`), run by machined
/// once containerd and its dependencies are healthy, and restarted as its policy says. Its
/// output is its log (`plinth logs NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Unique name among the services and containers.
    pub name: String,
    /// The image's reference, as imported (`plinth image list`).
    pub image: String,
    /// Program and arguments; without, the image's entrypoint and command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment variables, `KEY=VALUE`, over the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<String>,
    /// Which network it is on.
    #[serde(default)]
    pub network: ContainerNetwork,
    /// Ports published on the node, `HOST:CONTAINER` (TCP), for a private network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Directories of EPHEMERAL (`/var/...`) mounted into it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ContainerMount>,
    /// Services or containers that must be healthy before it starts (`containerd` always
    /// is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// When to restart it after it exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when stopping it.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// How to tell it is healthy (a TCP check connects from the node: a published port, or
    /// the container's own on the host network); without one, running is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "health_form")]
    pub health: Option<HealthCheck>,
}

/// A container's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerNetwork {
    /// Its own network namespace with only loopback: no way out, and in only through its
    /// published ports.
    #[default]
    Private,
    /// The node's network namespace.
    Host,
}

/// A directory of EPHEMERAL mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerMount {
    /// The directory on the node, under `/var` (made if missing).
    pub source: String,
    /// Where it appears in the container.
    pub destination: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl Container {
    /// The published ports as (node port, container port).
    pub fn published(&self) -> Vec<(u16, u16)> {
        self.ports.iter().filter_map(|p| parse_port(p)).collect()
    }
}

/// `HOST:CONTAINER` (an optional `/tcp` suffix allowed).
fn parse_port(p: &str) -> Option<(u16, u16)> {
    let p = p.strip_suffix("/tcp").unwrap_or(p);
    let (h, c) = p.split_once(':')?;
    let (h, c) = (h.parse::<u16>().ok()?, c.parse::<u16>().ok()?);
    (h != 0 && c != 0).then_some((h, c))
}

/// When a service is restarted after it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Only after a failure (non-zero exit or a signal).
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// A health check, written as a one-key map (`health: {tcp: "127.0.0.1:8080"}`), which JSON
/// patches and the API's JSON can carry (a YAML tag, `!tcp`, is read too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HealthCheck {
    /// A TCP connection to this address succeeds.
    Tcp(String),
}

/// How a health check is written: a one-key map; a YAML tag (`!tcp ADDR`, which configs
/// written before were) is read too.
mod health_form {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::HealthCheck;

    pub fn serialize<S: Serializer>(v: &Option<HealthCheck>, s: S) -> Result<S::Ok, S::Error> {
        serde_norway::with::singleton_map::serialize(v, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HealthCheck>, D::Error> {
        match Option::<serde_norway::Value>::deserialize(d)? {
            None => Ok(None),
            Some(v @ serde_norway::Value::Tagged(_)) => serde_norway::from_value(v)
                .map(Some)
                .map_err(D::Error::custom),
            Some(v) => serde_norway::with::singleton_map::deserialize(v)
                .map(Some)
                .map_err(D::Error::custom),
        }
    }
}

fn default_stop_timeout() -> u64 {
    10
}

/// Network settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Interfaces to configure statically.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
}

/// One statically configured interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Kernel interface name, e.g. `eth0`.
    pub name: String,
    /// Addresses with prefix length, e.g. `10.0.2.15/24`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Default gateway reached through this interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Lease an IPv4 address (and the default route) over DHCP, besides any static ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dhcp: bool,
}

/// The API's identity: the CA that signs clients, and the server's certificate and key (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP port to listen on.
    #[serde(default = "default_port")]
    pub port: u16,
    /// CA certificate (PEM) that client certificates must chain to.
    pub ca: String,
    /// Server certificate (PEM), signed by the CA.
    pub cert: String,
    /// Server private key (PEM).
    pub key: String,
}

fn default_port() -> u16 {
    DEFAULT_API_PORT
}

impl NodeConfig {
    /// Parses and validates a node config.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: NodeConfig = parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The config as YAML.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_norway::to_string(self)
            .map_err(|e| ConfigError::invalid(".", format!("cannot be written as YAML: {e}")))
    }

    /// Checks what the schema cannot: values that parse but mean nothing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != VERSION {
            return Err(ConfigError::invalid(
                "version",
                format!(
                    "unsupported version {:?} (this build reads {VERSION:?})",
                    self.version
                ),
            ));
        }
        validate_hostname(&self.machine.name)?;
        for (i, iface) in self.machine.network.interfaces.iter().enumerate() {
            iface.validate(&format!("machine.network.interfaces[{i}]"))?;
        }
        let api = &self.machine.api;
        if api.port == 0 {
            return Err(ConfigError::invalid(
                "machine.api.port",
                "port 0 is not a port",
            ));
        }
        require_pem(&api.ca, "machine.api.ca", "CERTIFICATE")?;
        require_pem(&api.cert, "machine.api.cert", "CERTIFICATE")?;
        require_pem(&api.key, "machine.api.key", "PRIVATE KEY")?;
        validate_services(&self.machine.services)?;
        validate_containers(&self.machine)?;
        self.validate_cluster()?;
        if let Some(i) = &self.machine.install {
            // A device node, like /dev/nvme0n1 (the simulated machine's are image paths).
            let p = std::path::Path::new(&i.disk);
            let ok = p.is_absolute()
                && p.file_name().is_some()
                && !p.components().any(|c| c == std::path::Component::ParentDir);
            if !ok {
                return Err(ConfigError::invalid(
                    "machine.install.disk",
                    format!(
                        "{:?} is not a disk's device node, like /dev/nvme0n1",
                        i.disk
                    ),
                ));
            }
        }
        let up = &self.machine.upgrade;
        for (i, k) in up.trusted_keys.iter().enumerate() {
            if k.len() != 64 || !k.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    format!("machine.upgrade.trusted_keys[{i}]"),
                    "expected 64 hex digits (an ed25519 public key, as `plinth gen signing-key` prints)",
                ));
            }
        }
        // (field, value, most): a deadline beyond any sensible one is a typo, and would
        // overflow the clock arithmetic.
        for (field, value, most) in [
            (
                "machine.upgrade.trial_timeout_s",
                up.trial_timeout_s,
                86_400,
            ),
            ("machine.upgrade.idle_timeout_s", up.idle_timeout_s, 86_400),
            (
                "machine.upgrade.receive_deadline_s",
                up.receive_deadline_s,
                7 * 86_400,
            ),
        ] {
            if value == 0 || value > most {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be between 1 and {most} seconds, not {value}"),
                ));
            }
        }
        if !up.ca.is_empty() && !up.ca.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ConfigError::invalid(
                "machine.upgrade.ca",
                "expected PEM certificates (-----BEGIN CERTIFICATE-----)",
            ));
        }
        for (i, HealthCheck::Tcp(addr)) in up.health_checks.iter().enumerate() {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    format!("machine.upgrade.health_checks[{i}].tcp"),
                    format!("{addr:?} is not an address:port"),
                ));
            }
        }
        Ok(())
    }
}

/// The service machined runs from the runtime extension; a config service may depend on it
/// but not take its name.
pub const RUNTIME_SERVICE: &str = "containerd";

impl NodeConfig {
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let kind = self.machine.machine_type;
        let Some(c) = &self.cluster else {
            if kind.is_standalone() {
                return Ok(());
            }
            return Err(ConfigError::invalid(
                "cluster",
                format!(
                    "a {} node needs the cluster section (plinth gen config --nodes writes it)",
                    kind.as_str()
                ),
            ));
        };
        if kind.is_standalone() {
            return Err(ConfigError::invalid(
                "machine.type",
                "a node with a cluster section is a controlplane or a worker",
            ));
        }
        if validate_hostname(&c.name).is_err() {
            return Err(ConfigError::invalid(
                "cluster.name",
                format!(
                    "{:?} is not a cluster name (letters, digits and '-')",
                    c.name
                ),
            ));
        }
        if c.controlplanes.is_empty() {
            return Err(ConfigError::invalid(
                "cluster.controlplanes",
                "a cluster needs at least one control-plane node",
            ));
        }
        for (i, m) in c.controlplanes.iter().enumerate() {
            let at = format!("cluster.controlplanes[{i}]");
            if validate_hostname(&m.name).is_err() {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!("{:?} is not a node name", m.name),
                ));
            }
            match m.address.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => {}
                _ => {
                    return Err(ConfigError::invalid(
                        format!("{at}.address"),
                        format!("{:?} is not a node's IP address", m.address),
                    ))
                }
            }
            if m.client_port == 0 || m.peer_port == 0 || m.client_port == m.peer_port {
                return Err(ConfigError::invalid(
                    at,
                    "etcd's client and peer ports must be two ports",
                ));
            }
            if let Some(j) = c.controlplanes[..i].iter().position(|o| {
                o.name == m.name
                    || (o.address.parse::<IpAddr>().ok() == m.address.parse::<IpAddr>().ok()
                        && [o.client_port, o.peer_port]
                            .iter()
                            .any(|p| [m.client_port, m.peer_port].contains(p)))
            }) {
                return Err(ConfigError::invalid(
                    at,
                    format!("names the same node or address as cluster.controlplanes[{j}]"),
                ));
            }
        }
        require_pem(&c.etcd.ca, "cluster.etcd.ca", "CERTIFICATE")?;
        require_pem(
            &c.etcd.client.cert,
            "cluster.etcd.client.cert",
            "CERTIFICATE",
        )?;
        require_pem(&c.etcd.client.key, "cluster.etcd.client.key", "PRIVATE KEY")?;
        let listed = c.controlplanes.iter().any(|m| m.name == self.machine.name);
        match (kind, &c.etcd.member) {
            (MachineType::Controlplane, None) => Err(ConfigError::invalid(
                "cluster.etcd.member",
                "a control-plane node needs its etcd member certificate",
            )),
            (MachineType::Controlplane, Some(_)) if !listed => Err(ConfigError::invalid(
                "cluster.controlplanes",
                format!(
                    "does not list this node ({:?}), a control-plane node",
                    self.machine.name
                ),
            )),
            (MachineType::Controlplane, Some(m)) => {
                require_pem(&m.cert, "cluster.etcd.member.cert", "CERTIFICATE")?;
                require_pem(&m.key, "cluster.etcd.member.key", "PRIVATE KEY")
            }
            (_, Some(_)) => Err(ConfigError::invalid(
                "cluster.etcd.member",
                "only a control-plane node is an etcd member",
            )),
            (_, None) if listed => Err(ConfigError::invalid(
                "cluster.controlplanes",
                format!(
                    "lists this node ({:?}), which is a worker",
                    self.machine.name
                ),
            )),
            (_, None) => Ok(()),
        }
    }
}

fn validate_services(services: &[Service]) -> Result<(), ConfigError> {
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    for (i, s) in services.iter().enumerate() {
        let at = format!("machine.services[{i}]");
        if !is_unit_name(&s.name) {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!(
                    "{:?} is not a service name (letters, digits, '-', '_')",
                    s.name
                ),
            ));
        }
        if s.name == RUNTIME_SERVICE {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("{RUNTIME_SERVICE:?} is the runtime extension's service, run by machined"),
            ));
        }
        if names.iter().filter(|n| **n == s.name).count() > 1 {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("service {:?} is defined twice", s.name),
            ));
        }
        match s.command.first() {
            Some(p) if p.starts_with('/') => {}
            _ => {
                return Err(ConfigError::invalid(
                    format!("{at}.command"),
                    "the command must start with an absolute program path",
                ))
            }
        }
        for (j, d) in s.depends_on.iter().enumerate() {
            if !names.contains(&d.as_str()) && d != RUNTIME_SERVICE {
                return Err(ConfigError::invalid(
                    format!("{at}.depends_on[{j}]"),
                    format!("no service named {d:?}"),
                ));
            }
        }
        for (j, e) in s.environment.iter().enumerate() {
            if !is_environment_entry(e) {
                return Err(ConfigError::invalid(
                    format!("{at}.environment[{j}]"),
                    format!("{e:?} is not KEY=VALUE (a key of letters, digits and '_')"),
                ));
            }
        }
        if let Some(HealthCheck::Tcp(addr)) = &s.health {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    format!("{at}.health.tcp"),
                    format!("{addr:?} is not an address:port"),
                ));
            }
        }
    }
    // A dependency cycle would leave its services waiting forever.
    let deps: Vec<(String, Vec<String>)> = services
        .iter()
        .map(|s| (s.name.clone(), s.depends_on.clone()))
        .collect();
    if let Some(name) = cycle_in(&deps) {
        return Err(ConfigError::invalid(
            "machine.services",
            format!("dependency cycle through {name:?}"),
        ));
    }
    Ok(())
}

/// Whether `name` is a service or container name: letters, digits, '-', '_'.
fn is_unit_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn validate_containers(m: &Machine) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    names.extend(m.containers.iter().map(|c| c.name.as_str()));
    let mut ports: Vec<(u16, String)> = Vec::new();
    for (i, c) in m.containers.iter().enumerate() {
        let at = format!("machine.containers[{i}]");
        if !is_unit_name(&c.name) || c.name == RUNTIME_SERVICE {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!(
                    "{:?} is not a container name (letters, digits, '-', '_'; not {RUNTIME_SERVICE:?})",
                    c.name
                ),
            ));
        }
        if names.iter().filter(|n| **n == c.name).count() > 1 {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("{:?} is already the name of a service or container", c.name),
            ));
        }
        let ok_image = !c.image.is_empty()
            && c.image.len() <= 255
            && c.image
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-/:@+".contains(ch));
        if !ok_image {
            return Err(ConfigError::invalid(
                format!("{at}.image"),
                format!("{:?} is not an image reference", c.image),
            ));
        }
        for (j, e) in c.environment.iter().enumerate() {
            if !is_environment_entry(e) {
                return Err(ConfigError::invalid(
                    format!("{at}.environment[{j}]"),
                    format!("{e:?} is not KEY=VALUE (a key of letters, digits and '_')"),
                ));
            }
        }
        for (j, p) in c.ports.iter().enumerate() {
            let field = format!("{at}.ports[{j}]");
            if c.network == ContainerNetwork::Host {
                return Err(ConfigError::invalid(
                    field,
                    "a container on the host network listens on the node's ports itself: \
                     ports are for a private network",
                ));
            }
            let Some((host, _)) = parse_port(p) else {
                return Err(ConfigError::invalid(
                    field,
                    format!("{p:?} is not HOST:CONTAINER (two port numbers, TCP)"),
                ));
            };
            if let Some((_, other)) = ports.iter().find(|(h, _)| *h == host) {
                return Err(ConfigError::invalid(
                    field,
                    format!("node port {host} is already published by {other}"),
                ));
            }
            ports.push((host, format!("container {:?}", c.name)));
        }
        for (j, mount) in c.mounts.iter().enumerate() {
            let field = format!("{at}.mounts[{j}]");
            let clean = |p: &str| {
                p.starts_with('/') && !p.split('/').any(|part| part == ".." || part == ".")
            };
            // machined's and containerd's own data are not for containers.
            let reserved = ["/var/lib/containerd", "/var/lib/plinth", "/var/log"]
                .iter()
                .find(|r| mount.source == **r || mount.source.starts_with(&format!("{r}/")));
            if let Some(r) = reserved {
                return Err(ConfigError::invalid(
                    format!("{field}.source"),
                    format!(
                        "{:?} is under {r}, which the node keeps for itself",
                        mount.source
                    ),
                ));
            }
            if !clean(&mount.source) || !mount.source.starts_with("/var/") {
                return Err(ConfigError::invalid(
                    format!("{field}.source"),
                    format!(
                        "{:?} is not a directory of EPHEMERAL (an absolute path under /var, without . or ..)",
                        mount.source
                    ),
                ));
            }
            if !clean(&mount.destination) || mount.destination == "/" {
                return Err(ConfigError::invalid(
                    format!("{field}.destination"),
                    format!(
                        "{:?} is not a path in the container (absolute, not /, without . or ..)",
                        mount.destination
                    ),
                ));
            }
        }
        for (j, d) in c.depends_on.iter().enumerate() {
            if !names.contains(&d.as_str()) && d != RUNTIME_SERVICE {
                return Err(ConfigError::invalid(
                    format!("{at}.depends_on[{j}]"),
                    format!("no service or container named {d:?}"),
                ));
            }
        }
        if let Some(HealthCheck::Tcp(addr)) = &c.health {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    format!("{at}.health.tcp"),
                    format!("{addr:?} is not an address:port"),
                ));
            }
        }
    }
    // The API's port is the node's too.
    if let Some((_, c)) = ports.iter().find(|(h, _)| *h == m.api.port) {
        return Err(ConfigError::invalid(
            "machine.containers",
            format!("{c} publishes port {}, the API's", m.api.port),
        ));
    }
    let deps: Vec<(String, Vec<String>)> = m
        .services
        .iter()
        .map(|s| (s.name.clone(), s.depends_on.clone()))
        .chain(
            m.containers
                .iter()
                .map(|c| (c.name.clone(), c.depends_on.clone())),
        )
        .collect();
    if let Some(name) = cycle_in(&deps) {
        return Err(ConfigError::invalid(
            "machine.containers",
            format!("dependency cycle through {name:?}"),
        ));
    }
    Ok(())
}

/// A unit on a dependency cycle among (name, dependencies), if there is one.
fn cycle_in(units: &[(String, Vec<String>)]) -> Option<String> {
    fn visit<'a>(
        u: &'a (String, Vec<String>),
        all: &'a [(String, Vec<String>)],
        path: &mut Vec<&'a str>,
    ) -> Option<String> {
        if path.contains(&u.0.as_str()) {
            return Some(u.0.clone());
        }
        path.push(&u.0);
        for d in &u.1 {
            if let Some(dep) = all.iter().find(|x| &x.0 == d) {
                if let Some(c) = visit(dep, all, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        None
    }
    units.iter().find_map(|u| visit(u, units, &mut Vec::new()))
}

/// `KEY=VALUE` with a key of letters, digits and '_' (not starting with a digit).
fn is_environment_entry(e: &str) -> bool {
    let key = e.split_once('=').map(|(k, _)| k).unwrap_or_default();
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !e.contains('\0')
}

impl Interface {
    /// Addresses parsed (valid after [`NodeConfig::validate`]).
    pub fn networks(&self) -> Vec<IpNet> {
        self.addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Gateway parsed (valid after [`NodeConfig::validate`]).
    pub fn gateway_ip(&self) -> Option<IpAddr> {
        self.gateway.as_deref().and_then(|g| g.parse().ok())
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.len() > 15 || self.name.contains(['/', ' ']) {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("{:?} is not a valid interface name", self.name),
            ));
        }
        for (j, a) in self.addresses.iter().enumerate() {
            if a.parse::<IpNet>().is_err() {
                return Err(ConfigError::invalid(
                    format!("{at}.addresses[{j}]"),
                    format!("{a:?} is not an address with a prefix length, like 10.0.2.15/24"),
                ));
            }
        }
        if let Some(g) = &self.gateway {
            let ip: IpAddr = g.parse().map_err(|_| {
                ConfigError::invalid(
                    format!("{at}.gateway"),
                    format!("{g:?} is not an IP address"),
                )
            })?;
            if !self.networks().iter().any(|n| n.contains(&ip)) {
                return Err(ConfigError::invalid(
                    format!("{at}.gateway"),
                    format!("{ip} is not in any of the interface's networks"),
                ));
            }
        }
        Ok(())
    }
}

fn validate_hostname(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "machine.name",
            format!("{name:?} is not a valid host name (letters, digits and '-', at most 63)"),
        ))
    }
}

fn require_pem(text: &str, field: &str, what: &str) -> Result<(), ConfigError> {
    if text.contains("-----BEGIN ") && text.contains(what) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("expected a PEM block holding a {what}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const PEM_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

    fn good() -> NodeConfig {
        NodeConfig {
            version: VERSION.into(),
            machine: Machine {
                name: "node-1".into(),
                machine_type: MachineType::Standalone,
                network: Network {
                    interfaces: vec![Interface {
                        name: "eth0".into(),
                        addresses: vec!["10.0.2.15/24".into()],
                        gateway: Some("10.0.2.2".into()),
                        dhcp: false,
                    }],
                },
                api: ApiConfig {
                    port: 50000,
                    ca: PEM_CERT.into(),
                    cert: PEM_CERT.into(),
                    key: PEM_KEY.into(),
                },
                services: vec![],
                containers: vec![],
                upgrade: Upgrade::default(),
                install: None,
                encryption: Default::default(),
            },
            cluster: None,
        }
    }

    fn cluster_node(kind: MachineType) -> NodeConfig {
        let mut c = good();
        c.machine.machine_type = kind;
        c.cluster = Some(Cluster {
            name: "prod".into(),
            controlplanes: vec![
                ClusterMember {
                    name: "node-1".into(),
                    address: "10.5.0.2".into(),
                    client_port: ETCD_CLIENT_PORT,
                    peer_port: ETCD_PEER_PORT,
                },
                ClusterMember {
                    name: "node-2".into(),
                    address: "10.5.0.3".into(),
                    client_port: ETCD_CLIENT_PORT,
                    peer_port: ETCD_PEER_PORT,
                },
            ],
            etcd: EtcdPki {
                ca: PEM_CERT.into(),
                member: (kind == MachineType::Controlplane).then(|| CertKey {
                    cert: PEM_CERT.into(),
                    key: PEM_KEY.into(),
                }),
                client: CertKey {
                    cert: PEM_CERT.into(),
                    key: PEM_KEY.into(),
                },
            },
        });
        c
    }

    fn refused(c: &NodeConfig) -> (String, String) {
        match c.validate() {
            Err(ConfigError::Invalid { field, reason }) => (field, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_control_plane_node_round_trips_with_its_type_and_cluster() {
        let c = cluster_node(MachineType::Controlplane);
        c.validate().expect("valid");
        let yaml = c.to_yaml().expect("yaml");
        assert!(yaml.contains("type: controlplane"), "{yaml}");
        assert_eq!(NodeConfig::from_yaml(&yaml).expect("parse"), c);
        // A standalone node writes neither.
        let yaml = good().to_yaml().expect("yaml");
        assert!(
            !yaml.contains("type:") && !yaml.contains("cluster:"),
            "{yaml}"
        );
    }

    #[test]
    fn cluster_sections_that_cannot_work_are_refused_by_field() {
        let mut c = cluster_node(MachineType::Worker);
        c.machine.name = "node-3".into();
        c.validate()
            .expect("a worker outside the control-plane list");

        let mut c = cluster_node(MachineType::Controlplane);
        c.cluster = None;
        assert_eq!(refused(&c).0, "cluster");

        let mut c = good();
        c.cluster = cluster_node(MachineType::Worker).cluster;
        assert_eq!(refused(&c).0, "machine.type");

        let mut c = cluster_node(MachineType::Controlplane);
        if let Some(cl) = c.cluster.as_mut() {
            cl.etcd.member = None;
        }
        assert_eq!(refused(&c).0, "cluster.etcd.member");

        let mut c = cluster_node(MachineType::Controlplane);
        c.machine.name = "node-9".into();
        let (field, reason) = refused(&c);
        assert_eq!(field, "cluster.controlplanes");
        assert!(reason.contains("node-9"), "{reason}");

        // A worker named as a control plane, or holding a member certificate.
        let c = cluster_node(MachineType::Worker);
        assert_eq!(refused(&c).0, "cluster.controlplanes");
        let mut c = cluster_node(MachineType::Controlplane);
        c.machine.machine_type = MachineType::Worker;
        c.machine.name = "node-3".into();
        assert_eq!(refused(&c).0, "cluster.etcd.member");

        let mut c = cluster_node(MachineType::Controlplane);
        if let Some(cl) = c.cluster.as_mut() {
            cl.controlplanes[1].address = "10.5.0.2".into();
        }
        let (field, reason) = refused(&c);
        assert_eq!(field, "cluster.controlplanes[1]");
        assert!(reason.contains("[0]"), "{reason}");

        let mut c = cluster_node(MachineType::Controlplane);
        if let Some(cl) = c.cluster.as_mut() {
            cl.controlplanes[1].address = "10.5.0.3/24".into();
        }
        assert_eq!(refused(&c).0, "cluster.controlplanes[1].address");

        let yaml = cluster_node(MachineType::Controlplane)
            .to_yaml()
            .expect("yaml")
            .replace("type: controlplane", "type: master");
        let err = NodeConfig::from_yaml(&yaml).expect_err("unknown type");
        assert!(err.to_string().contains("machine.type"), "{err}");
    }

    fn field_of(yaml: &str) -> String {
        NodeConfig::from_yaml(yaml)
            .expect_err("must be refused")
            .field()
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn a_written_config_reads_back_identically() {
        let c = good();
        assert_eq!(
            NodeConfig::from_yaml(&c.to_yaml().expect("yaml")).expect("parses"),
            c
        );
    }

    #[test]
    fn a_missing_field_is_named_with_its_path() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("  name: node-1\n", "");
        let err = NodeConfig::from_yaml(&yaml).expect_err("refused");
        assert_eq!(err.field(), Some("machine"));
        assert!(err.to_string().contains("missing field `name`"), "{err}");
    }

    #[test]
    fn a_missing_api_key_is_named() {
        let mut c = good();
        c.machine.api.key = String::new();
        let yaml = c.to_yaml().expect("yaml").replace("    key: ''\n", "");
        let err = NodeConfig::from_yaml(&yaml).expect_err("refused");
        assert!(
            err.to_string().contains("machine.api") && err.to_string().contains("key"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        for text in [
            "",
            ":",
            "machine: [",
            "version: v1alpha1\nmachine: 7",
            "\t- x",
        ] {
            assert!(NodeConfig::from_yaml(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn an_unknown_field_is_refused_and_named() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("machine:\n", "machine:\n  colour: red\n");
        let err = NodeConfig::from_yaml(&yaml).expect_err("refused");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn a_bad_address_names_its_index() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("10.0.2.15/24", "10.0.2.300/24");
        assert_eq!(
            field_of(&yaml),
            "machine.network.interfaces[0].addresses[0]"
        );
    }

    #[test]
    fn a_gateway_outside_the_interface_networks_is_refused() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("gateway: 10.0.2.2", "gateway: 192.168.1.1");
        assert_eq!(field_of(&yaml), "machine.network.interfaces[0].gateway");
    }

    #[test]
    fn a_bad_host_name_is_refused() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("name: node-1", "name: no_de");
        assert_eq!(field_of(&yaml), "machine.name");
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("version: v1alpha1", "version: v9");
        assert_eq!(field_of(&yaml), "version");
    }

    #[test]
    fn a_certificate_that_is_not_pem_is_refused() {
        let mut c = good();
        c.machine.api.cert = "hello".into();
        assert_eq!(field_of(&c.to_yaml().expect("yaml")), "machine.api.cert");
    }

    fn service(name: &str, deps: &[&str]) -> Service {
        Service {
            name: name.into(),
            command: vec!["/sbin/machined".into(), "pause".into()],
            environment: vec![],
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            restart: RestartPolicy::OnFailure,
            stop_timeout_s: 10,
            health: None,
        }
    }

    #[test]
    fn services_round_trip_with_their_defaults() {
        let mut c = good();
        c.machine.services = vec![service("a", &[]), service("b", &["a"])];
        c.machine.services[1].health = Some(HealthCheck::Tcp("127.0.0.1:8080".into()));
        let back = NodeConfig::from_yaml(&c.to_yaml().expect("yaml")).expect("parses");
        assert_eq!(back, c);
    }

    #[test]
    fn a_health_check_is_a_one_key_map_and_the_tagged_form_still_reads() {
        let mut c = good();
        c.machine.services = vec![service("a", &[])];
        c.machine.services[0].health = Some(HealthCheck::Tcp("127.0.0.1:8080".into()));
        let yaml = c.to_yaml().expect("yaml");
        assert!(yaml.contains("tcp: 127.0.0.1:8080"), "{yaml}");
        assert!(!yaml.contains('!'), "{yaml}");
        // `plinth patch` goes through JSON.
        let value: serde_json::Value = serde_norway::from_str(&yaml).expect("as JSON");
        assert_eq!(
            value["machine"]["services"][0]["health"]["tcp"],
            "127.0.0.1:8080"
        );
        let tagged = yaml.replace(
            "health:\n      tcp: 127.0.0.1:8080",
            "health: !tcp 127.0.0.1:8080",
        );
        assert_ne!(tagged, yaml, "{yaml}");
        assert_eq!(NodeConfig::from_yaml(&tagged).expect("tagged"), c);
    }

    #[test]
    fn a_dependency_on_an_unknown_service_is_named() {
        let mut c = good();
        c.machine.services = vec![service("a", &["ghost"])];
        assert_eq!(
            field_of(&c.to_yaml().expect("yaml")),
            "machine.services[0].depends_on[0]"
        );
    }

    fn container(name: &str) -> Container {
        Container {
            name: name.into(),
            image: "plinth.local/busybox:latest".into(),
            command: vec![],
            environment: vec![],
            network: ContainerNetwork::Private,
            ports: vec![],
            mounts: vec![],
            depends_on: vec![],
            restart: RestartPolicy::Always,
            stop_timeout_s: 10,
            health: None,
        }
    }

    #[test]
    fn containers_round_trip_with_their_defaults() {
        let mut c = good();
        let mut web = container("web");
        web.ports = vec!["8080:80".into()];
        web.mounts = vec![ContainerMount {
            source: "/var/lib/web".into(),
            destination: "/data".into(),
            read_only: true,
        }];
        c.machine.containers = vec![web];
        let yaml = c.to_yaml().expect("yaml");
        let back = NodeConfig::from_yaml(&yaml).expect("parses");
        assert_eq!(back, c);
        assert_eq!(back.machine.containers[0].published(), [(8080, 80)]);
    }

    #[test]
    fn a_port_published_twice_is_refused_naming_the_first() {
        let mut c = good();
        let mut a = container("a");
        a.ports = vec!["8080:80".into()];
        let mut b = container("b");
        b.ports = vec!["9090:90".into(), "8080:81/tcp".into()];
        c.machine.containers = vec![a, b];
        let err = NodeConfig::from_yaml(&c.to_yaml().expect("yaml")).expect_err("twice");
        let msg = err.to_string();
        assert!(msg.contains("machine.containers[1].ports[1]"), "{msg}");
        assert!(
            msg.contains("already published by container \"a\""),
            "{msg}"
        );
    }

    #[test]
    fn bad_container_fields_are_named() {
        type Spoil = Box<dyn Fn(&mut Container)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (
                Box::new(|c| c.name = "containerd".into()),
                "machine.containers[0].name",
            ),
            (
                Box::new(|c| c.image = "a b".into()),
                "machine.containers[0].image",
            ),
            (
                Box::new(|c| c.ports = vec!["80".into()]),
                "machine.containers[0].ports[0]",
            ),
            (
                Box::new(|c| {
                    c.network = ContainerNetwork::Host;
                    c.ports = vec!["80:80".into()];
                }),
                "machine.containers[0].ports[0]",
            ),
            (
                Box::new(|c| {
                    c.mounts = vec![ContainerMount {
                        source: "/etc".into(),
                        destination: "/x".into(),
                        read_only: false,
                    }]
                }),
                "machine.containers[0].mounts[0].source",
            ),
            (
                Box::new(|c| {
                    c.mounts = vec![ContainerMount {
                        source: "/var/lib/../../etc".into(),
                        destination: "/x".into(),
                        read_only: false,
                    }]
                }),
                "machine.containers[0].mounts[0].source",
            ),
            (
                Box::new(|c| {
                    c.mounts = vec![ContainerMount {
                        source: "/var/lib/containerd/io.containerd.content.v1.content".into(),
                        destination: "/x".into(),
                        read_only: true,
                    }]
                }),
                "machine.containers[0].mounts[0].source",
            ),
            (
                Box::new(|c| c.depends_on = vec!["ghost".into()]),
                "machine.containers[0].depends_on[0]",
            ),
            (
                Box::new(|c| c.environment = vec!["=x".into()]),
                "machine.containers[0].environment[0]",
            ),
        ];
        for (i, (bad, field)) in cases.into_iter().enumerate() {
            let mut c = good();
            let mut k = container("web");
            bad(&mut k);
            c.machine.containers = vec![k];
            assert_eq!(field_of(&c.to_yaml().expect("yaml")), field, "case {i}");
        }
        // A container may not take a service's name.
        let mut c = good();
        c.machine.services = vec![service("web", &[])];
        c.machine.containers = vec![container("web")];
        assert_eq!(
            field_of(&c.to_yaml().expect("yaml")),
            "machine.containers[0].name"
        );
        // Nor publish the API's port.
        let mut c = good();
        let mut k = container("web");
        k.ports = vec![format!("{}:80", c.machine.api.port)];
        c.machine.containers = vec![k];
        assert_eq!(field_of(&c.to_yaml().expect("yaml")), "machine.containers");
    }

    #[test]
    fn containerd_may_be_depended_on_but_not_defined() {
        let mut c = good();
        c.machine.services = vec![service("a", &["containerd"])];
        c.validate()
            .expect("a dependency on the runtime's containerd");
        c.machine.services = vec![service("containerd", &[])];
        assert_eq!(
            field_of(&c.to_yaml().expect("yaml")),
            "machine.services[0].name"
        );
    }

    #[test]
    fn an_environment_entry_must_be_key_equals_value() {
        let mut c = good();
        c.machine.services = vec![service("a", &[])];
        c.machine.services[0].environment = vec!["A_1=x=y".into(), "EMPTY=".into()];
        c.validate().expect("good entries");
        for bad in ["NOEQUALS", "=x", "1A=x", "A-B=x"] {
            c.machine.services[0].environment = vec!["OK=1".into(), bad.into()];
            assert_eq!(
                field_of(&c.to_yaml().expect("yaml")),
                "machine.services[0].environment[1]",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_dependency_cycle_is_refused() {
        let mut c = good();
        c.machine.services = vec![service("a", &["b"]), service("b", &["a"])];
        let err = NodeConfig::from_yaml(&c.to_yaml().expect("yaml")).expect_err("cycle");
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn a_relative_command_is_refused() {
        let mut c = good();
        c.machine.services = vec![service("a", &[])];
        c.machine.services[0].command = vec!["sleep".into()];
        assert_eq!(
            field_of(&c.to_yaml().expect("yaml")),
            "machine.services[0].command"
        );
    }

    #[test]
    fn a_trusted_key_that_is_not_hex_is_named() {
        let mut c = good();
        c.machine.upgrade.trusted_keys = vec!["nothex".into()];
        assert_eq!(
            field_of(&c.to_yaml().expect("yaml")),
            "machine.upgrade.trusted_keys[0]"
        );
    }

    #[test]
    fn the_api_port_defaults_to_50000() {
        let yaml = good()
            .to_yaml()
            .expect("yaml")
            .replace("    port: 50000\n", "");
        assert_eq!(
            NodeConfig::from_yaml(&yaml)
                .expect("parses")
                .machine
                .api
                .port,
            50000
        );
    }
}
