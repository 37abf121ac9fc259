//! The system disk's partition table.
//!
//! | # | label | size | type |
//! |---|---|---|---|
//! | 1 | `EFI` | 256 MiB | EFI System Partition |
//! | 2 | `META` | 1 MiB | Plinth META (raw) |
//! | 3 | `ROOT-A` | slot size | Discoverable Partitions: root (x86-64) |
//! | 4 | `ROOT-B` | slot size | Discoverable Partitions: root (x86-64) |
//! | 5 | `STATE` | 100 MiB | Linux filesystem (ext4) |
//! | 6 | `EPHEMERAL` | rest | Discoverable Partitions: `/var` (ext4) |
//!
//! Partitions are 1 MiB aligned. The type GUIDs follow the Discoverable Partitions
//! Specification where one fits, so other tools recognise the partitions' roles.

use std::io::{Read, Seek, SeekFrom, Write};

use gpt::partition_types::{OperatingSystem, Type};
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;

/// How big a partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A fixed size in bytes.
    Fixed(u64),
    /// The slot size chosen when the disk is made.
    Slot,
    /// Whatever is left at the end of the disk.
    Rest,
}

/// One row of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpec {
    /// GPT partition name.
    pub label: &'static str,
    /// GPT partition type GUID.
    pub type_guid: Uuid,
    /// Size.
    pub size: Size,
}

/// EFI System Partition.
pub const TYPE_ESP: Uuid = Uuid::from_u128(0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b);
/// Plinth's META partition (a type of our own: nothing else should touch it).
pub const TYPE_META: Uuid = Uuid::from_u128(0x8f1a2c5e_3b7d_4e61_9a0c_5d2b7e4f6a13);
/// Discoverable Partitions: root file system for x86-64.
pub const TYPE_ROOT_X86_64: Uuid = Uuid::from_u128(0x4f68bce3_e8cd_4db1_96e7_fbcaf984b709);
/// Linux filesystem data.
pub const TYPE_LINUX_FS: Uuid = Uuid::from_u128(0x0fc63daf_8483_4772_8e79_3d69d8477de4);
/// Discoverable Partitions: `/var`.
pub const TYPE_VAR: Uuid = Uuid::from_u128(0x4d21b016_b534_45c2_a9fb_5c16e091fd2d);

/// Label of the ESP.
pub const LABEL_ESP: &str = "EFI";
/// Label of META.
pub const LABEL_META: &str = "META";
/// Label of STATE.
pub const LABEL_STATE: &str = "STATE";
/// Label of EPHEMERAL.
pub const LABEL_EPHEMERAL: &str = "EPHEMERAL";
/// The installer media's partition holding the signed bundle to install (raw bytes).
pub const LABEL_INSTALL: &str = "INSTALL";

/// The layout of every Plinth system disk, in partition-number order.
pub const LAYOUT: [PartitionSpec; 6] = [
    PartitionSpec {
        label: LABEL_ESP,
        type_guid: TYPE_ESP,
        size: Size::Fixed(256 * MIB),
    },
    PartitionSpec {
        label: LABEL_META,
        type_guid: TYPE_META,
        size: Size::Fixed(MIB),
    },
    PartitionSpec {
        label: "ROOT-A",
        type_guid: TYPE_ROOT_X86_64,
        size: Size::Slot,
    },
    PartitionSpec {
        label: "ROOT-B",
        type_guid: TYPE_ROOT_X86_64,
        size: Size::Slot,
    },
    PartitionSpec {
        label: LABEL_STATE,
        type_guid: TYPE_LINUX_FS,
        size: Size::Fixed(100 * MIB),
    },
    PartitionSpec {
        label: LABEL_EPHEMERAL,
        type_guid: TYPE_VAR,
        size: Size::Rest,
    },
];

