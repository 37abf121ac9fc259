//! System extensions: software added to a node without changing its root (anchors:
//! systemd-sysext's extension images, Talos's system extensions).
//!
//! An extension is a SquashFS whose files all live under `usr/local`, with its dm-verity hash
//! tree appended (as a slot's root has, [`crate::verity`]), behind a signed manifest:
//!
//! ```text
//! "PLINTH-EXTENSION\n"
//! u32 LE   manifest length
//! manifest JSON
//! 64 bytes ed25519 signature of SIGNING_CONTEXT ‖ manifest JSON
//! the image: SquashFS (whole 4 KiB blocks), then its hash tree; then nothing
//! ```
//!
//! The keys are the bundles' (a node trusts one set of publishers), but the signing context
//! differs, so a bundle's signature never verifies as an extension's or the other way round.
//! The manifest pins the image (size, blake3) and its verity root, so the node can refuse an
//! extension (signature, compatibility, digest) before it maps a byte of it; once mapped, the
//! kernel checks every block it reads for as long as the extension is mounted.
//!
//! Compatibility is an *extension level*, as systemd-sysext's `SYSEXT_LEVEL`: the OS says which
//! level it provides ([`LEVEL`]; a release raises it when what extensions may rely on changes:
//! the loader and C library, the directories, the kernel's interfaces), an extension says which
//! it was built for, and the two must be equal. The image also carries the record systemd-sysext
//! reads ([`release_record`]), which must agree with the manifest.
//!
//! What an extension may contain ([`check_entries`]): directories, regular files and symbolic
//! links under `usr/local`, nothing setuid or setgid, nothing world-writable, no device nodes,
//! FIFOs or sockets. The image builder refuses such trees, and the node checks again on the
//! mounted image before it overlays it.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::verity::{self, VerityRoot};

const MAGIC: &[u8; 17] = b"PLINTH-EXTENSION\n";
/// The manifest format this build reads and writes.
pub const FORMAT: u32 = 1;
/// What an extension signature signs before the manifest.
pub const SIGNING_CONTEXT: &[u8] = b"plinth extension manifest v1\0";
/// The largest manifest accepted.
const MAX_MANIFEST: u32 = 64 * 1024;
/// The operating system's id, as in os-release.
pub const OS_ID: &str = "plinth";
/// The extension level this build of the OS provides.
pub const LEVEL: u32 = 1;
/// The one directory an extension's files may live under.
pub const PREFIX: &str = "usr/local";
/// Where the image keeps its release record (`extension-release.NAME`).
pub const RELEASE_DIR: &str = "usr/local/lib/extension-release.d";
/// The file name extensions have on the node.
pub const SUFFIX: &str = ".ext";

/// What an extension says about itself, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format.
    pub format: u32,
    /// Its name (`containerd`): lower-case letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The OS it is for ([`OS_ID`]).
    pub os_id: String,
    /// The extension level it was built for.
    pub level: u32,
    /// Machine architecture (`x86_64`).
    pub arch: String,
    /// The image's dm-verity root.
    pub verity: VerityRoot,
    /// The image's size in bytes (data and hash tree).
    pub size: u64,
    /// The image's blake3, hex.
    pub blake3: String,
}

