//! Images into containerd without a registry: a checked archive ([`crate::oci`]) is written
//! into containerd's content store, unpacked layer by layer into overlayfs snapshots, and
//! named, all through containerd's API.
//!
//! containerd 1.6 (Debian 12's) has no server-side import (its Transfer service came in 1.7),
//! so this does what its Go client's `Import` and `Unpack` do: content under a lease so that
//! nothing is collected half-way, garbage-collection labels that tie the image's manifest to
//! its config and layers and the config to its unpacked snapshot, then the image record.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, ApplyRequest, CreateImageRequest, CreateRequest,
    DeleteRequest, GetImageRequest, Image, Info, InfoRequest, ListImagesRequest, ListRequest,
    Resource, UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use tonic::transport::Channel;

use crate::containerd::{Containerd, Error};
use crate::oci::{chain_ids, Archive, ArchiveImage, Blob, Source};

/// The containerd namespace machined's images and containers live in.
pub const NAMESPACE: &str = "plinth";
/// The snapshotter images are unpacked with.
pub const SNAPSHOTTER: &str = "overlayfs";
/// Leases of imports in progress start with this; one left by an import that never finished
/// is deleted by the next.
const LEASE_PREFIX: &str = "plinth-import-";
/// Bytes per content write message (well under the gRPC message limit of 4 MiB).
const CHUNK: usize = 1 << 20;

/// An image that was imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Its name.
    pub name: String,
    /// Its manifest's digest.
    pub digest: String,
    /// Its content's size (manifest, config, layers).
    pub size: u64,
}

/// An image in the node's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// Its name.
    pub name: String,
    /// Its manifest's digest.
    pub digest: String,
}

/// A request in machined's namespace, optionally under a lease.
pub(crate) fn request<T>(msg: T, lease: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    md.insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    if let Some(l) = lease.and_then(|l| l.parse().ok()) {
        md.insert("containerd-lease", l);
    }
    r
}

pub(crate) fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Call { call, status }
}

fn descriptor(b: &Blob) -> Descriptor {
    Descriptor {
        media_type: b.media_type.clone(),
        digest: b.digest.clone(),
        size: b.size as i64,
        annotations: HashMap::new(),
    }
}

