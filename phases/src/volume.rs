//! STATE and EPHEMERAL encrypted with keys sealed to the TPM.
//!
//! An encrypted volume's partition starts with a header region (1 MiB): the header, kept twice
//! (`PLNTSEAL` records, [`upgrade::twocopy`]), holds the volume key sealed to the TPM
//! ([`tpm::seal`]); the data follows, mapped through dm-crypt (`aes-xts-plain64`, a 512-bit
//! key). The key is sealed under a persistent parent key of the TPM's own, with a policy of the
//! booted UKI's signed PCR 11 value and, once Secure Boot is on, PCR 7. So the key unseals only
//! on this machine, booted through a UKI signed by the image's PCR key, in the Secure Boot state
//! it was sealed under; machined extends PCR 11 once both volumes are open, so nothing later in
//! the boot can unseal them again.
//!
//! Plain dm-crypt with a header of our own rather than LUKS2: the one keyslot is the TPM seal
//! (no passphrases, no key derivation to tune), and a static PID 1 would otherwise carry
//! libcryptsetup. A blank partition is made encrypted when the machine has a TPM and booted a
//! UKI that carries a PCR policy key; otherwise plain, and [`Protection::Plain`] says why.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tpm::policy::{PcrSignature, RsaPublic};
use tpm::seal::{self, Sealed};
use tpm::{Handle, TpmError};
use upgrade::layout::{LABEL_EPHEMERAL, LABEL_STATE};
use upgrade::twocopy::{self, Layout};

use crate::platform::{Platform, PlatformError};

/// The header's record layout.
pub const LAYOUT: Layout = Layout {
    magic: b"PLNTSEAL",
    format: 1,
    copy_offset: 512 * 1024,
};
/// Where the encrypted data starts.
pub const DATA_OFFSET: u64 = 1 << 20;
/// The cipher.
pub const CIPHER: &str = "aes-xts-plain64";
/// The volume key's length (AES-256-XTS takes two 256-bit keys).
pub const KEY_BYTES: usize = 64;
/// Where the initramfs leaves the booted UKI's PCR policy key (its `.pcrpkey`).
pub const PCR_PUBLIC_KEY: &str = "/run/plinth/tpm2-pcr-public-key.pem";
/// Where the initramfs leaves the booted UKI's signed PCR policies (its `.pcrsig`).
pub const PCR_SIGNATURE: &str = "/run/plinth/tpm2-pcr-signature.json";
/// What PCR 11 is extended with once the volumes are open.
pub const UNLOCKED_MEASUREMENT: &[u8] = b"plinth: volumes unlocked";

/// An encrypted volume's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The partition's label (a header copied to another partition is refused).
    pub label: String,
    /// The dm-crypt cipher.
    pub cipher: String,
    /// Where the data starts, in bytes.
    pub data_offset: u64,
    /// The volume key, sealed to the TPM.
    pub sealed: Sealed,
}

/// How a volume is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// dm-crypt with a key sealed to this machine's TPM, under a policy of these PCRs (PCR 11
    /// through policies signed by the key with this fingerprint).
    Sealed {
        /// The PCRs.
        pcrs: Vec<u32>,
        /// The PCR policy key's fingerprint (hex).
        pcr_key: String,
    },
    /// Not encrypted, for this reason.
    Plain(String),
    /// Encrypted, and this boot could not unseal its key, for this reason: the volume stays
    /// closed (and the node waits in maintenance mode, refusing configs).
    Locked(String),
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Protection::Sealed { pcrs, pcr_key } => {
                let pcrs: Vec<String> = pcrs
                    .iter()
                    .map(|p| match p {
                        11 => "11 (signed policy)".to_string(),
                        p => p.to_string(),
                    })
                    .collect();
                write!(
                    f,
                    "encrypted ({CIPHER}), key sealed to the TPM under PCR {} (policy key {})",
                    pcrs.join(" + "),
                    &pcr_key[..pcr_key.len().min(16)]
                )
            }
            Protection::Plain(why) => write!(f, "not encrypted: {why}"),
            Protection::Locked(why) => write!(f, "encrypted and locked: {why}"),
        }
    }
}

/// A volume ready to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// STATE or EPHEMERAL.
    pub label: String,
    /// The device to mount (the dm-crypt mapping, or the partition).
    pub device: PathBuf,
    /// How it is protected.
    pub protection: Protection,
}

