//! UEFI Secure Boot keys for Plinth images: the platform key (PK), key-exchange key (KEK) and
//! signature database key (db), the signed EFI signature lists a firmware enrols, Authenticode
//! signatures on UKIs, and the key that signs PCR 11 policies for the TPM.
//!
//! Host tools: `openssl` (RSA-2048 keys and self-signed X.509 certificates: UEFI firmware
//! verifies RSA-2048 with SHA-256, and rcgen over ring cannot make RSA keys) and sbsigntool
//! (`sbvarsign` writes the authenticated variables, `sbsign` the Authenticode signature of a
//! PE image). No maintained Rust crate writes either format, and sbsigntool is what Linux
//! distributions sign their boot chains with.
//!
//! The chain: PK signs the KEK list and itself (a firmware in Setup Mode accepts a PK that is
//! self-signed), KEK signs the db list, and db's key signs every UKI. A firmware with these
//! enrolled boots only UKIs signed by db's key.

use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

use crate::tools::{require, run};
use crate::ImageError;

/// The variables a firmware enrols, in the order a Setup Mode machine must take them (PK
/// last: enrolling it ends Setup Mode).
pub const ENROL_ORDER: [&str; 3] = ["db", "KEK", "PK"];
/// `EFI_CERT_X509_GUID`: a signature list of X.509 certificates.
const CERT_X509: Uuid = uuid::uuid!("a5c059a1-94e4-4aa7-87b5-ab155c2bf072");
/// The attributes every Secure Boot variable is written with (and which its signature covers):
/// non-volatile, boot and runtime access, time-based authenticated writes.
pub const AUTH_ATTRIBUTES: &str =
    "NON_VOLATILE,BOOTSERVICE_ACCESS,RUNTIME_ACCESS,TIME_BASED_AUTHENTICATED_WRITE_ACCESS";

/// A directory of Secure Boot keys, as `plinth gen secureboot-keys` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The directory.
    pub dir: PathBuf,
}

impl Keys {
    /// The private key of `var` (`PK`, `KEK`, `db`).
    pub fn key(&self, var: &str) -> PathBuf {
        self.dir.join(format!("{var}.key"))
    }

    /// The certificate of `var` (PEM).
    pub fn cert(&self, var: &str) -> PathBuf {
        self.dir.join(format!("{var}.crt"))
    }

    /// The signed signature list a firmware enrols as `var`.
    pub fn auth(&self, var: &str) -> PathBuf {
        self.dir.join(format!("{var}.auth"))
    }

    /// The private key that signs PCR 11 policies (RSA-2048, PKCS#8 PEM).
    pub fn pcr_key(&self) -> PathBuf {
        self.dir.join("pcr-signing.key")
    }

    /// Its public key (SubjectPublicKeyInfo PEM), carried in every UKI as `.pcrpkey`.
    pub fn pcr_public(&self) -> PathBuf {
        self.dir.join("pcr-signing.pem")
    }

    /// The keys in `dir`, checked to be all there.
    pub fn load(dir: &Path) -> Result<Keys, ImageError> {
        let keys = Keys {
            dir: dir.to_path_buf(),
        };
        let mut needed: Vec<PathBuf> = Vec::new();
        for v in ENROL_ORDER {
            needed.extend([keys.key(v), keys.cert(v), keys.auth(v)]);
        }
        needed.extend([keys.pcr_key(), keys.pcr_public()]);
        if let Some(missing) = needed.iter().find(|p| !p.is_file()) {
            return Err(ImageError::Invalid(format!(
                "{} is not a Secure Boot key directory: {} is missing (plinth gen secureboot-keys writes one)",
                dir.display(),
                missing.display()
            )));
        }
        Ok(keys)
    }
}

