//! What both commands share at the edges: waiting for a stop signal, and writing counters.

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

/// Counters named with `prefix` (for example `l2_` or `relay_`).
pub(crate) fn prefixed(
    prefix: &str,
    fields: Vec<(&'static str, u64)>,
) -> impl Iterator<Item = (String, u64)> {
    fields
        .into_iter()
        .map(move |(name, value)| (format!("{prefix}{name}"), value))
}

/// Writes the counters as one flat JSON object (names are plain identifiers, values
/// integers). A failure is logged: the stats file never changes how the command ends.
pub(crate) fn write(path: &Path, fields: impl IntoIterator<Item = (String, u64)>) {
    let fields: Vec<String> = fields
        .into_iter()
        .map(|(name, value)| format!("\"{name}\": {value}"))
        .collect();
    if let Err(error) = std::fs::write(path, format!("{{{}}}\n", fields.join(", "))) {
        warn!(path = %path.display(), %error, "cannot write the stats file");
    }
}
