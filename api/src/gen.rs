//! What `plinth gen config` makes: a CA, a node config whose API identity it signs, and an
//! admin client config for the node's endpoint; or, for a cluster, the same for every node,
//! with etcd's own CA and certificates.

use config::node::{
    ApiConfig, CertKey, Cluster, ClusterMember, EtcdPki, Interface, Machine, MachineType, Network,
    NodeConfig, VERSION,
};
use config::{ClientConfig, Context};

use crate::client::split_endpoint;
use crate::pki::{Ca, ClientSpec, PkiError};
use crate::role::Role;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Node (and context) name.
    pub name: String,
    /// How clients reach the node: `host[:port]`.
    pub endpoint: String,
    /// The node's interface.
    pub interface: String,
    /// The node's address with prefix (`10.0.2.15/24`); `None` leases one over DHCP.
    pub address: Option<String>,
    /// The node's default gateway.
    pub gateway: Option<String>,
    /// Public keys (hex) whose signed bundles the node accepts.
    pub trusted_keys: Vec<String>,
}

/// The generated documents.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The CA (keep its key: it signs more clients later).
    pub ca: Ca,
    /// The node config.
    pub node: NodeConfig,
    /// The admin client config, with one context named after the node.
    pub client: ClientConfig,
}

/// Generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// Bad endpoint.
    #[error(transparent)]
    Endpoint(#[from] crate::client::ClientError),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The result does not validate (bad name, address, ...).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// One node's config of a cluster does not validate.
    #[error("node {node}: {source}")]
    Node {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: config::ConfigError,
    },
}

/// Generates a CA, a node config and an admin client config.
pub fn generate(opts: &GenOptions) -> Result<Generated, GenError> {
    let ca = Ca::generate(&opts.name)?;
    let node = node_config(&ca, opts)?;
    node.validate()?;
    let client = admin_client(&ca, &opts.name, &[opts.endpoint.as_str()])?;
    Ok(Generated { ca, node, client })
}

/// The config of one node whose API identity `ca` signs.
fn node_config(ca: &Ca, opts: &GenOptions) -> Result<NodeConfig, GenError> {
    let (host, _) = split_endpoint(&opts.endpoint)?;
    let mut sans = vec![
        host.clone(),
        opts.name.clone(),
        "127.0.0.1".into(),
        "::1".into(),
        "localhost".into(),
    ];
    if let Some(ip) = opts.address.as_deref().and_then(|a| a.split('/').next()) {
        sans.push(ip.to_string());
    }
    sans.dedup();
    let server = ca.issue_server(&opts.name, &sans)?;
    Ok(NodeConfig {
        version: VERSION.into(),
        machine: Machine {
            name: opts.name.clone(),
            machine_type: Default::default(),
            network: Network {
                interfaces: vec![Interface {
                    name: opts.interface.clone(),
                    addresses: opts.address.iter().cloned().collect(),
                    gateway: opts.gateway.clone(),
                    // No static address: lease one.
                    dhcp: opts.address.is_none(),
                }],
            },
            api: ApiConfig {
                // The node listens on the default port; the endpoint's port may be a forward.
                port: config::node::DEFAULT_API_PORT,
                ca: ca.cert_pem().into(),
                cert: server.cert_pem,
                key: server.key_pem,
            },
            services: Vec::new(),
            containers: Vec::new(),
            upgrade: config::Upgrade {
                trusted_keys: opts.trusted_keys.clone(),
                ..Default::default()
            },
            install: None,
            encryption: Default::default(),
        },
        cluster: None,
    })
}

/// An admin client config with one context, `name`, for these endpoints.
fn admin_client(ca: &Ca, name: &str, endpoints: &[&str]) -> Result<ClientConfig, GenError> {
    let admin = ca.issue_client(&ClientSpec::new("admin", Role::Admin))?;
    let endpoints = endpoints
        .iter()
        .map(|e| {
            let (host, port) = split_endpoint(e)?;
            Ok(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            })
        })
        .collect::<Result<Vec<_>, GenError>>()?;
    Ok(ClientConfig {
        context: Some(name.into()),
        contexts: [(
            name.into(),
            Context {
                endpoints,
                ca: ca.cert_pem().into(),
                cert: Some(admin.cert_pem),
                key: Some(admin.key_pem),
            },
        )]
        .into(),
    })
}

