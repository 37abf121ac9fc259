//! The simulated machine: everything a node touches, modelled unprivileged in one directory.
//!
//! ```text
//! DIR/disk.img        the system disk: a real GPT with the real layout; raw partitions (META,
//!                     ROOT-A/B) hold real bytes, addressed by offset
//! DIR/efivars/        UEFI variables in efivarfs format (the NVRAM)
//! DIR/volumes/<uuid>/ the contents of each formatted file system (ESP, STATE, EPHEMERAL); the
//!                     partition itself carries a signature naming it, so wiping the partition's
//!                     bytes wipes the file system, as on a real disk
//! DIR/fs/             every other path of the initramfs and the node
//! DIR/roots/<digest>/ a slot's root file system, unpacked from its (simulated) root image
//! DIR/tmp/            tmpfs mounts of the current boot (gone at the next)
//! ```
//!
//! A partition's device is `DIR/disk.img#N`. Processes a node spawns are real host processes,
//! and only those may be signalled. [`firmware`] plays the UEFI firmware (BootNext, BootOrder,
//! BootCurrent, as OVMF does) and the systemd-stub (LoaderDevicePartUUID).

pub mod fault;
pub mod firmware;
pub mod provision;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bootloader::efivarfs::VarStore;
use tokio::sync::mpsc;

use super::{
    BlockDevice, Disk, Mkfs, ModuleLoad, MountEntry, MountSpec, Platform, PlatformError,
    PowerAction, WipeMethod,
};

/// Marks a partition as holding a (simulated) file system.
pub const FS_MAGIC: &[u8; 14] = b"PLINTH-SIM-FS\0";

/// Starts a simulated root image: text lines `path=content` (`\n` escaped) of the files in it.
pub const ROOT_MAGIC: &[u8] = b"PLINTH-SIM-ROOT\n";

/// A simulated root image holding `files` (path, content).
pub fn root_image(files: &[(&str, &str)]) -> Vec<u8> {
    let mut out = ROOT_MAGIC.to_vec();
    for (path, content) in files {
        out.extend_from_slice(format!("{path}={}\n", content.replace('\n', "\\n")).as_bytes());
    }
    out.push(0);
    out
}

/// The files of a simulated root image (up to its terminating NUL).
pub fn root_files(image: &[u8]) -> Option<Vec<(String, String)>> {
    let body = image.strip_prefix(ROOT_MAGIC)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    Some(
        String::from_utf8_lossy(&body[..end])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(p, c)| (p.to_string(), c.replace("\\n", "\n")))
            .collect(),
    )
}

/// A file system signature at the start of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSignature {
    /// `ext4` or `vfat`.
    pub fstype: String,
    /// The file system's id (its volume directory).
    pub uuid: uuid::Uuid,
    /// Its label.
    pub label: String,
}

impl FsSignature {
    /// The 512-byte block written at the partition's start.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..14].copy_from_slice(FS_MAGIC);
        let put = |b: &mut [u8; 512], at: usize, s: &[u8], len: usize| {
            let n = s.len().min(len);
            b[at..at + n].copy_from_slice(&s[..n]);
        };
        put(&mut b, 16, self.fstype.as_bytes(), 16);
        b[32..48].copy_from_slice(self.uuid.as_bytes());
        put(&mut b, 48, self.label.as_bytes(), 32);
        b
    }

    /// The signature in a block, if there is one.
    pub fn decode(b: &[u8]) -> Option<FsSignature> {
        if b.len() < 80 || &b[..14] != FS_MAGIC {
            return None;
        }
        let text = |s: &[u8]| {
            String::from_utf8_lossy(s)
                .trim_end_matches('\0')
                .to_string()
        };
        Some(FsSignature {
            fstype: text(&b[16..32]),
            uuid: uuid::Uuid::from_slice(&b[32..48]).ok()?,
            label: text(&b[48..80]),
        })
    }
}

