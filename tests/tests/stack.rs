//! The whole stack in process: a smoltcp client on an in-memory link, Prism, `serve` with a
//! connector that sends every connection to a server on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prism_stack::{Config, Counters, Rejection, Requests};
use prism_tests::{
    Client, PATIENCE, Reply, emit_tcp, reply, start_stack, tcp_ack, tcp_data, tcp_v4,
};
use prism_tunnel::{ConnectError, Connecting, Connector, Target, Upstream, serve};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CLIENT_V4: &str = "10.0.0.2";
const TARGET_V4: &str = "192.0.2.1:80";
const TARGET_V6: &str = "[2001:db8::1]:443";

/// Sends every connection to one loopback address, whatever its destination.
struct Redirect(SocketAddr);

impl Connector for Redirect {
    fn connect<'a>(&'a self, _target: &'a Target) -> Connecting<'a> {
        Box::pin(async move {
            let stream = TcpStream::connect(self.0).await?;
            Ok(Box::new(stream) as Box<dyn Upstream>)
        })
    }
}

/// A loopback server running `handler` for each connection; what the handler returns is sent
/// on the returned channel.
async fn upstream<T, F, Fut>(handler: F) -> (SocketAddr, mpsc::UnboundedReceiver<T>)
where
    T: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, tx) = (Arc::clone(&handler), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(handler(stream).await);
            });
        }
    });
    (addr, rx)
}

/// A stack serving through `Redirect(to)`, and a client on it.
fn prism_to(to: SocketAddr, config: Config) -> (Client, Arc<prism_stack::Counters>) {
    let (link, requests, counters) = start_stack(config);
    tokio::spawn(serve(requests, Arc::new(Redirect(to)), Arc::default()));
    (Client::new(link), counters)
}

fn local(port: u16, v6: bool) -> SocketAddr {
    if v6 {
        format!("[fd00::2]:{port}").parse().unwrap()
    } else {
        format!("{CLIENT_V4}:{port}").parse().unwrap()
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0; 65536];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        stream.write_all(&buf[..n]).await.unwrap();
    }
    stream.shutdown().await.unwrap();
    all
}

/// Every connection goes to an echo in this process over a tokio duplex pipe: an upstream
/// without read readiness, which the relay serves with a buffer held while it waits.
struct InMemoryEcho(mpsc::UnboundedSender<Vec<u8>>);

impl Connector for InMemoryEcho {
    fn connect<'a>(&'a self, _target: &'a Target) -> Connecting<'a> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let seen = self.0.clone();
        tokio::spawn(async move {
            let _ = seen.send(echo(theirs).await);
        });
        Box::pin(async move { Ok::<Box<dyn Upstream>, ConnectError>(Box::new(ours)) })
    }
}

async fn bytes_both_ways(v6: bool) {
    let (addr, seen) = upstream(echo).await;
    let (client, counters) = prism_to(addr, Config::default());
    exchange_four_mib(client, counters, seen, v6).await;
}

async fn exchange_four_mib(
    mut client: Client,
    counters: Arc<prism_stack::Counters>,
    mut seen: mpsc::UnboundedReceiver<Vec<u8>>,
    v6: bool,
) {
    let target = if v6 { TARGET_V6 } else { TARGET_V4 };
    let h = client.connect(local(40000, v6), target.parse().unwrap(), 256 * 1024);
    let message = data(4 * 1024 * 1024, 7);

    // Send and receive at once: the echo comes back while we are still sending.
    let mut sent = 0;
    let mut echoed = Vec::new();
    client
        .until("the whole echo", |c| {
            let socket = c.socket(h);
            if socket.may_send() && sent < message.len() {
                sent += socket.send_slice(&message[sent..]).unwrap();
                if sent == message.len() {
                    socket.close();
                }
            }
            while socket.can_recv() {
                socket
                    .recv(|b| (b.len(), echoed.extend_from_slice(b)))
                    .unwrap();
            }
            (echoed.len() == message.len() && !socket.may_recv()).then_some(())
        })
        .await;
    assert!(echoed == message, "echo differs");
    let received = client
        .until("the upstream's EOF", |_| seen.try_recv().ok())
        .await;
    assert!(received == message, "the upstream got different bytes");
    let counters = counters.snapshot();
    assert_eq!(counters.connections_opened, 1);
    assert_eq!(counters.drop_checksum + counters.drop_truncated, 0);
    // A bulk transfer outgrows the initial buffers both ways (the send buffer again if it
    // drained and was released on the way).
    assert_eq!(counters.rx_buffers_grown, 1);
    assert!(counters.tx_buffers_grown >= 1, "{counters}");
}

