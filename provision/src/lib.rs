//! Launching Plinth nodes on this machine, for `plinth cluster create` and the tests: in QEMU
//! with real UEFI firmware (OVMF), reading what they did; or as simulated machines ([`sim`]).
//!
//! - [`qemu`]: launch a VM (OVMF's Secure Boot build on q35, a per-VM copy of the firmware
//!   variable store, a software TPM (swtpm) with per-VM state, NVMe system disk, user
//!   networking with the API forwarded to a free 127.0.0.1 port, the i6300esb watchdog, serial
//!   console to a file); it is torn down when dropped unless detached.
//! - [`firmware`]: variable stores with Plinth's Secure Boot keys enrolled.
//! - [`serial`]: the console log with the host time each line arrived.
//! - [`timeline`]: the boot timeline (firmware → kernel → initramfs phases → machined phases →
//!   API ready) from the serial log's trace lines.
//! - [`node`]: a whole node: disk, PKI and client config, ready to boot ([`node::NodeSpec`]).
//!
//! Every VM runs under TCG: KVM is not usable on the machines this runs on.
#![warn(missing_docs)]

pub mod etcdctl;
pub mod firmware;
pub mod node;
pub mod qemu;
pub mod serial;
pub mod sim;
pub mod timeline;

/// A harness operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A host prerequisite is missing.
    #[error("{what} is missing ({hint})")]
    Missing {
        /// What.
        what: String,
        /// How to get it.
        hint: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting timed out.
    #[error("timed out after {secs}s waiting for {what}; last console lines:\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
        /// The end of the serial log.
        tail: String,
    },
    /// The VM exited while something was awaited.
    #[error("the VM exited ({status}) while waiting for {what}; last console lines:\n{tail}")]
    Exited {
        /// What was awaited.
        what: String,
        /// QEMU's exit status.
        status: String,
        /// The end of the serial log.
        tail: String,
    },
    /// Building the image failed.
    #[error(transparent)]
    Image(#[from] imager::ImageError),
    /// The node config could not be written.
    #[error("the node config: {0}")]
    Config(#[from] config::ConfigError),
    /// Other failures with a message.
    #[error("{0}")]
    Other(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}
