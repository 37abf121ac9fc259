//! Unified kernel images: systemd-stub with the kernel, initramfs, command line and os-release
//! as PE sections, at the addresses measured to work with Debian 12's stub.

use std::path::Path;
use std::process::Command;

use crate::tools::run;
use crate::ImageError;

/// Debian's systemd-stub.
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Fails if the stub is not installed.
pub fn require_stub() -> Result<(), ImageError> {
    if Path::new(STUB).is_file() {
        Ok(())
    } else {
        Err(ImageError::MissingTool {
            tool: STUB.into(),
            package: "systemd-boot-efi".into(),
        })
    }
}

/// What goes into a UKI.
pub struct UkiParts<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Initramfs.
    pub initrd: &'a Path,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// os-release text.
    pub os_release: &'a str,
    /// Where to put the small section files.
    pub work_dir: &'a Path,
    /// Output.
    pub out: &'a Path,
}

/// Builds a UKI.
pub fn build(p: &UkiParts<'_>) -> Result<(), ImageError> {
    let stem = p.out.file_stem().and_then(|s| s.to_str()).unwrap_or("uki");
    let cmdline = p.work_dir.join(format!("{stem}.cmdline"));
    let osrel = p.work_dir.join(format!("{stem}.osrel"));
    std::fs::write(&cmdline, p.cmdline).map_err(ImageError::io("writing", &cmdline))?;
    std::fs::write(&osrel, p.os_release).map_err(ImageError::io("writing", &osrel))?;
    let section = |name: &str, file: &Path, vma: &str| {
        vec![
            "--add-section".to_string(),
            format!("{name}={}", file.display()),
            "--change-section-vma".to_string(),
            format!("{name}={vma}"),
        ]
    };
    let mut args = Vec::new();
    args.extend(section(".osrel", &osrel, "0x20000"));
    args.extend(section(".cmdline", &cmdline, "0x30000"));
    args.extend(section(".linux", p.kernel, "0x2000000"));
    args.extend(section(".initrd", p.initrd, "0x3000000"));
    run(Command::new("objcopy").args(&args).arg(STUB).arg(p.out))?;
    Ok(())
}
