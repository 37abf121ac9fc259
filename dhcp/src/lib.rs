//! A DHCPv4 client for one link: DISCOVER → OFFER → REQUEST → ACK (RFC 2131), enough for a
//! blank machine in maintenance mode or an interface configured with `dhcp: true`.
//!
//! The messages come from `dhcproto`; the exchange is ours because no maintained crate offers
//! a client that runs on a caller's socket (we bind it to the link, before it has an address).
//! The broadcast flag is set, so servers (and QEMU's slirp) answer to 255.255.255.255, which an
//! address-less link can receive.
#![warn(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use tokio::net::UdpSocket;

/// The server port.
pub const SERVER_PORT: u16 = 67;
/// The client port.
pub const CLIENT_PORT: u16 = 68;

/// What a server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length (from the subnet mask; /24 when the server sends none).
    pub prefix_len: u8,
    /// The default gateway, if the server named one.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// The server that granted it.
    pub server: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)?;
        if let Some(r) = self.router {
            write!(f, " via {r}")?;
        }
        write!(f, " from {} for {} s", self.server, self.lease_secs)
    }
}

/// Why no lease was obtained.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// Sending or receiving failed.
    #[error("DHCP on {link}: {what}: {source}")]
    Io {
        /// The link.
        link: String,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A message could not be encoded.
    #[error("DHCP on {link}: encoding a {kind:?}: {reason}")]
    Encode {
        /// The link.
        link: String,
        /// Message type.
        kind: MessageType,
        /// The cause.
        reason: String,
    },
    /// Nobody answered.
    #[error("DHCP on {link}: no {waited_for} after {tries} tries ({secs:.1} s)")]
    NoAnswer {
        /// The link.
        link: String,
        /// What was awaited (offer or acknowledgement).
        waited_for: &'static str,
        /// Attempts made.
        tries: u32,
        /// Total time waited.
        secs: f64,
    },
    /// The server refused the request.
    #[error("DHCP on {link}: server {server} refused the request for {address} (NAK)")]
    Refused {
        /// The link.
        link: String,
        /// Who refused.
        server: Ipv4Addr,
        /// What was asked for.
        address: Ipv4Addr,
    },
}

/// How the client retries: `tries` sends, waiting `first_wait`, doubled each time.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Number of sends per step.
    pub tries: u32,
    /// Wait after the first send.
    pub first_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        // 2 + 4 + 8 + 16 s: RFC 2131's back-off, shortened (TCG boots are slow enough).
        Retry {
            tries: 4,
            first_wait: Duration::from_secs(2),
        }
    }
}

/// One client exchange on a socket already bound to the link's port 68.
pub struct Client<'a> {
    /// The socket.
    pub socket: &'a UdpSocket,
    /// Where requests go (255.255.255.255:67 on a real link).
    pub server: SocketAddr,
    /// The link's name, for errors.
    pub link: &'a str,
    /// The link's hardware address.
    pub mac: [u8; 6],
    /// Retry policy.
    pub retry: Retry,
}

