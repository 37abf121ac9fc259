//! Launching QEMU with OVMF, the way every Plinth VM runs.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::serial::{Line, SerialLog};
use crate::HarnessError;

/// OVMF's code (read-only flash), without Secure Boot.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's Secure Boot build (needs q35 with SMM).
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// OVMF's blank variable store, copied once per VM.
pub const OVMF_VARS: &str = crate::firmware::OVMF_VARS;
/// The software TPM.
pub const SWTPM: &str = "swtpm";

/// The firmware a VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF without Secure Boot, on QEMU's default machine.
    Plain,
    /// OVMF's Secure Boot build on q35 (SMM protects the variable store), its NVRAM first
    /// copied from `vars`: a store with Plinth's keys enrolled, or OVMF's blank one (Setup
    /// Mode).
    SecureBoot {
        /// The variable store template.
        vars: PathBuf,
    },
}
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The port the node's API listens on inside the VM.
pub const GUEST_API_PORT: u16 = 50000;

/// What VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name (shown by QEMU, used in messages).
    pub name: String,
    /// The VM's own directory: variable store, serial log, QEMU's output.
    pub dir: PathBuf,
    /// The system disk (raw), attached as NVMe.
    pub disk: PathBuf,
    /// Host port on 127.0.0.1 forwarded to the node's API.
    pub api_port: u16,
    /// More forwards: (host port on 127.0.0.1, guest port), TCP.
    pub forwards: Vec<(u16, u16)>,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Installer media (raw), attached read-only as a virtio disk that boots first.
    pub media: Option<PathBuf>,
    /// The firmware.
    pub firmware: Firmware,
    /// A TPM 2.0 (swtpm) whose state lives in this directory: the TPM of this machine, kept
    /// across its reboots and relaunches like its NVRAM.
    pub tpm: Option<PathBuf>,
    /// A second NIC (the guest's eth1) on a private network shared with other VMs.
    pub lan: Option<Lan>,
}

/// A private Ethernet segment between VMs: QEMU's multicast socket backend on the host's
/// loopback (no root, no bridge, nothing reachable from outside the machine). Every VM on it
/// needs its own MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    /// The segment: a UDP port of multicast group 230.0.0.1 (one per test).
    pub port: u16,
    /// This VM's MAC address on it.
    pub mac: String,
}

impl VmSpec {
    /// The VM's UEFI variable store (persists across the VM's reboots and relaunches).
    pub fn vars(&self) -> PathBuf {
        self.dir.join("OVMF_VARS.fd")
    }

    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// QEMU's control socket (QMP).
    pub fn qmp_socket(&self) -> PathBuf {
        self.sockets().join("qmp.sock")
    }

    /// The software TPM's control socket.
    fn tpm_socket(&self) -> Option<PathBuf> {
        self.tpm.as_ref().map(|_| self.sockets().join("swtpm.sock"))
    }

    fn sockets(&self) -> PathBuf {
        socket_dir(&self.dir)
    }