/// One node of a cluster to generate.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// Its name.
    pub name: String,
    /// Control plane or worker.
    pub machine_type: MachineType,
    /// Its address with prefix (`10.5.0.2/24`): its API's and, on a control plane, etcd's.
    pub address: String,
    /// How clients reach its API (`host[:port]`; a forward in a local cluster).
    pub endpoint: String,
    /// etcd's client and peer ports on a control plane (2379 and 2380; simulated nodes
    /// sharing one address need their own).
    pub etcd_ports: (u16, u16),
}

/// What to generate for a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The cluster's name (the client context's too).
    pub cluster: String,
    /// Its nodes.
    pub nodes: Vec<ClusterNode>,
    /// The nodes' interface.
    pub interface: String,
    /// The nodes' default gateway.
    pub gateway: Option<String>,
    /// Public keys (hex) whose signed bundles the nodes accept.
    pub trusted_keys: Vec<String>,
}

/// The generated documents for a cluster.
#[derive(Debug, Clone)]
pub struct GeneratedCluster {
    /// The API's CA (signs clients later).
    pub ca: Ca,
    /// etcd's CA (signs new members later).
    pub etcd_ca: Ca,
    /// One config per node, in the order asked.
    pub nodes: Vec<NodeConfig>,
    /// The admin client config: one context, named after the cluster, with every node's
    /// endpoint.
    pub client: ClientConfig,
}

