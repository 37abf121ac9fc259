//! The debug container: the node's one way in for an admin who must look around, as Talos's
//! `talosctl debug` is. An imported image runs with the node's PID, network, IPC and UTS
//! namespaces, every capability and the node's root bound at `/host`; its stdin and output
//! are relayed through FIFOs (as containerd's own client does) between the shim and the
//! caller, and it is killed and removed when the caller goes.
//!
//! Deliberately narrow: one program per session, no exec into it, nothing kept after it ends.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{CloseIoRequest, ResizePtyRequest, WaitRequest};
use futures::{Stream, StreamExt};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceType,
    MountBuilder, Spec,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::containerd::{Containerd, Error};
use crate::containers::{create_and_start, image_config, remove, runtime_spec, ContainerSpec};
use crate::images::request;

/// Where the node's root appears in the container.
pub const HOST_MOUNT: &str = "/host";

/// Every capability, in the kernel's numbering (`CAP_CHOWN` is 0): a debug container gets
/// those the node has, as Docker's `--privileged` does.
const CAPABILITIES_BY_NUMBER: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// This process's capability bounding set (`CapBnd` of `/proc/self/status`): runc refuses to
/// grant a capability the node itself cannot hold (an older kernel's, a sandbox's).
pub fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        // Unknown: the capabilities every kernel this runs on has (up to CAP_AUDIT_READ).
        .unwrap_or((1 << 38) - 1)
}

/// What a debug session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugSpec {
    /// The container's name (unique on the node).
    pub name: String,
    /// The image's normalised reference.
    pub image: String,
    /// Program and arguments; empty for the image's entrypoint and command.
    pub command: Vec<String>,
    /// On a terminal of this size (rows, columns); otherwise stdout and stderr apart.
    pub terminal: Option<(u16, u16)>,
}

/// What the caller sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the program's stdin.
    Stdin(Vec<u8>),
    /// The terminal's new size (rows, columns).
    Resize(u16, u16),
}

/// What the program writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// On stdout (or the terminal).
    Stdout(Vec<u8>),
    /// On stderr.
    Stderr(Vec<u8>),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The program exited with this status.
    Exited(u32),
    /// The caller went away: the container was killed.
    CallerGone,
    /// The caller's stream broke or carried something that is not input: killed.
    BadInput(String),
    /// The node asked for it (shutting down): the container was killed.
    Cancelled,
    /// containerd stopped answering for the task (it restarted or died): killed once it
    /// answers again.
    RuntimeLost(String),
}

/// A started debug container with its FIFOs open; [`DebugTask::run`] relays until it ends.
pub struct DebugTask {
    channel: Channel,
    name: String,
    dir: PathBuf,
    /// The image's manifest digest.
    pub digest: String,
    /// The program's PID on the node.
    pub pid: u32,
    terminal: bool,
    fifos: Fifos,
}

/// Our ends of a session's FIFOs. The outputs are read through read-only descriptors, so that
/// they end (end-of-file) when the shim has handed over the last byte and closed its end; a
/// read-write descriptor of each (`keep`) stands in for the shim's end until the program has
/// exited, so that neither side ever waits for the other to open and no end-of-file comes
/// early.
struct Fifos {
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    keep: Vec<std::fs::File>,
}

