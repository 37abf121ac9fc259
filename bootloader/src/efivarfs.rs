//! UEFI variables through efivarfs: one file per variable, `Name-GUID`, holding a 4-byte
//! little-endian attribute word followed by the data.
//!
//! The store only knows that file format, so pointing it at a temp dir gives tests the same
//! code path as `/sys/firmware/efi/efivars`. Two efivarfs rules shape the writes:
//! - A write is one `SetVariable()` call, so attributes and data go out in a single `write(2)`;
//!   a split write would set the variable twice (or be rejected).
//! - The kernel marks variables it does not know to be safe to change with the immutable
//!   inode flag, so the flag is cleared before writing or deleting an existing variable.
//!   Filesystems without the flags ioctl answer ENOTTY/EOPNOTSUPP/EINVAL; that means "no flag".
//!
//! And one shapes the reads: efivarfs turns every `read(2)`, even the one that only finds the
//! end, into two `GetVariable()` calls (the size, then the data), and a firmware that serves
//! its variables from SMM (OVMF with Secure Boot, most real machines) stops every CPU for each.
//! So a variable is read in one call into a buffer larger than it ([`read_whole`]).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use uuid::{uuid, Uuid};

/// The EFI global variable vendor (`Boot####`, `BootOrder`, `BootNext`, `BootCurrent`, …).
pub const EFI_GLOBAL_VARIABLE: Uuid = uuid!("8be4df61-93ca-11d2-aa0d-00e098032b8c");
/// systemd's boot loader interface vendor (`LoaderDevicePartUUID`, `StubInfo`, …).
pub const LOADER_VARIABLE: Uuid = uuid!("4a67b082-0a4c-41cf-b6c7-440b29bb8c4f");

/// `EFI_VARIABLE_NON_VOLATILE`: survives a reset.
pub const NON_VOLATILE: u32 = 0x0000_0001;
/// `EFI_VARIABLE_BOOTSERVICE_ACCESS`: visible before ExitBootServices.
pub const BOOTSERVICE_ACCESS: u32 = 0x0000_0002;
/// `EFI_VARIABLE_RUNTIME_ACCESS`: visible to the OS.
pub const RUNTIME_ACCESS: u32 = 0x0000_0004;

/// Where Linux mounts efivarfs.
pub const DEFAULT_ROOT: &str = "/sys/firmware/efi/efivars";

/// `FS_IMMUTABLE_FL` from `linux/fs.h` (not exported by libc).
const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;

// Private so the generated `pub unsafe fn`s stay out of the crate's API.
mod ioctl {
    // The kernel reads and writes an int for these, whatever the ioctl number's size says
    // (e2fsprogs and systemd pass an int too).
    nix::ioctl_read_bad!(fs_ioc_getflags, libc::FS_IOC_GETFLAGS, libc::c_int);
    nix::ioctl_write_ptr_bad!(fs_ioc_setflags, libc::FS_IOC_SETFLAGS, libc::c_int);
}

/// A variable's name and vendor GUID; its efivarfs file name is `Name-guid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarName {
    name: String,
    vendor: Uuid,
}

impl VarName {
    /// A variable `name` under `vendor`.
    pub fn new(name: impl Into<String>, vendor: Uuid) -> Self {
        VarName {
            name: name.into(),
            vendor,
        }
    }

    /// A variable under [`EFI_GLOBAL_VARIABLE`].
    pub fn global(name: impl Into<String>) -> Self {
        Self::new(name, EFI_GLOBAL_VARIABLE)
    }

    /// The name, e.g. `BootOrder`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vendor GUID.
    pub fn vendor(&self) -> Uuid {
        self.vendor
    }

    /// Parses an efivarfs file name `Name-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn from_file_name(file_name: &str) -> Option<Self> {
        const GUID_LEN: usize = 36;
        let split = file_name.len().checked_sub(GUID_LEN + 1)?;
        let name = file_name.get(..split)?;
        let guid = file_name.get(split + 1..)?;
        if name.is_empty() || !file_name.get(split..)?.starts_with('-') {
            return None;
        }
        Some(Self::new(name, Uuid::try_parse(guid).ok()?))
    }

    /// A name that maps to exactly one file inside the store's directory.
    fn is_valid(&self) -> bool {
        !self.name.is_empty()
            && !self.name.contains(['/', '\0'])
            && self.name != "."
            && self.name != ".."
    }
}

impl fmt::Display for VarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // efivarfs names use the lowercase hyphenated GUID.
        write!(f, "{}-{}", self.name, self.vendor.hyphenated())
    }
}

/// A variable's attributes and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `EFI_VARIABLE_*` attribute bits.
    pub attributes: u32,
    /// The value.
    pub data: Vec<u8>,
}