/// An EFI signature list holding one X.509 certificate (DER) owned by `owner`.
pub fn esl(owner: Uuid, cert_der: &[u8]) -> Vec<u8> {
    let entry = 16 + cert_der.len();
    let mut out = Vec::with_capacity(28 + entry);
    out.extend_from_slice(&CERT_X509.to_bytes_le());
    out.extend_from_slice(&((28 + entry) as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(entry as u32).to_le_bytes());
    out.extend_from_slice(&owner.to_bytes_le());
    out.extend_from_slice(cert_der);
    out
}

fn restrict(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(ImageError::io("restricting", path))
}

/// Generates a key directory for `name` (used in the certificates' names). Refuses to replace
/// keys already there: machines enrolled with them would boot nothing signed by new ones.
pub fn generate(dir: &Path, name: &str) -> Result<Keys, ImageError> {
    require(&[("openssl", "openssl"), ("sbvarsign", "sbsigntool")])?;
    let keys = Keys {
        dir: dir.to_path_buf(),
    };
    if keys.key("PK").exists() {
        return Err(ImageError::Invalid(format!(
            "{} already holds Secure Boot keys; machines enrolled with them boot only what they sign, so they are not replaced",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(ImageError::io("creating", dir))?;
    let owner = Uuid::new_v4();
    let guid = dir.join("owner.guid");
    std::fs::write(&guid, format!("{owner}\n")).map_err(ImageError::io("writing", &guid))?;
    for var in ENROL_ORDER {
        let (key, cert) = (keys.key(var), keys.cert(var));
        run(Command::new("openssl")
            .args([
                "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
            ])
            .args(["-days", "3650", "-subj"])
            .arg(format!("/CN={name} Secure Boot {var}/"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        restrict(&key)?;
        let der = dir.join(format!("{var}.der"));
        run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .arg("-out")
            .arg(&der))?;
        let cert_der = std::fs::read(&der).map_err(ImageError::io("reading", &der))?;
        let list = dir.join(format!("{var}.esl"));
        std::fs::write(&list, esl(owner, &cert_der)).map_err(ImageError::io("writing", &list))?;
    }
    // PK signs itself and the KEK list; KEK signs the db list.
    for (var, signer) in [("PK", "PK"), ("KEK", "PK"), ("db", "KEK")] {
        run(Command::new("sbvarsign")
            .args(["--attr", AUTH_ATTRIBUTES, "--key"])
            .arg(keys.key(signer))
            .arg("--cert")
            .arg(keys.cert(signer))
            .arg("--output")
            .arg(keys.auth(var))
            .arg(var)
            .arg(dir.join(format!("{var}.esl"))))?;
    }
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(keys.pcr_key()))?;
    restrict(&keys.pcr_key())?;
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(keys.pcr_key())
        .arg("-out")
        .arg(keys.pcr_public()))?;
    Keys::load(dir)
}

/// The `.pcrsig` document approving PCR 11 = `pcr11`, signed with the PCR policy key
/// (RSASSA-PKCS1-v1_5 with SHA-256, as systemd-measure signs).
pub fn sign_pcr11(keys: &Keys, pcr11: &[u8; 32]) -> Result<Vec<u8>, ImageError> {
    let path = keys.pcr_key();
    let pem = std::fs::read(&path).map_err(ImageError::io("reading", &path))?;
    let bad = |why: String| ImageError::Invalid(format!("{}: {why}", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(e.to_string()))?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&pem.contents)
        .map_err(|e| bad(format!("not an RSA PKCS#8 key: {e}")))?;
    let public_path = keys.pcr_public();
    let public = std::fs::read(&public_path).map_err(ImageError::io("reading", &public_path))?;
    let public = tpm::policy::RsaPublic::from_pem(&public).map_err(|e| bad(e.to_string()))?;
    let doc = tpm::policy::PcrSignature::sign(pcr11, &public, |msg| {
        let mut sig = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            msg,
            &mut sig,
        )
        .map_err(|_| tpm::TpmError::Key("signing the PCR policy failed".into()))?;
        Ok(sig)
    })
    .map_err(|e| bad(e.to_string()))?;
    serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))
}

/// Signs the PE image `path` in place with db's key (Authenticode, as the firmware checks it).
pub fn sign_pe(keys: &Keys, path: &Path) -> Result<(), ImageError> {
    require(&[("sbsign", "sbsigntool")])?;
    let signed = path.with_extension("signed");
    run(Command::new("sbsign")
        .arg("--key")
        .arg(keys.key("db"))
        .arg("--cert")
        .arg(keys.cert("db"))
        .arg("--output")
        .arg(&signed)
        .arg(path))?;
    std::fs::rename(&signed, path).map_err(ImageError::io("replacing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_list_holds_one_owned_certificate() {
        let owner = uuid::uuid!("11111111-2222-3333-4444-555555555555");
        let l = esl(owner, b"CERT");
        assert_eq!(l.len(), 28 + 16 + 4);
        // The type GUID in the firmware's byte order (first three fields little-endian).
        assert_eq!(&l[..4], &[0xa1, 0x59, 0xc0, 0xa5]);
        assert_eq!(u32::from_le_bytes(l[16..20].try_into().expect("4")), 48);
        assert_eq!(u32::from_le_bytes(l[20..24].try_into().expect("4")), 0);
        assert_eq!(u32::from_le_bytes(l[24..28].try_into().expect("4")), 20);
        assert_eq!(&l[28..32], &[0x11, 0x11, 0x11, 0x11]);
        assert_eq!(&l[44..], b"CERT");
    }

    /// With openssl and sbsigntool (which `./x test` installs): the keys, lists and a signed
    /// PE verify as a firmware will check them.
    #[test]
    fn generated_keys_sign_lists_and_images_that_verify() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = generate(&dir.path().join("keys"), "test").expect("generate");
        for var in ENROL_ORDER {
            let auth = std::fs::read(keys.auth(var)).expect("auth");
            let list = std::fs::read(dir.path().join(format!("keys/{var}.esl"))).expect("esl");
            // EFI_VARIABLE_AUTHENTICATION_2 (time, then a WIN_CERTIFICATE_UEFI_GUID whose
            // length covers the PKCS#7), then the list itself.
            let cert_len = u32::from_le_bytes(auth[16..20].try_into().expect("4")) as usize;
            assert_eq!(&auth[16 + cert_len..], &list[..], "{var}");
            assert_eq!(&auth[20..22], &[0x00, 0x02], "{var}: WIN_CERT_REVISION 2.0");
            assert_eq!(
                &auth[22..24],
                &[0xf1, 0x0e],
                "{var}: WIN_CERT_TYPE_EFI_GUID"
            );
        }
        let pe = dir.path().join("stub.efi");
        std::fs::copy(crate::uki::STUB, &pe).expect("copy the stub");
        sign_pe(&keys, &pe).expect("sign");
        let out = Command::new("sbverify")
            .arg("--cert")
            .arg(keys.cert("db"))
            .arg(&pe)
            .output()
            .expect("sbverify");
        assert!(out.status.success(), "{out:?}");
        let other = Command::new("sbverify")
            .arg("--cert")
            .arg(keys.cert("KEK"))
            .arg(&pe)
            .output()
            .expect("sbverify");
        assert!(!other.status.success(), "only db's key signs images");
        assert!(
            generate(&dir.path().join("keys"), "again").is_err(),
            "keys are never replaced"
        );
        // The PCR policy signature verifies with the public key the UKI carries.
        let doc = sign_pcr11(&keys, &[3; 32]).expect("sign");
        let doc = tpm::policy::PcrSignature::parse(&doc).expect("parse");
        let public =
            tpm::policy::RsaPublic::from_pem(&std::fs::read(keys.pcr_public()).expect("public"))
                .expect("public key");
        let pol = tpm::policy::approved_policy(&[3; 32]);
        let sig = doc.find(&public.fingerprint, &pol).expect("signed");
        ring::signature::RsaPublicKeyComponents {
            n: public.modulus.as_slice(),
            e: &public.exponent.to_be_bytes()[1..],
        }
        .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &pol, &sig)
        .expect("verifies");
        let mode = |p: PathBuf| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
        };
        assert_eq!(mode(keys.key("PK")), 0o600);
        assert_eq!(mode(keys.pcr_key()), 0o600);
    }
}
