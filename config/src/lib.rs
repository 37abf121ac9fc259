//! Plinth's configuration documents.
//!
//! - [`NodeConfig`]: what a node is (name, network, API identity). It lives as YAML on the STATE
//!   partition and is read by machined during boot.
//! - [`ClientConfig`]: what an operator's `plinth` needs to reach nodes (`plinthconfig`):
//!   named contexts, each with endpoints, the CA and a client certificate.
//!
//! Parsing is strict (unknown fields are errors) and every error names the field at fault, as a
//! path such as `machine.network.interfaces[0].addresses[1]`.
#![warn(missing_docs)]

pub mod client;
pub mod node;

pub use client::{ClientConfig, Context};
pub use node::{
    ApiConfig, CertKey, Cluster, ClusterMember, Container, ContainerMount, ContainerNetwork,
    Encryption, EtcdPki, HealthCheck, Interface, Machine, MachineType, Network, NodeConfig,
    RestartPolicy, Service, Upgrade, WithoutTpm, RUNTIME_SERVICE,
};

/// A configuration document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML is malformed or does not match the schema.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the offending field (`.` for the document itself).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The path of the field at fault, if the error is about a field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Io { .. } => None,
        }
    }
}

/// Parses YAML into `T`, reporting the path of the field at fault.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ConfigError::invalid(if path.is_empty() { ".".into() } else { path }, inner)
    })
}
