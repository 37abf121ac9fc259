//! Pulling a bundle over HTTP or HTTPS, resuming with a `Range` request where a connection
//! broke off.
//!
//! A bundle's integrity and origin come from its signature, checked before anything is
//! written (as with RAUC or TUF-based updaters); HTTPS keeps what is fetched private and the
//! server honest about who it is. HTTPS servers are checked against the CA certificates in the
//! node config (`machine.upgrade.ca`), not a built-in list: a node trusts only what it is told.
//! A resumed download must come back with a `Content-Range` that starts where the last one
//! stopped. Deadlines (nothing received for a while, the whole bundle not in time) are the
//! caller's: see [`crate::upgrade::Deadlines`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::upgrade::Source;

/// Attempts after the first before giving up.
const RETRIES: u32 = 5;
/// A connection (TCP and TLS) not up within this is an attempt that failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pull cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an `http://` or `https://` URL.
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    /// An https:// URL without CA certificates to check it against.
    #[error("{0} is https://, but the node config has no CA certificates to check the server against (machine.upgrade.ca)")]
    NoCa(String),
    /// The CA certificates could not be read.
    #[error("machine.upgrade.ca: {0}")]
    BadCa(String),
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct Pull {
    client: HttpClient,
    uri: hyper::Uri,
    offset: u64,
    body: Option<Incoming>,
    failures: u32,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Whether a `Content-Range` header says the body starts at byte `offset`.
fn range_starts_at(header: Option<&hyper::header::HeaderValue>, offset: u64) -> bool {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split_once('-'))
        .and_then(|(start, _)| start.trim().parse::<u64>().ok())
        == Some(offset)
}

/// A failure that retrying will not mend.
struct Fatal(std::io::Error);

impl Pull {
    /// A response body from `offset` on.
    async fn open(&mut self) -> Result<Incoming, Result<std::io::Error, Fatal>> {
        let mut req = hyper::Request::get(self.uri.clone());
        if self.offset > 0 {
            req = req.header(hyper::header::RANGE, format!("bytes={}-", self.offset));
        }
        let req = req.body(Empty::new()).map_err(|e| Err(Fatal(io_err(e))))?;
        let resp = match tokio::time::timeout(CONNECT_TIMEOUT, self.client.request(req)).await {
            Ok(r) => {
                r.map_err(|e| Ok(io_err(format!("requesting {}: {}", self.uri, chain(&e)))))?
            }
            Err(_) => {
                return Err(Ok(io_err(format!(
                    "{} did not answer within {}s",
                    self.uri,
                    CONNECT_TIMEOUT.as_secs()
                ))))
            }
        };
        match (resp.status().as_u16(), self.offset) {
            (200, 0) => Ok(resp.into_body()),
            (206, offset) => {
                if !range_starts_at(resp.headers().get(hyper::header::CONTENT_RANGE), offset) {
                    return Err(Err(Fatal(io_err(format!(
                        "{} resumed with Content-Range {:?}, not from byte {offset}",
                        self.uri,
                        resp.headers().get(hyper::header::CONTENT_RANGE)
                    )))));
                }
                Ok(resp.into_body())
            }
            (200, _) => Err(Err(Fatal(io_err(format!(
                "{} ignored the range request: cannot resume",
                self.uri
            ))))),
            (code, _) if (400..500).contains(&code) => Err(Err(Fatal(io_err(format!(
                "{} answered HTTP {code}",
                self.uri
            ))))),
            (code, _) => Err(Ok(io_err(format!("{} answered HTTP {code}", self.uri)))),
        }
    }

    /// The next piece of the bundle; a broken connection is reopened from where it stopped.
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if self.body.is_none() {
                match self.open().await {
                    Ok(b) => self.body = Some(b),
                    Err(Err(Fatal(e))) => return Some(Err(e)),
                    Err(Ok(e)) => {
                        if !self.retry(&e).await {
                            return Some(Err(e));
                        }
                        continue;
                    }
                }
            }
            let body = self.body.as_mut()?;
            match body.frame().await {
                None => return None,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.offset += data.len() as u64;
                        return Some(Ok(data));
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    let e = io_err(format!("connection broke off at byte {}: {e}", self.offset));
                    if !self.retry(&e).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    async fn retry(&mut self, e: &std::io::Error) -> bool {
        self.failures += 1;
        if self.failures > RETRIES {
            return false;
        }
        tracing::warn!(
            "{e}; resuming from byte {} (attempt {})",
            self.offset,
            self.failures + 1
        );
        tokio::time::sleep(Duration::from_millis(250 << self.failures.min(4))).await;
        true
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    sequencer::runner::chain(e)
}

/// The TLS client config for https:// pulls: TLS 1.2 or 1.3, servers checked against `ca_pem`.
fn tls(ca_pem: &str) -> Result<rustls::ClientConfig, FetchError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| FetchError::BadCa(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| FetchError::BadCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(FetchError::BadCa("no CERTIFICATE block".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::BadCa(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The bundle at `url`, as a reader; https:// servers are checked against `ca_pem`.
pub fn source(url: &str, ca_pem: Option<&str>) -> Result<Source, FetchError> {
    let uri: hyper::Uri = url.parse().map_err(|_| FetchError::BadUrl(url.into()))?;
    if uri.host().is_none() {
        return Err(FetchError::BadUrl(url.into()));
    }
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match uri.scheme_str() {
        Some("http") => builder
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| FetchError::BadCa(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .build(),
        Some("https") => {
            let ca = ca_pem.ok_or_else(|| FetchError::NoCa(url.into()))?;
            builder
                .with_tls_config(tls(ca)?)
                .https_only()
                .enable_http1()
                .build()
        }
        _ => return Err(FetchError::BadUrl(url.into())),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let pull = Pull {
        client,
        uri,
        offset: 0,
        body: None,
        failures: 0,
    };
    let stream =
        futures::stream::unfold(pull, |mut p| async move { p.next().await.map(|r| (r, p)) })
            .boxed();
    Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_must_start_where_the_last_read_stopped() {
        let v = |s: &str| hyper::header::HeaderValue::from_str(s).expect("header");
        assert!(range_starts_at(Some(&v("bytes 100-999/1000")), 100));
        assert!(!range_starts_at(Some(&v("bytes 0-999/1000")), 100));
        assert!(!range_starts_at(Some(&v("items 100-999/1000")), 100));
        assert!(!range_starts_at(None, 100));
    }

    #[test]
    fn only_http_and_https_urls_with_a_host_are_pulled() {
        assert!(matches!(
            source("ftp://x/b", None),
            Err(FetchError::BadUrl(_))
        ));
        assert!(matches!(
            source("/local/file", None),
            Err(FetchError::BadUrl(_))
        ));
        assert!(matches!(
            source("https://x/b", None),
            Err(FetchError::NoCa(_))
        ));
        assert!(source("http://x/b", None).is_ok());
    }
}