/// The runtime spec of a debug container: a container's (the image's process settings) with
/// the node's namespaces but the mount namespace, every capability and device, nothing masked,
/// and the node's root bound at [`HOST_MOUNT`].
/// `bounding` is the node's capability bounding set ([`bounding_set`]).
pub fn debug_spec(d: &DebugSpec, image: &ImageConfiguration, bounding: u64) -> Result<Spec, Error> {
    let refused = |e: oci_spec::OciSpecError| Error::Refused(format!("debug {}: {e}", d.name));
    let base = ContainerSpec {
        name: d.name.clone(),
        image: d.image.clone(),
        command: d.command.clone(),
        environment: if d.terminal.is_some() {
            vec!["TERM=xterm".into()]
        } else {
            Vec::new()
        },
        host_network: true,
        mounts: Vec::new(),
        log: PathBuf::new(),
    };
    let mut spec = runtime_spec(&base, image)?;
    // Without its own UTS namespace a container may not set a host name.
    spec.set_hostname(None);
    let all: HashSet<Capability> = CAPABILITIES_BY_NUMBER
        .iter()
        .enumerate()
        .filter(|(n, _)| bounding & (1 << n) != 0)
        .map(|(_, c)| *c)
        .collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(all.clone())
        .effective(all.clone())
        .permitted(all)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(refused)?;
    if let Some(p) = spec.process_mut() {
        // Root whatever the image says: another user would lose every capability at exec.
        p.set_user(
            oci_spec::runtime::UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(refused)?,
        );
        p.set_capabilities(Some(capabilities));
        p.set_terminal(Some(d.terminal.is_some()));
        if let Some((rows, cols)) = d.terminal {
            p.set_console_size(Some(
                oci_spec::runtime::BoxBuilder::default()
                    .height(u64::from(rows))
                    .width(u64::from(cols))
                    .build()
                    .map_err(refused)?,
            ));
        }
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination(HOST_MOUNT)
            .typ("bind")
            .source("/")
            .options(vec!["rbind".to_string(), "rw".into(), "rslave".into()])
            .build()
            .map_err(refused)?,
    );
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        let namespaces = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                !matches!(
                    n.typ(),
                    LinuxNamespaceType::Pid
                        | LinuxNamespaceType::Network
                        | LinuxNamespaceType::Ipc
                        | LinuxNamespaceType::Uts
                )
            })
            .collect();
        linux.set_namespaces(Some(namespaces));
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
        if let Some(resources) = linux.resources_mut() {
            resources.set_devices(Some(vec![LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .access("rwm")
                .build()
                .map_err(refused)?]));
        }
    }
    Ok(spec)
}

/// Makes a FIFO at `path` (only the owner may use it).
fn fifo(path: &Path) -> Result<(), Error> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| Error::Refused(format!("making the FIFO {}: {e}", path.display())))
}

