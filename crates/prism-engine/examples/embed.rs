//! Prism inside another program: every TCP connection routed into the TUN `prism0` goes
//! through a SOCKS5 proxy. Run it as root, route something into prism0 (`ip route add
//! 10.200.0.0/16 dev prism0`), and stop it with Ctrl-C or SIGTERM:
//! `cargo run --release -p prism-engine --example embed -- socks5://HOST:PORT`.
use std::time::Duration;

use prism_engine::{Engine, Source};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Prism reports what a user must act on (a proxy that is down) through `tracing`.
    tracing_subscriber::fmt().with_env_filter("info").init();
    let proxy = std::env::args().nth(1).unwrap_or_default();
    let proxy = proxy.parse().map_err(|e| format!("{e}"))?;
    let engine = Engine::builder(Source::tun("prism0"))
        .address("10.99.0.1".parse()?, 24)
        .socks5(proxy)
        .start()
        .await?;

    // Stop on Ctrl-C or SIGTERM: every client gets a FIN, nothing is left running.
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    let stats = engine.shutdown(Duration::from_secs(1)).await;
    let (up, down) = (stats.stack.bytes_from_clients, stats.stack.bytes_to_clients);
    println!("stopped: {up} bytes up, {down} bytes down");
    Ok(())
}
