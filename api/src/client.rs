//! Connecting to a node, as `plinth` does.
//!
//! TLS is done here (tokio-rustls under a tonic connector) rather than by tonic, so the client
//! controls the protocol version and can explain a refused handshake in words: with TLS 1.3 the
//! server judges the client certificate after the client thinks the handshake is over, so the
//! refusal arrives as an alert on the first call, deep in an error chain.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::machine_client::MachineClient;
use crate::tls::{self, TlsError};

/// The default API port.
pub const DEFAULT_PORT: u16 = 50000;

/// How long to wait for TCP + TLS before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a unary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Connecting or calling failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not `host[:port]`.
    #[error("endpoint {0:?} is not host[:port]")]
    BadEndpoint(String),
    /// The client's TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The context has no client certificate.
    #[error("the client config has no client certificate and key: the node requires one (run `plinth gen config` or `plinth gen client`)")]
    NoClientCertificate,
    /// The connection could not be made.
    #[error("connecting to {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// What went wrong, in words.
        reason: String,
    },
}

/// Splits `host[:port]` (IPv6 as `[addr]:port`) into host and port.
pub fn split_endpoint(endpoint: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadEndpoint(endpoint.into());
    if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(bad()),
        };
        return Ok((host.into(), port));
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Ok((host.into(), port.parse().map_err(|_| bad())?))
        }
        None if !endpoint.is_empty() => Ok((endpoint.into(), DEFAULT_PORT)),
        _ => Err(bad()),
    }
}

/// The TLS config for a client context: its CA and, if present, its certificate and key.
pub fn context_tls(ctx: &config::Context) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let identity = match (&ctx.cert, &ctx.key) {
        (Some(c), Some(k)) => Some((c.as_str(), k.as_str())),
        _ => None,
    };
    Ok(tls::client_config(&ctx.ca, identity)?)
}

/// Connects to `endpoint` with `tls`. Fails within [`CONNECT_TIMEOUT`] if the node does not
/// answer.
pub async fn connect(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<MachineClient<Channel>, ClientError> {
    connect_with(endpoint, tls, Some(CALL_TIMEOUT)).await
}

/// Like [`connect`], with no limit on how long a call may take (an upload of a large bundle):
/// HTTP/2 keepalive PINGs notice a node that is gone instead. The node bounds the call itself
/// (its upgrade deadlines).
pub async fn connect_context_long(
    endpoint: &str,
    ctx: &config::Context,
) -> Result<MachineClient<Channel>, ClientError> {
    if ctx.cert.is_none() || ctx.key.is_none() {
        return Err(ClientError::NoClientCertificate);
    }
    connect_with(endpoint, context_tls(ctx)?, None).await
}

async fn connect_with(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    call_timeout: Option<Duration>,
) -> Result<MachineClient<Channel>, ClientError> {
    Ok(MachineClient::new(
        channel_with(endpoint, tls, call_timeout).await?,
    ))
}

/// A channel to `endpoint` over `tls`, for any of the node's services (health, reflection).
pub async fn channel(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ClientError> {
    channel_with(endpoint, tls, Some(CALL_TIMEOUT)).await
}

async fn channel_with(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    call_timeout: Option<Duration>,
) -> Result<Channel, ClientError> {
    let (host, port) = split_endpoint(endpoint)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ClientError::BadEndpoint(endpoint.into()))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let uri = format!("http://{addr}");
    let channel = Endpoint::from_shared(uri)
        .map_err(|_| ClientError::BadEndpoint(endpoint.into()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = match call_timeout {
        Some(t) => channel.timeout(t),
        None => channel,
    };
    let channel = channel
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out")
                    })??;
                tcp.set_nodelay(true)?;
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "TLS handshake timed out",
                            )
                        })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            endpoint: endpoint.into(),
            reason: describe(&e),
        })?;
    Ok(channel)
}

/// Connects to a node in maintenance mode: no client certificate, the node's self-signed
/// certificate accepted (pinned by `fingerprint` if given).
pub async fn connect_insecure(
    endpoint: &str,
    fingerprint: Option<String>,
) -> Result<MachineClient<Channel>, ClientError> {
    connect(endpoint, tls::insecure_client_config(fingerprint)?).await
}

/// The SHA-256 fingerprint of the certificate the node at `endpoint` presents (one TLS
/// handshake, nothing sent): what an operator compares with the node's console before trusting
/// it.
pub async fn server_fingerprint(endpoint: &str) -> Result<String, ClientError> {
    let (host, port) = split_endpoint(endpoint)?;
    let (tls, seen) = tls::recording_client_config()?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ClientError::BadEndpoint(endpoint.into()))?;
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let failed = |reason: String| ClientError::Connect {
        endpoint: endpoint.into(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| failed("TCP connect timed out".into()))?
        .map_err(|e| failed(describe(&e)))?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    .map_err(|_| failed("TLS handshake timed out".into()))?
    .map_err(|e| failed(describe(&e)))?;
    let fp = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    fp.ok_or_else(|| failed("the node presented no certificate".into()))
}

/// Connects with a client context, refusing early (and saying why) when it lacks a certificate.
pub async fn connect_context(
    endpoint: &str,
    ctx: &config::Context,
) -> Result<MachineClient<Channel>, ClientError> {
    if ctx.cert.is_none() || ctx.key.is_none() {
        return Err(ClientError::NoClientCertificate);
    }
    connect(endpoint, context_tls(ctx)?).await
}

/// An error (and its sources) in words an operator can act on.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let chain = sequencer::runner::chain(err);
    let hint = if chain.contains("CertificateRequired") {
        Some("the node requires a client certificate and none was presented")
    } else if chain.contains("UnknownCA")
        || chain.contains("BadCertificate")
        || chain.contains("DecryptError")
    {
        Some("the node refused this client's certificate: it is not signed by the node's CA")
    } else if chain.contains("alert: CertificateExpired") {
        // rustls sends the same alert for both ends of the validity window.
        Some("the node refused this client's certificate: it is expired or not valid yet")
    } else if chain.contains("invalid peer certificate: Expired")
        || chain.contains("invalid peer certificate: NotValidYet")
    {
        Some("the node's certificate is expired or not valid yet (check both clocks)")
    } else if chain.contains("UnsupportedCertificate") {
        Some("the node refused this client's certificate: it is not marked for client authentication")
    } else if chain.contains("invalid peer certificate") {
        Some("the node's certificate is not signed by the CA in this client config")
    } else if chain.contains("Connection refused") {
        Some("nothing is listening there (is the node up?)")
    } else if chain.contains("TimeoutExpired") || chain.contains("Timeout expired") {
        Some("the node did not answer within the call's 60 s")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{h} ({chain})"),
        None => chain,
    }
}

/// A failed call in words: the status message, plus the transport cause when there is one.
pub fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error;
    match status.source() {
        Some(_) => describe(status),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port_with_a_default_port() {
        assert_eq!(
            split_endpoint("10.0.0.1").ok(),
            Some(("10.0.0.1".into(), 50000))
        );
        assert_eq!(
            split_endpoint("127.0.0.1:4000").ok(),
            Some(("127.0.0.1".into(), 4000))
        );
        assert_eq!(
            split_endpoint("[::1]:4000").ok(),
            Some(("::1".into(), 4000))
        );
        assert_eq!(
            split_endpoint("node-1").ok(),
            Some(("node-1".into(), 50000))
        );
        assert!(split_endpoint("").is_err());
        assert!(split_endpoint("host:port").is_err());
    }
}
