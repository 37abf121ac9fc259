//! `plinth image import` and `plinth image list`: container images on a node.

use std::path::{Path, PathBuf};

use anyhow::Context;
use api::proto::image_import_request::Msg;
use api::proto::{ImageImportOptions, ImageImportRequest, ImageListRequest};

use crate::connect::{status_error, Target};

#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// The archive: an OCI image layout or a `docker save` tar (`plinth image busybox` makes
    /// one).
    file: PathBuf,
    /// The name to give the image, if the archive does not name it (or to rename it).
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {}

pub async fn import(target: &Target, args: ImportArgs) -> anyhow::Result<()> {
    let reply = upload(target, &args.file, args.name.unwrap_or_default()).await?;
    for i in &reply.images {
        println!("imported {} ({}, {} bytes)", i.name, i.digest, i.size);
    }
    eprintln!("actor id {}", reply.actor_id);
    Ok(())
}

/// Sends the archive `file` to the node with a progress bar; `name` names its image.
pub async fn upload(
    target: &Target,
    file: &Path,
    name: String,
) -> anyhow::Result<api::proto::ImageImportResponse> {
    let opened = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let size = opened.metadata().await?.len();
    let first = ImageImportRequest {
        msg: Some(Msg::Options(ImageImportOptions { name, size })),
    };
    let bar = crate::upload::bar(size, "sending");
    let chunks = crate::upload::chunks(opened, bar.clone(), |buf| ImageImportRequest {
        msg: Some(Msg::Chunk(buf)),
    });
    let stream = futures::StreamExt::chain(futures::stream::iter([first]), chunks);
    let (endpoint, mut c) = target.connect_long().await?;
    let reply = c.image_import(stream).await;
    bar.finish_and_clear();
    Ok(reply.map_err(|s| status_error(&endpoint, s))?.into_inner())
}

pub async fn list(target: &Target, _: ListArgs) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let r = c
        .image_list(ImageListRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner();
    if r.images.is_empty() {
        println!("no images (plinth image import FILE adds one)");
        return Ok(());
    }
    let width = r
        .images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:<width$}  DIGEST", "NAME");
    for i in &r.images {
        println!("{:<width$}  {}", i.name, i.digest);
    }
    Ok(())
}

/// [`import`] for a node of its own (`-n`, one after the other).
pub async fn import_owned(target: Target, args: ImportArgs) -> anyhow::Result<()> {
    import(&target, args).await
}

/// [`list`] for a node of its own (`-n`, one after the other).
pub async fn list_owned(target: Target, args: ListArgs) -> anyhow::Result<()> {
    list(&target, args).await
}
