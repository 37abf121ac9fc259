//! What `plinth gen config` makes: a CA, a node config whose API identity it signs, and an
//! admin client config for the node's endpoint.

use config::node::{ApiConfig, Interface, Machine, Network, NodeConfig, VERSION};
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
}

/// Generates a CA, a node config and an admin client config.
pub fn generate(opts: &GenOptions) -> Result<Generated, GenError> {
    let (host, port) = split_endpoint(&opts.endpoint)?;
    let ca = Ca::generate(&opts.name)?;
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
    let node = NodeConfig {
        version: VERSION.into(),
        machine: Machine {
            name: opts.name.clone(),
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
    };
    node.validate()?;
    let admin = ca.issue_client(&ClientSpec::new("admin", Role::Admin))?;
    let endpoint = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let client = ClientConfig {
        context: Some(opts.name.clone()),
        contexts: [(
            opts.name.clone(),
            Context {
                endpoints: vec![endpoint],
                ca: ca.cert_pem().into(),
                cert: Some(admin.cert_pem),
                key: Some(admin.key_pem),
            },
        )]
        .into(),
    };
    Ok(Generated { ca, node, client })
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
