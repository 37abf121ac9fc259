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

use std::io::{Seek, Write};

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
    /// How far its trial got, in order.
    #[serde(default)]
    pub breadcrumbs: Vec<Breadcrumb>,
    /// The bundle's security version.
    #[serde(default)]
    pub security_version: u64,
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
            security_version: 0,
            failure: None,
            armed: false,
        }
    }

    /// Why a trial that stopped here failed, from its last breadcrumb.
    pub fn failure_reason(&self) -> String {
        match self.breadcrumbs.last() {
            None => NEVER_STARTED.into(),
            Some(Breadcrumb::Failed(reason)) => reason.clone(),
            Some(last @ Breadcrumb::Passed { sequence, .. }) if sequence == "initramfs" => {
                format!("failed before machined started: stopped in the initramfs after {last} (a kernel panic, such as dm-verity finding a corrupted block, a hang or a reset)")
            }
            Some(last) => {
                format!("stopped after {last} (no further progress: hang, crash or reset)")
            }
        }
    }
}

/// Why a trial that left no breadcrumb failed: its initramfs never ran.
pub const NEVER_STARTED: &str = "failed before machined started: its initramfs never ran (the firmware refused or could not load its UKI, or its kernel stopped before /init)";

/// A step a trial boot passed, kept in META so that the next boot can say where a trial that
/// died stopped. On disk each is a string (`machined started`, `boot/network`,
/// `failed: …`, `committed`), readable in a dump of the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Breadcrumb {
    /// machined started on the slot.
    Started,
    /// A phase of a boot sequence passed.
    Passed {
        /// The sequence (`initialize`, `boot`).
        sequence: String,
        /// The phase.
        phase: String,
    },
    /// The trial failed, for this reason (a missed health gate).
    Failed(String),
    /// The trial passed and the slot was committed.
    Committed,
}

impl Breadcrumb {
    /// Left by the initramfs (before machined started).
    pub fn in_initramfs(&self) -> bool {
        matches!(self, Breadcrumb::Passed { sequence, .. } if sequence == "initramfs")
    }
}

impl std::fmt::Display for Breadcrumb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breadcrumb::Started => f.write_str("machined started"),
            Breadcrumb::Passed { sequence, phase } => write!(f, "{sequence}/{phase}"),
            Breadcrumb::Failed(reason) => write!(f, "failed: {reason}"),
            Breadcrumb::Committed => f.write_str("committed"),
        }
    }
}

impl From<Breadcrumb> for String {
    fn from(b: Breadcrumb) -> String {
        b.to_string()
    }
}

impl From<String> for Breadcrumb {
    fn from(s: String) -> Breadcrumb {
        match s.as_str() {
            "machined started" => Breadcrumb::Started,
            "committed" => Breadcrumb::Committed,
            _ => match s.strip_prefix("failed:") {
                Some(reason) => Breadcrumb::Failed(reason.trim().to_string()),
                None => {
                    let (sequence, phase) = s.split_once('/').unwrap_or(("", &s));
                    Breadcrumb::Passed {
                        sequence: sequence.into(),
                        phase: phase.into(),
                    }
                }
            },
        }
    }
}

/// What a verified image is, as [`Meta::mark_written`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Its version.
    pub version: String,
    /// blake3 of its root image.
    pub root_blake3: String,
    /// Size of its root image.
    pub root_size: u64,
    /// The bundle's security version.
    pub security_version: u64,
}

/// What a boot is, as [`Meta::on_boot`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootKind {
    /// The booted slot is on trial: its health decides whether it is committed.
    Trial,
    /// A normal boot; the other slot's trial failed if this says so.
    Normal(Option<TrialFailure>),
}

