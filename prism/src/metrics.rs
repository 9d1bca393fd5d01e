//! `--metrics ADDR`: the counters and gauges in Prometheus's text format, for a scraper.
//!
//! prometheus-client writes the exposition format (from a collector over one snapshot taken
//! per scrape, so every value is of the same moment); the HTTP is the least a scraper needs:
//! one GET, one answer, then the connection closes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// One value: its name (without the `prism_` prefix), and whether it is a gauge (it goes up
/// and down) rather than a counter.
pub(crate) type Sample = (String, u64, bool);

/// Takes a snapshot of every value.
pub(crate) type Sampler =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<Sample>> + Send>> + Send + Sync>;

/// The values the `prism run` stats file holds, as samples: the counts are gauges.
pub(crate) fn engine_samples(stats: &prism_engine::Stats) -> Vec<Sample> {
    stats
        .fields()
        .into_iter()
        .map(|(name, value)| {
            let gauge = matches!(name.as_str(), "open" | "half_open" | "pending");
            (name, value, gauge)
        })
        .collect()
}

/// Serves the metrics on `listen` until the task is aborted.
pub(crate) async fn serve(listen: SocketAddr, sampler: Sampler) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot serve metrics on {listen}"))?;
    info!(%listen, "metrics at http://{listen}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let sampler = Arc::clone(&sampler);
            tokio::spawn(async move {
                let answered =
                    tokio::time::timeout(Duration::from_secs(5), answer(stream, sampler)).await;
                if let Ok(Err(error)) = answered {
                    debug!(%error, "metrics request failed");
                }
            });
        }
    }))
}

async fn answer(mut stream: TcpStream, sampler: Sampler) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let found = request.starts_with(b"GET /metrics ") || request.starts_with(b"GET / ");
    let (status, body) = if found {
        ("200 OK", render(sampler().await))
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The exposition text of one snapshot.
fn render(samples: Vec<Sample>) -> String {
    let mut registry = Registry::with_prefix("prism");
    registry.register_collector(Box::new(Snapshot(samples)));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

#[derive(Debug)]
struct Snapshot(Vec<Sample>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, value, gauge) in &self.0 {
            let help = name.replace('_', " ");
            if *gauge {
                let metric = ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX));
                let encoder = encoder.encode_descriptor(name, &help, None, metric.metric_type())?;
                metric.encode(encoder)?;
            } else {
                let metric = ConstCounter::new(*value);
                let encoder = encoder.encode_descriptor(name, &help, None, metric.metric_type())?;
                metric.encode(encoder)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_in_the_text_format() {
        let text = render(vec![
            ("bytes_from_clients".to_owned(), 1234, false),
            ("open".to_owned(), 7, true),
        ]);
        assert!(
            text.contains("# TYPE prism_bytes_from_clients counter"),
            "{text}"
        );
        assert!(
            text.contains("prism_bytes_from_clients_total 1234"),
            "{text}"
        );
        assert!(text.contains("# TYPE prism_open gauge"), "{text}");
        assert!(text.contains("prism_open 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
