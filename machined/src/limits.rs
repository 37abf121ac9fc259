//! Process limits PID 1 sets for itself before it serves anything.

/// The open-file limit machined runs with: the API's connection caps (and each service's
/// logs, the watchdog, the kernel log) stay well inside it.
const NOFILE: u64 = 65536;

/// Raises `RLIMIT_NOFILE` (the kernel starts init with 1024): to [`NOFILE`], or as far as the
/// hard limit allows where machined may not raise it (the simulated machine runs unprivileged).
/// Returns the soft limit now in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if setrlimit(Resource::RLIMIT_NOFILE, NOFILE.max(soft), NOFILE.max(hard)).is_ok() {
        return NOFILE.max(soft);
    }
    let want = NOFILE.min(hard).max(soft);
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => want,
        Err(e) => {
            tracing::warn!("raising the open-file limit: {e}");
            soft
        }
    }
}
