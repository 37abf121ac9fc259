//! Which node to talk to and how: the client config, its context, endpoint overrides.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _};
use api::proto::machine_client::MachineClient;
use config::ClientConfig;
use tonic::transport::Channel;

/// Where the global flags point.
#[derive(Debug, Clone)]
pub struct Target {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// `-e/--endpoints`.
    pub endpoints: Vec<String>,
    /// `-n/--nodes`: the nodes to call, each at its own endpoint.
    pub nodes: Vec<String>,
}

impl Target {
    /// The client config file in use.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(ClientConfig::default_path)
    }

    /// Connects to the first endpoint of the selected context.
    pub async fn connect(&self) -> anyhow::Result<(String, MachineClient<Channel>)> {
        self.connect_as(false).await
    }

    /// Like [`Self::connect`], for a call with no time limit (an upgrade: the node bounds it).
    pub async fn connect_long(&self) -> anyhow::Result<(String, MachineClient<Channel>)> {
        self.connect_as(true).await
    }

    /// The selected context (its CA and client certificate serve every node it names).
    pub fn context(&self) -> anyhow::Result<config::Context> {
        let path = self.config_path();
        let cfg = ClientConfig::load_or_default(&path)?;
        let (_, ctx) = cfg
            .context(self.context.as_deref())
            .with_context(|| format!("client config {}", path.display()))?;
        Ok(ctx.clone())
    }

    async fn connect_as(&self, long: bool) -> anyhow::Result<(String, MachineClient<Channel>)> {
        let path = self.config_path();
        let cfg = ClientConfig::load_or_default(&path)?;
        let (name, ctx) = cfg
            .context(self.context.as_deref())
            .with_context(|| format!("client config {}", path.display()))?;
        let endpoints = if self.endpoints.is_empty() {
            &ctx.endpoints
        } else {
            &self.endpoints
        };
        let endpoint = endpoints
            .first()
            .ok_or_else(|| anyhow!("context {name:?} has no endpoints: pass -e/--endpoints"))?
            .clone();
        let client = if long {
            api::client::connect_context_long(&endpoint, ctx).await?
        } else {
            api::client::connect_context(&endpoint, ctx).await?
        };
        Ok((endpoint, client))
    }
}

impl Target {
    /// The endpoint for a node in maintenance mode: the first `-e`, which `--insecure` needs
    /// (such a node has no context yet).
    pub fn insecure_endpoint(&self) -> anyhow::Result<String> {
        self.endpoints.first().cloned().ok_or_else(|| {
            anyhow!(
                "--insecure needs -e/--endpoints (a node in maintenance mode has no context yet)"
            )
        })
    }
}

/// A failed call as an error with the status in words.
pub fn status_error(endpoint: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{endpoint}: {}", api::client::describe_status(&status))
}
