//! The engine in process: a smoltcp client on packet queues (plain, or virtio-net frames as an
//! offloading TUN gives them), through `prism_engine::Engine`, to in-memory upstreams whose far
//! ends the test holds. Shutdown and drop end every connection, every stream and every task;
//! stats count what crossed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use prism_device::{FdDevice, FdKind};
use prism_engine::{
    ConnectError, Connecting, ConnectionState, Connector, Engine, Framing, Source, Target, Upstream,
};
use prism_tests::{Client, PATIENCE, virtio_kernel};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What happens at an upstream's far end.
#[derive(Debug)]
enum Far {
    /// The first bytes arrived from the client (connection `port`).
    Connected(u16),
    /// The engine closed the upstream.
    Closed(u16),
}

/// Every connection goes to an in-memory pipe whose far end is a task of the test's: it
/// reads what the client sends, answers `reply` bytes for each byte, and reports when the
/// engine closes the pipe.
struct Pipes {
    events: mpsc::UnboundedSender<Far>,
    reply: usize,
}

impl Connector for Pipes {
    fn connect<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let events = self.events.clone();
        let Target::Ip(destination) = target else {
            panic!("the engine asks for addresses")
        };
        tokio::spawn(far_end(theirs, destination.port(), self.reply, events));
        Box::pin(async move { Ok::<Box<dyn Upstream>, ConnectError>(Box::new(ours)) })
    }
}

async fn far_end(
    mut pipe: DuplexStream,
    port: u16,
    reply: usize,
    events: mpsc::UnboundedSender<Far>,
) {
    let mut buf = vec![0u8; 65536];
    let mut told = false;
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !told {
                    told = true;
                    let _ = events.send(Far::Connected(port));
                }
                let answer = vec![7u8; n * reply];
                if pipe.write_all(&answer).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = events.send(Far::Closed(port));
}

fn client_addr(port: u16, v6: bool) -> SocketAddr {
    if v6 {
        format!("[fd00::2]:{port}").parse().unwrap()
    } else {
        format!("10.0.0.2:{port}").parse().unwrap()
    }
}

/// Each connection to its own destination port, so the far end can tell them apart.
fn destination(port: u16, v6: bool) -> SocketAddr {
    if v6 {
        format!("[2001:db8::7]:{port}").parse().unwrap()
    } else {
        format!("192.0.2.7:{port}").parse().unwrap()
    }
}

/// A started engine on queues of `framing`, serving through [`Pipes`], and a client on it.
struct Setup {
    engine: Engine,
    client: Client,
    events: mpsc::UnboundedReceiver<Far>,
    kernel: Option<tokio::task::JoinHandle<()>>,
}

/// How the client reaches the engine.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// Packet queues of this framing.
    Queues(Framing),
    /// A datagram socket pair standing in for a TUN descriptor: the engine's device pump on
    /// one end, the client's on the other.
    Descriptor,
}

async fn setup(via: Via, reply: usize) -> Setup {
    let (source, client_link, kernel) = match via {
        Via::Queues(Framing::Virtio) => {
            let (source, device) = Source::queues(Framing::Virtio, 4096);
            let (link, task) = virtio_kernel(device);
            (source, link, Some(task))
        }
        Via::Queues(framing) => {
            let (source, device) = Source::queues(framing, 4096);
            (source, device, None)
        }
        Via::Descriptor => {
            let (engine_end, client_end) = std::os::unix::net::UnixDatagram::pair().unwrap();
            let source = Source::fd(OwnedFd::from(engine_end), FdKind::Ip);
            let device = FdDevice::new(OwnedFd::from(client_end), FdKind::Ip, 1500).unwrap();
            let (link, pump) = device.spawn(4096);
            let task = tokio::spawn(async move {
                let _ = pump.await;
            });
            (source, link, Some(task))
        }
    };
    let (tx, events) = mpsc::unbounded_channel();
    let engine = Engine::builder(source)
        .address("10.0.0.1".parse().unwrap(), 24)
        .address("fd00::1".parse().unwrap(), 64)
        .connector(Arc::new(Pipes { events: tx, reply }))
        .start()
        .await
        .unwrap();
    Setup {
        engine,
        client: Client::new(client_link),
        events,
        kernel,
    }
}

