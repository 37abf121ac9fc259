//! UEFI Secure Boot as the OS sees it: the firmware's mode (from `SecureBoot` and
//! `SetupMode`), enrolling signed key lists while the firmware is in Setup Mode, whether a
//! certificate is in `db`, and whether a PE image still matches the digest it was signed over.

use std::fmt;

use uuid::{uuid, Uuid};

use crate::efivarfs::{VarName, VarStore, VarStoreError, EFI_GLOBAL_VARIABLE};

/// `EFI_IMAGE_SECURITY_DATABASE_GUID`: the vendor of `db` and `dbx`.
pub const IMAGE_SECURITY_DATABASE: Uuid = uuid!("d719b2cb-3d3a-4596-a3bc-dad00e67656f");
/// Attributes of PK, KEK and db: non-volatile, boot and runtime access, time-based
/// authenticated writes.
pub const AUTHENTICATED: u32 = 0x27;

/// The firmware's Secure Boot mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Enforcing: only images signed by a `db` key start (User Mode, `SecureBoot` = 1).
    On,
    /// Setup Mode: no platform key; keys may be enrolled without a signature from one.
    Setup,
    /// Keys enrolled but not enforcing (`SecureBoot` = 0, `SetupMode` = 0).
    Off,
    /// The firmware has no Secure Boot (no such variables).
    Unsupported,
}