impl Client<'_> {
    fn message(&self, xid: u32, kind: MessageType) -> Message {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        m.set_opcode(Opcode::BootRequest)
            .set_flags(Flags::default().set_broadcast());
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::AddressLeaseTime,
        ]));
        let mut id = vec![1u8]; // hardware type Ethernet, then the MAC (RFC 2132 §9.14)
        id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(id));
        m
    }

    /// Sends `msg` and waits for an answer with its xid whose type `accept` takes, resending
    /// with back-off.
    async fn transact(
        &self,
        msg: &Message,
        waited_for: &'static str,
        accept: impl Fn(&Message) -> bool,
    ) -> Result<Message, DhcpError> {
        let kind = msg.opts().msg_type().unwrap_or(MessageType::Discover);
        let bytes = msg.to_vec().map_err(|e| DhcpError::Encode {
            link: self.link.into(),
            kind,
            reason: e.to_string(),
        })?;
        let io = |what| {
            let link = self.link.to_string();
            move |source| DhcpError::Io { link, what, source }
        };
        let mut wait = self.retry.first_wait;
        let mut waited = Duration::ZERO;
        let mut buf = vec![0u8; 1500];
        for _ in 0..self.retry.tries {
            self.socket
                .send_to(&bytes, self.server)
                .await
                .map_err(io("sending"))?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let recv = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf));
                let Ok(got) = recv.await else { break };
                let (n, _) = got.map_err(io("receiving"))?;
                // Other clients' traffic and garbage are ignored, not errors.
                if let Some(reply) = reply_to(&buf[..n], msg.xid(), &self.mac) {
                    if accept(&reply) {
                        return Ok(reply);
                    }
                }
            }
            waited += wait;
            wait *= 2;
        }
        Err(DhcpError::NoAnswer {
            link: self.link.into(),
            waited_for,
            tries: self.retry.tries,
            secs: waited.as_secs_f64(),
        })
    }

    /// Runs the exchange and returns the lease; the caller configures the link with it.
    pub async fn acquire(&self) -> Result<Lease, DhcpError> {
        let xid = rand_xid();
        let discover = self.message(xid, MessageType::Discover);
        let offer = self
            .transact(&discover, "offer", |m| {
                m.opts().msg_type() == Some(MessageType::Offer)
            })
            .await?;
        let address = offer.yiaddr();
        let server = server_id(&offer);

        let mut request = self.message(xid, MessageType::Request);
        request
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(address));
        request
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(server));
        self.acknowledged(&request, server, address).await
    }

    /// Renews `lease` with its server (RFC 2131 §4.3.2, RENEWING: a REQUEST carrying the
    /// address as `ciaddr`, no server identifier); the caller falls back to [`Self::acquire`]
    /// when this fails.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, DhcpError> {
        let mut request = self.message(rand_xid(), MessageType::Request);
        request.set_ciaddr(lease.address);
        self.acknowledged(&request, lease.server, lease.address)
            .await
    }

    /// Sends `request` and waits for `server`'s ACK (or NAK); another server's answer to the
    /// same transaction is not ours to take.
    async fn acknowledged(
        &self,
        request: &Message,
        server: Ipv4Addr,
        address: Ipv4Addr,
    ) -> Result<Lease, DhcpError> {
        let ack = self
            .transact(request, "acknowledgement", |m| {
                matches!(
                    m.opts().msg_type(),
                    Some(MessageType::Ack | MessageType::Nak)
                ) && server_id(m) == server
            })
            .await?;
        if ack.opts().msg_type() == Some(MessageType::Nak) {
            return Err(DhcpError::Refused {
                link: self.link.into(),
                server,
                address,
            });
        }
        Ok(lease_from(&ack, server))
    }
}

/// A server's answer to transaction `xid` for `mac`, or `None` for anything else (another
/// client's traffic, garbage): the one parser of what the network sends.
pub fn reply_to(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Message> {
    let reply = decode(bytes)?;
    (reply.opcode() == Opcode::BootReply
        && reply.xid() == xid
        && reply.chaddr().get(..6) == Some(&mac[..]))
    .then_some(reply)
}

/// A DHCP message, if `bytes` is one. A hardware address length over the 16 bytes `chaddr`
/// holds is refused here: `dhcproto` decodes it, and then panics when the address is read
/// (found by the fuzzer; any host on the link can send such a reply).
pub fn decode(bytes: &[u8]) -> Option<Message> {
    if !option_lengths_fit(bytes) {
        return None;
    }
    let m = Message::from_bytes(bytes).ok()?;
    (m.hlen() <= 16).then_some(m)
}

/// Whether an option's length is one `dhcproto` takes.
type LengthOk = fn(usize) -> bool;

/// Options whose length `dhcproto` assumes (a `debug_assert!`, then `len - 3` for the client
/// FQDN, which panics where overflow is checked): code and whether a length is right.
/// Found by the fuzzer: option 81 with length 0.
const FIXED_LENGTHS: &[(u8, LengthOk)] = &[
    (80, |l| l == 0),  // rapid commit
    (81, |l| l >= 3),  // client FQDN
    (94, |l| l == 3),  // client network interface
    (152, |l| l == 4), // bulk lease query: base time
    (153, |l| l == 4), // start time of state
    (154, |l| l == 4), // query start time
    (155, |l| l == 4), // query end time
];

/// Whether every option of a message (after the fixed header and the magic cookie) that
/// `dhcproto` trusts the length of has a length it can take. Anything else is left to it.
fn option_lengths_fit(bytes: &[u8]) -> bool {
    // op..file: 236 bytes, then the 4-byte magic cookie.
    let mut rest = bytes.get(240..).unwrap_or_default();
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    break;
                };
                let len = usize::from(len);
                if FIXED_LENGTHS.iter().any(|(c, ok)| *c == code && !ok(len)) {
                    return false;
                }
                rest = tail.get(len..).unwrap_or_default();
            }
        }
    }
    true
}

/// A message as bytes (for the fuzzer's round trip).
pub fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

