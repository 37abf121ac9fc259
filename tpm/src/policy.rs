//! Policy arithmetic, done in software exactly as the TPM does it: what a sealed object's
//! policy is, what a PCR 11 policy signature signs, and what PCR 11 will hold after
//! systemd-stub has measured a UKI.
//!
//! Formats follow systemd 252 (Debian 12's `systemd-stub` and `systemd-measure`), so a UKI
//! built here carries the same `.pcrsig` a systemd tool would make: the signed policy is
//! `PolicyPCR(PCR 11)` from an all-zero digest, signed RSASSA-PKCS1-v1_5 with SHA-256; the
//! signature file is `{"sha256":[{"pcrs":[11],"pkfp":…,"pol":…,"sig":…}]}`.

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::TpmError;

/// `TPM_CC_PolicyPCR`.
pub const CC_POLICY_PCR: u32 = 0x17F;
/// `TPM_CC_PolicyAuthorize`.
pub const CC_POLICY_AUTHORIZE: u32 = 0x16A;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000B;

/// The PCR the Secure Boot state is measured into (firmware, UEFI spec).
pub const PCR_SECURE_BOOT: u32 = 7;
/// The PCR systemd-stub measures the UKI's sections into.
pub const PCR_UKI: u32 = 11;

/// SHA-256.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A `TPML_PCR_SELECTION` of `pcrs` in the SHA-256 bank.
pub fn pcr_selection(pcrs: &[u32]) -> Vec<u8> {
    let mut bitmap = [0u8; 3];
    for &p in pcrs {
        if let Some(b) = bitmap.get_mut(p as usize / 8) {
            *b |= 1 << (p % 8);
        }
    }
    let mut out = vec![0, 0, 0, 1];
    out.extend_from_slice(&ALG_SHA256.to_be_bytes());
    out.push(3);
    out.extend_from_slice(&bitmap);
    out
}

/// `TPM2_PolicyPCR`'s update of `digest` for `pcrs` holding `values` (in PCR order).
pub fn policy_pcr(digest: &[u8; 32], pcrs: &[u32], values: &[[u8; 32]]) -> [u8; 32] {
    let joined: Vec<u8> = values.iter().flatten().copied().collect();
    sha256(&[
        digest,
        &CC_POLICY_PCR.to_be_bytes(),
        &pcr_selection(pcrs),
        &sha256(&[&joined]),
    ])
}

/// `TPM2_PolicyAuthorize`'s digest for a signing key named `key_name`, with an empty policy
/// reference (the digest before it is discarded).
pub fn policy_authorize(key_name: &[u8]) -> [u8; 32] {
    let inner = sha256(&[&[0u8; 32], &CC_POLICY_AUTHORIZE.to_be_bytes(), key_name]);
    sha256(&[&inner])
}

/// The policy a volume key is sealed with: a PCR 11 policy signed by the key named
/// `key_name`, then PCR 7 holding `pcr7` (`None`: PCR 7 not bound).
pub fn sealing_policy(key_name: &[u8], pcr7: Option<&[u8; 32]>) -> [u8; 32] {
    let d = policy_authorize(key_name);
    match pcr7 {
        Some(v) => policy_pcr(&d, &[PCR_SECURE_BOOT], &[*v]),
        None => d,
    }
}

/// The policy a PCR 11 signature approves: PCR 11 holds `pcr11`.
pub fn approved_policy(pcr11: &[u8; 32]) -> [u8; 32] {
    policy_pcr(&[0u8; 32], &[PCR_UKI], &[*pcr11])
}

/// An RSA public key, as a TPM loads it for `TPM2_VerifySignature`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublic {
    /// The modulus (big-endian).
    pub modulus: Vec<u8>,
    /// The public exponent.
    pub exponent: u32,
    /// SHA-256 of the PKCS#1 `RSAPublicKey` DER: systemd's key fingerprint (`pkfp`).
    pub fingerprint: [u8; 32],
}