    fn firmware_args(&self) -> Vec<String> {
        let vars = format!("if=pflash,format=raw,file={}", self.vars().display());
        match &self.firmware {
            Firmware::Plain => vec![
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                vars,
            ],
            Firmware::SecureBoot { .. } => vec![
                "-machine".into(),
                "q35,smm=on".into(),
                // Only code running in SMM may write the variable store: the OS cannot
                // change the Secure Boot keys behind the firmware's back.
                "-global".into(),
                "driver=cfi.pflash01,property=secure,value=on".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECBOOT}"),
                "-drive".into(),
                format!("{vars},unit=1"),
            ],
        }
    }

    fn tpm_args(&self) -> Vec<String> {
        let Some(sock) = self.tpm_socket() else {
            return Vec::new();
        };
        vec![
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", sock.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            // CRB: the command goes in one buffer (TIS moves it a byte per register access,
            // slow under TCG).
            "tpm-crb,tpmdev=tpm0".into(),
        ]
    }

    /// The QEMU arguments for this VM.
    pub fn args(&self) -> Vec<String> {
        let s = |x: &str| x.to_string();
        let mut media = Vec::new();
        if let Some(m) = &self.media {
            media.push(s("-drive"));
            media.push(format!(
                "file={},format=raw,if=none,id=m0,readonly=on",
                m.display()
            ));
            media.push(s("-device"));
            // bootindex: the firmware tries the media before the NIC's network boot.
            media.push(s("virtio-blk-pci,drive=m0,bootindex=1"));
        }
        let mut args = vec![
            s("-name"),
            format!("plinth-{}", self.name),
            s("-accel"),
            s("tcg"),
            s("-m"),
            self.memory_mb.to_string(),
            s("-smp"),
            std::env::var("PLINTH_VM_SMP").unwrap_or_else(|_| "2".into()),
            // Every instruction TCG emulates, AES-NI and SHA-NI among them: dm-verity and
            // dm-crypt use them (the generic C code is several times slower under TCG).
            s("-cpu"),
            s("max"),
            s("-nodefaults"),
            s("-display"),
            s("none"),
            s("-drive"),
            format!(
                "file={},format=raw,if=none,id=d0,cache=unsafe{}",
                self.disk.display(),
                disk_write_limit()
            ),
            s("-device"),
            s("nvme,serial=plinth0,drive=d0"),
            s("-netdev"),
            format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_API_PORT}{}",
                self.api_port,
                self.forwards
                    .iter()
                    .map(|(h, g)| format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"))
                    .collect::<String>()
            ),
            s("-device"),
            s("virtio-net-pci,netdev=n0"),
            // Entropy for the guest: its CRNG is ready at once instead of after seconds of
            // jitter collection (TCG has no RDRAND by default).
            s("-device"),
            s("virtio-rng-pci"),
            s("-device"),
            s("i6300esb"),
            s("-action"),
            s("watchdog=reset"),
            s("-qmp"),
            format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
            s("-chardev"),
            format!("file,id=ser0,path={}", self.serial_log().display()),
            s("-serial"),
            s("chardev:ser0"),
        ];
        if let Some(lan) = &self.lan {
            args.extend([
                s("-netdev"),
                format!(
                    "socket,id=n1,mcast=230.0.0.1:{},localaddr=127.0.0.1",
                    lan.port
                ),
                s("-device"),
                format!("virtio-net-pci,netdev=n1,mac={}", lan.mac),
            ]);
        }
        args.extend(media);
        args.extend(self.firmware_args());
        args.extend(self.tpm_args());
        args
    }
}

/// `PLINTH_VM_DISK_WRITE_BPS` caps the system disk's write rate (QEMU's I/O throttling, which
/// counts write-zeroes too): CI hosts have been seen with far slower storage than a developer
/// machine, and this reproduces one.
fn disk_write_limit() -> String {
    std::env::var("PLINTH_VM_DISK_WRITE_BPS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|bps| format!(",throttling.bps-write={bps}"))
        .unwrap_or_default()
}

/// Whether process `pid` runs: `/proc` has it and it is not a zombie (a VM outlives the
/// `plinth cluster create` that started it, so its parent may be an init slow to reap it).
/// Pid 0 never runs (`/proc/0` does not exist).
pub fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 (free when asked; QEMU binds it right after), never one this
/// process has handed out before: the kernel may hand a port it just gave out (and that was
/// closed again) out once more, and two VMs started by one test process, or by one `plinth
/// cluster create`, would then ask QEMU for the same forward.
pub fn free_port() -> Result<u16, HarnessError> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l =
            TcpListener::bind("127.0.0.1:0").map_err(HarnessError::io("finding a free port"))?;
        let port = l
            .local_addr()
            .map_err(HarnessError::io("finding a free port"))?
            .port();
        if !handed.contains(&port) {
            handed.push(port);
            return Ok(port);
        }
    }
}