/// Opens `count` connections, sends one byte on each, and waits until every far end has it.
async fn open_connections(setup: &mut Setup, count: u16, v6: bool) -> Vec<SocketHandle> {
    let handles: Vec<SocketHandle> = (0..count)
        .map(|i| {
            setup
                .client
                .connect(client_addr(40000 + i, v6), destination(1000 + i, v6), 4096)
        })
        .collect();
    let client = &mut setup.client;
    client
        .until("every connection established", |c| {
            handles
                .iter()
                .all(|h| c.socket(*h).state() == tcp::State::Established)
                .then_some(())
        })
        .await;
    for h in &handles {
        client.socket(*h).send_slice(b"x").unwrap();
    }
    let mut connected = HashSet::new();
    let events = &mut setup.events;
    client
        .until("every upstream has its first byte", |_| {
            while let Ok(event) = events.try_recv() {
                if let Far::Connected(port) = event {
                    connected.insert(port);
                }
            }
            (connected.len() == usize::from(count)).then_some(())
        })
        .await;
    handles
}

/// True once the client's socket has seen the connection end: a FIN or a RST.
fn ended(state: tcp::State) -> bool {
    !matches!(
        state,
        tcp::State::Established | tcp::State::SynSent | tcp::State::SynReceived
    )
}