/// An extension that was refused or could not be made. Each variant is one reason, named by
/// [`ExtensionError::reason`] in events.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionError {
    /// Not an extension.
    #[error("not a Plinth extension (bad magic)")]
    BadMagic,
    /// Shorter than its manifest says.
    #[error("extension truncated: {what}")]
    Truncated {
        /// What ended early.
        what: String,
    },
    /// The manifest is not what this build reads.
    #[error("bad extension manifest: {0}")]
    BadManifest(String),
    /// No trusted key signed it.
    #[error("the extension's signature does not verify with any trusted key ({0} trusted)")]
    BadSignature(usize),
    /// The node trusts no key.
    #[error("the node trusts no signing key (machine.upgrade.trusted_keys is empty)")]
    NoTrustedKeys,
    /// Built for another OS.
    #[error("the extension is for the OS {extension:?}, this is {os:?}")]
    WrongOs {
        /// The extension's.
        extension: String,
        /// Ours.
        os: String,
    },
    /// Built for another extension level.
    #[error("the extension {name} was built for extension level {extension}, this OS provides level {os}")]
    WrongLevel {
        /// Its name.
        name: String,
        /// The extension's level.
        extension: u32,
        /// The OS's level.
        os: u32,
    },
    /// Built for another machine.
    #[error("the extension is for {extension}, this node is {node}")]
    WrongArch {
        /// The extension's.
        extension: String,
        /// The node's.
        node: String,
    },
    /// The image is not what the manifest pins.
    #[error("the extension image's digest is {actual}, its manifest says {expected}")]
    Digest {
        /// Signed.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The image's data is not what its signed verity root pins: changed after signing.
    #[error("the extension image does not match its signed manifest ({0}): it was changed after it was signed")]
    Changed(String),
    /// The hash tree is not the data's.
    #[error("the extension image's hash tree: {0}")]
    Verity(#[from] verity::VerityError),
    /// A file outside the allowed directory.
    #[error("{path}: extensions may only add files under /{PREFIX}")]
    PathNotAllowed {
        /// The path, relative to the image's root.
        path: String,
    },
    /// A device node, FIFO or socket.
    #[error("{path} is a {kind}: extensions may hold only directories, regular files and symbolic links")]
    SpecialFile {
        /// The path.
        path: String,
        /// What it is.
        kind: String,
    },
    /// Setuid or setgid.
    #[error("{path} is {what} (mode {mode:o}): extensions may not raise privileges")]
    Setuid {
        /// The path.
        path: String,
        /// `setuid` or `setgid`.
        what: &'static str,
        /// Its mode.
        mode: u32,
    },
    /// World-writable.
    #[error("{path} is world-writable (mode {mode:o})")]
    WorldWritable {
        /// The path.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The release record is missing or disagrees with the manifest.
    #[error("the extension's release record {path}: {problem}")]
    BadRelease {
        /// Where it should be.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A key could not be used.
    #[error("bad key: {0}")]
    BadKey(String),
    /// Reading failed.
    #[error("reading the extension: {0}")]
    Io(#[source] std::io::Error),
}

impl ExtensionError {
    /// A short name for the reason, for events and `plinth get extensions`.
    pub fn reason(&self) -> &'static str {
        match self {
            ExtensionError::BadMagic
            | ExtensionError::Truncated { .. }
            | ExtensionError::BadManifest(_)
            | ExtensionError::Io(_) => "malformed",
            ExtensionError::BadSignature(_)
            | ExtensionError::NoTrustedKeys
            | ExtensionError::BadKey(_) => "signature",
            ExtensionError::WrongOs { .. } | ExtensionError::WrongLevel { .. } => "level",
            ExtensionError::WrongArch { .. } => "architecture",
            ExtensionError::Digest { .. }
            | ExtensionError::Changed(_)
            | ExtensionError::Verity(_) => "digest",
            ExtensionError::PathNotAllowed { .. } => "path",
            ExtensionError::SpecialFile { .. } => "special-file",
            ExtensionError::Setuid { .. } => "setuid",
            ExtensionError::WorldWritable { .. } => "world-writable",
            ExtensionError::BadRelease { .. } => "release-record",
        }
    }
}

fn signed_message(json: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(json);
    m
}

/// Whether `name` may name an extension (it becomes a file and a directory name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// The release record an extension's image carries, at [`RELEASE_DIR`]`/extension-release.NAME`
/// (the keys systemd-sysext reads).
pub fn release_record(version: &str, level: u32, arch: &str) -> String {
    format!(
        "ID={OS_ID}\nSYSEXT_LEVEL={level}\nVERSION_ID={version}\nARCHITECTURE={}\n",
        sysext_arch(arch)
    )
}

/// The release record's path for `name`, relative to the image's root.
pub fn release_path(name: &str) -> String {
    format!("{RELEASE_DIR}/extension-release.{name}")
}

/// systemd's name for an architecture.
fn sysext_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "x86-64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The largest release record read (it is a few lines).
pub const MAX_RELEASE: u64 = 4096;

/// Checks the release record found in a mounted image against its (signed) manifest.
pub fn check_release(m: &Manifest, record: Option<&str>) -> Result<(), ExtensionError> {
    let path = format!("/{}", release_path(&m.name));
    let bad = |problem: String| ExtensionError::BadRelease {
        path: path.clone(),
        problem,
    };
    let record = record.ok_or_else(|| bad("missing".into()))?;
    let value = |key: &str| {
        record.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let want = [
        ("ID", m.os_id.clone()),
        ("SYSEXT_LEVEL", m.level.to_string()),
        ("ARCHITECTURE", sysext_arch(&m.arch).to_string()),
    ];
    for (key, expected) in want {
        match value(key) {
            Some(v) if v == expected => {}
            Some(v) => return Err(bad(format!("{key}={v}, the manifest says {expected}"))),
            None => return Err(bad(format!("no {key}"))),
        }
    }
    Ok(())
}

/// Builds an extension file from a SquashFS image: the hash tree appended, the manifest
/// signed with `key`.
pub fn build(
    name: &str,
    version: &str,
    level: u32,
    arch: &str,
    squashfs: Vec<u8>,
    key: &SigningKey,
) -> Result<Vec<u8>, ExtensionError> {
    if !valid_name(name) {
        return Err(ExtensionError::BadManifest(format!(
            "{name:?} is not an extension name (lower-case letters, digits, '-', '_', '.'; at most 64)"
        )));
    }
    let (image, root) = verity::image(squashfs)?;
    let manifest = Manifest {
        format: FORMAT,
        name: name.into(),
        version: version.into(),
        os_id: OS_ID.into(),
        level,
        arch: arch.into(),
        size: image.len() as u64,
        blake3: blake3::hash(&image).to_hex().to_string(),
        verity: root,
    };
    let json =
        serde_json::to_vec(&manifest).map_err(|e| ExtensionError::BadManifest(e.to_string()))?;
    let sig = key.sign(&signed_message(&json));
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(&image);
    Ok(out)
}

/// An extension whose signature, manifest and image digest checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Its manifest.
    pub manifest: Manifest,
    /// blake3 of the signed manifest, hex: the extension's digest.
    pub digest: String,
    /// Where the image starts in the file.
    pub image_offset: u64,
}

/// The manifest JSON and the signature of an extension file's head (its first bytes), neither
/// checked.
fn split_head(head: &[u8]) -> Result<(&[u8], [u8; 64]), ExtensionError> {
    let rest = head
        .strip_prefix(MAGIC.as_slice())
        .ok_or(ExtensionError::BadMagic)?;
    let short = |what: &str| ExtensionError::Truncated { what: what.into() };
    let len = u32::from_le_bytes(
        rest.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| short("the header"))?,
    );
    if len > MAX_MANIFEST {
        return Err(ExtensionError::BadManifest(format!(
            "{len} bytes is too long"
        )));
    }
    let json = rest
        .get(4..4 + len as usize)
        .ok_or_else(|| short("the manifest"))?;
    let sig: [u8; 64] = rest
        .get(4 + len as usize..4 + len as usize + 64)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| short("the signature"))?;
    Ok((json, sig))
}

/// Reads an extension file's head: magic, manifest and signature by one of `trusted`; the
/// manifest parsed only once signed. Needs the file's first bytes (the head is well under
/// 64 KiB).
pub fn read_head(head: &[u8], trusted: &[VerifyingKey]) -> Result<Verified, ExtensionError> {
    if trusted.is_empty() {
        return Err(ExtensionError::NoTrustedKeys);
    }
    let (json, sig) = split_head(head)?;
    let sig = Signature::from_bytes(&sig);
    let message = signed_message(json);
    if !trusted
        .iter()
        .any(|k| k.verify_strict(&message, &sig).is_ok())
    {
        return Err(ExtensionError::BadSignature(trusted.len()));
    }
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| ExtensionError::BadManifest(e.to_string()))?;
    if manifest.format != FORMAT {
        return Err(ExtensionError::BadManifest(format!(
            "format {} (this node reads {FORMAT})",
            manifest.format
        )));
    }
    if !valid_name(&manifest.name) {
        return Err(ExtensionError::BadManifest(format!(
            "{:?} is not an extension name",
            manifest.name
        )));
    }
    let v = &manifest.verity;
    // Root and salt go into the device-mapper table: hex only, or a signed manifest could add
    // table arguments of its own.
    let hex = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.len().is_multiple_of(2)
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if v.root.len() != 64 || !hex(&v.root, 64) || !hex(&v.salt, 512) {
        return Err(ExtensionError::BadManifest(
            "the verity root hash and salt must be lower-case hex (64 and at most 512 digits)"
                .into(),
        ));
    }
    if v.data_size == 0
        || !v.data_size.is_multiple_of(verity::BLOCK)
        || manifest.size != v.image_size()
    {
        return Err(ExtensionError::BadManifest(format!(
            "the image is {} bytes, but its verity root says {} bytes of data and {} of hash tree",
            manifest.size,
            v.data_size,
            v.tree_size()
        )));
    }
    Ok(Verified {
        digest: blake3::hash(json).to_hex().to_string(),
        image_offset: (MAGIC.len() + 4 + json.len() + 64) as u64,
        manifest,
    })
}

