//! Volume keys sealed to the TPM.
//!
//! A key is sealed under a *persistent parent*: a storage key the TPM generates and keeps at a
//! fixed handle, whose private part exists nowhere else. The sealed object's policy is
//! `PolicyAuthorize` (a PCR 11 value signed by the image's PCR key: any UKI signed by that key
//! unseals, so an A/B upgrade keeps working) then, once the Secure Boot state is final,
//! `PolicyPCR(7)`. Evicting the parent destroys every key sealed under it: what a reset does
//! first, so even a copy of the sealed blob taken earlier unseals nothing afterwards.

use crate::policy::{self, PcrSignature, RsaPublic, PCR_SECURE_BOOT, PCR_UKI};
use crate::{Handle, Tpm, TpmError};

/// The persistent parent's template: an ECC P-256 storage key the TPM generates
/// (restricted, decrypt, fixed to this TPM, no dictionary-attack counting), AES-128-CFB for
/// its children.
pub const PARENT_TEMPLATE: [u8; 26] = [
    0x00, 0x23, 0x00, 0x0b, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x00, 0x43,
    0x00, 0x10, 0x00, 0x03, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
];

/// The template of a sealed object: keyed-hash data, fixed to this TPM and its parent, usable
/// only through `policy` (no user auth).
pub fn sealed_template(policy: &[u8; 32]) -> Vec<u8> {
    let mut t = vec![0x00, 0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x12, 0x00, 0x20];
    t.extend_from_slice(policy);
    t.extend_from_slice(&[0x00, 0x10, 0x00, 0x00]);
    t
}

/// A volume key sealed to a TPM (what the volume's header keeps).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The persistent parent's handle.
    pub parent: Handle,
    /// The sealed object's private part (`TPM2B_PRIVATE`, hex; encrypted by the parent).
    pub private: String,
    /// Its public part (`TPM2B_PUBLIC`, hex).
    pub public: String,
    /// The PCR 7 value the policy binds (hex), if it binds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr7: Option<String>,
    /// The fingerprint of the key whose signed PCR 11 policies unseal it (hex).
    pub pcr_key: String,
}

impl Sealed {
    /// The PCRs its policy binds.
    pub fn pcrs(&self) -> Vec<u32> {
        match self.pcr7 {
            Some(_) => vec![PCR_SECURE_BOOT, PCR_UKI],
            None => vec![PCR_UKI],
        }
    }
}

fn unhex_field(what: &str, s: &str) -> Result<Vec<u8>, TpmError> {
    policy::unhex(s).ok_or_else(|| TpmError::Key(format!("the sealed key's {what} is not hex")))
}

/// Makes a new persistent parent at `handle`, evicting whatever was there (and so every key
/// sealed under it).
pub fn new_parent(tpm: &mut Tpm, handle: Handle) -> Result<(), TpmError> {
    erase(tpm, handle)?;
    let srk = tpm.create_primary()?;
    let made = (|| {
        let (private, public) = tpm.create(srk, &PARENT_TEMPLATE, &[])?;
        let parent = tpm.load(srk, &private, &public)?;
        let kept = tpm.evict_control(parent, handle);
        tpm.flush(parent)?;
        kept
    })();
    tpm.flush(srk)?;
    made
}

/// Evicts the persistent parent at `handle`: every key sealed under it is gone for good.
/// Returns whether there was one.
pub fn erase(tpm: &mut Tpm, handle: Handle) -> Result<bool, TpmError> {
    if tpm.read_public(handle)?.is_none() {
        return Ok(false);
    }
    tpm.evict_control(handle, handle)?;
    Ok(true)
}

/// Seals `secret` under the parent at `parent` (see [`new_parent`]), unsealable through a PCR
/// 11 policy signed by `pcr_key` and, with `bind_pcr7`, PCR 7 as it is now.
pub fn seal(
    tpm: &mut Tpm,
    parent: Handle,
    secret: &[u8],
    pcr_key: &RsaPublic,
    bind_pcr7: bool,
) -> Result<Sealed, TpmError> {
    let pcr7 = if bind_pcr7 {
        Some(tpm.pcr_read(&[PCR_SECURE_BOOT])?[0])
    } else {
        None
    };
    let policy = policy::sealing_policy(&pcr_key.name(), pcr7.as_ref());
    let (private, public) = tpm.create(parent, &sealed_template(&policy), secret)?;
    Ok(Sealed {
        parent,
        private: policy::hex(&private),
        public: policy::hex(&public),
        pcr7: pcr7.map(|v| policy::hex(&v)),
        pcr_key: policy::hex(&pcr_key.fingerprint),
    })
}

