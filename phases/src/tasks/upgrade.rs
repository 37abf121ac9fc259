//! The upgrade's tasks: read and check the bundle, write and verify the slot, install its UKI,
//! mark it pending and arm its trial; and rollback's slot switch.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use sequencer::{EventKind, TaskError};
use tokio::io::AsyncReadExt;
use upgrade::bundle::{self, BundleError, Component, ROOTFS, UKI_A, UKI_B};
use upgrade::meta::{SlotState, Written};
use upgrade::policy::PolicyError;
use upgrade::verity::{self, VerityError, VerityRoot};
use upgrade::Slot;

use crate::platform::PlatformError;
use crate::runtime::Runtime;
use crate::slots::{self, slot_event};
use crate::upgrade::{UpgradeError, UpgradeJob};

/// Bytes between progress events.
const PROGRESS_EVERY: u64 = 16 << 20;
/// The slot is written in buffers of this size (4 MiB: fewer, larger writes kept the write
/// closest to `dd`'s speed; BENCHMARKS.md).
const CHUNK: usize = 4 << 20;
/// The largest UKI a bundle may carry (a quarter of the ESP; ours are about 20 MiB).
const MAX_UKI: u64 = 64 << 20;
/// Buffers between the receiver and the disk writer.
const IN_FLIGHT: usize = 3;

fn node_err(e: impl Into<TaskError>) -> UpgradeError {
    UpgradeError::Node(e.into())
}

/// Reads the bundle's head: signature by a trusted key, the caller's pinned digest, the
/// security floor, expiry and downgrade rules, architecture, room in the target slot.
pub async fn read_bundle(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let cfg = job
        .rt
        .config()
        .ok_or_else(|| node_err("the node config is not loaded"))?;
    let trusted = cfg
        .machine
        .upgrade
        .trusted_keys
        .iter()
        .map(|k| bundle::public_from_hex(k))
        .collect::<Result<Vec<_>, _>>()?;
    let head = bundle::read_signed_head(&mut *job.source.lock().await, &trusted).await?;
    let expected = &job.options.expected_digest;
    if !expected.is_empty() && !expected.eq_ignore_ascii_case(&head.digest) {
        return Err(PolicyError::NotExpected {
            expected: expected.clone(),
            actual: head.digest,
        }
        .into());
    }
    // Its components' order and names were checked with the manifest (bundle::parse_manifest).
    let manifest = head.manifest;
    // The installer writes a blank disk: no floor and nothing running to compare, but the
    // expiry still holds (policy::admit with a zero floor). A node with no META record at all
    // is refused: its floor would be unknown.
    let meta = slots::read_meta(&job.rt).map_err(node_err)?.map(|l| l.meta);
    let m = match meta {
        Some(m) => m,
        None if job.source_is_bundle => {
            return Err(node_err(
                "META holds no slot record, so this node's security floor is unknown: refusing to upgrade",
            ))
        }
        None => upgrade::meta::Meta::initial(job.target.other(), ""),
    };
    let running = m.slot(job.target.other());
    upgrade::policy::admit(
        &manifest,
        &upgrade::policy::Node {
            floor: m.security_floor,
            running: (&running.version, running.security_version),
            now_s: sequencer::clock::unix_ms() / 1000,
            allow_downgrade: job.options.allow_downgrade || !job.source_is_bundle,
        },
    )?;
    let (root, _) = slots::partition(&job.rt, job.target.root_label()).map_err(node_err)?;
    bundle::check_fits(&manifest, std::env::consts::ARCH, root.len)?;
    // The UKIs are held in memory until the slot is written: bounded by what an ESP holds.
    for name in [UKI_A, UKI_B] {
        let size = manifest.component(name).map_or(0, |c| c.size);
        if size > MAX_UKI {
            return Err(BundleError::TooBig {
                component: name.into(),
                size,
                capacity: MAX_UKI,
            }
            .into());
        }
    }
    check_extensions(&job, &manifest)?;
    tracing::info!(
        "bundle {} (security version {}) for {} is signed by a trusted key; writing slot {}",
        manifest.version,
        manifest.security_version,
        manifest.arch,
        job.target
    );
    job.state().manifest = Some(manifest);
    Ok(())
}

