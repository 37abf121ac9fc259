//! Where TPM commands go: the kernel's resource-managed device, or a software TPM's socket.

use std::io::{Read, Write};
use std::path::Path;

use crate::TpmError;

/// Carries one command to the TPM and its response back.
pub trait Transport: Send {
    /// Sends `command` whole and returns the whole response.
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TpmError>;
}

/// The largest response of any command here (TPM responses are at most a few KiB).
const MAX_RESPONSE: usize = 8192;

/// `/dev/tpmrm0`: the kernel's resource manager, which virtualizes transient handles per open
/// descriptor and flushes them when it closes (so a crash leaks nothing in the TPM).
pub struct Device(std::fs::File);

impl Device {
    /// Opens the device.
    pub fn open(path: &Path) -> Result<Device, TpmError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(Device)
            .map_err(|e| TpmError::Io(format!("opening {}: {e}", path.display())))
    }
}

impl Transport for Device {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TpmError> {
        // One write of the whole command, one read of the whole response: the device's
        // protocol.
        self.0
            .write_all(command)
            .map_err(|e| TpmError::Io(format!("sending a TPM command: {e}")))?;
        let mut buf = vec![0u8; MAX_RESPONSE];
        let n = self
            .0
            .read(&mut buf)
            .map_err(|e| TpmError::Io(format!("reading a TPM response: {e}")))?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// A software TPM's command socket (`swtpm socket --server type=unixio,path=…`): the same bytes
/// as the device, with no resource manager in between.
pub struct Socket(std::os::unix::net::UnixStream);

impl Socket {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> Result<Socket, TpmError> {
        std::os::unix::net::UnixStream::connect(path)
            .map(Socket)
            .map_err(|e| TpmError::Io(format!("connecting to {}: {e}", path.display())))
    }
}

impl Transport for Socket {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TpmError> {
        let io = |e: std::io::Error| TpmError::Io(format!("talking to the software TPM: {e}"));
        self.0.write_all(command).map_err(io)?;
        let mut head = [0u8; 10];
        self.0.read_exact(&mut head).map_err(io)?;
        let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        if !(10..=MAX_RESPONSE).contains(&size) {
            return Err(TpmError::Malformed("the response size is out of range"));
        }
        let mut out = head.to_vec();
        out.resize(size, 0);
        self.0.read_exact(&mut out[10..]).map_err(io)?;
        Ok(out)
    }
}
