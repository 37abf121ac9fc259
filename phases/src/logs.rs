//! Reading logs for the API: the kernel's ring buffer and the services' output, with follow;
//! and keeping service logs bounded (rotated by size).
//!
//! No reader holds an OS thread: `/dev/kmsg` is read without blocking, woken by the runtime
//! when a record comes, and files are polled by a task. Every follower ends as soon as its
//! client has gone (the channel closes), not at the next line.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::platform::{Platform, PlatformError};
use crate::runtime::paths;

/// A service log is rotated once it is larger than this; one older copy is kept.
pub const MAX_SERVICE_LOG: u64 = 1 << 20;
/// How often followed files are read for new lines.
const POLL: Duration = Duration::from_millis(200);
/// The longest line passed on (longer ones are cut): a reader's memory is bounded.
const MAX_LINE: usize = 16 << 10;

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

fn plain(text: String) -> LogLine {
    LogLine {
        text,
        boot_us: 0,
        level: 6,
    }
}

/// The kernel log, then (with `follow`) new records as they come. On Linux it is
/// `/dev/kmsg` (one record per read); a regular file (the simulated machine's) is read by lines.
pub fn kernel_log(
    platform: &Arc<dyn Platform>,
    follow: bool,
) -> Result<mpsc::Receiver<LogLine>, String> {
    let path = platform.kernel_log_path();
    let (tx, rx) = mpsc::channel(256);
    if path.starts_with("/dev") {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        // SAFETY: `f` is an open descriptor the AsyncFd takes ownership of; nothing else holds
        // it, so it stays open and the same file until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(f, tokio::io::Interest::READABLE) }
            .map_err(|e| format!("watching {}: {e}", path.display()))?;
        tokio::spawn(follow_kmsg(fd, follow, tx));
    } else {
        let file =
            std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        tokio::spawn(follow_file(file, 0, follow, tx, None));
    }
    Ok(rx)
}

