//! One boot entry per slot, reconciled on every boot.
//!
//! [`plan`] is pure: from the entries and `BootOrder` the firmware has now, and the slots the
//! node wants bootable, it decides which entries to keep, create and delete and what `BootOrder`
//! becomes. [`apply`] then writes it in an order that is safe at every step: new entries first,
//! then `BootOrder` (which only ever names entries that exist), then deletions. A power cut
//! between steps leaves extra entries at worst, never a `BootOrder` without a bootable slot.
//!
//! Rules: a slot's entry is the lowest-numbered active entry booting exactly its UKI on this
//! ESP; other entries for the same file (duplicates) and entries carrying a slot's description
//! but pointing elsewhere (an old install) are deleted; the firmware's own entries are left
//! alone and keep their relative order after ours.

use uuid::Uuid;

use crate::boot_vars::BootVarError;
use crate::efivarfs::VarStore;
use crate::load_option::LoadOption;

/// Where the ESP is (what a `HD(...)` node says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Esp {
    /// Partition number.
    pub partition_number: u32,
    /// Unique partition GUID.
    pub partition_guid: Uuid,
    /// First LBA.
    pub start_lba: u64,
    /// Size in LBAs.
    pub size_lba: u64,
}

/// A slot that should have an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Entry description ("Plinth A").
    pub description: String,
    /// UKI path on the ESP (`\EFI\plinth\A.efi`).
    pub path: String,
    /// Whether the firmware may boot it on its own (in `BootOrder`); a slot on trial is
    /// reached through `BootNext` only.
    pub in_order: bool,
}

/// What to change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Entries to write: (number, option).
    pub create: Vec<(u16, LoadOption)>,
    /// The new `BootOrder`.
    pub order: Vec<u16>,
    /// Entries to delete.
    pub delete: Vec<u16>,
    /// The entry of each wanted slot, in the order given.
    pub entries: Vec<u16>,
}

impl Plan {
    /// Whether applying it changes nothing.
    pub fn is_noop(&self, current_order: &[u16]) -> bool {
        self.create.is_empty() && self.delete.is_empty() && self.order == current_order
    }
}

fn same_path(a: &str, b: &str) -> bool {
    // FAT is case-insensitive; firmware and tools disagree on case.
    a.eq_ignore_ascii_case(b)
}

/// Whether `option` boots `path` on `esp`.
fn boots(option: &LoadOption, esp: &Esp, path: &str) -> bool {
    let hd = option.file_path_list.hard_drive();
    hd.and_then(|h| h.partition_guid()) == Some(esp.partition_guid)
        && option
            .file_path_list
            .file_path()
            .is_some_and(|p| same_path(p, path))
}