#[tokio::test]
async fn a_conversation_of_small_messages_keeps_the_initial_buffers() {
    let (addr, mut seen) = upstream(echo).await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let h = client.connect(local(40003, false), TARGET_V4.parse().unwrap(), 65536);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    let mut echoed = Vec::new();
    let mut expected = Vec::new();
    for round in 0..20 {
        // Under half the initial buffer: no burst ever fills it.
        let message = data(300, round);
        client.send_all(h, &message).await;
        expected.extend_from_slice(&message);
        client
            .until("the echo", |c| {
                let socket = c.socket(h);
                while socket.can_recv() {
                    socket
                        .recv(|b| (b.len(), echoed.extend_from_slice(b)))
                        .unwrap();
                }
                (echoed.len() == expected.len()).then_some(())
            })
            .await;
    }
    assert!(echoed == expected, "echo differs");
    let grown = counters.snapshot();
    assert_eq!((grown.rx_buffers_grown, grown.tx_buffers_grown), (0, 0));
    // Each echo, once acknowledged, gave its send buffer back: the connection idles without one
    // (the last echo's acknowledgement may still be on its way).
    assert!(grown.tx_buffers_released >= 19, "{grown}");
    // And its receive buffer: after the handshake, and each request once the application
    // had it; the client's pure ACKs of the echoes bring none back (else about 40).
    assert!((19..=21).contains(&grown.rx_buffers_released), "{grown}");

    // One message larger than the initial buffers grows both, and arrives whole.
    let large = data(100_000, 99);
    client.send_all(h, &large).await;
    client.socket(h).close();
    let rest = client.recv_to_end(h).await;
    assert!(rest == large, "the large echo differs");
    let received = client
        .until("the upstream's EOF", |_| seen.try_recv().ok())
        .await;
    assert_eq!(received.len(), expected.len() + large.len());
    let grown = counters.snapshot();
    assert_eq!(grown.rx_buffers_grown, 1);
    assert!(grown.tx_buffers_grown >= 1, "{grown}");
}

#[tokio::test]
async fn the_syn_ack_offers_the_initial_window_scaled_for_the_full_buffer() {
    let (link, _requests, _counters) = start_stack(Config::default());
    let mut client = Client::new(link);
    let (src, dst) = (addr("10.0.0.2:50001"), addr(TARGET_V4));
    client
        .inject(tcp_v4(src, dst, TcpControl::Syn, 1000, &[]))
        .await;
    let replies = client.capture(Duration::from_millis(200)).await;
    let syn_ack = replies
        .iter()
        .find_map(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            let repr = TcpRepr::parse(
                &tcp,
                &ip.src_addr().into(),
                &ip.dst_addr().into(),
                &ChecksumCapabilities::ignored(),
            )
            .ok()?;
            (repr.control == TcpControl::Syn).then_some((repr.window_len, repr.window_scale))
        })
        .expect("no SYN-ACK");
    // The window a SYN carries is never scaled: the initial buffer. The scale covers the
    // 256 KiB the buffer may grow to (2^18 needs a shift of 3).
    assert_eq!(
        syn_ack,
        (prism_stack::DEFAULT_TCP_INITIAL_BUFFER as u16, Some(3))
    );
}

#[tokio::test]
async fn four_mib_cross_intact_both_ways_over_ipv4() {
    bytes_both_ways(false).await;
}

#[tokio::test]
async fn four_mib_cross_intact_both_ways_over_ipv6() {
    bytes_both_ways(true).await;
}