/// Fails naming what to install if QEMU or OVMF is missing.
pub fn check_host() -> Result<(), HarnessError> {
    if !imager::tools::which(QEMU) {
        return Err(HarnessError::Missing {
            what: QEMU.into(),
            hint: "apt-get install qemu-system-x86".into(),
        });
    }
    for f in [OVMF_CODE, OVMF_CODE_SECBOOT, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(HarnessError::Missing {
                what: f.into(),
                hint: "apt-get install ovmf".into(),
            });
        }
    }
    Ok(())
}

/// Where the Unix sockets of the VM whose directory is `vm_dir` live. A socket's path may not
/// exceed 107 bytes (`sun_path`) and the VM's directory can be deep (a user's home, CI's
/// checkout: swtpm refused a 111-byte one with nothing but exit status 1), so they live in a
/// short private directory named by a hash of the VM's: `$XDG_RUNTIME_DIR/plinth/<hash>`, or
/// `<tmp>/plinth-<uid>/<hash>` when there is no runtime directory. Whoever stops a detached
/// VM (`plinth cluster destroy`) removes it.
pub fn socket_dir(vm_dir: &Path) -> PathBuf {
    let base = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(run) if run.is_absolute() => run.join("plinth"),
        _ => std::env::temp_dir().join(format!("plinth-{}", nix::unistd::getuid())),
    };
    base.join(socket_dir_name(vm_dir))
}

/// Where [`socket_dir`] may have put a VM's sockets: under the runtime directory, if there is
/// one now, and under the temporary directory (a VM started from another session, with or
/// without a runtime directory, is found either way).
pub fn socket_dirs(vm_dir: &Path) -> Vec<PathBuf> {
    let tmp = std::env::temp_dir()
        .join(format!("plinth-{}", nix::unistd::getuid()))
        .join(socket_dir_name(vm_dir));
    let mut dirs = vec![socket_dir(vm_dir)];
    if !dirs.contains(&tmp) {
        dirs.push(tmp);
    }
    dirs
}

fn socket_dir_name(vm_dir: &Path) -> String {
    let hash = blake3::hash(vm_dir.as_os_str().as_encoded_bytes()).to_hex();
    hash.as_str()[..16].to_string()
}

/// A Unix socket's longest path (`sun_path` less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Makes the VM's socket directory: private to this user (it sits in a shared temporary
/// directory when there is no runtime directory, and whoever can reach QMP controls the VM).
fn prepare_sockets(spec: &VmSpec) -> Result<(), HarnessError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = spec.sockets();
    for d in [dir.parent().unwrap_or(&dir), dir.as_path()] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(HarnessError::io(format!("creating {}", d.display()))(e)),
        }
        let meta = std::fs::symlink_metadata(d)
            .map_err(HarnessError::io(format!("reading {}", d.display())))?;
        let uid = nix::unistd::getuid().as_raw();
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(HarnessError::Other(format!(
                "{} is not a directory private to this user (uid {uid}); it holds the VM's \
                 control sockets, so remove it or set XDG_RUNTIME_DIR",
                d.display()
            )));
        }
    }
    for sock in [Some(spec.qmp_socket()), spec.tpm_socket()]
        .into_iter()
        .flatten()
    {
        let len = sock.as_os_str().len();
        if len > SUN_PATH_MAX {
            return Err(HarnessError::Other(format!(
                "the socket path {} is {len} bytes, longer than a Unix socket's {SUN_PATH_MAX}: \
                 set XDG_RUNTIME_DIR or TMPDIR to a shorter directory",
                sock.display()
            )));
        }
    }
    Ok(())
}

