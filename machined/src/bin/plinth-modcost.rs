//! The module benchmark's `/init` (`cargo bench -p vm-tests --bench modules`): loads the
//! image's kernel modules one at a time (the initramfs's list, then the late one), from memory
//! (`init_module`, the read included: machined's way) and from a file (`finit_module`),
//! unloads them, and again, alternating, then prints each module's median cost both ways and
//! what IMA measured, and powers off. It is its own binary, put in the image in machined's
//! place, so PID 1 carries no benchmark hook.
//!
//! Each file load goes through a fresh copy of the module under a name of its own: IMA
//! measures a file once, and adds a measurement (and extends the PCR) once per content and
//! name, so loading the same file again would leave its measurement out.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phases::runtime::paths;
use phases::tasks::initramfs::{parse_module_line, ModuleLine};

/// Measured rounds each way, after one round each way that warms the kernel's loader up.
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Memory,
    File,
}

struct Module {
    line: ModuleLine,
    name: String,
    bytes: u64,
    memory: Vec<Duration>,
    file: Vec<Duration>,
    /// Why it was left out of the comparison (it failed to load, or stays loaded).
    skipped: Option<String>,
}

fn say(what: &str) {
    eprintln!("plinth-modcost: {what}");
}

fn main() {
    if let Err(e) = run() {
        say(&format!("failed: {e:#}"));
    }
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    say(&format!("power off failed: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn run() -> anyhow::Result<()> {
    let release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    let base = Path::new("/lib/modules").join(&release);
    let mut modules = Vec::new();
    for list in [paths::MODULE_ORDER, paths::MODULE_LATE] {
        let text = std::fs::read_to_string(list)?;
        for line in text.lines().filter_map(parse_module_line) {
            let bytes = std::fs::metadata(base.join(&line.path))?.len();
            modules.push(Module {
                name: phases::modules::name_of(&line.path),
                line,
                bytes,
                memory: Vec::new(),
                file: Vec::new(),
                skipped: None,
            });
        }
    }
    let copies = PathBuf::from("/modcost");
    std::fs::create_dir_all(&copies)?;
    no_module_helper();
    let ima = mount_securityfs();
    say(&format!(
        "{} modules, {ROUNDS} rounds each way after a warm-up",
        modules.len()
    ));
    const WARM_UP: usize = 2;
    let rounds = [Mode::Memory, Mode::File]
        .into_iter()
        .chain((0..ROUNDS).flat_map(|_| [Mode::File, Mode::Memory]));
    // Loads tried (IMA measures a file it reads even if the load then fails): from a file, from
    // memory, the warm-up's included.
    let mut loads = [0usize; 2];
    for (round, mode) in rounds.enumerate() {
        for m in modules.iter_mut().filter(|m| m.skipped.is_none()) {
            loads[usize::from(mode == Mode::Memory)] += 1;
            match load(&base, &copies.join(round.to_string()), m, mode) {
                Ok(took) if round >= WARM_UP => match mode {
                    Mode::Memory => m.memory.push(took),
                    Mode::File => m.file.push(took),
                },
                Ok(_) => {}
                Err(e) => m.skipped = Some(e),
            }
        }
        for m in modules.iter_mut().rev().filter(|m| m.skipped.is_none()) {
            let name = CString::new(m.name.as_str())?;
            if let Err(e) =
                nix::kmod::delete_module(&name, nix::kmod::DeleteModuleFlags::O_NONBLOCK)
            {
                m.skipped = Some(format!("stays loaded ({e})"));
            }
        }
    }
    report(&modules);
    if let Some(log) = ima {
        // Every entry but the boot aggregate (which IMA records at its start): a module loaded
        // from memory would show as `init_module` if this kernel measured it.
        let measured = std::fs::read_to_string(log)
            .map(|t| t.lines().filter(|l| !l.contains("boot_aggregate")).count())
            .unwrap_or(0);
        say(&format!(
            "IMA measured {measured} loads; loads tried from a file {}, from memory {}",
            loads[0], loads[1]
        ));
    }
    say("done");
    Ok(())
}

/// Turns module autoloading off, as machined does: a module that asks for another as it loads
/// is told at once there is none, instead of the kernel starting a helper that cannot run.
fn no_module_helper() {
    use nix::mount::{mount, MsFlags};
    let proc = Path::new("/proc");
    if std::fs::create_dir_all(proc).is_ok()
        && mount(
            Some("proc"),
            proc,
            Some("proc"),
            MsFlags::empty(),
            None::<&str>,
        )
        .is_ok()
    {
        let _ = std::fs::write("/proc/sys/kernel/modprobe", b"\n");
    }
}

/// Mounts securityfs for IMA's measurement list, if the kernel has it.
fn mount_securityfs() -> Option<PathBuf> {
    use nix::mount::{mount, MsFlags};
    let sys = Path::new("/sys");
    let sec = sys.join("kernel/security");
    std::fs::create_dir_all(sys).ok()?;
    mount(
        Some("sysfs"),
        sys,
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .ok()?;
    mount(
        Some("securityfs"),
        &sec,
        Some("securityfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .ok()?;
    Some(sec.join("ima/ascii_runtime_measurements"))
}

/// Loads one module the given way; its time, or why it cannot be compared.
fn load(base: &Path, copies: &Path, m: &Module, mode: Mode) -> Result<Duration, String> {
    let path = base.join(&m.line.path);
    let params = CString::new(m.line.params.as_str()).map_err(|e| e.to_string())?;
    let outcome = match mode {
        Mode::Memory => {
            let start = Instant::now();
            let image = std::fs::read(&path).map_err(|e| e.to_string())?;
            nix::kmod::init_module(&image, &params).map(|()| start.elapsed())
        }
        Mode::File => {
            std::fs::create_dir_all(copies).map_err(|e| e.to_string())?;
            let copy = copies.join(format!("{}.ko", m.name));
            std::fs::copy(&path, &copy).map_err(|e| e.to_string())?;
            let file = std::fs::File::open(&copy).map_err(|e| e.to_string())?;
            let start = Instant::now();
            let r = nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty())
                .map(|()| start.elapsed());
            let _ = std::fs::remove_file(&copy);
            r
        }
    };
    outcome.map_err(|e| format!("does not load ({e})"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn report(modules: &[Module]) {
    let (mut memory, mut file) = (Duration::ZERO, Duration::ZERO);
    for m in modules {
        if let Some(why) = &m.skipped {
            say(&format!("module {} left out: {why}", m.name));
            continue;
        }
        let (mem, fil) = (median(m.memory.clone()), median(m.file.clone()));
        memory += mem;
        file += fil;
        let us = |v: &[Duration]| {
            v.iter()
                .map(|d| d.as_micros().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        say(&format!(
            "module {} bytes={} memory_us={} file_us={} rounds_memory={} rounds_file={}",
            m.name,
            m.bytes,
            mem.as_micros(),
            fil.as_micros(),
            us(&m.memory),
            us(&m.file)
        ));
    }
    say(&format!(
        "total memory_us={} file_us={}",
        memory.as_micros(),
        file.as_micros()
    ));
}
