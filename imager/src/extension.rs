//! System extensions ([`upgrade::extension`]): a directory, or programs and libraries taken from
//! Debian's packages (downloaded with `apt-get download`, as the kernel is), packed into a
//! SquashFS under `/usr/local` with its release record, its dm-verity tree and a signed
//! manifest.

use std::path::{Path, PathBuf};
use std::process::Command;

use upgrade::extension::{self as ext, Manifest};

use crate::tools::{require, run};
use crate::ImageError;

/// What to pack.
#[derive(Debug, Clone)]
pub struct ExtensionOptions {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// A directory whose tree goes in as it is (every file under `usr/local`).
    pub dir: Option<PathBuf>,
    /// Debian packages whose programs go to `/usr/local/bin` and whose shared libraries go
    /// to `/usr/local/lib` (the rest of each package, documentation, units, configuration,
    /// is left out).
    pub debs: Vec<String>,
    /// Of the packages' programs, only these (all when empty).
    pub programs: Vec<String>,
    /// Where downloaded packages are kept.
    pub cache: PathBuf,
    /// Where the tree is staged (emptied first).
    pub staging: PathBuf,
    /// The extension level it is built for.
    pub level: u32,
}

/// The packages of the container runtime extension: containerd (with its runc shim) and runc,
/// and the one library they need beyond the C library the root has (runc's libseccomp).
pub const RUNTIME_DEBS: &[&str] = &["containerd", "runc", "libseccomp2"];
/// The runtime's programs: the daemon, the shim it starts per container, runc. The rest of the
/// package (ctr, the v1 shims) would be 40 MB that nothing on a node without a shell runs.
pub const RUNTIME_PROGRAMS: &[&str] = &["containerd", "containerd-shim-runc-v2", "runc"];

/// Debian's packages the etcd extension is made of: the server and its own client (machined
/// runs `etcdctl snapshot restore` for a recovering bootstrap).
pub const ETCD_DEBS: &[&str] = &["etcd-server", "etcd-client"];

/// The programs of [`ETCD_DEBS`] the etcd extension keeps.
pub const ETCD_PROGRAMS: &[&str] = &["etcd", "etcdctl"];

/// Where a file unpacked from a package goes in the extension, if it goes in: programs to
/// `usr/local/bin`, shared libraries to `usr/local/lib`.
fn placed(rel: &Path) -> Option<PathBuf> {
    let parent = rel.parent()?.to_str()?;
    let name = rel.file_name()?;
    let is_lib = name.to_str().is_some_and(|n| n.contains(".so"));
    match parent {
        "usr/bin" | "usr/sbin" | "bin" | "sbin" => Some(Path::new("usr/local/bin").join(name)),
        "usr/lib/x86_64-linux-gnu" | "lib/x86_64-linux-gnu" if is_lib => {
            Some(Path::new("usr/local/lib").join(name))
        }
        _ => None,
    }
}

/// Where an extension's shared libraries are, for its programs' RUNPATH.
const LIBRARY_DIR: &str = "/usr/local/lib";

/// Makes a dynamically linked program look for its libraries in `/usr/local/lib` first
/// (its ELF RUNPATH). The root's loader searches only the system's directories, and an
/// environment variable would not do: runc starts its container's init with an environment of
/// its own making, without `LD_LIBRARY_PATH`. Static programs are left as they are.
fn find_libraries_in_usr_local(program: &Path) -> Result<(), ImageError> {
    let mut magic = [0u8; 4];
    let elf = std::fs::File::open(program)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if !elf {
        return Ok(());
    }
    let dynamic = Command::new("patchelf")
        .arg("--print-interpreter")
        .arg(program)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if dynamic {
        run(Command::new("patchelf")
            .args(["--set-rpath", LIBRARY_DIR])
            .arg(program))?;
    }
    Ok(())
}

