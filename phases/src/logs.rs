//! Reading logs for the API: the kernel's ring buffer and the services' output, with follow.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::platform::Platform;
use crate::runtime::paths;

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The text.
    pub text: String,
    /// Microseconds since boot, when known (kernel records).
    pub boot_us: u64,
    /// Syslog level (0 emergency .. 7 debug), when known.
    pub level: u32,
}

/// A `/dev/kmsg` record: `level-and-facility,seq,usec,flags;message`.
pub fn parse_kmsg(record: &str) -> Option<LogLine> {
    let (head, text) = record.split_once(';')?;
    let mut f = head.split(',');
    let prio: u32 = f.next()?.parse().ok()?;
    let _seq = f.next()?;
    let boot_us = f.next()?.parse().ok()?;
    // Continuation lines (" KEY=value") follow the message; only the message is the line.
    let text = text.lines().next().unwrap_or_default().to_string();
    Some(LogLine {
        text,
        boot_us,
        level: prio & 7,
    })
}

/// The kernel log, then (with `follow`) new records as they come. On Linux it is
/// `/dev/kmsg` (one record per read); a regular file (the simulated machine's) is read by lines.
pub fn kernel_log(
    platform: &Arc<dyn Platform>,
    follow: bool,
) -> Result<mpsc::Receiver<LogLine>, String> {
    let path = platform.kernel_log_path();
    let (tx, rx) = mpsc::channel(1024);
    if path.starts_with("/dev") {
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        if !follow {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NONBLOCK);
        }
        let mut f = opts
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if let Some(line) = parse_kmsg(&String::from_utf8_lossy(&buf[..n])) {
                            if tx.blocking_send(line).is_err() {
                                return;
                            }
                        }
                    }
                    // A record overwritten before it was read: skip it.
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                    Err(_) => return,
                }
            }
        });
    } else {
        let file =
            std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        follow_lines(file, follow, tx, |l| LogLine {
            text: l,
            boot_us: 0,
            level: 6,
        });
    }
    Ok(rx)
}

/// Where a service's output is.
pub fn service_log(service: &str) -> PathBuf {
    Path::new(paths::SERVICE_LOGS).join(format!("{service}.log"))
}

/// The last `tail` lines of a service's log (all with 0), then (with `follow`) new ones.
pub fn service_lines(
    platform: &Arc<dyn Platform>,
    service: &str,
    tail: usize,
    follow: bool,
) -> Result<mpsc::Receiver<LogLine>, String> {
    let path = service_log(service);
    let mut file = platform.open_file(&path).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(1024);
    if tail > 0 {
        // Start where the last `tail` lines begin (scanning the file once).
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(tail);
        let offset: usize = lines[..skip].iter().map(|l| l.len() + 1).sum();
        let _ = file.seek(SeekFrom::Start(offset as u64));
    } else {
        let _ = file.seek(SeekFrom::Start(0));
    }
    follow_lines(file, follow, tx, |l| LogLine {
        text: l,
        boot_us: 0,
        level: 6,
    });
    Ok(rx)
}

/// Sends a file's lines from its current position; with `follow`, keeps polling for more.
fn follow_lines(
    file: std::fs::File,
    follow: bool,
    tx: mpsc::Sender<LogLine>,
    make: fn(String) -> LogLine,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) if follow => {
                    if tx.is_closed() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = line.trim_end_matches('\n').to_string();
                    if tx.blocking_send(make(text)).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records_parse_into_level_time_and_text() {
        let l = parse_kmsg("6,339,5140900,-;NET: Registered protocol family 10\n SUBSYSTEM=net")
            .expect("parses");
        assert_eq!(
            (l.level, l.boot_us, l.text.as_str()),
            (6, 5_140_900, "NET: Registered protocol family 10")
        );
        assert_eq!(parse_kmsg("garbage"), None);
    }
}
