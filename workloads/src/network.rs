//! A container's private network: its own network namespace with only loopback, and its
//! published ports forwarded from the node by machined.
//!
//! There is no bridge, veth pair or NAT: a private container cannot reach anything, and is
//! reached only through the ports its config publishes. Each connection to a published port is
//! accepted by machined on the node and joined to a connection machined opens inside the
//! container's namespace (to `127.0.0.1:PORT` there), as Docker's userland proxy does. A
//! socket belongs to the namespace it was made in, so that one is made by a short-lived thread
//! that entered the namespace; machined's own threads never leave the node's.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a connection into the container may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections forwarded at once per published port (each holds two descriptors and, while
/// it connects, a thread): past it, new ones are closed at once, so a flood of connections
/// cannot exhaust PID 1.
const MAX_FORWARDED: usize = 256;

/// Why a private network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// A network namespace, held open (it lives as long as this handle or a process in it).
#[derive(Debug, Clone)]
pub struct Netns(Arc<File>);

impl Netns {
    /// The network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> Result<Netns, NetworkError> {
        let path = format!("/proc/{pid}/ns/net");
        File::open(&path)
            .map(|f| Netns(Arc::new(f)))
            .map_err(io(format!("opening {path}")))
    }

    /// Runs `f` on a thread of its own inside the namespace (the thread ends with it, so no
    /// thread of machined's is left in another namespace).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let ns = self.0.clone();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                nix::sched::setns(ns.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                f()
            })?
            .join()
            .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// Brings the namespace's loopback interface up (a new namespace's is down).
    pub fn loopback_up(&self) -> Result<(), NetworkError> {
        self.run(set_loopback_up)
            .map_err(io("bringing up loopback in the container's namespace"))
    }

    /// Whether something accepts TCP connections on `127.0.0.1:port` inside the namespace (a
    /// health check: the node's published port always accepts, as machined listens there).
    pub fn accepts(&self, port: u16) -> std::io::Result<()> {
        self.connect(port).map(|_| ())
    }

    /// A TCP connection to `127.0.0.1:port` inside the namespace.
    fn connect(&self, port: u16) -> std::io::Result<StdTcpStream> {
        self.run(move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let s = StdTcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    }
}

/// `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `lo`: no crate wraps these two ioctls (rtnetlink would
/// need a runtime on the namespace's thread for one flag).
fn set_loopback_up() -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the socket is open for the call; req is a valid ifreq naming "lo", which the
    // kernel reads and (for SIOCGIFFLAGS) fills in.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; the kernel reads the flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Listens on `address` at each node port of `ports` (node, container) and forwards every
/// connection into `netns`, until `stop`. Fails (and listens on none) if a node port cannot be
/// bound.
pub async fn publish(
    netns: Netns,
    address: std::net::IpAddr,
    ports: &[(u16, u16)],
    stop: CancellationToken,
) -> Result<(), NetworkError> {
    let mut listeners = Vec::new();
    for (node, container) in ports {
        let addr = SocketAddr::new(address, *node);
        let l = TcpListener::bind(addr)
            .await
            .map_err(io(format!("publishing node port {node}")))?;
        listeners.push((l, *container));
    }
    for (listener, port) in listeners {
        let netns = netns.clone();
        let stop = stop.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDED));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((outside, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(outside);
                    continue;
                };
                let (netns, stop) = (netns.clone(), stop.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let inside = tokio::task::spawn_blocking(move || netns.connect(port)).await;
                    let Ok(Ok(inside)) = inside else { return };
                    let Ok(inside) = TcpStream::from_std(inside) else {
                        return;
                    };
                    join(outside, inside, stop).await;
                });
            }
        });
    }
    Ok(())
}

/// Copies both ways until either side closes or `stop`.
async fn join(mut a: TcpStream, mut b: TcpStream, stop: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
    }
}
