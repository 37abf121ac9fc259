//! Image archives, read and checked whole before containerd sees a byte of them.
//!
//! Two forms are accepted: an OCI image layout in a tar (`skopeo copy … oci-archive:`,
//! `docker save` since Docker 25, `plinth image busybox`), and the Docker archive that older
//! `docker save` writes (`manifest.json` naming a config and layer tars by path), for which an
//! OCI manifest is made here. Every blob is hashed as it is read; a blob whose content does not
//! match its name, a manifest that names a blob the archive lacks, or a config whose layer list
//! disagrees with the manifest's is refused with what is wrong and where.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;
/// The most images one archive may hold.
const MAX_IMAGES: usize = 16;
/// The most layers one image may have.
const MAX_LAYERS: usize = 128;
/// The most members an archive may have.
const MAX_MEMBERS: usize = 100_000;
/// The largest tar extension header (a long name, PAX records) the reader will hold.
const MAX_EXTENSION_HEADER: u64 = 64 << 10;
/// The annotation containerd's `ctr export` and `plinth image busybox` name an image by.
pub const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation for an image's reference (often just a tag).
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading it failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not an image archive, or it contradicts itself.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid(msg.into())
}

/// Where a blob's bytes are: in the archive file, or made here (a Docker archive's manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// At this offset of the archive file.
    File {
        /// Byte offset of the content.
        offset: u64,
    },
    /// In memory.
    Made(Vec<u8>),
}

/// One piece of content: a manifest, a config or a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its length.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// Where its bytes are.
    pub source: Source,
}

/// One image in an archive.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// Its reference, normalised (`docker.io/library/busybox:latest`); `None` when the
    /// archive does not name it (the importer then needs a name).
    pub name: Option<String>,
    /// The manifest.
    pub manifest: Blob,
    /// The config.
    pub config: Blob,
    /// The layers, bottom first.
    pub layers: Vec<Blob>,
    /// The uncompressed digest of each layer, from the config.
    pub diff_ids: Vec<String>,
    /// The config, parsed.
    pub configuration: ImageConfiguration,
}

/// A checked archive.
#[derive(Debug)]
pub struct Archive {
    /// The archive file.
    pub path: PathBuf,
    /// Its images.
    pub images: Vec<ArchiveImage>,
}

/// A regular file of the tar: where its content is, how long it is, and its digest.
#[derive(Debug, Clone)]
struct Member {
    offset: u64,
    size: u64,
    digest: String,
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain id of each layer (containerd names unpacked snapshots by them): the first is its
/// diff id, each next is `sha256(parent + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => sha256(format!("{parent} {d}").as_bytes()),
        };
        out.push(id);
    }
    out
}

/// Normalises an image reference as Docker does: `busybox` is
/// `docker.io/library/busybox:latest`. Refuses what is not a reference.
pub fn normalize(reference: &str) -> Result<String, ArchiveError> {
    let bad = || {
        invalid(format!(
            "{reference:?} is not an image reference (like registry.example/team/app:1.0)"
        ))
    };
    let ok_chars = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@+".contains(c))
    };
    if !ok_chars(reference) || reference.len() > 255 || reference.starts_with('/') {
        return Err(bad());
    }
    let (first, rest) = match reference.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => {
            (f.to_string(), r.to_string())
        }
        Some(_) => ("docker.io".to_string(), reference.to_string()),
        None => ("docker.io".to_string(), format!("library/{reference}")),
    };
    let path_end = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let tagged = rest.contains('@') || rest[path_end..].contains(':');
    let rest = if tagged {
        rest
    } else {
        format!("{rest}:latest")
    };
    if rest.split('/').any(|p| p.is_empty()) {
        return Err(bad());
    }
    Ok(format!("{first}/{rest}"))
}

