//! META: the slot and boot record, kept twice on the META partition.
//!
//! Each copy is a header (magic, format version, sequence number, payload length), a JSON
//! payload and a blake3 checksum of both. A write goes to the copy that is not the newest valid
//! one, with a sequence number one higher, and is synced; so a write torn by a power cut leaves
//! the other copy intact, and reading picks the valid copy with the highest sequence number.
//!
//! ```text
//! offset 0        copy 0: "PLNTMETA" u32 version, u64 seq, u32 len, payload[len], blake3[32]
//! offset 512 KiB  copy 1: same
//! ```

use std::io::{Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use crate::Slot;

const MAGIC: &[u8; 8] = b"PLNTMETA";
const FORMAT: u32 = 1;
/// Bytes before the payload: magic, format, sequence number, payload length.
pub const HEADER: usize = 8 + 4 + 8 + 4;
/// Where the second copy starts.
pub const COPY_OFFSET: u64 = 512 * 1024;
/// The largest payload a copy holds.
pub const MAX_PAYLOAD: usize = COPY_OFFSET as usize - HEADER - 32;

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Nothing installed.
    Empty,
    /// An image is being written (a crash here leaves it unbootable, and it is never booted).
    Writing,
    /// Written and verified; the next boot of it is its trial.
    Pending,
    /// Its trial boot is running.
    Trial,
    /// Proven: committed now or before.
    Good,
    /// Its trial failed.
    Failed,
}

impl SlotState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Writing => "writing",
            SlotState::Pending => "pending",
            SlotState::Trial => "trial",
            SlotState::Good => "good",
            SlotState::Failed => "failed",
        }
    }
}

/// What META says about one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// State.
    pub state: SlotState,
    /// Version of the image in it.
    #[serde(default)]
    pub version: String,
    /// blake3 of its root image.
    #[serde(default)]
    pub root_blake3: String,
    /// Size of its root image.
    #[serde(default)]
    pub root_size: u64,
    /// Trial boots attempted.
    #[serde(default)]
    pub attempts: u32,
    /// How far its trial got (phase names, in order).
    #[serde(default)]
    pub breadcrumbs: Vec<String>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Whether the firmware was told to try it (`BootNext`): a pending slot that was never
    /// tried (a staged upgrade) has not failed.
    #[serde(default)]
    pub armed: bool,
}

impl SlotRecord {
    /// An empty slot.
    pub fn empty() -> Self {
        SlotRecord {
            state: SlotState::Empty,
            version: String::new(),
            root_blake3: String::new(),
            root_size: 0,
            attempts: 0,
            breadcrumbs: Vec::new(),
            failure: None,
            armed: false,
        }
    }
}

/// The last trial that failed, for the API to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialFailure {
    /// The slot that failed.
    pub slot: Slot,
    /// Its version.
    pub version: String,
    /// Why.
    pub reason: String,
    /// When it was noticed (ms since the epoch).
    pub unix_ms: u64,
}

/// The whole record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The slot the firmware boots by default (first in BootOrder).
    pub committed: Slot,
    /// Slot A.
    pub a: SlotRecord,
    /// Slot B.
    pub b: SlotRecord,
    /// The last failed trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<TrialFailure>,
}

impl Meta {
    /// A fresh record: `slot` committed and good.
    pub fn initial(slot: Slot, version: &str) -> Meta {
        let good = SlotRecord {
            state: SlotState::Good,
            version: version.into(),
            ..SlotRecord::empty()
        };
        let (a, b) = match slot {
            Slot::A => (good, SlotRecord::empty()),
            Slot::B => (SlotRecord::empty(), good),
        };
        Meta {
            committed: slot,
            a,
            b,
            last_failure: None,
        }
    }

