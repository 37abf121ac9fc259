//! `plinth image build`, `bundle`, `extension`, `busybox` and `disk` (`import` and `list` talk
//! to a node: [`super::images`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Subcommand;
use imager::disk::{DiskOptions, DEFAULT_DISK_BYTES, DEFAULT_SLOT_BYTES};
use imager::{Artifacts, BuildOptions};

/// Where a static machined lands when built from this workspace.
pub const MACHINED_BUILD: &str = "target/x86_64-unknown-linux-gnu/release/machined";

#[derive(Subcommand, Debug)]
pub enum Image {
    /// Build the kernel, initramfs, UKIs and SquashFS root of a release.
    Build {
        /// Output directory.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// The static machined binary (default: built from this workspace).
        #[arg(long)]
        machined: Option<PathBuf>,
        /// The image's version string.
        #[arg(long = "version", default_value = env!("CARGO_PKG_VERSION"))]
        image_version: String,
        /// Debian kernel package, or the metapackage naming it (default: linux-image-cloud-amd64,
        /// for VMs; linux-image-amd64 for bare metal).
        #[arg(long)]
        kernel_package: Option<String>,
        /// Extra kernel command-line argument (repeatable).
        #[arg(long = "cmdline-extra")]
        cmdline_extra: Vec<String>,
        /// Download cache (default: OUT/cache).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Also make installer media (OUT/installer.raw) carrying the signed bundle.
        #[arg(long, requires = "signing_key")]
        installer: bool,
        /// The key that signs the installer's bundle (`plinth gen signing-key`).
        #[arg(long)]
        signing_key: Option<PathBuf>,
        /// Sign the UKIs for UEFI Secure Boot with these keys (`plinth gen secureboot-keys`);
        /// installer media then carry the lists that enrol them.
        #[arg(long)]
        secureboot_keys: Option<PathBuf>,
        /// The system extension level the OS provides: raise it with a release that changes
        /// what extensions rely on (the loader, the C library, the kernel's interfaces).
        #[arg(long, default_value_t = upgrade::extension::LEVEL)]
        extension_level: u32,
    },
    /// Make a signed upgrade bundle from a build.
    Bundle {
        /// The build's output directory.
        #[arg(long, default_value = "out")]
        image_dir: PathBuf,
        /// The signing key (`plinth gen signing-key`).
        #[arg(long)]
        key: PathBuf,
        /// The bundle to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// The release's security version: raise it with a release that fixes a
        /// vulnerability, and nodes that commit it refuse every bundle below it.
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// After this moment (seconds since the epoch) nodes refuse the bundle.
        #[arg(long, value_name = "UNIX_SECONDS")]
        expires: Option<u64>,
        /// A system extension the bundle brings (repeatable), built for the build's extension
        /// level: the node keeps it for the new slot, and it is how an upgrade that raises the
        /// level carries an extension over.
        #[arg(long = "extension", value_name = "FILE")]
        extensions: Vec<PathBuf>,
    },
    /// Pack a signed system extension: a directory (every file under /usr/local), or the
    /// programs and libraries of Debian packages; `--runtime` packs the container runtime
    /// (containerd, its runc shim, runc and libseccomp).
    Extension {
        /// Its name (the file the node keeps and `plinth get extensions` shows).
        #[arg(long)]
        name: Option<String>,
        /// Its version (with --runtime: containerd's).
        #[arg(long = "version")]
        ext_version: Option<String>,
        /// A directory to pack as it is.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A Debian package to take programs and libraries from (repeatable).
        #[arg(long = "deb")]
        debs: Vec<String>,
        /// The container runtime: containerd, runc and libseccomp from Debian.
        #[arg(long, conflicts_with_all = ["dir", "debs"])]
        runtime: bool,
        /// etcd for control-plane nodes: etcd and etcdctl from Debian's etcd-server and
        /// etcd-client.
        #[arg(long, conflicts_with_all = ["dir", "debs", "runtime"])]
        etcd: bool,
        /// The signing key (`plinth gen signing-key`; nodes trust the same keys as for bundles).
        #[arg(long)]
        key: PathBuf,
        /// The extension level it is for (default: this release's).
        #[arg(long, default_value_t = upgrade::extension::LEVEL)]
        level: u32,
        /// Download cache.
        #[arg(long, default_value = "out/cache")]
        cache: PathBuf,
        /// The extension file to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Write a small container image (Debian's busybox-static) as an OCI image archive, for
    /// `plinth image import`.
    Busybox {
        /// The image's name.
        #[arg(long, default_value = imager::container::BUSYBOX_NAME)]
        name: String,
        /// Download cache.
        #[arg(long, default_value = "out/cache")]
        cache: PathBuf,
        /// The archive to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Import an image archive (OCI image layout or `docker save` tar) into a node's
    /// containerd, over the API.
    Import(super::images::ImportArgs),
    /// List the images in a node's containerd.
    List(super::images::ListArgs),
    /// Write a system disk (GPT, slot A installed) from a build, with a node config on STATE.
    Disk {
        /// The build's output directory.
        #[arg(long, default_value = "out")]
        image_dir: PathBuf,
        /// Node config to put on STATE (without one the node has no config).
        #[arg(long)]
        node_config: Option<PathBuf>,
        /// The disk image to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// Disk size in MiB.
        #[arg(long, default_value_t = DEFAULT_DISK_BYTES / (1024 * 1024))]
        size_mib: u64,
        /// Slot size in MiB.
        #[arg(long, default_value_t = DEFAULT_SLOT_BYTES / (1024 * 1024))]
        slot_mib: u64,
        /// A system extension to put in the ESP's store (repeatable; `plinth image
        /// extension`). The node checks it at boot against the keys its config trusts.
        #[arg(long = "extension")]
        extensions: Vec<PathBuf>,
    },
}

/// The machined binary to put in images: the given path, or this workspace's static build
/// (built now if missing).
pub fn machined(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("machined binary {} does not exist", p.display());
        }
        return Ok(p);
    }
    let p = PathBuf::from(MACHINED_BUILD);
    if p.is_file() {
        return Ok(p);
    }
    if !Path::new("machined/Cargo.toml").is_file() {
        bail!("no machined binary: pass --machined PATH, or run from the Plinth source tree to build it");
    }
    eprintln!(
        "building a static machined (cargo build --release -p machined --no-default-features)..."
    );
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "machined",
            "--no-default-features",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building machined failed ({status})");
    }
    Ok(p)
}