/// Reads and checks the archive at `path`: every image's manifest, config and layers are in
/// it and match their digests.
pub fn read(path: &Path) -> Result<Archive, ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    prescan(path)?;
    let file = std::fs::File::open(path).map_err(io)?;
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    let mut tar = tar::Archive::new(file);
    let entries = tar
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("not a tar archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| invalid(format!("a member's name is not readable: {e}")))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let offset = entry.raw_file_position();
        let size = entry.size();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut read = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| invalid(format!("{name}: the archive ends inside it: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        if read != size {
            return Err(invalid(format!(
                "{name}: the archive ends inside it ({read} of {size} bytes)"
            )));
        }
        let digest = format!("sha256:{}", hex(&hasher.finalize()));
        if let Some(hexname) = name.strip_prefix("blobs/sha256/") {
            if digest != format!("sha256:{hexname}") {
                return Err(invalid(format!(
                    "{name} holds content whose digest is {digest}: the archive is corrupt"
                )));
            }
        }
        if members.len() >= MAX_MEMBERS {
            return Err(invalid(format!(
                "the archive has more than {MAX_MEMBERS} files"
            )));
        }
        members.insert(
            name,
            Member {
                offset,
                size,
                digest,
            },
        );
    }
    let reader = Reader {
        path,
        members: &members,
    };
    let images = if members.contains_key("index.json") {
        reader.oci()?
    } else if members.contains_key("manifest.json") {
        reader.docker()?
    } else {
        return Err(invalid(
            "not an image archive: it has neither index.json (an OCI image layout) nor \
             manifest.json (a Docker archive)",
        ));
    };
    if images.is_empty() {
        return Err(invalid("the archive holds no image for linux/amd64"));
    }
    Ok(Archive {
        path: path.to_path_buf(),
        images,
    })
}

/// Walks the tar's headers before the tar reader does: the reader holds a long name or PAX
/// header in memory whole, and an upload may be as large as EPHEMERAL's free space.
fn prescan(path: &Path) -> Result<(), ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut at = 0u64;
    let mut block = [0u8; 512];
    while at + 512 <= len {
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.read_exact(&mut block).map_err(io)?;
        if block.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&block);
        let size = header
            .entry_size()
            .map_err(|e| invalid(format!("not a tar archive: a header at byte {at}: {e}")))?;
        let kind = header.entry_type();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions();
        if extension && size > MAX_EXTENSION_HEADER {
            return Err(invalid(format!(
                "a tar extension header at byte {at} is {size} bytes (at most {MAX_EXTENSION_HEADER})"
            )));
        }
        let padded = size
            .checked_add(511)
            .map(|s| s / 512 * 512)
            .and_then(|s| s.checked_add(512))
            .ok_or_else(|| invalid(format!("a tar header at byte {at} gives a size of {size}")))?;
        at = at.saturating_add(padded);
    }
    Ok(())
}

struct Reader<'a> {
    path: &'a Path,
    members: &'a BTreeMap<String, Member>,
}

