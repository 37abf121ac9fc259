//! Sending a file in a streaming call (a bundle, an image archive) with a progress bar.

use futures::Stream;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;

/// Bytes per message: the server takes messages up to 1 MiB and a little framing.
const CHUNK: usize = 1 << 20;

/// A progress bar for `size` bytes.
pub fn bar(size: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    bar
}

/// The file's bytes as messages made by `wrap`, moving `bar` as they go. A read error ends
/// the stream early, and the node refuses the short upload.
pub fn chunks<T: Send + 'static>(
    file: tokio::fs::File,
    bar: ProgressBar,
    wrap: fn(Vec<u8>) -> T,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(Some(file), move |f| {
        let bar = bar.clone();
        async move {
            let mut f = f?;
            let mut buf = vec![0u8; CHUNK];
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => {
                    buf.truncate(n);
                    bar.inc(n as u64);
                    Some((wrap(buf), Some(f)))
                }
            }
        }
    })
}