#[tokio::test]
async fn an_upstream_without_read_readiness_carries_the_same_bytes() {
    let (tx, seen) = mpsc::unbounded_channel();
    let (link, requests, counters) = start_stack(Config::default());
    tokio::spawn(serve(requests, Arc::new(InMemoryEcho(tx)), Arc::default()));
    exchange_four_mib(Client::new(link), counters, seen, false).await;
}

#[tokio::test]
async fn after_the_clients_fin_the_upstreams_rest_still_arrives() {
    // The upstream reads to EOF first, then answers: only possible if our FIN reached it as
    // a half-close and its answer still reaches us.
    let (addr, _seen) = upstream(|mut s: TcpStream| async move {
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        s.write_all(&request.repeat(3)).await.unwrap();
    })
    .await;
    let (mut client, _) = prism_to(addr, Config::default());
    let h = client.connect(local(40001, false), TARGET_V4.parse().unwrap(), 65536);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    client.send_all(h, b"question").await;
    client.socket(h).close();
    let answer = client.recv_to_end(h).await;
    assert_eq!(answer, b"questionquestionquestion");
}

#[tokio::test]
async fn after_the_upstreams_fin_the_client_can_still_send() {
    let (addr, mut seen) = upstream(|mut s: TcpStream| async move {
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    })
    .await;
    let (mut client, _) = prism_to(addr, Config::default());
    let h = client.connect(local(40002, false), TARGET_V4.parse().unwrap(), 65536);
    let greeting = client.recv_to_end(h).await;
    assert_eq!(greeting, b"bye");
    assert_eq!(
        client.socket(h).state(),
        State::CloseWait,
        "the upstream's FIN did not arrive"
    );
    client.send_all(h, b"still talking").await;
    client.socket(h).close();
    let rest = client
        .until("the upstream's EOF", |_| seen.try_recv().ok())
        .await;
    assert_eq!(rest, b"still talking");
}

#[tokio::test]
async fn a_client_reset_reaches_the_upstream() {
    let (addr, mut seen) = upstream(|mut s: TcpStream| async move {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "eof",
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset",
                Err(_) => return "error",
            }
        }
    })
    .await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let h = client.connect(local(40003, false), TARGET_V4.parse().unwrap(), 65536);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    client.send_all(h, b"hello").await;
    // Let the upstream connection come up before resetting.
    client
        .until("the request served", |_| {
            (counters.snapshot().requests_offered == 1).then_some(())
        })
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.socket(h).abort();
    let ending = client
        .until("the upstream's verdict", |_| seen.try_recv().ok())
        .await;
    assert_eq!(ending, "reset");
}

#[tokio::test]
async fn an_upstream_reset_reaches_the_client() {
    let (addr, _seen) = upstream(|mut s: TcpStream| async move {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.set_zero_linger().unwrap();
    })
    .await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let h = client.connect(local(40004, false), TARGET_V4.parse().unwrap(), 65536);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    client.send_all(h, b"hello").await;
    client
        .until("a reset", |c| {
            (c.socket(h).state() == State::Closed).then_some(())
        })
        .await;
    assert_eq!(counters.snapshot().connections_reset, 1);
}

#[tokio::test]
async fn a_rejected_request_resets_the_client() {
    let (link, mut requests, counters) = start_stack(Config::default());
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            request.reject(Rejection::Refused);
        }
    });
    let mut client = Client::new(link);
    let h = client.connect(local(40005, false), TARGET_V4.parse().unwrap(), 4096);
    client
        .until("a reset", |c| {
            (c.socket(h).state() == State::Closed).then_some(())
        })
        .await;
    let counters = counters.snapshot();
    assert_eq!(
        (counters.requests_rejected, counters.connections_reset),
        (1, 1)
    );
}

#[tokio::test]
async fn an_application_that_stopped_listening_resets_new_clients() {
    let (link, requests, counters) = start_stack(Config::default());
    drop(requests);
    let mut client = Client::new(link);
    let h = client.connect(local(40006, false), TARGET_V4.parse().unwrap(), 4096);
    client
        .until("a reset", |c| {
            (c.socket(h).state() == State::Closed).then_some(())
        })
        .await;
    assert_eq!(counters.snapshot().requests_dropped, 1);
}

