//! A bundle server on 127.0.0.1 for URL pulls, plain or over TLS, behaving as a test needs.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How the server answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// The whole bundle, honouring `Range`.
    Whole,
    /// Headers, then one byte every interval, forever.
    Trickle(Duration),
    /// The first response breaks off half-way; a resume answers from the wrong offset.
    BadResume,
    /// The first response breaks off half-way; later requests get the range they ask for.
    BreakOnce,
}

/// The `Range` headers a server was sent.
pub type Ranges = Arc<std::sync::Mutex<Vec<String>>>;

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    data: &[u8],
    how: Behaviour,
    first: bool,
    ranges: Ranges,
) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req).to_lowercase();
    let range = text
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.trim().trim_end_matches('-').parse::<usize>().ok());
    if let Some(n) = range {
        ranges.lock().expect("ranges").push(format!("bytes={n}-"));
    }
    let len = data.len();
    match (how, range) {
        (Behaviour::Trickle(every), _) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for b in data {
                if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        }
        (Behaviour::BadResume, Some(n)) => {
            // Says it starts at 0, whatever was asked.
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes 0-{}/{len}\r\nConnection: close\r\n\r\n",
                len - n,
                len - n - 1
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&data[..len - n]).await;
        }
        (Behaviour::BadResume | Behaviour::BreakOnce, None) if first => {
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&data[..len / 2]).await;
        }
        (_, Some(n)) => {
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {n}-{}/{len}\r\nConnection: close\r\n\r\n",
                len - n,
                len - 1
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&data[n..]).await;
        }
        (_, None) => {
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(data).await;
        }
    }
    let _ = s.shutdown().await;
}

/// Serves `data` as `how` says, over TLS with `tls` if given; returns the URL.
pub async fn serve(
    data: Vec<u8>,
    how: Behaviour,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> String {
    serve_logged(data, how, tls).await.0
}

/// [`serve`], and the `Range` headers it is sent.
pub async fn serve_logged(
    data: Vec<u8>,
    how: Behaviour,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (String, Ranges) {
    let ranges = Ranges::default();
    let seen = ranges.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let data = Arc::new(data);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((tcp, _)) = listener.accept().await {
            let (data, acceptor, seen) = (data.clone(), acceptor.clone(), seen.clone());
            let was_first = std::mem::replace(&mut first, false);
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(tcp).await {
                            answer(s, &data, how, was_first, seen).await;
                        }
                    }
                    None => answer(tcp, &data, how, was_first, seen).await,
                }
            });
        }
    });
    (format!("{scheme}://{addr}/bundle.plinth"), ranges)
}

/// A CA and a TLS server config for 127.0.0.1 signed by it: (CA PEM, config).
pub fn https_identity() -> (String, Arc<rustls::ServerConfig>) {
    let ca = api::pki::Ca::generate("bundles").expect("ca");
    let id = ca
        .issue_server("bundles", &["127.0.0.1".to_string()])
        .expect("server cert");
    let config = rustls::ServerConfig::builder_with_provider(api::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            api::tls::certs(&id.cert_pem, "cert").expect("certs"),
            api::tls::key(&id.key_pem, "key").expect("key"),
        )
        .expect("server config");
    (ca.cert_pem().to_string(), Arc::new(config))
}