/// A partition found on (or written to) a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPartition {
    /// 1-based partition number (the `N` in `/dev/nvme0n1pN`).
    pub number: u32,
    /// GPT partition name.
    pub label: String,
    /// Type GUID.
    pub type_guid: Uuid,
    /// Unique partition GUID.
    pub guid: Uuid,
    /// First byte on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DiskPartition {
    /// First sector (512 bytes).
    pub fn first_lba(&self) -> u64 {
        self.offset / SECTOR
    }

    /// Length in sectors (512 bytes).
    pub fn sectors(&self) -> u64 {
        self.len / SECTOR
    }
}

/// Reading or writing a partition table failed.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The GPT could not be read or written.
    #[error("{what}: {source}")]
    Gpt {
        /// What was being done.
        what: String,
        /// The gpt crate's error.
        #[source]
        source: gpt::GptError,
    },
    /// The disk is too small for the layout.
    #[error("a disk of {disk_bytes} bytes is too small for the layout with {slot_bytes}-byte slots (needs at least {needed_bytes})")]
    TooSmall {
        /// Disk size.
        disk_bytes: u64,
        /// Slot size asked for.
        slot_bytes: u64,
        /// Minimum disk size.
        needed_bytes: u64,
    },
    /// A size that is not a whole number of MiB.
    #[error("slot size {0} is not a positive multiple of 1 MiB")]
    BadSlotSize(u64),
    /// An I/O error on the disk.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The smallest disk that holds the layout with slots of `slot_bytes` (EPHEMERAL gets 64 MiB).
pub fn min_disk_bytes(slot_bytes: u64) -> u64 {
    let fixed: u64 = LAYOUT
        .iter()
        .map(|p| match p.size {
            Size::Fixed(b) => b,
            Size::Slot => slot_bytes,
            Size::Rest => 64 * MIB,
        })
        .sum();
    // 1 MiB in front for the GPT and alignment, 1 MiB behind for the backup GPT.
    fixed + 2 * MIB
}

/// Plans where each partition goes on a disk of `disk_bytes`.
pub fn plan(disk_bytes: u64, slot_bytes: u64) -> Result<Vec<DiskPartition>, LayoutError> {
    if slot_bytes == 0 || !slot_bytes.is_multiple_of(MIB) {
        return Err(LayoutError::BadSlotSize(slot_bytes));
    }
    let needed = min_disk_bytes(slot_bytes);
    if disk_bytes < needed {
        return Err(LayoutError::TooSmall {
            disk_bytes,
            slot_bytes,
            needed_bytes: needed,
        });
    }
    // The backup GPT takes the last 33 sectors; keep the tail 1 MiB aligned and free.
    let end = (disk_bytes / MIB) * MIB - MIB;
    let mut offset = MIB;
    let mut out = Vec::with_capacity(LAYOUT.len());
    for (i, spec) in LAYOUT.iter().enumerate() {
        let len = match spec.size {
            Size::Fixed(b) => b,
            Size::Slot => slot_bytes,
            Size::Rest => end - offset,
        };
        out.push(DiskPartition {
            number: i as u32 + 1,
            label: spec.label.into(),
            type_guid: spec.type_guid,
            guid: Uuid::new_v4(),
            offset,
            len,
        });
        offset += len;
    }
    Ok(out)
}

