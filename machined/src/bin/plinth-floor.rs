//! The boot benchmark's floor: an `/init` that only says it was reached (with the kernel's
//! clock, so the benchmark splits its boot as it does the node's) and powers off. It is its own
//! binary, put in the floor image in machined's place, so PID 1 carries no benchmark hook.

fn main() {
    eprintln!(
        "plinth-floor: init reached boot_us={}",
        sequencer::clock::boot_us()
    );
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("plinth-floor: power off failed: {e}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
