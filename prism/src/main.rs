//! The `prism` command: flags onto Prism's engine (`prism-engine`), and the relay server.
//!
//! `prism run` creates the TUN, gives it its addresses, routes each `--route` through it, serves
//! until SIGINT or SIGTERM, then removes what it added and exits 0. Any setup error prints one
//! line and exits 1. See `cli.rs` for the flags.

// The relay's fuzz builds swap X25519 for a stand-in that publishes the private key: a
// binary must never be built that way.
#[cfg(fuzzing)]
compile_error!("the prism binary cannot be built with --cfg fuzzing");

mod cli;
mod config;
mod keys;
#[cfg(target_os = "linux")]
mod metrics;
#[cfg(target_os = "linux")]
mod policy;
#[cfg(target_os = "linux")]
mod relay;
#[cfg(target_os = "linux")]
mod routes;
#[cfg(target_os = "linux")]
mod run;
#[cfg(target_os = "linux")]
mod stats;

use std::process::ExitCode;

/// jemalloc rather than the system allocator: its large allocations are zeroed lazily (a
/// connection's socket buffers cost only the pages it touches) and it returns freed pages to
/// the OS after a decay period, where glibc's per-thread arenas keep them resident.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = match config::expand(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("prism: error: {}", one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    let cli = cli::Cli::parse_from(args);
    accept_stop_signals();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match prism_engine::runtime_builder(cli.busy_poll_us())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("prism: error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prism: error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each once: a message that already quotes its cause
/// (a thiserror `{source}`) does not get it a second time.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// A parent may have blocked SIGINT and SIGTERM, and a blocked mask survives exec: prism
/// would then never stop. Unblock them before any thread starts (threads inherit the mask).
fn accept_stop_signals() {
    #[cfg(unix)]
    {
        use nix::sys::signal::{SigSet, Signal};
        let mut stop = SigSet::empty();
        stop.add(Signal::SIGINT);
        stop.add(Signal::SIGTERM);
        if let Err(error) = stop.thread_unblock() {
            eprintln!("prism: warning: cannot unblock SIGINT/SIGTERM: {error}");
        }
    }
}

async fn execute(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        #[cfg(target_os = "linux")]
        cli::Command::Run(args) => run::run(args).await,
        #[cfg(target_os = "linux")]
        cli::Command::RelayServer(args) => relay::serve(args).await,
        cli::Command::Genkey => keys::genkey(),
        cli::Command::Pubkey => keys::pubkey(),
        #[cfg(target_os = "macos")]
        cli::Command::Run(args) if args.tap => {
            anyhow::bail!("--tap needs a TAP device, and macOS has only L3 utun devices")
        }
        #[cfg(not(target_os = "linux"))]
        cli::Command::Run(_) => anyhow::bail!("prism run supports only Linux for now"),
        #[cfg(not(target_os = "linux"))]
        cli::Command::RelayServer(_) => {
            anyhow::bail!("prism relay-server supports only Linux for now")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_cause_the_message_quotes_is_not_repeated() {
        let quoted = prism_engine::Error::Listen {
            listen: "127.0.0.1:5555".parse().unwrap(),
            source: std::io::ErrorKind::AddrInUse.into(),
        };
        let line = one_line(&anyhow::Error::new(quoted).context("relay server"));
        assert_eq!(line.matches("address in use").count(), 1, "{line}");
        assert!(
            line.starts_with("relay server: cannot listen on 127.0.0.1:5555"),
            "{line}"
        );
        let chained = anyhow::Error::new(std::io::Error::other("refused")).context("cannot start");
        assert_eq!(one_line(&chained), "cannot start: refused");
    }
}
