//! [`Stack`]: the task that owns the smoltcp interface and every connection's socket.
//!
//! One closed loop reacts to its [`Event`]s: packets from the link, connections the application
//! touched, a connection's timer, a [`Control`](crate::Control) command, the end of a
//! shutdown's grace, and the link closing. There is no fixed sleep: the task waits for
//! whichever comes first (with busy polling on, `spin.rs` keeps a worker polling for I/O for a
//! while after each round).
//!
//! Per-packet cost does not grow with the number of connections. smoltcp walks every socket of
//! the `SocketSet` it is given, so each connection has its own one-socket set; a packet is
//! matched to its connection by a hash lookup in [`prism_trap::Table`] and smoltcp sees only
//! that connection's set. Timers live in one ordered set of deadlines. The single `Interface`
//! is shared by all connections.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prism_device::{BATCH, Diverted, Framing, Link, LinkClosed, Medium, PrismDevice, vnet};
use prism_trap::{
    Checksums, FourTuple, Handshake, Malformed, Offer, Packet, Rebuilt, Segment, SynCookies,
    Unreachable, classify_with, unreachable,
};
use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::socket::tcp::{self, State as TcpState};
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint, TcpSeqNumber};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, trace, warn};

use crate::Config;
use crate::conn::{Answer, ConnId, Rejection, Request, Shared, State};
use crate::control::{Command, Connection, ConnectionState, Control, Report};
use crate::counters::Counters;
use crate::table::{Decision, Table};
use crate::timers::Timers;

/// A half-open connection that has not completed its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection that waits on its client (for it to acknowledge data or a FIN, or for its FIN
/// once the application left) and hears nothing from it this long, in seconds, is reset: the
/// client is gone, since a live one answers every retransmission, if only with a RST. Two
/// minutes is the longest interval between Linux's retransmissions (`TCP_RTO_MAX`).
const GIVE_UP_SECS: u32 = 120;

/// The largest receive buffer smoltcp takes; TCP's window scale (at most 14, RFC 7323) can
/// advertise all but its last 16 KiB.
const MAX_TCP_RX_BUFFER: usize = 1 << 30;

/// A TCP timestamp value (RFC 7323): milliseconds since the stack first asked, from 1, wrapping
/// as the RFC allows.
fn tcp_timestamp() -> u32 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let millis = EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis();
    // Truncation is the wrap.
    (millis as u32).wrapping_add(1)
}

/// A SYN answered with a cookie, as its ACK proved it: the SYN|ACK's sequence number, and
/// whether the options the cookie kept include window scaling.
#[derive(Debug, Clone, Copy)]
struct Cookie {
    seq: u32,
    scaled: bool,
}

/// The connections offered to the application, in the order their handshakes completed.
#[derive(Debug)]
pub struct Requests {
    queue: mpsc::Receiver<Request>,
    /// The stack is shutting down or gone: what is still queued is not offered.
    stopped: Arc<AtomicBool>,
}

impl Requests {
    /// The next connection, or `None` once the stack is shutting down or has stopped. A
    /// request the stack gave up on while it was queued ([`Request::is_cancelled`]) is skipped.
    pub async fn next(&mut self) -> Option<Request> {
        if self.stopped.load(Ordering::Acquire) {
            return None;
        }
        loop {
            let request = self.queue.recv().await?;
            if self.stopped.load(Ordering::Acquire) {
                // A request queued just before the shutdown began: dropping it refuses it.
                return None;
            }
            // One the stack gave up on while it waited here (its client reset it, or it timed
            // out) would only cost the application a connect.
            if !request.is_cancelled() {
                return Some(request);
            }
        }
    }
}

/// What the stack task reacts to.
#[derive(Debug)]
enum Event {
    /// A batch of packets arrived from the link.
    Packets,
    /// The application touched some connections.
    Woken,
    /// A connection's deadline passed.
    Timer,
    /// The owner asked for something.
    Control(Command),
    /// The shutdown's grace period is over.
    GraceOver,
    /// The link is gone: the stack stops.
    LinkClosed,
}

/// Where a connection is in its life, as far as the application is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Fast handshake: the SYN-ACK is out; the application hears of the connection when the
    /// client completes the handshake.
    Handshake,
    /// Consistent handshake: the application has the [`Request`]; the SYN-ACK waits for its
    /// answer.
    Pending,
    /// The application has the [`Request`] (and, once it accepted, the stream).
    Offered,
}

#[derive(Debug)]
struct Conn {
    tuple: FourTuple,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    shared: Arc<Shared>,
    handshake: Handshake,
    phase: Phase,
    /// The client's SYN, kept while a consistent handshake waits: an ICMP error quotes it.
    syn: Option<Bytes>,
    /// When an unfinished handshake gives up; `None` once the connection is established.
    deadline: Option<Instant>,
    /// `close()` was called: our FIN is queued or sent.
    fin_sent: bool,
    /// Already queued for servicing in this round.
    dirty: bool,
    /// Opened through a SYN cookie without window scaling (the client sent no timestamps to
    /// keep it in, or offered none): a window of at most 64 KiB.
    unscaled: bool,
    /// It waits on its client (see [`GIVE_UP_SECS`]).
    waiting: bool,
    /// Seconds since the stack's epoch when the client last sent a segment, or when the
    /// connection began waiting on it if that was later.
    heard: u32,
    /// When its SYN arrived.
    opened: Instant,
    /// Bytes delivered to the application, and bytes it sent that entered the socket.
    bytes_from_client: u64,
    bytes_to_client: u64,
}

impl Conn {
    /// A consistent handshake whose SYN-ACK still waits for the application's answer: counts
    /// against the pending cap from its SYN on.
    fn awaits_answer(&self) -> bool {
        self.handshake == Handshake::Consistent && self.phase != Phase::Offered
    }
}

/// How servicing a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// It lives on.
    Alive,
    /// It ended (gracefully, by reset, or refused): forget it.
    Finished,
    /// It was answered with an ICMP error: forget it without sending anything else.
    Unreachable,
}

