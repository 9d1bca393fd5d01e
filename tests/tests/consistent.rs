//! The consistent handshake: the SYN-ACK waits for the application's answer; a refusal is a
//! RST, an unreachable upstream an ICMP error, silence a timeout; retransmitted SYNs are
//! absorbed; at the pending cap a SYN gets the fast handshake; a client that gives up cancels
//! its request. And the fast handshake beside it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prism_stack::{Config, Handshake, PortPolicy, Rejection, Requests};
use prism_tests::{Client, Reply, reply, start_stack, tcp_segment};
use smoltcp::socket::tcp::State;
use smoltcp::wire::TcpControl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TARGET_V4: &str = "192.0.2.1:443";
const TARGET_V6: &str = "[2001:db8::1]:443";

fn consistent() -> Config {
    let mut config = Config::default();
    config.handshake = Arc::new(Handshake::Consistent);
    config
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn syn(src: &str, dst: &str) -> bytes::Bytes {
    tcp_segment(addr(src), addr(dst), TcpControl::Syn, 7, &[])
}

async fn replies(client: &mut Client, wait_ms: u64) -> Vec<Reply> {
    client
        .capture(Duration::from_millis(wait_ms))
        .await
        .iter()
        .map(|p| reply(p))
        .collect()
}

fn syn_acks(replies: &[Reply]) -> usize {
    replies
        .iter()
        .filter(|r| {
            matches!(
                r,
                Reply::Tcp {
                    syn: true,
                    ack: true,
                    ..
                }
            )
        })
        .count()
}

async fn next_request(requests: &mut Requests) -> prism_stack::Request {
    tokio::time::timeout(Duration::from_secs(5), requests.next())
        .await
        .expect("no request within 5 s")
        .expect("the stack stopped")
}

#[tokio::test]
async fn no_syn_ack_before_the_application_accepts() {
    let (link, mut requests, _) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40000", TARGET_V4)).await;

    // The request comes first, while the client still waits.
    let request = next_request(&mut requests).await;
    assert_eq!(request.handshake(), Handshake::Consistent);
    assert_eq!(request.destination(), addr(TARGET_V4));
    let before = replies(&mut client, 150).await;
    assert!(before.is_empty(), "answered before accept: {before:?}");

    let _stream = request.accept();
    let after = replies(&mut client, 150).await;
    assert_eq!(syn_acks(&after), 1, "{after:?}");
}

#[tokio::test]
async fn a_refusal_is_a_reset() {
    let (link, mut requests, counters) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40001", TARGET_V4)).await;
    next_request(&mut requests).await.reject(Rejection::Refused);
    let got = replies(&mut client, 150).await;
    assert_eq!(syn_acks(&got), 0, "{got:?}");
    assert!(
        got.iter().any(|r| matches!(
            r,
            Reply::Tcp {
                rst: true,
                ack: true,
                ..
            }
        )),
        "no RST|ACK in {got:?}"
    );
    assert_eq!(counters.snapshot().requests_rejected, 1);
}

async fn unreachable_answer(src: &str, dst: &str, why: Rejection) -> Vec<Reply> {
    let (link, mut requests, counters) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn(src, dst)).await;
    next_request(&mut requests).await.reject(why);
    let got = replies(&mut client, 150).await;
    assert_eq!(counters.snapshot().unreachable_sent, 1);
    got
}

#[tokio::test]
async fn an_unreachable_upstream_is_an_icmp_error_quoting_the_syn() {
    let cases = [
        (Rejection::NetworkUnreachable, 0),
        (Rejection::HostUnreachable, 1),
        (Rejection::Prohibited, 13),
    ];
    for (why, code) in cases {
        let got = unreachable_answer("10.0.0.2:40002", TARGET_V4, why).await;
        let expected = Reply::Icmp {
            v6: false,
            kind: 3,
            code,
            quotes_port: 40002,
        };
        assert_eq!(got, [expected], "{why:?}");
    }
    let cases = [
        (Rejection::NetworkUnreachable, 0),
        (Rejection::HostUnreachable, 3),
        (Rejection::Prohibited, 1),
    ];
    for (why, code) in cases {
        let got = unreachable_answer("[fd00::2]:40003", TARGET_V6, why).await;
        let expected = Reply::Icmp {
            v6: true,
            kind: 1,
            code,
            quotes_port: 40003,
        };
        assert_eq!(got, [expected], "{why:?}");
    }
}