#[tokio::test]
async fn two_hundred_connections_at_once_each_get_their_own_bytes() {
    let (addr, _seen) = upstream(echo).await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let handles: Vec<_> = (0..200u16)
        .map(|i| client.connect(local(41000 + i, false), TARGET_V4.parse().unwrap(), 8192))
        .collect();
    client
        .until("all established", |c| {
            handles
                .iter()
                .all(|&h| c.socket(h).may_send())
                .then_some(())
        })
        .await;
    for (i, &h) in handles.iter().enumerate() {
        let message = data(1000, i as u8);
        assert_eq!(client.socket(h).send_slice(&message).unwrap(), 1000);
        client.socket(h).close();
    }
    let mut got = vec![Vec::new(); handles.len()];
    client
        .until("every echo", |c| {
            let mut done = true;
            for (i, &h) in handles.iter().enumerate() {
                let socket = c.socket(h);
                while socket.can_recv() {
                    socket
                        .recv(|b| (b.len(), got[i].extend_from_slice(b)))
                        .unwrap();
                }
                done &= !socket.may_recv() && !socket.can_recv();
            }
            done.then_some(())
        })
        .await;
    for (i, echoed) in got.iter().enumerate() {
        assert_eq!(*echoed, data(1000, i as u8), "connection {i}");
    }
    assert_eq!(counters.snapshot().connections_opened, 200);
}

// Raw packets: what the stack answers to SYNs and junk, seen on the wire.

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// (SYN-ACKs, RSTs) among captured packets.
fn count_replies(packets: &[Bytes]) -> (usize, usize) {
    let replies: Vec<Reply> = packets.iter().map(|p| reply(p)).collect();
    let syn_acks = replies
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
        .count();
    let rsts = replies
        .iter()
        .filter(|r| matches!(r, Reply::Tcp { rst: true, .. }))
        .count();
    (syn_acks, rsts)
}

#[tokio::test]
async fn a_retransmitted_syn_creates_nothing_new() {
    let (link, _requests, counters) = start_stack(Config::default());
    let mut client = Client::new(link);
    let syn = tcp_v4(
        addr("10.0.0.2:50000"),
        addr(TARGET_V4),
        TcpControl::Syn,
        1000,
        &[],
    );
    client.inject(syn.clone()).await;
    client.inject(syn.clone()).await;
    client.inject(syn).await;
    let replies = client.capture(Duration::from_millis(200)).await;
    let (syn_acks, rsts) = count_replies(&replies);
    assert!(syn_acks >= 1, "no SYN-ACK in {replies:?}");
    assert_eq!(rsts, 0);
    let counters = counters.snapshot();
    assert_eq!(counters.connections_opened, 1, "{counters}");
}

/// A stack whose half-open cap of `cap` is full: `cap` handshakes that never complete, as from
/// spoofed sources (ports 50001 on), to [`TARGET_V4`].
async fn at_the_cap(cap: u16) -> (Client, Requests, Arc<Counters>) {
    let mut config = Config::default();
    config.max_half_open = usize::from(cap);
    let (link, requests, counters) = start_stack(config);
    let mut client = Client::new(link);
    for port in 50001..50001 + cap {
        let src = addr(&format!("10.0.0.2:{port}"));
        client
            .inject(tcp_v4(src, addr(TARGET_V4), TcpControl::Syn, 1, &[]))
            .await;
    }
    (client, requests, counters)
}

