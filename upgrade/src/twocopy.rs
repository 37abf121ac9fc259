//! A small record kept twice on a raw partition so that a torn write never loses it: each copy
//! is `MAGIC`, format, sequence number, length, JSON payload, blake3 of all that. A write goes
//! to the older copy with the next sequence number and is synced; a read takes the newest copy
//! whose checksum holds. META and the sealed-volume header are such records.

use std::io::{Read, Seek, SeekFrom, Write};

use serde::{de::DeserializeOwned, Serialize};

/// Bytes before the payload.
pub const HEADER: usize = 8 + 4 + 8 + 4;

/// Where and how a kind of record is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Its magic.
    pub magic: &'static [u8; 8],
    /// Its format number.
    pub format: u32,
    /// Where the second copy starts (and the room each copy has).
    pub copy_offset: u64,
}

impl Layout {
    /// The largest payload a copy holds.
    pub fn max_payload(&self) -> usize {
        self.copy_offset as usize - HEADER - 32
    }
}

/// A record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Neither copy is valid.
    #[error("neither copy is valid (copy 0: {0}; copy 1: {1})")]
    NoValidCopy(String, String),
    /// The record does not fit a copy.
    #[error("the record is {0} bytes, more than a copy holds")]
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

/// What a read found: the newest valid record, its sequence number, and which copy it was in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<T> {
    /// The record.
    pub value: T,
    /// Its sequence number.
    pub seq: u64,
    /// The copy (0 or 1) it came from.
    pub copy: u8,
}

/// Decodes one copy: its sequence number and record, or why it is not usable.
pub fn decode<T: DeserializeOwned>(layout: &Layout, buf: &[u8]) -> Result<(u64, T), String> {
    if buf.len() < HEADER + 32 || &buf[..8] != layout.magic {
        return Err(format!(
            "no {} magic",
            String::from_utf8_lossy(layout.magic)
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let format = u32_at(8);
    if format != layout.format {
        return Err(format!("format {format} is not {}", layout.format));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[12..20]);
    let seq = u64::from_le_bytes(seq);
    let len = u32_at(20) as usize;
    if len > layout.max_payload() || HEADER + len + 32 > buf.len() {
        return Err(format!("payload length {len} is out of range"));
    }
    let body = &buf[..HEADER + len];
    let sum = &buf[HEADER + len..HEADER + len + 32];
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch (torn or corrupt write)".into());
    }
    let value =
        serde_json::from_slice(&buf[HEADER..HEADER + len]).map_err(|e| format!("payload: {e}"))?;
    Ok((seq, value))
}

/// Encodes one copy.
pub fn encode<T: Serialize>(layout: &Layout, seq: u64, value: &T) -> Result<Vec<u8>, CopyError> {
    let payload = serde_json::to_vec(value).map_err(|e| CopyError::Io {
        what: "encoding the record",
        source: std::io::Error::other(e),
    })?;
    if payload.len() > layout.max_payload() {
        return Err(CopyError::TooBig(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len() + 32);
    out.extend_from_slice(layout.magic);
    out.extend_from_slice(&layout.format.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

fn read_copy<T: DeserializeOwned, D: Read + Seek>(
    layout: &Layout,
    dev: &mut D,
    base: u64,
    copy: u8,
) -> Result<(u64, T), String> {
    let mut buf = vec![0u8; layout.copy_offset as usize];
    dev.seek(SeekFrom::Start(base + u64::from(copy) * layout.copy_offset))
        .and_then(|_| dev.read_exact(&mut buf))
        .map_err(|e| format!("reading: {e}"))?;
    decode(layout, &buf)
}

/// Reads the record from a device whose partition starts at `base`.
pub fn read<T: DeserializeOwned, D: Read + Seek>(
    layout: &Layout,
    dev: &mut D,
    base: u64,
) -> Result<Loaded<T>, CopyError> {
    let c0 = read_copy::<T, D>(layout, dev, base, 0);
    let c1 = read_copy::<T, D>(layout, dev, base, 1);
    match (c0, c1) {
        (Ok((s0, v0)), Ok((s1, _))) if s0 >= s1 => Ok(Loaded {
            value: v0,
            seq: s0,
            copy: 0,
        }),
        (_, Ok((s1, v1))) => Ok(Loaded {
            value: v1,
            seq: s1,
            copy: 1,
        }),
        (Ok((s0, v0)), Err(_)) => Ok(Loaded {
            value: v0,
            seq: s0,
            copy: 0,
        }),
        (Err(e0), Err(e1)) => Err(CopyError::NoValidCopy(e0, e1)),
    }
}

/// Writes `value` over the copy that is not `previous` (or copy 0 when there is none), with the
/// next sequence number, and syncs it. Returns what a read will now find.
pub fn write<T: Serialize + Clone, D: Write + Seek + SyncAll>(
    layout: &Layout,
    dev: &mut D,
    base: u64,
    previous: Option<(u64, u8)>,
    value: &T,
) -> Result<Loaded<T>, CopyError> {
    let (seq, copy) = match previous {
        Some((seq, copy)) => (seq + 1, 1 - copy),
        None => (1, 0),
    };
    let bytes = encode(layout, seq, value)?;
    let io = |what| move |source| CopyError::Io { what, source };
    dev.seek(SeekFrom::Start(base + u64::from(copy) * layout.copy_offset))
        .map_err(io("seeking to the copy"))?;
    dev.write_all(&bytes).map_err(io("writing the copy"))?;
    dev.sync_all().map_err(io("syncing the copy"))?;
    Ok(Loaded {
        value: value.clone(),
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