async fn wait_for_tasks(baseline: usize) {
    let metrics = Handle::current().metrics();
    let deadline = Instant::now() + PATIENCE;
    while metrics.num_alive_tasks() != baseline {
        assert!(
            Instant::now() < deadline,
            "{} tasks alive, {baseline} before the engine started",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 100 connections; the engine stops (shutdown or drop); every client sees FIN or RST, every
/// upstream is closed, and the runtime has exactly the tasks it had before the engine started.
async fn stopping_ends_everything(via: Via, v6: bool, by_drop: bool) {
    let baseline = Handle::current().metrics().num_alive_tasks();
    let mut setup = setup(via, 0).await;
    let handles = open_connections(&mut setup, 100, v6).await;

    let stats = setup.engine.stats().await;
    assert_eq!(stats.open, 100);
    assert_eq!(stats.stack.bytes_from_clients, 100);

    let grace = Duration::from_millis(500);
    let Setup {
        engine,
        mut client,
        mut events,
        kernel,
    } = setup;
    let started = Instant::now();
    let shutdown = if by_drop {
        drop(engine);
        None
    } else {
        Some(tokio::spawn(engine.shutdown(grace)))
    };
    let mut closed = HashSet::new();
    client
        .until(
            "every client sees FIN or RST and every upstream closes",
            |c| {
                while let Ok(event) = events.try_recv() {
                    if let Far::Closed(port) = event {
                        closed.insert(port);
                    }
                }
                let all_ended = handles.iter().all(|h| ended(c.socket(*h).state()));
                (all_ended && closed.len() == 100).then_some(())
            },
        )
        .await;
    let took = started.elapsed();
    assert!(
        took < grace + Duration::from_secs(2),
        "the clients heard of the shutdown after {took:?}"
    );
    if let Some(shutdown) = shutdown {
        let stats = shutdown.await.unwrap();
        assert_eq!((stats.open, stats.half_open, stats.pending), (0, 0, 0));
        assert!(stats.connections.is_empty());
        assert_eq!(
            stats.stack.connections_closed + stats.stack.connections_reset,
            100,
            "{:?}",
            stats.stack
        );
    }
    drop(client);
    if let Some(kernel) = kernel {
        kernel.await.unwrap();
    }
    wait_for_tasks(baseline).await;
}

#[tokio::test]
async fn shutdown_ends_every_connection_and_task_over_ipv4() {
    stopping_ends_everything(Via::Queues(Framing::Plain), false, false).await;
}

#[tokio::test]
async fn shutdown_ends_every_connection_and_task_over_ipv6() {
    stopping_ends_everything(Via::Queues(Framing::Plain), true, false).await;
}

#[tokio::test]
async fn shutdown_ends_every_connection_and_task_with_offload_over_ipv4() {
    stopping_ends_everything(Via::Queues(Framing::Virtio), false, false).await;
}

#[tokio::test]
async fn shutdown_ends_every_connection_and_task_with_offload_over_ipv6() {
    stopping_ends_everything(Via::Queues(Framing::Virtio), true, false).await;
}

/// On a descriptor the engine's device pump writes what the stack sent last (the FINs and
/// RSTs of the shutdown) while the client keeps sending.
#[tokio::test]
async fn shutdown_on_a_descriptor_delivers_the_last_packets() {
    stopping_ends_everything(Via::Descriptor, false, false).await;
    stopping_ends_everything(Via::Descriptor, true, true).await;
}

#[tokio::test]
async fn dropping_the_engine_ends_every_connection_and_task() {
    stopping_ends_everything(Via::Queues(Framing::Plain), false, true).await;
    stopping_ends_everything(Via::Queues(Framing::Virtio), true, true).await;
}

/// Stats count exactly what crossed: bytes each way overall and per connection, with each
/// connection's original destination.
#[tokio::test]
async fn stats_count_the_bytes_each_way_and_list_each_connection() {
    let cases = [Framing::Plain, Framing::Virtio].map(|f| [(f, false), (f, true)]);
    for (framing, v6) in cases.into_iter().flatten() {
        // Each byte from a client is answered with three.
        let mut setup = setup(Via::Queues(framing), 3).await;
        let handles = open_connections(&mut setup, 3, v6).await;
        let sizes = [1000usize, 20_000, 300_000];
        for (h, size) in handles.iter().zip(sizes) {
            setup.client.send_all(*h, &vec![1u8; size]).await;
        }
        // Everything the client sent (plus the first byte each), answered three times over.
        let sent: Vec<u64> = sizes.iter().map(|&s| s as u64 + 1).collect();
        let mut received = [0u64; 3];
        let client = &mut setup.client;
        client
            .until("every answer", |c| {
                for (i, h) in handles.iter().enumerate() {
                    let socket = c.socket(*h);
                    while socket.can_recv() {
                        received[i] += socket.recv(|b| (b.len(), b.len())).unwrap() as u64;
                    }
                }
                received
                    .iter()
                    .zip(&sent)
                    .all(|(r, s)| *r == 3 * s)
                    .then_some(())
            })
            .await;

        let stats = setup.engine.stats().await;
        let total: u64 = sent.iter().sum();
        assert_eq!(stats.stack.bytes_from_clients, total, "{framing:?}");
        // With offload, the answers leave as super-packets in both families.
        assert_eq!(
            stats.stack.super_packets_out > 0,
            framing == Framing::Virtio,
            "{framing:?}, IPv6: {v6}"
        );
        assert_eq!(stats.stack.bytes_to_clients, 3 * total, "{framing:?}");
        assert_eq!(stats.open, 3);
        assert_eq!((stats.upstream.connects, stats.upstream.connected), (3, 3));
        for (i, s) in sent.iter().enumerate() {
            let port = 1000 + i as u16;
            let c = stats
                .connections
                .iter()
                .find(|c| c.destination == destination(port, v6))
                .expect("each connection is listed with its original destination");
            assert_eq!(c.source, client_addr(40000 + i as u16, v6));
            assert_eq!((c.bytes_from_client, c.bytes_to_client), (*s, 3 * s));
            assert_eq!(c.state, ConnectionState::Established);
        }
        let json = stats.to_json();
        assert!(
            json.contains(&format!("\"bytes_from_clients\":{total}"))
                && json.contains("\"upstream_connected\":3"),
            "{json}"
        );
        let last = setup.engine.shutdown(Duration::from_millis(200)).await;
        assert_eq!(last.stack.bytes_from_clients, total);
    }
}

/// A product that closes its queues stops the engine: `failed` says so, `shutdown` returns
/// the error, and every task the engine started is gone.
#[tokio::test]
async fn closing_the_queues_is_reported_as_a_failure() {
    let baseline = Handle::current().metrics().num_alive_tasks();
    let (source, device) = Source::queues(Framing::Plain, 64);
    let mut engine = Engine::builder(source)
        .address("10.0.0.1".parse().unwrap(), 24)
        .start()
        .await
        .unwrap();
    drop(device);
    let error = tokio::time::timeout(PATIENCE, engine.failed())
        .await
        .expect("a closed source is reported");
    assert!(error.to_string().contains("closed"), "{error}");
    assert!(engine.failure().is_some_and(|f| f.contains("closed")));
    // Asked again, it says the same.
    let again = engine.failed().await;
    assert_eq!(again.to_string(), error.to_string());
    engine.shutdown(Duration::from_millis(100)).await;
    wait_for_tasks(baseline).await;
}

/// A product that stops reading its queues cannot hold the engine: stats answer with the
/// counters, and shutdown returns once the grace and the drain time are over.
#[tokio::test]
async fn a_product_that_stops_reading_cannot_hang_the_engine() {
    let baseline = Handle::current().metrics().num_alive_tasks();
    let (source, device) = Source::queues(Framing::Plain, 4);
    let engine = Engine::builder(source)
        .address("10.0.0.1".parse().unwrap(), 24)
        .start()
        .await
        .unwrap();
    // SYNs whose SYN-ACKs nobody reads: the queue towards the device fills and the stack
    // blocks writing to it.
    for port in 0..64u16 {
        let syn = prism_tests::tcp_segment(
            client_addr(20000 + port, false),
            destination(80, false),
            smoltcp::wire::TcpControl::Syn,
            1,
            &[],
        );
        if device.sender().try_send(syn).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let asked = Instant::now();
    let stats = engine.stats().await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stats waited for the stack"
    );
    assert!(stats.stack.packets_in > 0, "{:?}", stats.stack);
    let stopping = Instant::now();
    let last = tokio::time::timeout(PATIENCE, engine.shutdown(Duration::from_millis(100)))
        .await
        .expect("shutdown returns although nobody reads the device's queue");
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert!(last.stack.connections_opened > 0);
    drop(device);
    wait_for_tasks(baseline).await;
}

/// A resolver over TCP (RFC 7766) in process: answers each query with the query's bytes,
/// the QR bit set, and records which resolver it was asked as.
struct TcpResolver(mpsc::UnboundedSender<SocketAddr>);

impl Connector for TcpResolver {
    fn connect<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        let Target::Ip(asked) = target else {
            panic!("the engine asks for addresses")
        };
        let _ = self.0.send(*asked);
        let (ours, mut theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            theirs.read_exact(&mut len).await.unwrap();
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            theirs.read_exact(&mut query).await.unwrap();
            query[2] |= 0x80;
            theirs.write_all(&len).await.unwrap();
            theirs.write_all(&query).await.unwrap();
        });
        Box::pin(async move { Ok::<Box<dyn Upstream>, ConnectError>(Box::new(ours)) })
    }
}

/// A UDP datagram from `src` to `dst`, checksums filled.
fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> bytes::Bytes {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 here")
    };
    let udp = UdpRepr {
        src_port: s.port(),
        dst_port: d.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *s.ip(),
        dst_addr: *d.ip(),
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let mut bytes = vec![0u8; 20 + 8 + payload.len()];
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut bytes);
    ip.emit(&mut packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(packet.payload_mut()),
        &(*s.ip()).into(),
        &(*d.ip()).into(),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &caps,
    );
    bytes::Bytes::from(bytes)
}

