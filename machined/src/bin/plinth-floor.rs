//! The boot benchmark's floor: an `/init` that only says it was reached (with the kernel's
//! clock, so the benchmark splits its boot as it does the node's), prints the kernel's log
//! (after the mark, so the printing is not timed; the benchmark sets its milestones against the
//! node's) and powers off. It is its own binary, put in the floor image in machined's place, so
//! PID 1 carries no benchmark hook.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// One line on the console; a failed write is not PID 1's to die of (`eprintln!` panics).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "plinth-floor: {line}");
}

fn main() {
    say(&format!(
        "init reached boot_us={}",
        sequencer::clock::boot_us()
    ));
    print_kernel_log();
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    say(&format!("power off failed: {e}"));
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
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        Ok(f) => f,
        Err(e) => {
            say(&format!("opening /dev/kmsg: {e}"));
            return;
        }
    };
    let mut buf = vec![0u8; 8192];
    // Until there are none (WouldBlock) or a read fails.
    while let Ok(Some(l)) = phases::logs::read_kmsg_record(&f, &mut buf) {
        say(&format!("kmsg {} {}", l.boot_us, l.text));
    }
}
