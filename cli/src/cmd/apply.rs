//! `plinth apply-config`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use api::proto::{ApplyConfigurationRequest, ApplyMode};

use crate::connect::{status_error, Target};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Apply what can be applied live; the rest at the next boot.
    NoReboot,
    /// Write the config and reboot.
    Reboot,
    /// Apply live and go back by itself after --timeout unless confirmed.
    Try,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node config (YAML).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Talk to a node in maintenance mode: no client certificate, the node's self-signed
    /// certificate accepted.
    #[arg(long)]
    insecure: bool,
    /// With --insecure: only accept the node certificate with this SHA-256 (as the node's
    /// console prints it).
    #[arg(long)]
    cert_fingerprint: Option<String>,
    /// How to apply it on a running node.
    #[arg(long, value_enum, default_value_t = Mode::NoReboot)]
    mode: Mode,
    /// With --mode try: seconds before the node goes back to its old config.
    #[arg(long, default_value_t = 60)]
    timeout: u32,
    /// Keep the config being tried (cancels its revert).
    #[arg(long)]
    confirm: bool,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let data = match (&args.file, args.confirm) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, true) => String::new(),
        (None, false) => {
            bail!("give the config with -f FILE (or --confirm to keep a config being tried)")
        }
    };
    if !data.is_empty() {
        // The node checks too; checking here names the problem before anything is sent.
        config::NodeConfig::from_yaml(&data).context("the config is not valid")?;
    }
    let request = ApplyConfigurationRequest {
        data,
        mode: match args.mode {
            Mode::NoReboot => ApplyMode::NoReboot,
            Mode::Reboot => ApplyMode::Reboot,
            Mode::Try => ApplyMode::Try,
        } as i32,
        try_timeout_s: args.timeout,
        confirm: args.confirm,
    };
    let (endpoint, mut c) = if args.insecure {
        let endpoint = target.endpoints.first().cloned().context(
            "--insecure needs -e/--endpoints (a node in maintenance mode has no context yet)",
        )?;
        let c = api::client::connect_insecure(&endpoint, args.cert_fingerprint.clone()).await?;
        (endpoint, c)
    } else {
        target.connect().await?
    };
    let reply = c
        .apply_configuration(request)
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner();
    println!("{} (actor {})", reply.summary, reply.actor_id);
    if !reply.needs_reboot.is_empty() {
        println!(
            "takes effect at the next boot: {}",
            reply.needs_reboot.join(", ")
        );
    }
    Ok(())
}
