//! The real machine: system calls, sysfs, netlink.

use std::ffi::CString;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bootloader::efivarfs::VarStore;
use futures::TryStreamExt;
use nix::mount::MsFlags;

use crate::dhcp::Lease;

use super::{
    BlockDevice, Disk, Mkfs, ModuleLoad, MountEntry, MountSpec, Platform, PlatformError,
    PowerAction, WipeMethod,
};

/// The kernel's resource-managed TPM device.
pub const TPM_DEVICE: &str = "/dev/tpmrm0";
/// Where efivarfs is mounted.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// How long to wait for a network interface to appear after its driver loaded.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// The real Linux machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> PlatformError {
    let what = what.into();
    move |errno| PlatformError::Sys { what, errno }
}

/// Disks that can hold a system: not loop, RAM, optical or device-mapper devices.
fn is_candidate_disk(name: &str) -> bool {
    !["loop", "ram", "zram", "sr", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Partition number → device node, from `/sys/block/<disk>/<part>/partition`.
fn partition_nodes(disk: &str) -> Vec<(u32, PathBuf)> {
    let dir = Path::new("/sys/block").join(disk);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = std::fs::read_to_string(e.path().join("partition")).ok()?;
            Some((n.trim().parse().ok()?, Path::new("/dev").join(name)))
        })
        .collect()
}

#[async_trait]
impl Platform for Linux {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn cmdline(&self) -> Result<String, PlatformError> {
        let p = Path::new("/proc/cmdline");
        std::fs::read_to_string(p).map_err(|e| PlatformError::io("reading", p, e))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, PlatformError> {
        std::fs::read(path).map_err(|e| PlatformError::io("reading", path, e))
    }

    fn write(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| PlatformError::io("creating", path, e))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(|e| PlatformError::io("writing", path, e))
    }

    fn replace(&self, path: &Path, data: &[u8]) -> Result<(), PlatformError> {
        let tmp = temp_beside(path);
        self.write(&tmp, data)?;
        std::fs::rename(&tmp, path).map_err(|e| PlatformError::io("renaming into", path, e))?;
        sync_parent(path)
    }

    fn remove(&self, path: &Path) -> Result<(), PlatformError> {
        match std::fs::remove_file(path) {
            Ok(()) => sync_parent(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PlatformError::io("removing", path, e)),
        }
    }

    fn rotate(&self, log: &Path, keep: &Path) -> Result<(), PlatformError> {
        std::fs::copy(log, keep).map_err(|e| PlatformError::io("copying", log, e))?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(log)
            .and_then(|f| f.set_len(0))
            .map_err(|e| PlatformError::io("emptying", log, e))
    }

    fn mkdir_all(&self, path: &Path) -> Result<(), PlatformError> {
        std::fs::create_dir_all(path).map_err(|e| PlatformError::io("creating directory", path, e))
    }

    fn mount(&self, spec: &MountSpec) -> Result<(), PlatformError> {
        self.mkdir_all(&spec.target)?;
        let mut flags = MsFlags::empty();
        if spec.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if spec.restricted {
            flags |= MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        }
        if spec.nosuid {
            flags |= MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        }
        nix::mount::mount(
            Some(spec.source.as_str()),
            &spec.target,
            Some(spec.fstype.as_str()),
            flags,
            spec.data.as_deref(),
        )
        .map_err(|errno| PlatformError::Mount {
            source_name: spec.source.clone(),
            target: spec.target.display().to_string(),
            fstype: spec.fstype.clone(),
            errno,
        })
    }

    fn move_mount(&self, from: &Path, to: &Path) -> Result<(), PlatformError> {
        self.mkdir_all(to)?;
        nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(
            |errno| PlatformError::MoveMount {
                from: from.display().to_string(),
                to: to.display().to_string(),
                errno,
            },
        )
    }

