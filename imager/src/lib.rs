//! Builds Plinth images on a Debian host.
//!
//! [`build`] makes the parts of a release: the Debian kernel and the modules the node needs
//! (with their load order worked out here, so the node needs no modprobe), an initramfs holding
//! `machined` as `/init`, a SquashFS root holding `machined` with its dm-verity hash tree
//! appended, and one UKI per slot whose command line pins the root's verity root hash. [`disk::assemble`] lays them out on a raw
//! GPT disk with the layout of [`upgrade::layout`]. [`extension::build`] packs a signed system
//! extension.
//!
//! The host tools are Debian's (apt, dpkg, kmod, squashfs-tools, binutils, systemd-boot-efi,
//! dosfstools, mtools, e2fsprogs); a missing one is named with its package.
#![warn(missing_docs)]

pub mod container;
pub mod disk;
pub mod extension;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;
pub mod secureboot;
pub mod tools;
pub mod uki;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use upgrade::Slot;

/// Building an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host tool is missing.
    #[error("{tool} is not installed (apt-get install {package})")]
    MissingTool {
        /// The command.
        tool: String,
        /// The Debian package that has it.
        package: String,
    },
    /// A host tool failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr (tail).
        stderr: String,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An input is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The disk layout could not be made.
    #[error(transparent)]
    Layout(#[from] upgrade::LayoutError),
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.display().to_string();
        move |source| ImageError::Io { what, path, source }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the artifacts go.
    pub out_dir: PathBuf,
    /// Where downloads are kept between builds.
    pub cache_dir: PathBuf,
    /// The static `machined` binary.
    pub machined: PathBuf,
    /// The image's version string.
    pub version: String,
    /// The Debian kernel package, or the metapackage naming it; by default the one
    /// `linux-image-cloud-amd64` depends on (`kernel::DEFAULT_PACKAGE`).
    pub kernel_package: Option<String>,
    /// Extra kernel command-line arguments (tests use this to make broken images).
    pub extra_cmdline: Vec<String>,
    /// Bytes of incompressible filler in the root image (`/usr/share/plinth/filler`), so
    /// throughput benchmarks can move a root of realistic size; 0 for a real image.
    pub filler_bytes: u64,
    /// Secure Boot keys (`plinth gen secureboot-keys`): the UKIs are signed with db's key, and
    /// installer media carry the signed lists that enrol them.
    pub secureboot: Option<PathBuf>,
    /// A file carried in the initramfs (at `/lib/plinth/ballast`) and never run: the boot
    /// benchmark's floor has `plinth-floor` as `/init` and carries machined here, so the kernel
    /// unpacks as much as for a node.
    pub initramfs_ballast: Option<PathBuf>,
    /// The system extension level the OS provides (`upgrade::extension::LEVEL` unless a
    /// release raises it): written into its os-release and its bundles.
    pub extension_level: u32,
}

/// What a build made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    /// The image's version string.
    pub version: String,
    /// The kernel release (`6.1.0-NN-amd64`).
    pub kernel_release: String,
    /// The root partition image: SquashFS, then its dm-verity hash tree.
    pub rootfs: PathBuf,
    /// Its size in bytes.
    pub rootfs_size: u64,
    /// Its blake3 digest (hex).
    pub rootfs_blake3: String,
    /// What the UKIs pin: the SquashFS's size, the tree's salt and root hash.
    pub verity: upgrade::verity::VerityRoot,
    /// The UKI for slot A.
    pub uki_a: PathBuf,
    /// The UKI for slot B.
    pub uki_b: PathBuf,
    /// The Secure Boot keys the UKIs are signed with, if they are.
    #[serde(default)]
    pub secureboot: Option<PathBuf>,
    /// The system extension level the OS provides.
    #[serde(default = "first_level")]
    pub extension_level: u32,
}

fn first_level() -> u32 {
    1
}

impl Artifacts {
    /// The UKI built for `slot`.
    pub fn uki(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.uki_a,
            Slot::B => &self.uki_b,
        }
    }

    /// The manifest file describing a build in `out_dir`.
    pub fn manifest_path(out_dir: &Path) -> PathBuf {
        out_dir.join("artifacts.json")
    }

    /// Reads the manifest of an earlier build.
    pub fn load(out_dir: &Path) -> Result<Artifacts, ImageError> {
        let p = Self::manifest_path(out_dir);
        let data = std::fs::read(&p).map_err(ImageError::io("reading", &p))?;
        serde_json::from_slice(&data)
            .map_err(|e| ImageError::Invalid(format!("{}: {e}", p.display())))
    }
}

