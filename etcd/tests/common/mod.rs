//! What etcd's tests share.

/// `n` different ports on 127.0.0.1 that nothing listens on now: all are held until all are
/// found (asked for one at a time, the kernel may hand out a port again once it is free).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect();
    let port = |l: &std::io::Result<std::net::TcpListener>| {
        l.as_ref().ok().and_then(|l| l.local_addr().ok())
    };
    held.iter()
        .map(|l| port(l).expect("free port").port())
        .collect()
}