/// The file name an extension has in a node's store (`NAME@LEVEL.ext`), from its head, whose
/// signature is *not* checked here: for placing a file that the node will check.
pub fn store_name(head: &[u8]) -> Result<String, ExtensionError> {
    let (json, _) = split_head(head)?;
    let m: Manifest =
        serde_json::from_slice(json).map_err(|e| ExtensionError::BadManifest(e.to_string()))?;
    if !valid_name(&m.name) {
        return Err(ExtensionError::BadManifest(format!(
            "{:?} is not an extension name",
            m.name
        )));
    }
    Ok(format!("{}@{}{SUFFIX}", m.name, m.level))
}

/// The extension level an os-release says its OS provides (`SYSEXT_LEVEL=`, as
/// systemd-sysext reads it).
pub fn os_level(os_release: &str) -> Option<u32> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("SYSEXT_LEVEL="))
        .map(|v| v.trim().trim_matches('"'))
        .and_then(|v| v.parse().ok())
}

/// Checks an extension against the OS: its id, extension level and architecture.
pub fn check_compatible(m: &Manifest, level: u32, arch: &str) -> Result<(), ExtensionError> {
    if m.os_id != OS_ID {
        return Err(ExtensionError::WrongOs {
            extension: m.os_id.clone(),
            os: OS_ID.into(),
        });
    }
    if m.level != level {
        return Err(ExtensionError::WrongLevel {
            name: m.name.clone(),
            extension: m.level,
            os: level,
        });
    }
    if m.arch != arch {
        return Err(ExtensionError::WrongArch {
            extension: m.arch.clone(),
            node: arch.into(),
        });
    }
    Ok(())
}

