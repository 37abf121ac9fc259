//! ImageImport, ImageList and ContainerList: images into the node's containerd without a
//! registry, and what runs from them.
//!
//! The archive is received whole onto EPHEMERAL (bounded by the space there), checked whole
//! ([`workloads::oci::read`]: every blob against its digest, every reference resolved), and only
//! then written into containerd; a refused archive leaves containerd as it was. One import runs
//! at a time. Each import, and each refusal, is an event with the caller's actor id.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::proto::{
    ContainerInfo, ContainerListResponse, ImageImportOptions, ImageImportResponse, ImageInfo,
    ImageListResponse,
};
use api::server::BundleStream;
use phases::Runtime;
use sequencer::EventKind;
use tokio::io::AsyncWriteExt;

use super::error::ApiError;

/// Space left free on EPHEMERAL while an archive is received (containerd unpacks it there
/// next, and the services write their logs there).
const RESERVE: u64 = 256 << 20;

/// How long an upload may send nothing before it is refused.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// One import at a time: each may take most of EPHEMERAL's free space.
static IMPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where archives are received.
fn import_dir() -> PathBuf {
    Path::new(phases::runtime::paths::EPHEMERAL).join("lib/plinth/imports")
}

/// The node's containerd, if it runs and answers; otherwise why the call cannot go on.
pub(super) fn containerd(rt: &Runtime) -> Result<workloads::Containerd, ApiError> {
    let service = rt
        .services
        .list()
        .into_iter()
        .find(|s| s.name == config::RUNTIME_SERVICE);
    match service {
        Some(s) if s.healthy => Ok(phases::runtime::containerd()),
        Some(s) => Err(ApiError::Precondition(format!(
            "containerd is not healthy on this node ({}{}): see plinth logs containerd",
            s.state.as_str(),
            s.last_exit
                .map(|e| format!(", last exit {e}"))
                .unwrap_or_default()
        ))),
        None => Err(ApiError::Precondition(
            "this node has no container runtime: add the runtime extension \
             (plinth image extension --runtime) to its ESP's store"
                .into(),
        )),
    }
}

/// Receives, checks and imports an archive.
pub async fn import(
    rt: &Arc<Runtime>,
    actor: String,
    options: ImageImportOptions,
    archive: BundleStream,
) -> Result<ImageImportResponse, ApiError> {
    let containerd = containerd(rt)?;
    let _one = IMPORTING.try_lock().map_err(|_| {
        ApiError::Busy(
            "another image import is running on this node: try again when it ends".into(),
        )
    })?;
    let name = Some(options.name.trim()).filter(|n| !n.is_empty());
    let result = receive_and_import(&containerd, &actor, &options, name, archive).await;
    match &result {
        Ok(images) => {
            for i in images {
                rt.bus.publish(
                    EventKind::Workload {
                        object: "image".into(),
                        name: i.name.clone(),
                        action: "imported".into(),
                        message: format!("{}, {} bytes", i.digest, i.size),
                    },
                    Some(&actor),
                );
            }
        }
        Err(e) => {
            rt.bus.publish(
                EventKind::Workload {
                    object: "image".into(),
                    name: name.unwrap_or("(archive)").to_string(),
                    action: "refused".into(),
                    message: e.to_string(),
                },
                Some(&actor),
            );
        }
    }
    Ok(ImageImportResponse {
        actor_id: actor,
        images: result?
            .into_iter()
            .map(|i| ImageInfo {
                name: i.name,
                digest: i.digest,
                size: i.size,
            })
            .collect(),
    })
}

async fn receive_and_import(
    containerd: &workloads::Containerd,
    actor: &str,
    options: &ImageImportOptions,
    name: Option<&str>,
    mut archive: BundleStream,
) -> Result<Vec<workloads::images::Imported>, ApiError> {
    let dir = import_dir();
    // What an import cut short (a reboot mid-upload) left behind.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    let free = nix::sys::statvfs::statvfs(&dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .map_err(|e| {
            ApiError::Internal(format!("reading the free space of {}: {e}", dir.display()))
        })?;
    let room = free.saturating_sub(RESERVE);
    if options.size > room {
        return Err(ApiError::TooLarge(format!(
            "the archive is {} bytes and EPHEMERAL has room for {room}",
            options.size
        )));
    }
    let path = dir.join(format!("{actor}.tar"));
    let received = receive(&mut archive, &path, room, options.size).await;
    let result = match received {
        Ok(()) => check_and_import(containerd, &path, name).await,
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&path).await;
    result
}

