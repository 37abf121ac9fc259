//! The upgrade bundle: a signed manifest followed by the images it describes.
//!
//! ```text
//! "PLINTH-BUNDLE\n"
//! u32 LE   manifest length
//! manifest JSON
//! 64 bytes ed25519 signature of SIGNING_CONTEXT ‖ manifest JSON
//! components, in manifest order (UKI for slot A, UKI for slot B, root image, then the system
//! extensions it brings, each a whole extension file), then nothing
//! ```
//!
//! The signature covers a domain-separated message (the fixed [`SIGNING_CONTEXT`], then the
//! manifest), so a signature this key made for anything else never verifies as a bundle; it
//! is checked with `verify_strict` (no malleable or small-order encodings). The manifest says
//! how long every component is, so it also says where the bundle ends: a byte after the last
//! component is refused. It carries the bundle's monotonic `security_version` (a node never
//! accepts one below its floor) and may carry an expiry.
//!
//! The manifest comes first so a node can refuse a bundle (signature, architecture, sizes)
//! before writing a byte; the components then stream straight into place while being hashed,
//! with no temporary copy. Keys: ed25519, PKCS#8 PEM for the private key, hex for the public
//! key (short enough for the node config).

use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::verity::{self, VerityRoot};

const MAGIC: &[u8; 14] = b"PLINTH-BUNDLE\n";
/// The manifest format this build writes (2: security version, expiry, domain-separated
/// signature; 3: the root image carries its dm-verity hash tree, and the manifest the root
/// hash the UKIs pin; 4: the OS's extension level, and system extensions as components).
pub const FORMAT: u32 = 4;
/// The oldest format this build reads (a format-3 bundle is an OS of extension level 1 that
/// brings no extensions).
pub const MIN_FORMAT: u32 = 3;
/// The most extensions one bundle brings.
pub const MAX_EXTENSIONS: usize = 16;
/// The largest extension a bundle brings (an ESP is 256 MiB).
pub const MAX_EXTENSION: u64 = 128 << 20;
/// What a bundle signature signs before the manifest.
pub const SIGNING_CONTEXT: &[u8] = b"plinth bundle manifest v3\0";
/// The largest manifest accepted (it is a few hundred bytes; more is not a bundle).
const MAX_MANIFEST: u32 = 64 * 1024;

/// Component names.
pub const ROOTFS: &str = "rootfs";
/// The UKI built for slot A.
pub const UKI_A: &str = "uki-A";
/// The UKI built for slot B.
pub const UKI_B: &str = "uki-B";
/// The prefix of an extension component's name: `extension:NAME@LEVEL.ext`, its name in the
/// node's store.
pub const EXTENSION_PREFIX: &str = "extension:";

/// One image in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// `rootfs`, `uki-A`, `uki-B` or `extension:NAME@LEVEL.ext`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3, hex.
    pub blake3: String,
}

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format.
    pub format: u32,
    /// The image's version string.
    pub version: String,
    /// Machine architecture (`x86_64`).
    pub arch: String,
    /// The dm-verity root the UKIs' command lines pin (the rootfs component is its data and
    /// hash tree).
    pub root_verity: VerityRoot,
    /// Monotonic: raised by the release that fixes a vulnerability. A node refuses a bundle
    /// below the highest security version it has committed.
    pub security_version: u64,
    /// After this (seconds since the epoch) the bundle is refused: a stale release cannot be
    /// replayed forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_s: Option<u64>,
    /// The system extension level the bundle's OS provides (`SYSEXT_LEVEL` of its
    /// os-release): the extensions it runs are those built for it.
    #[serde(default = "first_level", skip_serializing_if = "is_first_level")]
    pub extension_level: u32,
    /// The components, in stream order.
    pub components: Vec<Component>,
}

fn first_level() -> u32 {
    1
}

fn is_first_level(level: &u32) -> bool {
    *level == 1
}

impl Manifest {
    /// A component by name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The extension components, in stream order, with their store file names.
    pub fn extensions(&self) -> impl Iterator<Item = (&Component, &str)> {
        self.components
            .iter()
            .filter_map(|c| c.name.strip_prefix(EXTENSION_PREFIX).map(|f| (c, f)))
    }
}

