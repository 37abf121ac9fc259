//! `plinth`: the operator's CLI. Thin: parse, call the library, print.

mod chart;
mod cmd;
mod connect;
mod fanout;
mod output;
mod upload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Talk to Plinth nodes, build images, run local clusters.
#[derive(Parser, Debug)]
#[command(name = "plinth", version, about)]
pub struct Cli {
    /// Client config file (default: $PLINTHCONFIG, else ~/.plinth/config).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Endpoints to use instead of the context's (host[:port], comma-separated).
    #[arg(short = 'e', long, global = true, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Nodes to run the command on (host[:port], comma-separated): the output says which node
    /// each line is from, and the exit status is non-zero if any node failed. Commands that
    /// take it are listed in the error a command that runs on one node gives. For `upgrade`,
    /// a rolling upgrade; for `gen config`, how many nodes to generate.
    #[arg(short = 'n', long, global = true, value_delimiter = ',')]
    nodes: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate configs and secrets.
    #[command(subcommand)]
    Gen(cmd::gen::Gen),
    /// Show the node's version, slot and root.
    Version(cmd::version::Args),
    /// Show (and follow) the node's events.
    Events(cmd::events::Args),
    /// Write the boot's timeline as a Chrome trace and an SVG chart.
    Bootchart(cmd::bootchart::Args),
    /// Show the node's lifecycle state and running sequence.
    Status(cmd::status::Args),
    /// Reboot the node (orderly: stop, unmount, sync, restart).
    Reboot(cmd::power::RebootArgs),
    /// Power the node off (orderly).
    Shutdown(cmd::power::ShutdownArgs),
    /// List the node's services.
    Services(cmd::services::Args),
    /// List the node's containers (from its config, run through containerd).
    Containers(cmd::containers::Args),
    /// Run a program in a debug container on the node: its namespaces, its root at /host, this
    /// terminal's stdin and output (admin; every run is an event).
    Debug(cmd::debug::Args),
    /// Write a bundle into the other slot and try it (A/B, rolls back by itself on failure).
    Upgrade(cmd::upgrade::UpgradeArgs),
    /// Go back to the other slot, if it is good.
    Rollback(cmd::upgrade::RollbackArgs),
    /// Give a node its config (a new node in maintenance mode with --insecure).
    ApplyConfig(cmd::apply::Args),
    /// Show the node's running config (`plinth get config`) or its system extensions
    /// (`plinth get extensions`).
    Get(cmd::config::GetArgs),
    /// Change the node's config with a JSON merge or RFC 6902 patch (`--dry-run` shows the diff).
    Patch(cmd::config::PatchArgs),
    /// Edit the node's config in $EDITOR and apply it.
    Edit(cmd::config::EditArgs),
    /// Wipe the node (STATE and EPHEMERAL by default) and reboot or power off.
    Reset(cmd::reset::Args),
    /// Print the node's kernel log.
    Dmesg(cmd::logs::DmesgArgs),
    /// Print a service's output.
    Logs(cmd::logs::LogsArgs),
    /// Start the cluster's etcd on this control-plane node (once, on one of them).
    Bootstrap(cmd::etcd::BootstrapArgs),
    /// The cluster's etcd.
    #[command(subcommand)]
    Etcd(cmd::etcd::Etcd),
    /// Check the cluster: every node answers, etcd's members are the control planes and
    /// healthy, every service is healthy, every node booted its committed slot (the context's
    /// nodes, or -n).
    Health(cmd::health::Args),
    /// Build images; import container images into a node and list them.
    #[command(subcommand)]
    Image(cmd::image::Image),
    /// Run local nodes in QEMU.
    #[command(subcommand)]
    Cluster(cmd::cluster::Cluster),
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLINTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .without_time()
        .try_init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(cli));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fans_out = matches!(
        cli.cmd,
        Cmd::Version(_)
            | Cmd::Status(_)
            | Cmd::Services(_)
            | Cmd::Containers(_)
            | Cmd::Etcd(cmd::etcd::Etcd::Members(_))
            | Cmd::Etcd(cmd::etcd::Etcd::Status(_))
            | Cmd::Health(_)
            | Cmd::Upgrade(_)
            | Cmd::Reboot(_)
            | Cmd::Shutdown(_)
            | Cmd::Events(_)
            | Cmd::Dmesg(_)
            | Cmd::Logs(_)
            | Cmd::Rollback(_)
            | Cmd::Reset(_)
            | Cmd::Get(_)
            | Cmd::Patch(_)
            | Cmd::Image(cmd::image::Image::Import(_))
            | Cmd::Image(cmd::image::Image::List(_))
            | Cmd::Gen(_)
    );
    if !cli.nodes.is_empty() && !fans_out {
        anyhow::bail!(
            "-n/--nodes works with version, status, services, containers, etcd members, \
             health, upgrade (a rolling upgrade), reboot, shutdown, rollback, reset, events, dmesg, logs, \
             get, patch and image import|list (and is a count for gen config); this command runs on one node \
             (pick it with -e)"
        );
    }
    let target = connect::Target {
        config: cli.config.clone(),
        context: cli.context.clone(),
        endpoints: cli.endpoints.clone(),
        nodes: cli.nodes.clone(),
    };
    match cli.cmd {
        Cmd::Gen(g) => cmd::gen::run(g, &cli.nodes),
        Cmd::Version(a) => cmd::version::run(&target, a).await,
        Cmd::Events(a) => cmd::events::run(&target, a).await,
        Cmd::Bootchart(a) => cmd::bootchart::run(&target, a).await,
        Cmd::Status(a) => cmd::status::run(&target, a).await,
        Cmd::Reboot(a) => cmd::power::reboot(&target, a).await,
        Cmd::Shutdown(a) => cmd::power::shutdown(&target, a).await,
        Cmd::Services(a) => cmd::services::run(&target, a).await,
        Cmd::Containers(a) => cmd::containers::run(&target, a).await,
        Cmd::Debug(a) => cmd::debug::run(&target, a).await,
        Cmd::Upgrade(a) => cmd::upgrade::upgrade(&target, a).await,
        Cmd::Rollback(a) => cmd::upgrade::rollback(&target, a).await,
        Cmd::ApplyConfig(a) => cmd::apply::run(&target, a).await,
        Cmd::Get(a) => cmd::config::get(&target, a).await,
        Cmd::Patch(a) if target.fans_out() => {
            fanout::one_by_one(&target, |t| cmd::config::patch_owned(t, a.clone())).await
        }
        Cmd::Patch(a) => cmd::config::patch(&target, a).await,
        Cmd::Edit(a) => cmd::config::edit(&target, a).await,
        Cmd::Reset(a) => cmd::reset::run(&target, a).await,
        Cmd::Dmesg(a) => cmd::logs::dmesg(&target, a).await,
        Cmd::Logs(a) => cmd::logs::logs(&target, a).await,
        Cmd::Image(cmd::image::Image::Import(a)) if target.fans_out() => {
            fanout::one_by_one(&target, |t| cmd::images::import_owned(t, a.clone())).await
        }
        Cmd::Image(cmd::image::Image::Import(a)) => cmd::images::import(&target, a).await,
        Cmd::Image(cmd::image::Image::List(a)) if target.fans_out() => {
            fanout::one_by_one(&target, |t| cmd::images::list_owned(t, a.clone())).await
        }
        Cmd::Image(cmd::image::Image::List(a)) => cmd::images::list(&target, a).await,
        Cmd::Image(i) => cmd::image::run(i),
        Cmd::Cluster(c) => cmd::cluster::run(&target, c).await,
        Cmd::Bootstrap(a) => cmd::etcd::bootstrap(&target, a).await,
        Cmd::Etcd(e) => cmd::etcd::run(&target, e).await,
        Cmd::Health(a) => cmd::health::run(&target, a).await,
    }
}