    fn load_module_file(
        &self,
        file: &std::fs::File,
        path: &Path,
        params: &str,
    ) -> Result<ModuleLoad, PlatformError> {
        let params = CString::new(params).map_err(|_| PlatformError::Sys {
            what: format!("the parameters for {} hold a NUL byte", path.display()),
            errno: nix::Error::EINVAL,
        })?;
        // From memory, not from the file: with Secure Boot on, Debian's kernel (IMA's arch
        // policy) hashes each module loaded from a file and extends PCR 10 with it, which
        // costs time and proves nothing Plinth relies on (ARCHITECTURE, "What checks and
        // measures what"). The signature check is the same either way.
        let image = read_whole(file)
            .map_err(|source| PlatformError::io("reading kernel module", path, source))?;
        match nix::kmod::init_module(&image, &params) {
            Ok(()) => Ok(ModuleLoad::Loaded),
            Err(nix::Error::EEXIST) => Ok(ModuleLoad::AlreadyLoaded),
            Err(nix::Error::ENODEV) => Ok(ModuleLoad::NoSuchHardware),
            Err(errno) => Err(PlatformError::Module {
                path: path.display().to_string(),
                errno,
            }),
        }
    }

    fn efivars(&self) -> VarStore {
        VarStore::new(EFIVARS)
    }

    fn map_verity(
        &self,
        name: &str,
        device: &Path,
        root: &upgrade::verity::VerityRoot,
        panic: bool,
    ) -> Result<PathBuf, PlatformError> {
        let st = nix::sys::stat::stat(device).map_err(|errno| PlatformError::Sys {
            what: format!("reading the device number of {}", device.display()),
            errno,
        })?;
        let dev = format!(
            "{}:{}",
            nix::sys::stat::major(st.st_rdev),
            nix::sys::stat::minor(st.st_rdev)
        );
        let target = super::dm::Target {
            sectors: root.data_size / 512,
            kind: "verity",
            params: root.table_params(&dev, if panic { &["panic_on_corruption"] } else { &[] }),
        };
        Ok(super::dm::create(name, &target, super::dm::READONLY)?.path)
    }

    fn attach_loop(
        &self,
        file: &Path,
        offset: u64,
        size: u64,
    ) -> Result<super::LoopDevice, PlatformError> {
        super::loopdev::attach(file, offset, size)
    }

    fn map_crypt(
        &self,
        name: &str,
        device: &Path,
        offset: u64,
        key: &[u8],
    ) -> Result<PathBuf, PlatformError> {
        let st = nix::sys::stat::stat(device).map_err(|errno| PlatformError::Sys {
            what: format!("reading the device number of {}", device.display()),
            errno,
        })?;
        let (major, minor) = (
            nix::sys::stat::major(st.st_rdev),
            nix::sys::stat::minor(st.st_rdev),
        );
        let size = Path::new(&format!("/sys/dev/block/{major}:{minor}/size")).to_path_buf();
        let sectors: u64 = std::fs::read_to_string(&size)
            .map_err(|e| PlatformError::io("reading", &size, e))?
            .trim()
            .parse()
            .map_err(|_| {
                PlatformError::io("parsing", &size, std::io::ErrorKind::InvalidData.into())
            })?;
        let skip = offset / 512;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let target = super::dm::Target {
            sectors: sectors.saturating_sub(skip),
            kind: "crypt",
            // allow_discards: a fast wipe's discard reaches the device through the mapping.
            params: format!("aes-xts-plain64 {hex} 0 {major}:{minor} {skip} 1 allow_discards"),
        };
        let mapped = super::dm::create(name, &target, super::dm::SECURE_DATA);
        // The table held the key in hex.
        let mut params = target.params.into_bytes();
        params.fill(0);
        Ok(mapped?.path)
    }