/// What a release says about itself, beyond its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Version string.
    pub version: String,
    /// Machine architecture.
    pub arch: String,
    /// See [`Manifest::security_version`].
    pub security_version: u64,
    /// See [`Manifest::expires_unix_s`].
    pub expires_unix_s: Option<u64>,
    /// See [`Manifest::extension_level`].
    pub extension_level: u32,
}

/// The digest that names a bundle: blake3 of its signed manifest (which pins every
/// component's digest), hex. `plinth upgrade --digest` pins it.
pub fn digest(manifest_json: &[u8]) -> String {
    blake3::hash(manifest_json).to_hex().to_string()
}

/// The [`digest`] of a bundle held in memory (or of a file's first bytes: the head), without
/// checking its signature; `None` if it does not start like a bundle.
pub fn head_digest(bundle: &[u8]) -> Option<String> {
    head_json(bundle).map(digest)
}

fn head_json(bundle: &[u8]) -> Option<&[u8]> {
    let rest = bundle.strip_prefix(MAGIC.as_slice())?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    rest.get(4..4 + len)
}

/// The manifest of a bundle (or of a file's first bytes: the head), its signature NOT checked:
/// for a client planning which nodes need it. Every node checks it before using it.
pub fn peek_manifest(bundle: &[u8]) -> Result<Manifest, BundleError> {
    let json = head_json(bundle).ok_or(BundleError::BadMagic)?;
    parse_manifest(json)
}

/// The message a bundle signature signs.
fn signed_message(json: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(json);
    m
}

/// A bundle was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a bundle.
    #[error("not a Plinth bundle (bad magic)")]
    BadMagic,
    /// The stream ended early.
    #[error("bundle truncated: {what} ended after {got} of {expected} bytes")]
    Truncated {
        /// Which part.
        what: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The manifest is not what this build reads.
    #[error("bad manifest: {0}")]
    BadManifest(String),
    /// No trusted key signed it.
    #[error("bundle signature does not verify with any trusted key ({0} trusted)")]
    BadSignature(usize),
    /// The node trusts no key.
    #[error("the node trusts no signing key (machine.upgrade.trusted_keys is empty)")]
    NoTrustedKeys,
    /// Built for another machine.
    #[error("bundle is for {bundle}, this node is {node}")]
    WrongArch {
        /// Bundle's.
        bundle: String,
        /// Node's.
        node: String,
    },
    /// A component does not fit its place.
    #[error("{component} is {size} bytes but its partition holds {capacity}")]
    TooBig {
        /// Which.
        component: String,
        /// Its size.
        size: u64,
        /// The room.
        capacity: u64,
    },
    /// A component's bytes are not what the manifest says.
    #[error("{component} digest mismatch: manifest says {expected}, got {actual}")]
    Digest {
        /// Which.
        component: String,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A key could not be read.
    #[error("bad key: {0}")]
    BadKey(String),
    /// Reading failed.
    #[error("reading the bundle: {0}")]
    Io(#[source] std::io::Error),
}

/// Reads exactly `buf.len()` bytes, or says how many came.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
) -> Result<(), BundleError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await.map_err(BundleError::Io)?;
        if n == 0 {
            return Err(BundleError::Truncated {
                what: what.into(),
                expected: buf.len() as u64,
                got: got as u64,
            });
        }
        got += n;
    }
    Ok(())
}

/// A bundle head that verified: the manifest and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The manifest.
    pub manifest: Manifest,
    /// [`digest`] of it.
    pub digest: String,
}

/// Reads and checks the bundle's head: magic, manifest, signature by one of `trusted`. The
/// reader is left at the first component.
pub async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    trusted: &[VerifyingKey],
) -> Result<Manifest, BundleError> {
    Ok(read_signed_head(r, trusted).await?.manifest)
}