/// Builds the release parts into `opts.out_dir`. The artifacts name their files by absolute
/// paths, so they can be found from any working directory.
pub fn build(opts: &BuildOptions) -> Result<Artifacts, ImageError> {
    let absolute = |p: &Path| std::path::absolute(p).map_err(ImageError::io("resolving", p));
    let opts = &BuildOptions {
        out_dir: absolute(&opts.out_dir)?,
        secureboot: opts.secureboot.as_deref().map(absolute).transpose()?,
        ..opts.clone()
    };
    tools::require(&[
        ("apt-get", "apt"),
        ("dpkg", "dpkg"),
        ("depmod", "kmod"),
        ("mksquashfs", "squashfs-tools"),
        ("objcopy", "binutils"),
    ])?;
    uki::require_stub()?;
    let keys = opts
        .secureboot
        .as_deref()
        .map(secureboot::Keys::load)
        .transpose()?;
    if !opts.machined.is_file() {
        return Err(ImageError::Invalid(format!(
            "machined binary {} does not exist: build it first (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p machined --target x86_64-unknown-linux-gnu)",
            opts.machined.display()
        )));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(ImageError::io("creating", &opts.out_dir))?;
    let kernel = kernel::fetch(&opts.cache_dir, opts.kernel_package.as_deref())?;
    let kernel::ModuleOrder {
        initramfs: modules,
        late,
        absent,
    } = kernel::module_order(&kernel)?;
    tracing::info!(
        "kernel {}: {} modules for the initramfs, {} in the background after it",
        kernel.release,
        modules.len(),
        late.len()
    );
    if !absent.is_empty() {
        tracing::warn!(
            "kernel {} has no {} (neither a module nor built in): the image is built without \
             (imager::kernel::OPTIONAL_MODULES says what the node does instead)",
            kernel.release,
            absent.join(", ")
        );
    }

    let initrd = opts.out_dir.join("initramfs.cpio");
    initramfs::write(
        &initrd,
        &opts.machined,
        opts.initramfs_ballast.as_deref(),
        &kernel,
        &modules,
        &late,
    )?;

    let squashfs = opts.out_dir.join("rootfs.squashfs");
    rootfs::build(
        &squashfs,
        &opts.machined,
        &opts.version,
        opts.extension_level,
        &opts.out_dir.join("rootfs"),
        opts.filler_bytes,
    )?;
    let rootfs = opts.out_dir.join("rootfs.img");
    let verity = rootfs::with_hash_tree(&squashfs, &rootfs)?;
    let (rootfs_size, rootfs_blake3) = rootfs::digest(&rootfs)?;

    let mut ukis = Vec::new();
    for slot in Slot::ALL {
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "panic=1".into(),
            "quiet".into(),
            // No crypto self-tests (upstream's default; Debian's kernel turns them on): they
            // test every algorithm as it registers, at boot and in each crypto module's load,
            // which costs boot time under TCG (BENCHMARKS.md). `fips=1` still runs them.
            "cryptomgr.notests".into(),
            format!("plinth.slot={slot}"),
        ];
        cmdline.extend(verity.cmdline_args());
        cmdline.extend(opts.extra_cmdline.iter().cloned());
        let path = opts.out_dir.join(format!("plinth-{slot}.efi"));
        uki::build(&uki::UkiParts {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            cmdline: &cmdline.join(" "),
            os_release: &rootfs::os_release(&opts.version, opts.extension_level),
            work_dir: &opts.out_dir,
            out: &path,
            pcr_signing: keys.as_ref(),
        })?;
        if let Some(keys) = &keys {
            secureboot::sign_pe(keys, &path)?;
        }
        ukis.push(path);
    }
    let [uki_a, uki_b]: [PathBuf; 2] = ukis
        .try_into()
        .map_err(|_| ImageError::Invalid("expected two UKIs".into()))?;
    let artifacts = Artifacts {
        version: opts.version.clone(),
        kernel_release: kernel.release.clone(),
        rootfs,
        rootfs_size,
        rootfs_blake3,
        verity,
        uki_a,
        uki_b,
        secureboot: keys.map(|k| k.dir),
        extension_level: opts.extension_level,
    };
    let manifest = Artifacts::manifest_path(&opts.out_dir);
    let json =
        serde_json::to_vec_pretty(&artifacts).map_err(|e| ImageError::Invalid(e.to_string()))?;
    std::fs::write(&manifest, json).map_err(ImageError::io("writing", &manifest))?;
    Ok(artifacts)
}

/// The signed upgrade bundle of a build (both UKIs and the root image), at security version 0
/// and without expiry.
pub fn bundle(
    artifacts: &Artifacts,
    key: &upgrade::bundle::SigningKey,
) -> Result<Vec<u8>, ImageError> {
    bundle_release(artifacts, key, 0, None, &[])
}

/// The signed upgrade bundle of a build at `security_version`, expiring at `expires_unix_s`,
/// bringing the extension files `extensions` (built for the build's extension level).
pub fn bundle_release(
    artifacts: &Artifacts,
    key: &upgrade::bundle::SigningKey,
    security_version: u64,
    expires_unix_s: Option<u64>,
    extensions: &[PathBuf],
) -> Result<Vec<u8>, ImageError> {
    let read = |p: &Path| std::fs::read(p).map_err(ImageError::io("reading", p));
    upgrade::bundle::build_release(
        &upgrade::bundle::Release {
            version: artifacts.version.clone(),
            arch: std::env::consts::ARCH.into(),
            security_version,
            expires_unix_s,
            extension_level: artifacts.extension_level,
        },
        &read(&artifacts.uki_a)?,
        &read(&artifacts.uki_b)?,
        &read(&artifacts.rootfs)?,
        &extensions
            .iter()
            .map(|p| read(p))
            .collect::<Result<Vec<_>, _>>()?,
        key,
    )
    .map_err(|e| ImageError::Invalid(format!("making the bundle: {e}")))
}