impl Mode {
    /// As `plinth status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Setup => "setup mode",
            Mode::Off => "off",
            Mode::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn flag(store: &VarStore, name: &str) -> Result<Option<bool>, VarStoreError> {
    match store.get(&VarName::new(name, EFI_GLOBAL_VARIABLE)) {
        Ok(v) => Ok(v.map(|v| v.data.first().is_some_and(|&b| b == 1))),
        // A refused write can leave an empty file behind: no value.
        Err(VarStoreError::TooShort { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The firmware's mode now. (Right after enrolling a platform key, `SetupMode` is already 0
/// while `SecureBoot` stays 0 until the next boot: that reads as [`Mode::Off`].)
pub fn mode(store: &VarStore) -> Result<Mode, VarStoreError> {
    Ok(
        match (flag(store, "SecureBoot")?, flag(store, "SetupMode")?) {
            (None, None) => Mode::Unsupported,
            (Some(true), _) => Mode::On,
            (_, Some(true)) => Mode::Setup,
            _ => Mode::Off,
        },
    )
}

/// Whether `db` holds the certificate `cert_der` (in an X.509 signature list).
pub fn db_has(store: &VarStore, cert_der: &[u8]) -> Result<bool, VarStoreError> {
    let db = store.get(&VarName::new("db", IMAGE_SECURITY_DATABASE))?;
    Ok(db.is_some_and(|v| v.data.windows(cert_der.len()).any(|w| w == cert_der)))
}

/// Writes `db`, `KEK` and `PK` (in that order: PK last, as writing it ends Setup Mode) from
/// their signed lists (`.auth`: `EFI_VARIABLE_AUTHENTICATION_2` then the signature list).
pub fn enrol(store: &VarStore, db: &[u8], kek: &[u8], pk: &[u8]) -> Result<(), VarStoreError> {
    for (name, vendor, data) in [
        ("db", IMAGE_SECURITY_DATABASE, db),
        ("KEK", EFI_GLOBAL_VARIABLE, kek),
        ("PK", EFI_GLOBAL_VARIABLE, pk),
    ] {
        store.set(&VarName::new(name, vendor), AUTHENTICATED, data)?;
    }
    Ok(())
}

/// What a PE image's Authenticode signature says of it, as far as digests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// It carries no signature.
    Unsigned,
    /// Its SHA-256 Authenticode digest is not the one it was signed over: it was modified after
    /// signing (a firmware enforcing Secure Boot refuses it).
    Modified,
    /// Its digest is the signed one (whether the signer is trusted is the firmware's `db`).
    Intact,
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// Checks a PE image's Authenticode digest (SHA-256, computed as the PE/COFF specification
/// says: headers without the checksum and the certificate table entry, the sections in file
/// order, then any data after them but the certificate table) against its signature, by
/// finding the digest among the signed bytes. It does not check who signed: the firmware does,
/// against `db`. `None`: not a PE image.
pub fn check_pe(pe: &[u8]) -> Option<Signature> {
    use sha2::{Digest, Sha256};
    let peh = u32_at(pe, 0x3c)?;
    if pe.get(peh..peh + 4)? != b"PE\0\0" {
        return None;
    }
    let sections = u16_at(pe, peh + 6)?;
    let opt_size = u16_at(pe, peh + 20)?;
    let opt = peh + 24;
    let dirs = match u16_at(pe, opt)? {
        0x20b => opt + 112,
        0x10b => opt + 96,
        _ => return None,
    };
    let checksum = opt + 64;
    let cert_dir = dirs + 4 * 8;
    let headers = u32_at(pe, opt + 60)?;
    let (cert_at, cert_len) = (u32_at(pe, cert_dir)?, u32_at(pe, cert_dir + 4)?);
    if cert_len == 0 {
        return Some(Signature::Unsigned);
    }
    let cert = pe.get(cert_at..cert_at.checked_add(cert_len)?)?;
    let mut h = Sha256::new();
    h.update(pe.get(..checksum)?);
    h.update(pe.get(checksum + 4..cert_dir)?);
    h.update(pe.get(cert_dir + 8..headers)?);
    let table = opt + opt_size;
    let mut raw: Vec<(usize, usize)> = (0..sections)
        .filter_map(|i| {
            let s = table + 40 * i;
            Some((u32_at(pe, s + 20)?, u32_at(pe, s + 16)?))
        })
        .filter(|&(_, len)| len > 0)
        .collect();
    raw.sort();
    let mut hashed = headers;
    for (at, len) in raw {
        h.update(pe.get(at..at.checked_add(len)?)?);
        hashed += len;
    }
    let end = pe.len().checked_sub(cert_len)?;
    if end > hashed {
        h.update(pe.get(hashed..end)?);
    }
    let digest: [u8; 32] = h.finalize().into();
    Some(if cert.windows(32).any(|w| w == digest) {
        Signature::Intact
    } else {
        Signature::Modified
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(c: &mut Command) {
        let out = c
            .output()
            .expect("openssl and sbsigntool (./x installs them)");
        assert!(out.status.success(), "{out:?}");
    }

    /// A PE signed by sbsign verifies as intact; a byte flipped in its code does not; the
    /// header checksum is not covered; an unsigned one says so.
    #[test]
    fn a_signed_pe_is_intact_until_a_byte_changes() {
        let dir = tempfile::tempdir().expect("tmp");
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        run(Command::new("openssl")
            .args([
                "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=t/",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let stub = std::fs::read("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
            .expect("systemd-boot-efi's stub (a PE image)");
        assert_eq!(check_pe(&stub), Some(Signature::Unsigned));
        let (unsigned, signed) = (dir.path().join("u.efi"), dir.path().join("s.efi"));
        std::fs::write(&unsigned, &stub).expect("write");
        run(Command::new("sbsign")
            .arg("--key")
            .arg(&key)
            .arg("--cert")
            .arg(&cert)
            .arg("--output")
            .arg(&signed)
            .arg(&unsigned));
        let pe = std::fs::read(&signed).expect("read");
        assert_eq!(check_pe(&pe), Some(Signature::Intact));
        let mut flipped = pe.clone();
        flipped[pe.len() / 3] ^= 1;
        assert_eq!(check_pe(&flipped), Some(Signature::Modified));
        let mut checksum = pe.clone();
        let at = u32_at(&pe, 0x3c).expect("pe header") + 24 + 64;
        checksum[at] ^= 1;
        assert_eq!(check_pe(&checksum), Some(Signature::Intact));
        assert_eq!(check_pe(b"MZ not a PE"), None);
        assert_eq!(check_pe(&pe[..200]), None);
    }

    #[test]
    fn the_mode_follows_the_two_variables() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = VarStore::new(dir.path());
        assert_eq!(mode(&store).expect("mode"), Mode::Unsupported);
        let set = |name: &str, v: u8| {
            store
                .set(&VarName::new(name, EFI_GLOBAL_VARIABLE), 6, &[v])
                .expect("set")
        };
        set("SetupMode", 1);
        set("SecureBoot", 0);
        assert_eq!(mode(&store).expect("mode"), Mode::Setup);
        set("SetupMode", 0);
        assert_eq!(mode(&store).expect("mode"), Mode::Off);
        set("SecureBoot", 1);
        assert_eq!(mode(&store).expect("mode"), Mode::On);
    }
}