/// Starts the VM's software TPM on its state directory and waits for its socket. It ends by
/// itself when QEMU disconnects (`--terminate`).
fn start_tpm(spec: &VmSpec) -> Result<Option<Child>, HarnessError> {
    let (Some(dir), Some(sock)) = (&spec.tpm, spec.tpm_socket()) else {
        return Ok(None);
    };
    if !imager::tools::which(SWTPM) {
        return Err(HarnessError::Missing {
            what: SWTPM.into(),
            hint: "apt-get install swtpm swtpm-tools".into(),
        });
    }
    std::fs::create_dir_all(dir)
        .map_err(HarnessError::io(format!("creating {}", dir.display())))?;
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(dir.join("swtpm.out"))
        .map_err(HarnessError::io("creating swtpm.out"))?;
    let err = log.try_clone().map_err(HarnessError::io("swtpm.out"))?;
    let mut child = Command::new(SWTPM)
        .args(["socket", "--tpm2", "--terminate", "--tpmstate"])
        .arg(format!("dir={}", dir.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", sock.display()))
        .arg("--log")
        .arg(format!("file={},level=1", dir.join("swtpm.log").display()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(HarnessError::io(format!("starting {SWTPM}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Its socket file appears at bind(), before it listens, and QEMU's connect in between
    // would be refused; a probe connect of our own would end it (`--terminate`). So wait
    // until the kernel lists the socket as listening.
    while !listening(&sock) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HarnessError::Other(format!(
                "swtpm exited ({status}): {}",
                std::fs::read_to_string(dir.join("swtpm.out")).unwrap_or_default()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(HarnessError::Other(
                "swtpm did not create its socket in 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(child))
}

/// Whether a Unix socket bound at `path` is listening (`/proc/net/unix`: flags `00010000`,
/// `__SO_ACCEPTCON`).
fn listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let path = path.display().to_string();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x1_0000 != 0)
    })
}

/// A running VM. Dropping it kills QEMU, unless it was detached.
pub struct Vm {
    /// What was started.
    pub spec: VmSpec,
    /// The console.
    pub serial: SerialLog,
    /// When QEMU was started.
    pub started: Instant,
    child: Option<Child>,
    tpm: Option<Child>,
}

impl Vm {
    /// Starts QEMU. The variable store is created from OVMF's blank one on first launch and
    /// kept afterwards, like a real machine's NVRAM.
    pub fn launch(spec: VmSpec) -> Result<Vm, HarnessError> {
        check_host()?;
        std::fs::create_dir_all(&spec.dir)
            .map_err(HarnessError::io(format!("creating {}", spec.dir.display())))?;
        if !spec.vars().exists() {
            let template = match &spec.firmware {
                Firmware::Plain => Path::new(OVMF_VARS),
                Firmware::SecureBoot { vars } => vars.as_path(),
            };
            std::fs::copy(template, spec.vars())
                .map_err(HarnessError::io("copying the OVMF variable store"))?;
        }
        prepare_sockets(&spec)?;
        let tpm = start_tpm(&spec)?;
        let serial = spec.serial_log();
        std::fs::write(&serial, b"")
            .map_err(HarnessError::io(format!("creating {}", serial.display())))?;
        let out = std::fs::File::create(spec.dir.join("qemu.log"))
            .map_err(HarnessError::io("creating qemu.log"))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("creating qemu.log"))?;
        let started = Instant::now();
        let child = Command::new(QEMU)
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for the CLI does not reach QEMU.
            .process_group(0)
            .spawn()
            .map_err(HarnessError::io(format!("starting {QEMU}")))?;
        Ok(Vm {
            serial: SerialLog::follow(&serial, started),
            spec,
            started,
            child: Some(child),
            tpm,
        })
    }

    /// QEMU's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Lets the VM outlive this handle (for `plinth cluster create`); returns QEMU's PID. Its
    /// TPM ends when QEMU does.
    pub fn detach(mut self) -> Option<u32> {
        self.tpm.take();
        self.child.take().map(|c| c.id())
    }

    /// QEMU's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The end of the serial log, and what QEMU itself reported (a failed host write, say),
    /// for an error message.
    pub fn diagnostics(&self) -> String {
        let qemu = self.qemu_log_tail();
        let qemu = qemu.trim();
        let serial = self.serial.tail(40);
        if qemu.is_empty() {
            serial
        } else {
            format!("{serial}\n--- QEMU's own output:\n{qemu}")
        }
    }

    fn qemu_log_tail(&self) -> String {
        std::fs::read_to_string(self.spec.dir.join("qemu.log")).unwrap_or_default()
    }

    /// Waits for a console line containing `needle` at or after line `from`.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
    ) -> Result<(usize, Line), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.serial.find(needle, from) {
                return Ok(found);
            }
            if let Some(status) = self.exited() {
                return Err(HarnessError::Exited {
                    what: format!("console line {needle:?}"),
                    status: format!("{status}; {}", self.qemu_log_tail().trim()),
                    tail: self.serial.tail(40),
                });
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("console line {needle:?}"),
                    secs: timeout.as_secs(),
                    tail: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: "QEMU to exit".into(),
                    secs: timeout.as_secs(),
                    tail: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Presses the ACPI power button (QMP `system_powerdown`).
    pub fn press_power_button(&self) -> Result<(), HarnessError> {
        self.qmp(r#"{"execute":"system_powerdown"}"#).map(drop)
    }

    /// Presses the reset button (QMP `system_reset`): the firmware starts again, as after a
    /// power cycle, with the disk, the variable store and the TPM as they are.
    pub fn press_reset(&self) -> Result<(), HarnessError> {
        self.qmp(r#"{"execute":"system_reset"}"#).map(drop)
    }

    /// Where each vCPU is (`RIP`, `CR0`, privilege level, halted), from QEMU's monitor: tells a
    /// guest stuck in the firmware (low addresses) from one stuck in the kernel
    /// (`ffffffff8…`), for an error message.
    pub fn cpu_state(&self) -> String {
        let reply = match self.qmp(
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"info registers -a"}}"#,
        ) {
            Ok(r) => r,
            Err(e) => return format!("(no vCPU state: {e})"),
        };
        let text = serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("return")?.as_str().map(str::to_string))
            .unwrap_or(reply);
        text.lines()
            .filter(|l| {
                ["CPU#", "RIP=", "EIP=", "CR0="]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sends one QMP command (after the greeting and the capabilities negotiation) and returns
    /// its reply line.
    fn qmp(&self, cmd: &str) -> Result<String, HarnessError> {
        use std::io::{BufRead, BufReader, Write};
        let sock = std::os::unix::net::UnixStream::connect(self.spec.qmp_socket())
            .map_err(HarnessError::io("connecting to QMP"))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(HarnessError::io("QMP"))?;
        let mut reader = BufReader::new(sock.try_clone().map_err(HarnessError::io("QMP"))?);
        let mut writer = sock;
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(HarnessError::io("reading the QMP greeting"))?;
        for cmd in [r#"{"execute":"qmp_capabilities"}"#, cmd] {
            writeln!(writer, "{cmd}").map_err(HarnessError::io("writing to QMP"))?;
            loop {
                line.clear();
                reader
                    .read_line(&mut line)
                    .map_err(HarnessError::io("reading from QMP"))?;
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") || line.is_empty() {
                    return Err(HarnessError::Other(format!("QMP refused {cmd}: {line}")));
                }
            }
        }
        Ok(line)
    }

    /// Kills QEMU (a power cut) and waits for it, and its TPM.
    pub fn kill(&mut self) {
        let owned = self.child.is_some();
        for mut c in [self.child.take(), self.tpm.take()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A detached VM still uses its sockets.
        if owned {
            let _ = std::fs::remove_dir_all(self.spec.sockets());
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_hands_the_same_port_out_twice() {
        // Drawn at random from the ephemeral range, 300 ports repeat one another more often
        // than not (the birthday bound over ~28,000 ports); each handed out once here.
        let ports: Vec<u16> = (0..300).map(|_| free_port().expect("a port")).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    }
}
