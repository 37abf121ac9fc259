//! Device-mapper through its ioctls (`/dev/mapper/control`): create a mapped device with one
//! target (a `verity` root, a `crypt` volume), read its status, remove it.
//!
//! Hand-written rather than the `devicemapper` crate: that crate's build runs bindgen (libclang)
//! over libdevmapper's headers (100–370 MB of Debian packages) to reach the same four ioctls,
//! whose layout is a stable kernel ABI (`<linux/dm-ioctl.h>`, interface version 4).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::PlatformError;

/// The control device.
pub const CONTROL: &str = "/dev/mapper/control";
/// `sizeof(struct dm_ioctl)`.
const HEADER: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC: usize = 40;
/// Room for replies (status strings, the table of a target).
const BUFFER: usize = 16 * 1024;

/// The table is read-only (dm-verity refuses anything else).
pub const READONLY: u32 = 1 << 0;
/// The kernel wipes the ioctl buffer after use (for tables holding a key).
pub const SECURE_DATA: u32 = 1 << 15;
/// Out: the reply did not fit.
const BUFFER_FULL: u32 = 1 << 8;

const DEV_CREATE: u64 = 3;
const DEV_REMOVE: u64 = 4;
const DEV_SUSPEND: u64 = 6;
const TABLE_LOAD: u64 = 9;
const TABLE_STATUS: u64 = 12;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
fn request(nr: u64) -> u64 {
    (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | nr
}

/// One target of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// `verity`, `crypt`, …
    pub kind: &'static str,
    /// The target's parameters (for `crypt`, they hold the key).
    pub params: String,
}

/// A mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Its node, `/dev/dm-N` (devtmpfs makes it; there is no udev for `/dev/mapper/NAME`).
    pub path: PathBuf,
    /// Major and minor.
    pub dev: (u64, u64),
}

fn header(name: &str, flags: u32, payload: &[u8], targets: u32) -> Vec<u8> {
    let mut b = vec![0u8; (HEADER + payload.len()).max(BUFFER)];
    let total = b.len() as u32;
    let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Interface version 4.0.0: the kernel accepts any minor up to its own.
    put(0, 4);
    put(12, total);
    put(16, HEADER as u32);
    put(20, targets);
    put(28, flags);
    let n = name.len().min(127);
    b[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    b[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    b
}

fn call(nr: u64, buf: &mut [u8], what: String) -> Result<(), PlatformError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(|e| PlatformError::io("opening", std::path::Path::new(CONTROL), e))?;
    // SAFETY: `buf` is a dm_ioctl header followed by its payload, at least HEADER bytes long,
    // and its data_size field says how long it is, so the kernel reads and writes only inside
    // it; both the buffer and the descriptor outlive the call.
    let r = unsafe { libc::ioctl(control.as_raw_fd(), request(nr) as _, buf.as_mut_ptr()) };
    if r != 0 {
        return Err(PlatformError::Sys {
            what,
            errno: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// Creates device `name` with one target and activates it. A table the kernel refuses leaves
/// no device behind.
pub fn create(name: &str, target: &Target, flags: u32) -> Result<Mapped, PlatformError> {
    let mut b = header(name, 0, &[], 0);
    call(
        DEV_CREATE,
        &mut b,
        format!("creating device-mapper device {name}"),
    )?;
    let dev = b
        .get(40..48)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    // The kernel's huge_encode_dev: minor's low 8 bits, major, then the rest of the minor.
    let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & !0xff));
    let plen = (target.params.len() + 1).next_multiple_of(8);
    let mut spec = vec![0u8; SPEC + plen];
    spec[8..16].copy_from_slice(&target.sectors.to_le_bytes());
    spec[20..24].copy_from_slice(&((SPEC + plen) as u32).to_le_bytes());
    let kind = target.kind.as_bytes();
    spec[24..24 + kind.len().min(15)].copy_from_slice(&kind[..kind.len().min(15)]);
    spec[SPEC..SPEC + target.params.len()].copy_from_slice(target.params.as_bytes());
    let mut b = header(name, flags, &spec, 1);
    let loaded = call(
        TABLE_LOAD,
        &mut b,
        format!("loading the {} table of {name}", target.kind),
    );
    // The key (for crypt) was in these buffers.
    b.fill(0);
    spec.fill(0);
    let activated = loaded.and_then(|()| {
        let mut b = header(name, 0, &[], 0);
        // DEV_SUSPEND without the suspend flag resumes: the loaded table goes live.
        call(DEV_SUSPEND, &mut b, format!("activating {name}"))
    });
    if let Err(e) = activated {
        let _ = remove(name);
        return Err(e);
    }
    Ok(Mapped {
        path: PathBuf::from(format!("/dev/dm-{minor}")),
        dev: (major, minor),
    })
}

/// Removes device `name` (it must not be open or mounted).
pub fn remove(name: &str) -> Result<(), PlatformError> {
    let mut b = header(name, 0, &[], 0);
    call(
        DEV_REMOVE,
        &mut b,
        format!("removing device-mapper device {name}"),
    )
}

/// The status line of device `name`'s first target (for `verity`: `V` verified so far, `C` a
/// corrupted block was read).
pub fn status(name: &str) -> Result<String, PlatformError> {
    let mut b = header(name, 0, &[], 0);
    call(
        TABLE_STATUS,
        &mut b,
        format!("reading the status of {name}"),
    )?;
    if u32_at(&b, 28) & BUFFER_FULL != 0 || u32_at(&b, 20) == 0 {
        return Err(PlatformError::Sys {
            what: format!("reading the status of {name}: no target in the reply"),
            errno: nix::errno::Errno::ENODATA,
        });
    }
    let start = u32_at(&b, 16) as usize + SPEC;
    let text = b.get(start..).unwrap_or_default();
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    Ok(String::from_utf8_lossy(&text[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_kernels_iowr_numbers() {
        // From <linux/dm-ioctl.h>: DM_DEV_CREATE = _IOWR(0xfd, 3, struct dm_ioctl).
        assert_eq!(request(DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(TABLE_LOAD), 0xc138_fd09);
    }

    #[test]
    fn a_header_carries_version_sizes_name_and_payload() {
        let b = header("plinth-root", READONLY, b"xyz", 1);
        assert_eq!(b.len(), BUFFER);
        assert_eq!(u32_at(&b, 0), 4);
        assert_eq!(u32_at(&b, 12), BUFFER as u32);
        assert_eq!(u32_at(&b, 16), HEADER as u32);
        assert_eq!(u32_at(&b, 20), 1);
        assert_eq!(u32_at(&b, 28), READONLY);
        assert_eq!(&b[48..59], b"plinth-root");
        assert_eq!(b[59], 0);
        assert_eq!(&b[HEADER..HEADER + 3], b"xyz");
    }
}
