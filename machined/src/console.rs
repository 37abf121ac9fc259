//! The console: logs and the boot-phase trace both go to stderr, which the kernel opened on
//! `/dev/console` for init. Writes never panic (a full or closed console must not kill PID 1).

use std::io::Write;

use sequencer::{trace, Event};

/// Sets up `tracing` to the console, with time since boot.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLINTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        line(&format!("machined: panic: {info}"));
    }));
}

/// Writes one line to the console.
pub fn line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}

/// The event-bus sink that prints the boot-phase trace.
pub fn trace_sink(event: &Event) {
    line(&trace::format_line(event));
}
