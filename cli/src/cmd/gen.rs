//! `plinth gen config`: a CA, a node config and an admin client config.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use api::gen::{generate, GenOptions};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Gen {
    /// Generate a CA, a node config (node.yaml) and an admin client config (plinthconfig).
    Config {
        /// Node name (also the client context's name).
        name: String,
        /// How clients reach the node's API: IP[:PORT] (port 50000 by default).
        #[arg(long)]
        endpoint: String,
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
        /// Overwrite existing files.
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
}

fn write(path: &Path, data: &str, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists: pass --force to overwrite it", path.display());
    }
    config::client::write_private(path, data.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(g: Gen) -> anyhow::Result<()> {
    match g {
        Gen::SigningKey { output_dir, force } => {
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
        Gen::Config {
            name,
            endpoint,
            output_dir,
            interface,
            address,
            gateway,
            trusted_keys,
            force,
        } => {
            let (host, _) = api::client::split_endpoint(&endpoint)?;
            let address = address.or_else(|| match host.parse::<std::net::IpAddr>() {
                Ok(ip) if !ip.is_loopback() && ip.is_ipv4() => Some(format!("{ip}/24")),
                _ => None,
            });
            let generated = generate(&GenOptions {
                name,
                endpoint,
                interface,
                address,
                gateway,
                trusted_keys,
            })?;
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
                &generated.node.to_yaml(),
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
