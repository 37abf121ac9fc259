//! System extensions on the node ([`upgrade::extension`]): the files in the ESP's extension
//! store are checked, mapped through dm-verity and overlaid on `/usr/local`, once per boot.
//!
//! Each extension goes through, in order: its signature (by a key the config trusts for
//! bundles), its compatibility (OS, extension level, architecture), its hash tree against the
//! signed root (every block of the file read once, so a flipped byte is refused by name here
//! rather than failing a read later); then it is mapped through dm-verity (the kernel checks
//! every block it reads from then on), mounted read-only, `nosuid` and `nodev`, in a private
//! place, and its tree is checked (only directories, regular files and links under
//! `/usr/local`, nothing setuid, setgid or world-writable, its release record matching the
//! signed manifest) before anything of it becomes visible. An extension refused at any step is
//! taken down again, reported by name with its reason (an event and `plinth get extensions`),
//! and the node boots without it. The extensions that pass are overlaid, read-only, on
//! `/usr/local`.
//!
//! The store is on the ESP, outside the slots: extensions stay across upgrades and resets, and
//! a node keeps one file per extension and level (`NAME@LEVEL.ext`), so a slot of another
//! level finds its own. The extensions an upgrade bundle brings go into the store's directory
//! of the slot written (`A/`, `B/`), where they stand in for the store's own for that slot
//! alone; they replace the store's when that slot commits. A trial that fails lands back on a
//! slot that never saw them.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sequencer::EventKind;
use upgrade::bundle::VerifyingKey;
use upgrade::extension::{self as ext, ExtensionError, Manifest};

use crate::platform::MountSpec;
use crate::runtime::{paths, Runtime};

/// The store, under the ESP's mount.
pub const STORE: &str = "EFI/plinth/extensions";
/// Where each extension is mounted before it is overlaid.
pub const STAGING: &str = "/run/plinth/extensions";
/// Where extensions appear.
pub const TARGET: &str = "/usr/local";
/// What the kernel needs for them: loop devices and overlayfs.
pub const MODULES: &[&str] = &["loop", "overlay"];
/// The CPU's SHA-256, which each extension's dm-verity table takes if it is in when the table
/// loads: the C code built into the kernel otherwise, several times slower on a CPU with SHA or
/// AVX2 instructions, for every block an extension's programs read. Only faster: without it
/// the extensions still mount.
pub const HASH_MODULES: &[&str] = &["sha256_ssse3"];

/// One extension found in the store, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionStatus {
    /// The file in the store.
    pub file: String,
    /// Its name (the file's stem when the manifest could not be read).
    pub name: String,
    /// Its version, if its manifest was read.
    pub version: String,
    /// The extension level it was built for (0 if unknown).
    pub level: u32,
    /// The digest of its signed manifest (empty if unknown).
    pub digest: String,
    /// Overlaid on `/usr/local`.
    pub active: bool,
    /// Why it was refused: the short reason and the message.
    pub refused: Option<(String, String)>,
}

impl ExtensionStatus {
    /// What is known of a file in the store before its manifest is read; `file` is its path
    /// from the store.
    fn unread(file: &str) -> ExtensionStatus {
        let base = file.rsplit('/').next().unwrap_or(file);
        ExtensionStatus {
            name: stem(base),
            file: file.to_string(),
            version: String::new(),
            level: 0,
            digest: String::new(),
            active: false,
            refused: None,
        }
    }
}

/// The store's directory on this node.
pub fn store() -> PathBuf {
    Path::new(paths::ESP).join(STORE)
}

/// Where an upgrade keeps the extensions its bundle brought for `slot` until it commits.
pub fn slot_store(slot: upgrade::Slot) -> PathBuf {
    store().join(slot.to_string())
}

/// The system extension level this OS provides: `SYSEXT_LEVEL` of its os-release (the build's
/// [`ext::LEVEL`] when it does not say).
pub fn os_level(rt: &Runtime) -> u32 {
    rt.platform
        .read(Path::new("/etc/os-release"))
        .ok()
        .and_then(|b| ext::os_level(&String::from_utf8_lossy(&b)))
        .unwrap_or(ext::LEVEL)
}