/// Writes the upload to `path`: at most `room` bytes, exactly `expected` when it is given,
/// and refused when nothing comes for [`IDLE`] (a stalled client must not hold the one
/// import and an upload slot).
async fn receive(
    archive: &mut BundleStream,
    path: &Path,
    room: u64,
    expected: u64,
) -> Result<(), ApiError> {
    use tokio::io::AsyncReadExt;
    let internal =
        |e: std::io::Error| ApiError::Internal(format!("writing {}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = match tokio::time::timeout(IDLE, archive.read(&mut buf)).await {
            Err(_) => {
                return Err(ApiError::Stalled(format!(
                    "the upload stalled: nothing came for {}s after {got} bytes",
                    IDLE.as_secs()
                )))
            }
            Ok(Err(e)) => return Err(ApiError::Unavailable(format!("the upload broke off: {e}"))),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
        };
        got += n as u64;
        if got > room {
            return Err(ApiError::TooLarge(format!(
                "the archive is larger than the {room} bytes EPHEMERAL has room for"
            )));
        }
        file.write_all(&buf[..n]).await.map_err(internal)?;
    }
    if expected > 0 && got != expected {
        return Err(ApiError::BadRequest(format!(
            "the upload ended after {got} of the {expected} bytes announced"
        )));
    }
    file.flush().await.map_err(internal)?;
    Ok(())
}

async fn check_and_import(
    containerd: &workloads::Containerd,
    path: &Path,
    name: Option<&str>,
) -> Result<Vec<workloads::images::Imported>, ApiError> {
    let p = path.to_path_buf();
    let archive = tokio::task::spawn_blocking(move || workloads::oci::read(&p))
        .await
        .map_err(|e| ApiError::Internal(format!("checking the archive: {e}")))??;
    Ok(containerd.import(&archive, name, &|_| {}).await?)
}

/// The images in the node's containerd.
pub async fn images(rt: &Arc<Runtime>) -> Result<ImageListResponse, ApiError> {
    let containerd = containerd(rt)?;
    let images = containerd.images().await?;
    Ok(ImageListResponse {
        images: images
            .into_iter()
            .map(|i| ImageInfo {
                name: i.name,
                digest: i.digest,
                size: 0,
            })
            .collect(),
    })
}

/// The node's containers: the config's, with their supervision (state, restarts, health),
/// and what containerd has for each (task state, PID); containers containerd holds that the
/// config no longer names are listed too.
pub async fn containers(rt: &Arc<Runtime>) -> Result<ContainerListResponse, ApiError> {
    let containerd = containerd(rt)?;
    let held = containerd.containers().await?;
    let cfg = rt.config();
    let configured = cfg
        .as_ref()
        .map(|c| c.machine.containers.clone())
        .unwrap_or_default();
    let services = rt.services.list();
    let mut out: Vec<ContainerInfo> = configured
        .iter()
        .map(|c| {
            let s = services.iter().find(|s| s.name == c.name);
            let h = held.iter().find(|h| h.name == c.name);
            ContainerInfo {
                name: c.name.clone(),
                image: h
                    .map(|h| h.image.clone())
                    .unwrap_or_else(|| c.image.clone()),
                task: h.map(|h| h.state.clone()).unwrap_or_else(|| "none".into()),
                pid: h.map(|h| h.pid).unwrap_or(0),
                state: s.map(|s| s.state.as_str().to_string()).unwrap_or_default(),
                restarts: s.map(|s| s.restarts).unwrap_or(0),
                healthy: s.is_some_and(|s| s.healthy),
                last_exit: s.and_then(|s| s.last_exit.clone()).unwrap_or_default(),
            }
        })
        .collect();
    for h in held {
        if !configured.iter().any(|c| c.name == h.name) {
            out.push(ContainerInfo {
                name: h.name,
                image: h.image,
                task: h.state,
                pid: h.pid,
                state: "not in the config".into(),
                ..Default::default()
            });
        }
    }
    Ok(ContainerListResponse { containers: out })
}
