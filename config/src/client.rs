//! The client config (`plinthconfig`): named contexts, each with the node endpoints, the CA
//! that signs the nodes' API certificates, and this client's certificate and key.
//!
//! The default file is `$PLINTHCONFIG` or `~/.plinth/config`. `plinth gen config` writes a
//! fresh one; `plinth cluster create` merges a node's context into the default file and makes it
//! current.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{parse_yaml, ConfigError};

/// The whole client config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The current context's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// How to reach one node (or cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// `host[:port]` of the nodes' API.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) the server certificates must chain to.
    pub ca: String,
    /// Client certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// Client private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl ClientConfig {
    /// Where the client config lives unless told otherwise: `$PLINTHCONFIG`, else
    /// `~/.plinth/config`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("PLINTHCONFIG").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Path::new(&home).join(".plinth").join("config")
    }

    /// Parses a client config.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: ClientConfig = parse_yaml(text)?;
        if let Some(name) = &config.context {
            if !config.contexts.contains_key(name) {
                return Err(ConfigError::invalid(
                    "context",
                    format!("current context {name:?} is not among the contexts"),
                ));
            }
        }
        Ok(config)
    }

    /// Reads a client config; a missing file is an empty config.
    pub fn load_or_default(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_yaml(&text).map_err(|e| match e {
                ConfigError::Invalid { field, reason } => ConfigError::Invalid {
                    field: format!("{}: {field}", path.display()),
                    reason,
                },
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes the config, readable by its owner only (it holds a private key).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_norway::to_string(self).unwrap_or_default();
        write_private(path, text.as_bytes()).map_err(io)
    }

    /// The current context, or the named one.
    pub fn context(&self, name: Option<&str>) -> Result<(&str, &Context), ConfigError> {
        let name = match name.or(self.context.as_deref()) {
            Some(n) => n,
            None => {
                return Err(ConfigError::invalid(
                    "context",
                    "no context is set: run `plinth gen config` or `plinth cluster create`, or pass --config",
                ))
            }
        };
        self.contexts
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| ConfigError::invalid("context", format!("no context named {name:?}")))
    }

    /// Adds (or replaces) `other`'s contexts and makes `other`'s current context current.
    pub fn merge(&mut self, other: ClientConfig) {
        self.contexts.extend(other.contexts);
        if other.context.is_some() {
            self.context = other.context;
        }
    }
}

/// Writes `data` to `path` with mode 0600, replacing any existing file.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above applies only to a new file: an existing one, readable by others, is
    // made private before the secret goes in.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(ep: &str) -> Context {
        Context {
            endpoints: vec![ep.into()],
            ca: "ca".into(),
            cert: Some("c".into()),
            key: Some("k".into()),
        }
    }

    #[test]
    fn merge_adds_contexts_and_makes_the_new_one_current() {
        let mut a = ClientConfig {
            context: Some("one".into()),
            contexts: [("one".to_string(), ctx("10.0.0.1"))].into(),
        };
        let b = ClientConfig {
            context: Some("two".into()),
            contexts: [("two".to_string(), ctx("10.0.0.2"))].into(),
        };
        a.merge(b);
        assert_eq!(a.contexts.len(), 2);
        assert_eq!(a.context("two".into()).map(|c| c.0).ok(), Some("two"));
        assert_eq!(a.context(None).map(|(n, _)| n).ok(), Some("two"));
    }

    #[test]
    fn saved_config_reads_back_and_is_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub/config");
        let c = ClientConfig {
            context: Some("one".into()),
            contexts: [("one".to_string(), ctx("127.0.0.1:50000"))].into(),
        };
        c.save(&path).expect("save");
        assert_eq!(ClientConfig::load_or_default(&path).expect("load"), c);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_file_readable_by_others_is_made_private_before_it_is_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("key");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, b"secret").expect("write_private");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"secret");
    }

    #[test]
    fn a_missing_file_is_an_empty_config_and_asking_for_a_context_says_what_to_do() {
        let c = ClientConfig::load_or_default(Path::new("/nonexistent/plinth")).expect("empty");
        let err = c.context(None).expect_err("no context");
        assert!(err.to_string().contains("plinth gen config"), "{err}");
    }

    #[test]
    fn a_current_context_that_does_not_exist_is_refused() {
        let err = ClientConfig::from_yaml("context: x\ncontexts: {}\n").expect_err("refused");
        assert_eq!(err.field(), Some("context"));
    }
}
