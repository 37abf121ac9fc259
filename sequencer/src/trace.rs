//! The boot-phase trace: one console line per event, in a format a test can parse back.
//!
//! A line is the marker [`MARKER`], a space, and the event as JSON. The serial console mixes
//! firmware and kernel output with ours, so the parser looks for the marker anywhere in a line.

use crate::event::Event;

/// What starts every trace line.
pub const MARKER: &str = "plinth-trace";

/// The console line for an event (without newline).
pub fn format_line(event: &Event) -> String {
    // Serialising plain data with string keys cannot fail; fall back to an empty object so the
    // line is still recognisable if it ever did.
    let json = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    format!("{MARKER} {json}")
}

/// The event on a console line, if the line carries one.
pub fn parse_line(line: &str) -> Option<Event> {
    let at = line.find(MARKER)?;
    let json = line[at + MARKER.len()..].trim();
    serde_json::from_str(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventBus, EventKind};

    #[test]
    fn a_trace_line_parses_back_to_the_same_event_even_after_console_noise() {
        let bus = EventBus::new(4);
        let e = bus.publish(
            EventKind::PhaseStart {
                sequence: "boot".into(),
                phase: "mountState".into(),
                index: 1,
                total: 3,
            },
            None,
        );
        let line = format!("\u{1b}[0m[    3.1] {}\r", format_line(&e));
        assert_eq!(parse_line(&line), Some(e));
    }

    #[test]
    fn lines_without_the_marker_or_with_broken_json_are_not_events() {
        assert_eq!(parse_line("BdsDxe: starting Boot0002"), None);
        assert_eq!(parse_line("plinth-trace {\"id\":"), None);
    }
}
