//! Which signed bundles a node takes: never one below its security floor or past its expiry;
//! a lower version at the same security version only when the operator says so.
//!
//! A valid signature says who built a bundle, not that it is still safe to run: an old,
//! validly signed release with a known hole must not be installable again (the rollback
//! protection of TUF and Android Verified Boot). The floor is the highest security version the
//! node ever committed, kept in META; it only rises.

use std::cmp::Ordering;

use crate::bundle::Manifest;

/// Why a bundle is refused before a byte of it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Below the floor: refused, no override.
    #[error("bundle {version} has security version {bundle}, below this node's floor {floor} (the highest security version it has committed); a bundle below the floor is never installed")]
    BelowFloor {
        /// The bundle's version string.
        version: String,
        /// Its security version.
        bundle: u64,
        /// The node's floor.
        floor: u64,
    },
    /// Past its expiry.
    #[error("bundle {version} expired at {expires} (seconds since the epoch; the node's clock says {now})")]
    Expired {
        /// The bundle's version string.
        version: String,
        /// When it expired.
        expires: u64,
        /// The node's clock.
        now: u64,
    },
    /// A lower version string at the same security version, without the operator's say-so.
    #[error("bundle {bundle} is older than the running {running}: pass --allow-downgrade to install it (security version {security_version} is the same, so it is allowed)")]
    Downgrade {
        /// The bundle's version.
        bundle: String,
        /// The running version.
        running: String,
        /// The shared security version.
        security_version: u64,
    },
    /// The caller pinned another bundle.
    #[error("the bundle's digest is {actual}, not the expected {expected}")]
    NotExpected {
        /// What the caller pinned.
        expected: String,
        /// What came.
        actual: String,
    },
}

/// What the node knows when it judges a bundle.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// META's security floor.
    pub floor: u64,
    /// The running version and its security version.
    pub running: (&'a str, u64),
    /// Seconds since the epoch.
    pub now_s: u64,
    /// The operator allows a lower version at the same security version.
    pub allow_downgrade: bool,
}

/// Whether `node` takes the bundle `m` (whose signature has been checked).
pub fn admit(m: &Manifest, node: &Node<'_>) -> Result<(), PolicyError> {
    if m.security_version < node.floor {
        return Err(PolicyError::BelowFloor {
            version: m.version.clone(),
            bundle: m.security_version,
            floor: node.floor,
        });
    }
    if let Some(expires) = m.expires_unix_s {
        if node.now_s > expires {
            return Err(PolicyError::Expired {
                version: m.version.clone(),
                expires,
                now: node.now_s,
            });
        }
    }
    let (running, running_sv) = node.running;
    if m.security_version <= running_sv
        && compare_versions(&m.version, running) == Ordering::Less
        && !node.allow_downgrade
    {
        return Err(PolicyError::Downgrade {
            bundle: m.version.clone(),
            running: running.into(),
            security_version: m.security_version,
        });
    }
    Ok(())
}

/// Orders version strings the way people read them: runs of digits as numbers, the rest as
/// text, piece by piece (`1.10` after `1.9`, `1.0-rc1` before `1.0-rc2`); a version that is
/// a prefix of another comes first.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn pieces(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for (x, y) in pa.iter().zip(&pb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str, sv: u64, expires: Option<u64>) -> Manifest {
        Manifest {
            format: crate::bundle::FORMAT,
            version: version.into(),
            arch: "x86_64".into(),
            root_verity: crate::verity::VerityRoot {
                data_size: 4096,
                root: String::new(),
                salt: String::new(),
            },
            security_version: sv,
            expires_unix_s: expires,
            extension_level: 1,
            components: vec![],
        }
    }

    #[test]
    fn versions_order_as_people_read_them() {
        use Ordering::*;
        let table = [
            ("1.9", "1.10", Less),
            ("1.10", "1.9", Greater),
            ("1.0", "1.0", Equal),
            ("1.0", "1.0.1", Less),
            ("1.0-rc1", "1.0-rc2", Less),
            ("2.0-sim", "1.0-sim", Greater),
            ("0.1.0-7-gabc", "0.1.0-12-gabc", Less),
            ("01.2", "1.2", Equal),
        ];
        for (a, b, want) in table {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn the_floor_the_expiry_and_downgrades_decide_as_written() {
        let node = |floor, allow| Node {
            floor,
            running: ("2.0", 5),
            now_s: 1000,
            allow_downgrade: allow,
        };
        // (bundle version, security version, expiry, floor, allow downgrade, refusal)
        type Row = (
            &'static str,
            u64,
            Option<u64>,
            u64,
            bool,
            Option<&'static str>,
        );
        let table: &[Row] = &[
            ("3.0", 6, None, 5, false, None),
            ("3.0", 5, None, 5, false, None),
            ("2.0", 5, None, 5, false, None),
            // Below the floor: no override.
            ("3.0", 4, None, 5, false, Some("BelowFloor")),
            ("3.0", 4, None, 5, true, Some("BelowFloor")),
            // A lower version at the same security version needs the operator's word.
            ("1.9", 5, None, 5, false, Some("Downgrade")),
            ("1.9", 5, None, 5, true, None),
            // A lower version string with a higher security version is not a downgrade.
            ("1.9", 6, None, 5, false, None),
            ("3.0", 6, Some(999), 5, false, Some("Expired")),
            ("3.0", 6, Some(1000), 5, false, None),
        ];
        for &(v, sv, exp, floor, allow, want) in table {
            let got = admit(&manifest(v, sv, exp), &node(floor, allow)).err();
            let kind = got.as_ref().map(|e| match e {
                PolicyError::BelowFloor { .. } => "BelowFloor",
                PolicyError::Expired { .. } => "Expired",
                PolicyError::Downgrade { .. } => "Downgrade",
                PolicyError::NotExpected { .. } => "NotExpected",
            });
            assert_eq!(
                kind, want,
                "{v} sv {sv} exp {exp:?} floor {floor} allow {allow}: {got:?}"
            );
        }
    }
}
