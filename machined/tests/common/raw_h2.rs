//! A hand-written HTTP/2 client for the hostile-peer tests: it writes frames as an attacker
//! chooses (headers without a body, a body long after, PINGs never acknowledged, gRPC frames
//! that claim more than they send), which no well-behaved client library would.
//!
//! Only what the attacks need: the connection preface, SETTINGS (and their ACK), HEADERS with
//! literal HPACK fields (no Huffman, no table), DATA, and reading frames back.

#![allow(dead_code)]

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// One frame read back.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A raw HTTP/2 connection over TLS.
pub struct RawH2 {
    tls: TlsStream<TcpStream>,
    hpack: hpack::Decoder<'static>,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), first byte ORed with `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing, new names (RFC 7541 §6.2.2).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A gRPC length-prefixed message.
pub fn grpc_message(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

impl RawH2 {
    /// Connects with `tls` (its ALPN must offer h2), sends the preface and empty SETTINGS.
    pub async fn connect(
        endpoint: &str,
        tls: Arc<rustls::ClientConfig>,
        local: Option<std::net::IpAddr>,
    ) -> std::io::Result<RawH2> {
        let tcp = match local {
            Some(ip) => {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind((ip, 0).into())?;
                sock.connect(endpoint.parse().map_err(std::io::Error::other)?)
                    .await?
            }
            None => TcpStream::connect(endpoint).await?,
        };
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
            .map_err(std::io::Error::other)?
            .to_owned();
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let mut c = RawH2 {
            tls,
            hpack: hpack::Decoder::new(),
        };
        c.tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        c.frame(SETTINGS, 0, 0, &[]).await?;
        Ok(c)
    }

    /// Writes one frame.
    pub async fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let len = payload.len() as u32;
        let mut head = [0u8; 9];
        head[..3].copy_from_slice(&len.to_be_bytes()[1..]);
        head[3] = kind;
        head[4] = flags;
        head[5..].copy_from_slice(&stream.to_be_bytes());
        self.tls.write_all(&head).await?;
        self.tls.write_all(payload).await?;
        self.tls.flush().await
    }

    /// Opens a gRPC call to `path` on `stream` (odd, rising): headers only, body to follow.
    pub async fn open_call(&mut self, stream: u32, path: &str) -> std::io::Result<()> {
        let block = header_block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        self.frame(HEADERS, END_HEADERS, stream, &block).await
    }

    /// Sends body bytes on `stream`, ending it if `end`.
    pub async fn data(&mut self, stream: u32, bytes: &[u8], end: bool) -> std::io::Result<()> {
        // Within the peer's default maximum frame size (16 KiB).
        let mut chunks = bytes.chunks(16 << 10).peekable();
        if chunks.peek().is_none() {
            return self
                .frame(DATA, if end { END_STREAM } else { 0 }, stream, &[])
                .await;
        }
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            let flags = if end && last { END_STREAM } else { 0 };
            self.frame(DATA, flags, stream, c).await?;
        }
        Ok(())
    }

    /// Reads one frame; acknowledges SETTINGS (a client must) and, when `ack_pings`, PINGs.
    pub async fn read(&mut self, ack_pings: bool) -> std::io::Result<Frame> {
        let mut head = [0u8; 9];
        self.tls.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.tls.read_exact(&mut payload).await?;
        let f = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        };
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            self.frame(SETTINGS, ACK, 0, &[]).await?;
        }
        if f.kind == PING && f.flags & ACK == 0 && ack_pings {
            let p = f.payload.clone();
            self.frame(PING, ACK, 0, &p).await?;
        }
        Ok(f)
    }

    /// Reads until a frame of `kind` comes (returned), or the connection ends (`Err`).
    pub async fn until(&mut self, kind: u8, ack_pings: bool) -> std::io::Result<Frame> {
        loop {
            let f = self.read(ack_pings).await?;
            if f.kind == kind {
                return Ok(f);
            }
        }
    }

    /// Reads the rest of `stream`'s response: its `grpc-status` and `grpc-message`, or
    /// `None` if the stream was reset or the connection ended first.
    pub async fn grpc_status(&mut self, stream: u32, ack_pings: bool) -> Option<(String, String)> {
        loop {
            let f = self.read(ack_pings).await.ok()?;
            if f.kind == HEADERS {
                // Every header block goes through the decoder: its table is the connection's.
                let fields = self.hpack.decode(&f.payload).ok()?;
                if f.stream != stream {
                    continue;
                }
                let get = |n: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k.as_slice() == n.as_bytes())
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                };
                if let Some(status) = get("grpc-status") {
                    let msg = get("grpc-message").unwrap_or_default();
                    return Some((status, percent_decode(&msg)));
                }
            } else if f.kind == RST_STREAM && f.stream == stream {
                return None;
            }
        }
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
