//! `plinth debug IMAGE -- COMMAND`: a program run in a debug container on the node (its
//! namespaces, its root at /host), with this terminal's stdin and output.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Context;
use api::proto::{debug_request, debug_response, DebugOptions, DebugRequest, TerminalSize};
use futures::SinkExt;

use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An image archive (OCI layout or `docker save` tar), imported first; or the name of an
    /// image already on the node (`plinth image list`).
    image: String,
    /// Run the program on a terminal (the default when stdin and stdout are terminals).
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// Never run it on a terminal.
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// The program and its arguments (after `--`); the image's own command without.
    #[arg(last = true)]
    command: Vec<String>,
}

/// This terminal in raw mode until dropped (the remote terminal does the echo and line editing).
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("setting raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = nix::sys::termios::tcsetattr(
            stdin.as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

fn size() -> Option<TerminalSize> {
    let (rows, cols) = console::Term::stdout().size_checked()?;
    Some(TerminalSize {
        rows: rows.into(),
        cols: cols.into(),
    })
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let image = if Path::new(&args.image).is_file() {
        let reply = super::images::upload(target, Path::new(&args.image), String::new()).await?;
        let first = reply.images.first().context("the archive holds no image")?;
        eprintln!("imported {} ({})", first.name, first.digest);
        first.name.clone()
    } else {
        args.image.clone()
    };
    let tty = args.tty
        || (!args.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
    let (mut tx, rx) = futures::channel::mpsc::channel::<DebugRequest>(16);
    tx.send(DebugRequest {
        msg: Some(debug_request::Msg::Options(DebugOptions {
            image,
            command: args.command.clone(),
            tty,
            size: if tty { size() } else { None },
        })),
    })
    .await?;
    let (endpoint, mut c) = target.connect_long().await?;
    let mut answer = c
        .debug(rx)
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner();
    // The terminal goes raw only once the node has the session: an error reads normally.
    let raw = if tty && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    tokio::spawn(pump_stdin(tx.clone()));
    if tty {
        tokio::spawn(pump_resizes(tx));
    } else {
        // Only the stdin pump holds the call open: its end is the program's end-of-file.
        drop(tx);
    }
    let mut status = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let ended = loop {
        match answer.message().await {
            Ok(Some(m)) => match m.msg {
                Some(debug_response::Msg::Started(s)) => {
                    // A raw terminal does not return the carriage by itself.
                    eprint!(
                        "debug container {} ({}), PID {} on the node, actor id {}{}",
                        s.name,
                        s.image_digest,
                        s.pid,
                        s.actor_id,
                        if raw.is_some() { "\r\n" } else { "\n" }
                    );
                }
                Some(debug_response::Msg::Stdout(b)) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(debug_response::Msg::Stderr(b)) => {
                    stderr.write_all(&b)?;
                    stderr.flush()?;
                }
                Some(debug_response::Msg::ExitStatus(s)) => status = Some(s),
                None => {}
            },
            Ok(None) => break Ok(()),
            Err(s) => break Err(status_error(&endpoint, s)),
        }
    };
    drop(raw);
    ended?;
    // Exit here: the stdin pump's blocking read cannot be cancelled, and the runtime's
    // shutdown would wait for it (for a line on a terminal).
    let _ = stdout.flush();
    match status {
        Some(s) => std::process::exit(i32::try_from(s.min(255)).unwrap_or(1)),
        None => anyhow::bail!("the debug session ended without the program's exit status"),
    }
}

/// Sends stdin to the node; its end closes the program's stdin.
async fn pump_stdin(mut tx: futures::channel::mpsc::Sender<DebugRequest>) {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let m = DebugRequest {
                    msg: Some(debug_request::Msg::Stdin(buf[..n].to_vec())),
                };
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends this terminal's new size each time it changes.
async fn pump_resizes(mut tx: futures::channel::mpsc::Sender<DebugRequest>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut changes) = signal(SignalKind::window_change()) else {
        return;
    };
    while changes.recv().await.is_some() {
        if let Some(s) = size() {
            let m = DebugRequest {
                msg: Some(debug_request::Msg::Resize(s)),
            };
            if tx.send(m).await.is_err() {
                return;
            }
        }
    }
}
