//! `cargo xtask ci`: everything that must pass before a change lands.

use std::process::Command;

use anyhow::{Result, bail, ensure};

fn cargo(args: &[&str]) -> Result<()> {
    println!("ci: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO")).args(args).status()?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

pub fn run() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    // The patched smoltcp (vendor/smoltcp) is outside the workspace: its own suite, with the
    // patch's tests, runs here, with its default features and again with the ones Prism adds
    // (their tests are compiled only then).
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let manifest = format!("{root}/vendor/smoltcp/Cargo.toml");
    let target = format!("{root}/target/vendor-smoltcp");
    for features in ["", "segmentation-offload,socket-tcp-pause-synack"] {
        cargo(&[
            "test",
            "--lib",
            "--manifest-path",
            &manifest,
            "--target-dir",
            &target,
            "--features",
            features,
        ])?;
    }
    // A short run of every fuzz target: each must build and survive its corpus and a few
    // seconds of new inputs (`cargo xtask fuzz --seconds N` for a long run).
    crate::fuzz::run(&crate::fuzz::Budget::seconds(10), None)?;
    if crate::tools::is_root() {
        crate::e2e::run(None)?;
        // A minute of churn; `cargo xtask soak --minutes 30` for a long run.
        crate::soak::run(1.0)?;
    } else if std::env::var_os("PRISM_CI_REQUIRE_E2E").is_some() {
        bail!("the e2e suite needs root");
    } else {
        println!("ci: not root, e2e suite skipped");
    }
    println!("ci: all green");
    Ok(())
}