#[derive(Debug, Clone)]
enum Backing {
    /// Nothing behind it (proc, sysfs, the squashfs root): paths fall through to `fs/`.
    Pseudo,
    /// A directory: a volume or a tmpfs.
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
struct SimMount {
    entry: MountEntry,
    backing: Backing,
}

#[derive(Default)]
struct BootState {
    cmdline: String,
    boot_id: String,
    mounts: Vec<SimMount>,
    children: Vec<i32>,
    hostname: String,
    network: Vec<String>,
    /// Device-mapper devices: name and status line.
    mappings: Vec<(String, String)>,
}

/// A simulated machine.
pub struct Sim {
    dir: PathBuf,
    state: Mutex<BootState>,
    power: mpsc::UnboundedSender<PowerAction>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PlatformError + 'a {
    move |e| PlatformError::io(what, path, e)
}

/// `path` made relative (no root, no `..`).
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

impl Sim {
    /// The machine in `dir`, powered on with `cmdline` (from the UKI the firmware chose).
    /// Power requests arrive on the returned channel.
    pub fn new(dir: &Path, cmdline: &str) -> (Arc<Sim>, mpsc::UnboundedReceiver<PowerAction>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sim = Sim {
            dir: dir.to_path_buf(),
            state: Mutex::new(BootState {
                cmdline: cmdline.to_string(),
                boot_id: uuid::Uuid::new_v4().to_string(),
                ..BootState::default()
            }),
            power: tx,
        };
        (Arc::new(sim), rx)
    }

    /// A partition device's GPT name, for step logs (the device itself otherwise).
    fn partition_label(&self, device: &Path) -> String {
        self.disks()
            .ok()
            .and_then(|disks| {
                disks.into_iter().find_map(|d| {
                    d.partitions
                        .into_iter()
                        .find(|(_, node)| node == device)
                        .map(|(p, _)| p.label)
                })
            })
            .unwrap_or_else(|| device.display().to_string())
    }

    fn lock(&self) -> MutexGuard<'_, BootState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The system disk image.
    pub fn disk_path(dir: &Path) -> PathBuf {
        dir.join("disk.img")
    }

    /// The installer media, when the machine has it.
    pub fn media_path(dir: &Path) -> PathBuf {
        dir.join("media.img")
    }

    /// The variable store.
    pub fn vars(dir: &Path) -> VarStore {
        VarStore::new(dir.join("efivars")).with_hook(fault::step)
    }

    /// A volume's directory.
    pub fn volume_dir(dir: &Path, uuid: uuid::Uuid) -> PathBuf {
        dir.join("volumes").join(uuid.to_string())
    }

    /// The host path behind a node path, through the mounts.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        let state = self.lock();
        let best = state
            .mounts
            .iter()
            .filter(|m| path.starts_with(&m.entry.target))
            .max_by_key(|m| m.entry.target.components().count());
        match best.map(|m| (&m.backing, &m.entry.target)) {
            Some((Backing::Dir(d), target)) => {
                d.join(relative(path.strip_prefix(target).unwrap_or(path)))
            }
            _ => self.dir.join("fs").join(relative(path)),
        }
    }

    /// A program an extension would put under `/usr/local`, from `DIR/usr-local` (the simulated
    /// machine activates no extensions: a test puts there what one would bring, such as the
    /// host's etcd).
    fn extension_program(&self, program: &Path) -> Option<PathBuf> {
        let rest = program.strip_prefix("/usr/local").ok()?;
        let p = self.dir.join("usr-local").join(rest);
        p.exists().then_some(p)
    }

    /// The partition behind `DIR/disk.img#N`: (disk image, offset, length).
    fn partition(&self, device: &Path) -> Option<(PathBuf, u64, u64)> {
        let s = device.to_str()?;
        let (disk, n) = s.rsplit_once('#')?;
        let n: u32 = n.parse().ok()?;
        let mut f = File::open(disk).ok()?;
        let p = upgrade::layout::read_table(&mut f)
            .ok()?
            .into_iter()
            .find(|p| p.number == n)?;
        Some((PathBuf::from(disk), p.offset, p.len))
    }

    /// The file system signature on a partition device.
    pub fn signature(&self, device: &Path) -> Option<FsSignature> {
        let (disk, offset, _) = self.partition(device)?;
        let mut f = File::open(disk).ok()?;
        let mut block = [0u8; 512];
        f.seek(SeekFrom::Start(offset)).ok()?;
        f.read_exact(&mut block).ok()?;
        FsSignature::decode(&block)
    }

