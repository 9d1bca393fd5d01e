//! Prism embedded through its C ABI, end to end: `crates/prism-ffi/c/fetch.c`, compiled here
//! with the system's C compiler against the static library, opens its own TUN in the client
//! namespace (Prism never sees its name), starts Prism on the descriptor with a protect
//! callback that marks every socket Prism opens, fetches from the echo server through `direct`
//! (and, in a second run, through dante), pings the relay's target through the relay server,
//! and stops Prism.
//!
//! The namespace's policy sends everything *unmarked* into that TUN, as a whole-machine VPN
//! does, so a socket Prism failed to protect would loop back into Prism: the same run without
//! the callback is the control, and must fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::e2e::{Report, counter};
use crate::servers::ECHO;
use crate::topology::{self, Topology};

const TUN: &str = "prismc0";
/// The policy rule that sends unmarked traffic into the TUN, and its table.
const RULE_PREF: &str = "100";
const TABLE: &str = "177";

/// Builds the static library and compiles the C program against it.
fn build(logs: &Path) -> Result<PathBuf> {
    crate::tools::ensure(&[("cc", "gcc")])?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--package", "prism-ffi"])
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "building prism-ffi failed");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let program = logs.join("prism-fetch");
    let output = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("crates/prism-ffi/include"))
        .arg(root.join("crates/prism-ffi/c/fetch.c"))
        .arg(root.join("target/release/libprism_ffi.a"))
        // What the Rust standard library needs from the system (rustc --print
        // native-static-libs).
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
            "-o",
        ])
        .arg(&program)
        .output()
        .context("cannot run the C compiler (cc)")?;
    ensure!(
        output.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(program)
}

/// Runs the C program once; its output lines.
fn fetch(topo: &Topology, program: &Path, config: &str, mark: &str, log: &Path) -> Result<String> {
    let setup = format!(
        "ip addr add {address}/24 dev {TUN} && ip link set {TUN} up && \
         ip route add default dev {TUN} table {TABLE} && \
         ip rule add not fwmark {fwmark} lookup {TABLE} pref {RULE_PREF}",
        address = address(config)?,
        fwmark = topology::FWMARK,
    );
    let output = topo
        .client
        .command("timeout")
        .arg("60")
        .arg(program)
        .args([
            TUN,
            &setup,
            config,
            &topology::TARGET_V4.to_string(),
            &ECHO.to_string(),
            RELAY_TARGET,
            mark,
        ])
        .output()
        .context("cannot run the C program")?;
    // Whatever happened, the namespace gets its normal routing back.
    let _ = topo.client.ip(&format!("rule del pref {RULE_PREF}"));
    let _ = topo.client.ip(&format!("route flush table {TABLE}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    std::fs::write(
        log,
        format!(
            "{stdout}\n--- stderr\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    )?;
    ensure!(
        output.status.success() && stdout.contains("stopped"),
        "the C program failed ({}); see {}",
        output.status,
        log.display()
    );
    Ok(stdout)
}

/// The relay's target, behind the relay server (see `relay_e2e`).
const RELAY_TARGET: &str = "172.32.0.2";

fn address(config: &str) -> Result<String> {
    let value: serde_json::Value = serde_json::from_str(config)?;
    let cidr = value
        .get("address")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .context("no address in the configuration")?;
    Ok(cidr.split('/').next().unwrap_or(cidr).to_owned())
}

fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or("")
        .trim()
}

/// Runs while the relay server of `relay_e2e` is up, after its own client stopped.
pub(crate) fn run(topo: &Topology, logs: &Path, key: &Path, report: &mut Report) {
    let program = match build(logs) {
        Ok(program) => program,
        Err(error) => {
            report.record("ffi", "the C program builds", Err(error));
            return;
        }
    };
    report.record(
        "ffi",
        "a C program starts Prism on its own TUN fd; fetch, relay ping and stop work, every outside socket protected",
        protected(topo, &program, logs, key),
    );
    report.record(
        "ffi",
        "the same through dante: the proxy socket is protected too",
        through_socks5(topo, &program, logs),
    );
    report.record(
        "ffi",
        "control: without the protect callback the same fetch loops back and fails",
        unprotected(topo, &program, logs),
    );
}

fn protected(topo: &Topology, program: &Path, logs: &Path, key: &Path) -> Result<String> {
    let config = serde_json::json!({
        "address": ["10.99.0.7/24"],
        "upstream": "direct",
        "relay": format!("udp://{}:5555", topology::SERVER_V4),
        "relay_key_file": key,
    })
    .to_string();
    let out = fetch(
        topo,
        program,
        &config,
        topology::FWMARK,
        &logs.join("ffi-protected.log"),
    )?;
    ensure!(line(&out, "echo:") == "ok", "the fetch failed:\n{out}");
    ensure!(line(&out, "ping:") == "ok", "the relay ping failed:\n{out}");
    ensure!(
        line(&out, "failure:") == "none",
        "the engine failed:\n{out}"
    );
    let protected: u32 = line(&out, "protected:").parse().unwrap_or(0);
    // The relay's socket and at least the echo's upstream.
    ensure!(
        protected >= 2,
        "only {protected} sockets were protected:\n{out}"
    );
    let last = line(&out, "final:");
    for (name, at_least) in [
        ("bytes_from_clients", 38),
        ("relay_sent", 2),
        ("relay_received", 2),
    ] {
        ensure!(
            counter(last, name)? >= at_least,
            "{name} below {at_least} in the final stats: {last}"
        );
    }
    ensure!(counter(last, "open")? == 0, "connections left open: {last}");
    Ok(format!(" ({protected} sockets protected)"))
}

fn through_socks5(topo: &Topology, program: &Path, logs: &Path) -> Result<String> {
    let config = serde_json::json!({
        "address": ["10.99.0.9/24"],
        "upstream": format!("socks5://{}:{}", topology::SERVER_V4, topology::DANTE_PORT),
    })
    .to_string();
    let out = fetch(
        topo,
        program,
        &config,
        topology::FWMARK,
        &logs.join("ffi-socks5.log"),
    )?;
    ensure!(
        line(&out, "echo:") == "ok",
        "the fetch through dante failed:\n{out}"
    );
    let protected: u32 = line(&out, "protected:").parse().unwrap_or(0);
    ensure!(protected >= 1, "the proxy socket was not protected:\n{out}");
    Ok(format!(" ({protected} sockets protected)"))
}

fn unprotected(topo: &Topology, program: &Path, logs: &Path) -> Result<String> {
    // Consistent handshakes with small caps: the loop is refused after a few rounds instead of
    // running into the descriptor limit.
    let config = serde_json::json!({
        "address": ["10.99.0.8/24"],
        "upstream": "direct",
        "handshake": "consistent",
        "max_pending": 16,
        "max_half_open": 16,
        "connect_timeout": 2,
    })
    .to_string();
    let out = fetch(
        topo,
        program,
        &config,
        "none",
        &logs.join("ffi-unprotected.log"),
    )?;
    let echo = line(&out, "echo:");
    ensure!(
        echo.starts_with("failed"),
        "the fetch worked without protection:\n{out}"
    );
    Ok(format!(" (echo {echo})"))
}
