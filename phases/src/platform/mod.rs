//! The one trait through which sequences touch the machine.
//!
//! [`linux::Linux`] is the real machine, used by machined as PID 1 and as the initramfs `/init`;
//! `sim::Sim` (feature `sim`, never in the release image) is an unprivileged model of one (a disk image file, a directory of UEFI
//! variables, an emulated firmware), where the same sequences run in seconds.

pub mod dm;
pub mod linux;
pub mod loopdev;
#[cfg(feature = "sim")]
pub mod sim;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bootloader::efivarfs::VarStore;
use upgrade::DiskPartition;

/// A file system to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// What to mount (device path or pseudo-fs name).
    pub source: String,
    /// Where.
    pub target: PathBuf,
    /// File system type.
    pub fstype: String,
    /// Mount read-only.
    pub read_only: bool,
    /// `nosuid,nodev,noexec`: for pseudo and data file systems.
    pub restricted: bool,
    /// `nosuid,nodev`: for programs that may run but not raise privileges (extensions).
    pub nosuid: bool,
    /// File-system-specific options (`mode=0755`).
    pub data: Option<String>,
}

impl MountSpec {
    /// A mount with no options.
    pub fn new(source: &str, target: impl Into<PathBuf>, fstype: &str) -> Self {
        MountSpec {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            read_only: false,
            restricted: false,
            nosuid: false,
            data: None,
        }
    }

    /// Read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `nosuid,nodev,noexec`.
    pub fn restricted(mut self) -> Self {
        self.restricted = true;
        self
    }

    /// `nosuid,nodev`.
    pub fn nosuid(mut self) -> Self {
        self.nosuid = true;
        self
    }

    /// With file-system options.
    pub fn data(mut self, data: &str) -> Self {
        self.data = Some(data.into());
        self
    }
}

/// A read-only loop device over part of a file ([`Platform::attach_loop`]).
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Holds the device open: it detaches itself once nothing (this, or a mapping over it)
    /// uses it.
    pub hold: Option<std::fs::File>,
}

/// A whole disk and its GPT partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Device node, e.g. `/dev/nvme0n1`.
    pub device: PathBuf,
    /// Partitions with their device nodes.
    pub partitions: Vec<(DiskPartition, PathBuf)>,
}

impl Disk {
    /// The partition with GPT name `label`.
    pub fn by_label(&self, label: &str) -> Option<&(DiskPartition, PathBuf)> {
        self.partitions.iter().find(|(p, _)| p.label == label)
    }
}

/// What a path names as a block device: which device (however it was named: a symlink under
/// `/dev/disk/by-id` is the same disk as `/dev/nvme0n1`) and whether it is a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The device's identity (its device number on Linux).
    pub id: (u64, u64),
    /// The path it is known by in the disk list (symlinks resolved).
    pub path: PathBuf,
    /// It is a partition of a disk, not a whole disk.
    pub partition: bool,
}

/// A mounted file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// File system type.
    pub fstype: String,
    /// Source (device or pseudo-fs name).
    pub source: String,
}

/// What to do with the power once a terminating sequence is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Restart (through the firmware).
    Reboot,
    /// Power off.
    PowerOff,
}

/// How a file system gets made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mkfs {
    /// Run this program (through the reaper, like every child of PID 1).
    Run(Vec<String>),
    /// Already made (the simulated machine formats in place).
    Done,
}

/// How thoroughly a wipe destroys data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipeMethod {
    /// The first and last MiB (where file system signatures live) zeroed, the rest discarded.
    Fast,
    /// Every byte overwritten with zeroes.
    Zero,
}

/// What loading a kernel module did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleLoad {
    /// Inserted now.
    Loaded,
    /// It was already there (built in or loaded before).
    AlreadyLoaded,
    /// It refused to load because what it drives is not there (`ENODEV`: a CPU without the
    /// instructions an accelerated cipher uses).
    NoSuchHardware,
}