impl Reader<'_> {
    fn bytes(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let m = self
            .members
            .get(name)
            .ok_or_else(|| invalid(format!("{name} is not in the archive")))?;
        if m.size > MAX_JSON {
            return Err(invalid(format!(
                "{name} is {} bytes; a document of at most {MAX_JSON} was expected",
                m.size
            )));
        }
        read_at(self.path, m.offset, m.size)
    }

    /// The blob a descriptor names, present with that size.
    fn blob(&self, d: &Descriptor, what: &str) -> Result<Blob, ArchiveError> {
        let digest = d.digest().to_string();
        let hexname = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid(format!("{what} {digest}: only sha256 digests are read")))?;
        let m = self
            .members
            .get(&format!("blobs/sha256/{hexname}"))
            .ok_or_else(|| invalid(format!("{what} {digest} is not in the archive")))?;
        if m.size != d.size() {
            return Err(invalid(format!(
                "{what} {digest} is {} bytes, but is described as {}",
                m.size,
                d.size()
            )));
        }
        Ok(Blob {
            digest,
            size: m.size,
            media_type: d.media_type().to_string(),
            source: Source::File { offset: m.offset },
        })
    }

    fn oci(&self) -> Result<Vec<ArchiveImage>, ArchiveError> {
        let index: ImageIndex = serde_json::from_slice(&self.bytes("index.json")?)
            .map_err(|e| invalid(format!("index.json: {e}")))?;
        let mut images: Vec<ArchiveImage> = Vec::new();
        for d in index.manifests() {
            let annotations = d.annotations().clone().unwrap_or_default();
            let name = match annotations
                .get(NAME_ANNOTATION)
                .or_else(|| annotations.get(REF_ANNOTATION).filter(|r| r.contains('/')))
            {
                Some(n) => Some(normalize(n)?),
                None => None,
            };
            for manifest in self.manifests(d, 0)? {
                // One manifest named twice is one image (a crafted index could name it
                // thousands of times).
                if images.iter().any(|i| i.manifest.digest == manifest.digest) {
                    continue;
                }
                if images.len() == MAX_IMAGES {
                    return Err(invalid(format!(
                        "the archive holds more than {MAX_IMAGES} images"
                    )));
                }
                images.push(self.image(name.clone(), manifest)?);
            }
        }
        Ok(images)
    }

    /// The linux/amd64 image manifests `d` leads to (through nested indexes).
    fn manifests(&self, d: &Descriptor, depth: u32) -> Result<Vec<Blob>, ArchiveError> {
        if let Some(p) = d.platform() {
            if p.os().to_string() != "linux" || p.architecture().to_string() != "amd64" {
                return Ok(Vec::new());
            }
        }
        match d.media_type() {
            MediaType::ImageManifest => Ok(vec![self.blob(d, "manifest")?]),
            MediaType::Other(t) if t == DOCKER_MANIFEST => Ok(vec![self.blob(d, "manifest")?]),
            MediaType::ImageIndex if depth < 4 => {
                let blob = self.blob(d, "index")?;
                let index: ImageIndex = serde_json::from_slice(&self.content(&blob)?)
                    .map_err(|e| invalid(format!("index {}: {e}", blob.digest)))?;
                let mut out: Vec<Blob> = Vec::new();
                for inner in index.manifests() {
                    for m in self.manifests(inner, depth + 1)? {
                        if !out.iter().any(|o| o.digest == m.digest) {
                            out.push(m);
                        }
                    }
                    if out.len() > MAX_IMAGES {
                        return Err(invalid(format!(
                            "index {} names more than {MAX_IMAGES} images",
                            blob.digest
                        )));
                    }
                }
                Ok(out)
            }
            MediaType::Other(t) if t == DOCKER_LIST && depth < 4 => {
                self.manifests(&retyped(d, MediaType::ImageIndex), depth)
            }
            other => Err(invalid(format!(
                "{} is of media type {other}, which is not an image manifest",
                d.digest()
            ))),
        }
    }

    fn content(&self, blob: &Blob) -> Result<Vec<u8>, ArchiveError> {
        if blob.size > MAX_JSON {
            return Err(invalid(format!(
                "{} is {} bytes; a document of at most {MAX_JSON} was expected",
                blob.digest, blob.size
            )));
        }
        match &blob.source {
            Source::File { offset } => read_at(self.path, *offset, blob.size),
            Source::Made(b) => Ok(b.clone()),
        }
    }

    fn image(&self, name: Option<String>, manifest: Blob) -> Result<ArchiveImage, ArchiveError> {
        let m: ImageManifest = serde_json::from_slice(&self.content(&manifest)?)
            .map_err(|e| invalid(format!("manifest {}: {e}", manifest.digest)))?;
        let config = self.blob(m.config(), "config")?;
        let layers = m
            .layers()
            .iter()
            .map(|l| self.blob(l, "layer"))
            .collect::<Result<Vec<_>, _>>()?;
        let configuration = self.config(&config)?;
        finish(name, manifest, config, layers, configuration)
    }

    fn config(&self, blob: &Blob) -> Result<ImageConfiguration, ArchiveError> {
        serde_json::from_slice(&self.content(blob)?)
            .map_err(|e| invalid(format!("config {}: {e}", blob.digest)))
    }

    fn docker(&self) -> Result<Vec<ArchiveImage>, ArchiveError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&self.bytes("manifest.json")?)
            .map_err(|e| invalid(format!("manifest.json: {e}")))?;
        if entries.len() > MAX_IMAGES {
            return Err(invalid(format!(
                "manifest.json lists more than {MAX_IMAGES} images"
            )));
        }
        let mut images = Vec::new();
        for e in entries {
            let member = |name: &str, what: &str| {
                self.members.get(name).cloned().ok_or_else(|| {
                    invalid(format!(
                        "manifest.json names {what} {name}, which is not in the archive"
                    ))
                })
            };
            let c = member(&e.config, "the config")?;
            let config = Blob {
                digest: c.digest.clone(),
                size: c.size,
                media_type: MediaType::ImageConfig.to_string(),
                source: Source::File { offset: c.offset },
            };
            let mut layers = Vec::new();
            for l in &e.layers {
                let m = member(l, "a layer")?;
                let gzip = read_at(self.path, m.offset, m.size.min(2))? == [0x1f, 0x8b];
                layers.push(Blob {
                    digest: m.digest.clone(),
                    size: m.size,
                    media_type: if gzip {
                        MediaType::ImageLayerGzip
                    } else {
                        MediaType::ImageLayer
                    }
                    .to_string(),
                    source: Source::File { offset: m.offset },
                });
            }
            let made = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MediaType::ImageManifest.to_string(),
                "config": descriptor_json(&config),
                "layers": layers.iter().map(descriptor_json).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec(&made)
                .map_err(|e| invalid(format!("making a manifest: {e}")))?;
            let manifest = Blob {
                digest: sha256(&bytes),
                size: bytes.len() as u64,
                media_type: MediaType::ImageManifest.to_string(),
                source: Source::Made(bytes),
            };
            let name = match e.repo_tags.as_ref().and_then(|t| t.first()) {
                Some(t) => Some(normalize(t)?),
                None => None,
            };
            let configuration = self.config(&config)?;
            images.push(finish(name, manifest, config, layers, configuration)?);
        }
        Ok(images)
    }
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn retyped(d: &Descriptor, t: MediaType) -> Descriptor {
    let mut d = d.clone();
    d.set_media_type(t);
    d
}

