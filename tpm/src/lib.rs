//! TPM 2.0 for Plinth: seal a volume key so that only this machine's TPM, booted through a
//! UKI whose PCR 11 value is signed by the image's PCR key and with the Secure Boot state
//! (PCR 7) it was sealed under, can unseal it.
//!
//! - [`wire`]: the command and response format.
//! - [`device`]: `/dev/tpmrm0`, or a software TPM's socket (tests).
//! - [`Tpm`]: the commands, one method each.
//! - [`policy`]: the policy arithmetic and the PCR 11 prediction the image builder signs.
//! - [`seal`]: sealing and unsealing a volume key under a persistent parent key that a reset
//!   evicts (so a copy of the sealed blob is useless afterwards, even with this TPM).
//!
//! Hand-written rather than `tss-esapi` (a binding of the C TSS, which Debian ships only as
//! shared libraries, while machined is a static binary) or `tpm2-protocol` (marshalling only,
//! its API still moving): the thirteen commands here have fixed shapes, and the real work,
//! policies and names, is in no crate.
#![warn(missing_docs)]

pub mod device;
pub mod policy;
pub mod seal;
pub mod wire;

use std::time::Duration;

use device::Transport;
use wire::{Cmd, Response, NO_SESSIONS, SESSIONS};

/// A TPM handle.
pub type Handle = u32;

/// `TPM_RH_OWNER`: the storage hierarchy.
pub const RH_OWNER: Handle = 0x4000_0001;
/// `TPM_RH_NULL`.
pub const RH_NULL: Handle = 0x4000_0007;

/// A TPM operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    /// The device or socket failed.
    #[error("{0}")]
    Io(String),
    /// The TPM answered something that is not a response.
    #[error("malformed TPM response: {0}")]
    Malformed(&'static str),
    /// The TPM refused a command.
    #[error("TPM2_{} failed: {}", command_name(*command), rc_text(*rc))]
    Rc {
        /// Command code.
        command: u32,
        /// Response code.
        rc: u32,
    },
    /// A key is unusable.
    #[error("{0}")]
    Key(String),
    /// The policy cannot be satisfied (which measurement is not what was sealed).
    #[error("{0}")]
    Policy(String),
}

impl TpmError {
    /// The response code, if the TPM refused the command.
    pub fn rc(&self) -> Option<u32> {
        match self {
            TpmError::Rc { rc, .. } => Some(*rc),
            _ => None,
        }
    }
}

/// The commands used here, by code.
pub fn command_name(cc: u32) -> &'static str {
    match cc {
        0x120 => "EvictControl",
        0x131 => "CreatePrimary",
        0x144 => "Startup",
        0x153 => "Create",
        0x157 => "Load",
        0x15E => "Unseal",
        0x165 => "FlushContext",
        0x167 => "LoadExternal",
        0x16A => "PolicyAuthorize",
        0x173 => "ReadPublic",
        0x176 => "StartAuthSession",
        0x177 => "VerifySignature",
        0x17E => "PCR_Read",
        0x17F => "PolicyPCR",
        0x182 => "PCR_Extend",
        0x189 => "PolicyGetDigest",
        _ => "command",
    }
}

/// A response code in words (TPM 2.0 Part 2, §6.6).
pub fn rc_text(rc: u32) -> String {
    let base = if rc & 0x80 != 0 { rc & 0xBF } else { rc };
    let what = match base {
        0x100 => "TPM not initialized",
        0x101 => "TPM failure",
        0x128 => "PCR changed during the command",
        0x082 => "value out of range or not supported (asymmetric)",
        0x084 => "value out of range",
        0x08B => "handle not loaded",
        0x08E => "authorization failed",
        0x09B => "signature not valid",
        0x09D => "policy check failed",
        0x09F => "integrity check failed (not this TPM's object, or damaged)",
        0x0A0 => "ticket not valid",
        0x0A2 => "authorization HMAC check failed",
        0x902 => "out of object memory",
        0x903 => "out of session memory",
        0x921 => "in dictionary-attack lockout",
        _ => "",
    };
    if what.is_empty() {
        format!("response code {rc:#x}")
    } else {
        format!("{what} ({rc:#x})")
    }
}

/// Warnings after which the same command is sent again (the TPM was busy).
fn retry(rc: u32) -> bool {
    matches!(rc, 0x908 | 0x90A | 0x922)
}

/// The SRK template (as systemd 252 makes it): a transient ECC P-256 storage key under the
/// owner hierarchy, the same every time for the same TPM.
pub const SRK_TEMPLATE: [u8; 26] = [
    0x00, 0x23, 0x00, 0x0b, 0x00, 0x03, 0x00, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x00, 0x43,
    0x00, 0x10, 0x00, 0x03, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
];