/// [`read_head`], with the manifest's digest.
pub async fn read_signed_head<R: AsyncRead + Unpin>(
    r: &mut R,
    trusted: &[VerifyingKey],
) -> Result<Head, BundleError> {
    if trusted.is_empty() {
        return Err(BundleError::NoTrustedKeys);
    }
    let mut magic = [0u8; 14];
    read_full(r, &mut magic, "the header").await?;
    if &magic != MAGIC {
        return Err(BundleError::BadMagic);
    }
    let mut len = [0u8; 4];
    read_full(r, &mut len, "the header").await?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MANIFEST {
        return Err(BundleError::BadManifest(format!("{len} bytes is too long")));
    }
    let mut json = vec![0u8; len as usize];
    read_full(r, &mut json, "the manifest").await?;
    let mut sig = [0u8; 64];
    read_full(r, &mut sig, "the signature").await?;
    let sig = Signature::from_bytes(&sig);
    let message = signed_message(&json);
    if !trusted
        .iter()
        .any(|k| k.verify_strict(&message, &sig).is_ok())
    {
        return Err(BundleError::BadSignature(trusted.len()));
    }
    // Parsed only once signed: unsigned input never reaches the parser.
    Ok(Head {
        manifest: parse_manifest(&json)?,
        digest: digest(&json),
    })
}

/// Parses and checks a (signed) manifest: format, exactly the three components.
pub fn parse_manifest(json: &[u8]) -> Result<Manifest, BundleError> {
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    if !(MIN_FORMAT..=FORMAT).contains(&manifest.format) {
        return Err(BundleError::BadManifest(format!(
            "format {} (this node reads {MIN_FORMAT} to {FORMAT})",
            manifest.format
        )));
    }
    let order: Vec<&str> = manifest
        .components
        .iter()
        .take(3)
        .map(|c| c.name.as_str())
        .collect();
    if order != [UKI_A, UKI_B, ROOTFS] {
        return Err(BundleError::BadManifest(format!(
            "components must start with uki-A, uki-B, rootfs in that order, not {order:?}"
        )));
    }
    let extensions = &manifest.components[3..];
    if manifest.format < 4 && (manifest.extension_level != 1 || !extensions.is_empty()) {
        return Err(BundleError::BadManifest(format!(
            "format {} has no extension level and brings no extensions",
            manifest.format
        )));
    }
    if extensions.len() > MAX_EXTENSIONS {
        return Err(BundleError::BadManifest(format!(
            "{} extensions: a bundle brings at most {MAX_EXTENSIONS}",
            extensions.len()
        )));
    }
    let mut names = std::collections::HashSet::new();
    for c in extensions {
        let (name, level) = c
            .name
            .strip_prefix(EXTENSION_PREFIX)
            .and_then(|f| f.strip_suffix(crate::extension::SUFFIX))
            .and_then(|f| f.split_once('@'))
            .filter(|(n, _)| crate::extension::valid_name(n))
            .and_then(|(n, l)| Some((n, l.parse::<u32>().ok()?)))
            // Only the name the store would give it (no `+2`, no `02`).
            .filter(|(n, l)| {
                c.name == format!("{EXTENSION_PREFIX}{n}@{l}{}", crate::extension::SUFFIX)
            })
            .ok_or_else(|| {
                BundleError::BadManifest(format!(
                    "{:?} is not a component of a bundle (uki-A, uki-B, rootfs, then {EXTENSION_PREFIX}NAME@LEVEL.ext)",
                    c.name
                ))
            })?;
        if level != manifest.extension_level {
            return Err(BundleError::BadManifest(format!(
                "extension {name} is built for level {level}, and the bundle's OS provides level {}",
                manifest.extension_level
            )));
        }
        if c.size > MAX_EXTENSION {
            return Err(BundleError::TooBig {
                component: c.name.clone(),
                size: c.size,
                capacity: MAX_EXTENSION,
            });
        }
        if !names.insert(name) {
            return Err(BundleError::BadManifest(format!(
                "extension {name} comes twice"
            )));
        }
    }
    let v = &manifest.root_verity;
    let root_size = manifest.component(ROOTFS).map_or(0, |c| c.size);
    if v.data_size == 0 || !v.data_size.is_multiple_of(verity::BLOCK) || root_size != v.image_size()
    {
        return Err(BundleError::BadManifest(format!(
            "the rootfs component is {root_size} bytes, but its verity root says {} bytes of data and {} of hash tree",
            v.data_size,
            v.tree_size()
        )));
    }
    Ok(manifest)
}