/// The next record of an open `/dev/kmsg` (one read is one record), `Ok(None)` at the end;
/// records overwritten before they were read, and any that do not parse, are skipped.
/// `WouldBlock` when none is there yet on a non-blocking descriptor.
pub fn read_kmsg_record(
    mut kmsg: &std::fs::File,
    buf: &mut [u8],
) -> std::io::Result<Option<LogLine>> {
    loop {
        match kmsg.read(buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                if let Some(line) = parse_kmsg(&String::from_utf8_lossy(&buf[..n])) {
                    return Ok(Some(line));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads `/dev/kmsg` records until there are none (or, with `follow`, until the client goes).
async fn follow_kmsg(fd: AsyncFd<std::fs::File>, follow: bool, tx: mpsc::Sender<LogLine>) {
    // A record is at most 8 KiB less its header (the kernel's CONSOLE_EXT_LOG_MAX).
    let mut buf = vec![0u8; 8192];
    loop {
        match read_kmsg_record(fd.get_ref(), &mut buf) {
            Ok(None) => return,
            Ok(Some(line)) => {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && follow => {
                let ready = tokio::select! {
                    r = fd.readable() => r,
                    _ = tx.closed() => return,
                };
                match ready {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => return,
                }
            }
            Err(_) => return,
        }
    }
}

/// Where a service's output is.
pub fn service_log(service: &str) -> PathBuf {
    Path::new(paths::SERVICE_LOGS).join(format!("{service}.log"))
}

/// Where a service's previous output is, once its log was rotated.
pub fn rotated_log(service: &str) -> PathBuf {
    Path::new(paths::SERVICE_LOGS).join(format!("{service}.log.1"))
}

/// Where the last `tail` lines of `file` begin, reading backwards from its end in blocks (a
/// large log is not read whole).
pub fn tail_offset(file: &mut std::fs::File, tail: usize) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 << 10;
    let len = file.seek(SeekFrom::End(0))?;
    if tail == 0 {
        return Ok(0);
    }
    let mut pos = len;
    let mut newlines = 0usize;
    // A final newline ends the last line; it does not start a new one.
    let mut skip_last = true;
    let mut buf = vec![0u8; BLOCK as usize];
    while pos > 0 {
        let start = pos.saturating_sub(BLOCK);
        let n = (pos - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                skip_last = false;
                continue;
            }
            if skip_last && start + i as u64 == len - 1 {
                skip_last = false;
                continue;
            }
            newlines += 1;
            if newlines == tail {
                return Ok(start + i as u64 + 1);
            }
        }
        pos = start;
    }
    Ok(0)
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
    let offset =
        tail_offset(&mut file, tail).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel(256);
    // Reopened when the log is rotated under the reader.
    let reopen = (platform.clone(), path);
    tokio::spawn(follow_file(file, offset, follow, tx, Some(reopen)));
    Ok(rx)
}

/// Sends a file's lines from `offset`; with `follow`, polls for more until the client goes.
/// A file that shrinks was rotated: it is read again from its start (reopened at `reopen`).
async fn follow_file(
    mut file: std::fs::File,
    mut offset: u64,
    follow: bool,
    tx: mpsc::Sender<LogLine>,
    reopen: Option<(Arc<dyn Platform>, PathBuf)>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < offset {
            if let Some((p, path)) = &reopen {
                if let Ok(f) = p.open_file(path) {
                    file = f;
                }
            }
            offset = 0;
            pending.clear();
        }
        let mut read_any = false;
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                read_any = true;
                offset += n as u64;
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).take(end.min(MAX_LINE)).collect();
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if tx.send(plain(text)).await.is_err() {
                        return;
                    }
                }
                if pending.len() > MAX_LINE {
                    let text = String::from_utf8_lossy(&pending[..MAX_LINE]).into_owned();
                    pending.clear();
                    if tx.send(plain(text)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if !follow {
            if !pending.is_empty() {
                let _ = tx
                    .send(plain(String::from_utf8_lossy(&pending).into_owned()))
                    .await;
            }
            return;
        }
        if !read_any {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// Rotates `service`'s log when it is over [`MAX_SERVICE_LOG`]: copied to `<name>.log.1`, then
/// emptied (the service keeps writing to the same open file, appending). Returns whether it did.
pub fn rotate_if_large(platform: &dyn Platform, service: &str) -> Result<bool, PlatformError> {
    let path = service_log(service);
    let len = match platform.open_file(&path) {
        Ok(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
        Err(_) => return Ok(false),
    };
    if len <= MAX_SERVICE_LOG {
        return Ok(false);
    }
    platform.rotate(&path, &rotated_log(service))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "sim")]
    #[test]
    fn a_service_log_over_the_limit_is_kept_once_and_emptied_and_a_small_one_is_left() {
        let dir = tempfile::tempdir().expect("tmp");
        let (sim, _power) = crate::platform::sim::Sim::new(dir.path(), "");
        let (big, small) = (
            sim.resolve(&service_log("big")),
            sim.resolve(&service_log("small")),
        );
        std::fs::create_dir_all(big.parent().expect("parent")).expect("mkdir");
        let data = vec![b'x'; MAX_SERVICE_LOG as usize + 1];
        std::fs::write(&big, &data).expect("write");
        std::fs::write(&small, b"a line\n").expect("write");
        assert!(rotate_if_large(&*sim, "big").expect("rotate"));
        assert!(!rotate_if_large(&*sim, "small").expect("rotate"));
        assert_eq!(
            std::fs::read(sim.resolve(&rotated_log("big"))).expect("kept"),
            data
        );
        assert_eq!(std::fs::metadata(&big).expect("meta").len(), 0);
        assert_eq!(std::fs::read(&small).expect("small"), b"a line\n");
        assert!(!sim.resolve(&rotated_log("small")).exists());
    }

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

    #[test]
    fn the_tail_is_found_from_the_end_across_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("log");
        // 20000 lines of 10 bytes: 200 KB, over three 64 KiB blocks.
        let text: String = (0..20000).map(|i| format!("line {i:04}\n")).collect();
        std::fs::write(&p, &text).expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        for (tail, first) in [(1, "line 19999"), (3, "line 19997"), (12000, "line 8000")] {
            let off = tail_offset(&mut f, tail).expect("tail");
            let rest = &text[off as usize..];
            assert!(rest.starts_with(first), "tail {tail}: {:?}", &rest[..20]);
            assert_eq!(rest.lines().count(), tail);
        }
        assert_eq!(tail_offset(&mut f, 30000).expect("all"), 0);
        // Without a final newline the last line still counts.
        std::fs::write(&p, "a\nb\nc").expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        assert_eq!(tail_offset(&mut f, 2).expect("tail"), 2);
    }

    #[tokio::test]
    async fn a_kmsg_follower_holds_no_thread_and_ends_when_its_client_goes() {
        use std::io::Write;
        // A pipe stands in for /dev/kmsg: one record per write, reads that would block.
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let r = std::fs::File::from(r);
        nix::fcntl::fcntl(
            &r,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("nonblocking");
        // SAFETY: `r` is an open descriptor owned by the AsyncFd from here on.
        let fd = unsafe { AsyncFd::register_with_interest(r, tokio::io::Interest::READABLE) }
            .expect("register");
        let mut w = std::fs::File::from(w);
        w.write_all(b"6,1,5000,-;hello\n").expect("write");
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(follow_kmsg(fd, true, tx));
        assert_eq!(rx.recv().await.map(|l| l.text).as_deref(), Some("hello"));
        // Nothing more will come, and the client goes: the follower ends at once.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the follower ended without another record")
            .expect("join");
        drop(w);
    }

    #[tokio::test]
    async fn a_follower_ends_when_its_client_goes_even_with_no_new_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("log");
        std::fs::write(&p, "one\n").expect("write");
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(follow_file(
            std::fs::File::open(&p).expect("open"),
            0,
            true,
            tx,
            None,
        ));
        assert_eq!(rx.recv().await.map(|l| l.text).as_deref(), Some("one"));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the follower ended")
            .expect("join");
    }
}
