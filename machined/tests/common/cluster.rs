//! Simulated nodes of one generated cluster, and the `plinth` CLI run against them with the
//! cluster's client config (the fan-out, etcd and health tests, and the fan-out benchmark).

use std::path::{Path, PathBuf};
use std::process::Command;

use api::gen::{generate_cluster, ClusterNode, ClusterOptions, GeneratedCluster};
use config::MachineType;

use super::{free_port, start_configured_with, SimNode};

/// What cluster to start.
pub struct Spec {
    /// The cluster's name.
    pub name: &'static str,
    /// Control planes (`cp-1`, ...), first.
    pub controlplanes: usize,
    /// Workers (`worker-1`, ...).
    pub workers: usize,
    /// Whether the control planes run etcd: the host's etcd in each machine's `usr-local`,
    /// every member on 127.0.0.1 with its own two ports. Otherwise addresses 10.5.0.2, ...
    /// and etcd's usual ports (nothing listens on them).
    pub etcd: bool,
    /// Services for every node's config.
    pub services: Vec<config::Service>,
    /// A last word on each node's config (every node trusts [`super::signing_key`]'s
    /// bundles already).
    pub tweak: Box<dyn Fn(&mut config::NodeConfig)>,
}

/// A [`Spec::tweak`] that changes nothing.
pub fn as_generated() -> Box<dyn Fn(&mut config::NodeConfig)> {
    Box::new(|_| {})
}

/// The nodes of `spec`, each with a free API port on 127.0.0.1.
pub fn nodes(spec: &Spec) -> Vec<ClusterNode> {
    (0..spec.controlplanes + spec.workers)
        .map(|i| {
            let cp = i < spec.controlplanes;
            ClusterNode {
                name: if cp {
                    format!("cp-{}", i + 1)
                } else {
                    format!("worker-{}", i - spec.controlplanes + 1)
                },
                machine_type: if cp {
                    MachineType::Controlplane
                } else {
                    MachineType::Worker
                },
                address: if spec.etcd {
                    "127.0.0.1/8".into()
                } else {
                    format!("10.5.0.{}/24", i + 2)
                },
                endpoint: format!("127.0.0.1:{}", free_port()),
                etcd_ports: if spec.etcd {
                    (free_port(), free_port())
                } else {
                    (2379, 2380)
                },
            }
        })
        .collect()
}

/// A running simulated cluster.
pub struct SimCluster {
    /// Its nodes, in the order of [`nodes`].
    pub nodes: Vec<SimNode>,
    /// What was generated (configs, CAs, the client config).
    pub generated: GeneratedCluster,
    config: tempfile::TempDir,
}

impl SimCluster {
    /// Generates the cluster's configs and starts every node.
    pub fn start(spec: Spec) -> SimCluster {
        let specs = nodes(&spec);
        let generated = generate_cluster(&ClusterOptions {
            cluster: spec.name.into(),
            nodes: specs.clone(),
            interface: "eth0".into(),
            gateway: None,
            trusted_keys: vec![],
        })
        .expect("cluster configs");
        let etcd = spec.etcd;
        let ctx = generated.client.context(None).expect("context").1.clone();
        let nodes = generated
            .nodes
            .iter()
            .zip(&specs)
            .map(|(n, s)| {
                let mut n = n.clone();
                n.machine.services = spec.services.clone();
                n.machine.upgrade.trusted_keys = vec![upgrade::bundle::public_hex(
                    &super::signing_key().verifying_key(),
                )];
                (spec.tweak)(&mut n);
                start_configured_with(
                    &n,
                    s.endpoint.clone(),
                    ctx.clone(),
                    generated.ca.clone(),
                    |m| {
                        if etcd {
                            provision::sim::link_host_etcd(m)
                                .expect("linking etcd")
                                .expect(
                                    "etcd is missing: apt-get install etcd-server (./x test does)",
                                );
                        }
                    },
                )
            })
            .collect();
        let config = tempfile::tempdir().expect("tmp");
        generated
            .client
            .save(&config.path().join("plinthconfig"))
            .expect("client config");
        SimCluster {
            nodes,
            generated,
            config,
        }
    }

    /// The client config file.
    pub fn client_config(&self) -> PathBuf {
        self.config.path().join("plinthconfig")
    }

    /// Every node's endpoint, comma-separated (for `-n`).
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.endpoint.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs the CLI with the cluster's client config: (succeeded, stdout, stderr).
    pub fn plinth(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(plinth_cli())
            .env("PLINTHCONFIG", self.client_config())
            .args(args)
            .output()
            .expect("running plinth");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The `plinth` CLI built from this workspace.
pub fn plinth_cli() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/plinth");
    assert!(
        p.is_file(),
        "{} is missing: build it with cargo build -p cli (./x test does)",
        p.display()
    );
    p
}

/// Runs Debian's `etcdctl` against the cluster with a node's etcd client certificate:
/// (succeeded, stdout and stderr).
pub fn etcdctl(cluster: &config::node::Cluster, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let endpoints: Vec<String> = cluster
        .controlplanes
        .iter()
        .map(|m| m.client_url())
        .collect();
    provision::etcdctl::etcdctl(cluster, &endpoints, dir.path(), args)
}
