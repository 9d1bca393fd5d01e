//! `cargo xtask e2e wan`: the userspace WAN link (`wan.rs`) between two namespaces of its own,
//! checked for what the bench will lean on: the delay it adds (a lower bound: a slow machine
//! only adds to it), the loss it draws, and the rate cap (an upper bound), and how fast it
//! carries a flow uncapped (written down, not asserted).

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::netns::{Netns, Process};
use crate::wan::{ADDR_B, Shape, Wan};

pub(crate) fn run(logs: &std::path::Path, report: &mut crate::e2e::Report) {
    if let Err(error) = crate::tools::ensure(&[("ping", "iputils-ping"), ("iperf3", "iperf3")]) {
        report.record("wan", "the WAN link's tools", Err(error));
        return;
    }
    println!("e2e: wan link");
    report.record(
        "wan",
        "20 ms each way: ping's round trip is at least 40 ms",
        with_link(Shape::delay(Duration::from_millis(20)), |a, _, _| delay(a)),
    );
    let lossy = Shape {
        loss: 0.3,
        ..Shape::delay(Duration::from_millis(1))
    };
    report.record(
        "wan",
        "30% loss each way: about half the pings come back",
        with_link(lossy, |a, _, wan| loss(a, wan)),
    );
    let capped = Shape {
        rate: Some((20_000_000, Duration::from_millis(50))),
        ..Shape::delay(Duration::from_millis(5))
    };
    report.record(
        "wan",
        "a 20 Mbit/s cap: TCP gets no more, the queue drops the excess",
        with_link(capped, |a, b, wan| capped_flow(a, b, wan, logs)),
    );
    for (what, rate) in [
        ("uncapped", None),
        (
            "capped at 1 Gbit/s",
            Some((1_000_000_000, Duration::from_millis(50))),
        ),
    ] {
        let shape = Shape {
            rate,
            ..Shape::delay(Duration::from_millis(20))
        };
        report.record(
            "wan",
            &format!("{what}, 20 ms each way: one TCP flow across (measured, not asserted)"),
            with_link(shape, |a, b, _| {
                flow(a, b, logs, "4").map(|mbit| format!("{mbit:.0} Mbit/s"))
            }),
        );
    }
}

/// Two namespaces joined by the link; `check` runs with both and the link.
fn with_link(
    shape: Shape,
    check: impl FnOnce(&Netns, &Netns, &Wan) -> Result<String>,
) -> Result<String> {
    let a = Netns::create("wana")?;
    let b = Netns::create("wanb")?;
    // Windows for a long fat link: Linux's default 6 MB receive buffer caps one flow at
    // about 600 Mbit/s over a 40 ms round trip.
    for ns in [&a, &b] {
        for (key, value) in [
            ("net.ipv4.tcp_rmem", "4096 131072 33554432"),
            ("net.ipv4.tcp_wmem", "4096 16384 33554432"),
        ] {
            ns.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        }
    }
    let wan = Wan::start(&a, &b, shape)?;
    let result = check(&a, &b, &wan);
    let counts = format!(
        "; a→b {}; b→a {}",
        wan.counts[0].summary(),
        wan.counts[1].summary()
    );
    drop(wan);
    drop((a, b));
    result.map(|note| format!(" ({note}{counts})"))
}

/// The `min/avg/max` of ping's summary, in ms.
fn rtt(out: &str) -> Option<(f64, f64, f64)> {
    let stats = out.lines().find(|l| l.contains("min/avg/max"))?;
    let numbers = stats.split('=').nth(1)?.trim();
    let mut parts = numbers
        .split('/')
        .map(|p| p.trim().trim_end_matches(" ms").parse::<f64>());
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    ))
}

fn delay(a: &Netns) -> Result<String> {
    let out = a.exec(&[
        "ping",
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "2",
        &ADDR_B.to_string(),
    ])?;
    let (min, avg, max) = rtt(&out).with_context(|| format!("no round trips:\n{out}"))?;
    ensure!(
        min >= 40.0,
        "round trip {min} ms, under twice the 20 ms delay:\n{out}"
    );
    Ok(format!(
        "round trip min/avg/max {min:.1}/{avg:.1}/{max:.1} ms"
    ))
}

fn loss(a: &Netns, wan: &Wan) -> Result<String> {
    let out = a
        .command("ping")
        .args(["-c", "400", "-i", "0.005", "-W", "1", &ADDR_B.to_string()])
        .output()?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let received: f64 = out
        .split(" received")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no summary:\n{out}"))?;
    // Each echo crosses twice: 0.7 × 0.7 = 49% expected; 400 pings put 35-63% far out in the
    // tails of the binomial.
    let share = received / 400.0;
    let lost = wan.counts[0]
        .lost
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        (0.35..=0.63).contains(&share),
        "{received} of 400 echoes came back ({lost} lost on the way out)"
    );
    Ok(format!("{received} of 400 echoes back"))
}

/// iperf3 from the first namespace to a server in the second; Mbit/s received.
fn flow(a: &Netns, b: &Netns, logs: &std::path::Path, seconds: &str) -> Result<f64> {
    let mut server = b.command("iperf3");
    server.args(["-s", "-1", "-p", "5299"]);
    let _server = Process::spawn("iperf3 -s", server, Some(&logs.join("wan-iperf3.log")))?;
    crate::topology::wait_listening(b, 5299, 1, "iperf3")?;
    let out = a.exec(&[
        "iperf3",
        "-c",
        &ADDR_B.to_string(),
        "-p",
        "5299",
        "-t",
        seconds,
        "-J",
    ])?;
    let received = crate::wan_bench::json_number(&out, "sum_received", "bits_per_second")?;
    Ok(received / 1e6)
}

fn capped_flow(a: &Netns, b: &Netns, wan: &Wan, logs: &std::path::Path) -> Result<String> {
    let mbit = flow(a, b, logs, "4")?;
    let drops = wan.counts[0]
        .queue_drops
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(mbit <= 21.0, "{mbit:.1} Mbit/s through a 20 Mbit/s cap");
    // Not a speed claim: a link that carried nothing would pass the bound above.
    ensure!(
        mbit >= 1.0,
        "{mbit:.1} Mbit/s: the capped link hardly carries anything"
    );
    Ok(format!("{mbit:.1} Mbit/s, {drops} queue drops"))
}