    fn unmap(&self, name: &str) -> Result<(), PlatformError> {
        match super::dm::remove(name) {
            Err(PlatformError::Sys {
                errno: nix::Error::ENXIO,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    fn tpm(&self) -> Result<Option<tpm::Tpm>, PlatformError> {
        let dev = Path::new(TPM_DEVICE);
        if !dev.exists() {
            return Ok(None);
        }
        tpm::Tpm::open(dev)
            .map(Some)
            .map_err(|e| PlatformError::io("opening", dev, std::io::Error::other(e)))
    }

    fn mapping_status(&self, name: &str) -> Result<Option<String>, PlatformError> {
        match super::dm::status(name) {
            Ok(s) => Ok(Some(s)),
            Err(PlatformError::Sys {
                errno: nix::Error::ENXIO,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn disks(&self) -> Result<Vec<Disk>, PlatformError> {
        let dir = Path::new("/sys/block");
        let entries = std::fs::read_dir(dir).map_err(|e| PlatformError::io("listing", dir, e))?;
        let mut disks = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_candidate_disk(&name) {
                continue;
            }
            let device = Path::new("/dev").join(&name);
            // A disk without a readable GPT is not ours (or not yet): skip it.
            let Ok(mut f) = std::fs::File::open(&device) else {
                continue;
            };
            let Ok(table) = upgrade::layout::read_table(&mut f) else {
                continue;
            };
            let nodes = partition_nodes(&name);
            let partitions = table
                .into_iter()
                .filter_map(|p| {
                    let node = nodes.iter().find(|(n, _)| *n == p.number)?.1.clone();
                    Some((p, node))
                })
                .collect();
            disks.push(Disk { device, partitions });
        }
        disks.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(disks)
    }

    fn open_partition(
        &self,
        device: &Path,
        write: bool,
    ) -> Result<(std::fs::File, u64), PlatformError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(device)
            .map_err(|e| PlatformError::io("opening", device, e))?;
        Ok((f, 0))
    }

    fn block_device(&self, path: &Path) -> Result<BlockDevice, PlatformError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).map_err(|e| PlatformError::io("looking up", path, e))?;
        if !meta.file_type().is_block_device() {
            return Err(PlatformError::io(
                "using",
                path,
                std::io::Error::other("not a block device"),
            ));
        }
        let rdev = meta.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        let canonical =
            std::fs::canonicalize(path).map_err(|e| PlatformError::io("resolving", path, e))?;
        Ok(BlockDevice {
            id: (major, minor),
            path: canonical,
            // The kernel says so for every partition of a disk.
            partition: Path::new(&format!("/sys/dev/block/{major}:{minor}/partition")).exists(),
        })
    }

    fn reread_partitions(&self, disk: &Path) -> Result<(), PlatformError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(disk).map_err(|e| PlatformError::io("opening", disk, e))?;
        // SAFETY: BLKRRPART takes no argument; the descriptor is open and lives across the call.
        unsafe { blk_rrpart(f.as_raw_fd()) }
            .map(drop)
            .map_err(sys(format!(
                "re-reading the partition table of {}",
                disk.display()
            )))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), PlatformError> {
        std::fs::rename(from, to).map_err(|e| PlatformError::io("renaming", from, e))
    }

    fn set_hostname(&self, name: &str) -> Result<(), PlatformError> {
        nix::unistd::sethostname(name).map_err(sys(format!("setting the host name to {name:?}")))
    }

    async fn configure_network(
        &self,
        interfaces: &[config::Interface],
    ) -> Result<(), PlatformError> {
        let handle = Netlink::open()?;
        link_up(&handle.0, "lo").await.map_err(net_err("lo"))?;
        for iface in interfaces {
            let index = wait_for_link(&handle.0, &iface.name).await?;
            set_up(&handle.0, index, &iface.name).await?;
            let nets: Vec<ipnet::IpNet> = iface.networks();
            add_addresses(&handle.0, index, &iface.name, &nets, iface.gateway_ip()).await?;
            if iface.dhcp {
                let lease = dhcp_link(&handle.0, &iface.name, index).await?;
                tracing::info!("{}: {lease} (DHCP)", iface.name);
                spawn_renewal(iface.name.clone(), index, lease);
            }
        }
        Ok(())
    }

    async fn configure_dhcp(
        &self,
        links: &[String],
    ) -> Result<Vec<(String, Lease)>, PlatformError> {
        let handle = Netlink::open()?;
        link_up(&handle.0, "lo").await.map_err(net_err("lo"))?;
        let all = links.is_empty();
        let links = if all {
            ethernet_links()?
        } else {
            links.to_vec()
        };
        let attempts = links.iter().map(|link| {
            let h = handle.0.clone();
            async move {
                let index = wait_for_link(&h, link).await?;
                set_up(&h, index, link).await?;
                let lease = dhcp_link(&h, link, index).await?;
                spawn_renewal(link.clone(), index, lease.clone());
                Ok::<_, PlatformError>((link.clone(), lease))
            }
        });
        let mut leases = Vec::new();
        let mut failures = Vec::new();
        for r in futures::future::join_all(attempts).await {
            match r {
                Ok(l) => leases.push(l),
                Err(e) if all => failures.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if leases.is_empty() {
            return Err(PlatformError::Network {
                interface: "any Ethernet link".into(),
                reason: if failures.is_empty() {
                    "the machine has none".into()
                } else {
                    failures.join("; ")
                },
            });
        }
        for f in failures {
            tracing::warn!("{f}");
        }
        Ok(leases)
    }

    fn switch_root(&self, new_root: &Path) -> Result<(), PlatformError> {
        for d in ["/dev", "/proc", "/sys", "/run"] {
            self.move_mount(Path::new(d), &new_root.join(d.trim_start_matches('/')))?;
        }
        nix::unistd::chdir(new_root).map_err(sys(format!("entering {}", new_root.display())))?;
        free_initramfs(new_root);
        nix::mount::mount(
            Some(new_root),
            "/",
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys(format!("moving {} to /", new_root.display())))?;
        nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
        nix::unistd::chdir("/").map_err(sys("entering /"))
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, PlatformError> {
        let p = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(p).map_err(|e| PlatformError::io("reading", p, e))?;
        Ok(parse_mountinfo(&text))
    }

    fn unmount(&self, target: &Path) -> Result<(), PlatformError> {
        nix::mount::umount(target).map_err(sys(format!("unmounting {}", target.display())))
    }

    fn remount_read_only(&self, target: &Path) -> Result<(), PlatformError> {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(sys(format!("remounting {} read-only", target.display())))
    }

    fn sync(&self) {
        nix::unistd::sync();
    }

    fn processes(&self) -> Result<Vec<i32>, PlatformError> {
        let me = std::process::id() as i32;
        let dir = Path::new("/proc");
        let entries = std::fs::read_dir(dir).map_err(|e| PlatformError::io("listing", dir, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me && pid != 1)
            // Kernel threads have an empty command line.
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
            })
            .collect())
    }

    fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> Result<(), PlatformError> {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(errno) => Err(PlatformError::Sys {
                what: format!("sending {signal} to {pid}"),
                errno,
            }),
        }
    }

    fn spawn(&self, argv: &[String], env: &[String], log: &Path) -> Result<i32, PlatformError> {
        use std::os::unix::process::CommandExt;
        let Some((program, args)) = argv.split_first() else {
            return Err(PlatformError::Unsupported("an empty command"));
        };
        // Checked here so a missing program is an error, not a child that fails to exec.
        if !Path::new(program).is_file() {
            return Err(PlatformError::io(
                "starting",
                Path::new(program),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        if let Some(dir) = log.parent() {
            self.mkdir_all(dir)?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| PlatformError::io("opening", log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| PlatformError::io("opening", log, e))?;
        let child = std::process::Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", "/sbin:/usr/sbin:/bin:/usr/bin")
            .envs(env.iter().filter_map(|e| e.split_once('=')))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| PlatformError::io("starting", Path::new(program), e))?;
        // Dropping a std Child neither waits for nor kills it: the reaper collects it.
        Ok(child.id() as i32)
    }

    fn has_filesystem(&self, device: &Path, fstype: &str) -> Result<bool, PlatformError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f =
            std::fs::File::open(device).map_err(|e| PlatformError::io("opening", device, e))?;
        let (offset, magic): (u64, &[u8]) = match fstype {
            // ext2/3/4 superblock at 1024, s_magic 0xEF53 at +56.
            "ext4" => (1024 + 56, &[0x53, 0xef]),
            // FAT32 boot sector: "FAT32   " at 82.
            "vfat" => (82, b"FAT32   "),
            _ => return Err(PlatformError::Unsupported("checking this file system type")),
        };
        let mut buf = vec![0u8; magic.len()];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| PlatformError::io("reading the superblock of", device, e))?;
        Ok(buf == magic)
    }

    fn mkfs(&self, device: &Path, fstype: &str, label: &str) -> Result<Mkfs, PlatformError> {
        let dev = device.display().to_string();
        let argv: Vec<&str> = match fstype {
            "ext4" => vec!["/sbin/mke2fs", "-t", "ext4", "-q", "-F", "-L", label, &dev],
            "vfat" => vec!["/sbin/mkfs.fat", "-F", "32", "-n", label, &dev],
            _ => return Err(PlatformError::Unsupported("making this file system type")),
        };
        Ok(Mkfs::Run(argv.into_iter().map(str::to_owned).collect()))
    }

    fn wipe(&self, device: &Path, len: u64, method: WipeMethod) -> Result<(), PlatformError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|e| PlatformError::io("opening", device, e))?;
        wipe_file(&mut f, len, method).map_err(|e| PlatformError::io("wiping", device, e))
    }

    fn open_file(&self, path: &Path) -> Result<std::fs::File, PlatformError> {
        std::fs::File::open(path).map_err(|e| PlatformError::io("opening", path, e))
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, PlatformError> {
        list_dir(path, path)
    }

    fn create_file(&self, path: &Path) -> Result<std::fs::File, PlatformError> {
        create_file(path, path)
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, PlatformError> {
        free_bytes(path, path)
    }

    fn kernel_log_path(&self) -> PathBuf {
        PathBuf::from("/dev/kmsg")
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn power(&self, action: PowerAction) -> Result<(), PlatformError> {
        nix::unistd::sync();
        let mode = match action {
            PowerAction::Reboot if crate::tasks::fault::requested(self, "halt-on-reboot") => {
                tracing::warn!("plinth.fault=halt-on-reboot: halting the kernel instead");
                nix::sys::reboot::RebootMode::RB_HALT_SYSTEM
            }
            PowerAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
            PowerAction::PowerOff => {
                // The watchdog runs on through a reboot (it resets a kernel that hangs in
                // one); a power-off that hangs should not turn into a reboot.
                crate::watchdog::disarm();
                nix::sys::reboot::RebootMode::RB_POWER_OFF
            }
        };
        let Err(errno) = nix::sys::reboot::reboot(mode);
        Err(PlatformError::Sys {
            what: format!("reboot(2) for {action:?}"),
            errno,
        })
    }
}

nix::ioctl_none_bad!(
    /// `BLKRRPART`: re-read the partition table.
    blk_rrpart,
    0x125f
);
nix::ioctl_write_ptr_bad!(
    /// `BLKDISCARD`: discards a byte range (`[start, length]`).
    blk_discard,
    0x1277,
    [u64; 2]
);
nix::ioctl_write_ptr_bad!(
    /// `BLKZEROOUT`: zeroes a byte range (`[start, length]`), offloaded where the device can.
    blk_zeroout,
    0x127f,
    [u64; 2]
);

/// Writes zeroes over `[offset, offset + len)`.
pub(crate) fn write_zeroes(f: &mut std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let chunk = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A file's whole content from its start, whatever its offset (the loader's files were opened
/// before `switch_root`, and are read once).
fn read_whole(file: &std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// How much one `BLKZEROOUT` call zeroes. On a device without write-zeroes offload the kernel
/// writes zero pages itself, and one call over a terabyte partition would be one uninterruptible
/// wait of hours; bounded steps keep each call short and the device queue shallow.
const ZERO_STEP: u64 = 32 << 20;

/// Zeroes `[0, len)` of `f` in steps of `step` bytes: `BLKZEROOUT` (offloaded where the device
/// can), or writes for a file that is not a block device (it answers `ENOTTY`) and once the
/// device refuses a step.
fn zero_out(f: &mut std::fs::File, len: u64, step: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut offload = true;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(step);
        // SAFETY: BLKZEROOUT reads a [u64; 2] through the pointer, which points at a live
        // local; the descriptor is open for writing.
        if !offload || unsafe { blk_zeroout(f.as_raw_fd(), &[at, n]) }.is_err() {
            // A refusal does not get better on the next step: write the rest.
            offload = false;
            write_zeroes(f, at, n)?;
        }
        at += n;
    }
    Ok(())
}

/// Wipes a block device (or image file) per `method`; see [`Platform::wipe`].
pub fn wipe_file(f: &mut std::fs::File, len: u64, method: WipeMethod) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const MIB: u64 = 1 << 20;
    let range = [0u64, len];
    match method {
        WipeMethod::Zero => zero_out(f, len, ZERO_STEP)?,
        WipeMethod::Fast => {
            // Signatures first (so the file systems are gone even if discard is not supported),
            // then discard.
            write_zeroes(f, 0, len.min(MIB))?;
            write_zeroes(f, len.saturating_sub(MIB), len.min(MIB))?;
            // The zeroes must reach the disk before the discard: BLKDISCARD drops the range
            // from the page cache, dirty pages included, so unflushed zeroes would be lost.
            f.sync_all()?;
            // SAFETY: as above, for BLKDISCARD; unsupported devices answer an error we ignore.
            let _ = unsafe { blk_discard(f.as_raw_fd(), &range) };
        }
    }
    f.sync_all()
}

/// Mount entries from a `mountinfo` text, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    // Fields: id parent maj:min root mountpoint options [optional...] - fstype source superopts.
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let target = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            Some(MountEntry {
                target: PathBuf::from(unescape_octal(target)),
                fstype: r.next()?.to_string(),
                source: unescape_octal(r.next()?),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u16, |acc, c| acc * 8 + u16::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(byte) = octal {
            out.push(byte);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deletes the initramfs's files (they are RAM that would otherwise stay pinned). Only files on
/// the initramfs itself are touched: anything on another device (the new root) is skipped.
/// Failures are logged, not fatal: the worst case is some RAM kept.
fn free_initramfs(keep: &Path) {
    let Ok(root_dev) = std::fs::metadata("/").map(|m| m.dev()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != root_dev {
            continue;
        }
        let result = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = result {
            tracing::debug!("freeing {}: {e}", path.display());
        }
    }
}

/// An rtnetlink connection whose driver task ends with it.
struct Netlink(rtnetlink::Handle, tokio::task::JoinHandle<()>);

impl Netlink {
    fn open() -> Result<Netlink, PlatformError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| PlatformError::Network {
                interface: "netlink".into(),
                reason: e.to_string(),
            })?;
        Ok(Netlink(handle, tokio::spawn(connection)))
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.1.abort();
    }
}

fn net_err(interface: &str) -> impl FnOnce(rtnetlink::Error) -> PlatformError {
    let interface = interface.to_string();
    move |e| PlatformError::Network {
        interface,
        reason: e.to_string(),
    }
}

async fn set_up(handle: &rtnetlink::Handle, index: u32, name: &str) -> Result<(), PlatformError> {
    handle
        .link()
        .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(net_err(name))
}

/// An address or route that is already there is what was wanted (the maintenance-mode
/// lease may have set it, or a config is applied again).
fn exists_ok(e: rtnetlink::Error) -> Result<(), rtnetlink::Error> {
    match &e {
        rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get()) == Some(-libc::EEXIST) => {
            Ok(())
        }
        _ => Err(e),
    }
}

/// Adds addresses and a default route through `gateway` to link `index`.
async fn add_addresses(
    handle: &rtnetlink::Handle,
    index: u32,
    name: &str,
    nets: &[ipnet::IpNet],
    gateway: Option<IpAddr>,
) -> Result<(), PlatformError> {
    for net in nets {
        handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await
            .or_else(exists_ok)
            .map_err(net_err(name))?;
    }
    match gateway {
        Some(IpAddr::V4(gw)) => {
            let route = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .output_interface(index)
                .gateway(gw)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .or_else(exists_ok)
                .map_err(net_err(name))
        }
        Some(IpAddr::V6(gw)) => {
            let route = rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .output_interface(index)
                .gateway(gw)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .or_else(exists_ok)
                .map_err(net_err(name))
        }
        None => Ok(()),
    }
}

/// The machine's Ethernet links (`/sys/class/net/*/type` is 1 for ARPHRD_ETHER).
fn ethernet_links() -> Result<Vec<String>, PlatformError> {
    let dir = Path::new("/sys/class/net");
    let mut links: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| PlatformError::io("listing", dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            std::fs::read_to_string(dir.join(n).join("type")).is_ok_and(|t| t.trim() == "1")
        })
        .collect();
    links.sort();
    Ok(links)
}

/// A link's MAC address from sysfs.
fn mac_address(link: &str) -> Result<[u8; 6], PlatformError> {
    let p = Path::new("/sys/class/net").join(link).join("address");
    let text = std::fs::read_to_string(&p).map_err(|e| PlatformError::io("reading", &p, e))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes.try_into().map_err(|_| PlatformError::Network {
        interface: link.into(),
        reason: format!("no Ethernet address in {}: {:?}", p.display(), text.trim()),
    })
}

/// A UDP socket on port 68 bound to `link`, able to send and receive broadcasts before the
/// link has an address.
fn dhcp_socket(link: &str) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(link.as_bytes()))?;
    s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], crate::dhcp::CLIENT_PORT)).into())?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Leases an address for `link` and configures it (address, default route).