/// A volume could not be opened, made or erased.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume is sealed to a TPM and there is none.
    #[error("{label} is encrypted with a key sealed to a TPM, and this machine has none")]
    NoTpm {
        /// The volume.
        label: String,
    },
    /// The booted UKI cannot unseal anything.
    #[error("{label} is encrypted, but the booted UKI carries no signed PCR policy to unseal its key with ({why})")]
    NoPolicy {
        /// The volume.
        label: String,
        /// What is missing.
        why: String,
    },
    /// The TPM would not unseal the key.
    #[error("{label} cannot be unlocked: {source}")]
    Unseal {
        /// The volume.
        label: String,
        /// Why.
        #[source]
        source: TpmError,
    },
    /// Another TPM operation failed.
    #[error("{label}: {source}")]
    Tpm {
        /// The volume.
        label: String,
        /// The error.
        #[source]
        source: TpmError,
    },
    /// The header is unusable.
    #[error("{label}'s encryption header: {reason}")]
    Header {
        /// The volume.
        label: String,
        /// What is wrong.
        reason: String,
    },
    /// The machine failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// The persistent parent key handles of a volume (two, so a re-seal can make the new one
/// before it drops the old).
pub fn parent_handles(label: &str) -> [Handle; 2] {
    match label {
        LABEL_STATE => [0x8150_6C10, 0x8150_6C11],
        _ => [0x8150_6C20, 0x8150_6C21],
    }
}

/// The device-mapper name of a volume's mapping.
pub fn mapping_name(label: &str) -> String {
    format!("plinth-{}", label.to_ascii_lowercase())
}

/// The booted UKI's PCR policy key and signed policies (left on `/run` by the initramfs).
pub fn policy_material(platform: &dyn Platform) -> Result<(RsaPublic, PcrSignature), String> {
    let key = platform
        .read(Path::new(PCR_PUBLIC_KEY))
        .map_err(|_| "no .pcrpkey section".to_string())?;
    let sig = platform
        .read(Path::new(PCR_SIGNATURE))
        .map_err(|_| "no .pcrsig section".to_string())?;
    let key = RsaPublic::from_pem(&key).map_err(|e| e.to_string())?;
    let sig = PcrSignature::parse(&sig).map_err(|e| e.to_string())?;
    Ok((key, sig))
}

fn read_header(
    platform: &dyn Platform,
    label: &str,
    dev: &Path,
) -> Result<Option<twocopy::Loaded<Header>>, VolumeError> {
    let (mut f, base) = platform.open_partition(dev, false)?;
    match twocopy::read::<Header, _>(&LAYOUT, &mut f, base) {
        Ok(l) if l.value.label != label => Err(VolumeError::Header {
            label: label.into(),
            reason: format!("it belongs to {}", l.value.label),
        }),
        Ok(l) => Ok(Some(l)),
        Err(twocopy::CopyError::NoValidCopy(a, b))
            if a.starts_with("no ") && b.starts_with("no ") =>
        {
            Ok(None)
        }
        Err(e) => Err(VolumeError::Header {
            label: label.into(),
            reason: e.to_string(),
        }),
    }
}