#[tokio::test]
async fn an_unanswered_request_times_out_as_host_unreachable() {
    let mut config = consistent();
    config.pending_timeout = Duration::from_millis(200);
    let (link, mut requests, counters) = start_stack(config);
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40004", TARGET_V4)).await;
    let request = next_request(&mut requests).await; // held, never answered
    let early = replies(&mut client, 100).await;
    assert!(early.is_empty(), "{early:?}");
    let late = replies(&mut client, 400).await;
    let expected = Reply::Icmp {
        v6: false,
        kind: 3,
        code: 1,
        quotes_port: 40004,
    };
    assert_eq!(late, [expected]);
    assert_eq!(counters.snapshot().pending_timeouts, 1);
    // Answering after the timeout changes nothing.
    let _stream = request.accept();
    assert!(replies(&mut client, 100).await.is_empty());
}

#[tokio::test]
async fn syn_retransmits_while_pending_are_absorbed() {
    let (link, mut requests, counters) = start_stack(consistent());
    let mut client = Client::new(link);
    let first = syn("10.0.0.2:40005", TARGET_V4);
    for _ in 0..3 {
        client.inject(first.clone()).await;
    }
    let request = next_request(&mut requests).await;
    let again = tokio::time::timeout(Duration::from_millis(200), requests.next()).await;
    assert!(
        again.is_err(),
        "a retransmitted SYN issued a second request"
    );
    assert!(replies(&mut client, 50).await.is_empty());
    let c = counters.snapshot();
    assert_eq!((c.connections_opened, c.syn_absorbed), (1, 2), "{c}");
    drop(request.accept());
    assert_eq!(syn_acks(&replies(&mut client, 150).await), 1);
}

#[tokio::test]
async fn at_the_pending_cap_a_syn_gets_the_fast_handshake() {
    let mut config = consistent();
    config.max_pending = 2;
    let (link, mut requests, counters) = start_stack(config);
    let mut client = Client::new(link);
    for port in [40010, 40011] {
        client
            .inject(syn(&format!("10.0.0.2:{port}"), TARGET_V4))
            .await;
    }
    assert!(replies(&mut client, 100).await.is_empty());
    client.inject(syn("10.0.0.2:40012", TARGET_V4)).await;
    let got = replies(&mut client, 150).await;
    assert_eq!(
        syn_acks(&got),
        1,
        "the third SYN is answered at once: {got:?}"
    );
    let _held = (
        next_request(&mut requests).await,
        next_request(&mut requests).await,
    );
    let c = counters.snapshot();
    assert_eq!(
        (
            c.connections_opened,
            c.consistent_as_fast,
            c.syn_cookies_sent
        ),
        (3, 1, 0),
        "{c}"
    );
}

fn rst(src: &str, dst: &str) -> bytes::Bytes {
    tcp_segment(addr(src), addr(dst), TcpControl::Rst, 8, &[])
}

#[tokio::test]
async fn a_request_whose_client_resets_is_cancelled() {
    let (link, mut requests, _) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40020", TARGET_V4)).await;
    let request = next_request(&mut requests).await;
    assert!(!request.is_cancelled());
    client.inject(rst("10.0.0.2:40020", TARGET_V4)).await;
    tokio::time::timeout(Duration::from_secs(5), request.cancelled())
        .await
        .expect("the request is cancelled");
    assert!(request.is_cancelled());
    // Accepting it changes nothing: no SYN-ACK.
    drop(request.accept());
    assert!(replies(&mut client, 150).await.is_empty());
}

/// Found by the hostile test's check that nothing is left once the timers run out: the
/// connection stayed in smoltcp's Listen for ever.
#[tokio::test]
async fn a_reset_after_the_application_accepted_ends_the_connection() {
    let (link, mut requests, counters) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40025", TARGET_V4)).await;
    drop(next_request(&mut requests).await.accept());
    assert_eq!(syn_acks(&replies(&mut client, 100).await), 1);
    client.inject(rst("10.0.0.2:40025", TARGET_V4)).await;
    replies(&mut client, 100).await;
    let c = counters.snapshot();
    assert_eq!(c.connections_reset, 1, "{c}");
}