impl RsaPublic {
    /// From a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as `openssl pkey -pubout` writes it
    /// and a UKI's `.pcrpkey` carries it.
    pub fn from_pem(pem: &[u8]) -> Result<RsaPublic, TpmError> {
        let bad = |why: &str| TpmError::Key(format!("the PCR signing public key: {why}"));
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(pem).map_err(|e| bad(&format!("not PEM: {e}")))?;
        let (_, spki) =
            <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
                x509_parser::error::X509Error,
            >>::from_der(&pem.contents)
            .map_err(|e| bad(&format!("not a public key: {e}")))?;
        let parsed = spki
            .parsed()
            .map_err(|e| bad(&format!("unreadable: {e}")))?;
        let x509_parser::public_key::PublicKey::RSA(rsa) = parsed else {
            return Err(bad("not an RSA key"));
        };
        let modulus: Vec<u8> = rsa
            .modulus
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        let exponent = rsa
            .try_exponent()
            .map_err(|_| bad("its exponent is too large"))?;
        let exponent = u32::try_from(exponent).map_err(|_| bad("its exponent is too large"))?;
        if modulus.len() != 256 {
            return Err(bad(&format!(
                "{} bits; the TPM policy key must be RSA-2048",
                modulus.len() * 8
            )));
        }
        Ok(RsaPublic {
            modulus,
            exponent,
            fingerprint: sha256(&[&spki.subject_public_key.data]),
        })
    }

    /// Its `TPMT_PUBLIC`: a signing key (sign, decrypt, userWithAuth), SHA-256 name, no
    /// symmetric part or scheme, 2048 bits. The exponent is written out, not as 0 for the
    /// default, as systemd does (the name depends on it).
    pub fn tpmt_public(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + self.modulus.len());
        out.extend_from_slice(&0x0001u16.to_be_bytes()); // TPM_ALG_RSA
        out.extend_from_slice(&ALG_SHA256.to_be_bytes());
        out.extend_from_slice(&0x0006_0040u32.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes()); // authPolicy: empty
        out.extend_from_slice(&0x0010u16.to_be_bytes()); // symmetric: TPM_ALG_NULL
        out.extend_from_slice(&0x0010u16.to_be_bytes()); // scheme: TPM_ALG_NULL
        out.extend_from_slice(&2048u16.to_be_bytes());
        out.extend_from_slice(&self.exponent.to_be_bytes());
        out.extend_from_slice(&(self.modulus.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.modulus);
        out
    }

    /// Its TPM name: the name algorithm, then SHA-256 of its `TPMT_PUBLIC`.
    pub fn name(&self) -> Vec<u8> {
        let mut n = ALG_SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(&sha256(&[&self.tpmt_public()]));
        n
    }
}

/// The sections of a UKI that systemd-stub 252 measures into PCR 11, in the order it measures
/// them (its own fixed order, not the file's): `.pcrsig` is never measured.
pub const MEASURED_SECTIONS: [&str; 7] = [
    ".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey",
];

/// `PCR_Extend` in software.
pub fn extend(pcr: &[u8; 32], measurement: &[u8; 32]) -> [u8; 32] {
    sha256(&[pcr, measurement])
}

/// What PCR 11 holds once systemd-stub has measured a UKI with these `(name, contents)`
/// sections (the contents as the section's virtual size has them): for each measured section
/// present and not empty, in [`MEASURED_SECTIONS`] order, the name with its NUL, then the
/// contents.
pub fn predict_pcr11(sections: &[(&str, &[u8])]) -> [u8; 32] {
    let mut pcr = [0u8; 32];
    for name in MEASURED_SECTIONS {
        let Some((_, data)) = sections.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let mut with_nul = name.as_bytes().to_vec();
        with_nul.push(0);
        pcr = extend(&pcr, &sha256(&[&with_nul]));
        pcr = extend(&pcr, &sha256(&[data]));
    }
    pcr
}

/// One signed PCR policy, as in a `.pcrsig` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedPolicy {
    /// The PCRs (`[11]`).
    pub pcrs: Vec<u32>,
    /// The signing key's fingerprint (hex).
    pub pkfp: String,
    /// The approved policy digest (hex).
    pub pol: String,
    /// The RSASSA-PKCS1-v1_5 SHA-256 signature over the 32 policy bytes (base64).
    pub sig: String,
}

/// A `.pcrsig` document: signed policies per PCR bank.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcrSignature {
    /// Policies for the SHA-256 bank.
    #[serde(default)]
    pub sha256: Vec<SignedPolicy>,
}

impl PcrSignature {
    /// Parses one.
    pub fn parse(json: &[u8]) -> Result<PcrSignature, TpmError> {
        serde_json::from_slice(json).map_err(|e| {
            TpmError::Key(format!(
                "the PCR policy signature is not JSON of the expected shape: {e}"
            ))
        })
    }

