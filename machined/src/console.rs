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
        // One level for everything (PLINTH_LOG=debug|info|warn|error): per-target filters
        // would bring a regex engine into PID 1 for a knob nobody turns on a node.
        .with_max_level(
            std::env::var("PLINTH_LOG")
                .ok()
                .and_then(|l| l.parse::<tracing::Level>().ok())
                .unwrap_or(tracing::Level::INFO),
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
