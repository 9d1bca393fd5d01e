//! The stack's shutdown as the application sees it: it holds the streams itself, blocked in
//! reads and in writes the client never drains, and every one fails at once, long before the
//! grace period ends. The readers' clients get a FIN at once, the writers' a RST at once (their
//! application had bytes queued that will never be sent), and every connection still open at
//! the deadline is reset.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prism_device::Link;
use prism_stack::{Config, Stack};
use prism_tests::Client;
use smoltcp::socket::tcp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn streams_fail_at_once(v6: bool) {
    let (stack_end, client_end) = Link::pair(4096);
    let (stack, mut requests) = Stack::new(Config::default(), stack_end);
    let control = stack.control();
    let stack = tokio::spawn(stack.run());
    let mut client = Client::new(client_end);

    // The application: half its streams (even client ports) wait to read, half write 1 MiB to
    // a client that never reads. Each reports how its operation ended.
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<io::Result<()>>();
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let reader = request.source().port() % 2 == 0;
            let mut stream = request.accept();
            let ended = ended_tx.clone();
            let _ = accepted_tx.send(());
            tokio::spawn(async move {
                let result = if reader {
                    let mut buf = [0u8; 16];
                    stream.read(&mut buf).await.map(|_| ())
                } else {
                    stream.write_all(&vec![0u8; 1 << 20]).await
                };
                let _ = ended.send(result);
            });
        }
    });

    let (local, remote) = if v6 {
        ("[fd00::2]", "[2001:db8::9]:80")
    } else {
        ("10.0.0.2", "192.0.2.9:80")
    };
    let handles: Vec<_> = (0..100u16)
        .map(|i| client.connect(addr(&format!("{local}:{}", 30000 + i)), addr(remote), 4096))
        .collect();
    let mut taken = 0;
    client
        .until("every connection accepted", |_| {
            while accepted.try_recv().is_ok() {
                taken += 1;
            }
            (taken == 100).then_some(())
        })
        .await;
    // Let the writers fill their queues and block.
    for _ in 0..20 {
        client.step().await;
    }
    assert!(
        ended.try_recv().is_err(),
        "an operation ended before the shutdown"
    );

    let grace = Duration::from_secs(3);
    let started = Instant::now();
    control.shutdown(grace);
    let mut errors = Vec::new();
    client
        .until(
            "every stream operation fails and every reader's client has a FIN",
            |c| {
                while let Ok(result) = ended.try_recv() {
                    errors.push(result.expect_err("a stream operation succeeded after shutdown"));
                }
                // Readers' clients get a FIN. Writers had bytes queued that will never be
                // sent: a FIN would pass the cut stream off as complete, so they get a RST.
                let fins = handles
                    .iter()
                    .step_by(2)
                    .all(|h| c.socket(*h).state() == tcp::State::CloseWait);
                let resets = handles
                    .iter()
                    .skip(1)
                    .step_by(2)
                    .all(|h| c.socket(*h).state() == tcp::State::Closed);
                (errors.len() == 100 && fins && resets).then_some(())
            },
        )
        .await;
    assert!(
        started.elapsed() < grace / 2,
        "streams failed only after {:?}, with a grace of {grace:?}",
        started.elapsed()
    );
    assert!(
        errors
            .iter()
            .all(|e| e.kind() == io::ErrorKind::ConnectionAborted),
        "{errors:?}"
    );

    // The clients never close their side: at the deadline they are reset and the stack ends.
    let report = tokio::time::timeout(grace + Duration::from_secs(5), stack)
        .await
        .expect("the stack ends at the deadline")
        .unwrap();
    assert!(
        started.elapsed() >= grace,
        "the stack ended before the deadline"
    );
    client.absorb_last().await;
    for h in &handles {
        assert_eq!(
            client.socket(*h).state(),
            tcp::State::Closed,
            "reset at the deadline"
        );
    }
    assert_eq!(report.open, 0);
    assert_eq!(report.counters.connections_reset, 100);
}

#[tokio::test]
async fn every_stream_fails_at_once_and_clients_get_fin_then_rst_over_ipv4() {
    streams_fail_at_once(false).await;
}

#[tokio::test]
async fn every_stream_fails_at_once_and_clients_get_fin_then_rst_over_ipv6() {
    streams_fail_at_once(true).await;
}

/// A stack whose link closes (the device died) fails the streams it leaves behind.
#[tokio::test]
async fn a_stack_that_stops_fails_its_streams() {
    let (stack_end, client_end) = Link::pair(4096);
    let (stack, mut requests) = Stack::new(Config::default(), stack_end);
    let stack = tokio::spawn(stack.run());
    let mut client = Client::new(client_end);
    let h = client.connect(addr("10.0.0.2:30000"), addr("192.0.2.9:80"), 4096);
    let mut stream = None;
    client
        .until("accepted", |c| {
            if c.socket(h).state() != tcp::State::Established {
                return None;
            }
            Some(())
        })
        .await;
    while stream.is_none() {
        client.step().await;
        if let Ok(Some(request)) =
            tokio::time::timeout(Duration::from_millis(10), requests.next()).await
        {
            stream = Some(request.accept());
        }
    }
    let mut stream = stream.unwrap();
    drop(client);
    stack.await.unwrap();
    let mut buf = [0u8; 8];
    let error = tokio::time::timeout(prism_tests::PATIENCE, stream.read(&mut buf))
        .await
        .expect("a stream of a stopped stack waits for ever")
        .unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    assert!(stream.is_reset());
    assert!(requests.next().await.is_none());
}