#[tokio::test]
async fn at_the_half_open_cap_syns_are_answered_with_cookies() {
    let (mut client, mut requests, counters) = at_the_cap(2).await;
    let replies = client.capture(Duration::from_millis(100)).await;
    assert_eq!(count_replies(&replies), (2, 0), "{replies:?}");

    // A real client beyond the cap gets a SYN-ACK that keeps no state; its ACK opens the
    // connection, which carries bytes both ways.
    let h = client.connect(addr("10.0.0.2:50004"), addr(TARGET_V4), 4096);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    let c = counters.snapshot();
    assert_eq!(
        (
            c.connections_opened,
            c.syn_cookies_sent,
            c.syn_cookies_accepted
        ),
        (3, 1, 1),
        "{c}"
    );
    let request = tokio::time::timeout(PATIENCE, requests.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.source(), addr("10.0.0.2:50004"));
    let mut stream = request.accept();
    client.send_all(h, b"hello").await;
    let mut got = [0; 5];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hello");
    stream.write_all(b"world").await.unwrap();
    let echoed = client
        .until("the answer", |c| {
            let socket = c.socket(h);
            socket.can_recv().then(|| {
                let mut buf = [0; 5];
                let n = socket.recv_slice(&mut buf).unwrap();
                buf[..n].to_vec()
            })
        })
        .await;
    assert_eq!(echoed, b"world");

    // While cookies are in use, a segment that proves none is dropped without an answer.
    client
        .inject(tcp_ack(addr("10.0.0.2:50009"), addr(TARGET_V4), 2, 1))
        .await;
    let replies = client.capture(Duration::from_millis(200)).await;
    assert_eq!(count_replies(&replies), (0, 0), "{replies:?}");
    assert_eq!(counters.snapshot().no_connection, 1);
}

/// What the stack sent to one port, read from an IPv4 packet.
#[derive(Debug)]
struct Sent {
    syn: bool,
    seq: u32,
    window: u16,
    window_scale: Option<u8>,
    sack_permitted: bool,
    /// The first SACK block's (left, right) edges.
    sack: Option<(u32, u32)>,
    timestamp: Option<TcpTimestampRepr>,
    len: usize,
}

fn sent_to(replies: &[Bytes], port: u16) -> Vec<Sent> {
    replies
        .iter()
        .filter_map(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
            let t = TcpRepr::parse(&tcp, &src, &dst, &ChecksumCapabilities::ignored()).ok()?;
            (t.dst_port == port).then(|| Sent {
                syn: t.control == TcpControl::Syn,
                seq: t.seq_number.0 as u32,
                window: t.window_len,
                window_scale: t.window_scale,
                sack_permitted: t.sack_permitted,
                sack: t.sack_ranges[0],
                timestamp: t.timestamp,
                len: t.payload.len(),
            })
        })
        .collect()
}

/// A client with timestamps keeps them, SACK and window scaling through a SYN cookie: the
/// SYN-ACK offers them, with the window scale Prism's socket then applies, and the connection
/// runs with all three both ways.
#[tokio::test]
async fn a_cookie_keeps_the_clients_timestamps_sack_and_window_scale() {
    let (mut client, mut requests, counters) = at_the_cap(1).await;
    let (me, target) = (addr("10.0.0.2:50004"), addr(TARGET_V4));
    const ISN: u32 = 1000;
    let segment = |control, seq: u32, ack: Option<u32>, window_len, payload| TcpRepr {
        src_port: me.port(),
        dst_port: target.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let syn = TcpRepr {
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: true,
        timestamp: Some(TcpTimestampRepr::new(100, 0)),
        ..segment(TcpControl::Syn, ISN, None, 64_240, &[])
    };
    client.inject(emit_tcp(me, target, &syn)).await;
    let replies = client.capture(Duration::from_millis(100)).await;
    let sent = sent_to(&replies, me.port());
    let synack = sent.first().expect("no SYN-ACK");
    assert!(synack.syn, "{synack:?}");
    assert_eq!(counters.snapshot().syn_cookies_sent, 1);
    // Prism's scale for its 256 KiB receive buffer, SACK, and the client's timestamp echoed.
    assert_eq!(
        (synack.window_scale, synack.sack_permitted),
        (Some(3), true)
    );
    let ts = synack.timestamp.expect("no timestamp in the SYN-ACK");
    assert_eq!(ts.tsecr, 100);

    // The ACK echoes it, with data, offering a window of 1,000 << 7 = 128,000 bytes.
    let cookie = synack.seq;
    let first = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(101, ts.tsval)),
        ..segment(TcpControl::None, ISN + 1, Some(cookie + 1), 1000, b"hello")
    };
    client.inject(emit_tcp(me, target, &first)).await;
    let request = tokio::time::timeout(PATIENCE, requests.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counters.snapshot().syn_cookies_accepted, 1);
    let mut stream = request.accept();
    let mut got = [0; 5];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hello");

    // SACK: a segment past a hole is acknowledged with a SACK block.
    let past_hole = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(102, ts.tsval)),
        ..segment(TcpControl::None, ISN + 16, Some(cookie + 1), 1000, b"abc")
    };
    client.inject(emit_tcp(me, target, &past_hole)).await;
    let replies = client.capture(Duration::from_millis(100)).await;
    let sacked = sent_to(&replies, me.port());
    assert!(
        sacked.iter().any(|s| s.sack == Some((ISN + 16, ISN + 19))),
        "no SACK block for the segment past the hole: {sacked:?}"
    );

    // The client's scale: with no congestion control, Prism sends up to the whole 128,000-byte
    // window before any ACK (1,000 bytes had it lost the scale). Every segment has a
    // timestamp echoing the client's latest, and a window scaled by 3: the receive buffer's
    // 1 KiB as 128 (1,024 had the socket not applied the scale its SYN-ACK offered).
    stream.write_all(&[7; 200_000]).await.unwrap();
    let replies = client.capture(Duration::from_millis(300)).await;
    let data = sent_to(&replies, me.port());
    let bytes: usize = data.iter().map(|s| s.len).sum();
    assert!(
        bytes > 65_535 && bytes <= 128_000,
        "{bytes} bytes sent into a 128,000-byte window"
    );
    for s in &data {
        let echoed = s.timestamp.map(|t| t.tsecr);
        assert!(matches!(echoed, Some(101 | 102)), "{s:?}");
        assert!(s.window <= 1024 >> 3, "an unscaled window: {s:?}");
    }
}

