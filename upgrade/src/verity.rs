//! The dm-verity hash tree of a root image, as the kernel's `verity` target reads it.
//!
//! A slot's partition holds the SquashFS image (padded to whole 4 KiB blocks), then its hash
//! tree: format 1 (`veritysetup`'s default), SHA-256, 4 KiB data and hash blocks, the salt
//! prepended to every hashed block, no superblock, the top level first. The UKI's command line
//! carries the data size, the salt and the root hash ([`VerityRoot::cmdline_args`]); the
//! signature over the UKI therefore covers the whole root, and the kernel checks every block
//! as it is read, for as long as the node runs.
//!
//! Written here rather than by running `veritysetup` because the node needs it too: the slot
//! write recomputes the tree from what is on the disk and compares it with the tree the bundle
//! brought and the root hash the UKI pins. A unit test checks the tree byte for byte against
//! `veritysetup format` (cryptsetup-bin).

use std::io::Read;

use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const DIGEST: usize = 32;
/// Digests per hash block.
const FANOUT: usize = BLOCK as usize / DIGEST;

/// What pins a root image: the command line's `plinth.root.size`, `plinth.root.verity` and
/// `plinth.root.salt`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityRoot {
    /// Bytes of data (whole blocks); the hash tree starts right after them.
    pub data_size: u64,
    /// The root hash, hex.
    pub root: String,
    /// The salt, hex.
    pub salt: String,
}

/// A root image's hash tree could not be made, or does not match.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The command line does not pin a verity root.
    #[error("the kernel command line does not pin the root image ({0} is missing or malformed)")]
    NotPinned(&'static str),
    /// The data is not whole blocks.
    #[error("the root image's data is {0} bytes, not a whole number of 4096-byte blocks")]
    NotBlocks(u64),
    /// Reading failed or the image ended early.
    #[error("reading the root image: {0}")]
    Read(#[source] std::io::Error),
    /// The stored tree is not the tree of the data.
    #[error("the hash tree on the disk is not the data's ({0})")]
    TreeMismatch(String),
    /// The data's root hash is not the pinned one.
    #[error("the root image's verity root hash is {actual}, the UKI pins {expected}")]
    RootMismatch {
        /// Pinned.
        expected: String,
        /// Computed.
        actual: String,
    },
}

impl VerityRoot {
    /// Data blocks.
    pub fn data_blocks(&self) -> u64 {
        self.data_size / BLOCK
    }

    /// Bytes of hash tree after the data.
    pub fn tree_size(&self) -> u64 {
        tree_blocks(self.data_blocks()).saturating_mul(BLOCK)
    }

    /// Data and tree: the partition image's size (saturating: a manifest may claim anything).
    pub fn image_size(&self) -> u64 {
        self.data_size.saturating_add(self.tree_size())
    }

    /// The kernel command-line arguments that pin this root.
    pub fn cmdline_args(&self) -> [String; 3] {
        [
            format!("plinth.root.size={}", self.data_size),
            format!("plinth.root.verity={}", self.root),
            format!("plinth.root.salt={}", self.salt),
        ]
    }

    /// The pinned root on a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Result<VerityRoot, VerityError> {
        let param = |name: &'static str| {
            cmdline
                .split_whitespace()
                .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .ok_or(VerityError::NotPinned(name))
        };
        let data_size: u64 = param("plinth.root.size")?
            .parse()
            .map_err(|_| VerityError::NotPinned("plinth.root.size"))?;
        if data_size == 0 || !data_size.is_multiple_of(BLOCK) {
            return Err(VerityError::NotPinned("plinth.root.size"));
        }
        let hex = |name: &'static str| -> Result<String, VerityError> {
            let v = param(name)?.to_ascii_lowercase();
            let ok = v.len() == 2 * DIGEST && v.chars().all(|c| c.is_ascii_hexdigit());
            ok.then_some(v).ok_or(VerityError::NotPinned(name))
        };
        Ok(VerityRoot {
            data_size,
            root: hex("plinth.root.verity")?,
            salt: hex("plinth.root.salt")?,
        })
    }

    /// The salt's bytes.
    pub fn salt_bytes(&self) -> Vec<u8> {
        from_hex(&self.salt)
    }

    /// The device-mapper table parameters for a `verity` target reading data and tree from the
    /// same device (`MAJ:MIN`), with `options` (e.g. `panic_on_corruption`).
    pub fn table_params(&self, device: &str, options: &[&str]) -> String {
        let blocks = self.data_blocks();
        let mut p = format!(
            "1 {device} {device} {BLOCK} {BLOCK} {blocks} {blocks} sha256 {} {}",
            self.root, self.salt
        );
        if !options.is_empty() {
            p.push_str(&format!(" {} {}", options.len(), options.join(" ")));
        }
        p
    }
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hash blocks per level for `data_blocks`, bottom level first (none for a single block).
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(FANOUT as u64);
        sizes.push(n);
    }
    sizes
}

