//! Launching QEMU with OVMF, the way every Plinth VM runs.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::serial::{Line, SerialLog};
use crate::HarnessError;

/// OVMF's code (read-only flash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's blank variable store, copied once per VM.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
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
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Installer media (raw), attached read-only as a virtio disk that boots first.
    pub media: Option<PathBuf>,
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
        self.dir.join("qmp.sock")
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
            s("1"),
            s("-nodefaults"),
            s("-display"),
            s("none"),
            s("-drive"),
            format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
            s("-drive"),
            format!("if=pflash,format=raw,file={}", self.vars().display()),
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
                "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_API_PORT}",
                self.api_port
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
        args.extend(media);
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

/// A free TCP port on 127.0.0.1 (free when asked; QEMU binds it right after).
pub fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(HarnessError::io("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(HarnessError::io("finding a free port"))?
        .port())
}

/// Fails naming what to install if QEMU or OVMF is missing.
pub fn check_host() -> Result<(), HarnessError> {
    if !imager::tools::which(QEMU) {
        return Err(HarnessError::Missing {
            what: QEMU.into(),
            hint: "apt-get install qemu-system-x86".into(),
        });
    }
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(HarnessError::Missing {
                what: f.into(),
                hint: "apt-get install ovmf".into(),
            });
        }
    }
    Ok(())
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
}

impl Vm {
    /// Starts QEMU. The variable store is created from OVMF's blank one on first launch and
    /// kept afterwards, like a real machine's NVRAM.
    pub fn launch(spec: VmSpec) -> Result<Vm, HarnessError> {
        check_host()?;
        std::fs::create_dir_all(&spec.dir)
            .map_err(HarnessError::io(format!("creating {}", spec.dir.display())))?;
        if !spec.vars().exists() {
            std::fs::copy(OVMF_VARS, spec.vars())
                .map_err(HarnessError::io("copying the OVMF variable store"))?;
        }
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
        })
    }

    /// QEMU's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Lets the VM outlive this handle (for `plinth cluster create`); returns QEMU's PID.
    pub fn detach(mut self) -> Option<u32> {
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
        use std::io::{BufRead, BufReader, Write};
        let sock = std::os::unix::net::UnixStream::connect(self.spec.qmp_socket())
            .map_err(HarnessError::io("connecting to QMP"))?;
        let mut reader = BufReader::new(sock.try_clone().map_err(HarnessError::io("QMP"))?);
        let mut writer = sock;
        let mut line = String::new();
        // Greeting, then capabilities negotiation, then the command.
        reader
            .read_line(&mut line)
            .map_err(HarnessError::io("reading the QMP greeting"))?;
        for cmd in [
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"system_powerdown"}"#,
        ] {
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
        Ok(())
    }

    /// Kills QEMU (a power cut) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