    /// The signature (raw bytes) approving `policy` made by the key with `fingerprint`.
    pub fn find(&self, fingerprint: &[u8; 32], policy: &[u8; 32]) -> Option<Vec<u8>> {
        let (fp, pol) = (hex(fingerprint), hex(policy));
        self.sha256
            .iter()
            .find(|s| s.pcrs == [PCR_UKI] && s.pkfp == fp && s.pol == pol)
            .and_then(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(&s.sig)
                    .ok()
            })
    }

    /// A document with one signed policy: PCR 11 holding `pcr11`, approved by `sign` (which
    /// returns RSASSA-PKCS1-v1_5 SHA-256 over the bytes it is given) for the key `key`.
    pub fn sign(
        pcr11: &[u8; 32],
        key: &RsaPublic,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, TpmError>,
    ) -> Result<PcrSignature, TpmError> {
        let pol = approved_policy(pcr11);
        let sig = sign(&pol)?;
        Ok(PcrSignature {
            sha256: vec![SignedPolicy {
                pcrs: vec![PCR_UKI],
                pkfp: hex(&key.fingerprint),
                pol: hex(&pol),
                sig: base64::engine::general_purpose::STANDARD.encode(sig),
            }],
        })
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex (`None` if it is not hex).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> [u8; 32] {
        unhex(s)
            .and_then(|v| v.try_into().ok())
            .expect("32 bytes of hex")
    }

    /// systemd's test vector (test/units/testsuite-70.sh): a UKI with `.linux` "HALLO\n"
    /// and `.initrd` "foobar\n" measures to this.
    #[test]
    fn pcr11_is_what_systemd_measure_predicts() {
        let got = predict_pcr11(&[(".initrd", b"foobar\n"), (".linux", b"HALLO\n")]);
        assert_eq!(
            hex(&got),
            "37b48bd0b222394dbe3cceff2fca4660c4b0a90ae9369ec90b42f14489989c13"
        );
        let with_empty = predict_pcr11(&[
            (".initrd", b"foobar\n"),
            (".linux", b"HALLO\n"),
            (".splash", b""),
            (".pcrsig", b"{}"),
        ]);
        assert_eq!(
            got, with_empty,
            "empty and unmeasured sections change nothing"
        );
    }

    /// systemd's test vectors (src/test/test-tpm2.c): PolicyPCR over PCRs 4, 7, 8, from zero
    /// and applied twice.
    #[test]
    fn policy_pcr_is_the_tpms() {
        assert_eq!(
            pcr_selection(&[4, 7, 8]),
            [0, 0, 0, 1, 0, 0x0b, 3, 0x90, 0x01, 0]
        );
        let values = [
            h("368f85b3013041dfe203faaa364f00b07c5da7b1e5f1dbf2efb06fa6b9bd92de"),
            h("aa1154c9e0a774854ccbed4c8ce7e9b906b3d700a1a8db1772d0341a62dbe51b"),
            h("cfde439a2c06af3479ca6bdc60429b90553d65300c5cfcc40004a08c6b5ad81a"),
        ];
        let once = policy_pcr(&[0; 32], &[4, 7, 8], &values);
        assert_eq!(
            hex(&once),
            "76532a0e16f7e6bf6b02918c11f75d99d729fab0cc81d0df2c4284a2c4fe6e05"
        );
        assert_eq!(
            hex(&policy_pcr(&once, &[4, 7, 8], &values)),
            "97e64bcabb64c1fa4b726528644926c8029f5b4458b0575c98c04fe225629a0b"
        );
    }

    /// systemd's test vector (src/test/test-tpm2.c): PolicyAuthorize for a key with this name.
    #[test]
    fn policy_authorize_is_the_tpms() {
        let name = unhex("000be78f74a470dd92e979ca067cdb2293a35f075e8560b436bd2ccea5da21486a07")
            .expect("hex");
        assert_eq!(
            hex(&policy_authorize(&name)),
            "95213a3784eaab04f427bc7e8851c2f1df0903be8e42428ec25dcefd907baff1"
        );
    }

    /// systemd's test vectors (src/test/test-tpm2.c, where the PEM is hex-encoded): the name
    /// and fingerprint of RSA-2048 public keys, with the default exponent and another.
    #[test]
    fn an_rsa_keys_name_and_fingerprint_are_systemds() {
        let cases = [
            ("2d2d2d2d2d424547494e205055424c4943204b45592d2d2d2d2d0a4d494942496a414e42676b71686b6947397730424151454641414f43415138414d49494243674b4341514541795639434950652f505852337a436f63787045300a6a575262546c3568585844436b472f584b79374b6d2f4439584942334b734f5a31436a5937375571372f674359363170697838697552756a73413464503165380a593445336c68556d374a332b6473766b626f4b64553243626d52494c2f6675627771694c4d587a41673342575278747234547545443533527a373634554650640a307a70304b68775231496230444c67772f344e67566f314146763378784b4d6478774d45683567676b73733038326332706c354a504e32587677426f744e6b4d0a5471526c745a4a35355244436170696e7153334577376675646c4e735851357746766c7432377a7637344b585165616d704c59433037584f6761304c676c536b0a79754774586b6a50542f735542544a705374615769674d5a6f714b7479563463515a58436b4a52684459614c47587673504233687a766d5671636e6b47654e540a65774944415141420a2d2d2d2d2d454e44205055424c4943204b45592d2d2d2d2d0a",
             0x10001,
             "d9186d13a7fd5b3644cee05448f49ad3574e82a2942ff93cf89598d36cca78a9",
             "000be1bd75c7976e7a30e9e82223b81a9eff0d42c30618e588db592ed5da94455e81"),
            ("2d2d2d2d2d424547494e205055424c4943204b45592d2d2d2d2d0a4d494942496a414e42676b71686b6947397730424151454641414f43415138414d49494243674b434151454179566c7551664b75565171596a5a71436a657a760a364e4a6f58654c736f702f72765375666330773769544d4f73566741557462515452505451725874397065537a4370524467634378656b6a544144577279304b0a6d59786a7a3634776c6a7030463959383068636a6b6b4b3759414d333054664c4648656c2b377574427370777142467a6e2b385a6659567353434b397354706f0a316c61376e5347514e7451576f36444a366c525a336a676d6d584f61544654416145304a432b7046584273564471736d46326438362f314e51714a755a5154520a575852636954704e58357649792f37766b6c5a6a685569526c78764e594f4e3070636476534a37364e74496e447a3048506f775a38705a454f4d2f4a454f59780a617a4c4a6a644936446b355279593578325a7949375074566a3057537242524f4d696f2b674c6556457a43343456336438315a38445138564e334c69625130330a70514944415141460a2d2d2d2d2d454e44205055424c4943204b45592d2d2d2d2d0a",
             0x10005,
             "c8ca80a687d5972e1d961aaa2cfde2ff2e7a20d85e3ea0382804e70e013d65af",
             "000beb8974d36d8cf58fdc87460dda00319e10c94c1b9f222ac9ce29d1c4776246cc"),
        ];
        for (pem, exponent, fp, name) in cases {
            let k = RsaPublic::from_pem(&unhex(pem).expect("hex")).expect("key");
            assert_eq!(k.exponent, exponent);
            assert_eq!(hex(&k.fingerprint), fp);
            assert_eq!(hex(&k.name()), name);
        }
        assert!(RsaPublic::from_pem(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
    }

    #[test]
    fn the_sealing_policy_is_authorize_then_pcr7() {
        let name = [7u8; 34];
        let a = policy_authorize(&name);
        assert_eq!(sealing_policy(&name, None), a);
        assert_eq!(
            sealing_policy(&name, Some(&[1; 32])),
            policy_pcr(&a, &[7], &[[1; 32]])
        );
    }

    #[test]
    fn a_signature_is_found_only_for_its_key_and_policy() {
        let key = RsaPublic {
            modulus: vec![1; 256],
            exponent: 65537,
            fingerprint: [9; 32],
        };
        let doc = PcrSignature::sign(&[5; 32], &key, |m| Ok(m.to_vec())).expect("sign");
        let json = serde_json::to_vec(&doc).expect("json");
        let back = PcrSignature::parse(&json).expect("parse");
        let pol = approved_policy(&[5; 32]);
        assert_eq!(back.find(&[9; 32], &pol), Some(pol.to_vec()));
        assert_eq!(back.find(&[8; 32], &pol), None);
        assert_eq!(back.find(&[9; 32], &approved_policy(&[6; 32])), None);
        assert!(PcrSignature::parse(b"[1]").is_err());
    }
}