/// A platform operation failed; every variant says what it was doing to what.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// mount(2) failed.
    #[error("mounting {source_name} ({fstype}) on {target}: {errno}")]
    Mount {
        /// Source.
        source_name: String,
        /// Target.
        target: String,
        /// Type.
        fstype: String,
        /// The error.
        errno: nix::Error,
    },
    /// A move mount failed.
    #[error("moving mount {from} to {to}: {errno}")]
    MoveMount {
        /// From.
        from: String,
        /// To.
        to: String,
        /// The error.
        errno: nix::Error,
    },
    /// init_module(2) failed.
    #[error("loading kernel module {path}: {errno}")]
    Module {
        /// Module file.
        path: String,
        /// The error.
        errno: nix::Error,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        errno: nix::Error,
    },
    /// Network configuration failed.
    #[error("configuring interface {interface}: {reason}")]
    Network {
        /// Interface.
        interface: String,
        /// Why.
        reason: String,
    },
    /// This platform cannot do that.
    #[error("{0} is not supported on this platform")]
    Unsupported(&'static str),
}

impl PlatformError {
    /// An I/O error with context.
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        PlatformError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}

/// Every effect a sequence has on the machine.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    /// Short name: `linux`.
    fn name(&self) -> &'static str;

    /// The kernel command line.
    fn cmdline(&self) -> Result<String, PlatformError>;

    /// Reads a whole file.
    fn read(&self, path: &Path) -> Result<Vec<u8>, PlatformError>;

    /// Writes a whole file (created with mode 0600).
    fn write(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError>;

    /// Where `path` of the node is for a program machined starts (the same path on a real
    /// machine; inside the simulated machine's directory on the simulated one).
    fn host_path(&self, path: &Path) -> std::path::PathBuf {
        path.to_path_buf()
    }

    /// Replaces a file atomically and durably: the data goes to a temporary file beside it
    /// (mode 0600), which is synced, renamed over `path`, and the directory synced. A power cut
    /// at any point leaves the old file or the new one, never a torn or empty one.
    fn replace(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError>;

    /// Removes a file (durably: the directory is synced); one that is not there is not an
    /// error.
    fn remove(&self, path: &Path) -> Result<(), PlatformError>;

    /// Rotates a log that a process appends to: copies it to `keep` (replacing it), then
    /// empties it; the writer goes on appending at the new end.
    fn rotate(&self, log: &Path, keep: &Path) -> Result<(), PlatformError>;

    /// Creates a directory and its parents.
    fn mkdir_all(&self, path: &Path) -> Result<(), PlatformError>;

    /// Mounts a file system (creating the target directory if needed).
    fn mount(&self, spec: &MountSpec) -> Result<(), PlatformError>;

    /// Moves a mount (and its submounts) to another place.
    fn move_mount(&self, from: &Path, to: &Path) -> Result<(), PlatformError>;

    /// Loads a kernel module from a file opened earlier (`path` names it in errors), with
    /// `params` (`name=value`, space-separated).
    fn load_module_file(
        &self,
        file: &std::fs::File,
        path: &Path,
        params: &str,
    ) -> Result<ModuleLoad, PlatformError>;

    /// The UEFI variable store.
    fn efivars(&self) -> VarStore;

    /// Maps `device` through dm-verity as `name`, data and hash tree both read from it and
    /// checked against `root`; a corrupted block read later panics the machine if `panic`
    /// (the root: a trial then falls back), or fails the read (an extension). Returns the
    /// device to mount.
    fn map_verity(
        &self,
        name: &str,
        device: &Path,
        root: &upgrade::verity::VerityRoot,
        panic: bool,
    ) -> Result<PathBuf, PlatformError>;

    /// Attaches `size` bytes of `file` from `offset` on to a read-only loop device.
    fn attach_loop(&self, file: &Path, offset: u64, size: u64)
        -> Result<LoopDevice, PlatformError>;

    /// Maps `device` from byte `offset` on through dm-crypt (`aes-xts-plain64` with `key`, 64
    /// bytes) as `name`. Returns the device to use.
    fn map_crypt(
        &self,
        name: &str,
        device: &Path,
        offset: u64,
        key: &[u8],
    ) -> Result<PathBuf, PlatformError>;

    /// Removes the device-mapper device `name` (not there: not an error).
    fn unmap(&self, name: &str) -> Result<(), PlatformError>;

    /// The machine's TPM, `None` if it has none.
    fn tpm(&self) -> Result<Option<tpm::Tpm>, PlatformError>;

    /// The status line of the device-mapper device `name` (for verity: `V` or `C`), `None`
    /// if there is no such device.
    fn mapping_status(&self, name: &str) -> Result<Option<String>, PlatformError>;

    /// Whole disks with a readable GPT.
    fn disks(&self) -> Result<Vec<Disk>, PlatformError>;

    /// Opens a partition device for reading (and writing, with `write`). Returns the file and
    /// the offset in it where the partition starts: 0 for a real partition device, the
    /// partition's offset in the disk image on the simulated machine.
    fn open_partition(
        &self,
        device: &Path,
        write: bool,
    ) -> Result<(std::fs::File, u64), PlatformError>;

    /// What `path` names as a block device (an error if it names none).
    fn block_device(&self, path: &Path) -> Result<BlockDevice, PlatformError>;

    /// Has the kernel read `disk`'s partition table again (after the installer wrote it).
    fn reread_partitions(&self, disk: &Path) -> Result<(), PlatformError>;

    /// Renames a file (on the same file system): how a file is replaced atomically.
    fn rename(&self, from: &Path, to: &Path) -> Result<(), PlatformError>;

    /// Sets the host name.
    fn set_hostname(&self, name: &str) -> Result<(), PlatformError>;

    /// Brings up loopback and configures the interfaces statically.
    async fn configure_network(
        &self,
        interfaces: &[config::Interface],
    ) -> Result<(), PlatformError>;

    /// Brings up the links (every Ethernet link when `links` is empty) and leases each an IPv4
    /// address over DHCP. With `links` empty, succeeds when at least one link got a lease.
    async fn configure_dhcp(
        &self,
        links: &[String],
    ) -> Result<Vec<(String, crate::dhcp::Lease)>, PlatformError>;

    /// Makes `new_root` the root: moves /proc, /sys, /dev, /run into it, frees the initramfs,
    /// and chroots. The caller then execs the new init.
    fn switch_root(&self, new_root: &Path) -> Result<(), PlatformError>;

    /// The mounted file systems, in mount order.
    fn mounts(&self) -> Result<Vec<MountEntry>, PlatformError>;

    /// Unmounts a file system.
    fn unmount(&self, target: &Path) -> Result<(), PlatformError>;

    /// Remounts a file system read-only (when it will not unmount, so it is still clean).
    fn remount_read_only(&self, target: &Path) -> Result<(), PlatformError>;

    /// Flushes every file system's dirty data to disk.
    fn sync(&self);

    /// PIDs of every user-space process but this one (kernel threads excluded).
    fn processes(&self) -> Result<Vec<i32>, PlatformError>;

    /// Whether process `pid` (or any thread of it, or its unreaped exit) is still there.
    fn process_exists(&self, pid: i32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Sends a signal to a process; a process that is already gone is not an error.
    fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> Result<(), PlatformError>;

    /// Starts a process in its own process group with a default `PATH` and `env` (`KEY=VALUE`),
    /// output appended to `log`; returns its PID.
    /// The caller registers it with the reaper (see [`crate::reaper::Reaper::spawn`]).
    fn spawn(&self, argv: &[String], env: &[String], log: &Path) -> Result<i32, PlatformError>;

    /// Whether a partition holds a file system of type `fstype` (its superblock is there).
    fn has_filesystem(&self, device: &Path, fstype: &str) -> Result<bool, PlatformError>;

    /// How to make a `fstype` file system labelled `label` on a partition.
    fn mkfs(&self, device: &Path, fstype: &str, label: &str) -> Result<Mkfs, PlatformError>;

    /// Wipes `len` bytes of a partition (or disk) device.
    fn wipe(&self, device: &Path, len: u64, method: WipeMethod) -> Result<(), PlatformError>;

    /// Opens a file for reading.
    fn open_file(&self, path: &Path) -> Result<std::fs::File, PlatformError>;

    /// Creates (or truncates) a file for writing, its directory made if missing.
    fn create_file(&self, path: &Path) -> Result<std::fs::File, PlatformError>;

    /// Bytes free for files in the file system holding `path`.
    fn free_bytes(&self, path: &Path) -> Result<u64, PlatformError>;

    /// The names in a directory (not sorted).
    fn list_dir(&self, path: &Path) -> Result<Vec<String>, PlatformError>;

    /// Where the kernel log is read, as a path on the machine running machined (`/dev/kmsg`
    /// on Linux).
    fn kernel_log_path(&self) -> PathBuf;

    /// This boot's id (changes on every boot).
    fn boot_id(&self) -> String;

    /// Restarts or powers off the machine. On real hardware it returns only on failure; a
    /// simulated machine accepts the request (`Ok`) and resets once the caller lets go.
    fn power(&self, action: PowerAction) -> Result<(), PlatformError>;
}
