//! `cargo xtask fuzz`: every fuzz target in `fuzz/` (cargo-fuzz on the nightly toolchain) for
//! a number of seconds each, from a corpus seeded with the packet captures in `testdata/`.
//! A crash fails the task and names the input libFuzzer saved; a fixed crash becomes a
//! regression test in the crate it was in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// Every target, in the order they run.
pub(crate) const TARGETS: [&str; 6] = [
    "classify",
    "vnet",
    "l2_ingress",
    "relay",
    "relay_identities",
    "stack",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs cargo-fuzz from crates.io when it is missing; fails with one line when the
/// nightly toolchain is.
fn ensure_tools() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .context("cannot run rustup")?;
    ensure!(
        nightly.status.success(),
        "fuzzing needs the nightly toolchain: rustup toolchain install nightly"
    );
    let present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz from crates.io");
        let status = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("cannot run cargo install")?;
        ensure!(status.success(), "cargo install cargo-fuzz failed");
    }
    Ok(())
}

/// Copies the captures in testdata into each target's corpus: Ethernet frames for the
/// gateway, the IP packets inside them for classification and the stack, and both framed
/// for the virtio-net target (with a 10-byte plain header).
fn seed(corpus: &Path) -> Result<()> {
    let testdata = root().join("crates/prism-l2/testdata");
    for entry in std::fs::read_dir(&testdata)
        .with_context(|| format!("cannot read {}", testdata.display()))?
    {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let frame = std::fs::read(&path)?;
        let name = path
            .file_name()
            .context("a capture without a name")?
            .to_owned();
        let packet = frame.get(14..).unwrap_or_default().to_vec();
        let mut framed = vec![0u8; 10];
        framed.extend_from_slice(&packet);
        for (target, bytes) in [
            ("l2_ingress", &frame),
            ("classify", &packet),
            ("vnet", &framed),
        ] {
            let dir = corpus.join(target);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(&name), bytes)?;
        }
    }
    Ok(())
}

/// How long each target runs, and how it is built.
pub(crate) struct Budget {
    /// Seconds per target, unless `runs` is given.
    pub seconds: u64,
    /// Executions per target.
    pub runs: Option<u64>,
    /// With AddressSanitizer.
    pub sanitizer: bool,
}

impl Budget {
    /// A smoke run of `seconds` per target, sanitized.
    pub(crate) fn seconds(seconds: u64) -> Budget {
        Budget {
            seconds,
            runs: None,
            sanitizer: true,
        }
    }
}

/// Runs `only` (targets separated by commas; or every target) for the budget each.
pub(crate) fn run(budget: &Budget, only: Option<&str>) -> Result<()> {
    ensure_tools()?;
    let wanted: Option<Vec<&str>> = only.map(|o| o.split(',').map(str::trim).collect());
    if let Some(unknown) = wanted.iter().flatten().find(|w| !TARGETS.contains(w)) {
        bail!(
            "no fuzz target {unknown}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    let targets: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| wanted.as_ref().is_none_or(|w| w.contains(t)))
        .collect();
    let limit = match budget.runs {
        Some(runs) => format!("-runs={runs}"),
        None => format!("-max_total_time={}", budget.seconds),
    };
    let how = match budget.runs {
        Some(runs) => format!("{runs} executions"),
        None => format!("{} s", budget.seconds),
    };
    let sanitizer = if budget.sanitizer { "address" } else { "none" };
    let fuzz = root().join("fuzz");
    let corpus = root().join("target/fuzz-corpus");
    seed(&corpus)?;
    let mut summary = Vec::new();
    for target in targets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        println!("fuzz: {target} for {how} (sanitizer: {sanitizer})");
        let started = std::time::Instant::now();
        let output = Command::new("cargo")
            .current_dir(&fuzz)
            .args(["+nightly", "fuzz", "run", "-O", "-s", sanitizer, target])
            .arg(&dir)
            .args([
                "--",
                &limit,
                "-rss_limit_mb=4096",
                "-timeout=20",
                "-print_final_stats=1",
            ])
            .output()
            .context("cannot run cargo fuzz")?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed (the input is under fuzz/artifacts/{target}/):\n{}",
                tail.join("\n")
            );
        }
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned();
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        println!("fuzz: {target}: {runs} executions in {minutes:.1} min, no crash");
        summary.push((target, runs));
    }
    println!("fuzz: every target ran for {how} without a crash: {summary:?}");
    Ok(())
}