/// Hash blocks in the tree of `data_blocks` blocks.
pub fn tree_blocks(data_blocks: u64) -> u64 {
    level_sizes(data_blocks).iter().sum()
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Builds a tree from data blocks fed in order.
pub struct TreeBuilder {
    salt: Vec<u8>,
    leaves: Vec<u8>,
    blocks: u64,
}

impl TreeBuilder {
    /// A tree with `salt`.
    pub fn new(salt: &[u8]) -> Self {
        TreeBuilder {
            salt: salt.to_vec(),
            leaves: Vec::new(),
            blocks: 0,
        }
    }

    /// Hashes whole blocks (`data.len()` a multiple of [`BLOCK`]).
    pub fn update(&mut self, data: &[u8]) {
        for block in data.chunks(BLOCK as usize) {
            self.leaves.extend_from_slice(&salted(&self.salt, block));
            self.blocks += 1;
        }
    }

    /// The hash area (top level first, as the kernel reads it) and the root hash.
    pub fn finish(self) -> (Vec<u8>, [u8; DIGEST]) {
        if self.blocks <= 1 {
            let root = self.leaves.get(..DIGEST).and_then(|r| r.try_into().ok());
            return (Vec::new(), root.unwrap_or_else(|| salted(&self.salt, &[])));
        }
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut digests = self.leaves;
        loop {
            // Pack the digests into zero-padded hash blocks.
            let mut level = Vec::new();
            for chunk in digests.chunks(BLOCK as usize) {
                level.extend_from_slice(chunk);
                level.resize(level.len().next_multiple_of(BLOCK as usize), 0);
            }
            let blocks = level.len() / BLOCK as usize;
            digests = level
                .chunks(BLOCK as usize)
                .flat_map(|b| salted(&self.salt, b))
                .collect();
            levels.push(level);
            if blocks == 1 {
                break;
            }
        }
        let mut root = [0u8; DIGEST];
        root.copy_from_slice(&digests[..DIGEST]);
        (levels.into_iter().rev().flatten().collect(), root)
    }
}

/// The tree of a whole image in memory (its length a multiple of [`BLOCK`]).
pub fn build(data: &[u8], salt: &[u8]) -> Result<(Vec<u8>, VerityRoot), VerityError> {
    let size = data.len() as u64;
    if size == 0 || !size.is_multiple_of(BLOCK) {
        return Err(VerityError::NotBlocks(size));
    }
    let mut b = TreeBuilder::new(salt);
    b.update(data);
    let (tree, root) = b.finish();
    Ok((
        tree,
        VerityRoot {
            data_size: size,
            root: hex(&root),
            salt: hex(salt),
        },
    ))
}

/// A deterministic salt for an image (a rebuilt image gets the same tree), unique per image.
pub fn salt_for(data: &[u8]) -> [u8; DIGEST] {
    blake3::derive_key("plinth dm-verity salt v1", data)
}

/// Pads `data` to whole blocks and appends its tree: the partition image. Returns it and what
/// the UKI must pin.
pub fn image(mut data: Vec<u8>) -> Result<(Vec<u8>, VerityRoot), VerityError> {
    data.resize((data.len() as u64).next_multiple_of(BLOCK) as usize, 0);
    let salt = salt_for(&data);
    let (tree, root) = build(&data, &salt)?;
    data.extend_from_slice(&tree);
    Ok((data, root))
}

/// What an image made by [`image`] pins: its data size (the one that, with its tree, fills the
/// image), its salt ([`salt_for`] the data) and root hash, checked against the tree it carries.
pub fn pinned_by(image: &[u8]) -> Result<VerityRoot, VerityError> {
    let total = image.len() as u64;
    if total == 0 || !total.is_multiple_of(BLOCK) {
        return Err(VerityError::NotBlocks(total));
    }
    let total_blocks = total / BLOCK;
    // data + tree(data) grows strictly with data: one data size at most fills the image.
    let (mut lo, mut hi) = (1u64, total_blocks);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if mid + tree_blocks(mid) < total_blocks {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo + tree_blocks(lo) != total_blocks {
        return Err(VerityError::TreeMismatch(format!(
            "{total} bytes is no data size plus its hash tree"
        )));
    }
    let data = &image[..(lo * BLOCK) as usize];
    let (_, root) = build(data, &salt_for(data))?;
    verify(&mut &image[..], &root)?;
    Ok(root)
}

/// Reads data and tree from `r` (positioned at the image's start) and checks that the tree is
/// the data's and its root the pinned one: what the kernel will check block by block, checked
/// in full once.
pub fn verify(r: &mut impl Read, pinned: &VerityRoot) -> Result<(), VerityError> {
    let mut b = TreeBuilder::new(&pinned.salt_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = pinned.data_size;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
        r.read_exact(&mut buf[..n]).map_err(VerityError::Read)?;
        b.update(&buf[..n]);
        left -= n as u64;
    }
    let (tree, root) = b.finish();
    let mut stored = vec![0u8; tree.len()];
    r.read_exact(&mut stored).map_err(VerityError::Read)?;
    if stored != tree {
        let block = stored
            .chunks(BLOCK as usize)
            .zip(tree.chunks(BLOCK as usize))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(VerityError::TreeMismatch(format!(
            "hash block {block} of {} differs",
            tree.len() as u64 / BLOCK
        )));
    }
    let actual = hex(&root);
    if actual != pinned.root {
        return Err(VerityError::RootMismatch {
            expected: pinned.root.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(blocks: usize) -> Vec<u8> {
        let mut d = vec![0u8; blocks * BLOCK as usize];
        blake3::Hasher::new()
            .update(&(blocks as u64).to_le_bytes())
            .finalize_xof()
            .fill(&mut d);
        d
    }

    #[test]
    fn tree_sizes_follow_the_fanout() {
        assert_eq!(tree_blocks(1), 0);
        assert_eq!(tree_blocks(2), 1);
        assert_eq!(tree_blocks(128), 1);
        assert_eq!(tree_blocks(129), 3);
        assert_eq!(tree_blocks(1000), 9);
        assert_eq!(tree_blocks(16385), 132);
    }

    /// The tree and root `veritysetup format --no-superblock` makes (cryptsetup-bin, which
    /// `./x test` installs), byte for byte.
    #[test]
    fn the_tree_is_veritysetups() {
        let dir = tempfile::tempdir().expect("tmp");
        for blocks in [1usize, 2, 129, 1000] {
            let d = data(blocks);
            let salt = salt_for(&d);
            let (tree, root) = build(&d, &salt).expect("tree");
            let (dp, hp) = (dir.path().join("data"), dir.path().join("hash"));
            std::fs::write(&dp, &d).expect("write");
            let _ = std::fs::remove_file(&hp);
            let out = std::process::Command::new("veritysetup")
                .args(["format", "--no-superblock", "--hash=sha256"])
                .arg(format!("--salt={}", hex(&salt)))
                .arg(&dp)
                .arg(&hp)
                .output()
                .expect("veritysetup (apt-get install cryptsetup-bin)");
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8_lossy(&out.stdout);
            let theirs = text
                .lines()
                .find_map(|l| l.strip_prefix("Root hash:"))
                .map(str::trim)
                .expect("root hash printed");
            assert_eq!(root.root, theirs, "{blocks} blocks");
            let their_tree = std::fs::read(&hp).expect("hash file");
            assert_eq!(tree, their_tree, "{blocks} blocks");
        }
    }

    #[test]
    fn a_verified_image_passes_and_every_corruption_is_named() {
        let (img, root) = image(data(300)).expect("image");
        assert_eq!(img.len() as u64, root.image_size());
        verify(&mut img.as_slice(), &root).expect("verifies");

        let mut flipped = img.clone();
        flipped[4096 * 17 + 5] ^= 1;
        let err = verify(&mut flipped.as_slice(), &root).expect_err("data flipped");
        assert!(matches!(err, VerityError::TreeMismatch(_)), "{err}");

        let mut tree_flipped = img.clone();
        let at = img.len() - 10;
        tree_flipped[at] ^= 1;
        assert!(matches!(
            verify(&mut tree_flipped.as_slice(), &root),
            Err(VerityError::TreeMismatch(_))
        ));

        let other = VerityRoot {
            root: "00".repeat(32),
            ..root.clone()
        };
        assert!(matches!(
            verify(&mut img.as_slice(), &other),
            Err(VerityError::RootMismatch { .. })
        ));
        let short = &img[..img.len() - 1];
        assert!(matches!(
            verify(&mut &short[..], &root),
            Err(VerityError::Read(_))
        ));
    }

    #[test]
    fn an_image_says_what_it_pins() {
        for blocks in [1usize, 2, 128, 129, 300] {
            let (img, root) = image(data(blocks)).expect("image");
            assert_eq!(pinned_by(&img).expect("pinned"), root, "{blocks} blocks");
        }
        let (mut img, _) = image(data(300)).expect("image");
        img[100] ^= 1;
        assert!(pinned_by(&img).is_err());
        assert!(
            pinned_by(&[0u8; 2 * 4096]).is_err(),
            "2 blocks is no data + tree"
        );
    }

    #[test]
    fn the_command_line_round_trips_and_refuses_half_pins() {
        let (_, root) = image(data(3)).expect("image");
        let line = format!("console=ttyS0 {}", root.cmdline_args().join(" "));
        assert_eq!(VerityRoot::from_cmdline(&line).expect("pinned"), root);
        let err = VerityRoot::from_cmdline("plinth.root.size=4096 plinth.root.verity=00")
            .expect_err("half");
        assert!(err.to_string().contains("plinth.root.verity"), "{err}");
        assert!(VerityRoot::from_cmdline(&line.replace("size=12288", "size=100")).is_err());
    }

    #[test]
    fn the_table_reads_data_and_tree_from_one_device() {
        let (_, root) = image(data(3)).expect("image");
        assert_eq!(
            root.table_params("259:3", &["panic_on_corruption"]),
            format!(
                "1 259:3 259:3 4096 4096 3 3 sha256 {} {} 1 panic_on_corruption",
                root.root, root.salt
            )
        );
    }
}