/// The userspace TCP stack. Build it with [`Stack::new`], spawn [`Stack::run`], and take
/// connections from the returned [`Requests`].
pub struct Stack {
    config: Config,
    iface: Interface,
    device: PrismDevice,
    link: Link,
    table: Table<ConnId>,
    conns: HashMap<ConnId, Conn>,
    timers: Timers,
    /// A set with no sockets: segments that belong to no connection meet it, and smoltcp
    /// answers them as a closed port does (RST), unless SYN cookies are in use.
    orphans: SocketSet<'static>,
    wake_tx: mpsc::UnboundedSender<ConnId>,
    wake_rx: mpsc::UnboundedReceiver<ConnId>,
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    epoch: Instant,
    next_id: ConnId,
    dirty: Vec<ConnId>,
    /// Consistent handshakes waiting for the application.
    pending: usize,
    /// Where packets of other protocols go, if anyone takes them.
    others: Option<mpsc::Sender<Bytes>>,
    /// What the link carries, fixed when it was made.
    framing: Framing,
    control_tx: mpsc::UnboundedSender<Command>,
    control_rx: mpsc::UnboundedReceiver<Command>,
    /// Shared with [`Requests`]: set when the shutdown begins.
    stopped: Arc<AtomicBool>,
    /// Set once the shutdown began: when its grace period ends.
    closing: Option<Instant>,
    /// Answer SYNs without state at the caps.
    cookies: SynCookies,
    /// When the last cookie was sent: until two cookie periods later, a segment for no
    /// connection may be the ACK of one.
    cookies_sent_at: Option<Instant>,
    cookie_warning: Every,
}

/// A rate limit for a warning about something that happens often: due at most once every
/// [`Every::PERIOD`], saying how many times it happened since.
#[derive(Debug, Default)]
struct Every {
    last: Option<Instant>,
    since: u64,
}

impl Every {
    const PERIOD: Duration = Duration::from_secs(10);

