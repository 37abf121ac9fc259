//! The serial console: QEMU writes it to a file; a thread follows the file and stamps each
//! complete line with the host time since the VM started.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One console line and when it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Host time since the VM started.
    pub at: Duration,
    /// The text, with ANSI escapes and carriage returns removed.
    pub text: String,
}

/// Removes ANSI escape sequences (the firmware draws with them) and `\r`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters, then one final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Follows a console log file.
pub struct SerialLog {
    path: PathBuf,
    lines: Arc<Mutex<Vec<Line>>>,
    stop: Arc<AtomicBool>,
}

impl SerialLog {
    /// Starts following `path` (which may not exist yet); times are relative to `start`.
    pub fn follow(path: &Path, start: Instant) -> SerialLog {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, l, s) = (path.to_path_buf(), lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut partial: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let stopping = s.load(Ordering::Relaxed);
                if let Ok(mut f) = std::fs::File::open(&p) {
                    use std::io::Seek;
                    if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                        while let Ok(n) = f.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            offset += n as u64;
                            partial.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                let at = start.elapsed();
                let mut got = Vec::new();
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let raw: Vec<u8> = partial.drain(..=i).collect();
                    got.push(Line {
                        at,
                        text: strip_ansi(&String::from_utf8_lossy(&raw[..raw.len() - 1])),
                    });
                }
                if !got.is_empty() {
                    l.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
                }
                if stopping {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        SerialLog {
            path: path.to_path_buf(),
            lines,
            stop,
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first line (from index `from`) containing `needle`, with its index.
    pub fn find(&self, needle: &str, from: usize) -> Option<(usize, Line)> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.text.contains(needle))
            .map(|(i, l)| (i, l.clone()))
    }

    /// The last complete line.
    pub fn last(&self) -> Option<Line> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// The last `n` lines as text.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for SerialLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_escapes_and_carriage_returns_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h\u{1b}[2J\u{1b}[01;01HBdsDxe: starting\r"),
            "BdsDxe: starting"
        );
    }

    #[test]
    fn lines_are_collected_as_they_are_appended() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("serial.log");
        let log = SerialLog::follow(&p, Instant::now());
        std::fs::write(&p, "one\ntw").expect("write");
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(&p, "one\ntwo\n").expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.lines().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let texts: Vec<String> = log.lines().into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["one", "two"]);
        assert!(log.find("two", 0).is_some());
    }
}