/// Unpacks `deb` and copies its programs (those of `programs`, or all) and libraries into
/// `staging`.
fn unpack_into(
    deb: &Path,
    work: &Path,
    staging: &Path,
    programs: &[String],
) -> Result<(), ImageError> {
    if work.exists() {
        std::fs::remove_dir_all(work).map_err(ImageError::io("cleaning", work))?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(work))?;
    let entries = ext::walk(work).map_err(ImageError::io("reading", work))?;
    for e in entries {
        let Some(to) = placed(Path::new(&e.path)) else {
            continue;
        };
        let program = to.starts_with("usr/local/bin");
        let wanted = programs.is_empty()
            || to
                .file_name()
                .is_some_and(|n| programs.iter().any(|p| n == p.as_str()));
        if program && !wanted {
            continue;
        }
        let from = work.join(&e.path);
        let dest = staging.join(&to);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
        }
        match e.kind {
            ext::Kind::File => {
                // A file replaces a link of the same name placed before it.
                let _ = std::fs::remove_file(&dest);
                std::fs::copy(&from, &dest).map_err(ImageError::io("copying", &from))?;
                if program {
                    find_libraries_in_usr_local(&dest)?;
                }
            }
            ext::Kind::Symlink => {
                // Library links (libseccomp.so.2 → libseccomp.so.2.5.4) stay links, by name. A
                // link to a program of the same name elsewhere (/usr/bin/runc → ../sbin/runc)
                // would point at itself once both are in one directory: the file is enough.
                let target = std::fs::read_link(&from).map_err(ImageError::io("reading", &from))?;
                let target = target.file_name().map(PathBuf::from).unwrap_or(target);
                if Some(target.as_os_str()) == dest.file_name() || dest.exists() {
                    continue;
                }
                std::os::unix::fs::symlink(&target, &dest)
                    .map_err(ImageError::io("linking", &dest))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Stages the tree, checks it as the node will, packs and signs it. Returns the extension's
/// bytes and manifest.
pub fn build(
    opts: &ExtensionOptions,
    key: &upgrade::bundle::SigningKey,
) -> Result<(Vec<u8>, Manifest), ImageError> {
    require(&[
        ("mksquashfs", "squashfs-tools"),
        ("dpkg-deb", "dpkg"),
        ("patchelf", "patchelf"),
    ])?;
    if !ext::valid_name(&opts.name) {
        return Err(ImageError::Invalid(format!(
            "{:?} is not an extension name (lower-case letters, digits, '-', '_', '.'; at most 64)",
            opts.name
        )));
    }
    if opts.dir.is_none() && opts.debs.is_empty() {
        return Err(ImageError::Invalid(
            "nothing to pack: give a directory or Debian packages".into(),
        ));
    }
    let staging = &opts.staging;
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(ImageError::io("cleaning", staging))?;
    }
    std::fs::create_dir_all(staging).map_err(ImageError::io("creating", staging))?;
    if let Some(dir) = &opts.dir {
        if !dir.is_dir() {
            return Err(ImageError::Invalid(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        // cp -a keeps modes and links as they are, so the check below sees what was given.
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", dir.display()))
            .arg(staging))?;
    }
    let work = staging.with_extension("unpack");
    for package in &opts.debs {
        let deb = crate::tools::debian_package(&opts.cache.join("debs"), package)?;
        unpack_into(&deb, &work, staging, &opts.programs)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    let release = staging.join(ext::release_path(&opts.name));
    if let Some(d) = release.parent() {
        std::fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
    }
    std::fs::write(
        &release,
        ext::release_record(&opts.version, opts.level, std::env::consts::ARCH),
    )
    .map_err(ImageError::io("writing", &release))?;
    // The staging root is made 0755 (a temporary directory may be 0700) and checked as the
    // node will check the mounted image: the same refusal, before anything is signed.
    std::fs::set_permissions(staging, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(ImageError::io("chmod", staging))?;
    let entries = ext::walk(staging).map_err(ImageError::io("reading", staging))?;
    ext::check_entries(&entries).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let squashfs = staging.with_extension("squashfs");
    // Modes are kept (a setuid file was refused above).
    crate::rootfs::squash(staging, &squashfs)?;
    let data = std::fs::read(&squashfs).map_err(ImageError::io("reading", &squashfs))?;
    let _ = std::fs::remove_file(&squashfs);
    let bytes = ext::build(
        &opts.name,
        &opts.version,
        opts.level,
        std::env::consts::ARCH,
        data,
        key,
    )
    .map_err(|e| ImageError::Invalid(e.to_string()))?;
    let head = ext::read_head(&bytes, &[key.verifying_key()])
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    Ok((bytes, head.manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_files_land_in_bin_and_lib_or_nowhere() {
        let p = |s: &str| placed(Path::new(s)).map(|p| p.display().to_string());
        assert_eq!(p("usr/sbin/runc").as_deref(), Some("usr/local/bin/runc"));
        assert_eq!(
            p("usr/bin/containerd-shim-runc-v2").as_deref(),
            Some("usr/local/bin/containerd-shim-runc-v2")
        );
        assert_eq!(
            p("usr/lib/x86_64-linux-gnu/libseccomp.so.2.5.4").as_deref(),
            Some("usr/local/lib/libseccomp.so.2.5.4")
        );
        assert_eq!(p("usr/share/doc/runc/copyright"), None);
        assert_eq!(p("lib/systemd/system/containerd.service"), None);
        assert_eq!(p("etc/containerd/config.toml"), None);
    }

    #[test]
    fn a_directory_with_a_setuid_file_is_refused_before_anything_is_signed() {
        use std::os::unix::fs::PermissionsExt;
        if !crate::tools::which("mksquashfs") {
            eprintln!("skipped: mksquashfs is not installed");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let tree = tmp.path().join("tree/usr/local/bin");
        std::fs::create_dir_all(&tree).expect("mkdir");
        std::fs::write(tree.join("tool"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(tree.join("tool"), std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        let opts = ExtensionOptions {
            name: "tools".into(),
            version: "1".into(),
            dir: Some(tmp.path().join("tree")),
            debs: Vec::new(),
            programs: Vec::new(),
            cache: tmp.path().join("cache"),
            staging: tmp.path().join("staging"),
            level: ext::LEVEL,
        };
        let key = upgrade::bundle::SigningKey::from_bytes(&[7; 32]);
        let err = build(&opts, &key).expect_err("setuid");
        assert!(err.to_string().contains("setuid"), "{err}");
        std::fs::set_permissions(tree.join("tool"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let (bytes, m) = build(&opts, &key).expect("plain");
        assert_eq!(m.name, "tools");
        let v = ext::read_head(&bytes, &[key.verifying_key()]).expect("head");
        ext::check_image(&v.manifest, &mut &bytes[v.image_offset as usize..]).expect("image");
    }
}