/// The server a reply says it came from (its server identifier, else `siaddr`).
pub fn server_id(m: &Message) -> Ipv4Addr {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => m.siaddr(),
    }
}

/// The lease an acknowledgement from `server` grants.
pub fn lease_from(ack: &Message, server: Ipv4Addr) -> Lease {
    let opts = ack.opts();
    let prefix_len = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).leading_ones() as u8,
        _ => 24,
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 3600,
    };
    Lease {
        address: ack.yiaddr(),
        prefix_len,
        router,
        dns,
        server,
        lease_secs,
    }
}

/// A transaction id that differs between boots and links (RFC 2131 wants it random):
/// `RandomState` is keyed from the OS's random source.
fn rand_xid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on loopback answering like slirp: offers 10.0.2.15/24 via 10.0.2.2.
    async fn server(sock: UdpSocket, nak: bool) {
        answer(sock, nak, [10, 0, 2, 2].into()).await
    }

    /// The same, saying it is `id`.
    async fn answer(sock: UdpSocket, nak: bool, id: Ipv4Addr) {
        answer_as(sock, nak, id, false).await
    }

    /// The slirp-like server, with a rogue's ACK sent ahead of each of its own.
    async fn answer_with_rogue(sock: UdpSocket) {
        answer_as(sock, false, [10, 0, 2, 2].into(), true).await
    }

    async fn answer_as(sock: UdpSocket, nak: bool, id: Ipv4Addr, rogue: bool) {
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let req = Message::from_bytes(&buf[..n]).expect("decodes");
            let kind = match req.opts().msg_type() {
                Some(MessageType::Discover) => MessageType::Offer,
                Some(MessageType::Request) if nak => MessageType::Nak,
                Some(MessageType::Request) => {
                    // Selecting names the address; renewing carries it as ciaddr.
                    let asked = match req.opts().get(OptionCode::RequestedIpAddress) {
                        Some(DhcpOption::RequestedIpAddress(a)) => *a,
                        _ => req.ciaddr(),
                    };
                    assert_eq!(asked, Ipv4Addr::from([10, 0, 2, 15]));
                    MessageType::Ack
                }
                other => panic!("unexpected {other:?}"),
            };
            let mut reply = Message::new_with_id(
                req.xid(),
                Ipv4Addr::UNSPECIFIED,
                [10, 0, 2, 15].into(),
                [10, 0, 2, 2].into(),
                Ipv4Addr::UNSPECIFIED,
                &req.chaddr()[..6],
            );
            reply.set_opcode(Opcode::BootReply);
            let o = reply.opts_mut();
            o.insert(DhcpOption::MessageType(kind));
            o.insert(DhcpOption::ServerIdentifier(id));
            o.insert(DhcpOption::SubnetMask([255, 255, 255, 0].into()));
            o.insert(DhcpOption::Router(vec![[10, 0, 2, 2].into()]));
            o.insert(DhcpOption::DomainNameServer(vec![[10, 0, 2, 3].into()]));
            o.insert(DhcpOption::AddressLeaseTime(86400));
            // A stray reply for another transaction first: the client must skip it.
            if rogue && kind == MessageType::Ack {
                let mut r = reply.clone();
                r.set_yiaddr([10, 0, 2, 99]);
                r.opts_mut()
                    .insert(DhcpOption::ServerIdentifier([10, 0, 2, 66].into()));
                sock.send_to(&r.to_vec().expect("encodes"), from)
                    .await
                    .expect("send");
            }
            let mut stray = reply.clone();
            stray.set_xid(req.xid().wrapping_add(1));
            sock.send_to(&stray.to_vec().expect("encodes"), from)
                .await
                .expect("send");
            sock.send_to(&reply.to_vec().expect("encodes"), from)
                .await
                .expect("send");
        }
    }

    async fn pair() -> (UdpSocket, UdpSocket) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        (s, c)
    }

    fn client<'a>(c: &'a UdpSocket, to: SocketAddr) -> Client<'a> {
        Client {
            socket: c,
            server: to,
            link: "eth0",
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            retry: Retry {
                tries: 2,
                first_wait: Duration::from_millis(200),
            },
        }
    }

    #[tokio::test]
    async fn a_lease_carries_the_address_prefix_router_and_dns_the_server_sent() {
        let (s, c) = pair().await;
        let to = s.local_addr().expect("addr");
        tokio::spawn(server(s, false));
        let lease = client(&c, to).acquire().await.expect("lease");
        assert_eq!(
            lease,
            Lease {
                address: [10, 0, 2, 15].into(),
                prefix_len: 24,
                router: Some([10, 0, 2, 2].into()),
                dns: vec![[10, 0, 2, 3].into()],
                server: [10, 0, 2, 2].into(),
                lease_secs: 86400,
            }
        );
        assert_eq!(
            lease.to_string(),
            "10.0.2.15/24 via 10.0.2.2 from 10.0.2.2 for 86400 s"
        );
    }

    #[tokio::test]
    async fn a_nak_is_a_refusal_naming_the_server_and_address() {
        let (s, c) = pair().await;
        let to = s.local_addr().expect("addr");
        tokio::spawn(server(s, true));
        let err = client(&c, to).acquire().await.expect_err("refused");
        assert_eq!(
            err.to_string(),
            "DHCP on eth0: server 10.0.2.2 refused the request for 10.0.2.15 (NAK)"
        );
    }

    #[tokio::test]
    async fn silence_is_an_error_after_the_retries() {
        let (s, c) = pair().await;
        let to = s.local_addr().expect("addr");
        let err = client(&c, to).acquire().await.expect_err("no answer");
        assert_eq!(
            err.to_string(),
            "DHCP on eth0: no offer after 2 tries (0.6 s)"
        );
        drop(s);
    }

    #[tokio::test]
    async fn an_acknowledgement_from_another_server_is_not_taken() {
        // Every request is answered first by a rogue (server id 10.0.2.66, address .99).
        let (s, c) = pair().await;
        let to = s.local_addr().expect("addr");
        tokio::spawn(answer_with_rogue(s));
        let lease = client(&c, to).acquire().await.expect("lease");
        assert_eq!(
            (lease.server, lease.address),
            ([10, 0, 2, 2].into(), [10, 0, 2, 15].into())
        );
    }

    #[tokio::test]
    async fn a_lease_is_renewed_with_its_server() {
        let (s, c) = pair().await;
        let to = s.local_addr().expect("addr");
        tokio::spawn(server(s, false));
        let cl = client(&c, to);
        let lease = cl.acquire().await.expect("lease");
        let renewed = cl.renew(&lease).await.expect("renewed");
        assert_eq!(renewed, lease);
    }

    #[test]
    fn only_replies_to_our_transaction_and_hardware_address_parse() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut m = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            [10, 0, 2, 15].into(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_opcode(Opcode::BootReply);
        let bytes = m.to_vec().expect("encode");
        assert!(reply_to(&bytes, 7, &mac).is_some());
        assert!(reply_to(&bytes, 8, &mac).is_none());
        assert!(reply_to(&bytes, 7, &[0; 6]).is_none());
        assert!(reply_to(&bytes[..10], 7, &mac).is_none());
    }

    #[test]
    fn the_fuzzer_seeds_are_replies_it_would_take() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dhcp");
        let ack = std::fs::read(dir.join("ack")).expect("seed");
        let m = decode(&ack).expect("decodes");
        let lease = lease_from(&m, server_id(&m));
        assert_eq!(
            lease.to_string(),
            "10.0.2.15/24 via 10.0.2.2 from 10.0.2.2 for 86400 s"
        );
        assert!(reply_to(&ack, 0x1234abcd, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]).is_some());
    }

    #[test]
    fn a_reply_claiming_a_hardware_address_longer_than_chaddr_is_refused_not_a_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dhcp");
        let mut bytes = std::fs::read(dir.join("ack")).expect("seed");
        bytes[2] = 250; // hlen
        assert!(decode(&bytes).is_none());
        assert!(reply_to(&bytes, 0x1234abcd, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]).is_none());
    }

    #[test]
    fn an_option_shorter_than_dhcproto_assumes_is_refused_not_a_panic() {
        // The fuzzer's find: a client FQDN option (81) of length 0, on which dhcproto's
        // decoder asserts (in a debug build) or subtracts past zero.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dhcp");
        let bytes = std::fs::read(dir.join("fqdn-length-0")).expect("seed");
        assert!(decode(&bytes).is_none());
        // The same option at a length it takes still decodes; one of the fixed-length
        // options at another length is refused.
        let ack = std::fs::read(dir.join("ack")).expect("seed");
        let end = ack.iter().rposition(|&b| b == 255).expect("end option");
        let with = |opt: &[u8]| {
            let mut m = ack[..end].to_vec();
            m.extend_from_slice(opt);
            m.push(255);
            m
        };
        assert!(decode(&with(&[81, 3, 0, 0, 0])).is_some());
        assert!(decode(&with(&[94, 2, 1, 2])).is_none());
        assert!(decode(&with(&[80, 1, 0])).is_none());
    }
}
