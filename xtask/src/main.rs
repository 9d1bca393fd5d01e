//! Prism's developer tasks (the matklad xtask pattern): `cargo xtask <task>`.
//!
//! - `ci`: format check, clippy with `-D warnings`, the tests, and as root the e2e suite.
//! - `e2e`: Prism between the Linux kernel's TCP and real servers, in network namespaces.
//! - `demo`: the main job on an embedded default: namespaces, a web server, curl through Prism.
//!
//! Invariant: everything privileged creates its namespaces and processes through the guards in
//! `netns.rs`, which remove them when dropped, pass or fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "developer tooling; failures are reported, not survived"
)]
#![allow(
    unreachable_pub,
    reason = "a binary: pub marks each module's interface"
)]

mod bench;
mod chart;
mod ci;
mod delay;
mod demo;
mod e2e;
mod fault_e2e;
mod ffi_e2e;
mod flood_e2e;
mod forward;
mod fuzz;
mod netns;
mod peers;
mod relay_e2e;
mod routed_e2e;
mod servers;
mod soak;
mod stats;
mod tools;
mod topology;
mod udp_load;
mod wan;
mod wan_bench;
mod wan_e2e;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Prism's developer tasks")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Format check, clippy, tests, and (as root) the e2e suite.
    Ci,
    /// End-to-end tests in network namespaces (root).
    E2e {
        /// Only cases whose name contains this (for example "socks5 v6" or "contract").
        filter: Option<String>,
    },
    /// Fetch through Prism with curl on a self-contained topology and report (root).
    Demo,
    /// Measure Prism against kernel routing and a bare TUN forwarder; write docs/bench/ (root).
    Bench {
        /// Also measure tun2proxy and shadowsocks-rust's tun mode (built with `cargo install`
        /// into a cache on first use).
        #[arg(long)]
        peers: bool,
        /// Measure VPNs across a userspace WAN link instead (delay, loss, a rate cap); see
        /// xtask/src/wan_bench.rs for its knobs.
        #[arg(long, conflicts_with = "peers")]
        wan: bool,
        /// Measure only the relay: UDP through Prism's relay and through wireguard-go on a
        /// veth pair (`cargo xtask bench` ends with it).
        #[arg(long, conflicts_with_all = ["peers", "wan"])]
        relay: bool,
    },
    /// Draw docs/bench/results.svg and wan.svg again from their JSON.
    BenchChart,
    /// Leave `prism run` under connection churn of every kind and watch its resources (root).
    Soak {
        /// How long, in minutes.
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
    },
    /// Run every fuzz target in fuzz/ (cargo-fuzz, nightly) for some seconds each, or for a
    /// number of executions each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, conflicts_with = "runs")]
        seconds: u64,
        /// Executions per target instead (a long run: 10000000).
        #[arg(long)]
        runs: Option<u64>,
        /// Build without AddressSanitizer: several times the executions a second. Prism is
        /// safe Rust; the sanitized build is the default and what `ci` runs.
        #[arg(long)]
        no_sanitizer: bool,
        /// Only these targets, separated by commas (classify, vnet, l2_ingress, relay,
        /// relay_identities, stack).
        target: Option<String>,
    },
    /// Internal: the bare TUN-to-TUN forwarder the bench measures.
    #[command(hide = true)]
    TunForward {
        /// Namespace of the first TUN (where the traffic comes from).
        client_ns: String,
        /// Namespace the second TUN moves to.
        server_ns: String,
        /// Use virtio-net headers (GSO/GRO).
        #[arg(long)]
        offload: bool,
    },
    /// Internal: run the test servers in namespace NS until killed (a separate process, so
    /// the bench's client and server sockets do not share one file-descriptor limit).
    #[command(hide = true)]
    ServeTargets {
        /// The namespace.
        ns: String,
        /// Addresses to listen on.
        addresses: Vec<std::net::IpAddr>,
    },
}

fn main() -> ExitCode {
    let task = Xtask::parse().task;
    netns::clean_up_on_signals();
    let result = match task {
        Task::Ci => ci::run(),
        Task::E2e { filter } => e2e::run(filter.as_deref()),
        Task::Demo => demo::run(),
        Task::Bench { wan: true, .. } => wan_bench::run(),
        Task::Bench { relay: true, .. } => wan_bench::relay_local(),
        Task::Bench { peers, .. } => bench::run(peers),
        Task::BenchChart => bench::redraw_chart().and_then(|()| wan_bench::redraw_chart()),
        Task::Fuzz {
            seconds,
            runs,
            no_sanitizer,
            target,
        } => fuzz::run(
            &fuzz::Budget {
                seconds,
                runs,
                sanitizer: !no_sanitizer,
            },
            target.as_deref(),
        ),
        Task::Soak { minutes } => soak::run(minutes),
        Task::ServeTargets { ns, addresses } => bench::serve_targets(&ns, addresses),
        Task::TunForward {
            client_ns,
            server_ns,
            offload,
        } => forward::run(&client_ns, &server_ns, offload),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