/// Decides the entries and `BootOrder` for `wanted` (first = committed slot). Entries of
/// `retired` slots (being rewritten, or empty) are deleted: the firmware must never fall back
/// into a slot whose image is not whole. Entries that could not be read (`unreadable`) are left
/// alone: their numbers are not reused and they keep their place in `BootOrder` after ours.
pub fn plan(
    existing: &[(u16, LoadOption)],
    unreadable: &[u16],
    order: &[u16],
    esp: &Esp,
    wanted: &[Wanted],
    retired: &[Wanted],
) -> Plan {
    let mut plan = Plan::default();
    let mut used: Vec<u16> = existing.iter().map(|(n, _)| *n).collect();
    used.extend_from_slice(unreadable);
    for w in wanted {
        let mut matching: Vec<u16> = existing
            .iter()
            .filter(|(_, o)| o.is_active() && boots(o, esp, &w.path))
            .map(|(n, _)| *n)
            .collect();
        matching.sort_unstable();
        let number = match matching.first() {
            Some(n) => {
                plan.delete.extend(matching.iter().skip(1).copied());
                *n
            }
            None => {
                let n = (0..=u16::MAX)
                    .find(|n| !used.contains(n))
                    .unwrap_or(u16::MAX);
                used.push(n);
                let option = LoadOption::for_esp_file(
                    &w.description,
                    esp.partition_number,
                    esp.partition_guid,
                    esp.start_lba,
                    esp.size_lba,
                    &w.path,
                );
                plan.create.push((n, option));
                n
            }
        };
        plan.entries.push(number);
        // Stale: our description, but not this entry (another disk, an inactive copy, ...).
        for (n, o) in existing {
            if *n != number
                && o.description.to_string_lossy() == w.description
                && !plan.delete.contains(n)
            {
                plan.delete.push(*n);
            }
        }
    }
    for r in retired {
        for (n, o) in existing {
            let theirs = boots(o, esp, &r.path) || o.description.to_string_lossy() == r.description;
            if theirs && !plan.entries.contains(n) && !plan.delete.contains(n) {
                plan.delete.push(*n);
            }
        }
    }
    let ours: Vec<u16> = plan.entries.clone();
    plan.order = wanted
        .iter()
        .zip(&plan.entries)
        .filter(|(w, _)| w.in_order)
        .map(|(_, n)| *n)
        .collect();
    plan.order.extend(
        order
            .iter()
            .copied()
            .filter(|n| !ours.contains(n) && !plan.delete.contains(n))
            .filter(|n| existing.iter().any(|(m, _)| m == n) || unreadable.contains(n)),
    );
    plan.delete.sort_unstable();
    plan.delete.dedup();
    plan
}