async fn dhcp_link(
    handle: &rtnetlink::Handle,
    link: &str,
    index: u32,
) -> Result<Lease, PlatformError> {
    let lease = dhcp_exchange(link).await?;
    let net = ipnet::IpNet::new(IpAddr::V4(lease.address), lease.prefix_len).map_err(|e| {
        PlatformError::Network {
            interface: link.into(),
            reason: format!("DHCP granted a bad prefix: {e}"),
        }
    })?;
    add_addresses(handle, index, link, &[net], lease.router.map(IpAddr::V4)).await?;
    Ok(lease)
}

async fn dhcp_exchange(link: &str) -> Result<Lease, PlatformError> {
    dhcp_client(link, None).await
}

/// A DHCP exchange on `link`: a renewal of `renew` with its server, or a new lease.
async fn dhcp_client(link: &str, renew: Option<&Lease>) -> Result<Lease, PlatformError> {
    let mac = mac_address(link)?;
    let socket = dhcp_socket(link).map_err(|e| PlatformError::Network {
        interface: link.into(),
        reason: format!("opening the DHCP socket: {e}"),
    })?;
    let client = crate::dhcp::Client {
        socket: &socket,
        server: std::net::SocketAddr::from(([255, 255, 255, 255], crate::dhcp::SERVER_PORT)),
        link,
        mac,
        retry: crate::dhcp::Retry::default(),
    };
    let got = match renew {
        Some(lease) => match client.renew(lease).await {
            Ok(l) => Ok(l),
            Err(e) => {
                tracing::warn!("{link}: renewing with {}: {e}; asking anew", lease.server);
                client.acquire().await
            }
        },
        None => client.acquire().await,
    };
    got.map_err(|e| PlatformError::Network {
        interface: link.into(),
        reason: e.to_string(),
    })
}