/// From the stack's IPv4 SYN-ACK, first among `replies`: what acknowledges it, and the window
/// it offered.
fn synack(replies: &[Bytes]) -> (u32, usize) {
    let ip = Ipv4Packet::new_checked(&replies[0][..]).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.syn() && tcp.ack(), "not a SYN-ACK: {tcp}");
    (
        (tcp.seq_number() + 1).0 as u32,
        usize::from(tcp.window_len()),
    )
}

/// Found by the `stack` fuzz target: a client that sent more than its SYN-ACK's window right
/// after the handshake made smoltcp panic (the SYN-ACK's unscaled window was read as scaled).
#[tokio::test]
async fn a_client_that_overruns_the_synack_window_gets_only_the_window() {
    let (link, mut requests, _) = start_stack(Config::default());
    let mut client = Client::new(link);
    let src = addr("10.0.0.2:50100");
    client
        .inject(tcp_v4(src, addr(TARGET_V4), TcpControl::Syn, 1, &[]))
        .await;
    let (ack, offered) = synack(&client.capture(Duration::from_millis(100)).await);
    client
        .inject(tcp_data(src, addr(TARGET_V4), 2, ack, &[7; 4000]))
        .await;
    let mut stream = tokio::time::timeout(PATIENCE, requests.next())
        .await
        .unwrap()
        .unwrap()
        .accept();
    let mut got = vec![0; 4000];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, offered, "exactly the window the SYN-ACK offered");
}

