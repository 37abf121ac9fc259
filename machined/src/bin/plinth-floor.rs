//! The boot benchmark's floor: an `/init` that only says it was reached (with the kernel's
//! clock, so the benchmark splits its boot as it does the node's), prints the kernel's log
//! (after the mark, so the printing is not timed; the benchmark sets its milestones against the
//! node's) and powers off. It is its own binary, put in the floor image in machined's place, so
//! PID 1 carries no benchmark hook.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

fn main() {
    eprintln!(
        "plinth-floor: init reached boot_us={}",
        sequencer::clock::boot_us()
    );
    print_kernel_log();
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("plinth-floor: power off failed: {e}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Every `/dev/kmsg` record so far, one line each: `plinth-floor: kmsg <µs> <text>`.
fn print_kernel_log() {
    // The initramfs has no /dev until the kernel's devtmpfs is mounted.
    let _ = nix::mount::mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("plinth-floor: opening /dev/kmsg: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Some(l) = phases::logs::parse_kmsg(&String::from_utf8_lossy(&buf[..n])) {
                    eprintln!("plinth-floor: kmsg {} {}", l.boot_us, l.text);
                }
            }
            // A record overwritten before it was read.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return,
        }
    }
}
