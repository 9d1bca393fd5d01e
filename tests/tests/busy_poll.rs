//! Busy polling (`Config::busy_poll`): the stack carries traffic with it on, and once the
//! traffic stops the polling stops too. A test binary of its own, so that the process's CPU
//! time is this test's alone; on a runtime of one worker, as busy polling wants. It runs on
//! the real clock: what it checks is CPU time, which a paused clock cannot show.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]

use std::sync::Arc;
use std::time::Duration;

use prism_stack::Config;
use prism_tests::{Client, start_stack};
use prism_tunnel::{Connecting, Connector, Target, Upstream, serve};

/// Every connection goes to an echo in this process.
struct Echo;

impl Connector for Echo {
    fn connect<'a>(&'a self, _target: &'a Target) -> Connecting<'a> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut from, mut to) = tokio::io::split(theirs);
            let _ = tokio::io::copy(&mut from, &mut to).await;
        });
        Box::pin(async move { Ok(Box::new(ours) as Box<dyn Upstream>) })
    }
}

/// CPU time this process has used (user and system), in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command's closing parenthesis; utime and stime are the 14th and
    // 15th of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn busy_polling_carries_traffic_and_stops_when_it_does() {
    let mut config = Config::default();
    config.busy_poll = Some(Duration::from_micros(500));
    let (link, requests, counters) = start_stack(config);
    tokio::spawn(serve(requests, Arc::new(Echo), Arc::default()));
    let mut client = Client::new(link);
    let h = client.connect(
        "10.0.0.2:40000".parse().unwrap(),
        "192.0.2.1:80".parse().unwrap(),
        65536,
    );
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    let mut echoed = Vec::new();
    for round in 0..50u8 {
        client.send_all(h, &[round; 100]).await;
        client
            .until("the echo", |c| {
                let socket = c.socket(h);
                while socket.can_recv() {
                    socket
                        .recv(|b| (b.len(), echoed.extend_from_slice(b)))
                        .unwrap();
                }
                (echoed.len() == 100 * (usize::from(round) + 1)).then_some(())
            })
            .await;
    }
    let expected: Vec<u8> = (0..50u8).flat_map(|r| [r; 100]).collect();
    assert!(echoed == expected, "echo differs");
    let polled = counters.snapshot();
    assert_eq!(polled.connections_opened, 1);
    // The traffic woke the polling task: it polled between rounds instead of sleeping.
    assert!(polled.busy_poll_windows > 0, "{polled}");

    // Idle: the connection stays open, nothing moves, and the polling worker sleeps. A poller
    // that never stopped would take a whole core: about 100 ticks a second.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks() - before;
    assert!(used < 20, "an idle stack used {used} ticks of CPU in 1 s");
}