/// Writes a plan: creations, then `BootOrder`, then deletions.
pub fn apply(vars: &VarStore, plan: &Plan) -> Result<(), BootVarError> {
    for (n, o) in &plan.create {
        vars.set_boot_entry(*n, o)?;
    }
    vars.set_boot_order(&plan.order)?;
    for n in &plan.delete {
        vars.delete_boot_entry(*n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::uuid;

    const GUID: Uuid = uuid!("dcad3259-41e5-41a9-9bcb-d1ff211ed9f6");
    const ESP: Esp = Esp {
        partition_number: 1,
        partition_guid: GUID,
        start_lba: 0x800,
        size_lba: 0x28000,
    };

    fn wanted(a_first: bool, other_in_order: bool) -> Vec<Wanted> {
        let a = Wanted {
            description: "Plinth A".into(),
            path: "\\EFI\\plinth\\A.efi".into(),
            in_order: true,
        };
        let b = Wanted {
            description: "Plinth B".into(),
            path: "\\EFI\\plinth\\B.efi".into(),
            in_order: other_in_order,
        };
        if a_first {
            vec![a, b]
        } else {
            vec![
                Wanted {
                    in_order: true,
                    ..b
                },
                Wanted {
                    in_order: other_in_order,
                    ..a
                },
            ]
        }
    }

    fn entry(desc: &str, path: &str) -> LoadOption {
        LoadOption::for_esp_file(desc, 1, GUID, 0x800, 0x28000, path)
    }

    fn firmware() -> LoadOption {
        let mut o = entry("UEFI QEMU NVMe", "x");
        o.file_path_list.nodes.clear();
        o
    }

    #[test]
    fn a_blank_store_gets_both_entries_committed_first_and_firmware_entries_after() {
        let existing = vec![(0, firmware()), (2, firmware())];
        let p = plan(&existing, &[], &[0, 2], &ESP, &wanted(true, false), &[]);
        assert_eq!(p.create.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(p.entries, [1, 3]);
        // B is not in BootOrder: only BootNext may boot it.
        assert_eq!(p.order, [1, 0, 2]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn existing_entries_are_reused_and_the_plan_is_a_no_op() {
        let existing = vec![
            (9, entry("Plinth A", "\\EFI\\plinth\\A.efi")),
            (10, entry("Plinth B", "\\EFI\\plinth\\B.efi")),
            (0, firmware()),
        ];
        let p = plan(&existing, &[], &[9, 10, 0], &ESP, &wanted(true, true), &[]);
        assert!(p.is_noop(&[9, 10, 0]), "{p:?}");
    }

    #[test]
    fn duplicates_and_stale_entries_are_deleted_and_the_lowest_kept() {
        let existing = vec![
            (12, entry("Plinth A", "\\EFI\\plinth\\A.efi")),
            (9, entry("Plinth A", "\\efi\\PLINTH\\a.efi")),
            (10, entry("Plinth B", "\\EFI\\plinth\\B.efi")),
            (
                11,
                LoadOption::for_esp_file(
                    "Plinth B",
                    1,
                    Uuid::nil(),
                    0x800,
                    0x28000,
                    "\\EFI\\plinth\\B.efi",
                ),
            ),
        ];
        let p = plan(
            &existing,
            &[],
            &[12, 9, 11, 10],
            &ESP,
            &wanted(false, true),
            &[],
        );
        assert_eq!(p.entries, [10, 9]);
        assert_eq!(p.delete, [11, 12]);
        assert_eq!(p.order, [10, 9]);
    }

    #[test]
    fn committing_b_puts_it_first_and_keeps_a_as_the_fallback() {
        let existing = vec![
            (9, entry("Plinth A", "\\EFI\\plinth\\A.efi")),
            (10, entry("Plinth B", "\\EFI\\plinth\\B.efi")),
            (0, firmware()),
        ];
        let p = plan(&existing, &[], &[9, 0], &ESP, &wanted(false, true), &[]);
        assert_eq!(p.order, [10, 9, 0]);
    }

    #[test]
    fn a_slot_being_rewritten_loses_its_entry_and_its_place_in_boot_order() {
        let existing = vec![
            (9, entry("Plinth A", "\\EFI\\plinth\\A.efi")),
            (10, entry("Plinth B", "\\EFI\\plinth\\B.efi")),
            (0, firmware()),
        ];
        let w = wanted(true, true);
        let p = plan(&existing, &[], &[9, 10, 0], &ESP, &w[..1], &w[1..]);
        assert_eq!(p.delete, [10]);
        assert_eq!(p.order, [9, 0]);
    }

    #[test]
    fn the_created_entry_is_byte_for_byte_what_efibootmgr_writes() {
        let p = plan(&[], &[], &[], &ESP, &wanted(true, false), &[]);
        let a = p.create[0].1.encode().expect("encode");
        let fixture = include_bytes!("../tests/data/ovmf-efivars/after-efibootmgr-create/Boot0009-8be4df61-93ca-11d2-aa0d-00e098032b8c");
        assert_eq!(a, fixture[4..]);
    }

    #[test]
    fn applying_a_plan_to_a_store_gives_what_it_says() {
        let dir = tempfile::tempdir().expect("tmp");
        let vars = VarStore::new(dir.path());
        let p = plan(&[], &[], &[], &ESP, &wanted(true, true), &[]);
        apply(&vars, &p).expect("apply");
        assert_eq!(vars.boot_order().expect("order"), p.order);
        let entries = vars.boot_entries().expect("entries");
        let again = plan(&entries, &[], &p.order, &ESP, &wanted(true, true), &[]);
        assert!(again.is_noop(&p.order), "{again:?}");
    }

    #[test]
    fn an_unreadable_entry_keeps_its_number_and_its_place_after_ours() {
        // Boot0001 could not be decoded; it is first in BootOrder.
        let p = plan(&[], &[1], &[1], &ESP, &wanted(true, false), &[]);
        let created: Vec<u16> = p.create.iter().map(|(n, _)| *n).collect();
        assert!(!created.contains(&1), "reused its number: {created:?}");
        assert_eq!(p.order.first(), Some(&p.entries[0]), "ours first");
        assert_eq!(p.order.last(), Some(&1), "it keeps its place after ours");
        assert!(p.delete.is_empty());
    }
}