/// Unseals a key: PCR 11 must hold a value `signature` approves with `pcr_key` (the booted
/// UKI's `.pcrsig` and `.pcrpkey`), and PCR 7 the value it was sealed under. Every refusal
/// says which condition failed.
pub fn unseal(
    tpm: &mut Tpm,
    sealed: &Sealed,
    signature: &PcrSignature,
    pcr_key: &RsaPublic,
) -> Result<Vec<u8>, TpmError> {
    if policy::hex(&pcr_key.fingerprint) != sealed.pcr_key {
        return Err(TpmError::Policy(format!(
            "the key was sealed for PCR policies signed by key {}, but this UKI's policies are signed by {}",
            sealed.pcr_key,
            policy::hex(&pcr_key.fingerprint)
        )));
    }
    if tpm.read_public(sealed.parent)?.is_none() {
        return Err(TpmError::Policy(format!(
            "this TPM holds no parent key at {:#x}: the volume was sealed by another machine's TPM, or a reset erased its key",
            sealed.parent
        )));
    }
    let object = tpm
        .load(
            sealed.parent,
            &unhex_field("private part", &sealed.private)?,
            &unhex_field("public part", &sealed.public)?,
        )
        .map_err(|e| match e.rc().map(|rc| rc & 0xBF) {
            Some(0x9F) | Some(0x9C) | Some(0x98) => TpmError::Policy(format!(
                "the sealed key does not belong to this TPM's parent key at {:#x} (sealed by another machine's TPM): {e}",
                sealed.parent
            )),
            _ => e,
        })?;
    let result = unseal_loaded(tpm, object, sealed, signature, pcr_key);
    let flushed = tpm.flush(object);
    let secret = result?;
    flushed?;
    Ok(secret)
}

fn unseal_loaded(
    tpm: &mut Tpm,
    object: Handle,
    sealed: &Sealed,
    signature: &PcrSignature,
    pcr_key: &RsaPublic,
) -> Result<Vec<u8>, TpmError> {
    // A PCR extended between the policy commands and the unseal makes the TPM refuse with
    // PCR_CHANGED: the policy is built again.
    for _ in 0..5 {
        let session = tpm.start_policy_session()?;
        match satisfy(tpm, session, sealed, signature, pcr_key)
            .and_then(|()| tpm.unseal(object, session))
        {
            Ok(secret) => return Ok(secret),
            Err(e) => {
                let _ = tpm.flush(session);
                match e.rc() {
                    Some(0x128) => continue,
                    Some(rc) if rc & 0xBF == 0x9D => return Err(pcr7_differs(tpm, sealed, e)),
                    _ => return Err(e),
                }
            }
        }
    }
    Err(TpmError::Policy(
        "the PCRs kept changing while the key was unsealed".into(),
    ))
}

/// Runs the policy: PCR 11 as signed, then PCR 7 if bound.
fn satisfy(
    tpm: &mut Tpm,
    session: Handle,
    sealed: &Sealed,
    signature: &PcrSignature,
    pcr_key: &RsaPublic,
) -> Result<(), TpmError> {
    tpm.policy_pcr(session, &[PCR_UKI])?;
    let approved = tpm.policy_get_digest(session)?;
    let Some(sig) = signature.find(&pcr_key.fingerprint, &approved) else {
        let pcr11 = tpm
            .pcr_read(&[PCR_UKI])
            .map(|v| policy::hex(&v[0]))
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        return Err(TpmError::Policy(format!(
            "no signed PCR policy approves PCR 11 = {pcr11} (the UKI's .pcrsig was made for another UKI, or PCR 11 was extended since it was measured)"
        )));
    };
    let (key, name) = tpm.load_external(&pcr_key.tpmt_public())?;
    let ticket = tpm.verify_signature(key, &policy::sha256(&[&approved]), &sig);
    tpm.flush(key)?;
    let ticket = ticket
        .map_err(|e| TpmError::Policy(format!("the PCR policy signature does not verify: {e}")))?;
    tpm.policy_authorize(session, &approved, &name, &ticket)?;
    if sealed.pcr7.is_some() {
        tpm.policy_pcr(session, &[PCR_SECURE_BOOT])?;
    }
    Ok(())
}

fn pcr7_differs(tpm: &mut Tpm, sealed: &Sealed, e: TpmError) -> TpmError {
    let now = tpm
        .pcr_read(&[PCR_SECURE_BOOT])
        .map(|v| policy::hex(&v[0]))
        .unwrap_or_default();
    match &sealed.pcr7 {
        Some(then) if *then != now => TpmError::Policy(format!(
            "PCR 7 (the Secure Boot state: keys, and whether it is on) is {now}, not the {then} the key was sealed under"
        )),
        _ => TpmError::Policy(format!("the TPM refused the key's policy: {e}")),
    }
}