/// Room left free on the ESP after the extensions a bundle brings (a UKI is written there
/// next, beside the old one until it is renamed over it).
const ESP_RESERVE: u64 = 64 << 20;

/// Refuses, before anything is written, a bundle whose OS provides another extension level
/// when an active extension has no version for it in the store or the bundle (the new slot
/// would come up without it, and its workloads with it), or whose extensions the ESP cannot
/// hold.
fn check_extensions(job: &UpgradeJob, m: &bundle::Manifest) -> Result<(), UpgradeError> {
    let rt = &job.rt;
    let brought: Vec<&str> = m.extensions().map(|(_, f)| f).collect();
    if !job.source_is_bundle {
        // Installer media carry the release alone; its extensions go on the disk image.
        return match brought.is_empty() {
            true => Ok(()),
            false => Err(BundleError::BadManifest(
                "an installer's bundle brings no extensions (plinth image disk --extension puts them on the disk)".into(),
            )
            .into()),
        };
    }
    let level = m.extension_level;
    let stored = crate::extensions::stored(rt);
    // What runs now, and what would have if the kernel had let it mount this boot.
    let orphans: Vec<String> = rt
        .extensions()
        .into_iter()
        .filter(|e| e.active || e.refused.as_ref().is_some_and(|(r, _)| r == "mount"))
        .filter(|e| {
            let file = format!("{}@{level}{}", e.name, upgrade::extension::SUFFIX);
            !brought.contains(&file.as_str()) && !stored.contains(&file)
        })
        .map(|e| format!("{} {} (level {})", e.name, e.version, e.level))
        .collect();
    if !orphans.is_empty() {
        return Err(UpgradeError::Orphans { level, orphans });
    }
    // Each is at most bundle::MAX_EXTENSION and there are at most 16: no overflow.
    let need: u64 = m.extensions().map(|(c, _)| c.size).sum();
    if need > 0 {
        let free = rt
            .platform
            .free_bytes(std::path::Path::new(crate::runtime::paths::ESP))?;
        // What an earlier upgrade of this slot brought goes before these are written.
        let dir = crate::extensions::slot_store(job.target);
        let earlier: u64 = rt
            .platform
            .list_dir(&dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| rt.platform.open_file(&dir.join(n)).ok())
            .filter_map(|f| f.metadata().ok())
            .map(|md| md.len())
            .sum();
        let room = free.saturating_add(earlier).saturating_sub(ESP_RESERVE);
        if need > room {
            return Err(UpgradeError::EspFull { need, room });
        }
    }
    Ok(())
}

fn component(job: &UpgradeJob, name: &str) -> Result<Component, UpgradeError> {
    job.manifest()
        .and_then(|m| m.component(name).cloned())
        .ok_or_else(|| {
            UpgradeError::Bundle(BundleError::BadManifest(format!("no {name} component")))
        })
}

/// Reads a component into memory, checking size and digest.
async fn read_component(job: &UpgradeJob, c: &Component) -> Result<Vec<u8>, UpgradeError> {
    let len = usize::try_from(c.size)
        .map_err(|_| UpgradeError::Uki(format!("{} is too large", c.name)))?;
    let mut data = vec![0u8; len];
    let mut src = job.source.lock().await;
    let mut got = 0usize;
    while got < data.len() {
        let n = src
            .read(&mut data[got..])
            .await
            .map_err(UpgradeError::from_source)?;
        if n == 0 {
            return Err(BundleError::Truncated {
                what: c.name.clone(),
                expected: c.size,
                got: got as u64,
            }
            .into());
        }
        got += n;
    }
    let actual = blake3::hash(&data).to_hex().to_string();
    if actual != c.blake3 {
        return Err(BundleError::Digest {
            component: c.name.clone(),
            expected: c.blake3.clone(),
            actual,
        }
        .into());
    }
    Ok(data)
}