/// A TPM.
pub struct Tpm {
    t: Box<dyn Transport>,
}

impl Tpm {
    /// A TPM reached through `t`.
    pub fn new(t: Box<dyn Transport>) -> Tpm {
        Tpm { t }
    }

    /// The kernel's resource-managed TPM device.
    pub fn open(path: &std::path::Path) -> Result<Tpm, TpmError> {
        Ok(Tpm::new(Box::new(device::Device::open(path)?)))
    }

    fn run(&mut self, cmd: Cmd) -> Result<Response, TpmError> {
        let cc = cmd.code();
        let bytes = cmd.finish();
        for _ in 0..50 {
            let resp = self.t.transmit(&bytes)?;
            match Response::parse(cc, resp) {
                Err(TpmError::Rc { rc, .. }) if retry(rc) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
        Err(TpmError::Io(format!(
            "the TPM stayed busy for TPM2_{}",
            command_name(cc)
        )))
    }

    /// `TPM2_Startup(CLEAR)`, for a TPM no firmware has started (a test's software TPM).
    pub fn startup(&mut self) -> Result<(), TpmError> {
        match self.run(Cmd::new(NO_SESSIONS, 0x144).u16(0)) {
            Err(TpmError::Rc { rc: 0x100, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates the SRK ([`SRK_TEMPLATE`]) as a transient object.
    pub fn create_primary(&mut self) -> Result<Handle, TpmError> {
        let r = self.run(
            Cmd::new(SESSIONS, 0x131)
                .u32(RH_OWNER)
                .password_auth()
                .raw(&[0, 4, 0, 0, 0, 0])
                .tpm2b(&SRK_TEMPLATE)
                .u16(0)
                .u32(0),
        )?;
        r.handles().u32()
    }

    /// Creates an object under `parent` from `template` (a `TPMT_PUBLIC`), with `data` as its
    /// sensitive data (sealed objects) or none (keys the TPM makes). Returns its private and
    /// public parts, each a whole `TPM2B` (as [`Tpm::load`] takes them).
    pub fn create(
        &mut self,
        parent: Handle,
        template: &[u8],
        data: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let mut sensitive = vec![0u8, 0];
        sensitive.extend_from_slice(&(data.len() as u16).to_be_bytes());
        sensitive.extend_from_slice(data);
        let r = self.run(
            Cmd::new(SESSIONS, 0x153)
                .u32(parent)
                .password_auth()
                .tpm2b(&sensitive)
                .tpm2b(template)
                .u16(0)
                .u32(0),
        )?;
        let mut p = r.params(0)?;
        let private = p.tpm2b_whole()?.to_vec();
        let public = p.tpm2b_whole()?.to_vec();
        Ok((private, public))
    }

    /// Loads an object made by [`Tpm::create`] under `parent`.
    pub fn load(
        &mut self,
        parent: Handle,
        private: &[u8],
        public: &[u8],
    ) -> Result<Handle, TpmError> {
        let r = self.run(
            Cmd::new(SESSIONS, 0x157)
                .u32(parent)
                .password_auth()
                .raw(private)
                .raw(public),
        )?;
        r.handles().u32()
    }

    /// Makes the loaded `object` persistent at `persistent`, or, given a persistent handle as
    /// both, evicts it.
    pub fn evict_control(&mut self, object: Handle, persistent: Handle) -> Result<(), TpmError> {
        self.run(
            Cmd::new(SESSIONS, 0x120)
                .u32(RH_OWNER)
                .u32(object)
                .password_auth()
                .u32(persistent),
        )
        .map(|_| ())
    }

    /// The public area of `handle`, `None` if nothing is there.
    pub fn read_public(&mut self, handle: Handle) -> Result<Option<Vec<u8>>, TpmError> {
        match self.run(Cmd::new(NO_SESSIONS, 0x173).u32(handle)) {
            Ok(r) => Ok(Some(r.params(0)?.tpm2b()?.to_vec())),
            Err(TpmError::Rc { rc, .. }) if rc & 0xBF == 0x8B => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts an unbound, unsalted policy session with SHA-256.
    pub fn start_policy_session(&mut self) -> Result<Handle, TpmError> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| TpmError::Io(format!("random nonce: {e}")))?;
        let r = self.run(
            Cmd::new(NO_SESSIONS, 0x176)
                .u32(RH_NULL)
                .u32(RH_NULL)
                .tpm2b(&nonce)
                .u16(0)
                .u8(1)
                .u16(0x0010)
                .u16(policy::ALG_SHA256),
        )?;
        r.handles().u32()
    }

    /// `TPM2_PolicyPCR` with the PCRs' current values.
    pub fn policy_pcr(&mut self, session: Handle, pcrs: &[u32]) -> Result<(), TpmError> {
        self.run(
            Cmd::new(NO_SESSIONS, 0x17F)
                .u32(session)
                .u16(0)
                .raw(&policy::pcr_selection(pcrs)),
        )
        .map(|_| ())
    }

    /// The session's policy digest so far.
    pub fn policy_get_digest(&mut self, session: Handle) -> Result<[u8; 32], TpmError> {
        let r = self.run(Cmd::new(NO_SESSIONS, 0x189).u32(session))?;
        let d = r.params(0)?.tpm2b()?;
        d.try_into()
            .map_err(|_| TpmError::Malformed("the policy digest is not SHA-256"))
    }

    /// Loads a public key (`TPMT_PUBLIC`) in the owner hierarchy (a key in the null hierarchy
    /// would give tickets `TPM2_PolicyAuthorize` refuses). Returns it and its name.
    pub fn load_external(&mut self, public: &[u8]) -> Result<(Handle, Vec<u8>), TpmError> {
        let r = self.run(
            Cmd::new(NO_SESSIONS, 0x167)
                .u16(0)
                .tpm2b(public)
                .u32(RH_OWNER),
        )?;
        let handle = r.handles().u32()?;
        let name = r.params(1)?.tpm2b()?.to_vec();
        Ok((handle, name))
    }

    /// Verifies an RSASSA-PKCS1-v1_5 SHA-256 signature over `digest`; returns the TPM's ticket
    /// (`TPMT_TK_VERIFIED`, as [`Tpm::policy_authorize`] takes it).
    pub fn verify_signature(
        &mut self,
        key: Handle,
        digest: &[u8; 32],
        signature: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        let r = self.run(
            Cmd::new(NO_SESSIONS, 0x177)
                .u32(key)
                .tpm2b(digest)
                .u16(0x0014)
                .u16(policy::ALG_SHA256)
                .tpm2b(signature),
        )?;
        let mut p = r.params(0)?;
        let start = p.position();
        p.u16()?;
        p.u32()?;
        p.tpm2b()?;
        Ok(r.bytes[start..p.position()].to_vec())
    }

    /// `TPM2_PolicyAuthorize`: the session's policy so far is `approved`, which the key named
    /// `key_name` signed (`ticket`); the session's digest becomes the key's.
    pub fn policy_authorize(
        &mut self,
        session: Handle,
        approved: &[u8; 32],
        key_name: &[u8],
        ticket: &[u8],
    ) -> Result<(), TpmError> {
        self.run(
            Cmd::new(NO_SESSIONS, 0x16A)
                .u32(session)
                .tpm2b(approved)
                .u16(0)
                .tpm2b(key_name)
                .raw(ticket),
        )
        .map(|_| ())
    }

    /// Unseals `item` with the policy `session` (which ends with the command).
    pub fn unseal(&mut self, item: Handle, session: Handle) -> Result<Vec<u8>, TpmError> {
        let r = self.run(Cmd::new(SESSIONS, 0x15E).u32(item).policy_auth(session))?;
        Ok(r.params(0)?.tpm2b()?.to_vec())
    }

    /// The SHA-256 bank's values of `pcrs` (at most 8 at a time).
    pub fn pcr_read(&mut self, pcrs: &[u32]) -> Result<Vec<[u8; 32]>, TpmError> {
        let r = self.run(Cmd::new(NO_SESSIONS, 0x17E).raw(&policy::pcr_selection(pcrs)))?;
        let mut p = r.params(0)?;
        p.u32()?;
        let banks = p.u32()?;
        for _ in 0..banks {
            p.u16()?;
            let n = p.u8()? as usize;
            p.bytes(n)?;
        }
        let count = p.u32()?;
        let mut out = Vec::new();
        for _ in 0..count {
            let d = p.tpm2b()?;
            out.push(
                d.try_into()
                    .map_err(|_| TpmError::Malformed("a PCR value is not SHA-256"))?,
            );
        }
        if out.len() != pcrs.len() {
            return Err(TpmError::Malformed(
                "the TPM has no SHA-256 bank for those PCRs",
            ));
        }
        Ok(out)
    }

    /// Extends `pcr`'s SHA-256 bank with `digest`.
    pub fn pcr_extend(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
        self.run(
            Cmd::new(SESSIONS, 0x182)
                .u32(pcr)
                .password_auth()
                .u32(1)
                .u16(policy::ALG_SHA256)
                .raw(digest),
        )
        .map(|_| ())
    }

    /// Flushes a transient object or session.
    pub fn flush(&mut self, handle: Handle) -> Result<(), TpmError> {
        self.run(Cmd::new(NO_SESSIONS, 0x165).u32(handle))
            .map(|_| ())
    }
}
