//! Prism inside another program: every TCP connection routed into the TUN `prism0` goes
//! through a SOCKS5 proxy. Run it as root, route something into prism0, and stop it with
//! Ctrl-C: `cargo run --release -p prism-engine --example embed -- socks5://HOST:PORT`.
use std::time::Duration;

use prism_engine::{Engine, Source};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proxy = std::env::args()
        .nth(1)
        .unwrap_or("socks5://127.0.0.1:1080".into());
    let engine = Engine::builder(Source::tun("prism0"))
        .address("10.99.0.1".parse()?, 24)
        .socks5(proxy.parse()?)
        .start()
        .await?;
    println!(
        "serving on {}",
        engine.device().map_or("?", |d| d.name.as_str())
    );

    tokio::signal::ctrl_c().await?;
    let stats = engine.shutdown(Duration::from_secs(1)).await;
    let (up, down) = (stats.stack.bytes_from_clients, stats.stack.bytes_to_clients);
    println!("stopped: {up} bytes up, {down} bytes down");
    Ok(())
}
