//! The whole stack's ingress: a `Stack` fed a sequence of packets, offload on or off, fast or
//! consistent handshakes. Most packets are generated TCP segments with valid checksums on four
//! flows per family, whose sequence and acknowledgement numbers can follow what the stack sent
//! (so handshakes complete and data flows), with pauses that let its timers fire (tokio's clock
//! is paused and jumps ahead when the stack is idle). The application accepts, refuses or
//! ignores each connection and echoes what accepted ones send, for a minute at most.
//!
//! Checked: no panic; every packet fed is counted as read, and once (handed to a connection or
//! one reason for refusing or dropping it); once the traffic has stopped, the application has
//! let go and every timer has run out, no connection is left, open, half-open or pending.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prism_device::{Framing, Link, vnet};
use prism_stack::{Config, Handshake, Rejection, Stack};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, TcpTimestampRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Arbitrary)]
enum Seq {
    Next,
    Offset(i16),
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
enum Ack {
    Missing,
    Theirs,
    Offset(i16),
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
struct Segment {
    v6: bool,
    flow: u8,
    control: u8,
    seq: Seq,
    ack: Ack,
    window: u16,
    mss: Option<u16>,
    scale: Option<u8>,
    sack_permitted: bool,
    timestamp: Option<(u32, u32)>,
    len: u16,
    corrupt: Option<(u16, u8)>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    Raw(Vec<u8>),
    Segment(Segment),
    WaitMs(u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    offload: bool,
    consistent: bool,
    /// Two bits per connection, in turn: accept, refuse, unreachable, or no answer.
    answers: u64,
    /// Small half-open and pending caps (1 to 4), so that SYNs beyond them get SYN cookies.
    tight_caps: Option<u8>,
    steps: Vec<Step>,
}

/// The client's side of one flow: its next sequence number, and the next one it expects.
#[derive(Debug, Default)]
struct Flow {
    next: u32,
    theirs: Option<u32>,
}

fn endpoints(v6: bool, flow: u8) -> (IpAddr, IpAddr, u16) {
    let i = flow % 4;
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                0,
                u16::from(i % 2) + 1,
            )),
            40000 + u16::from(i),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, i % 2 + 1)),
            40000 + u16::from(i),
        )
    }
}

fn emit(src: IpAddr, dst: IpAddr, tcp: &TcpRepr) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let (src, dst) = (IpAddress::from(src), IpAddress::from(dst));
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, tcp.buffer_len(), 64);
    // `IpRepr::buffer_len` is the whole packet: header and payload.
    let mut out = vec![0u8; ip.buffer_len()];
    ip.emit(&mut out[..], &caps);
    let header = ip.header_len();
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut out[header..]),
        &src,
        &dst,
        &caps,
    );
    out
}

fn segment(s: &Segment, flows: &mut HashMap<(bool, u8), Flow>) -> Vec<u8> {
    let (client, server, port) = endpoints(s.v6, s.flow);
    let flow = flows.entry((s.v6, s.flow % 4)).or_insert_with(|| Flow {
        next: 1_000_000 * u32::from(s.flow % 4 + 1),
        theirs: None,
    });
    let control = match s.control % 5 {
        0 => TcpControl::None,
        1 => TcpControl::Syn,
        2 => TcpControl::Fin,
        3 => TcpControl::Rst,
        _ => TcpControl::Psh,
    };
    let seq = match s.seq {
        Seq::Next => flow.next,
        Seq::Offset(d) => flow.next.wrapping_add_signed(i32::from(d)),
        Seq::Raw(n) => n,
    };
    let ack = match s.ack {
        Ack::Missing => None,
        Ack::Theirs => flow.theirs,
        Ack::Offset(d) => flow.theirs.map(|t| t.wrapping_add_signed(i32::from(d))),
        Ack::Raw(n) => Some(n),
    };
    let payload = vec![0x5a; usize::from(s.len % 3000)];
    let tcp = TcpRepr {
        src_port: port,
        dst_port: 80,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: s.window,
        window_scale: s.scale,
        max_seg_size: s.mss,
        sack_permitted: s.sack_permitted,
        sack_ranges: [None; 3],
        timestamp: s
            .timestamp
            .map(|(tsval, tsecr)| TcpTimestampRepr { tsval, tsecr }),
        payload: &payload,
    };
    if matches!(s.seq, Seq::Next) {
        let flags = u32::from(matches!(control, TcpControl::Syn | TcpControl::Fin));
        flow.next = seq.wrapping_add(payload.len() as u32 + flags);
    }
    let mut bytes = emit(client, server, &tcp);
    // The generator itself must make valid segments, or the stack never gets past
    // classification and the target fuzzes nothing.
    assert!(
        matches!(prism_trap::classify(&bytes), Ok(prism_trap::Packet::Tcp(_))),
        "the generator made a segment the stack refuses: {tcp:?}"
    );
    if let Some((at, mask)) = s.corrupt {
        let at = usize::from(at) % bytes.len();
        bytes[at] ^= mask;
    }
    bytes
}