/// Without a relay, a UDP DNS query is answered over TCP through the connector, from the
/// address the client asked; `dns` names another resolver.
#[tokio::test]
async fn dns_without_a_relay_goes_over_tcp_through_the_upstream() {
    use smoltcp::wire::{Ipv4Packet, UdpPacket};
    for named in [None, Some("10.9.9.9:5353".parse::<SocketAddr>().unwrap())] {
        let (source, mut device) = Source::queues(Framing::Plain, 64);
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        let mut builder = Engine::builder(source)
            .address("10.0.0.1".parse().unwrap(), 24)
            .connector(Arc::new(TcpResolver(asked_tx)));
        if let Some(resolver) = named {
            builder = builder.dns(resolver);
        }
        let engine = builder.start().await.unwrap();
        let client: SocketAddr = "10.0.0.2:33333".parse().unwrap();
        let resolver: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let query = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x00\x00\x01\x00\x01";
        device.send(udp(client, resolver, query)).await.unwrap();

        let mut batch = Vec::new();
        tokio::time::timeout(PATIENCE, device.recv_batch(&mut batch))
            .await
            .expect("an answer")
            .unwrap();
        let ip = Ipv4Packet::new_checked(&batch[0][..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            ([192, 0, 2, 53].into(), [10, 0, 0, 2].into())
        );
        let answer = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(answer.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        assert_eq!((answer.src_port(), answer.dst_port()), (53, 33333));
        let mut expected = query.to_vec();
        expected[2] |= 0x80;
        assert_eq!(answer.payload(), &expected[..]);
        assert_eq!(asked.recv().await, Some(named.unwrap_or(resolver)));
        let stats = engine.shutdown(Duration::from_millis(100)).await;
        assert_eq!(stats.relay.dns_queries, 1);
        assert_eq!(stats.relay.prohibited, 0);
    }
}
