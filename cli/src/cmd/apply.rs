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
    /// With --mode reboot: take a slot of the cluster's reboot semaphore first (the node joins
    /// the queue before it writes the config, and reboots when fewer than K nodes are down).
    #[arg(long, value_name = "K", default_value_t = 0)]
    max_unavailable: u32,
}

impl Mode {
    /// The request's mode.
    pub fn proto(self) -> ApplyMode {
        match self {
            Mode::NoReboot => ApplyMode::NoReboot,
            Mode::Reboot => ApplyMode::Reboot,
            Mode::Try => ApplyMode::Try,
        }
    }
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
    if args.max_unavailable != 0 && args.mode != Mode::Reboot {
        bail!("--max-unavailable goes with --mode reboot (no other mode reboots the node)");
    }
    if !data.is_empty() {
        // The node checks too; checking here names the problem before anything is sent.
        config::NodeConfig::from_yaml(&data).context("the config is not valid")?;
    }
    let request = ApplyConfigurationRequest {
        data,
        mode: args.mode.proto() as i32,
        try_timeout_s: args.timeout,
        confirm: args.confirm,
        max_unavailable: args.max_unavailable,
    };
    let (endpoint, mut c) = if args.insecure {
        let endpoint = target.insecure_endpoint()?;
        let fingerprint = match args.cert_fingerprint.clone() {
            Some(fp) => fp,
            None => {
                let seen = api::client::server_fingerprint(&endpoint).await?;
                let stdin = std::io::stdin();
                trust_on_first_use(
                    &endpoint,
                    &seen,
                    std::io::IsTerminal::is_terminal(&stdin),
                    &mut stdin.lock(),
                    &mut std::io::stderr(),
                )?;
                seen
            }
        };
        // Pinned: the connection that sends the config talks to the certificate confirmed.
        let c = api::client::connect_insecure(&endpoint, Some(fingerprint)).await?;
        (endpoint, c)
    } else {
        target.connect().await?
    };
    send(&endpoint, &mut c, request).await
}

/// Sends a config and says what the node did with it.
pub async fn send(
    endpoint: &str,
    c: &mut api::proto::machine_client::MachineClient<tonic::transport::Channel>,
    request: ApplyConfigurationRequest,
) -> anyhow::Result<()> {
    let reply = c
        .apply_configuration(request)
        .await
        .map_err(|s| status_error(endpoint, s))?
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

/// Trust on first use: shows the certificate the node presented and asks whether it is the one
/// on the node's console; refuses when there is nobody to ask (not a terminal).
fn trust_on_first_use(
    endpoint: &str,
    fingerprint: &str,
    terminal: bool,
    input: &mut impl std::io::BufRead,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if !terminal {
        bail!(
            "{endpoint} presents a certificate with SHA-256 {fingerprint}; not on a terminal, so nobody can confirm it is the node's: compare it with the node's console and pass --cert-fingerprint {fingerprint}"
        );
    }
    writeln!(
        out,
        "{endpoint} presents a certificate with SHA-256\n  {fingerprint}\nThe node prints its fingerprint on its console. Is it the same? [y/N] "
    )?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    match answer.trim() {
        "y" | "Y" | "yes" | "YES" | "Yes" => Ok(()),
        _ => bail!("not confirmed: nothing was sent to {endpoint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "ab12";

    #[test]
    fn off_a_terminal_the_fingerprint_is_shown_and_nothing_is_trusted() {
        let err = trust_on_first_use("n:1", FP, false, &mut "y\n".as_bytes(), &mut Vec::new())
            .expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("SHA-256 ab12") && msg.contains("--cert-fingerprint ab12"),
            "{msg}"
        );
    }

    #[test]
    fn on_a_terminal_only_a_yes_trusts_it() {
        let mut shown = Vec::new();
        trust_on_first_use("n:1", FP, true, &mut "y\n".as_bytes(), &mut shown).expect("yes");
        assert!(String::from_utf8_lossy(&shown).contains("ab12"));
        for no in ["\n", "n\n", "yess\n", ""] {
            assert!(
                trust_on_first_use("n:1", FP, true, &mut no.as_bytes(), &mut Vec::new()).is_err(),
                "{no:?}"
            );
        }
    }
}