/// A META rule refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Only a pending slot can be armed.
    #[error("slot {slot} is {state}, not pending: there is no trial to arm")]
    NotPending {
        /// The slot.
        slot: Slot,
        /// Its state.
        state: &'static str,
    },
    /// Rollback goes only to a good slot.
    #[error("slot {slot} is {state}: rollback needs a good slot")]
    NotGood {
        /// The slot.
        slot: Slot,
        /// Its state.
        state: &'static str,
    },
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
    /// The lowest security version a bundle may have: the highest one ever committed. Only
    /// ever raised.
    #[serde(default)]
    pub security_floor: u64,
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
            security_floor: 0,
        }
    }

    // The rules: every change an upgrade, a trial, an install or a rollback makes to META,
    // as pure functions on the record (the callers read, apply one, and write).

    /// An image is about to be written into `slot`: whatever it held is gone, and until it is
    /// verified nothing boots it (`writing` is kept out of `BootOrder`).
    pub fn begin_write(&mut self, slot: Slot, version: &str) {
        let r = self.slot_mut(slot);
        *r = SlotRecord::empty();
        r.state = SlotState::Writing;
        r.version = version.into();
    }

    /// The write into `slot` stopped before the image was verified: the slot is empty.
    pub fn abandon_write(&mut self, slot: Slot) {
        let r = self.slot_mut(slot);
        if r.state == SlotState::Writing {
            *r = SlotRecord::empty();
        }
    }

    /// `slot` holds a verified image, pending its trial (not yet armed).
    pub fn mark_written(&mut self, slot: Slot, w: &Written) {
        let r = self.slot_mut(slot);
        *r = SlotRecord {
            state: SlotState::Pending,
            version: w.version.clone(),
            root_blake3: w.root_blake3.clone(),
            root_size: w.root_size,
            security_version: w.security_version,
            ..SlotRecord::empty()
        };
    }

    /// The firmware was told to try `slot` next (`BootNext`).
    pub fn arm(&mut self, slot: Slot) -> Result<(), RuleError> {
        let r = self.slot_mut(slot);
        if r.state != SlotState::Pending {
            return Err(RuleError::NotPending {
                slot,
                state: r.state.as_str(),
            });
        }
        r.armed = true;
        Ok(())
    }

    /// The node booted `booted` (running `version`) at `now_ms`: a slot that is not good
    /// is on trial (again, if a trial rebooted itself); a good one booting while the other was
    /// on trial, or armed for one, means that trial failed, for the reason its breadcrumbs give.
    pub fn on_boot(&mut self, booted: Slot, version: &str, now_ms: u64) -> BootKind {
        let me = self.slot_mut(booted);
        if me.state != SlotState::Good {
            // What this boot's initramfs recorded stays; an earlier attempt's record goes.
            let initramfs: Vec<Breadcrumb> = if me.state == SlotState::Pending {
                std::mem::take(&mut me.breadcrumbs)
            } else {
                let keep_from = me
                    .breadcrumbs
                    .iter()
                    .rposition(|c| !c.in_initramfs())
                    .map_or(0, |i| i + 1);
                me.breadcrumbs.split_off(keep_from)
            };
            me.state = SlotState::Trial;
            me.attempts += 1;
            me.breadcrumbs = initramfs;
            me.breadcrumbs.push(Breadcrumb::Started);
            me.version = version.into();
            return BootKind::Trial;
        }
        let other = booted.other();
        let o = self.slot_mut(other);
        let tried = o.state == SlotState::Trial || (o.state == SlotState::Pending && o.armed);
        if !tried {
            return BootKind::Normal(None);
        }
        let reason = o.failure_reason();
        o.state = SlotState::Failed;
        o.failure = Some(reason.clone());
        o.armed = false;
        let failure = TrialFailure {
            slot: other,
            version: o.version.clone(),
            reason,
            unix_ms: now_ms,
        };
        self.last_failure = Some(failure.clone());
        BootKind::Normal(Some(failure))
    }

    /// The trial of `slot` passed `crumb`.
    pub fn breadcrumb(&mut self, slot: Slot, crumb: Breadcrumb) {
        self.slot_mut(slot).breadcrumbs.push(crumb);
    }

    /// A failed trial of `slot` is better explained by `reason` (the firmware refused its
    /// UKI, which only a look at the UKI can tell).
    pub fn explain_failure(&mut self, slot: Slot, reason: &str) {
        let r = self.slot_mut(slot);
        if r.state == SlotState::Failed {
            r.failure = Some(reason.into());
        }
        if let Some(f) = self.last_failure.as_mut().filter(|f| f.slot == slot) {
            f.reason = reason.into();
        }
    }

    /// Whether booting `slot` is its trial (it is armed, or on trial already): what the
    /// initramfs asks before it leaves breadcrumbs.
    pub fn is_trial_boot(&self, slot: Slot) -> bool {
        let r = self.slot(slot);
        (r.state == SlotState::Pending && r.armed) || r.state == SlotState::Trial
    }

    /// The initramfs of `slot`'s trial passed `phase` (before machined, and so before
    /// [`Meta::on_boot`], runs): recorded so that a trial which dies there says where. A
    /// retried trial's breadcrumbs from earlier attempts go with its first.
    pub fn initramfs_passed(&mut self, slot: Slot, phase: &str) {
        if !self.is_trial_boot(slot) {
            return;
        }
        let r = self.slot_mut(slot);
        if r.breadcrumbs.last().is_some_and(|c| !c.in_initramfs()) {
            r.breadcrumbs.clear();
        }
        r.breadcrumbs.push(Breadcrumb::Passed {
            sequence: "initramfs".into(),
            phase: phase.into(),
        });
    }

    /// `slot` passed its trial (or was installed): good, committed, and the security floor
    /// rises to its security version.
    pub fn commit(&mut self, slot: Slot) {
        self.committed = slot;
        let r = self.slot_mut(slot);
        r.state = SlotState::Good;
        r.failure = None;
        r.armed = false;
        r.breadcrumbs.push(Breadcrumb::Committed);
        let sv = r.security_version;
        self.security_floor = self.security_floor.max(sv);
    }

    /// The committed slot becomes `to`, which must be good.
    pub fn rollback(&mut self, to: Slot) -> Result<(), RuleError> {
        let state = self.slot(to).state;
        if state != SlotState::Good {
            return Err(RuleError::NotGood {
                slot: to,
                state: state.as_str(),
            });
        }
        self.committed = to;
        Ok(())
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
pub type MetaError = crate::twocopy::CopyError;

/// The META record's layout on its partition.
pub const LAYOUT: crate::twocopy::Layout = crate::twocopy::Layout {
    magic: MAGIC,
    format: FORMAT,
    copy_offset: COPY_OFFSET,
};

/// Decodes one copy (at least its header, payload and checksum): its sequence number and
/// record, or why it is not usable.
pub fn decode_copy(buf: &[u8]) -> Result<(u64, Meta), String> {
    crate::twocopy::decode(&LAYOUT, buf)
}

/// Encodes one copy.
pub fn encode_copy(seq: u64, meta: &Meta) -> Result<Vec<u8>, MetaError> {
    crate::twocopy::encode(&LAYOUT, seq, meta)
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

/// Reads META from a device whose META partition starts at `base`.
pub fn read<D: std::io::Read + Seek>(dev: &mut D, base: u64) -> Result<Loaded, MetaError> {
    let l = crate::twocopy::read(&LAYOUT, dev, base)?;
    Ok(Loaded {
        meta: l.value,
        seq: l.seq,
        copy: l.copy,
    })
}

/// Writes `meta` over the copy that is not `previous` (or copy 0 when there is none), with the
/// next sequence number, and syncs it. Returns what a read will now find.
pub fn write<D: Write + Seek + SyncAll>(
    dev: &mut D,
    base: u64,
    previous: Option<&Loaded>,
    meta: &Meta,
) -> Result<Loaded, MetaError> {
    let l = crate::twocopy::write(&LAYOUT, dev, base, previous.map(|p| (p.seq, p.copy)), meta)?;
    Ok(Loaded {
        meta: l.value,
        seq: l.seq,
        copy: l.copy,
    })
}

pub use crate::twocopy::SyncAll;

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

    fn written(v: &str, sv: u64) -> Written {
        Written {
            version: v.into(),
            root_blake3: "ab".repeat(32),
            root_size: 4096,
            security_version: sv,
        }
    }

    /// A record of A committed (version 1, security version 1) with B as given.
    fn with_b(state: SlotState, armed: bool, crumbs: &[&str]) -> Meta {
        let mut m = Meta::initial(Slot::A, "1");
        m.a.security_version = 1;
        m.security_floor = 1;
        m.b = SlotRecord {
            state,
            version: "2".into(),
            armed,
            breadcrumbs: crumbs
                .iter()
                .map(|c| Breadcrumb::from(c.to_string()))
                .collect(),
            security_version: 2,
            ..SlotRecord::empty()
        };
        m
    }

    #[test]
    fn writing_a_slot_forgets_it_and_a_verified_image_is_pending_unarmed() {
        let mut m = with_b(SlotState::Good, false, &["committed"]);
        m.begin_write(Slot::B, "3");
        assert_eq!(m.b.state, SlotState::Writing);
        assert_eq!((m.b.version.as_str(), m.b.breadcrumbs.len()), ("3", 0));
        m.mark_written(Slot::B, &written("3", 4));
        assert_eq!(
            (m.b.state, m.b.armed, m.b.attempts, m.b.security_version),
            (SlotState::Pending, false, 0, 4)
        );
        // The floor moves only at a commit.
        assert_eq!(m.security_floor, 1);
        let mut again = m.clone();
        again.begin_write(Slot::B, "5");
        again.abandon_write(Slot::B);
        assert_eq!(again.b, SlotRecord::empty());
    }

    #[test]
    fn only_a_pending_slot_is_armed() {
        // (state of B, arm allowed)
        let table = [
            (SlotState::Empty, false),
            (SlotState::Writing, false),
            (SlotState::Pending, true),
            (SlotState::Trial, false),
            (SlotState::Good, false),
            (SlotState::Failed, false),
        ];
        for (state, ok) in table {
            let mut m = with_b(state, false, &[]);
            assert_eq!(m.arm(Slot::B).is_ok(), ok, "{state:?}");
            assert_eq!(m.b.armed, ok, "{state:?}");
        }
    }

    #[test]
    fn what_a_boot_is_follows_from_both_slots() {
        // (booted, B's state, B armed, B's crumbs, a trial?, B's state after, reason)
        type Row = (
            Slot,
            SlotState,
            bool,
            &'static [&'static str],
            bool,
            SlotState,
            Option<&'static str>,
        );
        let table: &[Row] = &[
            // B pending and armed, booted: its trial.
            (
                Slot::B,
                SlotState::Pending,
                true,
                &[],
                true,
                SlotState::Trial,
                None,
            ),
            // A trial that rebooted itself is tried again.
            (
                Slot::B,
                SlotState::Trial,
                false,
                &["machined started"],
                true,
                SlotState::Trial,
                None,
            ),
            // A booted while B was armed: B's initramfs never ran.
            (
                Slot::A,
                SlotState::Pending,
                true,
                &[],
                false,
                SlotState::Failed,
                Some(NEVER_STARTED),
            ),
            // ...or it ran and stopped.
            (
                Slot::A,
                SlotState::Pending,
                true,
                &["initramfs/findBootDisk", "initramfs/mapRoot"],
                false,
                SlotState::Failed,
                Some("failed before machined started: stopped in the initramfs after initramfs/mapRoot (a kernel panic, such as dm-verity finding a corrupted block, a hang or a reset)"),
            ),
            // A booted while B was on trial: B stopped after its last crumb.
            (
                Slot::A,
                SlotState::Trial,
                false,
                &["machined started", "boot/network"],
                false,
                SlotState::Failed,
                Some("stopped after boot/network (no further progress: hang, crash or reset)"),
            ),
            // B failed its gates and said why.
            (
                Slot::A,
                SlotState::Trial,
                false,
                &[
                    "machined started",
                    "failed: health gates not passed within 5s: services not healthy: web",
                ],
                false,
                SlotState::Failed,
                Some("health gates not passed within 5s: services not healthy: web"),
            ),
            // A staged upgrade (pending, not armed) has not failed.
            (
                Slot::A,
                SlotState::Pending,
                false,
                &[],
                false,
                SlotState::Pending,
                None,
            ),
            (
                Slot::A,
                SlotState::Good,
                false,
                &["committed"],
                false,
                SlotState::Good,
                None,
            ),
            (
                Slot::A,
                SlotState::Empty,
                false,
                &[],
                false,
                SlotState::Empty,
                None,
            ),
        ];
        for &(booted, state, armed, crumbs, trial, after, reason) in table {
            let mut m = with_b(state, armed, crumbs);
            let kind = m.on_boot(booted, "2", 77);
            assert_eq!(
                kind == BootKind::Trial,
                trial,
                "{booted} booted, B {state:?}"
            );
            assert_eq!(m.b.state, after, "{booted} booted, B {state:?}");
            match (kind, reason) {
                (BootKind::Normal(Some(f)), Some(r)) => {
                    assert_eq!((f.slot, f.reason.as_str(), f.unix_ms), (Slot::B, r, 77));
                    assert_eq!(m.last_failure, Some(f));
                    assert!(!m.b.armed);
                }
                (BootKind::Normal(None), None) | (BootKind::Trial, None) => {}
                (k, r) => panic!("{booted} booted, B {state:?}: {k:?}, expected {r:?}"),
            }
            if trial {
                assert_eq!(m.b.breadcrumbs.last(), Some(&Breadcrumb::Started));
            }
        }
    }

    #[test]
    fn a_failure_explained_later_replaces_only_that_slots_reason() {
        let mut m = with_b(SlotState::Pending, true, &[]);
        let Some(f) = (match m.on_boot(Slot::A, "1", 5) {
            BootKind::Normal(f) => f,
            BootKind::Trial => None,
        }) else {
            panic!("B's trial failed");
        };
        assert_eq!(f.reason, NEVER_STARTED);
        m.explain_failure(Slot::B, "refused by the firmware");
        assert_eq!(m.b.failure.as_deref(), Some("refused by the firmware"));
        assert_eq!(
            m.last_failure.as_ref().map(|f| f.reason.as_str()),
            Some("refused by the firmware")
        );
        m.explain_failure(Slot::A, "no");
        assert_eq!(m.a.failure, None, "A did not fail");
    }

    #[test]
    fn the_initramfs_records_only_trials_and_machined_keeps_what_it_recorded() {
        let crumbs =
            |m: &Meta| -> Vec<String> { m.b.breadcrumbs.iter().map(ToString::to_string).collect() };
        // Not a trial: nothing recorded.
        for (state, armed) in [
            (SlotState::Pending, false),
            (SlotState::Good, false),
            (SlotState::Failed, false),
        ] {
            let mut m = with_b(state, armed, &[]);
            m.initramfs_passed(Slot::B, "mapRoot");
            assert!(m.b.breadcrumbs.is_empty(), "{state:?}");
        }
        // The first attempt: the initramfs's crumbs, then machined's.
        let mut m = with_b(SlotState::Pending, true, &[]);
        m.initramfs_passed(Slot::B, "findBootDisk");
        m.initramfs_passed(Slot::B, "mapRoot");
        assert_eq!(m.on_boot(Slot::B, "2", 1), BootKind::Trial);
        assert_eq!(
            crumbs(&m),
            [
                "initramfs/findBootDisk",
                "initramfs/mapRoot",
                "machined started"
            ]
        );
        m.breadcrumb(
            Slot::B,
            Breadcrumb::Passed {
                sequence: "boot".into(),
                phase: "network".into(),
            },
        );
        // A retried attempt starts a fresh record.
        m.initramfs_passed(Slot::B, "findBootDisk");
        assert_eq!(crumbs(&m), ["initramfs/findBootDisk"]);
        assert_eq!(m.on_boot(Slot::B, "2", 2), BootKind::Trial);
        assert_eq!(crumbs(&m), ["initramfs/findBootDisk", "machined started"]);
        assert_eq!(m.b.attempts, 2);
    }

    #[test]
    fn a_commit_makes_the_slot_good_and_first_and_raises_the_floor_only() {
        let mut m = with_b(SlotState::Trial, false, &["machined started"]);
        m.commit(Slot::B);
        assert_eq!(
            (m.committed, m.b.state, m.security_floor),
            (Slot::B, SlotState::Good, 2)
        );
        assert_eq!(m.b.breadcrumbs.last(), Some(&Breadcrumb::Committed));
        // Committing a slot with a lower security version never lowers it.
        m.a.security_version = 0;
        m.commit(Slot::A);
        assert_eq!((m.committed, m.security_floor), (Slot::A, 2));
    }

    #[test]
    fn rollback_goes_only_to_a_good_slot() {
        for (state, ok) in [
            (SlotState::Good, true),
            (SlotState::Failed, false),
            (SlotState::Pending, false),
            (SlotState::Writing, false),
            (SlotState::Empty, false),
        ] {
            let mut m = with_b(state, false, &[]);
            assert_eq!(m.rollback(Slot::B).is_ok(), ok, "{state:?}");
            assert_eq!(m.committed, if ok { Slot::B } else { Slot::A });
        }
    }

    #[test]
    fn breadcrumbs_are_strings_on_disk_and_read_back_typed() {
        let crumbs = vec![
            Breadcrumb::Started,
            Breadcrumb::Passed {
                sequence: "boot".into(),
                phase: "network".into(),
            },
            Breadcrumb::Failed("gates".into()),
            Breadcrumb::Committed,
        ];
        let json = serde_json::to_string(&crumbs).expect("json");
        assert_eq!(
            json,
            r#"["machined started","boot/network","failed: gates","committed"]"#
        );
        let back: Vec<Breadcrumb> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, crumbs);
    }
}
