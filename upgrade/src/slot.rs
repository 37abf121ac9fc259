//! The two slots.

use std::fmt;
use std::str::FromStr;

/// One of the two A/B slots.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Slot {
    /// Slot A: `ROOT-A`, `\EFI\plinth\A.efi`.
    A,
    /// Slot B: `ROOT-B`, `\EFI\plinth\B.efi`.
    B,
}

impl Slot {
    /// Both slots.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// GPT partition name of the slot's root image.
    pub fn root_label(self) -> &'static str {
        match self {
            Slot::A => "ROOT-A",
            Slot::B => "ROOT-B",
        }
    }

    /// Path of the slot's UKI on the ESP, as the firmware spells it.
    pub fn uki_path(self) -> &'static str {
        match self {
            Slot::A => "\\EFI\\plinth\\A.efi",
            Slot::B => "\\EFI\\plinth\\B.efi",
        }
    }

    /// The slot named by the kernel command line (`plinth.slot=A`), if any.
    pub fn from_cmdline(cmdline: &str) -> Option<Slot> {
        cmdline
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("plinth.slot="))
            .and_then(|v| v.parse().ok())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A slot name that is neither A nor B.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a slot (expected A or B)")]
pub struct BadSlot(pub String);

impl FromStr for Slot {
    type Err = BadSlot;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            other => Err(BadSlot(other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_the_slot() {
        assert_eq!(
            Slot::from_cmdline("console=ttyS0 plinth.slot=B panic=1"),
            Some(Slot::B)
        );
        assert_eq!(Slot::from_cmdline("console=ttyS0"), None);
        assert_eq!(Slot::from_cmdline("plinth.slot=C"), None);
    }

    #[test]
    fn each_slot_has_its_own_partition_and_uki() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.root_label(), "ROOT-B");
        assert_eq!(Slot::A.uki_path(), "\\EFI\\plinth\\A.efi");
    }
}