/// Receives both UKIs (they come first, so they are checked before the slot is touched) and
/// keeps the target slot's: its command line must name the slot and pin the bundle's verity
/// root.
pub async fn receive_uki(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let root = job
        .manifest()
        .map(|m| m.root_verity)
        .ok_or_else(|| node_err("the manifest was not read"))?;
    let mut keep = None;
    for (name, slot) in [(UKI_A, Slot::A), (UKI_B, Slot::B)] {
        let c = component(&job, name)?;
        let data = read_component(&job, &c).await?;
        let cmdline = bootloader::uki::cmdline(&data)
            .ok_or_else(|| UpgradeError::Uki(format!("{name} is not a UKI with a command line")))?;
        if Slot::from_cmdline(&cmdline) != Some(slot) {
            return Err(UpgradeError::Uki(format!(
                "{name}'s command line does not boot slot {slot}: {cmdline:?}"
            )));
        }
        let pinned = VerityRoot::from_cmdline(&cmdline)
            .map_err(|e| UpgradeError::Uki(format!("{name}: {e}")))?;
        if pinned != root {
            return Err(UpgradeError::Uki(format!(
                "{name} pins a root image ({} bytes of data, verity root {}) that is not the bundle's ({}, {})",
                pinned.data_size, pinned.root, root.data_size, root.root
            )));
        }
        if slot == job.target {
            keep = Some(data);
        }
    }
    job.state().uki = keep;
    Ok(())
}

/// Reads until `buf` is full or the source ends. A network stream hands out one message at a
/// time (64 KiB from the CLI); a disk write per message would be many small writes.
async fn read_full<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    src: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]).await? {
            0 => break,
            r => n += r,
        }
    }
    Ok(n)
}

/// Streams the root image into the target slot's partition, hashing as it goes; then the
/// bundle must end.
pub async fn write_slot(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let target = job.target;
    let result = write_root(&job).await;
    if result.is_err() {
        // The slot holds part of an image: empty, and never booted.
        if let Err(e) = slots::update_meta(&job.rt, |m| m.abandon_write(target)) {
            tracing::warn!("marking slot {target} empty after a failed write: {e}");
        }
    }
    result
}