/// Why a variable could not be read, written, deleted or listed.
#[derive(Debug, thiserror::Error)]
pub enum VarStoreError {
    /// The name has a `/` or NUL in it, or is empty.
    #[error("EFI variable name {:?} cannot be a file name", name.name())]
    InvalidName {
        /// The offending name.
        name: VarName,
    },
    /// Reading the file failed.
    #[error("reading EFI variable {name} from {path}")]
    Read {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is too short to hold the attribute word.
    #[error(
        "EFI variable {name} at {path} is {len} bytes, shorter than its 4-byte attribute header"
    )]
    TooShort {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// File length.
        len: usize,
    },
    /// An empty value: firmware would delete the variable, a plain directory would not.
    #[error(
        "refusing to write an empty value to EFI variable {name}: firmware treats that as delete"
    )]
    EmptyValue {
        /// The variable.
        name: VarName,
    },
    /// Clearing the immutable flag failed.
    #[error("clearing the immutable flag of EFI variable {name} at {path}")]
    ClearImmutable {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Opening, writing or trimming the file failed.
    #[error("writing EFI variable {name} to {path}")]
    Write {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel took only part of the single write.
    #[error("short write of EFI variable {name} to {path}: {written} of {len} bytes")]
    ShortWrite {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// Bytes written.
        written: usize,
        /// Bytes offered.
        len: usize,
    },
    /// Removing the file failed.
    #[error("deleting EFI variable {name} at {path}")]
    Delete {
        /// The variable.
        name: VarName,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading the directory failed.
    #[error("listing EFI variables in {root}")]
    List {
        /// The store's directory.
        root: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Reads a whole file in as few `read(2)` calls as it takes: one, into a buffer a page larger
/// than the size its inode gives, where `fs::read` makes a second to find the end (on
/// efivarfs, two more firmware calls). A short read is taken as the end, as it is on efivarfs
/// (each read returns all that is left that fits) and on regular files.
fn read_whole(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let hint = f.metadata().map_or(0, |m| m.len() as usize);
    let mut buf = vec![0u8; hint + 4096];
    let mut len = 0;
    loop {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len < buf.len() {
                    break;
                }
                // The variable grew past the inode's size: read on.
                buf.resize(buf.len() * 2, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// UEFI variables in an efivarfs-format directory.
#[derive(Debug, Clone)]
pub struct VarStore {
    root: PathBuf,
    /// Called before every change (the simulated machine counts them to cut power there).
    before_change: Option<fn(&str)>,
}

impl Default for VarStore {
    /// The running system's variables at [`DEFAULT_ROOT`].
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

impl VarStore {
    /// A store over the directory `root` (efivarfs, or any directory of files in its format).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        VarStore {
            root: root.into(),
            before_change: None,
        }
    }

    /// The same store, calling `hook` with the variable's name before each set or delete.
    pub fn with_hook(mut self, hook: fn(&str)) -> Self {
        self.before_change = Some(hook);
        self
    }

    fn changing(&self, what: &str, name: &VarName) {
        if let Some(hook) = self.before_change {
            hook(&format!("{what} {name}"));
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `name`.
    pub fn path_of(&self, name: &VarName) -> Result<PathBuf, VarStoreError> {
        if !name.is_valid() {
            return Err(VarStoreError::InvalidName { name: name.clone() });
        }
        Ok(self.root.join(name.to_string()))
    }

    /// Reads a variable; `None` if it does not exist.
    pub fn get(&self, name: &VarName) -> Result<Option<Variable>, VarStoreError> {
        let path = self.path_of(name)?;
        let bytes = match read_whole(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(VarStoreError::Read {
                    name: name.clone(),
                    path,
                    source,
                })
            }
        };
        let Some((attributes, data)) = bytes.split_first_chunk::<4>() else {
            return Err(VarStoreError::TooShort {
                name: name.clone(),
                len: bytes.len(),
                path,
            });
        };
        Ok(Some(Variable {
            attributes: u32::from_le_bytes(*attributes),
            data: data.to_vec(),
        }))
    }

    /// Creates or replaces a variable with `attributes` and `data`.
    pub fn set(&self, name: &VarName, attributes: u32, data: &[u8]) -> Result<(), VarStoreError> {
        let path = self.path_of(name)?;
        if data.is_empty() {
            return Err(VarStoreError::EmptyValue { name: name.clone() });
        }
        self.changing("set", name);
        clear_immutable(&path).map_err(|source| VarStoreError::ClearImmutable {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
        let write_err = |source| VarStoreError::Write {
            name: name.clone(),
            path: path.clone(),
            source,
        };

        let mut buf = Vec::with_capacity(4 + data.len());
        buf.extend(attributes.to_le_bytes());
        buf.extend(data);

        // No O_TRUNC: on efivarfs the write itself replaces the variable.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(write_err)?;
        // Exactly one write(2): efivarfs turns each write into one SetVariable().
        let written = file.write(&buf).map_err(write_err)?;
        if written != buf.len() {
            return Err(VarStoreError::ShortWrite {
                name: name.clone(),
                path: path.clone(),
                written,
                len: buf.len(),
            });
        }
        // efivarfs reports the new size after the write; a plain file keeps the tail of a
        // longer old value, which is cut here so both behave as "replace".
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if file.metadata().map_err(write_err)?.len() > len {
            file.set_len(len).map_err(write_err)?;
        }
        Ok(())
    }

    /// Deletes a variable. Deleting one that does not exist succeeds.
    pub fn delete(&self, name: &VarName) -> Result<(), VarStoreError> {
        let path = self.path_of(name)?;
        self.changing("delete", name);
        clear_immutable(&path).map_err(|source| VarStoreError::ClearImmutable {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VarStoreError::Delete {
                name: name.clone(),
                path,
                source,
            }),
        }
    }

    /// Every variable in the store, sorted by vendor then name. Files whose names are not
    /// `Name-GUID` are skipped.
    pub fn list(&self) -> Result<Vec<VarName>, VarStoreError> {
        let list_err = |source| VarStoreError::List {
            root: self.root.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(list_err)? {
            let entry = entry.map_err(list_err)?;
            if let Some(name) = entry.file_name().to_str().and_then(VarName::from_file_name) {
                names.push(name);
            }
        }
        names.sort_by(|a, b| (a.vendor, &a.name).cmp(&(b.vendor, &b.name)));
        Ok(names)
    }
}

/// Clears FS_IMMUTABLE_FL on `path` if set. A missing file, or a filesystem without inode
/// flags, has nothing to clear.
fn clear_immutable(path: &Path) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(flags) = inode_flags(&file)? else {
        return Ok(());
    };
    if flags & FS_IMMUTABLE_FL == 0 {
        return Ok(());
    }
    set_inode_flags(&file, flags & !FS_IMMUTABLE_FL)
}

/// The inode flags, or `None` where the filesystem has none.
fn inode_flags(file: &File) -> io::Result<Option<libc::c_int>> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the fd is open for the duration of the call and `flags` is a valid, writable
    // c_int, which is what FS_IOC_GETFLAGS stores.
    match unsafe { ioctl::fs_ioc_getflags(file.as_raw_fd(), &mut flags) } {
        Ok(_) => Ok(Some(flags)),
        Err(e) if no_inode_flags(e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn set_inode_flags(file: &File, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call and `flags` is a valid c_int,
    // which is what FS_IOC_SETFLAGS reads.
    match unsafe { ioctl::fs_ioc_setflags(file.as_raw_fd(), &flags) } {
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn no_inode_flags(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_file_is_read_whatever_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        for len in [0usize, 1, 4095, 4096, 4097, 70_000] {
            let path = dir.path().join(format!("f{len}"));
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            fs::write(&path, &data).expect("write");
            assert_eq!(read_whole(&path).expect("read"), data, "{len} bytes");
        }
    }

    #[test]
    fn file_name_is_name_dash_lowercase_guid() {
        let name = VarName::global("BootOrder");
        assert_eq!(
            name.to_string(),
            "BootOrder-8be4df61-93ca-11d2-aa0d-00e098032b8c"
        );
        assert_eq!(VarName::from_file_name(&name.to_string()), Some(name));
    }

    #[test]
    fn file_name_without_guid_is_not_a_variable() {
        assert_eq!(VarName::from_file_name("BootOrder"), None);
        assert_eq!(
            VarName::from_file_name("-8be4df61-93ca-11d2-aa0d-00e098032b8c"),
            None
        );
        assert_eq!(
            VarName::from_file_name("Boot0001_8be4df61-93ca-11d2-aa0d-00e098032b8c"),
            None
        );
        assert_eq!(VarName::from_file_name("é"), None);
    }

    #[test]
    fn name_with_slash_is_refused() {
        let store = VarStore::new("/nonexistent");
        let name = VarName::global("../escape");
        assert!(matches!(
            store.get(&name),
            Err(VarStoreError::InvalidName { .. })
        ));
    }

    /// Sets FS_IMMUTABLE_FL the way efivarfs does; `false` where this filesystem or
    /// this process cannot.
    fn make_immutable(path: &Path) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        match inode_flags(&file) {
            Ok(Some(flags)) => set_inode_flags(&file, flags | FS_IMMUTABLE_FL).is_ok(),
            _ => false,
        }
    }

    #[test]
    fn set_and_delete_clear_the_immutable_flag_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = VarStore::new(dir.path());
        let name = VarName::global("Timeout");
        store.set(&name, NON_VOLATILE, &[5, 0]).unwrap();
        let path = store.path_of(&name).unwrap();
        if !make_immutable(&path) {
            eprintln!("skipping: cannot set FS_IMMUTABLE_FL on {}", path.display());
            return;
        }
        // A plain write is refused now, as on efivarfs.
        assert!(OpenOptions::new().write(true).open(&path).is_err());

        store.set(&name, NON_VOLATILE, &[3, 0]).unwrap();
        assert_eq!(store.get(&name).unwrap().unwrap().data, [3, 0]);

        assert!(make_immutable(&path));
        store.delete(&name).unwrap();
        assert_eq!(store.get(&name).unwrap(), None);
    }
}
