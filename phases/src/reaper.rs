//! The one owner of child exits.
//!
//! PID 1 inherits every orphan, so one SIGCHLD handler must reap them all; a supervisor that
//! called `waitpid` for its own children (or used `tokio::process`, which does) would race with
//! it and lose exit statuses. So children are spawned through [`Reaper::spawn`], which registers
//! the PID before the child can be reaped, and their exit status is handed to whoever waits.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with a code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// Which children the reaper collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every child (PID 1: orphans included).
    AllChildren,
    /// Only children spawned through it (an unprivileged process that shares its children with
    /// other code, such as a test harness).
    Registered,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
}

/// The reaper.
pub struct Reaper {
    scope: Scope,
    table: Mutex<Table>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD (and once a second, in case signals were merged).
    pub fn start(scope: Scope) -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            scope,
            table: Mutex::new(Table::default()),
        });
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                r.reap();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns a child with `spawn` (which returns its PID) and registers it, under the lock, so
    /// it cannot be reaped before anyone waits for it.
    pub fn spawn<E>(
        &self,
        spawn: impl FnOnce() -> Result<i32, E>,
    ) -> Result<(i32, oneshot::Receiver<Exit>), E> {
        let mut table = self.lock();
        let pid = spawn()?;
        let (tx, rx) = oneshot::channel();
        table.waiting.insert(pid, tx);
        Ok((pid, rx))
    }

    fn exit_of(status: WaitStatus) -> Option<(i32, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid.as_raw(), Exit::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), Exit::Signal(sig as i32))),
            _ => None,
        }
    }

    /// Collects every exited child now.
    pub fn reap(&self) {
        let mut table = self.lock();
        let mut done = Vec::new();
        match self.scope {
            Scope::AllChildren => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => done.extend(Self::exit_of(status)),
                }
            },
            Scope::Registered => {
                for &pid in table.waiting.keys() {
                    if let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                        done.extend(Self::exit_of(status));
                    }
                }
            }
        }
        for (pid, exit) in done {
            match table.waiting.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::debug!("reaped orphan {pid} ({exit})"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn spawn(r: &Reaper, args: &[&str]) -> (i32, oneshot::Receiver<Exit>) {
        r.spawn(|| {
            Command::new(args[0])
                .args(&args[1..])
                .spawn()
                .map(|c| c.id() as i32)
        })
        .expect("spawn")
    }

    #[tokio::test]
    async fn exit_codes_and_signals_reach_the_waiter() {
        let r = Reaper::start(Scope::Registered).expect("reaper");
        let (_, rx) = spawn(&r, &["/bin/sh", "-c", "exit 3"]);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("in time")
                .expect("exit"),
            Exit::Code(3)
        );
        let (pid, rx) = spawn(&r, &["/bin/sleep", "30"]);
        nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
            .expect("kill");
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("in time")
            .expect("exit");
        assert_eq!(exit, Exit::Signal(9));
        assert_eq!(exit.to_string(), "killed by SIGKILL");
    }
}