async fn write_root(job: &UpgradeJob) -> Result<(), UpgradeError> {
    let rt = &job.rt;
    let c = component(job, ROOTFS)?;
    let manifest = job
        .manifest()
        .ok_or_else(|| node_err("the manifest was not read"))?;
    let version = manifest.version.clone();
    let target = job.target;
    // Marked before the first byte, and out of BootOrder: a crash mid-write (or a bundle that
    // turns out bad) leaves a slot nobody will boot, not even the firmware falling back.
    let m = slots::update_meta(rt, |m| m.begin_write(target, &version)).map_err(node_err)?;
    slots::reconcile_entries(rt, &m).map_err(node_err)?;
    slot_event(rt, target, SlotState::Writing, format!("writing {version}"));
    let (_, dev) = slots::partition(rt, target.root_label()).map_err(node_err)?;
    let (mut file, base) = rt.platform.open_partition(&dev, true)?;
    file.seek(SeekFrom::Start(base))
        .map_err(|e| PlatformError::io("seeking in", &dev, e))?;
    // The disk writer runs on a blocking thread of its own, fed full buffers and handing them
    // back empty, so the next MiB is received and hashed while the last one is written (and the
    // API and the watchdog keep their async workers while a slow disk takes its time).
    let (full_tx, mut full_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize)>(IN_FLIGHT);
    let (empty_tx, mut empty_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let _ = empty_tx.try_send(vec![0u8; CHUNK]);
    }
    let d = dev.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(), PlatformError> {
        let mut at = base;
        while let Some((buf, n)) = full_rx.blocking_recv() {
            file.write_all(&buf[..n])
                .map_err(|e| PlatformError::io("writing", &d, e))?;
            start_writeback(&file, at, n);
            at += n as u64;
            let _ = empty_tx.blocking_send(buf);
        }
        file.sync_all()
            .map_err(|e| PlatformError::io("syncing", &d, e))
    });
    let mut hasher = blake3::Hasher::new();
    let mut done = 0u64;
    let mut next_report = PROGRESS_EVERY;
    let mut src = job.source.lock().await;
    let received: Result<(), UpgradeError> = async {
        while done < c.size {
            // No empty buffer coming back means the writer stopped: its error is the one to
            // report (below).
            let Some(mut buf) = empty_rx.recv().await else {
                return Ok(());
            };
            let want = usize::try_from((c.size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = read_full(&mut *src, &mut buf[..want])
                .await
                .map_err(UpgradeError::from_source)?;
            if n == 0 {
                return Err(BundleError::Truncated {
                    what: ROOTFS.into(),
                    expected: c.size,
                    got: done,
                }
                .into());
            }
            hasher.update(&buf[..n]);
            if full_tx.send((buf, n)).await.is_err() {
                return Ok(());
            }
            done += n as u64;
            if done >= next_report || done == c.size {
                next_report += PROGRESS_EVERY;
                rt.bus.publish(
                    EventKind::Progress {
                        sequence: "upgrade".into(),
                        what: format!("slot {target}"),
                        done,
                        total: c.size,
                    },
                    None,
                );
            }
        }
        Ok(())
    }
    .await;
    // The writer finishes what it was given and syncs.
    drop(full_tx);
    let written = writer
        .await
        .map_err(|e| node_err(format!("the slot writer stopped: {e}")))?;
    received?;
    written?;
    if done < c.size {
        return Err(node_err(
            "the slot writer stopped before the image was written",
        ));
    }
    let actual = hasher.finalize().to_hex().to_string();
    if actual != c.blake3 {
        return Err(BundleError::Digest {
            component: ROOTFS.into(),
            expected: c.blake3,
            actual,
        }
        .into());
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` out now, without waiting: the disk
/// works while the next buffers arrive, and the final fsync has little left to do. Advisory:
/// if it fails, the fsync does all of it.
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for the
    // whole call (borrowed from `file`).
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// Receives the extensions the bundle brings into the target slot's directory of the store
/// (emptied first: what an earlier upgrade of that slot brought), each hashed against the
/// manifest as it is written and its own signature, level and name checked before it is put
/// in place; then the bundle must end.
pub async fn receive_extensions(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let result = receive_extension_files(&job).await;
    if result.is_err() {
        // Neither the slot nor what was received for it is to be used.
        let target = job.target;
        if let Err(e) = slots::update_meta(&job.rt, |m| m.abandon_write(target)) {
            tracing::warn!("marking slot {target} empty after a failed upgrade: {e}");
        }
        if job.source_is_bundle {
            if let Err(e) = crate::extensions::clear_slot(&job.rt, target) {
                tracing::warn!("removing the extensions received for slot {target}: {e}");
            }
        }
    }
    result
}

async fn receive_extension_files(job: &UpgradeJob) -> Result<(), UpgradeError> {
    let rt = &job.rt;
    let manifest = job
        .manifest()
        .ok_or_else(|| node_err("the manifest was not read"))?;
    if job.source_is_bundle {
        crate::extensions::clear_slot(rt, job.target)?;
    }
    let trusted = rt
        .config()
        .map(|c| c.machine.upgrade.trusted_keys)
        .unwrap_or_default()
        .iter()
        .map(|k| bundle::public_from_hex(k))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = crate::extensions::slot_store(job.target);
    let mut src = job.source.lock().await;
    for (c, file) in manifest.extensions() {
        let partial = dir.join(format!("{file}.partial"));
        let mut out = rt.platform.create_file(&partial)?;
        let mut hasher = blake3::Hasher::new();
        let mut head = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < c.size {
            let want = usize::try_from((c.size - done).min(buf.len() as u64)).unwrap_or(1 << 20);
            let n = read_full(&mut *src, &mut buf[..want])
                .await
                .map_err(UpgradeError::from_source)?;
            if n == 0 {
                return Err(BundleError::Truncated {
                    what: c.name.clone(),
                    expected: c.size,
                    got: done,
                }
                .into());
            }
            hasher.update(&buf[..n]);
            if head.len() < EXTENSION_HEAD {
                let take = n.min(EXTENSION_HEAD - head.len());
                head.extend_from_slice(&buf[..take]);
            }
            // On a blocking thread, as the slot's writes are: the ESP may be slow, and the
            // API and the watchdog keep their workers.
            let p = partial.clone();
            let wrote = tokio::task::spawn_blocking(move || {
                out.write_all(&buf[..n])
                    .map_err(|e| PlatformError::io("writing", &p, e))
                    .map(|()| (out, buf))
            })
            .await
            .map_err(|e| node_err(format!("the extension writer stopped: {e}")))??;
            (out, buf) = wrote;
            done += n as u64;
        }
        let checked = check_extension(
            &c.blake3,
            hasher,
            &head,
            file,
            manifest.extension_level,
            &trusted,
        );
        let p = partial.clone();
        let platform = rt.platform.clone();
        let checked = match checked {
            // Its image against its own signed hash tree, as the boot will check it: a bad
            // one is refused now, not after a trial.
            Ok(v) => tokio::task::spawn_blocking(move || {
                out.sync_all()
                    .map_err(|e| node_err(PlatformError::io("syncing", &p, e)))?;
                let mut f = platform.open_file(&p).map_err(node_err)?;
                f.seek(SeekFrom::Start(v.image_offset))
                    .map_err(|e| node_err(PlatformError::io("seeking in", &p, e)))?;
                upgrade::extension::check_image(
                    &v.manifest,
                    &mut std::io::BufReader::with_capacity(1 << 20, f),
                )
                .map_err(|e| {
                    UpgradeError::Bundle(BundleError::BadManifest(format!("extension {e}")))
                })
            })
            .await
            .map_err(|e| node_err(format!("the extension check stopped: {e}")))
            .and_then(|r| r),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            let _ = rt.platform.remove(&partial);
            return Err(e);
        }
        rt.platform.rename(&partial, &dir.join(file))?;
        tracing::info!("extension {file} received for slot {}", job.target);
    }
    // The signed manifest says where the bundle ends: anything after it is not this bundle.
    let mut one = [0u8; 1];
    if job.source_is_bundle
        && src
            .read(&mut one)
            .await
            .map_err(UpgradeError::from_source)?
            != 0
    {
        let total = manifest.components.iter().map(|c| c.size).sum::<u64>();
        return Err(UpgradeError::Trailing(total));
    }
    Ok(())
}

/// Enough of an extension file to hold its head (magic, manifest, signature).
const EXTENSION_HEAD: usize = 70 * 1024;

/// An extension component as received: its digest the manifest's, signed by a trusted key,
/// built for the bundle's level and this machine, and named for what it is.
fn check_extension(
    expected: &str,
    hasher: blake3::Hasher,
    head: &[u8],
    file: &str,
    level: u32,
    trusted: &[bundle::VerifyingKey],
) -> Result<upgrade::extension::Verified, UpgradeError> {
    let actual = hasher.finalize().to_hex().to_string();
    if actual != expected {
        return Err(BundleError::Digest {
            component: format!("{}{file}", bundle::EXTENSION_PREFIX),
            expected: expected.into(),
            actual,
        }
        .into());
    }
    let refused = |e: upgrade::extension::ExtensionError| {
        UpgradeError::Bundle(BundleError::BadManifest(format!("extension {file}: {e}")))
    };
    let v = upgrade::extension::read_head(head, trusted).map_err(refused)?;
    upgrade::extension::check_compatible(&v.manifest, level, std::env::consts::ARCH)
        .map_err(refused)?;
    if crate::extensions::file_name(&v.manifest) != file {
        return Err(UpgradeError::Bundle(BundleError::BadManifest(format!(
            "the component {file} holds the extension {}",
            crate::extensions::file_name(&v.manifest)
        ))));
    }
    Ok(v)
}

/// Reads the slot back and checks it as the kernel will: the hash tree on the disk must be the
/// tree of the data on the disk, and its root the one the UKIs pin (which the bundle's
/// signature covers). What is on the disk, not what was sent.
pub async fn verify_slot(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let c = component(&job, ROOTFS)?;
    let pinned = job
        .manifest()
        .map(|m| m.root_verity)
        .ok_or_else(|| node_err("the manifest was not read"))?;
    let (_, dev) = slots::partition(&job.rt, job.target.root_label()).map_err(node_err)?;
    let (mut file, base) = job.rt.platform.open_partition(&dev, false)?;
    // The pages just written are still cached (clean, since writeSlot synced them): drop them,
    // or the read-back would hash the page cache instead of what the device kept.
    let (offset, len) = (i64::try_from(base), i64::try_from(c.size));
    if let (Ok(offset), Ok(len)) = (offset, len) {
        nix::fcntl::posix_fadvise(
            &file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(|e| PlatformError::io("dropping cached pages of", &dev, e.into()))?;
    }
    file.seek(SeekFrom::Start(base))
        .map_err(|e| PlatformError::io("seeking in", &dev, e))?;
    let checked = tokio::task::spawn_blocking(move || {
        verity::verify(
            &mut std::io::BufReader::with_capacity(1 << 20, file),
            &pinned,
        )
    })
    .await
    .map_err(|e| node_err(format!("the slot reader stopped: {e}")))?;
    match checked {
        Ok(()) => Ok(()),
        Err(VerityError::Read(e)) => Err(node_err(PlatformError::io("reading back", &dev, e))),
        Err(e) => Err(UpgradeError::Verify {
            slot: job.target,
            reason: e.to_string(),
        }),
    }
}

/// Writes the target slot's UKI to the ESP (atomically).
pub async fn install_uki(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let uki = job
        .state()
        .uki
        .take()
        .ok_or_else(|| node_err("the UKI was not received"))?;
    slots::write_esp_file(&job.rt, &slots::uki_file(job.target), &uki).map_err(node_err)?;
    Ok(())
}

/// META: the slot holds a verified image, pending its trial.
pub async fn mark_pending(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    let root = component(&job, ROOTFS)?;
    let manifest = job
        .manifest()
        .ok_or_else(|| node_err("the manifest was not read"))?;
    let written = Written {
        version: manifest.version.clone(),
        root_blake3: root.blake3,
        root_size: root.size,
        security_version: manifest.security_version,
    };
    let target = job.target;
    slots::update_meta(&job.rt, |m| m.mark_written(target, &written)).map_err(node_err)?;
    slot_event(
        &job.rt,
        target,
        SlotState::Pending,
        format!("{} written and verified", manifest.version),
    );
    Ok(())
}

/// Points `BootNext` at the pending slot: the next boot, and only that one, tries it.
pub fn arm(rt: &Runtime, target: Slot) -> Result<(), TaskError> {
    let m = slots::read_meta(rt)?
        .map(|l| l.meta)
        .ok_or("META holds no slot record")?;
    let entries = slots::reconcile_entries(rt, &m)?;
    let entry =
        entries[target as usize].ok_or_else(|| format!("slot {target} has no boot entry"))?;
    rt.platform
        .efivars()
        .set_boot_next(entry)
        .map_err(slots::SlotError::from)?;
    let mut rule = Ok(());
    slots::update_meta(rt, |m| rule = m.arm(target))?;
    rule?;
    slot_event(
        rt,
        target,
        SlotState::Pending,
        format!("BootNext is Boot{entry:04X}: the next boot is its trial"),
    );
    Ok(())
}

/// Arms the trial of the slot just written.
pub async fn arm_trial(job: Arc<UpgradeJob>) -> Result<(), UpgradeError> {
    arm(&job.rt, job.target).map_err(node_err)
}

/// Before a reboot: a staged upgrade (pending, not yet armed) gets its trial now.
pub async fn arm_staged(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let Some(boot) = ctx.boot() else {
        return Ok(());
    };
    let other = boot.slot.other();
    let pending = slots::read_meta(&ctx)?
        .map(|l| l.meta.slot(other).clone())
        .is_some_and(|r| r.state == SlotState::Pending && !r.armed);
    if pending {
        arm(&ctx, other)?;
    }
    Ok(())
}

/// Rollback: the other (good) slot becomes the committed one.
pub async fn switch_slot(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let to = crate::upgrade::admit_rollback(&ctx)?;
    let mut next = slots::read_meta(&ctx)?
        .map(|l| l.meta)
        .ok_or("META holds no slot record")?;
    next.rollback(to)?;
    slots::reconcile_entries(&ctx, &next)?;
    slots::follow_committed(&ctx, to)?;
    let mut rule = Ok(());
    let m = slots::update_meta(&ctx, |m| rule = m.rollback(to))?;
    rule?;
    slot_event(
        &ctx,
        to,
        SlotState::Good,
        format!("rolled back to {}", m.slot(to).version),
    );
    Ok(())
}