/// Checks a manifest against the node: architecture and the room for the root image.
pub fn check_fits(m: &Manifest, arch: &str, slot_capacity: u64) -> Result<(), BundleError> {
    if m.arch != arch {
        return Err(BundleError::WrongArch {
            bundle: m.arch.clone(),
            node: arch.into(),
        });
    }
    if let Some(root) = m.component(ROOTFS) {
        if root.size > slot_capacity {
            return Err(BundleError::TooBig {
                component: ROOTFS.into(),
                size: root.size,
                capacity: slot_capacity,
            });
        }
    }
    Ok(())
}

/// Builds the bundle head for `manifest`, signed with `key`.
pub fn head(manifest: &Manifest, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
    let json = serde_json::to_vec(manifest).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    let sig = key.sign(&signed_message(&json));
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&sig.to_bytes());
    Ok(out)
}

/// A whole bundle, in memory, at security version 0 and without expiry (see [`build_release`]).
pub fn build(
    version: &str,
    arch: &str,
    uki_a: &[u8],
    uki_b: &[u8],
    rootfs: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    let release = Release {
        version: version.into(),
        arch: arch.into(),
        security_version: 0,
        expires_unix_s: None,
        extension_level: crate::extension::LEVEL,
    };
    build_release(&release, uki_a, uki_b, rootfs, &[], key)
}

/// A whole bundle, in memory: the components are hashed, the manifest signed with `key`.
/// `rootfs` is a partition image made by [`verity::image`] (data, then its hash tree);
/// `extensions` are extension files (`plinth image extension`) built for the release's level.
pub fn build_release(
    release: &Release,
    uki_a: &[u8],
    uki_b: &[u8],
    rootfs: &[u8],
    extensions: &[Vec<u8>],
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    let component = |name: &str, data: &[u8]| Component {
        name: name.into(),
        size: data.len() as u64,
        blake3: blake3::hash(data).to_hex().to_string(),
    };
    let root_verity = verity::pinned_by(rootfs)
        .map_err(|e| BundleError::BadManifest(format!("the root image: {e}")))?;
    let root = component(ROOTFS, rootfs);
    let mut components = vec![component(UKI_A, uki_a), component(UKI_B, uki_b), root];
    for e in extensions {
        let file = crate::extension::store_name(e)
            .map_err(|err| BundleError::BadManifest(format!("an extension: {err}")))?;
        components.push(component(&format!("{EXTENSION_PREFIX}{file}"), e));
    }
    // A release of level 1 that brings nothing is written as format 3, which nodes of the
    // previous release read too.
    let format = if release.extension_level == 1 && extensions.is_empty() {
        MIN_FORMAT
    } else {
        FORMAT
    };
    let manifest = Manifest {
        format,
        version: release.version.clone(),
        arch: release.arch.clone(),
        root_verity,
        security_version: release.security_version,
        expires_unix_s: release.expires_unix_s,
        extension_level: release.extension_level,
        components,
    };
    // The node's own check, before anything is signed: levels, names, no extension twice.
    let json =
        serde_json::to_vec(&manifest).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    parse_manifest(&json)?;
    let mut out = head(&manifest, key)?;
    out.reserve(uki_a.len() + uki_b.len() + rootfs.len());
    out.extend_from_slice(uki_a);
    out.extend_from_slice(uki_b);
    out.extend_from_slice(rootfs);
    for e in extensions {
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// A new signing key, from the kernel's random pool.
pub fn generate_key() -> Result<SigningKey, BundleError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| BundleError::BadKey(e.to_string()))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// A signing key as PKCS#8 PEM.
pub fn key_to_pem(key: &SigningKey) -> Result<String, BundleError> {
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(|e| BundleError::BadKey(e.to_string()))
}

/// A signing key from PKCS#8 PEM.
pub fn key_from_pem(pem: &str) -> Result<SigningKey, BundleError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    SigningKey::from_pkcs8_pem(pem).map_err(|e| BundleError::BadKey(e.to_string()))
}