/// Checks the image that follows the head: exactly the manifest's size, its blake3, and its
/// hash tree the tree of its data with the pinned root. `image` reads from the image's start.
pub fn check_image(m: &Manifest, image: &mut impl std::io::Read) -> Result<(), ExtensionError> {
    struct Hashing<'a, R> {
        inner: &'a mut R,
        hasher: blake3::Hasher,
        read: u64,
    }
    impl<R: std::io::Read> std::io::Read for Hashing<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            self.read += n as u64;
            Ok(n)
        }
    }
    let mut r = Hashing {
        inner: image,
        hasher: blake3::Hasher::new(),
        read: 0,
    };
    verity::verify(&mut r, &m.verity).map_err(|e| match e {
        verity::VerityError::Read(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ExtensionError::Truncated {
                what: format!("the image ({} bytes expected)", m.size),
            }
        }
        verity::VerityError::RootMismatch { expected, actual } => {
            ExtensionError::Changed(format!("dm-verity root hash {actual}, signed {expected}"))
        }
        verity::VerityError::TreeMismatch(detail) => ExtensionError::Changed(detail),
        other => ExtensionError::Verity(other),
    })?;
    let mut extra = [0u8; 1];
    if r.read != m.size
        || std::io::Read::read(&mut r.inner, &mut extra).map_err(ExtensionError::Io)? != 0
    {
        return Err(ExtensionError::BadManifest(format!(
            "bytes follow the {}-byte image",
            m.size
        )));
    }
    let actual = r.hasher.finalize().to_hex().to_string();
    if actual != m.blake3 {
        return Err(ExtensionError::Digest {
            expected: m.blake3.clone(),
            actual,
        });
    }
    Ok(())
}

