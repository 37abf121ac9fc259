//! Running host tools with errors that say what failed.

use std::path::Path;
use std::process::Command;

use crate::ImageError;

/// Whether `tool` is on PATH (or in the sbin directories Debian keeps it in).
pub fn which(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|dir| Path::new(dir).join(tool).is_file());
    found
}

/// Fails naming the first missing tool and its package.
pub fn require(tools: &[(&str, &str)]) -> Result<(), ImageError> {
    for (tool, package) in tools {
        if !which(tool) {
            return Err(ImageError::MissingTool {
                tool: tool.to_string(),
                package: package.to_string(),
            });
        }
    }
    Ok(())
}

/// Runs a command; on failure, the error carries the command line and the tail of stderr.
pub fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let line = format!("{cmd:?}").replace('"', "");
    // sbin tools (mkfs, depmod) are not on a normal user's PATH.
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cmd
        .env("PATH", path)
        .output()
        .map_err(|source| ImageError::Io {
            what: "running",
            path: line.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        return Err(ImageError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A new directory in `parent` for one build's own files (removed when dropped): builds in
/// other processes may be working beside it in the same cache.
pub fn own_dir(parent: &std::path::Path, prefix: &str) -> Result<tempfile::TempDir, ImageError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .map_err(ImageError::io("creating a working directory in", parent))
}

/// The `.deb` of `package` in `dir`, downloaded with `apt-get download` the first time.
pub fn debian_package(
    dir: &std::path::Path,
    package: &str,
) -> Result<std::path::PathBuf, ImageError> {
    std::fs::create_dir_all(dir).map_err(ImageError::io("creating", dir))?;
    let find = || -> Option<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    tracing::info!("downloading {package}");
    // Into a directory of its own, then renamed into place: builds in other processes (the VM
    // tests run side by side) look for the package by name and must never find it half
    // written, and two downloading at once must not write one file.
    let partial = own_dir(dir, ".download.")?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(package)
        .current_dir(partial.path()))?;
    let deb = std::fs::read_dir(partial.path())
        .map_err(ImageError::io("reading", partial.path()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt-get download {package} left no .deb in {}",
                partial.path().display()
            ))
        })?;
    let name = dir.join(deb.file_name().unwrap_or_default());
    std::fs::rename(&deb, &name).map_err(ImageError::io("moving the package to", &name))?;
    Ok(name)
}
