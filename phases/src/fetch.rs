//! Pulling a bundle over HTTP, resuming with a `Range` request where a connection broke off.
//!
//! Plain HTTP only: a bundle's integrity and origin come from its signature, checked before
//! anything is written, not from the transport (as with RAUC or TUF-based updaters).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::upgrade::Source;

/// Attempts after the first before giving up.
const RETRIES: u32 = 5;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an `http://` URL.
    #[error("{0:?} is not an http:// URL (the bundle's signature, not the transport, is what is trusted)")]
    BadUrl(String),
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

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

impl Pull {
    /// A response body from `offset` on.
    async fn open(&mut self) -> Result<Incoming, std::io::Error> {
        let mut req = hyper::Request::get(self.uri.clone());
        if self.offset > 0 {
            req = req.header(hyper::header::RANGE, format!("bytes={}-", self.offset));
        }
        let req = req.body(Empty::new()).map_err(io_err)?;
        let resp = self.client.request(req).await.map_err(io_err)?;
        match (resp.status().as_u16(), self.offset) {
            (200, 0) | (206, _) => Ok(resp.into_body()),
            (200, _) => Err(io_err(format!(
                "{} ignored the range request: cannot resume",
                self.uri
            ))),
            (code, _) => Err(io_err(format!("{} answered HTTP {code}", self.uri))),
        }
    }

    /// The next piece of the bundle; a broken connection is reopened from where it stopped.
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if self.body.is_none() {
                match self.open().await {
                    Ok(b) => self.body = Some(b),
                    Err(e) => {
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

/// The bundle at `url`, as a reader.
pub fn http_source(url: &str) -> Result<Source, FetchError> {
    let uri: hyper::Uri = url.parse().map_err(|_| FetchError::BadUrl(url.into()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(FetchError::BadUrl(url.into()));
    }
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
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
