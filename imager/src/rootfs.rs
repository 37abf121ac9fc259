//! The slot's root: a SquashFS image holding machined and the directories it mounts on.

use std::path::Path;
use std::process::Command;

use crate::tools::run;
use crate::ImageError;

/// Directories the node mounts on (the image is read-only, so they must exist in it).
const DIRS: &[&str] = &[
    "sbin",
    "etc",
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var",
    "system/state",
    "system/efi",
    // System extensions are overlaid here.
    "usr/local",
];

/// Host programs the node runs to make file systems (STATE and EPHEMERAL come back empty after
/// a reset; an install makes all of them). Copied with their shared libraries and loader: there
/// is no mature way to make ext4 from Rust, and these are the tools every distribution trusts.
const NODE_TOOLS: &[(&str, &str)] = &[
    ("/sbin/mke2fs", "e2fsprogs"),
    ("/sbin/mkfs.fat", "dosfstools"),
];
/// Configuration the tools read.
const NODE_TOOL_FILES: &[&str] = &["/etc/mke2fs.conf"];

/// The shared libraries (and loader) a dynamic program needs, from `ldd`.
fn libraries(program: &Path) -> Result<Vec<std::path::PathBuf>, ImageError> {
    let out = run(Command::new("ldd").arg(program))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.trim().split(' ').next()?;
            path.starts_with('/')
                .then(|| std::path::PathBuf::from(path))
        })
        .collect())
}

/// Copies `src` to the same path under `root`, following symlinks (the image holds files).
fn copy_into(root: &Path, src: &Path) -> Result<(), ImageError> {
    let rel = src.strip_prefix("/").unwrap_or(src);
    let dest = root.join(rel);
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
    }
    std::fs::copy(src, &dest).map_err(ImageError::io("copying", src))?;
    Ok(())
}

/// Puts the node tools, their libraries and their configuration under `root`.
fn node_tools(root: &Path) -> Result<(), ImageError> {
    for (tool, package) in NODE_TOOLS {
        let p = Path::new(tool);
        if !p.is_file() {
            return Err(ImageError::MissingTool {
                tool: tool.to_string(),
                package: package.to_string(),
            });
        }
        copy_into(root, p)?;
        for lib in libraries(p)? {
            copy_into(root, &lib)?;
        }
    }
    for f in NODE_TOOL_FILES {
        if Path::new(f).is_file() {
            copy_into(root, Path::new(f))?;
        }
    }
    Ok(())
}

/// The os-release text for an image version (also the UKI's `.osrel`). `SYSEXT_LEVEL` is the
/// system extension level the OS provides, the field systemd-sysext matches extensions by.
pub fn os_release(version: &str, extension_level: u32) -> String {
    format!(
        "NAME=\"Plinth\"\nID=plinth\nVERSION_ID=\"{version}\"\nPRETTY_NAME=\"Plinth {version}\"\nSYSEXT_LEVEL={extension_level}\n"
    )
}

/// Builds the root image from a fresh staging directory.
pub fn build(
    out: &Path,
    machined: &Path,
    version: &str,
    extension_level: u32,
    staging: &Path,
    filler_bytes: u64,
) -> Result<(), ImageError> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(ImageError::io("cleaning", staging))?;
    }
    for d in DIRS {
        let p = staging.join(d);
        std::fs::create_dir_all(&p).map_err(ImageError::io("creating", &p))?;
    }
    let bin = staging.join("sbin/machined");
    std::fs::copy(machined, &bin).map_err(ImageError::io("copying machined to", &bin))?;
    let etc = staging.join("etc");
    let release = format!("NAME=Plinth\nVERSION={version}\n");
    std::fs::write(etc.join("plinth-release"), release).map_err(ImageError::io("writing", &etc))?;
    std::fs::write(etc.join("os-release"), os_release(version, extension_level))
        .map_err(ImageError::io("writing", &etc))?;
    node_tools(staging)?;
    if filler_bytes > 0 {
        let dir = staging.join("usr/share/plinth");
        std::fs::create_dir_all(&dir).map_err(ImageError::io("creating", &dir))?;
        let path = dir.join("filler");
        let mut f = std::fs::File::create(&path).map_err(ImageError::io("creating", &path))?;
        // blake3's extendable output: deterministic (same image, same digest) and
        // incompressible (mksquashfs stores it at full size).
        let mut xof = blake3::Hasher::new()
            .update(version.as_bytes())
            .finalize_xof();
        std::io::copy(&mut std::io::Read::take(&mut xof, filler_bytes), &mut f)
            .map_err(ImageError::io("writing", &path))?;
    }
    squash(staging, out)
}

/// Packs `dir` into the SquashFS `out` (zstd). Fixed times and owners, no extended attributes:
/// the same tree gives the same image, and so the same digest.
pub fn squash(dir: &Path, out: &Path) -> Result<(), ImageError> {
    run(Command::new("mksquashfs")
        .arg(dir)
        .arg(out)
        .args([
            "-noappend",
            "-comp",
            "zstd",
            "-all-root",
            "-no-xattrs",
            "-no-progress",
            "-quiet",
        ])
        .args(["-mkfs-time", "0", "-all-time", "0"]))?;
    Ok(())
}

/// Writes the root partition image `out`: the SquashFS `squashfs` (padded to whole 4 KiB
/// blocks), then its dm-verity hash tree. Returns what the UKI pins.
pub fn with_hash_tree(
    squashfs: &Path,
    out: &Path,
) -> Result<upgrade::verity::VerityRoot, ImageError> {
    let data = std::fs::read(squashfs).map_err(ImageError::io("reading", squashfs))?;
    let (image, root) = upgrade::verity::image(data)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", squashfs.display())))?;
    std::fs::write(out, image).map_err(ImageError::io("writing", out))?;
    Ok(root)
}

/// Size and blake3 digest (hex) of a file.
pub fn digest(path: &Path) -> Result<(u64, String), ImageError> {
    let mut hasher = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(ImageError::io("opening", path))?;
    hasher
        .update_reader(f)
        .map_err(ImageError::io("hashing", path))?;
    let size = std::fs::metadata(path)
        .map_err(ImageError::io("reading", path))?
        .len();
    Ok((size, hasher.finalize().to_hex().to_string()))
}