fn descriptor_json(b: &Blob) -> serde_json::Value {
    serde_json::json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size})
}

/// Parses the config and checks it against the manifest's layers.
fn finish(
    name: Option<String>,
    manifest: Blob,
    config: Blob,
    layers: Vec<Blob>,
    configuration: ImageConfiguration,
) -> Result<ArchiveImage, ArchiveError> {
    if configuration.os().to_string() != "linux"
        || configuration.architecture().to_string() != "amd64"
    {
        return Err(invalid(format!(
            "image {} is for {}/{}, not linux/amd64",
            manifest.digest,
            configuration.os(),
            configuration.architecture()
        )));
    }
    if layers.len() > MAX_LAYERS {
        return Err(invalid(format!(
            "image {} has {} layers (at most {MAX_LAYERS})",
            manifest.digest,
            layers.len()
        )));
    }
    let diff_ids: Vec<String> = configuration.rootfs().diff_ids().to_vec();
    if diff_ids.len() != layers.len() {
        return Err(invalid(format!(
            "image {}: its config lists {} layers and its manifest {}",
            manifest.digest,
            diff_ids.len(),
            layers.len()
        )));
    }
    for l in &layers {
        let t = l.media_type.as_str();
        let known = t.starts_with("application/vnd.oci.image.layer.v1.tar")
            || t.starts_with("application/vnd.docker.image.rootfs.diff.tar");
        if !known || t.contains("encrypted") {
            return Err(invalid(format!(
                "layer {} is of media type {t}, which is not a layer this node unpacks",
                l.digest
            )));
        }
    }
    Ok(ArchiveImage {
        name,
        manifest,
        config,
        layers,
        diff_ids,
        configuration,
    })
}