/// Completes a handshake by hand from `src` (the client then never answers again) and returns
/// the accepted stream.
async fn hand_made_connection(
    client: &mut Client,
    requests: &mut prism_stack::Requests,
    src: SocketAddr,
) -> prism_stack::Stream {
    client
        .inject(tcp_v4(src, addr(TARGET_V4), TcpControl::Syn, 1, &[]))
        .await;
    let (ack, _) = synack(&client.capture(Duration::from_millis(100)).await);
    client.inject(tcp_ack(src, addr(TARGET_V4), 2, ack)).await;
    tokio::time::timeout(PATIENCE, requests.next())
        .await
        .unwrap()
        .unwrap()
        .accept()
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_answering_is_given_up_but_an_idle_one_is_not() {
    let (link, mut requests, counters) = start_stack(Config::default());
    let mut client = Client::new(link);
    let mut silent = hand_made_connection(&mut client, &mut requests, addr("10.0.0.2:50200")).await;
    let _idle = hand_made_connection(&mut client, &mut requests, addr("10.0.0.2:50201")).await;
    // Data for the first client, which never acknowledges it.
    silent.write_all(b"anyone there?").await.unwrap();
    client.capture(Duration::from_secs(110)).await;
    assert_eq!(counters.snapshot().gave_up, 0, "too early");
    client.capture(Duration::from_secs(20)).await;
    let c = counters.snapshot();
    assert_eq!((c.gave_up, c.connections_reset), (1, 1), "{c}");
    let mut buf = [0; 8];
    assert!(
        silent.read(&mut buf).await.is_err(),
        "the stream sees the reset"
    );
    // The idle one waits on nothing and lives on.
    client.capture(Duration::from_secs(600)).await;
    let c = counters.snapshot();
    assert_eq!(
        (c.gave_up, c.connections_reset, c.connections_closed),
        (1, 1, 0),
        "{c}"
    );
}

#[tokio::test]
async fn a_segment_for_no_connection_is_reset() {
    let (link, _requests, counters) = start_stack(Config::default());
    let mut client = Client::new(link);
    let stray = tcp_v4(
        addr("10.0.0.2:50004"),
        addr(TARGET_V4),
        TcpControl::Psh,
        5,
        b"data",
    );
    client.inject(stray).await;
    let replies = client.capture(Duration::from_millis(200)).await;
    assert_eq!(count_replies(&replies), (0, 1));
    assert_eq!(counters.snapshot().no_connection, 1);
}

#[tokio::test]
async fn a_syn_to_port_zero_is_dropped_and_counted() {
    let (link, _requests, counters) = start_stack(Config::default());
    let mut client = Client::new(link);
    let syn = tcp_v4(
        addr("10.0.0.2:50005"),
        addr("192.0.2.1:0"),
        TcpControl::Syn,
        5,
        &[],
    );
    client.inject(syn).await;
    let replies = client.capture(Duration::from_millis(200)).await;
    let c = counters.snapshot();
    assert!(replies.is_empty(), "{replies:?}");
    assert_eq!(
        (c.no_connection, c.connections_opened, c.segments_in),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn junk_is_counted_and_changes_nothing_else() {
    let (addr_up, _seen) = upstream(echo).await;
    let (mut client, counters) = prism_to(addr_up, Config::default());
    let good = tcp_v4(
        addr("10.0.0.2:50005"),
        addr(TARGET_V4),
        TcpControl::Syn,
        1,
        &[],
    );

    let mut bad_checksum = good.to_vec();
    let last = bad_checksum.len() - 1;
    bad_checksum[last - 10] ^= 0x55; // inside the TCP header: checksum fails
    let mut udp = good.to_vec();
    udp[9] = 17; // protocol UDP
    let ip = &mut smoltcp::wire::Ipv4Packet::new_unchecked(&mut udp[..]);
    ip.fill_checksum();
    let junk = [
        Bytes::new(),
        Bytes::from_static(&[0xff; 40]),
        good.slice(..30),
        Bytes::from(bad_checksum),
        Bytes::from(udp),
    ];
    for packet in junk {
        client.inject(packet).await;
    }
    let replies = client.capture(Duration::from_millis(100)).await;
    assert!(replies.is_empty(), "junk was answered: {replies:?}");

    // The stack still serves.
    let h = client.connect(local(40007, false), TARGET_V4.parse().unwrap(), 4096);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;

    let c = counters.snapshot();
    assert_eq!(c.drop_version, 2, "{c}");
    assert_eq!(c.drop_truncated, 1, "{c}");
    assert_eq!(c.drop_checksum, 1, "{c}");
    assert_eq!(c.drop_not_tcp, 1, "{c}");
    assert_eq!(c.connections_opened, 1, "{c}");
}

/// 10.0.0.2 -> 192.0.2.1, UDP with `payload` bytes and a valid IPv4 header.
fn udp_v4(payload: &[u8]) -> Bytes {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 2]);
    p[16..20].copy_from_slice(&[192, 0, 2, 1]);
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    smoltcp::wire::Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
    Bytes::from(p)
}

#[tokio::test]
async fn other_protocols_are_diverted_whole_and_a_full_taker_is_counted() {
    let (stack_end, client_end) = prism_device::Link::pair(64);
    let (mut stack, _requests) = prism_stack::Stack::new(Config::default(), stack_end);
    let mut others = stack.divert_other_protocols(1);
    let counters = stack.counters();
    tokio::spawn(stack.run());

    let (first, second) = (udp_v4(b"first"), udp_v4(b"second"));
    client_end.send(first.clone()).await.unwrap();
    client_end.send(second).await.unwrap();
    // Nothing is taken until both are in: the queue holds one, the other is dropped.
    tokio::time::timeout(Duration::from_secs(5), async {
        while counters.snapshot().drop_divert_full == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the second packet is counted as dropped");
    assert_eq!(
        others.packets.recv().await,
        Some(first),
        "diverted as it came"
    );
    let snapshot = counters.snapshot();
    assert_eq!((snapshot.diverted, snapshot.drop_divert_full), (1, 1));
    assert_eq!(snapshot.drop_not_tcp, 0);
}

#[tokio::test]
async fn a_syn_on_the_tuple_of_a_closing_connection_opens_a_new_one() {
    // The client closes first and leaves without acknowledging Prism's FIN (as when that ACK
    // is lost, or still in the same batch as the new SYN), then reuses its port at once, as
    // Linux does from TIME-WAIT when the peer sent timestamps.
    let (addr, _seen) = upstream(echo).await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let (from, to) = (local(40100, false), TARGET_V4.parse().unwrap());
    let h = client.connect(from, to, 65536);
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    client.send_all(h, b"first").await;
    client.socket(h).close();
    client
        .until("our FIN acknowledged", |c| {
            (c.socket(h).state() == State::FinWait2).then_some(())
        })
        .await;
    // Prism's FIN (after the echo) is taken off the link unseen: Prism waits in LAST-ACK.
    let withheld = client.capture(Duration::from_millis(200)).await;
    assert!(
        withheld
            .iter()
            .any(|p| matches!(reply(p), Reply::Tcp { fin: true, .. })),
        "Prism sent no FIN: {withheld:?}"
    );
    client.remove(h);

    let again = client.connect(from, to, 65536);
    client
        .until("established again", |c| {
            let socket = c.socket(again);
            assert!(
                matches!(socket.state(), State::SynSent | State::Established),
                "the new connection went {} instead",
                socket.state()
            );
            socket.may_send().then_some(())
        })
        .await;
    client.send_all(again, b"second").await;
    client.socket(again).close();
    assert_eq!(client.recv_to_end(again).await, b"second");
    let counters = counters.snapshot();
    assert_eq!(counters.connections_opened, 2, "{counters}");
    assert_eq!(counters.connections_reset, 0, "{counters}");
}

#[tokio::test]
async fn a_syn_on_the_tuple_of_a_connection_in_time_wait_opens_a_new_one() {
    // Prism closes first (the upstream did), so its side waits in TIME-WAIT; the client then
    // reuses the tuple at once.
    let (addr, _seen) = upstream(|mut s: TcpStream| async move {
        s.write_all(b"bye").await.unwrap();
    })
    .await;
    let (mut client, counters) = prism_to(addr, Config::default());
    let (from, to) = (local(40200, false), TARGET_V4.parse().unwrap());
    for round in 1..=2 {
        let started = std::time::Instant::now();
        let h = client.connect(from, to, 65536);
        assert_eq!(client.recv_to_end(h).await, b"bye", "round {round}");
        // Not a speed figure: the first SYN must be answered. Had it hit the old connection,
        // only a retransmission (1 s on, and more) would get through.
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "round {round} took {:?}: its first SYN was not answered",
            started.elapsed()
        );
        client.socket(h).close();
        client
            .until("our FIN acknowledged", |c| {
                (c.socket(h).state() == State::Closed).then_some(())
            })
            .await;
        client.remove(h);
    }
    let counters = counters.snapshot();
    assert_eq!(counters.connections_opened, 2, "{counters}");
    assert_eq!(counters.connections_reset, 0, "{counters}");
}