/// Removes `address` from link `index` (a lease that moved).
async fn del_address(
    handle: &rtnetlink::Handle,
    index: u32,
    address: std::net::Ipv4Addr,
) -> Result<(), rtnetlink::Error> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = found.try_next().await? {
        let ours = msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(v4)) if *v4 == address));
        if ours {
            handle.address().del(msg).execute().await?;
        }
    }
    Ok(())
}

/// Renews the lease at half its time, for as long as machined runs; a lease that moved
/// replaces the old address (the link holds one leased address, not one per renewal).
fn spawn_renewal(link: String, index: u32, mut lease: Lease) {
    tokio::spawn(async move {
        loop {
            let half = Duration::from_secs(u64::from(lease.lease_secs.max(60)) / 2);
            tokio::time::sleep(half).await;
            match dhcp_client(&link, Some(&lease)).await {
                Ok(new) if new.address == lease.address => lease = new,
                Ok(new) => {
                    tracing::warn!(
                        "{link}: DHCP moved the address from {} to {new}",
                        lease.address
                    );
                    if let Ok(h) = Netlink::open() {
                        if let Ok(net) = ipnet::IpNet::new(IpAddr::V4(new.address), new.prefix_len)
                        {
                            let router = new.router.map(IpAddr::V4);
                            if let Err(e) = add_addresses(&h.0, index, &link, &[net], router).await
                            {
                                tracing::warn!("{link}: adding {new}: {e}");
                            } else if let Err(e) = del_address(&h.0, index, lease.address).await {
                                tracing::warn!("{link}: removing {}: {e}", lease.address);
                            }
                        }
                    }
                    lease = new;
                }
                Err(e) => tracing::warn!("{link}: renewing the DHCP lease: {e}"),
            }
        }
    });
}

