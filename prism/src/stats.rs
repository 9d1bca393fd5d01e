//! What both commands share at the edges: waiting for a stop signal, and writing the stats.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

/// A future that resolves with the name of the first SIGINT or SIGTERM. The handlers are
/// installed when this is called, not when the future is first polled.
pub(crate) fn stop_signal() -> Result<impl Future<Output = &'static str>> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    })
}

/// Writes the stats file whole: into a file beside it, then renamed over it, so a reader never
/// sees half of it. A failure is logged: the stats file never changes how the command ends.
pub(crate) fn write(path: &Path, json: &str) {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let written = std::fs::write(&partial, format!("{json}\n"))
        .and_then(|()| std::fs::rename(&partial, path));
    if let Err(error) = written {
        warn!(path = %path.display(), %error, "cannot write the stats file");
    }
}