/// `len` bytes of `path` from `offset`.
pub fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Writes an OCI image layout archive of one image: one uncompressed layer (`files`: path in
/// the image, mode, content; or a symlink target), `config` (the image config's `config`
/// object: Env, Cmd, ...) and the name. Deterministic: the same input gives the same bytes.
pub fn write_layout(
    out: &mut impl std::io::Write,
    name: &str,
    files: &[LayerEntry],
    config: serde_json::Value,
) -> Result<String, ArchiveError> {
    let name = normalize(name)?;
    let layer = tar_of(files)?;
    let layer_digest = sha256(&layer);
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_bytes = json_bytes(&image_config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::ImageManifest.to_string(),
        "config": {"mediaType": MediaType::ImageConfig.to_string(), "digest": sha256(&config_bytes), "size": config_bytes.len()},
        "layers": [{"mediaType": MediaType::ImageLayer.to_string(), "digest": layer_digest, "size": layer.len()}],
    });
    let manifest_bytes = json_bytes(&manifest)?;
    let manifest_digest = sha256(&manifest_bytes);
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::ImageIndex.to_string(),
        "manifests": [{
            "mediaType": MediaType::ImageManifest.to_string(),
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {NAME_ANNOTATION: name, REF_ANNOTATION: tag},
        }],
    });
    let mut archive = tar::Builder::new(out);
    let mut add = |path: &str, data: &[u8]| -> Result<(), ArchiveError> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        archive
            .append_data(&mut h, path, data)
            .map_err(|e| invalid(format!("writing {path}: {e}")))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &json_bytes(&index)?)?;
    for blob in [&manifest_bytes, &config_bytes, &layer] {
        let digest = sha256(blob);
        let hexname = digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hexname}"), blob)?;
    }
    archive
        .finish()
        .map_err(|e| invalid(format!("writing the archive: {e}")))?;
    Ok(manifest_digest)
}

/// One entry of a layer written by [`write_layout`].
#[derive(Debug, Clone)]
pub enum LayerEntry {
    /// A directory with its mode.
    Dir(String, u32),
    /// A file with its mode.
    File(String, u32, Vec<u8>),
    /// A symbolic link to a target.
    Symlink(String, String),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn tar_of(files: &[LayerEntry]) -> Result<Vec<u8>, ArchiveError> {
    let mut b = tar::Builder::new(Vec::new());
    let err = |p: &str, e: std::io::Error| invalid(format!("writing {p} into the layer: {e}"));
    for f in files {
        match f {
            LayerEntry::Dir(p, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, p, std::io::empty())
                    .map_err(|e| err(p, e))?;
            }
            LayerEntry::File(p, mode, data) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())
                    .map_err(|e| err(p, e))?;
            }
            LayerEntry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target).map_err(|e| err(p, e))?;
            }
        }
    }
    b.into_inner()
        .map_err(|e| invalid(format!("writing the layer: {e}")))
}

fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>, ArchiveError> {
    serde_json::to_vec(v).map_err(|e| invalid(format!("encoding JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busybox_like(dir: &Path) -> PathBuf {
        let path = dir.join("image.tar");
        let mut f = std::fs::File::create(&path).expect("create");
        write_layout(
            &mut f,
            "plinth.local/test:1",
            &[
                LayerEntry::Dir("bin".into(), 0o755),
                LayerEntry::File("bin/hello".into(), 0o755, b"#!/bin/sh\necho hi\n".to_vec()),
                LayerEntry::Symlink("bin/hi".into(), "hello".into()),
            ],
            serde_json::json!({"Cmd": ["/bin/hello"]}),
        )
        .expect("write");
        path
    }

    #[test]
    fn an_oci_layout_written_here_reads_back_named_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = busybox_like(dir.path());
        let a = read(&path).expect("reads");
        assert_eq!(a.images.len(), 1);
        let i = &a.images[0];
        assert_eq!(i.name.as_deref(), Some("plinth.local/test:1"));
        assert_eq!(i.layers.len(), 1);
        assert_eq!(i.diff_ids, vec![i.layers[0].digest.clone()]);
        let cfg = i.configuration.config().clone().expect("config");
        assert_eq!(cfg.cmd().clone(), Some(vec!["/bin/hello".to_string()]));
        // Written twice, the same bytes.
        let other = tempfile::tempdir().expect("tempdir");
        let again = busybox_like(other.path());
        assert_eq!(std::fs::read(&path).ok(), std::fs::read(again).ok());
    }

    #[test]
    fn a_flipped_byte_in_a_blob_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = busybox_like(dir.path());
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes
            .windows(9)
            .position(|w| w.starts_with(b"echo hi"))
            .expect("the layer's file");
        bytes[at] ^= 0x20;
        std::fs::write(&path, bytes).expect("write");
        let e = read(&path).expect_err("corrupt").to_string();
        assert!(e.contains("blobs/sha256/") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn a_truncated_archive_and_a_text_file_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = busybox_like(dir.path());
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
        assert!(read(&path).is_err());
        std::fs::write(&path, b"hello, not a tar\n").expect("write");
        let e = read(&path).expect_err("text").to_string();
        assert!(e.contains("not"), "{e}");
    }

    /// A tar of regular files at `path`.
    fn write_tar(path: &Path, files: &[(&str, &Vec<u8>)]) {
        let mut b = tar::Builder::new(std::fs::File::create(path).expect("create"));
        for (p, d) in files {
            let mut h = header(tar::EntryType::Regular, 0o644, d.len() as u64);
            b.append_data(&mut h, p, d.as_slice()).expect("append");
        }
        b.finish().expect("finish");
    }

    #[test]
    fn a_docker_archive_gets_a_manifest_made_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = tar_of(&[LayerEntry::File("a".into(), 0o644, b"a".to_vec())]).expect("layer");
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/a"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        }))
        .expect("json");
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": "cfg.json", "RepoTags": ["busybox"], "Layers": ["l1/layer.tar"]}
        ]))
        .expect("json");
        let path = dir.path().join("docker.tar");
        write_tar(
            &path,
            &[
                ("manifest.json", &manifest),
                ("cfg.json", &config),
                ("l1/layer.tar", &layer),
            ],
        );
        let a = read(&path).expect("reads");
        let i = &a.images[0];
        assert_eq!(i.name.as_deref(), Some("docker.io/library/busybox:latest"));
        assert_eq!(
            i.layers[0].media_type,
            "application/vnd.oci.image.layer.v1.tar"
        );
        assert!(matches!(i.manifest.source, Source::Made(_)));
    }

    #[test]
    fn a_layer_count_that_disagrees_with_the_config_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .expect("json");
        let layer = tar_of(&[]).expect("layer");
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l.tar"]}
        ]))
        .expect("json");
        let path = dir.path().join("d.tar");
        write_tar(
            &path,
            &[
                ("manifest.json", &manifest),
                ("c.json", &config),
                ("l.tar", &layer),
            ],
        );
        let e = read(&path).expect_err("mismatch").to_string();
        assert!(e.contains("lists 0 layers and its manifest 1"), "{e}");
    }

    #[test]
    fn a_long_name_header_larger_than_the_cap_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("long.tar");
        let mut h = header(tar::EntryType::GNULongName, 0o644, MAX_EXTENSION_HEADER + 1);
        h.set_path("././@LongLink").expect("path");
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.resize(
            512 + (MAX_EXTENSION_HEADER as usize + 1).div_ceil(512) * 512 + 1024,
            0,
        );
        std::fs::write(&path, bytes).expect("write");
        let e = read(&path).expect_err("refused").to_string();
        assert!(e.contains("extension header"), "{e}");
    }

    #[test]
    fn one_manifest_named_many_times_is_one_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = busybox_like(dir.path());
        // The same descriptor a thousand times in index.json.
        let a = read(&path).expect("reads");
        let m = &a.images[0].manifest;
        let one = serde_json::json!({"mediaType": m.media_type, "digest": m.digest, "size": m.size,
            "annotations": {NAME_ANNOTATION: "plinth.local/test:1"}});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": vec![one; 1000]});
        let mut out = tar::Builder::new(Vec::new());
        let mut src = tar::Archive::new(std::fs::File::open(&path).expect("open"));
        for e in src.entries().expect("entries") {
            let mut e = e.expect("entry");
            let p = e.path().expect("path").to_string_lossy().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            if p == "index.json" {
                data = serde_json::to_vec(&index).expect("json");
            }
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            out.append_data(&mut h, &p, data.as_slice())
                .expect("append");
        }
        std::fs::write(&path, out.into_inner().expect("tar")).expect("write");
        assert_eq!(read(&path).expect("reads").images.len(), 1);
    }

    #[test]
    fn references_are_normalised_like_docker_does() {
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("team/app:2", "docker.io/team/app:2"),
            ("registry.local:5000/app", "registry.local:5000/app:latest"),
            ("plinth.local/busybox:1.35", "plinth.local/busybox:1.35"),
        ] {
            assert_eq!(normalize(given).expect(given), want);
        }
        for bad in ["", "/abs", "a b", "a//b", "x\n"] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        assert_eq!(ids[1], sha256(b"sha256:a sha256:b"));
    }
}
