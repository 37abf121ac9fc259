//! machined's entry point: reads its arguments and runs a role of the library (see `lib.rs`).

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use machined::{console, fatal, initramfs, node};

/// Command-line arguments (the kernel passes none to init; these are for development and for
/// the built-in helper services).
#[derive(Parser, Debug)]
#[command(name = "machined", version, about = "Plinth's PID 1")]
struct Args {
    /// Which role to run; by default, the initramfs role when `/etc/initrd-release` exists and
    /// the node role otherwise.
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// The machine to run on: the real one (as PID 1) or a simulated one.
    #[arg(long, value_enum, default_value_t = Platform::Linux)]
    platform: Platform,
    /// The simulated machine's directory (with --platform sim).
    #[arg(long)]
    machine: Option<std::path::PathBuf>,
    /// Where the simulated node's API listens (with --platform sim).
    #[arg(long, default_value = "127.0.0.1:50000")]
    api: std::net::SocketAddr,
    #[command(subcommand)]
    helper: Option<Helper>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Platform {
    Linux,
    Sim,
}

/// Small programs the image can run as services without carrying other binaries.
#[derive(clap::Subcommand, Debug)]
enum Helper {
    /// Do nothing until killed (a placeholder service, like Kubernetes' pause).
    Pause {
        /// Ignore SIGTERM, so only SIGKILL stops it.
        #[arg(long)]
        ignore_sigterm: bool,
        /// Accept TCP connections here (something for a health check to reach).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Print a numbered line every 200 ms (something for `plinth logs -f` to follow).
        #[arg(long)]
        tick: bool,
        /// First print the file descriptors it was started with (what a service inherits).
        #[arg(long)]
        list_fds: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Initramfs,
    Node,
}

fn main() {
    machined::mark_start();
    console::init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        // The kernel passes init arguments it did not understand; never refuse to start over
        // them as PID 1. Anywhere else, bad arguments are the caller's to fix.
        Err(e) if std::process::id() != 1 => e.exit(),
        Err(_) => Args {
            role: None,
            platform: Platform::Linux,
            machine: None,
            api: std::net::SocketAddr::from(([127, 0, 0, 1], 50000)),
            helper: None,
        },
    };
    if let Some(Helper::Pause {
        ignore_sigterm,
        listen,
        tick,
        list_fds,
    }) = args.helper
    {
        if list_fds {
            print_fds();
        }
        pause(ignore_sigterm, listen, tick);
    }
    if args.platform == Platform::Sim {
        run_sim(args.machine, args.api);
    }
    let role = args
        .role
        .unwrap_or(if Path::new("/etc/initrd-release").exists() {
            Role::Initramfs
        } else {
            Role::Node
        });
    if std::process::id() != 1 {
        // Off PID 1 the node role would mount and reconfigure the host it runs on.
        console::line(&format!(
            "machined must run as PID 1 (this is PID {}); refusing to touch this machine",
            std::process::id()
        ));
        std::process::exit(2);
    }
    // The kernel started the initramfs's /init, and this process goes on past switch_root:
    // name it for what it is, so that /proc/1/comm, ps and a debug container say machined.
    let _ = nix::sys::prctl::set_name(c"machined");
    let outcome = match role {
        Role::Initramfs => initramfs::run(),
        Role::Node => node::run(Vec::new()),
    };
    // Only failures come back.
    fatal(&sequencer::runner::chain(outcome.as_ref()));
}

/// One line: `fds: 0=/dev/null 1=/var/log/...`.
fn print_fds() {
    let mut fds: Vec<(u32, String)> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((n, target.display().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    let list: Vec<String> = fds.iter().map(|(n, t)| format!("{n}={t}")).collect();
    console::line(&format!("fds: {}", list.join(" ")));
}

/// The pause helper: sleeps until killed.
fn pause(ignore_sigterm: bool, listen: Option<std::net::SocketAddr>, tick: bool) -> ! {
    if ignore_sigterm {
        // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context.
        if let Err(e) = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::SigHandler::SigIgn,
            )
        } {
            console::line(&format!("pause: ignoring SIGTERM: {e}"));
        }
    }
    if let Some(addr) = listen {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                std::thread::spawn(move || for _ in l.incoming() {});
            }
            Err(e) => {
                console::line(&format!("pause: listening on {addr}: {e}"));
                std::process::exit(1);
            }
        }
    }
    let mut n = 0u64;
    loop {
        if tick {
            n += 1;
            console::line(&format!("tick {n}"));
            std::thread::sleep(Duration::from_millis(200));
        } else {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The simulated machine (built with the `sim` feature only: never in the release image).
#[cfg(feature = "sim")]
fn run_sim(dir: Option<std::path::PathBuf>, api: std::net::SocketAddr) -> ! {
    let Some(dir) = dir else {
        console::line("machined: --platform sim needs --machine DIR");
        std::process::exit(2);
    };
    match machined::sim::run(&dir, api) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            console::line(&format!(
                "machined: {}",
                sequencer::runner::chain(e.as_ref())
            ));
            std::process::exit(1);
        }
    }
}

#[cfg(not(feature = "sim"))]
fn run_sim(_: Option<std::path::PathBuf>, _: std::net::SocketAddr) -> ! {
    console::line("machined: this build has no simulated machine (build with --features sim)");
    std::process::exit(2);
}