async fn link_up(handle: &rtnetlink::Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    if let Some(link) = links.try_next().await? {
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(link.header.index)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
    }
    Ok(())
}

/// The interface's index, waiting for its driver to register it.
async fn wait_for_link(handle: &rtnetlink::Handle, name: &str) -> Result<u32, PlatformError> {
    let started = Instant::now();
    loop {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        if let Ok(Some(link)) = links.try_next().await {
            return Ok(link.header.index);
        }
        if started.elapsed() > LINK_WAIT {
            return Err(PlatformError::Network {
                interface: name.into(),
                reason: format!("no such interface after {}s", LINK_WAIT.as_secs()),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The temporary name a file is written under before it replaces `path`.
fn temp_beside(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Syncs the directory holding `path`, so a rename or removal in it is on the disk.
fn sync_parent(path: &Path) -> Result<(), PlatformError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PlatformError::io("syncing directory", dir, e))
}

/// Creates `path` for writing, its directory too (`shown` in errors).
pub(crate) fn create_file(path: &Path, shown: &Path) -> Result<std::fs::File, PlatformError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| PlatformError::io("creating the directory of", shown, e))?;
    }
    std::fs::File::create(path).map_err(|e| PlatformError::io("creating", shown, e))
}

/// Bytes free for files in the file system of `path` (`shown` in errors).
pub(crate) fn free_bytes(path: &Path, shown: &Path) -> Result<u64, PlatformError> {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .map_err(|e| PlatformError::io("reading the free space of", shown, e.into()))
}

/// The names in `dir` (`shown` in errors).
pub(crate) fn list_dir(dir: &Path, shown: &Path) -> Result<Vec<String>, PlatformError> {
    std::fs::read_dir(dir)
        .and_then(|d| {
            d.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .map_err(|e| PlatformError::io("listing", shown, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn zeroing_in_steps_covers_the_whole_range_and_nothing_after_it() {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(&[0xa5; 10_000]).expect("fill");
        // Steps that do not divide the length; a plain file is zeroed by writes.
        zero_out(&mut f, 9_000, 4_096).expect("zero");
        let mut data = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut data).expect("read");
        assert!(data[..9_000].iter().all(|&b| b == 0));
        assert!(data[9_000..].iter().all(|&b| b == 0xa5));
    }
}