fn write_header(
    platform: &dyn Platform,
    dev: &Path,
    previous: Option<(u64, u8)>,
    header: &Header,
) -> Result<(), VolumeError> {
    let (mut f, base) = platform.open_partition(dev, true)?;
    twocopy::write(&LAYOUT, &mut f, base, previous, header).map_err(|e| VolumeError::Header {
        label: header.label.clone(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Zeroes the header region (both copies) and syncs it.
fn zero_header(platform: &dyn Platform, dev: &Path) -> Result<(), PlatformError> {
    let (mut f, base) = platform.open_partition(dev, true)?;
    let io = |e| PlatformError::io("zeroing the encryption header of", dev, e);
    f.seek(SeekFrom::Start(base)).map_err(io)?;
    f.write_all(&vec![0u8; DATA_OFFSET as usize]).map_err(io)?;
    f.sync_all().map_err(io)
}

fn tpm_err(label: &str) -> impl FnOnce(TpmError) -> VolumeError + '_ {
    move |source| VolumeError::Tpm {
        label: label.into(),
        source,
    }
}

fn secure_boot_on(platform: &dyn Platform) -> bool {
    bootloader::secureboot::mode(&platform.efivars())
        .is_ok_and(|m| m == bootloader::secureboot::Mode::On)
}

/// Whether opening or making partition `label` at `dev` may map it through dm-crypt: it has a
/// sealed-key header, or it is blank and this machine has a TPM.
pub fn may_encrypt(platform: &dyn Platform, label: &str, dev: &Path) -> Result<bool, VolumeError> {
    if platform.has_filesystem(dev, "ext4")? {
        return Ok(false);
    }
    Ok(read_header(platform, label, dev)?.is_some() || platform.tpm()?.is_some())
}

/// Makes `dev` (partition `label`) a new encrypted volume when the machine has a TPM and the
/// booted UKI a PCR policy key, a plain one otherwise. Returns the device to format. Any
/// earlier key of this volume is destroyed first.
pub fn create(platform: &dyn Platform, label: &str, dev: &Path) -> Result<Volume, VolumeError> {
    let plain = |why: String| Volume {
        label: label.into(),
        device: dev.to_path_buf(),
        protection: Protection::Plain(why),
    };
    let Some(mut tpm) = platform.tpm()? else {
        return Ok(plain("this machine has no TPM".into()));
    };
    let (pcr_key, _) = match policy_material(platform) {
        Ok(m) => m,
        Err(why) => {
            return Ok(plain(format!(
                "the booted image is not signed for TPM sealing ({why})"
            )))
        }
    };
    let [parent, other] = parent_handles(label);
    seal::erase(&mut tpm, other).map_err(tpm_err(label))?;
    seal::new_parent(&mut tpm, parent).map_err(tpm_err(label))?;
    let mut key = vec![0u8; KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| VolumeError::Tpm {
        label: label.into(),
        source: TpmError::Io(format!("random key: {e}")),
    })?;
    // PCR 7 is bound once Secure Boot is on; before that (Setup Mode, keys about to be
    // enrolled), the first boot under Secure Boot re-seals with it.
    let sealed = seal::seal(&mut tpm, parent, &key, &pcr_key, secure_boot_on(platform))
        .map_err(tpm_err(label))?;
    let header = Header {
        label: label.into(),
        cipher: CIPHER.into(),
        data_offset: DATA_OFFSET,
        sealed,
    };
    // No copy of an earlier header may outlive this one (a higher sequence number would win).
    zero_header(platform, dev)?;
    write_header(platform, dev, None, &header)?;
    let mapped = platform.map_crypt(&mapping_name(label), dev, DATA_OFFSET, &key);
    key.fill(0);
    tracing::info!("{label}: new encrypted volume, key sealed to the TPM");
    Ok(Volume {
        label: label.into(),
        device: mapped?,
        protection: Protection::Sealed {
            pcrs: header.sealed.pcrs(),
            pcr_key: header.sealed.pcr_key,
        },
    })
}

/// Opens partition `label` at `dev` for mounting: an encrypted volume is unsealed and mapped
/// (and re-sealed with PCR 7 on the first boot under Secure Boot); a plain one is used as it
/// is. `None`: blank (made by [`create`]).
pub fn open(
    platform: &dyn Platform,
    label: &str,
    dev: &Path,
) -> Result<Option<Volume>, VolumeError> {
    let Some(loaded) = read_header(platform, label, dev)? else {
        if platform.has_filesystem(dev, "ext4")? {
            return Ok(Some(Volume {
                label: label.into(),
                device: dev.to_path_buf(),
                // Formatted plain where it was made: the node cannot tell whether that was on
                // the host or on a machine that had no TPM then.
                protection: Protection::Plain(
                    "it was made plain (on the host by `plinth cluster create`, or on a machine \
                     without a TPM)"
                        .into(),
                ),
            }));
        }
        return Ok(None);
    };
    let mut header = loaded.value.clone();
    let mut tpm = platform.tpm()?.ok_or_else(|| VolumeError::NoTpm {
        label: label.into(),
    })?;
    let (pcr_key, signature) = policy_material(platform).map_err(|why| VolumeError::NoPolicy {
        label: label.into(),
        why,
    })?;
    let mut key =
        seal::unseal(&mut tpm, &header.sealed, &signature, &pcr_key).map_err(|source| {
            VolumeError::Unseal {
                label: label.into(),
                source,
            }
        })?;
    if header.sealed.pcr7.is_none() && secure_boot_on(platform) {
        // Sealed before Secure Boot was on (keys enrolled by the install): bind PCR 7 now,
        // under a new parent, so the old blob is worthless.
        let old = header.sealed.parent;
        let [a, b] = parent_handles(label);
        let new = if old == a { b } else { a };
        let resealed = seal::new_parent(&mut tpm, new)
            .and_then(|()| seal::seal(&mut tpm, new, &key, &pcr_key, true));
        match resealed {
            Ok(sealed) => {
                header.sealed = sealed;
                write_header(platform, dev, Some((loaded.seq, loaded.copy)), &header)?;
                if let Err(e) = seal::erase(&mut tpm, old) {
                    tracing::warn!("{label}: dropping the parent key sealed without PCR 7: {e}");
                }
                tracing::info!("{label}: Secure Boot is on: the key is now sealed to PCR 7 too");
            }
            Err(e) => tracing::warn!("{label}: sealing to PCR 7 as well: {e}"),
        }
    }
    if header.cipher != CIPHER || header.data_offset != DATA_OFFSET {
        key.fill(0);
        return Err(VolumeError::Header {
            label: label.into(),
            reason: format!(
                "cipher {} at offset {} is not {CIPHER} at {DATA_OFFSET}",
                header.cipher, header.data_offset
            ),
        });
    }
    let mapped = platform.map_crypt(&mapping_name(label), dev, header.data_offset, &key);
    key.fill(0);
    Ok(Some(Volume {
        label: label.into(),
        device: mapped?,
        protection: Protection::Sealed {
            pcrs: header.sealed.pcrs(),
            pcr_key: header.sealed.pcr_key,
        },
    }))
}

/// Crypto-erases partition `label` at `dev`: its mapping goes, its header is zeroed and synced,
/// then its parent keys are evicted from the TPM, so the data is unreadable even to someone
/// who copied the header before. Returns whether it held an encrypted volume.
pub fn erase(platform: &dyn Platform, label: &str, dev: &Path) -> Result<bool, VolumeError> {
    platform.unmap(&mapping_name(label))?;
    let sealed = matches!(read_header(platform, label, dev), Ok(Some(_)));
    if sealed {
        zero_header(platform, dev)?;
    }
    if let Some(mut tpm) = platform.tpm()? {
        for h in parent_handles(label) {
            seal::erase(&mut tpm, h).map_err(tpm_err(label))?;
        }
    }
    Ok(sealed)
}

/// Extends PCR 11 once the volumes are open: from here on this boot cannot unseal them again
/// (what systemd-pcrphase does when it leaves the initrd).
pub fn lock(platform: &dyn Platform) -> Result<(), VolumeError> {
    if let Some(mut tpm) = platform.tpm()? {
        tpm.pcr_extend(
            tpm::policy::PCR_UKI,
            &tpm::policy::sha256(&[UNLOCKED_MEASUREMENT]),
        )
        .map_err(tpm_err("the TPM"))?;
    }
    Ok(())
}

impl VolumeError {
    /// Whether the volume is fine but this boot cannot open it (no TPM, another TPM, other
    /// PCR values, an unsigned UKI): the node then stays up, locked, and says why.
    pub fn is_locked(&self) -> bool {
        matches!(
            self,
            VolumeError::NoTpm { .. } | VolumeError::NoPolicy { .. } | VolumeError::Unseal { .. }
        )
    }
}

/// Why the node's volumes are locked, if one is.
pub fn locked(volumes: &[Volume]) -> Option<String> {
    volumes.iter().find_map(|v| match &v.protection {
        Protection::Locked(why) => Some(format!("{} is locked: {why}", v.label)),
        _ => None,
    })
}

/// Whether a node whose volumes are protected as `volumes` may run under the config's
/// `machine.encryption.without_tpm`.
pub fn check_policy(without_tpm: config::WithoutTpm, volumes: &[Volume]) -> Result<(), String> {
    if without_tpm != config::WithoutTpm::Refuse {
        return Ok(());
    }
    for v in volumes {
        if let Protection::Plain(why) = &v.protection {
            return Err(format!(
                "{} is not encrypted ({why}), and machine.encryption.without_tpm is refuse",
                v.label
            ));
        }
    }
    Ok(())
}

/// The encrypted volumes, in the order they are opened.
pub const LABELS: [&str; 2] = [LABEL_STATE, LABEL_EPHEMERAL];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_says_what_protects_a_volume() {
        let p = Protection::Sealed {
            pcrs: vec![7, 11],
            pcr_key: "d9186d13a7fd5b3644cee05448f49ad3".into(),
        };
        assert_eq!(
            p.to_string(),
            "encrypted (aes-xts-plain64), key sealed to the TPM under PCR 7 + 11 (signed policy) (policy key d9186d13a7fd5b36)"
        );
        assert_eq!(
            Protection::Plain("this machine has no TPM".into()).to_string(),
            "not encrypted: this machine has no TPM"
        );
    }

    #[test]
    fn each_volume_has_its_own_parents_and_mapping() {
        assert_ne!(parent_handles("STATE"), parent_handles("EPHEMERAL"));
        assert_eq!(mapping_name("EPHEMERAL"), "plinth-ephemeral");
    }

    #[test]
    fn the_refuse_policy_names_the_plain_volume() {
        let v = Volume {
            label: "STATE".into(),
            device: "/dev/x".into(),
            protection: Protection::Plain("this machine has no TPM".into()),
        };
        let refuse = config::WithoutTpm::Refuse;
        assert!(check_policy(config::WithoutTpm::Unencrypted, std::slice::from_ref(&v)).is_ok());
        let err = check_policy(refuse, std::slice::from_ref(&v)).expect_err("refused");
        assert!(
            err.contains("STATE is not encrypted (this machine has no TPM)"),
            "{err}"
        );
        let sealed = Volume {
            protection: Protection::Sealed {
                pcrs: vec![11],
                pcr_key: "00".into(),
            },
            ..v
        };
        assert!(check_policy(refuse, &[sealed]).is_ok());
    }
}