    /// A root image mounted: unpacked (once per digest) into `roots/`.
    fn unpack_root(&self, device: &Path, target: &Path) -> Result<Backing, PlatformError> {
        let (mut f, base) = self.open_partition(device, false)?;
        f.seek(SeekFrom::Start(base))
            .map_err(io("seeking in", device))?;
        let mut head = vec![0u8; 64 * 1024];
        let n = f.read(&mut head).map_err(io("reading", device))?;
        head.truncate(n);
        let Some(files) = root_files(&head) else {
            return Err(PlatformError::Mount {
                source_name: device.display().to_string(),
                target: target.display().to_string(),
                fstype: "squashfs".into(),
                errno: nix::Error::EINVAL,
            });
        };
        let dir = self
            .dir
            .join("roots")
            .join(blake3::hash(&head).to_hex().to_string());
        for (path, content) in files {
            let p = dir.join(relative(Path::new(&path)));
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(io("unpacking", device))?;
            }
            std::fs::write(&p, content).map_err(io("unpacking", device))?;
        }
        Ok(Backing::Dir(dir))
    }

    /// Kills every process this boot started (a power cut: nothing survives a reset).
    pub fn kill_children(&self) {
        let children = std::mem::take(&mut self.lock().children);
        for pid in children {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// What the node set as host name and network (the sim cannot touch the host's).
    pub fn identity(&self) -> (String, Vec<String>) {
        let s = self.lock();
        (s.hostname.clone(), s.network.clone())
    }

    fn is_child(&self, pid: i32) -> bool {
        self.lock().children.contains(&pid.abs())
    }
}

#[async_trait]
impl Platform for Sim {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn cmdline(&self) -> Result<String, PlatformError> {
        Ok(self.lock().cmdline.clone())
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, PlatformError> {
        let p = self.resolve(path);
        std::fs::read(&p).map_err(io("reading", path))
    }

    fn write(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError> {
        let p = self.resolve(path);
        // Writing over a file in place truncates it first: a power cut between the two leaves
        // it empty, as on a real disk. Only `replace` is safe for files that must survive.
        if p.exists() {
            fault::step(&format!("truncate {}", path.display()));
            File::create(&p).map_err(io("truncating", path))?;
        }
        fault::step(&format!("write {}", path.display()));
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io("creating directory for", path))?;
        }
        let mut f = File::create(&p).map_err(io("creating", path))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(io("writing", path))
    }

    fn replace(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError> {
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        self.write(&tmp, data)?;
        self.rename(&tmp, path)
    }

    fn remove(&self, path: &Path) -> Result<(), PlatformError> {
        let p = self.resolve(path);
        if !p.exists() {
            return Ok(());
        }
        fault::step(&format!("remove {}", path.display()));
        std::fs::remove_file(&p).map_err(io("removing", path))
    }

    fn rotate(&self, log: &Path, keep: &Path) -> Result<(), PlatformError> {
        let (from, to) = (self.resolve(log), self.resolve(keep));
        std::fs::copy(&from, &to).map_err(io("copying", log))?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&from)
            .and_then(|f| f.set_len(0))
            .map_err(io("emptying", log))
    }

    fn mkdir_all(&self, path: &Path) -> Result<(), PlatformError> {
        std::fs::create_dir_all(self.resolve(path)).map_err(io("creating directory", path))
    }

    fn mount(&self, spec: &MountSpec) -> Result<(), PlatformError> {
        let backing = match spec.fstype.as_str() {
            "tmpfs" => {
                let boot_id = self.lock().boot_id.clone();
                let d = self
                    .dir
                    .join("tmp")
                    .join(boot_id)
                    .join(relative(&spec.target));
                std::fs::create_dir_all(&d).map_err(io("creating tmpfs for", &spec.target))?;
                Backing::Dir(d)
            }
            "ext4" | "vfat" => {
                let sig = self
                    .signature(Path::new(&spec.source))
                    .filter(|s| s.fstype == spec.fstype);
                let Some(sig) = sig else {
                    return Err(PlatformError::Mount {
                        source_name: spec.source.clone(),
                        target: spec.target.display().to_string(),
                        fstype: spec.fstype.clone(),
                        errno: nix::Error::EINVAL,
                    });
                };
                let d = Self::volume_dir(&self.dir, sig.uuid);
                std::fs::create_dir_all(&d).map_err(io("opening volume for", &spec.target))?;
                Backing::Dir(d)
            }
            "squashfs" => self.unpack_root(Path::new(&spec.source), &spec.target)?,
            _ => Backing::Pseudo,
        };
        self.lock().mounts.push(SimMount {
            entry: MountEntry {
                target: spec.target.clone(),
                fstype: spec.fstype.clone(),
                source: spec.source.clone(),
            },
            backing,
        });
        Ok(())
    }

    fn move_mount(&self, from: &Path, to: &Path) -> Result<(), PlatformError> {
        let mut state = self.lock();
        for m in state
            .mounts
            .iter_mut()
            .filter(|m| m.entry.target.starts_with(from))
        {
            let rest = m
                .entry
                .target
                .strip_prefix(from)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            m.entry.target = to.join(rest);
        }
        Ok(())
    }

    fn load_module_file(
        &self,
        _file: &File,
        _path: &Path,
        _params: &str,
    ) -> Result<ModuleLoad, PlatformError> {
        // The simulated kernel has everything built in.
        Ok(ModuleLoad::AlreadyLoaded)
    }

    fn efivars(&self) -> VarStore {
        Self::vars(&self.dir)
    }

    fn map_verity(
        &self,
        name: &str,
        device: &Path,
        root: &upgrade::verity::VerityRoot,
        _panic: bool,
    ) -> Result<PathBuf, PlatformError> {
        // The simulated kernel reads every block at once: a corruption anywhere fails the
        // mapping (a real one panics when the bad block is first read).
        let (mut f, base) = self.open_partition(device, false)?;
        f.seek(SeekFrom::Start(base))
            .map_err(io("seeking in", device))?;
        upgrade::verity::verify(&mut std::io::BufReader::new(f), root).map_err(|e| {
            PlatformError::Io {
                what: "verifying (dm-verity)",
                path: device.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let mut s = self.lock();
        s.mappings.retain(|(n, _)| n != name);
        s.mappings.push((name.to_string(), "V".into()));
        Ok(device.to_path_buf())
    }

    fn attach_loop(
        &self,
        file: &Path,
        _offset: u64,
        _size: u64,
    ) -> Result<crate::platform::LoopDevice, PlatformError> {
        // The simulated machine keeps no extensions: none of its tests asks for one.
        Err(PlatformError::io(
            "attaching a loop device to",
            file,
            std::io::Error::from(std::io::ErrorKind::Unsupported),
        ))
    }

    fn map_crypt(
        &self,
        _name: &str,
        _device: &Path,
        _offset: u64,
        _key: &[u8],
    ) -> Result<PathBuf, PlatformError> {
        Err(PlatformError::Unsupported("dm-crypt"))
    }

    fn unmap(&self, name: &str) -> Result<(), PlatformError> {
        self.lock().mappings.retain(|(n, _)| n != name);
        Ok(())
    }

    fn tpm(&self) -> Result<Option<tpm::Tpm>, PlatformError> {
        // The simulated machine has no TPM: its volumes are plain.
        Ok(None)
    }

    fn mapping_status(&self, name: &str) -> Result<Option<String>, PlatformError> {
        Ok(self
            .lock()
            .mappings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, st)| st.clone()))
    }

    fn disks(&self) -> Result<Vec<Disk>, PlatformError> {
        let mut out = Vec::new();
        for disk in [Self::disk_path(&self.dir), Self::media_path(&self.dir)] {
            let Ok(mut f) = File::open(&disk) else {
                continue;
            };
            // As on Linux: a disk without a partition table has no partitions to list.
            let Ok(table) = upgrade::layout::read_table(&mut f) else {
                continue;
            };
            let partitions = table
                .into_iter()
                .map(|p| {
                    let dev = PathBuf::from(format!("{}#{}", disk.display(), p.number));
                    (p, dev)
                })
                .collect();
            out.push(Disk {
                device: disk,
                partitions,
            });
        }
        Ok(out)
    }

    fn open_partition(&self, device: &Path, write: bool) -> Result<(File, u64), PlatformError> {
        if write {
            // The writes through the handle are this one step.
            fault::step(&format!("write partition {}", self.partition_label(device)));
        }
        let (disk, offset) = match self.partition(device) {
            Some((disk, offset, _)) => (disk, offset),
            // The whole disk is a host path already.
            None if device == Self::disk_path(&self.dir)
                || device == Self::media_path(&self.dir) =>
            {
                (device.to_path_buf(), 0)
            }
            None => (self.resolve(device), 0),
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&disk)
            .map_err(io("opening", device))?;
        Ok((f, offset))
    }

    fn block_device(&self, path: &Path) -> Result<BlockDevice, PlatformError> {
        use std::os::unix::fs::MetadataExt;
        // The simulated disks are host files; a partition is `disk.img#N`.
        let (file, partition) = match path.to_str().and_then(|s| s.rsplit_once('#')) {
            Some((disk, _)) => (PathBuf::from(disk), true),
            None => (path.to_path_buf(), false),
        };
        let meta = std::fs::metadata(&file).map_err(io("looking up", path))?;
        Ok(BlockDevice {
            id: (meta.dev(), meta.ino()),
            path: if partition {
                path.to_path_buf()
            } else {
                std::fs::canonicalize(&file).map_err(io("resolving", path))?
            },
            partition,
        })
    }

    fn reread_partitions(&self, _disk: &Path) -> Result<(), PlatformError> {
        // `disks` reads the table from the file every time.
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), PlatformError> {
        fault::step(&format!("rename {} {}", from.display(), to.display()));
        std::fs::rename(self.resolve(from), self.resolve(to)).map_err(io("renaming", from))
    }

    fn set_hostname(&self, name: &str) -> Result<(), PlatformError> {
        self.lock().hostname = name.to_string();
        Ok(())
    }

    async fn configure_network(
        &self,
        interfaces: &[config::Interface],
    ) -> Result<(), PlatformError> {
        // The host's network is not the node's to change: record what would be set.
        self.lock().network = interfaces
            .iter()
            .map(|i| format!("{} {}", i.name, i.addresses.join(",")))
            .collect();
        Ok(())
    }

    async fn configure_dhcp(
        &self,
        links: &[String],
    ) -> Result<Vec<(String, crate::dhcp::Lease)>, PlatformError> {
        // The simulated machine has one link whose "server" grants a fixed loopback lease;
        // the node's API stays on the address the test chose.
        let link = links.first().cloned().unwrap_or_else(|| "sim0".into());
        self.lock().network.push(format!("{link} dhcp"));
        Ok(vec![(
            link,
            crate::dhcp::Lease {
                address: std::net::Ipv4Addr::LOCALHOST,
                prefix_len: 8,
                router: None,
                dns: Vec::new(),
                server: std::net::Ipv4Addr::LOCALHOST,
                lease_secs: 86400,
            },
        )])
    }

    fn switch_root(&self, new_root: &Path) -> Result<(), PlatformError> {
        let mut state = self.lock();
        // Move the new root to `/` and the pseudo file systems under it, as MS_MOVE does.
        for m in state
            .mounts
            .iter_mut()
            .filter(|m| m.entry.target == new_root)
        {
            m.entry.target = PathBuf::from("/");
        }
        Ok(())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, PlatformError> {
        let mut out = vec![MountEntry {
            target: "/".into(),
            fstype: "squashfs".into(),
            source: "sim-root".into(),
        }];
        out.extend(self.lock().mounts.iter().map(|m| m.entry.clone()));
        Ok(out)
    }

    fn unmount(&self, target: &Path) -> Result<(), PlatformError> {
        let mut state = self.lock();
        match state.mounts.iter().rposition(|m| m.entry.target == target) {
            Some(i) => {
                state.mounts.remove(i);
                Ok(())
            }
            None => Err(PlatformError::Sys {
                what: format!("unmounting {}", target.display()),
                errno: nix::Error::EINVAL,
            }),
        }
    }

    fn remount_read_only(&self, _target: &Path) -> Result<(), PlatformError> {
        Ok(())
    }

    fn sync(&self) {}

    fn processes(&self) -> Result<Vec<i32>, PlatformError> {
        let mut state = self.lock();
        // A child that exited (and was reaped) is gone.
        state
            .children
            .retain(|&pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok());
        Ok(state.children.clone())
    }

    fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> Result<(), PlatformError> {
        // Only the node's own processes: never a host process.
        if !self.is_child(pid) {
            return Ok(());
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(errno) => Err(PlatformError::Sys {
                what: format!("sending {signal} to {pid}"),
                errno,
            }),
        }
    }

    fn host_path(&self, path: &Path) -> PathBuf {
        self.extension_program(path)
            .unwrap_or_else(|| self.resolve(path))
    }

    fn spawn(&self, argv: &[String], env: &[String], log: &Path) -> Result<i32, PlatformError> {
        use std::os::unix::process::CommandExt;
        let Some((program, args)) = argv.split_first() else {
            return Err(PlatformError::Unsupported("an empty command"));
        };
        // The node's machined is this very binary.
        let program = if program == crate::runtime::paths::MACHINED {
            std::env::current_exe().map_err(io("finding", Path::new(program)))?
        } else if let Some(p) = self.extension_program(Path::new(program)) {
            p
        } else {
            self.resolve(Path::new(program))
        };
        let log = self.resolve(log);
        if let Some(d) = log.parent() {
            std::fs::create_dir_all(d).map_err(io("creating", d))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("opening", &log))?;
        let err = out.try_clone().map_err(io("opening", &log))?;
        let child = std::process::Command::new(&program)
            .args(args)
            .envs(env.iter().filter_map(|e| e.split_once('=')))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io("starting", &program))?;
        let pid = child.id() as i32;
        self.lock().children.push(pid);
        Ok(pid)
    }

    fn has_filesystem(&self, device: &Path, fstype: &str) -> Result<bool, PlatformError> {
        Ok(self.signature(device).is_some_and(|s| s.fstype == fstype))
    }

    fn mkfs(&self, device: &Path, fstype: &str, label: &str) -> Result<Mkfs, PlatformError> {
        fault::step(&format!("mkfs {fstype} {}", self.partition_label(device)));
        let Some((disk, offset, _)) = self.partition(device) else {
            return Err(PlatformError::Unsupported(
                "making a file system outside the disk image",
            ));
        };
        let sig = FsSignature {
            fstype: fstype.into(),
            uuid: uuid::Uuid::new_v4(),
            label: label.into(),
        };
        provision::write_at(&disk, offset, &sig.encode()).map_err(|e| PlatformError::Io {
            what: "formatting",
            path: device.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::create_dir_all(Self::volume_dir(&self.dir, sig.uuid))
            .map_err(io("formatting", device))?;
        Ok(Mkfs::Done)
    }

    fn wipe(&self, device: &Path, len: u64, method: WipeMethod) -> Result<(), PlatformError> {
        fault::step(&format!("wipe {method:?} {}", self.partition_label(device)));
        // A file system's contents go with its signature.
        if let Some(sig) = self.signature(device) {
            let _ = std::fs::remove_dir_all(Self::volume_dir(&self.dir, sig.uuid));
        }
        let (disk, offset) = match self.partition(device) {
            Some((disk, offset, _)) => (disk, offset),
            None => (device.to_path_buf(), 0),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .map_err(io("opening", device))?;
        match method {
            WipeMethod::Zero => {
                crate::platform::linux::write_zeroes(&mut f, offset, len)
                    .map_err(io("wiping", device))?;
            }
            WipeMethod::Fast => {
                // The first and last MiB, as the real wipe does before its discard.
                let head = len.min(1 << 20);
                for at in [offset, offset + len - head] {
                    crate::platform::linux::write_zeroes(&mut f, at, head)
                        .map_err(io("wiping", device))?;
                }
            }
        }
        f.sync_all().map_err(io("wiping", device))
    }

    fn open_file(&self, path: &Path) -> Result<File, PlatformError> {
        File::open(self.resolve(path)).map_err(io("opening", path))
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, PlatformError> {
        crate::platform::linux::list_dir(&self.resolve(path), path)
    }

    fn create_file(&self, path: &Path) -> Result<File, PlatformError> {
        fault::step(&format!("create {}", path.display()));
        crate::platform::linux::create_file(&self.resolve(path), path)
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, PlatformError> {
        crate::platform::linux::free_bytes(&self.resolve(path), path)
    }

    fn kernel_log_path(&self) -> PathBuf {
        // The simulated kernel's log: what the firmware and "kernel" printed, per machine.
        self.dir.join("kmsg")
    }

    fn boot_id(&self) -> String {
        self.lock().boot_id.clone()
    }

    fn power(&self, action: PowerAction) -> Result<(), PlatformError> {
        self.power
            .send(action)
            .map_err(|_| PlatformError::Unsupported("power control after the machine stopped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_round_trips_and_garbage_is_no_signature() {
        let s = FsSignature {
            fstype: "ext4".into(),
            uuid: uuid::Uuid::new_v4(),
            label: "STATE".into(),
        };
        assert_eq!(FsSignature::decode(&s.encode()), Some(s));
        assert_eq!(FsSignature::decode(&[0u8; 512]), None);
    }
}