/// What one entry of an image's tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// Anything else: a device node, FIFO or socket (named).
    Special(&'static str),
}

/// One entry of an image's tree: its path relative to the root (`usr/local/bin/runc`), kind
/// and mode bits (`st_mode & 0o7777`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path, `/`-separated, no leading `/`.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits, with setuid, setgid and sticky.
    pub mode: u32,
}

impl Kind {
    /// The kind of a file from its `st_mode`.
    pub fn from_mode(st_mode: u32) -> Kind {
        match st_mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::Special("character device"),
            0o060000 => Kind::Special("block device"),
            0o010000 => Kind::Special("FIFO"),
            0o140000 => Kind::Special("socket"),
            _ => Kind::Special("file of unknown type"),
        }
    }
}

/// Checks an image's tree: every entry a directory, regular file or symbolic link; everything
/// but the directories leading to it under [`PREFIX`]; nothing setuid, setgid or
/// world-writable (a symbolic link's own mode does not count). The first problem is returned.
pub fn check_entries(entries: &[Entry]) -> Result<(), ExtensionError> {
    // `usr/local` and what leads to it must be directories: a link there would make the
    // overlay's layer any directory of the node's, which nothing here has checked.
    let has_prefix = entries
        .iter()
        .any(|e| e.path.trim_start_matches('/') == PREFIX && e.kind == Kind::Dir);
    if !has_prefix {
        return Err(ExtensionError::PathNotAllowed {
            path: format!("/{PREFIX} (missing, or not a directory)"),
        });
    }
    for e in entries {
        let path = e.path.trim_start_matches('/');
        let shown = format!("/{path}");
        if let Kind::Special(kind) = e.kind {
            return Err(ExtensionError::SpecialFile {
                path: shown,
                kind: kind.into(),
            });
        }
        let leading_path = path.is_empty() || PREFIX.starts_with(&format!("{path}/"));
        if (leading_path || path == PREFIX) && e.kind != Kind::Dir {
            return Err(ExtensionError::PathNotAllowed { path: shown });
        }
        let under = path == PREFIX || path.starts_with(&format!("{PREFIX}/"));
        let leading = e.kind == Kind::Dir && leading_path;
        if !under && !leading || path.split('/').any(|c| c == "..") {
            return Err(ExtensionError::PathNotAllowed { path: shown });
        }
        if e.kind == Kind::Symlink {
            continue;
        }
        if e.mode & 0o4000 != 0 {
            return Err(ExtensionError::Setuid {
                path: shown,
                what: "setuid",
                mode: e.mode,
            });
        }
        if e.mode & 0o2000 != 0 {
            return Err(ExtensionError::Setuid {
                path: shown,
                what: "setgid",
                mode: e.mode,
            });
        }
        if e.mode & 0o002 != 0 {
            return Err(ExtensionError::WorldWritable {
                path: shown,
                mode: e.mode,
            });
        }
    }
    Ok(())
}

