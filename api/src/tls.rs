//! rustls configurations for both ends.
//!
//! The server speaks TLS 1.3 only and, in normal operation, requires a client certificate that
//! chains to the node's CA (webpki checks the chain, the validity dates and the client-auth
//! usage). The client checks the server certificate against the same CA.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block could not be read.
    #[error("{what}: not valid PEM ({reason})")]
    Pem {
        /// Which PEM.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built.
        what: &'static str,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built.
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider every config uses (ring: builds with only a C compiler).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates in a PEM text.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM text.
pub fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "adding the CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

fn tls13_server() -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "selecting TLS 1.3",
            source,
        })
}

/// The node's server config: TLS 1.3, client certificate required and checked against `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()?;
    let mut config = tls13_server()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "server certificate")?,
            key(key_pem, "server key")?,
        )
        .map_err(|source| TlsError::Rustls {
            what: "loading the server certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The maintenance server config: TLS 1.3, no client certificate (the node has no CA yet).
pub fn server_config_without_client_auth(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = tls13_server()?
        .with_no_client_auth()
        .with_single_cert(
            certs(cert_pem, "server certificate")?,
            key(key_pem, "server key")?,
        )
        .map_err(|source| TlsError::Rustls {
            what: "loading the server certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts a node's self-signed maintenance certificate: any certificate, or with
/// `fingerprint`, only the one whose SHA-256 is that. The handshake signature is still checked.
#[derive(Debug)]
struct Insecure {
    fingerprint: Option<String>,
    /// Where the certificate's fingerprint is recorded (trust on first use), if anywhere.
    seen: Option<SeenFingerprint>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Insecure {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(seen) = &self.seen {
            *seen.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(crate::pki::fingerprint_der(end_entity));
        }
        match &self.fingerprint {
            Some(want)
                if crate::pki::fingerprint_der(end_entity)
                    != want.to_ascii_lowercase().replace(':', "") =>
            {
                Err(rustls::Error::General(format!(
                    "the node's certificate fingerprint is {}, not {want}",
                    crate::pki::fingerprint_der(end_entity)
                )))
            }
            _ => Ok(rustls::client::danger::ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where [`recording_client_config`] puts the fingerprint it saw.
pub type SeenFingerprint = Arc<std::sync::Mutex<Option<String>>>;

/// A client config that accepts any server certificate and records its SHA-256 fingerprint in
/// the returned cell (for `plinth apply-config --insecure` without `--cert-fingerprint`).
pub fn recording_client_config() -> Result<(Arc<ClientConfig>, SeenFingerprint), TlsError> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    Ok((insecure(None, Some(seen.clone()))?, seen))
}

/// A client config for a node in maintenance mode (`plinth apply-config --insecure`).
pub fn insecure_client_config(fingerprint: Option<String>) -> Result<Arc<ClientConfig>, TlsError> {
    insecure(fingerprint, None)
}

fn insecure(
    fingerprint: Option<String>,
    seen: Option<SeenFingerprint>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "selecting TLS 1.3",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Insecure {
            fingerprint,
            seen,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting `ca_pem`, presenting `identity` (certificate, key) if given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "selecting TLS 1.3",
            source,
        })?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match identity {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert, "client certificate")?, key(k, "client key")?)
            .map_err(|source| TlsError::Rustls {
                what: "loading the client certificate and key",
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