    /// Counts one more; `Some(count)` when a warning is due.
    fn due(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < Self::PERIOD)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// How long after the last cookie sent a returning ACK is checked for one: a cookie verifies
/// for at most two 64-second periods.
const COOKIES_VERIFY_FOR: Duration = Duration::from_secs(128);

/// Where a segment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To this connection's socket.
    Conn(ConnId),
    /// To smoltcp with no socket: it answers as a closed port does (RST).
    Orphan,
    /// Nowhere: it was answered (a SYN cookie) or is dropped without an answer.
    Done,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("connections", &self.conns.len())
            .field("half_open", &self.table.half_open())
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// A stack on `link` (its other end is the TUN adapter or a test's client). With a link of
    /// [`Framing::Virtio`] (an offloading TUN), TCP segments of up to 64 KB pass both ways and
    /// checksums the kernel vouches for are neither verified nor computed.
    pub fn new(mut config: Config, link: Link) -> (Stack, Requests) {
        config.tcp_rx_buffer = config.tcp_rx_buffer.clamp(1, MAX_TCP_RX_BUFFER);
        config.tcp_tx_buffer = config.tcp_tx_buffer.max(1);
        config.tcp_initial_buffer = config.tcp_initial_buffer.max(1);
        config.max_half_open = config.max_half_open.max(1);
        config.max_pending = config.max_pending.max(1);
        let mut device = PrismDevice::new(Medium::Ip, config.mtu);
        // `prism_trap::classify` verified every incoming checksum already.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        let framing = link.framing();
        if framing == Framing::Virtio {
            device.set_offload();
        }
        device.set_checksum(checksum);

        let epoch = Instant::now();
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = RandomState::new().hash_one(epoch);
        let mut iface = Interface::new(iface_config, &mut device, smoltcp::time::Instant::ZERO);
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            for &(ip, prefix) in &config.addresses {
                if addrs.push(IpCidr::new(ip.into(), prefix)).is_err() {
                    debug!(%ip, "more stack addresses than smoltcp keeps; ignoring the rest");
                }
            }
        });

        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let (requests_tx, requests_rx) = mpsc::channel(config.request_queue.max(1));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let requests = Requests {
            queue: requests_rx,
            stopped: Arc::clone(&stopped),
        };
        let stack = Stack {
            table: Table::default(),
            config,
            iface,
            device,
            link,
            conns: HashMap::new(),
            timers: Timers::default(),
            orphans: SocketSet::new(Vec::new()),
            wake_tx,
            wake_rx,
            requests: requests_tx,
            counters: Arc::default(),
            epoch,
            next_id: 0,
            dirty: Vec::new(),
            pending: 0,
            others: None,
            framing,
            control_tx,
            control_rx,
            stopped,
            closing: None,
            cookies: SynCookies::new(),
            cookies_sent_at: None,
            cookie_warning: Every::default(),
        };
        (stack, requests)
    }

    /// A handle to ask the running stack for a report or to shut it down.
    pub fn control(&self) -> Control {
        Control(self.control_tx.clone())
    }

    /// From now on, every packet that is not TCP goes, whole and as the link carried it (a
    /// virtio-net frame with offload), to the returned receiver instead of being dropped. This
    /// is how the relay gets UDP, ICMP and the rest without a task between the device and the
    /// stack. When `capacity` packets wait, more are dropped and counted. The returned
    /// [`Diverted`] also carries a sender back into the device and the link's framing.
    pub fn divert_other_protocols(&mut self, capacity: usize) -> Diverted {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.others = Some(tx);
        Diverted {
            packets: rx,
            to_device: self.link.sender(),
            framing: self.framing,
        }
    }

    /// The stack's counters, readable while it runs.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Runs until the link closes or a shutdown ends, and returns the last report.
    pub async fn run(mut self) -> Report {
        let mut batch = Vec::with_capacity(BATCH);
        let mut woken = Vec::new();
        let mut due = Vec::new();
        // One timer for the whole run, moved only earlier. Moving a tokio timer before the one
        // the runtime sleeps towards wakes the runtime's driver (a write to its eventfd and one
        // more `epoll_wait`), and a request/response exchange would move it earlier (a delayed
        // ACK) and back (the ACK rode on the answer) on every round trip. Left armed early, it
        // fires once, finds nothing due, and is armed again at the next deadline.
        let timer = sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let spinner = self
            .config
            .busy_poll
            .map(|window| crate::spin::Spinner::start(window, Arc::clone(&self.counters)));
        loop {
            if let Some(deadline) = self.timers.next()
                && armed.is_none_or(|at| deadline < at)
            {
                timer.as_mut().reset(deadline);
                armed = Some(deadline);
            }
            let closing = self.closing;
            let event = tokio::select! {
                Some(command) = self.control_rx.recv() => Event::Control(command),
                () = sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {
                    Event::GraceOver
                }
                received = self.link.recv_batch(&mut batch) => match received {
                    Ok(_) => Event::Packets,
                    Err(LinkClosed) => Event::LinkClosed,
                },
                _ = self.wake_rx.recv_many(&mut woken, 1024) => Event::Woken,
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    Event::Timer
                }
            };
            if let Some(spinner) = &spinner {
                spinner.round();
            }
            let now = self.smol_now();
            match event {
                Event::Packets => self.ingress(&mut batch, now),
                Event::Woken => {
                    for id in woken.drain(..) {
                        self.mark(id);
                    }
                }
                Event::Timer => {
                    self.timers.expired(Instant::now(), &mut due);
                    for id in due.drain(..) {
                        self.mark(id);
                    }
                }
                Event::Control(Command::Report(reply)) => {
                    // The asker may have given up; nothing to do then.
                    let _ = reply.send(self.report());
                }
                Event::Control(Command::Shutdown(grace)) => self.begin_shutdown(grace),
                Event::GraceOver => {
                    let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                    for id in ids {
                        if let Some(conn) = self.conns.get_mut(&id) {
                            conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
                        }
                        self.mark(id);
                    }
                }
                Event::LinkClosed => break,
            }
            self.service_dirty(now);
            if self.flush().await.is_err() {
                break;
            }
            if self.closing.is_some() && self.conns.is_empty() {
                break;
            }
        }
        let report = self.report();
        debug!(counters = %report.counters, "stack stopped");
        report
    }

    /// Refuses new connections, fails every stream, and closes every connection: FIN for the
    /// ones the application took, RST for the rest. [`Event::GraceOver`] resets what is left.
    fn begin_shutdown(&mut self, grace: Duration) {
        // A grace too long to add is no deadline at all.
        let deadline = Instant::now()
            .checked_add(grace)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        if self.closing.is_some_and(|d| d <= deadline) {
            return;
        }
        let first = self.closing.is_none();
        self.closing = Some(deadline);
        if !first {
            return;
        }
        debug!(
            connections = self.conns.len(),
            ?grace,
            "stack shutting down"
        );
        self.stopped.store(true, Ordering::Release);
        // Closing the request queue wakes an application waiting in `Requests::next`.
        self.requests = mpsc::channel(1).0;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(conn) = self.conns.get(&id) {
                end_streams(&conn.shared);
            }
            self.mark(id);
        }
    }

    /// The stack at this moment.
    fn report(&self) -> Report {
        let connections: Vec<Connection> = self
            .conns
            .values()
            .map(|conn| Connection {
                source: conn.tuple.source,
                destination: conn.tuple.destination,
                age: conn.opened.elapsed(),
                bytes_from_client: conn.bytes_from_client,
                bytes_to_client: conn.bytes_to_client,
                state: connection_state(conn),
            })
            .collect();
        Report {
            counters: self.counters.snapshot(),
            open: connections.len(),
            half_open: self.table.half_open(),
            pending: self.pending,
            connections,
        }
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(micros)
    }

    fn to_instant(&self, at: smoltcp::time::Instant) -> Instant {
        self.epoch + Duration::from_micros(u64::try_from(at.total_micros()).unwrap_or(0))
    }

    /// Feeds a batch of packets to their connections.
    fn ingress(&mut self, batch: &mut Vec<Bytes>, now: smoltcp::time::Instant) {
        let heard = seconds(now);
        Counters::add(&self.counters.packets_in, batch.len() as u64);
        for frame in batch.drain(..) {
            // With offload the link carries frames and the packet is a slice of one; what is
            // diverted goes on whole, as the link carried it.
            let (packet, checksums) = if self.framing == Framing::Virtio {
                let Some((header, packet)) = vnet::unframe(&frame) else {
                    Counters::add(&self.counters.drop_truncated, 1);
                    continue;
                };
                if !header.checksum_trusted() {
                    (packet, Checksums::Verify)
                } else {
                    // A super-packet from the kernel is one TCP segment to smoltcp.
                    if header.is_gso() {
                        Counters::add(&self.counters.super_packets_in, 1);
                    }
                    (packet, Checksums::Trusted)
                }
            } else {
                (frame.clone(), Checksums::Verify)
            };
            let segment = match classify_with(&packet, checksums) {
                Ok(Packet::Tcp(segment)) => segment,
                Ok(Packet::Other { protocol }) => {
                    self.divert(frame, protocol);
                    continue;
                }
                Err(malformed) => {
                    trace!(%malformed, "packet dropped");
                    Counters::add(self.malformed_counter(malformed), 1);
                    continue;
                }
            };
            let conn = match self.target(&segment, &packet, now) {
                Route::Done => continue,
                Route::Orphan => None,
                Route::Conn(id) => self.conns.get_mut(&id),
            };
            if let Some(conn) = &conn {
                if conn.awaits_answer()
                    && segment.is_initial_syn()
                    && conn.sockets.get::<tcp::Socket>(conn.handle).state() == TcpState::SynReceived
                {
                    // The client retransmits its SYN while the upstream connects: the request
                    // is out already, and there is nothing to answer yet.
                    Counters::add(&self.counters.syn_absorbed, 1);
                    continue;
                }
                Counters::add(&self.counters.segments_in, 1);
            }
            self.device.push_rx(packet);
            let sockets = match conn {
                Some(conn) => {
                    // An idle connection's receive buffer was given back; a segment with data
                    // must find one again (its window never shrank meanwhile). A pure ACK, as
                    // a download's client sends, needs none: at the next sequence number it
                    // is accepted into an empty window.
                    let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);
                    let released = socket.rx_buffer_released();
                    if released > 0 && segment.data {
                        let restored =
                            socket.replace_rx_buffer(tcp::SocketBuffer::new(vec![0; released]));
                        debug_assert!(restored.is_ok(), "the released size fits");
                    }
                    conn.heard = heard;
                    if !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push(conn.shared.id);
                    }
                    &mut conn.sockets
                }
                None => &mut self.orphans,
            };
            self.iface
                .poll_ingress_single(now, &mut self.device, sockets);
        }
    }

    /// Hands a packet of another protocol to whoever takes them, or drops it.
    fn divert(&self, frame: Bytes, protocol: u8) {
        let Some(others) = &self.others else {
            trace!(protocol, "non-TCP packet dropped");
            Counters::add(&self.counters.drop_not_tcp, 1);
            return;
        };
        match others.try_send(frame) {
            Ok(()) => Counters::add(&self.counters.diverted, 1),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Counters::add(&self.counters.drop_divert_full, 1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Counters::add(&self.counters.drop_not_tcp, 1);
            }
        }
    }

    fn malformed_counter(&self, malformed: Malformed) -> &std::sync::atomic::AtomicU64 {
        let c = &self.counters;
        match malformed {
            Malformed::Version => &c.drop_version,
            Malformed::Checksum => &c.drop_checksum,
            Malformed::Fragment => &c.drop_fragment,
            Malformed::Address => &c.drop_address,
            _ => &c.drop_truncated,
        }
    }

    /// Where a segment goes, opening a connection for a new SYN.
    fn target(&mut self, segment: &Segment, packet: &Bytes, now: smoltcp::time::Instant) -> Route {
        match self.table.decide(segment) {
            Decision::Existing(id) if segment.is_initial_syn() && self.has_closed(id) => {
                // The client reuses the tuple of a connection that has closed, from its side
                // at least: Prism's side waits in TIME-WAIT, or its last ACK was lost, or the
                // close came in this very batch and is not serviced yet. That connection is
                // over; a new one starts.
                self.service(id, now);
                self.retire(id);
                self.new_connection(segment.tuple, packet)
            }
            Decision::Existing(id) => Route::Conn(id),
            Decision::Open => self.new_connection(segment.tuple, packet),
            Decision::NoConnection => self.no_connection(segment, packet, now),
        }
    }

    /// A SYN for a new connection: opened, or answered with a SYN cookie at the caps.
    fn new_connection(&mut self, tuple: FourTuple, syn: &Bytes) -> Route {
        if self.closing.is_some() {
            Counters::add(&self.counters.syn_refused_stopping, 1);
            return Route::Orphan;
        }
        if tuple.destination.port() == 0 {
            // Not a connectable endpoint: smoltcp drops the SYN unanswered.
            Counters::add(&self.counters.no_connection, 1);
            return Route::Orphan;
        }
        if self.table.half_open() >= self.config.max_half_open {
            self.send_cookie(tuple, syn);
            return Route::Done;
        }
        let mut handshake = self.config.handshake.handshake(&tuple);
        if handshake == Handshake::Consistent && self.pending >= self.config.max_pending {
            // Every pending handshake holds an upstream connect: beyond the cap, the client
            // gets in the fast way rather than not at all.
            Counters::add(&self.counters.consistent_as_fast, 1);
            handshake = Handshake::Fast;
        }
        self.open(tuple, syn, handshake, None)
            .map_or(Route::Orphan, Route::Conn)
    }

    /// Answers a SYN at the half-open cap with a SYN|ACK that keeps no state: its sequence
    /// number is a cookie, and the connection is built when the client's ACK returns it (see
    /// [`Stack::no_connection`]). Refusing would let a flood of spoofed SYNs, which never
    /// complete, lock every real client out until their entries expire.
    fn send_cookie(&mut self, tuple: FourTuple, syn: &Bytes) {
        let headers = if tuple.destination.is_ipv6() { 60 } else { 40 };
        let mss = u16::try_from(self.config.mtu.saturating_sub(headers)).unwrap_or(u16::MAX);
        // The socket that takes over must agree: it advertises its initial receive buffer
        // (unscaled, as in any SYN), scales later windows for the bound `open` gives it (the
        // initial buffer is never larger), and takes its timestamps from the same clock.
        let offer = Offer {
            mss: mss.max(536),
            window: u16::try_from(self.initial_rx_buffer()).unwrap_or(u16::MAX),
            window_shift: tcp::Socket::window_shift_for(self.config.tcp_rx_buffer),
            tsval: tcp_timestamp(),
        };
        let now = Instant::now();
        let Some(synack) = self
            .cookies
            .synack(syn, &offer, now.duration_since(self.epoch))
        else {
            // Classified as a SYN, yet smoltcp's parser refuses its options.
            Counters::add(&self.counters.drop_truncated, 1);
            return;
        };
        self.device.push_tx(Bytes::from(synack));
        Counters::add(&self.counters.syn_cookies_sent, 1);
        self.cookies_sent_at = Some(now);
        if let Some(answered) = self.cookie_warning.due(now) {
            warn!(
                answered,
                "half-open cap ({}) reached: answering new SYNs with SYN cookies (a SYN flood, or \
                 clients that never finish their handshakes); a client without TCP timestamps gets \
                 a connection without window scaling or SACK",
                self.config.max_half_open
            );
        }
    }

    /// A segment for no connection: the ACK of a SYN cookie opens its connection; anything
    /// else is answered as a closed port does (RST). While cookies are in use, a segment that
    /// does not prove one is dropped silently instead: it may be a real client's later segment
    /// whose first was lost, and a RST would kill a connection its retransmission rebuilds.
    fn no_connection(
        &mut self,
        segment: &Segment,
        packet: &Bytes,
        now: smoltcp::time::Instant,
    ) -> Route {
        let cookies_in_use = self
            .cookies_sent_at
            .is_some_and(|at| at.elapsed() < COOKIES_VERIFY_FOR);
        if !cookies_in_use || self.closing.is_some() {
            Counters::add(&self.counters.no_connection, 1);
            return Route::Orphan;
        }
        let clock = Instant::now().duration_since(self.epoch);
        let Some(Rebuilt {
            syn,
            cookie,
            scaled,
        }) = self.cookies.check(packet, clock)
        else {
            Counters::add(&self.counters.no_connection, 1);
            return if segment.rst {
                Route::Orphan
            } else {
                Route::Done
            };
        };
        let syn = Bytes::from(syn);
        let answered = Cookie {
            seq: cookie,
            scaled,
        };
        // `open` fails only for port 0, which no cookie was made for; it counts the segment.
        let Some(id) = self.open(segment.tuple, &syn, Handshake::Fast, Some(answered)) else {
            return Route::Orphan;
        };
        Counters::add(&self.counters.syn_cookies_accepted, 1);
        // The rebuilt SYN puts the socket where the cookie's SYN|ACK left the client; the ACK
        // itself then goes in as any segment does.
        if let Some(conn) = self.conns.get_mut(&id) {
            self.device.push_rx(syn);
            self.iface
                .poll_ingress_single(now, &mut self.device, &mut conn.sockets);
        }
        Route::Conn(id)
    }

    /// What each socket's receive buffer starts at.
    fn initial_rx_buffer(&self) -> usize {
        self.config
            .tcp_initial_buffer
            .min(self.config.tcp_rx_buffer)
    }

    /// Creates the listening socket for exactly `tuple`, whose SYN is `syn`. `cookie`: the SYN
    /// was answered already, with a SYN cookie, and the socket takes over from there.
    fn open(
        &mut self,
        tuple: FourTuple,
        syn: &Bytes,
        handshake: Handshake,
        cookie: Option<Cookie>,
    ) -> Option<ConnId> {
        let endpoint = IpListenEndpoint {
            addr: Some(tuple.destination.ip().into()),
            port: tuple.destination.port(),
        };
        // The receive buffer starts small (its size is the window the SYN|ACK offers), the
        // send buffer empty: an idle connection holds none (`release_tx` gives it back once all
        // is acknowledged). Both grow when they limit the connection (`grow_rx`, `grow_tx`);
        // the window scale is chosen for the full receive buffer.
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.initial_rx_buffer()]),
            tcp::SocketBuffer::new(Vec::new()),
        );
        socket.set_rx_capacity_bound(self.config.tcp_rx_buffer);
        // Prism relays what the application already batched; Nagle would only add delay.
        socket.set_nagle_enabled(false);
        // Timestamps when the client offers them, as the kernel's own TCP does: a client that
        // closed first can then reuse its port while the old connection sits in TIME-WAIT
        // (Linux reuses a TIME-WAIT port only when the peer sent timestamps).
        socket.set_tsval_generator(Some(tcp_timestamp));
        socket.pause_synack(handshake == Handshake::Consistent);
        socket.set_synack_sent(cookie.map(|c| TcpSeqNumber(c.seq as i32)));
        if socket.listen(endpoint).is_err() {
            // Port 0: not a connectable endpoint, and smoltcp drops the SYN unanswered. It is
            // counted with the segments for no connection.
            Counters::add(&self.counters.no_connection, 1);
            return None;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        let id = self.next_id;
        self.next_id += 1;
        let shared = Arc::new(Shared::new(
            id,
            self.config.stream_buffer.max(1),
            self.wake_tx.clone(),
        ));
        let wait = match handshake {
            Handshake::Consistent => self.config.pending_timeout,
            _ => HANDSHAKE_TIMEOUT,
        };
        self.table.insert(tuple, id);
        if handshake == Handshake::Consistent {
            self.pending += 1;
        }
        self.conns.insert(
            id,
            Conn {
                tuple,
                sockets,
                handle,
                shared,
                handshake,
                phase: Phase::Handshake,
                syn: (handshake == Handshake::Consistent).then(|| syn.clone()),
                deadline: Some(Instant::now() + wait),
                fin_sent: false,
                dirty: false,
                unscaled: cookie.is_some_and(|c| !c.scaled),
                waiting: false,
                heard: 0,
                opened: Instant::now(),
                bytes_from_client: 0,
                bytes_to_client: 0,
            },
        );
        Counters::add(&self.counters.connections_opened, 1);
        trace!(id, ?tuple, %handshake, "connection opened");
        Some(id)
    }

    /// Whether `id`'s socket has seen both FINs (only a final ACK or TIME-WAIT is left) or has
    /// closed without being serviced yet.
    fn has_closed(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|conn| {
            matches!(
                conn.sockets.get::<tcp::Socket>(conn.handle).state(),
                TcpState::Closed | TcpState::LastAck | TcpState::Closing | TcpState::TimeWait
            )
        })
    }

    /// Forgets a connection whose tuple a new SYN reuses (it was closing gracefully), and
    /// wakes whoever still waits on it.
    fn retire(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            self.forget(id, &conn);
            Counters::add(&self.counters.connections_closed, 1);
            let mut state = conn.shared.lock();
            // Nobody services this connection again: a reader still short of the client's FIN
            // (bytes left in the socket) would wait for ever, so it gets an error instead.
            if !state.inbound_fin {
                state.reset = true;
            }
            let wakers = state.take_wakers(true, true);
            drop(state);
            wakers.wake();
        }
    }

    /// Drops every trace of a connection that is no longer in `conns`.
    fn forget(&mut self, id: ConnId, conn: &Conn) {
        if conn.awaits_answer() {
            self.pending -= 1;
        }
        self.table.remove(&conn.tuple);
        self.timers.set(id, None);
    }

    fn mark(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn service_dirty(&mut self, now: smoltcp::time::Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            self.service(id, now);
        }
        self.dirty = dirty;
    }

    /// Brings one connection up to date: handshake, the application's answer, bytes both ways,
    /// close and reset, then transmits what smoltcp has to send and sets its next deadline.
    fn service(&mut self, id: ConnId, now: smoltcp::time::Instant) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        conn.dirty = false;
        conn.shared.clear_notice();
        let shared = Arc::clone(&conn.shared);
        let mut state = shared.lock();
        let mut wakers = (false, false);

        let expired = conn.deadline.is_some_and(|d| Instant::now() >= d);
        if state.shutdown && conn.phase != Phase::Offered {
            // Nobody has the connection yet: a RST is the whole answer (in a consistent
            // handshake, the held SYN's RST|ACK).
            let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.is_open() {
                socket.abort();
            }
        }
        let mut fate = match conn.phase {
            Phase::Handshake => self.service_handshake(&mut conn, expired),
            Phase::Pending => self.service_pending(&mut conn, &state, expired),
            Phase::Offered => Fate::Alive,
        };
        if fate == Fate::Alive && conn.phase == Phase::Offered {
            self.service_offered(&mut conn, &mut state, expired, &mut wakers);
        }

        if fate != Fate::Unreachable {
            // Transmit everything smoltcp has for this connection (one segment per pass).
            while self
                .iface
                .poll_egress(now, &mut self.device, &mut conn.sockets)
                == PollResult::SocketStateChanged
            {}
            fate = self.fate_after_egress(&conn);
        }
        if fate == Fate::Alive
            && conn.phase == Phase::Offered
            && client_gone(&mut conn, state.app_gone, seconds(now))
        {
            debug!(tuple = ?conn.tuple, "the client answered nothing for {GIVE_UP_SECS} s; reset");
            Counters::add(&self.counters.gave_up, 1);
            conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            while self
                .iface
                .poll_egress(now, &mut self.device, &mut conn.sockets)
                == PollResult::SocketStateChanged
            {}
            fate = self.fate_after_egress(&conn);
        }

        if fate == Fate::Alive {
            // smoltcp's poll_at says "now" for a withheld SYN-ACK for as long as it is withheld
            // (pause_synack is not in its reckoning): polling on it would spin. Until the
            // application answers, only the pending deadline matters.
            let mut deadline = if conn.awaits_answer() {
                None
            } else {
                self.iface
                    .poll_at(now, &conn.sockets)
                    .map(|at| self.to_instant(at))
            };
            let give_up = conn
                .waiting
                .then(|| self.epoch + Duration::from_secs(u64::from(conn.heard + GIVE_UP_SECS)));
            for limit in [conn.deadline, give_up].into_iter().flatten() {
                deadline = Some(deadline.map_or(limit, |d| d.min(limit)));
            }
            self.timers.set(id, deadline);
        } else {
            let graceful = fate == Fate::Finished && conn.fin_sent && state.inbound_fin;
            match (fate, graceful) {
                (Fate::Unreachable, _) => {}
                (_, true) => Counters::add(&self.counters.connections_closed, 1),
                (_, false) => Counters::add(&self.counters.connections_reset, 1),
            }
            if !graceful {
                state.reset = true;
            }
            wakers = (true, true);
            self.forget(id, &conn);
            trace!(id, ?fate, graceful, "connection finished");
        }
        let wakers = state.take_wakers(wakers.0, wakers.1);
        drop(state);
        wakers.wake();
        if fate == Fate::Alive {
            self.conns.insert(id, conn);
        }
    }

    /// Before the application knows: a fast handshake completing is offered; a consistent
    /// SYN, once smoltcp holds it, is offered at once with the SYN-ACK withheld.
    fn service_handshake(&mut self, conn: &mut Conn, expired: bool) -> Fate {
        let tcp_state = conn.sockets.get::<tcp::Socket>(conn.handle).state();
        match (tcp_state, conn.handshake) {
            (TcpState::SynReceived, Handshake::Consistent) => {
                if self.offer(conn) {
                    conn.phase = Phase::Pending;
                } else {
                    conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
                }
            }
            (TcpState::Listen | TcpState::SynReceived, _) => {
                if expired {
                    conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
                }
            }
            (TcpState::Closed | TcpState::TimeWait, _) => {}
            _ => {
                self.table.established(&conn.tuple);
                conn.deadline = None;
                conn.phase = Phase::Offered;
                if !self.offer(conn) {
                    conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
                }
            }
        }
        Fate::Alive
    }

    /// A consistent handshake waiting for the application: accepted, the SYN-ACK goes out;
    /// rejected (or not answered in time), the client gets a RST or an ICMP error.
    fn service_pending(&mut self, conn: &mut Conn, state: &State, expired: bool) -> Fate {
        let why = match state.answer {
            Answer::Pending if expired => {
                debug!(tuple = ?conn.tuple, "no answer in time; host unreachable");
                Counters::add(&self.counters.pending_timeouts, 1);
                Rejection::TimedOut
            }
            Answer::Pending => return Fate::Alive,
            Answer::Accepted => {
                let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);
                socket.pause_synack(false);
                conn.phase = Phase::Offered;
                self.pending -= 1;
                conn.syn = None;
                conn.deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
                return Fate::Alive;
            }
            Answer::Rejected(why) => {
                Counters::add(&self.counters.requests_rejected, 1);
                why
            }
        };
        let reason = match why {
            Rejection::HostUnreachable | Rejection::TimedOut => Unreachable::Host,
            Rejection::NetworkUnreachable => Unreachable::Network,
            Rejection::Prohibited => Unreachable::Prohibited,
            Rejection::Refused => {
                // smoltcp answers the withheld SYN with RST|ACK: ECONNREFUSED for the client.
                conn.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
                return Fate::Alive;
            }
        };
        let error = conn.syn.as_deref().and_then(|syn| unreachable(syn, reason));
        if let Some(error) = error {
            self.device.push_tx(Bytes::from(error));
            Counters::add(&self.counters.unreachable_sent, 1);
        }
        Fate::Unreachable
    }

    /// A connection the application has: its answer, and bytes both ways.
    fn service_offered(
        &mut self,
        conn: &mut Conn,
        state: &mut State,
        expired: bool,
        wakers: &mut (bool, bool),
    ) {
        let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);
        if state.shutdown {
            shut_down(conn, state);
            return;
        }
        if conn.deadline.is_some()
            && !matches!(socket.state(), TcpState::SynReceived | TcpState::Listen)
        {
            // A consistent handshake the application accepted has completed.
            self.table.established(&conn.tuple);
            conn.deadline = None;
        } else if expired {
            socket.abort();
        }
        match state.answer {
            Answer::Rejected(why) if socket.is_open() => {
                debug!(tuple = ?conn.tuple, ?why, "application rejected the connection");
                Counters::add(&self.counters.requests_rejected, 1);
                socket.abort();
            }
            Answer::Accepted if state.abort && socket.is_open() => socket.abort(),
            Answer::Accepted if !state.reset => {
                // Application to client.
                let sizes = (self.config.tcp_initial_buffer, self.config.tcp_tx_buffer);
                if grow_tx(socket, state.outbound_len, sizes) {
                    Counters::add(&self.counters.tx_buffers_grown, 1);
                }
                while socket.can_send() {
                    let Some(chunk) = state.outbound.front_mut() else {
                        break;
                    };
                    match socket.send_slice(chunk) {
                        Ok(n) if n > 0 => {
                            chunk.advance(n);
                            if chunk.is_empty() {
                                state.outbound.pop_front();
                            }
                            state.outbound_len -= n;
                            conn.bytes_to_client += n as u64;
                            Counters::add(&self.counters.bytes_to_clients, n as u64);
                            wakers.1 = true;
                        }
                        _ => break,
                    }
                }
                if release_tx(socket, state.outbound_len) {
                    Counters::add(&self.counters.tx_buffers_released, 1);
                }
                if state.outbound.is_empty()
                    && (state.outbound_shutdown || state.app_gone)
                    && !conn.fin_sent
                    && socket.may_send()
                {
                    socket.close();
                    conn.fin_sent = true;
                }
                // Client to application.
                if state.app_gone {
                    while socket.can_recv() {
                        if socket.recv(|b| (b.len(), ())).is_err() {
                            break;
                        }
                    }
                } else {
                    // Without window scaling, a larger buffer could never be advertised.
                    let full = match conn.unscaled {
                        true => self.config.tcp_rx_buffer.min(usize::from(u16::MAX)),
                        false => self.config.tcp_rx_buffer,
                    };
                    if grow_rx(socket, full) {
                        Counters::add(&self.counters.rx_buffers_grown, 1);
                    }
                    let cap = conn.shared.capacity;
                    while state.inbound_len < cap && socket.can_recv() {
                        let room = cap - state.inbound_len;
                        let chunk = socket.recv(|b| {
                            let n = b.len().min(room);
                            (n, Bytes::copy_from_slice(b.get(..n).unwrap_or_default()))
                        });
                        match chunk {
                            Ok(chunk) if !chunk.is_empty() => {
                                conn.bytes_from_client += chunk.len() as u64;
                                Counters::add(
                                    &self.counters.bytes_from_clients,
                                    chunk.len() as u64,
                                );
                                state.inbound_len += chunk.len();
                                state.inbound.push_back(chunk);
                                wakers.0 = true;
                            }
                            _ => break,
                        }
                    }
                    state.inbound_blocked = socket.can_recv();
                    // An idle connection holds no receive buffer either, while it has its
                    // initial size (a grown one is a transfer's, given back and refilled at
                    // every segment it would only churn): it comes back with the next segment.
                    if socket.recv_capacity() <= self.config.tcp_initial_buffer
                        && socket.release_rx_buffer().is_some()
                    {
                        Counters::add(&self.counters.rx_buffers_released, 1);
                    }
                    if !state.inbound_fin && !socket.can_recv() && fin_received(socket.state()) {
                        state.inbound_fin = true;
                        wakers.0 = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the socket's state ends the connection.
    fn fate_after_egress(&mut self, conn: &Conn) -> Fate {
        let socket = conn.sockets.get::<tcp::Socket>(conn.handle);
        match (socket.state(), conn.phase) {
            (TcpState::Closed, _) => Fate::Finished,
            // Both FINs are acknowledged: a stopping stack does not wait out TIME-WAIT.
            (TcpState::TimeWait, _) if self.closing.is_some() => Fate::Finished,
            // A RST during the handshake sends smoltcp back to Listen, in every phase: a
            // consistent handshake the application accepted waits for the client's ACK too.
            (TcpState::Listen, _) => Fate::Finished,
            _ => Fate::Alive,
        }
    }

    /// Hands a connection to the application. False when the application is not taking
    /// connections (its queue is full or gone).
    fn offer(&self, conn: &Conn) -> bool {
        let tuple = conn.tuple;
        let request = Request::new(
            Arc::clone(&conn.shared),
            tuple.source,
            tuple.destination,
            conn.handshake,
        );
        match self.requests.try_send(request) {
            Ok(()) => {
                Counters::add(&self.counters.requests_offered, 1);
                true
            }
            Err(e) => {
                // Dropped unanswered it would lock the state, which our caller holds.
                let (mpsc::error::TrySendError::Full(request)
                | mpsc::error::TrySendError::Closed(request)) = e;
                request.withdraw();
                debug!(?tuple, "application not taking connections; reset");
                Counters::add(&self.counters.requests_dropped, 1);
                false
            }
        }
    }

    /// Writes what smoltcp transmitted to the link.
    async fn flush(&mut self) -> Result<(), LinkClosed> {
        let mut sent = 0;
        while let Some(packet) = self.device.pop_tx() {
            self.link.send(packet).await?;
            sent += 1;
        }
        Counters::add(&self.counters.packets_out, sent);
        Counters::add(
            &self.counters.super_packets_out,
            self.device.take_super_packets_out(),
        );
        Ok(())
    }
}

impl Drop for Stack {
    /// However the stack ends (its task returns, is aborted, or panics), every stream still held
    /// fails at once rather than waiting for ever, and the request queue ends.
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        for conn in self.conns.values() {
            end_streams(&conn.shared);
        }
    }
}

/// Marks a connection's streams as ended by the shutdown and wakes whoever waits on them.
fn end_streams(shared: &Shared) {
    let mut state = shared.lock();
    state.shutdown = true;
    let wakers = state.take_wakers(true, true);
    drop(state);
    wakers.wake();
}

/// A connection the application took, while the stack stops: the client gets a FIN after what
/// the socket holds, and what it still sends is discarded. If the application had bytes queued
/// that the socket never took, a FIN would pass the truncated stream off as complete: the
/// client gets a RST instead. A connection the application never accepted is reset too.
fn shut_down(conn: &mut Conn, state: &mut State) {
    let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);
    if state.answer != Answer::Accepted || !state.outbound.is_empty() {
        if socket.is_open() {
            socket.abort();
        }
        return;
    }
    state.outbound.clear();
    state.outbound_len = 0;
    state.inbound.clear();
    state.inbound_len = 0;
    if !conn.fin_sent && socket.may_send() {
        socket.close();
        conn.fin_sent = true;
    }
    while socket.can_recv() {
        if socket.recv(|b| (b.len(), ())).is_err() {
            break;
        }
    }
    if fin_received(socket.state()) {
        state.inbound_fin = true;
    }
}

/// Where a connection is, for reports.
fn connection_state(conn: &Conn) -> ConnectionState {
    match conn.phase {
        Phase::Handshake => return ConnectionState::Handshake,
        Phase::Pending => return ConnectionState::Pending,
        Phase::Offered => {}
    }
    match conn.sockets.get::<tcp::Socket>(conn.handle).state() {
        TcpState::Listen | TcpState::SynSent | TcpState::SynReceived => ConnectionState::Handshake,
        TcpState::Established => ConnectionState::Established,
        TcpState::CloseWait => ConnectionState::ClientClosed,
        TcpState::FinWait1 | TcpState::FinWait2 => ConnectionState::PrismClosed,
        TcpState::Closing | TcpState::LastAck | TcpState::TimeWait | TcpState::Closed => {
            ConnectionState::Closing
        }
    }
}

/// Gives the socket its full receive buffer once the client sends at least half the initial
/// one between two servicings: the small window would hold it back from then on. True when it
/// grew.
fn grow_rx(socket: &mut tcp::Socket<'static>, full: usize) -> bool {
    let capacity = socket.recv_capacity();
    // A released buffer (capacity 0) comes back with the next segment, not here.
    capacity > 0
        && capacity < full
        && socket.recv_queue() * 2 >= capacity
        && socket
            .replace_rx_buffer(tcp::SocketBuffer::new(vec![0; full]))
            .is_ok()
}

/// Gives the socket a send buffer when the application has more for the client than it has
/// room for. Without one (new, or released while idle), the size that holds what is pending
/// (a power of two from the initial size up to the full one): a connection whose buffer was
/// released between two upstream reads gets back what one read needs, not a zeroed 256 KiB
/// each time. A buffer that is too small becomes the full one. True when it grew to the full
/// size.
fn grow_tx(
    socket: &mut tcp::Socket<'static>,
    pending: usize,
    (initial, full): (usize, usize),
) -> bool {
    let capacity = socket.send_capacity();
    if capacity >= full || pending <= capacity - socket.send_queue() {
        return false;
    }
    let size = if capacity == 0 {
        pending.next_power_of_two().clamp(initial.min(full), full)
    } else {
        full
    };
    socket
        .replace_tx_buffer(tcp::SocketBuffer::new(vec![0; size]))
        .is_ok()
        && size == full
}

/// Gives back the socket's send buffer once the client has acknowledged everything in it and
/// the application has nothing more queued: an idle connection holds none (as Linux frees a
/// socket's send memory as it is acknowledged). It is allocated again when the application next
/// has bytes for the client. True when it was released.
fn release_tx(socket: &mut tcp::Socket<'static>, pending: usize) -> bool {
    pending == 0
        && socket.send_queue() == 0
        && socket.send_capacity() > 0
        && socket
            .replace_tx_buffer(tcp::SocketBuffer::new(Vec::new()))
            .is_ok()
}

/// Whether `conn` has waited on its client for [`GIVE_UP_SECS`] without hearing from it: for it
/// to acknowledge data or a FIN, or for its FIN once the application left (Linux, likewise,
/// gives an orphaned connection in FIN-WAIT-2 a limited time). `now`: seconds since the
/// stack's epoch.
fn client_gone(conn: &mut Conn, app_gone: bool, now: u32) -> bool {
    let socket = conn.sockets.get::<tcp::Socket>(conn.handle);
    let waiting = socket.send_queue() > 0
        || matches!(
            socket.state(),
            TcpState::FinWait1 | TcpState::Closing | TcpState::LastAck
        )
        || (app_gone && socket.state() == TcpState::FinWait2);
    if waiting && !conn.waiting {
        conn.heard = conn.heard.max(now);
    }
    conn.waiting = waiting;
    waiting && now.saturating_sub(conn.heard) >= GIVE_UP_SECS
}

/// Seconds since the stack's epoch.
fn seconds(now: smoltcp::time::Instant) -> u32 {
    u32::try_from(now.total_millis() / 1000).unwrap_or(u32::MAX)
}

/// States in which the client's FIN has arrived.
fn fin_received(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::CloseWait | TcpState::LastAck | TcpState::Closing | TcpState::TimeWait
    )
}
