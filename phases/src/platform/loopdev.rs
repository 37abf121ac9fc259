//! Read-only loop devices over a byte range of a file (`<linux/loop.h>`): how an extension
//! file on the ESP becomes a block device that dm-verity can check.
//!
//! Hand-written for the same reason as [`super::dm`]: the loop crates generate their bindings
//! with bindgen (libclang) at build time for two ioctls whose layout is a stable kernel ABI.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::PlatformError;

/// `LOOP_CTL_GET_FREE`: the number of a free loop device (made if needed).
const CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8): backing file, range and flags in one call.
const CONFIGURE: libc::c_ulong = 0x4C0A;
/// The device is read-only.
const FLAGS_READ_ONLY: u32 = 1;
/// The device detaches itself when its last user closes it (the verity mapping, here).
const FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn sys(what: String) -> impl FnOnce(nix::Error) -> PlatformError {
    move |errno| PlatformError::Sys { what, errno }
}

/// Attaches `size` bytes of `file` from `offset` on to a free loop device, read-only and
/// cleared when its last user lets go: the returned handle holds it until a mapping does.
pub fn attach(file: &Path, offset: u64, size: u64) -> Result<super::LoopDevice, PlatformError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| PlatformError::io("opening", Path::new("/dev/loop-control"), e))?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = unsafe { libc::ioctl(control.as_raw_fd(), CTL_GET_FREE as _) };
    if n < 0 {
        return Err(sys("finding a free loop device".into())(nix::Error::last()));
    }
    let device = PathBuf::from(format!("/dev/loop{n}"));
    let backing = OpenOptions::new()
        .read(true)
        .open(file)
        .map_err(|e| PlatformError::io("opening", file, e))?;
    let dev = OpenOptions::new()
        .read(true)
        .open(&device)
        .map_err(|e| PlatformError::io("opening", &device, e))?;
    let mut name = [0u8; 64];
    let shown = file.as_os_str().as_encoded_bytes();
    let len = shown.len().min(63);
    name[..len].copy_from_slice(&shown[..len]);
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset,
            sizelimit: size,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: FLAGS_READ_ONLY | FLAGS_AUTOCLEAR,
            file_name: name,
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (repr(C), the
    // kernel's layout), and `backing` stays open for the call (the kernel takes its own
    // reference to the file).
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            CONFIGURE as _,
            &config as *const LoopConfig,
        )
    };
    if r < 0 {
        return Err(sys(format!(
            "attaching {} to {}",
            file.display(),
            device.display()
        ))(nix::Error::last()));
    }
    Ok(super::LoopDevice {
        path: device,
        hold: Some(dev),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_structs_have_the_kernels_sizes() {
        // <linux/loop.h>: sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304.
        assert_eq!(std::mem::size_of::<super::LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<super::LoopConfig>(), 304);
    }
}