/// The extension files in `dir`.
fn files_in(rt: &Runtime, dir: &Path) -> Vec<String> {
    rt.platform
        .list_dir(dir)
        .map(|names| {
            names
                .into_iter()
                .filter(|n| n.ends_with(ext::SUFFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// The extension files the store has for every slot (not those an upgrade brought).
pub fn stored(rt: &Runtime) -> Vec<String> {
    files_in(rt, &store())
}

/// Empties `slot`'s directory of the store (what an earlier upgrade of it brought).
pub fn clear_slot(rt: &Runtime, slot: upgrade::Slot) -> Result<(), crate::platform::PlatformError> {
    let dir = slot_store(slot);
    for n in rt.platform.list_dir(&dir).unwrap_or_default() {
        rt.platform.remove(&dir.join(n))?;
    }
    Ok(())
}

/// Makes the extensions an upgrade brought for `slot`, and that came up this boot, the
/// store's own (the slot committed). The store's file each replaces moves into the other
/// slot's directory first, so that the other slot (the fallback) keeps exactly what it ran;
/// nothing is renamed over an existing file (not atomic on FAT). A file that was refused
/// stays where it is. Idempotent: run at the commit and at every boot of a committed slot,
/// so that a commit cut short finishes.
pub fn promote(rt: &Runtime, slot: upgrade::Slot) -> Result<(), crate::platform::PlatformError> {
    let dir = slot_store(slot);
    let active: Vec<String> = rt
        .extensions()
        .into_iter()
        .filter(|e| e.active)
        .map(|e| e.file)
        .collect();
    let mut moved = false;
    for n in files_in(rt, &dir) {
        if !active.iter().any(|a| a == &format!("{slot}/{n}")) {
            continue;
        }
        let (mine, shared, theirs) = (
            dir.join(&n),
            store().join(&n),
            slot_store(slot.other()).join(&n),
        );
        if stored(rt).contains(&n) {
            rt.platform.mkdir_all(&slot_store(slot.other()))?;
            if files_in(rt, &slot_store(slot.other())).contains(&n) {
                // The other slot has its own already: the store's is nobody's.
                rt.platform.remove(&shared)?;
            } else {
                rt.platform.rename(&shared, &theirs)?;
            }
        }
        rt.platform.rename(&mine, &shared)?;
        moved = true;
    }
    if moved {
        // The renames must reach the disk before anything relies on them.
        rt.platform.sync();
    }
    Ok(())
}

/// The file name an extension has in the store.
pub fn file_name(m: &Manifest) -> String {
    format!("{}@{}{}", m.name, m.level, ext::SUFFIX)
}

/// Why one extension did not come up.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    #[error(transparent)]
    Platform(#[from] crate::platform::PlatformError),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Extension(e) => e.reason(),
            Refusal::Platform(_) => "mount",
        }
    }
}

/// An extension's name from its file name, for files whose manifest could not be read.
fn stem(file: &str) -> String {
    file.split(['@', '.']).next().unwrap_or(file).to_string()
}

/// The extensions in the store, by file name: the store's own, and those an upgrade brought
/// for the booted slot in their place; each with its path from the store (`B/x@2.ext`).
fn list(rt: &Runtime) -> Vec<(String, PathBuf)> {
    let mut files: std::collections::BTreeMap<String, (String, PathBuf)> = stored(rt)
        .into_iter()
        .map(|n| (n.clone(), (n.clone(), store().join(n))))
        .collect();
    if let Some(boot) = rt.boot() {
        let dir = slot_store(boot.slot);
        for n in files_in(rt, &dir) {
            files.insert(n.clone(), (format!("{}/{n}", boot.slot), dir.join(n)));
        }
    }
    files.into_values().collect()
}

/// Reads an extension file's head and checks its signature; the file is left open.
fn read_signed(
    rt: &Runtime,
    path: &Path,
    trusted: &[VerifyingKey],
) -> Result<(std::fs::File, ext::Verified), Refusal> {
    let mut f = rt.platform.open_file(path)?;
    let mut head = Vec::with_capacity(70 * 1024);
    (&mut f)
        .take(70 * 1024)
        .read_to_end(&mut head)
        .map_err(ExtensionError::Io)?;
    let v = ext::read_head(&head, trusted)?;
    Ok((f, v))
}

/// Checks a signed extension up to its mount: compatibility, then the image and its hash tree.
fn check_rest(
    mut f: std::fs::File,
    v: ext::Verified,
    level: u32,
) -> Result<ext::Verified, ExtensionError> {
    ext::check_compatible(&v.manifest, level, std::env::consts::ARCH)?;
    f.seek(SeekFrom::Start(v.image_offset))
        .map_err(ExtensionError::Io)?;
    let mut r = Feeding {
        inner: std::io::BufReader::with_capacity(1 << 20, f),
        since: 0,
    };
    ext::check_image(&v.manifest, &mut r)?;
    Ok(v)
}

/// A reader that feeds the watchdog every few MiB: checking a large extension on a slow disk
/// publishes no event (which is what feeds it during the boot) for a long time.
struct Feeding<R> {
    inner: R,
    since: u64,
}

impl<R: Read> Read for Feeding<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.since += n as u64;
        if self.since >= 8 << 20 {
            crate::watchdog::feed();
            self.since = 0;
        }
        Ok(n)
    }
}

/// Reads the release record from a mounted image: a regular file (the tree check saw it), not
/// followed if it is a link, and at most [`ext::MAX_RELEASE`] bytes.
fn read_release(at: &Path, name: &str, entries: &[ext::Entry]) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let rel = ext::release_path(name);
    entries
        .iter()
        .find(|e| e.path == rel && e.kind == ext::Kind::File)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(at.join(&rel))
        .ok()?;
    let mut text = String::new();
    f.take(ext::MAX_RELEASE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Takes down an extension's private mount (if `mounted`) and mapping (its loop device then
/// detaches itself); what cannot be taken down is logged.
fn take_down(rt: &Runtime, name: &str, mounted: bool) {
    if mounted {
        if let Err(e) = rt.platform.unmount(&Path::new(STAGING).join(name)) {
            tracing::warn!("unmounting extension {name}: {e}");
        }
    }
    if let Err(e) = rt.platform.unmap(&mapping(name)) {
        tracing::warn!("removing extension {name}'s mapping: {e}");
    }
}

/// Takes every active extension down: the overlay on `/usr/local`, then each one's mount and
/// mapping. Before the ESP is unmounted at reboot, shutdown and reset (the loop devices hold
/// files on it); the processes that ran from them are gone by then.
pub fn deactivate(rt: &Runtime) {
    let active: Vec<ExtensionStatus> = rt.extensions().into_iter().filter(|e| e.active).collect();
    if active.is_empty() {
        return;
    }
    if rt
        .platform
        .mounts()
        .is_ok_and(|m| m.iter().any(|m| m.target == Path::new(TARGET)))
    {
        if let Err(e) = rt.platform.unmount(Path::new(TARGET)) {
            tracing::warn!("unmounting the extensions from {TARGET}: {e}");
        }
    }
    for e in &active {
        take_down(rt, &e.name, true);
    }
    rt.set_extensions(
        rt.extensions()
            .into_iter()
            .map(|e| ExtensionStatus { active: false, ..e })
            .collect(),
    );
}

/// The device-mapper name of an extension's mapping.
fn mapping(name: &str) -> String {
    format!("plinth-ext-{name}")
}

/// Maps, mounts (privately) and checks the tree of a checked extension; on a refusal, takes
/// down what it set up.
fn mount_checked(rt: &Runtime, path: &Path, v: &ext::Verified) -> Result<PathBuf, Refusal> {
    let m = &v.manifest;
    let loop_dev = rt.platform.attach_loop(path, v.image_offset, m.size)?;
    let name = mapping(&m.name);
    let device = rt
        .platform
        .map_verity(&name, &loop_dev.path, &m.verity, false)?;
    // The mapping holds the loop device now: it goes away with the mapping.
    drop(loop_dev);
    let at = Path::new(STAGING).join(&m.name);
    let mounted = rt.platform.mount(
        &MountSpec::new(&device.display().to_string(), &at, "squashfs")
            .read_only()
            .nosuid(),
    );
    let was_mounted = mounted.is_ok();
    let checked = mounted.map_err(Refusal::from).and_then(|()| {
        let entries = ext::walk(&at).map_err(ExtensionError::Io)?;
        ext::check_entries(&entries)?;
        let record = read_release(&at, &m.name, &entries);
        ext::check_release(m, record.as_deref())?;
        Ok(())
    });
    if let Err(e) = checked {
        take_down(rt, &m.name, was_mounted);
        return Err(e);
    }
    Ok(at)
}

fn event(rt: &Runtime, name: &str, state: &str, message: String) {
    rt.bus.publish(
        EventKind::Extension {
            name: name.into(),
            state: state.into(),
            message,
        },
        None,
    );
}

/// Checks and mounts every extension in the store and overlays those that pass on
/// `/usr/local`. Never fails the boot: a refused extension is left out and reported.
pub async fn activate(rt: &Arc<Runtime>) -> Result<(), sequencer::TaskError> {
    let files = list(rt);
    if files.is_empty() {
        rt.set_extensions(Vec::new());
        return Ok(());
    }
    let trusted: Vec<VerifyingKey> = rt
        .config()
        .map(|c| c.machine.upgrade.trusted_keys)
        .unwrap_or_default()
        .iter()
        .filter_map(|k| upgrade::bundle::public_from_hex(k).ok())
        .collect();
    if let Err(e) = crate::modules::wait_for(HASH_MODULES).await {
        tracing::warn!("extensions hashed with the kernel's generic SHA-256: {e}");
    }
    if let Err(e) = crate::modules::wait_for(MODULES).await {
        tracing::error!("no extensions this boot: {e}");
        let statuses = files
            .iter()
            .map(|(file, _)| {
                let status = ExtensionStatus {
                    refused: Some(("mount".into(), e.clone())),
                    ..ExtensionStatus::unread(file)
                };
                event(rt, &status.name, "refused", format!("mount: {e}"));
                status
            })
            .collect();
        rt.set_extensions(statuses);
        return Ok(());
    }
    let rt2 = rt.clone();
    let level = os_level(rt);
    let statuses = tokio::task::spawn_blocking(move || {
        let mut statuses = Vec::new();
        let mut lower = Vec::new();
        for (file, path) in files {
            let mut status = ExtensionStatus::unread(&file);
            let file = status.file.clone();
            let outcome = read_signed(&rt2, &path, &trusted).and_then(|(f, v)| {
                // Signed: what it says about itself is worth showing, even if refused.
                status.name = v.manifest.name.clone();
                status.version = v.manifest.version.clone();
                status.level = v.manifest.level;
                status.digest = v.digest.clone();
                let v = check_rest(f, v, level)?;
                if statuses
                    .iter()
                    .any(|s: &ExtensionStatus| s.active && s.name == v.manifest.name)
                {
                    return Err(Refusal::Extension(ExtensionError::BadManifest(format!(
                        "another file already brought an extension named {}",
                        v.manifest.name
                    ))));
                }
                mount_checked(&rt2, &path, &v)
            });
            match outcome {
                Ok(at) => {
                    status.active = true;
                    lower.push(at.join(ext::PREFIX));
                    tracing::info!(
                        "extension {} {} active (digest {})",
                        status.name,
                        status.version,
                        status.digest
                    );
                    event(
                        &rt2,
                        &status.name,
                        "active",
                        format!("{} (digest {})", status.version, status.digest),
                    );
                }
                Err(e) => {
                    tracing::error!("extension {file} refused: {e}");
                    event(
                        &rt2,
                        &status.name,
                        "refused",
                        format!("{}: {e}", e.reason()),
                    );
                    status.refused = Some((e.reason().into(), e.to_string()));
                }
            }
            statuses.push(status);
        }
        (statuses, lower)
    })
    .await;
    let (mut statuses, lower) = match statuses {
        Ok(s) => s,
        Err(e) => {
            // The check itself died (it does not panic by design): the node goes on without.
            tracing::error!("checking the extensions: {e}");
            return Ok(());
        }
    };
    if !lower.is_empty() {
        // The first extension on top; the root's own /usr/local last, at the bottom.
        let mut layers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        layers.push(TARGET.into());
        let spec = MountSpec::new("overlay", TARGET, "overlay")
            .read_only()
            .nosuid()
            .data(&format!("lowerdir={}", layers.join(":")));
        if let Err(e) = rt.platform.mount(&spec) {
            tracing::error!("overlaying the extensions on {TARGET}: {e}");
            for s in statuses.iter_mut().filter(|s| s.active) {
                take_down(rt, &s.name, true);
                s.active = false;
                s.refused = Some(("mount".into(), format!("overlaying {TARGET}: {e}")));
                event(rt, &s.name, "refused", format!("mount: {e}"));
            }
        }
    }
    rt.set_extensions(statuses);
    Ok(())
}
