//! Unified kernel images: systemd-stub with the kernel, initramfs, command line and os-release
//! as PE sections, at the addresses measured to work with Debian 12's stub; for a signed image
//! also `.pcrpkey` (the PCR policy key) and `.pcrsig` (its signature of the PCR 11 value the
//! stub will measure for this UKI), which systemd-stub hands to the initramfs.

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
    /// Sign the PCR 11 value this UKI measures to, for TPM-sealed volumes.
    pub pcr_signing: Option<&'a crate::secureboot::Keys>,
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
    if let Some(keys) = p.pcr_signing {
        let pcrsig = p.work_dir.join(format!("{stem}.pcrsig"));
        let read = |f: &Path| std::fs::read(f).map_err(ImageError::io("reading", f));
        let pcrpkey = read(&keys.pcr_public())?;
        let pcr11 = tpm::policy::predict_pcr11(&[
            (".linux", &read(p.kernel)?),
            (".osrel", p.os_release.as_bytes()),
            (".cmdline", p.cmdline.as_bytes()),
            (".initrd", &read(p.initrd)?),
            (".pcrpkey", &pcrpkey),
        ]);
        let doc = crate::secureboot::sign_pcr11(keys, &pcr11)?;
        std::fs::write(&pcrsig, doc).map_err(ImageError::io("writing", &pcrsig))?;
        args.extend(section(".pcrpkey", &keys.pcr_public(), "0x40000"));
        args.extend(section(".pcrsig", &pcrsig, "0x50000"));
    }
    args.extend(section(".linux", p.kernel, "0x2000000"));
    args.extend(section(".initrd", p.initrd, "0x3000000"));
    run(Command::new("objcopy").args(&args).arg(STUB).arg(p.out))?;
    Ok(())
}
