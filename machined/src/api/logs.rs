//! Dmesg and Logs: the kernel's ring buffer and the services' output, as streams.

use std::sync::Arc;

use phases::Runtime;

use super::error::ApiError;

/// A channel of log lines as the API's stream.
fn lines(rx: tokio::sync::mpsc::Receiver<phases::logs::LogLine>) -> api::server::LineStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        let l = rx.recv().await?;
        Some((
            Ok(api::proto::LogLine {
                text: l.text,
                boot_us: l.boot_us,
                level: l.level,
            }),
            rx,
        ))
    }))
}

/// The kernel log; with `follow`, new records as they come.
pub fn dmesg(runtime: &Arc<Runtime>, follow: bool) -> Result<api::server::LineStream, ApiError> {
    let rx = phases::logs::kernel_log(&runtime.platform, follow).map_err(ApiError::Unavailable)?;
    Ok(lines(rx))
}

/// A service's last `tail` lines (all with 0), then with `follow` new ones.
pub fn logs(
    runtime: &Arc<Runtime>,
    service: &str,
    tail: u32,
    follow: bool,
) -> Result<api::server::LineStream, ApiError> {
    if !runtime.services.list().iter().any(|s| s.name == service) {
        return Err(ApiError::NotFound(format!("no service named {service:?}")));
    }
    let rx = phases::logs::service_lines(&runtime.platform, service, tail as usize, follow)
        .map_err(ApiError::Unavailable)?;
    Ok(lines(rx))
}