#[tokio::test]
async fn a_request_cancelled_while_queued_is_never_offered() {
    let (link, mut requests, _) = start_stack(consistent());
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40021", TARGET_V4)).await;
    client.inject(rst("10.0.0.2:40021", TARGET_V4)).await;
    client.inject(syn("10.0.0.2:40022", TARGET_V4)).await;
    assert!(replies(&mut client, 100).await.is_empty());
    let first = next_request(&mut requests).await;
    assert_eq!(first.source(), addr("10.0.0.2:40022"));
}

#[tokio::test]
async fn an_accepted_consistent_connection_carries_bytes() {
    let (link, mut requests, _) = start_stack(consistent());
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            // The "upstream" takes a while to connect; the client waits in SYN-SENT.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut stream = request.accept();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                stream.read_to_end(&mut buf).await.unwrap();
                stream.write_all(&buf).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    let mut client = Client::new(link);
    let h = client.connect(addr("10.0.0.2:40020"), addr(TARGET_V4), 65536);
    let started = tokio::time::Instant::now();
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "established before accept"
    );
    client.send_all(h, b"consistent").await;
    client.socket(h).close();
    assert_eq!(client.recv_to_end(h).await, b"consistent");
}

#[tokio::test]
async fn a_consistent_refusal_fails_the_clients_connect() {
    let (link, mut requests, _) = start_stack(consistent());
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            request.reject(Rejection::Refused);
        }
    });
    let mut client = Client::new(link);
    let h = client.connect(addr("10.0.0.2:40021"), addr(TARGET_V4), 4096);
    client
        .until("the refusal", |c| {
            (c.socket(h).state() == State::Closed).then_some(())
        })
        .await;
}

#[tokio::test]
async fn a_port_policy_mixes_both_modes() {
    let mut config = Config::default();
    config.handshake = Arc::new(PortPolicy {
        default: Handshake::Fast,
        ports: HashMap::from([(443, Handshake::Consistent)]),
    });
    let (link, mut requests, _) = start_stack(config);
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40030", "192.0.2.1:80")).await;
    client.inject(syn("10.0.0.2:40031", "192.0.2.1:443")).await;
    // Port 80 is fast: its SYN-ACK comes at once. Port 443 waits.
    let got = replies(&mut client, 150).await;
    assert_eq!(syn_acks(&got), 1, "{got:?}");
    let request = next_request(&mut requests).await;
    assert_eq!(request.destination().port(), 443);
    assert_eq!(request.handshake(), Handshake::Consistent);
}

/// A connect that never completes; each one, when dropped, sends its target on the channel.
struct Hangs(tokio::sync::mpsc::UnboundedSender<String>);

impl prism_tunnel::Connector for Hangs {
    fn connect<'a>(&'a self, target: &'a prism_tunnel::Target) -> prism_tunnel::Connecting<'a> {
        struct Dropped(tokio::sync::mpsc::UnboundedSender<String>, String);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(std::mem::take(&mut self.1));
            }
        }
        let dropped = Dropped(self.0.clone(), target.to_string());
        Box::pin(async move {
            let _dropped = dropped;
            std::future::pending().await
        })
    }
}

#[tokio::test]
async fn serve_drops_the_connect_of_a_cancelled_request() {
    let (link, requests, _) = start_stack(consistent());
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Arc::new(prism_tunnel::Counters::default());
    tokio::spawn(prism_tunnel::serve(
        requests,
        Arc::new(Hangs(dropped_tx)),
        Arc::clone(&upstream),
    ));
    let mut client = Client::new(link);
    client.inject(syn("10.0.0.2:40030", "192.0.2.7:80")).await;
    // The connect is under way when the client gives up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.inject(rst("10.0.0.2:40030", "192.0.2.7:80")).await;
    let gone = tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the cancelled request's connect was not dropped")
        .unwrap();
    assert_eq!(gone, "192.0.2.7:80");
    let u = upstream.snapshot();
    assert_eq!((u.connects, u.cancelled), (1, 1), "{u}");
}
