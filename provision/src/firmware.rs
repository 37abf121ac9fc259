//! The firmware a VM boots: OVMF's Secure Boot build with Plinth's keys enrolled in its variable
//! store, or with a blank store (Setup Mode, where an install enrols them).

use std::path::{Path, PathBuf};
use std::process::Command;

use imager::secureboot::Keys;

use crate::HarnessError;

/// OVMF's blank variable store (Setup Mode for the Secure Boot build).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// `virt-fw-vars` (PyPI `virt-firmware`): `PLINTH_VIRT_FW_VARS`, else on `PATH`.
fn virt_fw_vars() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("PLINTH_VIRT_FW_VARS") {
        return Ok(PathBuf::from(p));
    }
    if imager::tools::which("virt-fw-vars") {
        return Ok(PathBuf::from("virt-fw-vars"));
    }
    Err(HarnessError::Missing {
        what: "virt-fw-vars".into(),
        hint: "pip install virt-firmware, or set PLINTH_VIRT_FW_VARS; ./x does it".into(),
    })
}

/// A variable store with `keys` enrolled (PK, KEK, db; no Microsoft keys) and Secure Boot on,
/// made once per key directory (`OVMF_VARS_4M.enrolled.fd` beside the keys).
pub fn enrolled_vars(keys: &Path) -> Result<PathBuf, HarnessError> {
    vars_with(keys, true)
}

/// A variable store with `keys` enrolled and Secure Boot on (`secure_boot`) or off (keys
/// there, nothing enforced: a machine whose owner turned it off).
pub fn vars_with(keys: &Path, secure_boot: bool) -> Result<PathBuf, HarnessError> {
    let keys = Keys::load(keys)?;
    let out = keys.dir.join(if secure_boot {
        "OVMF_VARS_4M.enrolled.fd"
    } else {
        "OVMF_VARS_4M.enrolled-off.fd"
    });
    if out.is_file() {
        return Ok(out);
    }
    let guid = std::fs::read_to_string(keys.dir.join("owner.guid"))
        .map_err(HarnessError::io("reading owner.guid"))?;
    let guid = guid.trim();
    let tmp = out.with_extension("partial");
    let output = Command::new(virt_fw_vars()?)
        .arg("-i")
        .arg(OVMF_VARS)
        .arg("-o")
        .arg(&tmp)
        .arg("--set-pk")
        .arg(guid)
        .arg(keys.cert("PK"))
        .arg("--add-kek")
        .arg(guid)
        .arg(keys.cert("KEK"))
        .arg("--add-db")
        .arg(guid)
        .arg(keys.cert("db"))
        .arg("--no-microsoft")
        // With a PK enrolled and no SecureBootEnable variable, OVMF turns Secure Boot on by
        // itself (AuthVariableLib creates it as enabled in User Mode): "off" must be written.
        .args(if secure_boot {
            &["--secure-boot"][..]
        } else {
            &["--set-false", "SecureBootEnable"][..]
        })
        .output()
        .map_err(HarnessError::io("running virt-fw-vars"))?;
    if !output.status.success() {
        return Err(HarnessError::Other(format!(
            "virt-fw-vars failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    std::fs::rename(&tmp, &out).map_err(HarnessError::io("renaming the variable store"))?;
    Ok(out)
}