    /// A slot's record.
    pub fn slot(&self, slot: Slot) -> &SlotRecord {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    /// A slot's record, to change.
    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotRecord {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }
}

/// META could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Neither copy is valid.
    #[error("neither META copy is valid (copy 0: {0}; copy 1: {1})")]
    NoValidCopy(String, String),
    /// The record does not fit a copy.
    #[error("the META record is {0} bytes, more than a copy holds")]
    TooBig(usize),
    /// I/O on the partition.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Decodes one copy (at least its header, payload and checksum): its sequence number and
/// record, or why it is not usable.
pub fn decode_copy(buf: &[u8]) -> Result<(u64, Meta), String> {
    if buf.len() < HEADER + 32 || &buf[..8] != MAGIC {
        return Err("no META magic".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let format = u32_at(8);
    if format != FORMAT {
        return Err(format!("format {format} is not {FORMAT}"));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[12..20]);
    let seq = u64::from_le_bytes(seq);
    let len = u32_at(20) as usize;
    if len > MAX_PAYLOAD || HEADER + len + 32 > buf.len() {
        return Err(format!("payload length {len} is out of range"));
    }
    let body = &buf[..HEADER + len];
    let sum = &buf[HEADER + len..HEADER + len + 32];
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch (torn or corrupt write)".into());
    }
    let meta =
        serde_json::from_slice(&buf[HEADER..HEADER + len]).map_err(|e| format!("payload: {e}"))?;
    Ok((seq, meta))
}

/// Encodes one copy.
pub fn encode_copy(seq: u64, meta: &Meta) -> Result<Vec<u8>, MetaError> {
    let payload = serde_json::to_vec(meta).map_err(|e| MetaError::Io {
        what: "encoding META",
        source: std::io::Error::other(e),
    })?;
    if payload.len() > MAX_PAYLOAD {
        return Err(MetaError::TooBig(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

/// What a read found: the newest valid record, its sequence number, and which copy it was in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The record.
    pub meta: Meta,
    /// Its sequence number.
    pub seq: u64,
    /// The copy (0 or 1) it came from.
    pub copy: u8,
}

fn read_copy<D: std::io::Read + Seek>(
    dev: &mut D,
    base: u64,
    copy: u8,
) -> Result<(u64, Meta), String> {
    let mut buf = vec![0u8; COPY_OFFSET as usize];
    dev.seek(SeekFrom::Start(base + u64::from(copy) * COPY_OFFSET))
        .and_then(|_| dev.read_exact(&mut buf))
        .map_err(|e| format!("reading: {e}"))?;
    decode_copy(&buf)
}

/// Reads META from a device whose META partition starts at `base`.
pub fn read<D: std::io::Read + Seek>(dev: &mut D, base: u64) -> Result<Loaded, MetaError> {
    let c0 = read_copy(dev, base, 0);
    let c1 = read_copy(dev, base, 1);
    match (c0, c1) {
        (Ok((s0, m0)), Ok((s1, _))) if s0 >= s1 => Ok(Loaded {
            meta: m0,
            seq: s0,
            copy: 0,
        }),
        (_, Ok((s1, m1))) => Ok(Loaded {
            meta: m1,
            seq: s1,
            copy: 1,
        }),
        (Ok((s0, m0)), Err(_)) => Ok(Loaded {
            meta: m0,
            seq: s0,
            copy: 0,
        }),
        (Err(e0), Err(e1)) => Err(MetaError::NoValidCopy(e0, e1)),
    }
}

/// Writes `meta` over the copy that is not `previous` (or copy 0 when there is none), with the
/// next sequence number, and syncs it. Returns what a read will now find.
pub fn write<D: Write + Seek + SyncAll>(
    dev: &mut D,
    base: u64,
    previous: Option<&Loaded>,
    meta: &Meta,
) -> Result<Loaded, MetaError> {
    let (seq, copy) = match previous {
        Some(p) => (p.seq + 1, 1 - p.copy),
        None => (1, 0),
    };
    let bytes = encode_copy(seq, meta)?;
    let io = |what| move |source| MetaError::Io { what, source };
    dev.seek(SeekFrom::Start(base + u64::from(copy) * COPY_OFFSET))
        .map_err(io("seeking to the META copy"))?;
    dev.write_all(&bytes).map_err(io("writing the META copy"))?;
    dev.sync_all().map_err(io("syncing META"))?;
    Ok(Loaded {
        meta: meta.clone(),
        seq,
        copy,
    })
}

/// A device that can be flushed to stable storage.
pub trait SyncAll {
    /// Flushes written data to the device.
    fn sync_all(&mut self) -> std::io::Result<()>;
}

impl SyncAll for std::fs::File {
    fn sync_all(&mut self) -> std::io::Result<()> {
        std::fs::File::sync_all(self)
    }
}

impl SyncAll for std::io::Cursor<Vec<u8>> {
    fn sync_all(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn dev() -> Cursor<Vec<u8>> {
        Cursor::new(vec![0u8; 2 * COPY_OFFSET as usize])
    }

    #[test]
    fn a_blank_partition_has_no_valid_copy() {
        assert!(matches!(
            read(&mut dev(), 0),
            Err(MetaError::NoValidCopy(..))
        ));
    }

    #[test]
    fn writes_alternate_copies_and_the_newest_wins() {
        let mut d = dev();
        let m1 = Meta::initial(Slot::A, "1.0");
        let r1 = write(&mut d, 0, None, &m1).expect("write");
        assert_eq!((r1.seq, r1.copy), (1, 0));
        let mut m2 = m1.clone();
        m2.b.state = SlotState::Pending;
        let r2 = write(&mut d, 0, Some(&r1), &m2).expect("write");
        assert_eq!((r2.seq, r2.copy), (2, 1));
        assert_eq!(read(&mut d, 0).expect("read"), r2);
    }

    #[test]
    fn a_torn_write_leaves_the_previous_record_readable() {
        let mut d = dev();
        let r1 = write(&mut d, 0, None, &Meta::initial(Slot::A, "1.0")).expect("write");
        let mut m2 = r1.meta.clone();
        m2.committed = Slot::B;
        let bytes = encode_copy(r1.seq + 1, &m2).expect("encode");
        // Every prefix of the second write, as a power cut would leave it.
        for cut in [1, 8, HEADER, HEADER + 10, bytes.len() - 1] {
            let mut torn = d.clone();
            torn.get_mut()[COPY_OFFSET as usize..COPY_OFFSET as usize + cut]
                .copy_from_slice(&bytes[..cut]);
            assert_eq!(
                read(&mut torn, 0).expect("still readable").meta,
                r1.meta,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_never_panics_and_is_refused() {
        for fill in [0u8, 0xff, 0x50] {
            let mut d = Cursor::new(vec![fill; 2 * COPY_OFFSET as usize]);
            assert!(read(&mut d, 0).is_err());
        }
        let mut buf = encode_copy(1, &Meta::initial(Slot::A, "x")).expect("encode");
        buf[20] = 0xff;
        assert!(decode_copy(&buf).is_err());
    }
}