/// Generates a cluster: the API's CA and etcd's, one node config each (an etcd member
/// certificate for each control-plane node's name and address, an etcd client certificate for
/// every node's machined), and an admin client config for all of them.
pub fn generate_cluster(opts: &ClusterOptions) -> Result<GeneratedCluster, GenError> {
    let ca = Ca::generate(&opts.cluster)?;
    let etcd_ca = Ca::generate_named(&format!("plinth etcd CA {}", opts.cluster))?;
    let ip = |n: &ClusterNode| n.address.split('/').next().unwrap_or_default().to_string();
    let controlplanes: Vec<ClusterMember> = opts
        .nodes
        .iter()
        .filter(|n| n.machine_type == MachineType::Controlplane)
        .map(|n| ClusterMember {
            name: n.name.clone(),
            address: ip(n),
            client_port: n.etcd_ports.0,
            peer_port: n.etcd_ports.1,
        })
        .collect();
    let mut nodes = Vec::new();
    for n in &opts.nodes {
        let mut node = node_config(
            &ca,
            &GenOptions {
                name: n.name.clone(),
                endpoint: n.endpoint.clone(),
                interface: opts.interface.clone(),
                address: Some(n.address.clone()),
                gateway: opts.gateway.clone(),
                trusted_keys: opts.trusted_keys.clone(),
            },
        )?;
        node.machine.machine_type = n.machine_type;
        let member = if n.machine_type == MachineType::Controlplane {
            let mut sans = vec![
                ip(n),
                n.name.clone(),
                "127.0.0.1".into(),
                "localhost".into(),
            ];
            sans.dedup();
            let id = etcd_ca.issue_member(&n.name, &sans)?;
            Some(CertKey {
                cert: id.cert_pem,
                key: id.key_pem,
            })
        } else {
            None
        };
        let mut client = ClientSpec::new(&format!("machined {}", n.name), Role::Admin);
        // etcd reads no role; like the node's own certificates, it is not rotated yet.
        client.organization = None;
        client.not_after = client.not_before + time::Duration::days(3650);
        let client = etcd_ca.issue_client(&client)?;
        node.cluster = Some(Cluster {
            name: opts.cluster.clone(),
            controlplanes: controlplanes.clone(),
            etcd: EtcdPki {
                ca: etcd_ca.cert_pem().into(),
                member,
                client: CertKey {
                    cert: client.cert_pem,
                    key: client.key_pem,
                },
            },
        });
        node.validate().map_err(|source| GenError::Node {
            node: n.name.clone(),
            source,
        })?;
        nodes.push(node);
    }
    let endpoints: Vec<&str> = opts.nodes.iter().map(|n| n.endpoint.as_str()).collect();
    let client = admin_client(&ca, &opts.cluster, &endpoints)?;
    Ok(GeneratedCluster {
        ca,
        etcd_ca,
        nodes,
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_configs_validate_and_point_at_the_endpoint() {
        let g = generate(&GenOptions {
            name: "node-1".into(),
            endpoint: "127.0.0.1:40123".into(),
            interface: "eth0".into(),
            address: Some("10.0.2.15/24".into()),
            gateway: Some("10.0.2.2".into()),
            trusted_keys: vec![],
        })
        .expect("generate");
        assert!(config::NodeConfig::from_yaml(&g.node.to_yaml().expect("yaml")).is_ok());
        let (name, ctx) = g.client.context(None).expect("context");
        assert_eq!(name, "node-1");
        assert_eq!(ctx.endpoints, ["127.0.0.1:40123"]);
    }

    fn cluster(cps: usize, workers: usize) -> ClusterOptions {
        let node = |name: String, kind, i: usize| ClusterNode {
            name,
            machine_type: kind,
            address: format!("10.5.0.{}/24", 2 + i),
            endpoint: format!("10.5.0.{}", 2 + i),
            etcd_ports: (2379, 2380),
        };
        let mut nodes: Vec<ClusterNode> = (0..cps)
            .map(|i| node(format!("cp-{}", i + 1), MachineType::Controlplane, i))
            .collect();
        nodes.extend(
            (0..workers).map(|i| node(format!("worker-{}", i + 1), MachineType::Worker, cps + i)),
        );
        ClusterOptions {
            cluster: "prod".into(),
            nodes,
            interface: "eth0".into(),
            gateway: Some("10.5.0.1".into()),
            trusted_keys: vec![],
        }
    }

    #[test]
    fn a_cluster_gets_one_config_per_node_and_etcd_certificates_for_its_control_planes() {
        let g = generate_cluster(&cluster(3, 2)).expect("generate");
        assert_eq!(g.nodes.len(), 5);
        assert_ne!(g.ca.cert_pem(), g.etcd_ca.cert_pem());
        for node in &g.nodes {
            let yaml = node.to_yaml().expect("yaml");
            let back = config::NodeConfig::from_yaml(&yaml).expect("parses and validates");
            let c = back.cluster.as_ref().expect("cluster section");
            assert_eq!(c.name, "prod");
            let names: Vec<&str> = c.controlplanes.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names, ["cp-1", "cp-2", "cp-3"]);
            assert_eq!(c.controlplanes[1].address, "10.5.0.3");
            assert_eq!(c.etcd.ca, g.etcd_ca.cert_pem());
            let cp = back.machine.machine_type == MachineType::Controlplane;
            assert_eq!(cp, back.machine.name.starts_with("cp-"));
            assert_eq!(c.etcd.member.is_some(), cp, "{}", back.machine.name);
            assert_eq!(back.machine.api.ca, g.ca.cert_pem());
        }
        let (name, ctx) = g.client.context(None).expect("context");
        assert_eq!(name, "prod");
        assert_eq!(ctx.endpoints.len(), 5);
        assert_eq!(ctx.endpoints[4], "10.5.0.6:50000");
    }

    #[test]
    fn a_cluster_node_that_cannot_be_configured_is_named() {
        let mut opts = cluster(1, 1);
        opts.nodes[1].name = "bad name".into();
        let err = generate_cluster(&opts).expect_err("refused").to_string();
        assert!(
            err.contains("bad name") && err.contains("machine.name"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_node_name_is_refused() {
        let err = generate(&GenOptions {
            name: "bad name".into(),
            endpoint: "10.0.0.1".into(),
            interface: "eth0".into(),
            address: None,
            gateway: None,
            trusted_keys: vec![],
        })
        .expect_err("refused");
        assert!(err.to_string().contains("machine.name"), "{err}");
    }
}