pub fn run(i: Image) -> anyhow::Result<()> {
    match i {
        Image::Build {
            out,
            machined: m,
            image_version,
            kernel_package,
            cmdline_extra,
            cache,
            installer,
            signing_key,
            secureboot_keys,
            extension_level,
        } => {
            let machined = machined(m)?;
            // Read the key before the long build: a bad path fails at once.
            let key = signing_key.as_deref().map(read_key).transpose()?;
            let out_dir = out.clone();
            let a = imager::build(&BuildOptions {
                cache_dir: cache.unwrap_or_else(|| out.join("cache")),
                out_dir: out,
                machined,
                version: image_version,
                kernel_package,
                extra_cmdline: cmdline_extra,
                filler_bytes: 0,
                secureboot: secureboot_keys,
                initramfs_ballast: None,
                extension_level,
            })?;
            println!("Plinth {} (kernel {})", a.version, a.kernel_release);
            println!(
                "  root image  {} ({} bytes, blake3 {})",
                a.rootfs.display(),
                a.rootfs_size,
                a.rootfs_blake3
            );
            let signed = match &a.secureboot {
                Some(k) => format!(" (signed for Secure Boot with {})", k.display()),
                None => " (unsigned)".into(),
            };
            println!("  UKI slot A  {}{signed}", a.uki_a.display());
            println!("  UKI slot B  {}{signed}", a.uki_b.display());
            if let (true, Some(key)) = (installer, key) {
                let bundle = out_dir.join("bundle.plinth");
                std::fs::write(&bundle, imager::bundle(&a, &key)?)
                    .with_context(|| format!("writing {}", bundle.display()))?;
                let media = out_dir.join("installer.raw");
                imager::disk::installer(&a, &bundle, &media, &out_dir.join("work"))?;
                println!("  bundle      {}", bundle.display());
                println!("  installer   {}", media.display());
            }
            Ok(())
        }
        Image::Bundle {
            image_dir,
            key,
            out,
            security_version,
            expires,
            extensions,
        } => {
            let a = Artifacts::load(&image_dir).context("run `plinth image build` first")?;
            let bytes = imager::bundle_release(
                &a,
                &read_key(&key)?,
                security_version,
                expires,
                &extensions,
            )?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} (Plinth {}, security version {security_version}, {} bytes)",
                out.display(),
                a.version,
                bytes.len()
            );
            if let Some(d) = upgrade::bundle::head_digest(&bytes) {
                println!("  digest {d} (pin it: plinth upgrade --digest {d})");
            }
            Ok(())
        }
        Image::Extension {
            name,
            ext_version,
            dir,
            debs,
            runtime,
            etcd,
            key,
            level,
            cache,
            out,
        } => {
            let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            // The packaged ones, named and versioned after their main Debian package.
            let packaged = if runtime {
                Some((
                    "containerd",
                    imager::extension::RUNTIME_DEBS,
                    imager::extension::RUNTIME_PROGRAMS,
                ))
            } else if etcd {
                Some((
                    "etcd",
                    imager::extension::ETCD_DEBS,
                    imager::extension::ETCD_PROGRAMS,
                ))
            } else {
                None
            };
            let (name, debs, programs) = match (packaged, name) {
                (Some((default, debs, programs)), name) => (
                    name.unwrap_or_else(|| default.into()),
                    strings(debs),
                    strings(programs),
                ),
                (None, Some(name)) => (name, debs, Vec::new()),
                (None, None) => bail!("--name is required (or --runtime, --etcd)"),
            };
            let ext_version = match (ext_version, packaged) {
                (Some(v), _) => v,
                (None, Some((_, debs, _))) => debian_version(debs[0])?,
                (None, None) => bail!("--version is required"),
            };
            let opts = imager::extension::ExtensionOptions {
                name,
                version: ext_version,
                dir,
                debs,
                programs,
                cache,
                staging: out.with_extension("staging"),
                level,
            };
            let (bytes, m) = imager::extension::build(&opts, &read_key(&key)?)?;
            let _ = std::fs::remove_dir_all(&opts.staging);
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} (extension {} {}, level {}, {} bytes)",
                out.display(),
                m.name,
                m.version,
                m.level,
                bytes.len()
            );
            println!("  image blake3 {}", m.blake3);
            println!("  verity root  {}", m.verity.root);
            Ok(())
        }
        Image::Busybox { name, cache, out } => {
            let mut bytes = Vec::new();
            let digest = imager::container::busybox(&cache, &name, &mut bytes)?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({name}, {} bytes)", out.display(), bytes.len());
            println!("  manifest {digest}");
            Ok(())
        }
        Image::Import(_) | Image::List(_) => bail!("this command talks to a node"),
        Image::Disk {
            image_dir,
            node_config,
            out,
            size_mib,
            slot_mib,
            extensions,
        } => {
            let a = Artifacts::load(&image_dir).context("run `plinth image build` first")?;
            let config_yaml = match node_config {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    config::NodeConfig::from_yaml(&text)
                        .with_context(|| format!("node config {}", p.display()))?;
                    Some(text)
                }
                None => None,
            };
            let parts = imager::disk::assemble(
                &a,
                &DiskOptions {
                    work_dir: out.with_extension("work"),
                    out: out.clone(),
                    disk_bytes: size_mib * 1024 * 1024,
                    slot_bytes: slot_mib * 1024 * 1024,
                    config_yaml,
                    extensions,
                },
            )?;
            let _ = std::fs::remove_dir_all(out.with_extension("work"));
            println!("wrote {}", out.display());
            for p in parts {
                println!(
                    "  {} {:<10} {:>6} MiB",
                    p.number,
                    p.label,
                    p.len / (1024 * 1024)
                );
            }
            Ok(())
        }
    }
}

/// The version apt would install of `package` (the candidate), without its epoch.
fn debian_version(package: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .map(|v| v.rsplit(':').next().unwrap_or(v).to_string())
        .with_context(|| {
            format!("apt knows no {package} package (run apt-get update), or pass --version")
        })
}

fn read_key(path: &Path) -> anyhow::Result<upgrade::bundle::SigningKey> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    upgrade::bundle::key_from_pem(&pem).with_context(|| format!("signing key {}", path.display()))
}
