//! containerd: where it keeps its state, its config, and a client for its API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::version_client::VersionClient;

/// The program the runtime extension installs.
pub const PROGRAM: &str = "/usr/local/bin/containerd";
/// The service's name in `plinth services`.
pub const SERVICE: &str = "containerd";
/// How long one API call may take before containerd counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its socket could not be reached.
    #[error("containerd does not answer on {socket}: {source}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call failed.
    #[error("containerd's {call} failed: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// What was asked is refused (an image without a name, a layer that unpacks to other
    /// content than its config says, a missing image).
    #[error("{0}")]
    Refused(String),
    /// A call took too long.
    #[error("containerd's {call} did not answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout {
        /// The RPC.
        call: &'static str,
    },
}

impl Error {
    /// containerd answered that the thing asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Call { status, .. } if status.code() == tonic::Code::NotFound)
    }
}

/// Where one containerd instance keeps things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containerd {
    /// Persistent data: content, snapshots, metadata (on EPHEMERAL, which a reset wipes).
    pub root: PathBuf,
    /// Runtime state; containerd's shims put their sockets under `/run/containerd` whatever
    /// this says, so it stays there.
    pub state: PathBuf,
    /// The gRPC socket.
    pub socket: PathBuf,
    /// The config machined writes for it.
    pub config: PathBuf,
}

impl Containerd {
    /// The node's one instance: data on EPHEMERAL (`var`), state and config on the `run` tmpfs.
    pub fn new(var: &Path, run: &Path) -> Self {
        Containerd {
            root: var.join("lib/containerd"),
            state: run.join("containerd"),
            socket: run.join("containerd/containerd.sock"),
            config: run.join("plinth/containerd.toml"),
        }
    }

    /// containerd's config file (format version 2, which containerd 1.6 and 1.7 read).
    ///
    /// The CRI plugin is off (there is no kubelet; machined drives containerd through its own
    /// API), and so are the snapshotters and tracing the node has no use for, so that their
    /// failing probes do not fill the log at every start.
    pub fn config_toml(&self) -> String {
        let q = |p: &Path| toml_string(&p.display().to_string());
        format!(
            "# Written by machined at every boot; changes here are lost.\n\
             version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [\n  \"io.containerd.grpc.v1.cri\",\n  \"io.containerd.snapshotter.v1.aufs\",\n  \
             \"io.containerd.snapshotter.v1.btrfs\",\n  \"io.containerd.snapshotter.v1.devmapper\",\n  \
             \"io.containerd.snapshotter.v1.zfs\",\n  \"io.containerd.tracing.processor.v1.otlp\",\n  \
             \"io.containerd.internal.v1.tracing\",\n]\n\
             \n\
             [grpc]\n  address = {socket}\n\
             \n\
             # Its default, /opt/containerd, is on the read-only root.\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = q(&self.root),
            state = q(&self.state),
            socket = q(&self.socket),
            opt = q(&self.root.join("opt")),
        )
    }

    /// The command that starts it.
    pub fn command(&self) -> Vec<String> {
        vec![
            PROGRAM.to_string(),
            "--config".to_string(),
            self.config.display().to_string(),
        ]
    }

    /// Its environment: the extension's programs first (containerd finds its shim and the
    /// shim finds runc through `PATH`; their libraries through their RUNPATH, set when the
    /// extension is built).
    pub fn environment() -> Vec<String> {
        vec!["PATH=/usr/local/bin:/usr/local/sbin:/sbin:/usr/sbin:/bin:/usr/bin".to_string()]
    }

    /// A connection to its API.
    pub async fn connect(&self) -> Result<tonic::transport::Channel, Error> {
        let connect = containerd_client::connect(&self.socket);
        match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(source)) => Err(Error::Connect {
                socket: self.socket.clone(),
                source,
            }),
            Err(_) => Err(Error::Timeout { call: "connect" }),
        }
    }

    /// Its version, asked through its API: the health check (a process that runs and a socket
    /// that accepts are not yet a containerd that serves).
    pub async fn version(&self) -> Result<String, Error> {
        let channel = self.connect().await?;
        let mut client = VersionClient::new(channel);
        match tokio::time::timeout(CALL_TIMEOUT, client.version(())).await {
            Ok(Ok(r)) => Ok(r.into_inner().version),
            Ok(Err(status)) => Err(Error::Call {
                call: "Version",
                status,
            }),
            Err(_) => Err(Error::Timeout { call: "Version" }),
        }
    }
}

/// A TOML basic string (paths here are machined's own, but quoting them keeps that true).
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_data_on_ephemeral_and_turns_cri_off() {
        let c = Containerd::new(Path::new("/var"), Path::new("/run"));
        let toml = c.config_toml();
        assert!(toml.contains("root = \"/var/lib/containerd\"\n"), "{toml}");
        assert!(toml.contains("state = \"/run/containerd\"\n"), "{toml}");
        assert!(
            toml.contains("address = \"/run/containerd/containerd.sock\"\n"),
            "{toml}"
        );
        assert!(toml.contains("\"io.containerd.grpc.v1.cri\""), "{toml}");
        assert!(
            toml.contains("path = \"/var/lib/containerd/opt\""),
            "{toml}"
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[tokio::test]
    async fn a_missing_socket_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Containerd::new(dir.path(), dir.path());
        let e = c.version().await.expect_err("nothing listens");
        assert!(
            e.to_string().contains("containerd.sock"),
            "the error names the socket: {e}"
        );
    }
}
