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
];

/// The os-release text for an image version (also the UKI's `.osrel`).
pub fn os_release(version: &str) -> String {
    format!(
        "NAME=\"Plinth\"\nID=plinth\nVERSION_ID=\"{version}\"\nPRETTY_NAME=\"Plinth {version}\"\n"
    )
}

/// Builds the root image from a fresh staging directory.
pub fn build(out: &Path, machined: &Path, version: &str, staging: &Path) -> Result<(), ImageError> {
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
    std::fs::write(etc.join("os-release"), os_release(version))
        .map_err(ImageError::io("writing", &etc))?;
    // Fixed times and owners: the same inputs give the same image, and so the same digest.
    run(Command::new("mksquashfs")
        .arg(staging)
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