/// Lists a directory tree as [`Entry`]s (the root itself as `""`), without following links.
pub fn walk(root: &std::path::Path) -> Result<Vec<Entry>, std::io::Error> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let meta = std::fs::symlink_metadata(root.join(&rel))?;
        let kind = Kind::from_mode(meta.mode());
        out.push(Entry {
            path: rel.to_string_lossy().into_owned(),
            kind,
            mode: meta.mode() & 0o7777,
        });
        if kind == Kind::Dir {
            let mut children: Vec<_> = std::fs::read_dir(root.join(&rel))?
                .map(|d| d.map(|d| rel.join(d.file_name())))
                .collect::<Result<_, _>>()?;
            children.sort();
            stack.extend(children.into_iter().rev());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn squashfs_like() -> Vec<u8> {
        // Not a real SquashFS: the format only hashes and pins it.
        (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect()
    }

    fn built() -> Vec<u8> {
        build(
            "containerd",
            "1.6.20",
            LEVEL,
            "x86_64",
            squashfs_like(),
            &key(1),
        )
        .expect("build")
    }

    #[test]
    fn an_extension_reads_back_with_its_manifest_and_image() {
        let ext = built();
        let v = read_head(&ext, &[key(1).verifying_key()]).expect("head");
        assert_eq!(v.manifest.name, "containerd");
        assert_eq!(v.manifest.level, LEVEL);
        assert_eq!(v.manifest.size, ext.len() as u64 - v.image_offset);
        assert_eq!(store_name(&ext).expect("name"), "containerd@1.ext");
        check_compatible(&v.manifest, LEVEL, "x86_64").expect("compatible");
        check_image(&v.manifest, &mut &ext[v.image_offset as usize..]).expect("image");
    }

    #[test]
    fn another_key_or_a_flipped_manifest_byte_is_a_bad_signature() {
        let ext = built();
        let err = read_head(&ext, &[key(2).verifying_key()]).expect_err("other key");
        assert_eq!(err.reason(), "signature");
        let mut flipped = ext.clone();
        flipped[MAGIC.len() + 10] ^= 1;
        let err = read_head(&flipped, &[key(1).verifying_key()]).expect_err("flipped");
        assert_eq!(err.reason(), "signature", "{err}");
        assert!(matches!(
            read_head(&ext, &[]),
            Err(ExtensionError::NoTrustedKeys)
        ));
    }

    #[test]
    fn a_bundle_signature_does_not_make_an_extension() {
        // Same key, same manifest bytes, signed in the bundle's context.
        let ext = built();
        let v = read_head(&ext, &[key(1).verifying_key()]).expect("head");
        let json = serde_json::to_vec(&v.manifest).expect("json");
        let mut m = crate::bundle::SIGNING_CONTEXT.to_vec();
        m.extend_from_slice(&json);
        let sig = key(1).sign(&m);
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&(json.len() as u32).to_le_bytes());
        forged.extend_from_slice(&json);
        forged.extend_from_slice(&sig.to_bytes());
        let err = read_head(&forged, &[key(1).verifying_key()]).expect_err("bundle context");
        assert_eq!(err.reason(), "signature");
    }

    #[test]
    fn a_flipped_image_byte_or_a_trailing_byte_is_refused() {
        let ext = built();
        let v = read_head(&ext, &[key(1).verifying_key()]).expect("head");
        let off = v.image_offset as usize;
        let mut flipped = ext.clone();
        flipped[off + 5000] ^= 0x40;
        let err = check_image(&v.manifest, &mut &flipped[off..]).expect_err("flipped");
        assert_eq!(err.reason(), "digest", "{err}");
        assert!(
            err.to_string().contains("changed after it was signed"),
            "{err}"
        );
        let mut longer = ext.clone();
        longer.push(0);
        let err = check_image(&v.manifest, &mut &longer[off..]).expect_err("trailing");
        assert!(err.to_string().contains("bytes follow"), "{err}");
        let err = check_image(&v.manifest, &mut &ext[off..ext.len() - 1]).expect_err("short");
        assert_eq!(err.reason(), "malformed", "{err}");
    }

    #[test]
    fn another_level_os_or_architecture_is_refused_by_name() {
        let v = read_head(&built(), &[key(1).verifying_key()]).expect("head");
        let err = check_compatible(&v.manifest, LEVEL + 1, "x86_64").expect_err("level");
        assert_eq!(err.reason(), "level");
        assert!(
            err.to_string()
                .contains("built for extension level 1, this OS provides level 2"),
            "{err}"
        );
        let err = check_compatible(&v.manifest, LEVEL, "aarch64").expect_err("arch");
        assert_eq!(err.reason(), "architecture");
        let mut other = v.manifest.clone();
        other.os_id = "talos".into();
        assert_eq!(
            check_compatible(&other, LEVEL, "x86_64")
                .expect_err("os")
                .reason(),
            "level"
        );
    }

    fn entry(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
        }
    }

    /// The image's root and `usr`.
    fn leading() -> Vec<Entry> {
        vec![entry("", Kind::Dir, 0o755), entry("usr", Kind::Dir, 0o755)]
    }

    #[test]
    fn only_plain_files_under_usr_local_pass() {
        let mut good = leading();
        good.extend([
            entry("usr/local", Kind::Dir, 0o755),
            entry("usr/local/bin", Kind::Dir, 0o755),
            entry("usr/local/bin/runc", Kind::File, 0o755),
            entry("usr/local/lib/libseccomp.so", Kind::Symlink, 0o777),
        ]);
        check_entries(&good).expect("good");
        let cases = [
            (entry("etc/shadow", Kind::File, 0o644), "path"),
            (entry("usr/bin/runc", Kind::File, 0o755), "path"),
            (entry("usr/localx/a", Kind::File, 0o644), "path"),
            (entry("etc", Kind::Dir, 0o755), "path"),
            (
                entry("usr/local/bin/../../../etc", Kind::Dir, 0o755),
                "path",
            ),
            (entry("usr/local/bin/su", Kind::File, 0o4755), "setuid"),
            (entry("usr/local/bin/wall", Kind::File, 0o2755), "setuid"),
            (entry("usr/local/tmp", Kind::Dir, 0o777), "world-writable"),
            (
                entry("usr/local/dev/sda", Kind::Special("block device"), 0o600),
                "special-file",
            ),
        ];
        for (bad, reason) in cases {
            let mut tree = good.clone();
            tree.push(bad.clone());
            let err = check_entries(&tree).expect_err(&bad.path);
            assert_eq!(err.reason(), reason, "{}: {err}", bad.path);
            assert!(err.to_string().contains(&bad.path), "{err}");
        }
    }

    #[test]
    fn usr_local_must_be_a_directory_of_the_image() {
        let mut link = leading();
        link.push(entry("usr/local", Kind::Symlink, 0o777));
        let err = check_entries(&link).expect_err("a link");
        assert_eq!(err.reason(), "path", "{err}");
        let usr_link = [
            entry("", Kind::Dir, 0o755),
            entry("usr", Kind::Symlink, 0o777),
        ];
        assert_eq!(check_entries(&usr_link).expect_err("usr").reason(), "path");
        let none = leading();
        let err = check_entries(&none).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_manifest_whose_verity_fields_are_not_hex_is_refused() {
        let ext = built();
        let v = read_head(&ext, &[key(1).verifying_key()]).expect("head");
        let mut m = v.manifest.clone();
        m.verity.salt = format!("{} 1 ignore_corruption", m.verity.salt);
        let json = serde_json::to_vec(&m).expect("json");
        let sig = key(1).sign(&signed_message(&json));
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&(json.len() as u32).to_le_bytes());
        forged.extend_from_slice(&json);
        forged.extend_from_slice(&sig.to_bytes());
        let err = read_head(&forged, &[key(1).verifying_key()]).expect_err("salt");
        assert!(err.to_string().contains("hex"), "{err}");
    }

    #[test]
    fn the_release_record_must_agree_with_the_manifest() {
        let v = read_head(&built(), &[key(1).verifying_key()]).expect("head");
        let m = &v.manifest;
        let good = release_record(&m.version, m.level, &m.arch);
        check_release(m, Some(&good)).expect("good");
        assert!(good.contains("ARCHITECTURE=x86-64"));
        let err = check_release(m, None).expect_err("missing");
        assert_eq!(err.reason(), "release-record");
        let other = release_record(&m.version, m.level + 1, &m.arch);
        let err = check_release(m, Some(&other)).expect_err("level");
        assert!(err.to_string().contains("SYSEXT_LEVEL=2"), "{err}");
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("containerd"));
        assert!(valid_name("nvidia-toolkit_1.2"));
        for bad in ["", "Containerd", "../x", "a/b", "-x", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        let err = build("a/b", "1", LEVEL, "x86_64", squashfs_like(), &key(1)).expect_err("name");
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn a_walked_tree_with_a_setuid_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let bin = dir.path().join("usr/local/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::write(bin.join("tool"), b"x").expect("write");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let entries = walk(dir.path()).expect("walk");
        assert_eq!(entries.len(), 5, "{entries:?}");
        check_entries(&entries).expect("plain");
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        let err = check_entries(&walk(dir.path()).expect("walk")).expect_err("setuid");
        assert_eq!(err.reason(), "setuid");
    }
}