/// Notes what the stack sent on each flow: the next sequence number the client expects.
fn observe(packet: &[u8], flows: &mut HashMap<(bool, u8), Flow>) {
    let (v6, payload) = match packet.first().map(|b| b >> 4) {
        Some(4) => match Ipv4Packet::new_checked(packet) {
            Ok(ip) => (false, ip.payload().to_vec()),
            Err(_) => return,
        },
        Some(6) => match Ipv6Packet::new_checked(packet) {
            Ok(ip) => (true, ip.payload().to_vec()),
            Err(_) => return,
        },
        _ => return,
    };
    let Ok(tcp) = TcpPacket::new_checked(&payload[..]) else {
        return;
    };
    let Some(i) = tcp.dst_port().checked_sub(40000).filter(|i| *i < 4) else {
        return;
    };
    let flags = u32::from(tcp.syn()) + u32::from(tcp.fin());
    let end = (tcp.seq_number().0 as u32)
        .wrapping_add(tcp.payload().len() as u32)
        .wrapping_add(flags);
    if let Some(flow) = flows.get_mut(&(v6, i as u8)) {
        flow.theirs = Some(end);
    }
}

async fn answer(mut requests: prism_stack::Requests, mut answers: u64) {
    let mut held = Vec::new();
    while let Some(request) = requests.next().await {
        let choice = answers & 3;
        answers = answers.rotate_right(2);
        match choice {
            0 => {
                let mut stream = request.accept();
                // An application that lets go of its stream within a minute.
                tokio::spawn(tokio::time::timeout(Duration::from_secs(60), async move {
                    let mut buf = [0u8; 4096];
                    if let Ok(n) = stream.read(&mut buf).await {
                        let _ = stream.write_all(&buf[..n]).await;
                    }
                }));
            }
            1 => request.reject(Rejection::Refused),
            2 => request.reject(Rejection::HostUnreachable),
            _ => held.push(request),
        }
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
}

fuzz_target!(|input: Input| {
    RUNTIME.with(|runtime| runtime.block_on(run(input)));
});

async fn run(input: Input) {
    let mut config = Config::default();
    config.handshake = Arc::new(if input.consistent {
        Handshake::Consistent
    } else {
        Handshake::Fast
    });
    if let Some(cap) = input.tight_caps {
        config.max_half_open = 1 + usize::from(cap % 4);
        config.max_pending = config.max_half_open;
    }
    let framing = if input.offload {
        Framing::Virtio
    } else {
        Framing::Plain
    };
    let (stack_end, client_end) = Link::framed_pair(4096, framing);
    let (stack, requests) = Stack::new(config, stack_end);
    let stack = tokio::spawn(stack.run());
    let answering = tokio::spawn(answer(requests, input.answers));
    let (mut from_stack, to_stack) = client_end.split();

    let mut flows = HashMap::new();
    let mut fed = 0u64;
    let mut plain = Vec::new();
    let mut drain = |from_stack: &mut tokio::sync::mpsc::Receiver<Bytes>,
                     flows: &mut HashMap<(bool, u8), Flow>| {
        while let Ok(frame) = from_stack.try_recv() {
            if input.offload {
                plain.clear();
                if vnet::to_plain(&frame, &mut plain).is_ok() {
                    for packet in &plain {
                        observe(packet, flows);
                    }
                }
            } else {
                observe(&frame, flows);
            }
        }
    };
    for step in &input.steps {
        let packet = match step {
            Step::Raw(bytes) => bytes.clone(),
            Step::Segment(s) => segment(s, &mut flows),
            Step::WaitMs(ms) => {
                tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await;
                drain(&mut from_stack, &mut flows);
                continue;
            }
        };
        let packet = Bytes::from(packet);
        let frame = if input.offload {
            vnet::frame(&packet)
        } else {
            packet
        };
        if to_stack.send(frame).await.is_err() {
            return;
        }
        fed += 1;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        drain(&mut from_stack, &mut flows);
    }
    // The application lets go of the requests it held, and every timer runs out: handshakes,
    // pending answers, retransmissions, clients that stopped answering.
    answering.abort();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        drain(&mut from_stack, &mut flows);
    }
    drop(to_stack);
    let Ok(report) = stack.await else {
        panic!("the stack task panicked");
    };
    let c = report.counters;
    assert_eq!(c.packets_in, fed, "every packet is counted as read");
    // And each once: handed to a connection, diverted, or one reason for refusing or dropping.
    let accounted = c.segments_in
        + c.diverted
        + c.drop_version
        + c.drop_truncated
        + c.drop_checksum
        + c.drop_fragment
        + c.drop_address
        + c.drop_not_tcp
        + c.drop_divert_full
        + c.syn_refused_stopping
        + c.syn_cookies_sent
        + c.no_connection
        + c.syn_absorbed;
    assert_eq!(c.packets_in, accounted, "every packet is counted once: {c}");
    assert_eq!(
        (report.open, report.half_open, report.pending),
        (0, 0, 0),
        "connections outlived every timer: {:?}",
        report.connections
    );
}