/// A public key as hex (what node configs carry).
pub fn public_hex(key: &VerifyingKey) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A public key from hex.
pub fn public_from_hex(hex: &str) -> Result<VerifyingKey, BundleError> {
    let bad = || {
        BundleError::BadKey(format!(
            "{hex:?} is not 64 hex digits of an ed25519 public key"
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    VerifyingKey::from_bytes(&bytes).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let c = |name: &str, size| Component {
            name: name.into(),
            size,
            blake3: "00".repeat(32),
        };
        Manifest {
            format: FORMAT,
            version: "2.0".into(),
            arch: "x86_64".into(),
            root_verity: VerityRoot {
                data_size: 4096,
                root: "00".repeat(32),
                salt: "00".repeat(32),
            },
            security_version: 3,
            expires_unix_s: None,
            extension_level: 1,
            components: vec![c(UKI_A, 10), c(UKI_B, 10), c(ROOTFS, 4096)],
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[tokio::test]
    async fn a_signed_head_reads_back_and_leaves_the_reader_at_the_components() {
        let mut bytes = head(&manifest(), &key()).expect("head");
        bytes.extend_from_slice(b"ROOT");
        let mut r = bytes.as_slice();
        let m = read_head(&mut r, &[key().verifying_key()])
            .await
            .expect("valid");
        assert_eq!(m, manifest());
        assert_eq!(r, b"ROOT");
    }

    #[tokio::test]
    async fn a_bundle_signed_by_an_untrusted_key_is_refused() {
        let bytes = head(&manifest(), &SigningKey::from_bytes(&[9u8; 32])).expect("head");
        let err = read_head(&mut bytes.as_slice(), &[key().verifying_key()])
            .await
            .expect_err("refused");
        assert!(matches!(err, BundleError::BadSignature(1)), "{err}");
    }

    #[tokio::test]
    async fn a_signature_of_the_bare_manifest_is_not_a_bundle_signature() {
        // What a signer without domain separation would have made (bundle format 1).
        let json = serde_json::to_vec(&manifest()).expect("json");
        let sig = key().sign(&json);
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(&sig.to_bytes());
        let err = read_head(&mut bytes.as_slice(), &[key().verifying_key()])
            .await
            .expect_err("refused");
        assert!(matches!(err, BundleError::BadSignature(_)), "{err}");
    }

    #[tokio::test]
    async fn the_digest_names_the_signed_manifest() {
        let bytes = head(&manifest(), &key()).expect("head");
        let h = read_signed_head(&mut bytes.as_slice(), &[key().verifying_key()])
            .await
            .expect("valid");
        let json = serde_json::to_vec(&manifest()).expect("json");
        assert_eq!(h.digest, blake3::hash(&json).to_hex().to_string());
    }

    #[tokio::test]
    async fn a_tampered_manifest_is_refused() {
        let mut bytes = head(&manifest(), &key()).expect("head");
        let at = bytes.windows(3).position(|w| w == b"2.0").expect("version");
        bytes[at] = b'9';
        let err = read_head(&mut bytes.as_slice(), &[key().verifying_key()])
            .await
            .expect_err("refused");
        assert!(matches!(err, BundleError::BadSignature(_)), "{err}");
    }

    #[tokio::test]
    async fn every_truncation_of_the_head_is_named_not_a_panic() {
        let bytes = head(&manifest(), &key()).expect("head");
        for cut in 0..bytes.len() {
            let err = read_head(&mut &bytes[..cut], &[key().verifying_key()])
                .await
                .expect_err("truncated");
            assert!(
                matches!(err, BundleError::Truncated { .. } | BundleError::BadMagic),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn wrong_architecture_and_oversized_root_are_refused_with_the_numbers() {
        let m = manifest();
        assert!(matches!(
            check_fits(&m, "aarch64", 1000),
            Err(BundleError::WrongArch { .. })
        ));
        let err = check_fits(&m, "x86_64", 50).expect_err("too big");
        assert_eq!(
            err.to_string(),
            "rootfs is 4096 bytes but its partition holds 50"
        );
        assert!(check_fits(&m, "x86_64", 4096).is_ok());
    }

    #[test]
    fn a_root_whose_size_is_not_its_verity_roots_is_refused() {
        let mut m = manifest();
        m.components[2].size = 8192;
        let json = serde_json::to_vec(&m).expect("json");
        let err = parse_manifest(&json).expect_err("refused");
        assert!(
            err.to_string().contains("verity root says 4096 bytes"),
            "{err}"
        );
        let json = serde_json::to_vec(&manifest()).expect("json");
        assert!(parse_manifest(&json).is_ok());
    }

    #[test]
    fn a_bundle_needs_a_root_image_with_its_tree() {
        let (root, pin) = verity::image(vec![7u8; 3 * 4096]).expect("image");
        let b = build("1", "x86_64", b"a", b"b", &root, &key()).expect("bundle");
        let len = u32::from_le_bytes(b[14..18].try_into().expect("len")) as usize;
        let m = parse_manifest(&b[18..18 + len]).expect("manifest");
        assert_eq!(m.root_verity, pin);
        let err = build("1", "x86_64", b"a", b"b", &[7u8; 4096 * 2], &key()).expect_err("no tree");
        assert!(err.to_string().contains("the root image"), "{err}");
    }

    #[test]
    fn extension_components_follow_the_root_once_each_at_the_bundles_level() {
        let ext = |name: &str| Component {
            name: format!("{EXTENSION_PREFIX}{name}"),
            size: 10,
            blake3: "00".repeat(32),
        };
        let with = |level: u32, names: &[&str]| {
            let mut m = manifest();
            m.extension_level = level;
            m.components.extend(names.iter().map(|n| ext(n)));
            parse_manifest(&serde_json::to_vec(&m).expect("json"))
        };
        let m = with(2, &["runtime@2.ext", "tools@2.ext"]).expect("two extensions");
        let files: Vec<&str> = m.extensions().map(|(_, f)| f).collect();
        assert_eq!(files, ["runtime@2.ext", "tools@2.ext"]);
        for (level, names, says) in [
            (2, vec!["runtime@1.ext"], "built for level 1"),
            (2, vec!["runtime@2.ext", "runtime@2.ext"], "comes twice"),
            (2, vec!["../x@2.ext"], "is not a component"),
            (2, vec!["runtime@two.ext"], "is not a component"),
            (2, vec!["runtime@+2.ext"], "is not a component"),
            (2, vec!["runtime@02.ext"], "is not a component"),
        ] {
            let err = with(level, &names).expect_err("refused").to_string();
            assert!(err.contains(says), "{names:?}: {err}");
        }
        // The required three come first, in order.
        let mut m = manifest();
        m.components.swap(0, 2);
        let err = parse_manifest(&serde_json::to_vec(&m).expect("json")).expect_err("order");
        assert!(err.to_string().contains("in that order"), "{err}");
        // A format-3 manifest has no level: it is an OS of level 1.
        let mut v = serde_json::to_value(manifest()).expect("json");
        v["format"] = 3.into();
        assert!(v.get("extension_level").is_none(), "level 1 is not written");
        let m = parse_manifest(&serde_json::to_vec(&v).expect("json")).expect("format 3");
        assert_eq!(m.extension_level, 1);
        v["extension_level"] = 2.into();
        assert!(parse_manifest(&serde_json::to_vec(&v).expect("json")).is_err());
    }

    #[test]
    fn keys_round_trip_through_pem_and_hex() {
        let k = generate_key().expect("key");
        let pem = key_to_pem(&k).expect("pem");
        assert_eq!(key_from_pem(&pem).expect("parse").to_bytes(), k.to_bytes());
        let hex = public_hex(&k.verifying_key());
        assert_eq!(public_from_hex(&hex).expect("hex"), k.verifying_key());
        assert!(public_from_hex("zz").is_err());
    }
}
