//! `plinth gen config`: a CA, a node config and an admin client config.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use api::gen::{generate, GenOptions};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Gen {
    /// Generate a CA, a node config (node.yaml) and an admin client config (plinthconfig); with
    /// --nodes, a cluster: one config per node (NAME-cp-1.yaml, NAME-worker-1.yaml, ...), etcd's
    /// CA and certificates, and a client config for every node.
    Config {
        /// Node name (also the client context's name); with --nodes, the cluster's name.
        name: String,
        /// How clients reach the node's API: IP[:PORT] (port 50000 by default); with --nodes,
        /// the first node's, the others' addresses following it (.2, .3, ...).
        #[arg(long)]
        endpoint: String,
        /// With --nodes N (the global flag, here a count): how many of the N nodes are control
        /// planes (etcd members; an odd number keeps quorum through one loss).
        #[arg(long, default_value_t = 1)]
        control_planes: u16,
        /// With --nodes N: the cluster's network prefix length (addresses are IP/PREFIX).
        #[arg(long, default_value_t = 24)]
        prefix: u8,
        /// Directory to write into.
        #[arg(short = 'o', long = "output-dir", default_value = ".")]
        output_dir: PathBuf,
        /// The node's network interface.
        #[arg(long, default_value = "eth0")]
        interface: String,
        /// The node's address with prefix (default: the endpoint's IP/24, unless it is loopback).
        #[arg(long)]
        address: Option<String>,
        /// The node's default gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Accept upgrade bundles signed by this public key (hex; repeatable).
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
        /// Install on this disk when the node boots from installer media (e.g. /dev/nvme0n1).
        #[arg(long)]
        install_disk: Option<String>,
        /// Install even over a disk that holds data or another install (it is lost).
        #[arg(long, requires = "install_disk")]
        install_wipe: bool,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Generate a client config with its own certificate and role, signed by the CA that
    /// `gen config` wrote, for the same nodes as an existing client config.
    Client {
        /// The holder's name (certificate common name).
        #[arg(long)]
        name: String,
        /// os:admin, os:operator or os:reader.
        #[arg(long)]
        role: String,
        /// The secrets directory `gen config` wrote (ca.crt, ca.key).
        #[arg(long, default_value = "secrets")]
        secrets: PathBuf,
        /// The client config whose contexts (endpoints, CA) to reuse (default: the one in use).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The client config to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// Overwrite it if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Generate an ed25519 key to sign upgrade bundles (signing.key, PEM) and print its public
    /// half (signing.pub, hex), which nodes list in machine.upgrade.trusted_keys.
    SigningKey {
        /// Directory to write into.
        #[arg(short = 'o', long = "output-dir", default_value = ".")]
        output_dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Generate UEFI Secure Boot keys: PK, KEK and db (RSA-2048 keys and certificates), the
    /// signed signature lists a firmware enrols (PK.auth, KEK.auth, db.auth), and the key that
    /// signs PCR 11 policies for TPM-sealed disks. `plinth image build --secureboot-keys DIR`
    /// signs UKIs with db's key; installer media enrol the lists on a machine in Setup Mode.
    SecurebootKeys {
        /// Directory to write into (keys already there are never replaced).
        #[arg(short = 'o', long = "output-dir")]
        output_dir: PathBuf,
        /// Name in the certificates (e.g. the cluster's).
        #[arg(long, default_value = "Plinth")]
        name: String,
    },
}

fn write(path: &Path, data: &str, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists: pass --force to overwrite it", path.display());
    }
    config::client::write_private(path, data.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// `gen config --nodes N`: the global `-n/--nodes` names nodes to call everywhere else; here
/// it says how many to generate.
fn cluster_size(nodes: &[String]) -> anyhow::Result<Option<u16>> {
    match nodes {
        [] => Ok(None),
        [n] => match n.parse::<u16>() {
            Ok(n @ 1..=250) => Ok(Some(n)),
            _ => bail!("--nodes {n:?}: gen config takes how many nodes to generate, 1 to 250"),
        },
        _ => bail!("--nodes: gen config takes one number, how many nodes to generate"),
    }
}

pub fn run(g: Gen, nodes: &[String]) -> anyhow::Result<()> {
    let size = match &g {
        Gen::Config { .. } => cluster_size(nodes)?,
        _ => None,
    };
    match (g, size) {
        (
            Gen::Client {
                name,
                role,
                secrets,
                from,
                out,
                force,
            },
            _,
        ) => {
            let role: api::Role = role.parse()?;
            let read = |f: &str| {
                let p = secrets.join(f);
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
            };
            let ca = api::pki::Ca(api::pki::Identity {
                cert_pem: read("ca.crt")?,
                key_pem: read("ca.key")?,
            });
            let id = ca.issue_client(&api::pki::ClientSpec::new(&name, role))?;
            let from = from.unwrap_or_else(config::ClientConfig::default_path);
            let mut cfg = config::ClientConfig::load_or_default(&from)?;
            if cfg.contexts.is_empty() {
                bail!("{} has no contexts to take endpoints from", from.display());
            }
            for ctx in cfg.contexts.values_mut() {
                ctx.cert = Some(id.cert_pem.clone());
                ctx.key = Some(id.key_pem.clone());
            }
            if out.exists() && !force {
                bail!("{} exists: pass --force to overwrite it", out.display());
            }
            cfg.save(&out)?;
            println!("wrote {} for {name} with role {role}", out.display());
            Ok(())
        }
        (Gen::SecurebootKeys { output_dir, name }, _) => {
            let keys = imager::secureboot::generate(&output_dir, &name)?;
            println!(
                "wrote Secure Boot keys for {name:?} to {}",
                keys.dir.display()
            );
            for var in imager::secureboot::ENROL_ORDER {
                println!(
                    "  {var:<4} {} (key {}, enrolled from {})",
                    keys.cert(var).display(),
                    keys.key(var).display(),
                    keys.auth(var).display()
                );
            }
            println!("  PCR policy signing key {}", keys.pcr_key().display());
            println!("keep the .key files secret: whoever holds db.key can sign what these machines boot");
            Ok(())
        }
        (Gen::SigningKey { output_dir, force }, _) => {
            std::fs::create_dir_all(&output_dir)
                .with_context(|| format!("creating {}", output_dir.display()))?;
            let key = upgrade::bundle::generate_key()?;
            let public = upgrade::bundle::public_hex(&key.verifying_key());
            write(
                &output_dir.join("signing.key"),
                &upgrade::bundle::key_to_pem(&key)?,
                force,
            )?;
            write(
                &output_dir.join("signing.pub"),
                &format!("{public}\n"),
                force,
            )?;
            eprintln!(
                "wrote {} and {}",
                output_dir.join("signing.key").display(),
                output_dir.join("signing.pub").display()
            );
            println!("{public}");
            Ok(())
        }
        (
            Gen::Config {
                name,
                endpoint,
                control_planes,
                prefix,
                output_dir,
                interface,
                gateway,
                trusted_keys,
                install_disk,
                install_wipe,
                force,
                address,
            },
            Some(nodes),
        ) => {
            if address.is_some() {
                bail!("--address is for one node; with --nodes the addresses follow --endpoint");
            }
            let opts = cluster_options(ClusterArgs {
                cluster: &name,
                endpoint: &endpoint,
                nodes,
                control_planes,
                prefix,
                interface,
                gateway,
                trusted_keys,
            })?;
            let mut generated = api::gen::generate_cluster(&opts)?;
            if let Some(disk) = install_disk {
                for node in &mut generated.nodes {
                    node.machine.install = Some(config::node::Install {
                        disk: disk.clone(),
                        wipe: install_wipe,
                    });
                    node.validate()?;
                }
            }
            std::fs::create_dir_all(output_dir.join("secrets"))
                .with_context(|| format!("creating {}", output_dir.display()))?;
            let mut files: Vec<(String, String)> = vec![
                ("secrets/ca.crt".into(), generated.ca.cert_pem().into()),
                ("secrets/ca.key".into(), generated.ca.0.key_pem.clone()),
                (
                    "secrets/etcd-ca.crt".into(),
                    generated.etcd_ca.cert_pem().into(),
                ),
                (
                    "secrets/etcd-ca.key".into(),
                    generated.etcd_ca.0.key_pem.clone(),
                ),
            ];
            for node in &generated.nodes {
                files.push((format!("{}.yaml", node.machine.name), node.to_yaml()?));
            }
            let client_path = output_dir.join("plinthconfig");
            // Every file is checked before any is written: a refusal leaves nothing half made.
            for path in files
                .iter()
                .map(|(f, _)| output_dir.join(f))
                .chain([client_path.clone()])
            {
                if path.exists() && !force {
                    bail!("{} exists: pass --force to overwrite it", path.display());
                }
            }
            for (f, data) in &files {
                write(&output_dir.join(f), data, true)?;
                println!("wrote {}", output_dir.join(f).display());
            }
            generated.client.save(&client_path)?;
            println!("wrote {}", client_path.display());
            Ok(())
        }
        (
            Gen::Config {
                name,
                endpoint,
                output_dir,
                interface,
                address,
                gateway,
                trusted_keys,
                install_disk,
                install_wipe,
                force,
                ..
            },
            None,
        ) => {
            let (host, _) = api::client::split_endpoint(&endpoint)?;
            let address = address.or_else(|| match host.parse::<std::net::IpAddr>() {
                Ok(ip) if !ip.is_loopback() && ip.is_ipv4() => Some(format!("{ip}/24")),
                _ => None,
            });
            let mut generated = generate(&GenOptions {
                name,
                endpoint,
                interface,
                address,
                gateway,
                trusted_keys,
            })?;
            if let Some(disk) = install_disk {
                generated.node.machine.install = Some(config::node::Install {
                    disk,
                    wipe: install_wipe,
                });
                generated.node.validate()?;
            }
            std::fs::create_dir_all(output_dir.join("secrets"))
                .with_context(|| format!("creating {}", output_dir.display()))?;
            write(
                &output_dir.join("secrets/ca.crt"),
                generated.ca.cert_pem(),
                force,
            )?;
            write(
                &output_dir.join("secrets/ca.key"),
                &generated.ca.0.key_pem,
                force,
            )?;
            write(
                &output_dir.join("node.yaml"),
                &generated.node.to_yaml()?,
                force,
            )?;
            let client_path = output_dir.join("plinthconfig");
            if client_path.exists() && !force {
                bail!(
                    "{} exists: pass --force to overwrite it",
                    client_path.display()
                );
            }
            generated.client.save(&client_path)?;
            for f in [
                "secrets/ca.crt",
                "secrets/ca.key",
                "node.yaml",
                "plinthconfig",
            ] {
                println!("wrote {}", output_dir.join(f).display());
            }
            Ok(())
        }
    }
}

/// What `gen config --nodes` was given.
struct ClusterArgs<'a> {
    cluster: &'a str,
    endpoint: &'a str,
    nodes: u16,
    control_planes: u16,
    prefix: u8,
    interface: String,
    gateway: Option<String>,
    trusted_keys: Vec<String>,
}

/// The cluster's nodes: control planes first (`CLUSTER-cp-N`), then workers
/// (`CLUSTER-worker-N`), at consecutive IPv4 addresses from the endpoint's.
fn cluster_options(a: ClusterArgs<'_>) -> anyhow::Result<api::gen::ClusterOptions> {
    use config::MachineType;
    if a.control_planes == 0 || a.control_planes > a.nodes {
        bail!(
            "--control-planes {} with --nodes {}: a cluster has between one control plane and \
             all of its nodes",
            a.control_planes,
            a.nodes
        );
    }
    let (host, port) = api::client::split_endpoint(a.endpoint)?;
    let first: std::net::Ipv4Addr = host.parse().map_err(|_| {
        anyhow::anyhow!(
            "--endpoint {host:?}: a cluster's nodes are numbered from an IPv4 address \
             (e.g. 10.5.0.2)"
        )
    })?;
    if a.prefix > 30 {
        bail!("--prefix {}: too long for a network of nodes", a.prefix);
    }
    let net = ipnet::Ipv4Net::new(first, a.prefix)?.trunc();
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        let ip = u32::from(first)
            .checked_add(u32::from(i))
            .map(std::net::Ipv4Addr::from)
            .filter(|ip| net.contains(ip) && *ip != net.broadcast())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} nodes from {first} do not fit in {net}: pick a lower first address or a \
                     shorter --prefix",
                    a.nodes
                )
            })?;
        let (machine_type, name) = if i < a.control_planes {
            (
                MachineType::Controlplane,
                format!("{}-cp-{}", a.cluster, i + 1),
            )
        } else {
            (
                MachineType::Worker,
                format!("{}-worker-{}", a.cluster, i - a.control_planes + 1),
            )
        };
        nodes.push(api::gen::ClusterNode {
            name,
            machine_type,
            address: format!("{ip}/{}", a.prefix),
            endpoint: format!("{ip}:{port}"),
            etcd_ports: (config::node::ETCD_CLIENT_PORT, config::node::ETCD_PEER_PORT),
        });
    }
    Ok(api::gen::ClusterOptions {
        cluster: a.cluster.into(),
        nodes,
        interface: a.interface,
        gateway: a.gateway,
        trusted_keys: a.trusted_keys,
    })
}