impl Containerd {
    /// Imports every image of `archive` (checked by [`crate::oci::read`]); `name` names the
    /// image when the archive holds one that it does not name. `progress` is told the bytes
    /// written so far.
    pub async fn import(
        &self,
        archive: &Archive,
        name: Option<&str>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Vec<Imported>, Error> {
        let names: Vec<String> = archive
            .images
            .iter()
            .map(|i| match (&i.name, name) {
                (_, Some(n)) if archive.images.len() == 1 => {
                    crate::oci::normalize(n).map_err(|e| Error::Refused(e.to_string()))
                }
                (Some(n), _) => Ok(n.clone()),
                (None, _) => Err(Error::Refused(format!(
                    "the archive does not name image {}: give it a name",
                    i.manifest.digest
                ))),
            })
            .collect::<Result<_, _>>()?;
        let channel = self.connect().await?;
        let lease = format!(
            "{LEASE_PREFIX}{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let mut leases = LeasesClient::new(channel.clone());
        // A lease left by an import cut short (machined's or containerd's restart) would keep
        // its content forever.
        if let Ok(list) = leases.list(request(ListRequest::default(), None)).await {
            for l in list.into_inner().leases {
                if l.id.starts_with(LEASE_PREFIX) {
                    let _ = leases
                        .delete(request(
                            DeleteRequest {
                                id: l.id,
                                sync: false,
                            },
                            None,
                        ))
                        .await;
                }
            }
        }
        leases
            .create(request(
                CreateRequest {
                    id: lease.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .await
            .map_err(call("Leases.Create"))?;
        let result = self
            .import_leased(&channel, &lease, archive, &names, progress)
            .await;
        // Once the images name their content, the lease is not needed; on failure, deleting
        // it lets containerd collect what was written.
        let _ = leases
            .delete(request(
                DeleteRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
        result
    }

    async fn import_leased(
        &self,
        channel: &Channel,
        lease: &str,
        archive: &Archive,
        names: &[String],
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Vec<Imported>, Error> {
        let mut done = 0u64;
        let mut out = Vec::new();
        for (image, name) in archive.images.iter().zip(names) {
            let chains = chain_ids(&image.diff_ids);
            let mut size = 0u64;
            for layer in &image.layers {
                write_blob(
                    channel,
                    lease,
                    archive,
                    layer,
                    HashMap::new(),
                    &mut done,
                    progress,
                )
                .await?;
                size += layer.size;
            }
            let mut config_labels = HashMap::new();
            if let Some(top) = chains.last() {
                config_labels.insert(
                    format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                    top.clone(),
                );
            }
            write_blob(
                channel,
                lease,
                archive,
                &image.config,
                config_labels,
                &mut done,
                progress,
            )
            .await?;
            let mut manifest_labels = HashMap::from([(
                "containerd.io/gc.ref.content.config".to_string(),
                image.config.digest.clone(),
            )]);
            for (i, l) in image.layers.iter().enumerate() {
                manifest_labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    l.digest.clone(),
                );
            }
            write_blob(
                channel,
                lease,
                archive,
                &image.manifest,
                manifest_labels,
                &mut done,
                progress,
            )
            .await?;
            size += image.config.size + image.manifest.size;
            unpack(channel, lease, image, &chains).await?;
            name_image(channel, name, &image.manifest).await?;
            out.push(Imported {
                name: name.clone(),
                digest: image.manifest.digest.clone(),
                size,
            });
        }
        Ok(out)
    }

    /// The images in machined's namespace.
    pub async fn images(&self) -> Result<Vec<StoredImage>, Error> {
        let channel = self.connect().await?;
        let list = ImagesClient::new(channel)
            .list(request(ListImagesRequest::default(), None))
            .await
            .map_err(call("Images.List"))?
            .into_inner();
        Ok(list
            .images
            .into_iter()
            .map(|i| StoredImage {
                name: i.name,
                digest: i.target.map(|t| t.digest).unwrap_or_default(),
            })
            .collect())
    }
}

/// Writes one blob into the content store (unless it is there), with `labels`.
async fn write_blob(
    channel: &Channel,
    lease: &str,
    archive: &Archive,
    blob: &Blob,
    labels: HashMap<String, String>,
    done: &mut u64,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), Error> {
    let mut content = ContentClient::new(channel.clone());
    let present = content
        .info(request(
            InfoRequest {
                digest: blob.digest.clone(),
            },
            Some(lease),
        ))
        .await
        .is_ok();
    if present {
        // Held by this import's lease until the image names it: a blob left by an import
        // that failed is unreferenced, and garbage collection could take it meanwhile.
        LeasesClient::new(channel.clone())
            .add_resource(request(
                AddResourceRequest {
                    id: lease.to_string(),
                    resource: Some(Resource {
                        id: blob.digest.clone(),
                        r#type: "content".into(),
                    }),
                },
                None,
            ))
            .await
            .map_err(call("Leases.AddResource"))?;
        if !labels.is_empty() {
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            content
                .update(request(
                    UpdateRequest {
                        info: Some(Info {
                            digest: blob.digest.clone(),
                            labels,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    },
                    Some(lease),
                ))
                .await
                .map_err(call("Content.Update"))?;
        }
        *done += blob.size;
        progress(*done);
        return Ok(());
    }
    let reference = format!("plinth-import-{}", blob.digest);
    // A write cut short earlier holds this ref's partial data: start over.
    let _ = content
        .abort(request(
            AbortRequest {
                r#ref: reference.clone(),
            },
            Some(lease),
        ))
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
    let source = blob.source.clone();
    let path = archive.path.clone();
    let (size, digest) = (blob.size, blob.digest.clone());
    let producer = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = match &source {
            Source::File { offset } => {
                let mut f = tokio::fs::File::open(&path).await?;
                f.seek(std::io::SeekFrom::Start(*offset)).await?;
                Some(f)
            }
            Source::Made(_) => None,
        };
        let mut offset = 0u64;
        loop {
            let want = (size - offset).min(CHUNK as u64) as usize;
            let data = match (&mut file, &source) {
                (Some(f), _) => {
                    let mut buf = vec![0u8; want];
                    f.read_exact(&mut buf).await?;
                    buf
                }
                (None, Source::Made(b)) => b[offset as usize..offset as usize + want].to_vec(),
                (None, Source::File { .. }) => Vec::new(),
            };
            let last = offset + want as u64 == size;
            let msg = WriteContentRequest {
                action: if last {
                    WriteAction::Commit
                } else {
                    WriteAction::Write
                } as i32,
                r#ref: reference.clone(),
                total: size as i64,
                expected: digest.clone(),
                offset: offset as i64,
                data,
                labels: if last { labels.clone() } else { HashMap::new() },
            };
            if tx.send(msg).await.is_err() {
                // containerd ended the call; its status says why.
                return Ok::<(), std::io::Error>(());
            }
            offset += want as u64;
            if last {
                return Ok(());
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut responses = content
        .write(request(stream, Some(lease)))
        .await
        .map_err(call("Content.Write"))?
        .into_inner();
    let start = *done;
    while let Some(r) = responses.message().await.map_err(call("Content.Write"))? {
        progress(start + r.offset.max(0) as u64);
    }
    match producer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Error::Refused(format!(
                "reading {} from the archive: {e}",
                blob.digest
            )))
        }
        Err(e) => return Err(Error::Refused(format!("the archive reader failed: {e}"))),
    }
    *done = start + blob.size;
    progress(*done);
    Ok(())
}

/// Unpacks the image's layers into snapshots named by their chain ids (those already there
/// are kept), checking each layer's uncompressed digest against the config's.
async fn unpack(
    channel: &Channel,
    lease: &str,
    image: &ArchiveImage,
    chains: &[String],
) -> Result<(), Error> {
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let mut diff = DiffClient::new(channel.clone());
    for (i, layer) in image.layers.iter().enumerate() {
        let chain = &chains[i];
        let stat = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: chain.clone(),
        };
        if snapshots.stat(request(stat, Some(lease))).await.is_ok() {
            continue;
        }
        let key = format!("{lease} extract {chain}");
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let mounts = snapshots
            .prepare(request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent,
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(call("Snapshots.Prepare"))?
            .into_inner()
            .mounts;
        let applied = diff
            .apply(request(
                ApplyRequest {
                    diff: Some(descriptor(layer)),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                Some(lease),
            ))
            .await
            .map_err(call("Diff.Apply"));
        let remove = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
        };
        let applied = match applied {
            Ok(a) => a.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
            Err(e) => {
                let _ = snapshots.remove(request(remove, Some(lease))).await;
                return Err(e);
            }
        };
        if applied != image.diff_ids[i] {
            let _ = snapshots.remove(request(remove, Some(lease))).await;
            return Err(Error::Refused(format!(
                "layer {} unpacks to {applied}, but the image's config says {}",
                layer.digest, image.diff_ids[i]
            )));
        }
        let commit = snapshots
            .commit(request(
                CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: chain.clone(),
                    key,
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await;
        match commit {
            Ok(_) => {}
            // Unpacked meanwhile by another import: that one is as good.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let _ = snapshots.remove(request(remove, Some(lease))).await;
            }
            Err(s) => return Err(call("Snapshots.Commit")(s)),
        }
    }
    Ok(())
}

/// Creates the image record, or points an existing one of that name at this manifest.
async fn name_image(channel: &Channel, name: &str, manifest: &Blob) -> Result<(), Error> {
    let mut images = ImagesClient::new(channel.clone());
    let image = Image {
        name: name.to_string(),
        target: Some(descriptor(manifest)),
        ..Default::default()
    };
    let exists = images
        .get(request(
            GetImageRequest {
                name: name.to_string(),
            },
            None,
        ))
        .await
        .is_ok();
    if exists {
        images
            .update(request(
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map_err(call("Images.Update"))?;
    } else {
        images
            .create(request(
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map_err(call("Images.Create"))?;
    }
    Ok(())
}
