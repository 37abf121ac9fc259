//! The PKI `plinth gen config` makes: one CA per cluster, a server certificate per node, and
//! client certificates whose Organization is the holder's role.
//!
//! Keys are ECDSA P-256. Validity: CA 10 years, node server certificates 10 years (nodes have no
//! rotation yet, and an expired node certificate locks everyone out), client certificates 1 year.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::role::Role;

/// A certificate and its private key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// Making or loading a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being made.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

fn ctx(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Rcgen {
        what: what.into(),
        source,
    }
}

/// A certificate authority: its certificate and key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ca(pub Identity);

/// What a client certificate should say. Tests use the odd settings to make certificates that
/// must be refused (expired, not yet valid, no client-auth usage).
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Common name (the operator's name).
    pub common_name: String,
    /// Organization: the role (`None` makes a certificate with no role).
    pub organization: Option<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether to mark the certificate for client authentication.
    pub client_auth: bool,
}

impl ClientSpec {
    /// A normal client certificate for `role`, valid from a minute ago for a year.
    pub fn new(common_name: &str, role: Role) -> Self {
        let now = OffsetDateTime::now_utc();
        ClientSpec {
            common_name: common_name.into(),
            organization: Some(role.as_str().into()),
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::days(365),
            client_auth: true,
        }
    }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

impl Ca {
    /// A new self-signed CA named after the cluster.
    pub fn generate(cluster: &str) -> Result<Ca, PkiError> {
        Ca::generate_named(&format!("plinth CA {cluster}"))
    }

    /// A new self-signed CA with this common name (etcd's CA is one of its own: a certificate
    /// it signs opens etcd, not the node API).
    pub fn generate_named(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(ctx("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, Some("plinth"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(1);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(ctx("self-signing the CA"))?;
        Ok(Ca(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.0.cert_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.0.key_pem).map_err(ctx("reading the CA key"))?;
        Issuer::from_ca_cert_pem(&self.0.cert_pem, key).map_err(ctx("reading the CA certificate"))
    }

    /// A server certificate for a node, valid for the given names and addresses.
    pub fn issue_server(&self, node: &str, sans: &[String]) -> Result<Identity, PkiError> {
        self.issue_for_names(node, sans, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// An etcd member's certificate: etcd serves clients and peers and dials peers with the
    /// same one, so it is marked for both ends.
    pub fn issue_member(&self, node: &str, sans: &[String]) -> Result<Identity, PkiError> {
        self.issue_for_names(
            node,
            sans,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A certificate valid for ten years (nodes have no rotation yet) for these names.
    fn issue_for_names(
        &self,
        node: &str,
        sans: &[String],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Result<Identity, PkiError> {
        let key = KeyPair::generate().map_err(ctx("generating the server key"))?;
        let mut params =
            CertificateParams::new(sans.to_vec()).map_err(ctx("reading the server names"))?;
        params.distinguished_name = name(node, None);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(1);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(ctx("signing the server certificate"))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate as `spec` says.
    pub fn issue_client(&self, spec: &ClientSpec) -> Result<Identity, PkiError> {
        let key = KeyPair::generate().map_err(ctx("generating the client key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name, spec.organization.as_deref());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if spec.client_auth {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(ctx("signing the client certificate"))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A self-signed server certificate (the maintenance API's, made at boot).
pub fn self_signed_server(name: &str, sans: &[String]) -> Result<Identity, PkiError> {
    let key = KeyPair::generate().map_err(ctx("generating the maintenance key"))?;
    let mut params =
        CertificateParams::new(sans.to_vec()).map_err(ctx("reading the server names"))?;
    params.distinguished_name = name_dn(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(365);
    let cert = params
        .self_signed(&key)
        .map_err(ctx("self-signing the maintenance certificate"))?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn name_dn(cn: &str) -> DistinguishedName {
    name(cn, None)
}

/// SHA-256 of a certificate (DER), lowercase hex: what `--cert-fingerprint` compares.
pub fn fingerprint_der(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of a certificate (PEM), lowercase hex.
pub fn fingerprint(cert_pem: &str) -> Option<String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .ok()
        .map(|c| fingerprint_der(&c))
}

/// The Organization of a certificate (the role, for client certificates), from PEM or DER.
pub fn organization(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let org = cert.subject().iter_organization().next()?;
    org.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_slice(pem.as_bytes())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn a_client_certificate_carries_its_role_as_organization() {
        let ca = Ca::generate("test").expect("ca");
        let id = ca
            .issue_client(&ClientSpec::new("alice", Role::Operator))
            .expect("client");
        assert_eq!(
            organization(&der(&id.cert_pem)).as_deref(),
            Some("os:operator")
        );
    }

    #[test]
    fn a_server_certificate_is_signed_by_the_ca() {
        let ca = Ca::generate("test").expect("ca");
        let id = ca
            .issue_server("node-1", &["127.0.0.1".into(), "node-1".into()])
            .expect("server");
        let cert_der = der(&id.cert_pem);
        let ca_der = der(ca.cert_pem());
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).expect("parse");
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("parse ca");
        assert_eq!(cert.issuer(), ca_cert.subject());
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
    }
}