/// Writes a fresh GPT (and protective MBR) with the planned partitions to `device`, which must
/// be `disk_bytes` long. Nothing but the partition table is written.
pub fn write_table<D: Read + Write + Seek + std::fmt::Debug>(
    device: &mut D,
    disk_bytes: u64,
    partitions: &[DiskPartition],
) -> Result<(), LayoutError> {
    let gpt_err = |what: &str| {
        let what = what.to_string();
        move |source| LayoutError::Gpt { what, source }
    };
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(disk_bytes / SECTOR - 1).unwrap_or(0xffff_ffff),
    );
    mbr.overwrite_lba0(device).map_err(|e| LayoutError::Io {
        what: "writing the protective MBR".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(device, None)
        .map_err(gpt_err("creating the GPT headers"))?;
    let table = partitions
        .iter()
        .map(|p| {
            (
                p.number,
                gpt::partition::Partition {
                    part_type_guid: Type {
                        guid: p.type_guid,
                        os: OperatingSystem::None,
                    },
                    part_guid: p.guid,
                    first_lba: p.first_lba(),
                    last_lba: p.first_lba() + p.sectors() - 1,
                    flags: 0,
                    name: p.label.clone(),
                },
            )
        })
        .collect();
    disk.update_partitions(table)
        .map_err(gpt_err("placing the partitions"))?;
    disk.write().map_err(gpt_err("writing the GPT"))?;
    Ok(())
}

/// Enough to read a whole table of 128 entries (16 KiB) at once.
const GPT_READ_BUFFER: usize = 32 * 1024;

/// The partitions of the GPT on `device` (empty entries left out), in number order.
pub fn read_table<D: Read + Seek + std::fmt::Debug>(
    device: &mut D,
) -> Result<Vec<DiskPartition>, LayoutError> {
    device
        .seek(SeekFrom::Start(0))
        .map_err(|source| LayoutError::Io {
            what: "seeking to the start of the disk".into(),
            source,
        })?;
    // The gpt crate reads the 128 entries of each table one by one: buffered, that is a
    // few reads of the device instead of hundreds of system calls (tens of milliseconds at
    // boot under TCG).
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(ReadOnly(std::io::BufReader::with_capacity(
            GPT_READ_BUFFER,
            device,
        )))
        .map_err(|source| LayoutError::Gpt {
            what: "reading the GPT".into(),
            source,
        })?;
    Ok(disk
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| DiskPartition {
            number: *n,
            label: p.name.clone(),
            type_guid: p.part_type_guid.guid,
            guid: p.part_guid,
            offset: p.first_lba * SECTOR,
            len: (p.last_lba + 1).saturating_sub(p.first_lba) * SECTOR,
        })
        .collect())
}

/// Lets a read-only device stand where the gpt crate asks for a writable one; the GPT is opened
/// with `writable(false)`, so a write never happens, and if one did it fails.
#[derive(Debug)]
struct ReadOnly<D>(D);

impl<D: Read> Read for ReadOnly<D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<D: Seek> Seek for ReadOnly<D> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<D> Write for ReadOnly<D> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("device opened read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * MIB;

    #[test]
    fn the_plan_follows_the_layout_aligned_and_without_overlap() {
        let parts = plan(2 * GIB, 256 * MIB).expect("plan");
        let labels: Vec<&str> = parts.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            ["EFI", "META", "ROOT-A", "ROOT-B", "STATE", "EPHEMERAL"]
        );
        for w in parts.windows(2) {
            assert_eq!(w[0].offset + w[0].len, w[1].offset);
        }
        assert!(parts
            .iter()
            .all(|p| p.offset % MIB == 0 && p.len % MIB == 0));
        let last = parts.last().expect("parts");
        assert!(last.offset + last.len <= 2 * GIB - MIB);
    }

    #[test]
    fn a_disk_too_small_for_the_slots_is_refused_with_the_sizes() {
        let err = plan(512 * MIB, 256 * MIB).expect_err("too small");
        assert!(matches!(err, LayoutError::TooSmall { .. }), "{err}");
        assert!(err.to_string().contains("too small"));
    }

    #[test]
    fn a_written_table_reads_back_with_labels_types_and_guids() {
        let mut disk = std::io::Cursor::new(vec![0u8; (1200 * MIB) as usize]);
        let parts = plan(1200 * MIB, 128 * MIB).expect("plan");
        write_table(&mut disk, 1200 * MIB, &parts).expect("write");
        let read = read_table(&mut disk).expect("read");
        assert_eq!(read, parts);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut disk = std::io::Cursor::new(vec![0xa5u8; (4 * MIB) as usize]);
        assert!(read_table(&mut disk).is_err());
    }
}