impl Containerd {
    /// Starts the debug container `spec` describes, its FIFOs in `dir` (made, and removed when
    /// the session ends). Whatever an earlier session of the name left is removed first.
    pub async fn start_debug(&self, spec: &DebugSpec, dir: &Path) -> Result<DebugTask, Error> {
        let channel = self.connect().await?;
        let image = image_config(&channel, &spec.image).await?;
        let runtime_spec = debug_spec(spec, &image.config, bounding_set())?;
        remove(&channel, &spec.name).await;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Refused(format!("making {}: {e}", dir.display())))?;
        let opened = open_fifos(dir, spec.terminal.is_some());
        let (fifos, io) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        match create_and_start(&channel, &spec.name, &image, &runtime_spec, io).await {
            Ok(pid) => Ok(DebugTask {
                channel,
                name: spec.name.clone(),
                dir: dir.to_path_buf(),
                digest: image.digest,
                pid,
                terminal: spec.terminal.is_some(),
                fifos,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }
}

/// Makes and opens the session's FIFOs (see [`Fifos`]).
fn open_fifos(dir: &Path, terminal: bool) -> Result<(Fifos, crate::containers::TaskIo), Error> {
    fn opened(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::Refused(format!("opening the FIFO {}: {e}", p.display()))
    }
    let output = |p: &Path, keep: &mut Vec<std::fs::File>| -> Result<pipe::Receiver, Error> {
        fifo(p)?;
        keep.push(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(opened(p))?,
        );
        pipe::OpenOptions::new().open_receiver(p).map_err(opened(p))
    };
    let (i, o, e) = (dir.join("stdin"), dir.join("stdout"), dir.join("stderr"));
    let mut keep = Vec::new();
    fifo(&i)?;
    // Read-write: the shim's read end need not be open yet, and the program's stdin stays
    // open for as long as the session holds it.
    let stdin = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(&i)
        .map_err(opened(&i))?;
    let stdout = output(&o, &mut keep)?;
    // On a terminal the program's stderr is the terminal too.
    let stderr = if terminal {
        None
    } else {
        Some(output(&e, &mut keep)?)
    };
    let io = crate::containers::TaskIo {
        stdin: i.display().to_string(),
        stdout: o.display().to_string(),
        stderr: if terminal {
            String::new()
        } else {
            e.display().to_string()
        },
        terminal,
    };
    Ok((
        Fifos {
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr,
            keep,
        },
        io,
    ))
}

/// Reads what `r` has; `Ok(0)` is its end. A stream already ended never becomes ready.
async fn read_some(r: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The most stdin held for a program that does not read it; beyond it, input waits.
const MAX_PENDING: usize = 256 << 10;

/// How long the output may go on after the program exited (a child it left holding stdout).
const OUTPUT_AFTER_EXIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What came of handing one piece of output to the caller.
enum Sent {
    Ok,
    Gone,
    Cancelled,
}

/// Hands `item` to the caller, waiting while it is slow but not past `cancel`.
async fn send<T>(output: &mpsc::Sender<T>, item: T, cancel: &CancellationToken) -> Sent {
    tokio::select! {
        r = output.send(item) => match r {
            Ok(()) => Sent::Ok,
            Err(_) => Sent::Gone,
        },
        _ = cancel.cancelled() => Sent::Cancelled,
    }
}

impl DebugTask {
    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Relays `input` to the program and its output to `output` (each wrapped by `wrap`) until
    /// it exits and its output has ended, the caller goes (`output` is dropped), `input` fails,
    /// or `cancel` fires; then removes the container and its FIFOs. `input` ending closes the
    /// program's stdin (on a terminal it does not: closing a terminal's input hangs it up).
    pub async fn run<T: Send, S>(
        mut self,
        mut input: S,
        output: mpsc::Sender<T>,
        wrap: impl Fn(Output) -> T,
        cancel: CancellationToken,
    ) -> Ending
    where
        S: Stream<Item = Result<Input, String>> + Unpin,
    {
        let mut tasks = TasksClient::new(self.channel.clone());
        let mut waiter = TasksClient::new(self.channel.clone());
        let exited = waiter.wait(request(
            WaitRequest {
                container_id: self.name.clone(),
                exec_id: String::new(),
            },
            None,
        ));
        tokio::pin!(exited);
        let mut status: Option<u32> = None;
        let after_exit = tokio::time::sleep(std::time::Duration::MAX);
        tokio::pin!(after_exit);
        let mut pending: Vec<u8> = Vec::new();
        let mut input_open = true;
        let mut out_buf = vec![0u8; 32 << 10];
        let mut err_buf = vec![0u8; 32 << 10];
        let mut stdout = self.fifos.stdout.take();
        let mut stderr = self.fifos.stderr.take();
        let ending = loop {
            if status.is_some() && stdout.is_none() && stderr.is_none() {
                break Ending::Exited(status.unwrap_or_default());
            }
            tokio::select! {
                r = &mut exited, if status.is_none() => match r {
                    Ok(r) => {
                        status = Some(r.into_inner().exit_status);
                        // The shim's ends are the only writers now: each output ends once
                        // the shim has copied the last of it.
                        self.fifos.keep.clear();
                        after_exit.as_mut().reset(tokio::time::Instant::now() + OUTPUT_AFTER_EXIT);
                    }
                    Err(s) => break Ending::RuntimeLost(s.message().to_string()),
                },
                _ = &mut after_exit => break Ending::Exited(status.unwrap_or_default()),
                _ = cancel.cancelled() => break Ending::Cancelled,
                _ = output.closed() => break Ending::CallerGone,
                m = input.next(), if input_open && pending.len() < MAX_PENDING => match m {
                    Some(Ok(Input::Stdin(b))) => pending.extend_from_slice(&b),
                    Some(Ok(Input::Resize(rows, cols))) => {
                        if self.terminal {
                            let _ = tasks.resize_pty(request(ResizePtyRequest {
                                container_id: self.name.clone(),
                                exec_id: String::new(),
                                width: u32::from(cols),
                                height: u32::from(rows),
                            }, None)).await;
                        }
                    }
                    Some(Err(e)) => break Ending::BadInput(e),
                    None => {
                        input_open = false;
                        if pending.is_empty() && !self.terminal {
                            self.close_stdin(&mut tasks).await;
                        }
                    }
                },
                w = async { match &self.fifos.stdin { Some(s) => s.writable().await, None => std::future::pending().await } }, if !pending.is_empty() => {
                    if w.is_err() {
                        pending.clear();
                        continue;
                    }
                    if let Some(s) = &self.fifos.stdin {
                        match s.try_write(&pending) {
                            Ok(n) => { pending.drain(..n); }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => pending.clear(),
                        }
                    }
                    // The caller's input ended while some of it waited: close it now.
                    if pending.is_empty() && !input_open && !self.terminal && self.fifos.stdin.is_some() {
                        self.close_stdin(&mut tasks).await;
                    }
                }
                n = read_some(&mut stdout, &mut out_buf) => match n {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(n) => match send(&output, wrap(Output::Stdout(out_buf[..n].to_vec())), &cancel).await {
                        Sent::Ok => {}
                        Sent::Gone => break Ending::CallerGone,
                        Sent::Cancelled => break Ending::Cancelled,
                    },
                },
                n = read_some(&mut stderr, &mut err_buf) => match n {
                    Ok(0) | Err(_) => stderr = None,
                    Ok(n) => match send(&output, wrap(Output::Stderr(err_buf[..n].to_vec())), &cancel).await {
                        Sent::Ok => {}
                        Sent::Gone => break Ending::CallerGone,
                        Sent::Cancelled => break Ending::Cancelled,
                    },
                },
            }
        };
        self.end(ending).await
    }

    async fn close_stdin(&mut self, tasks: &mut TasksClient<Channel>) {
        // Ours was the only writer: the shim reads end-of-file and closes the program's stdin.
        self.fifos.stdin = None;
        let _ = tasks
            .close_io(request(
                CloseIoRequest {
                    container_id: self.name.clone(),
                    exec_id: String::new(),
                    stdin: true,
                },
                None,
            ))
            .await;
    }

    /// Kills what is left, removes the container (task, record, snapshot) and the FIFOs. When
    /// containerd is away (restarting), asks again for a while: a privileged container must
    /// not outlive its session.
    async fn end(self, ending: Ending) -> Ending {
        let mut tries = 0;
        loop {
            remove(&self.channel, &self.name).await;
            tries += 1;
            let gone = crate::containers::exists(&self.channel, &self.name).await == Some(false);
            if gone || tries >= 10 {
                if !gone {
                    tracing::error!("debug container {} could not be removed", self.name);
                }
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        ending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfiguration {
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .expect("config")
    }

    fn spec(terminal: Option<(u16, u16)>) -> Spec {
        debug_spec(
            &DebugSpec {
                name: "debug-1".into(),
                image: "plinth.local/busybox:latest".into(),
                command: vec!["cat".into(), "/host/proc/1/comm".into()],
                terminal,
            },
            &image(),
            u64::MAX,
        )
        .expect("spec")
    }

    #[test]
    fn a_debug_container_shares_the_nodes_namespaces_but_mounts() {
        let s = spec(None);
        let kinds: Vec<_> = s
            .linux()
            .clone()
            .expect("linux")
            .namespaces()
            .clone()
            .expect("namespaces")
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(kinds.contains(&LinuxNamespaceType::Mount));
        for shared in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
        ] {
            assert!(!kinds.contains(&shared), "{shared:?}");
        }
        assert_eq!(s.hostname(), &None);
        let host = s
            .mounts()
            .clone()
            .expect("mounts")
            .into_iter()
            .find(|m| m.destination() == Path::new(HOST_MOUNT))
            .expect("/host");
        assert_eq!(host.source().clone().expect("source"), PathBuf::from("/"));
        let caps = s
            .process()
            .clone()
            .expect("p")
            .capabilities()
            .clone()
            .expect("caps");
        assert!(caps
            .effective()
            .clone()
            .expect("e")
            .contains(&Capability::SysAdmin));
        assert_eq!(
            s.process().clone().expect("p").args().clone().expect("a"),
            ["cat", "/host/proc/1/comm"]
        );
    }

    #[test]
    fn only_the_capabilities_the_node_holds_are_given() {
        let d = DebugSpec {
            name: "debug-1".into(),
            image: "plinth.local/busybox:latest".into(),
            command: vec![],
            terminal: None,
        };
        // CAP_CHOWN (0) and CAP_SYS_ADMIN (21) only.
        let s = debug_spec(&d, &image(), 1 | (1 << 21)).expect("spec");
        let caps = s
            .process()
            .clone()
            .expect("p")
            .capabilities()
            .clone()
            .expect("caps")
            .bounding()
            .clone()
            .expect("b");
        assert_eq!(
            caps,
            HashSet::from([Capability::Chown, Capability::SysAdmin])
        );
    }

    #[test]
    fn a_terminal_session_asks_for_a_terminal_of_its_size() {
        let p = spec(Some((40, 120))).process().clone().expect("p");
        assert_eq!(p.terminal(), Some(true));
        let size = p.console_size().expect("size");
        assert_eq!((size.height(), size.width()), (40, 120));
        assert!(p
            .env()
            .clone()
            .expect("env")
            .contains(&"TERM=xterm".to_string()));
        assert_eq!(
            spec(None).process().clone().expect("p").terminal(),
            Some(false)
        );
    }
}
