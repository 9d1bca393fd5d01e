//! [`Stack`]: the task that owns the smoltcp interface and every connection's socket.
//!
//! One closed loop reacts to four [`Event`]s: packets from the link, connections the
//! application touched, a connection's timer, and the link closing. There is no fixed sleep and
//! no busy loop: the task waits for whichever comes first.
//!
//! Per-packet cost does not grow with the number of connections. smoltcp walks every socket of
//! the `SocketSet` it is given, so each connection has its own one-socket set; a packet is
//! matched to its connection by a hash lookup in [`prism_trap::Table`] and smoltcp sees only
//! that connection's set. Timers live in one ordered set of deadlines. The single `Interface`
//! is shared by all connections.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use prism_device::{BATCH, Link, LinkClosed, Medium, PrismDevice};
use prism_trap::{Decision, FourTuple, Malformed, Packet, Segment, Table, classify};
use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::socket::tcp::{self, State as TcpState};
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, trace};

use crate::Config;
use crate::conn::{Answer, ConnId, Request, Shared};
use crate::counters::Counters;
use crate::timers::Timers;

/// A half-open connection that has not completed its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The connections offered to the application, in the order their handshakes completed.
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

impl Requests {
    /// The next connection, or `None` once the stack has stopped.
    pub async fn next(&mut self) -> Option<Request> {
        self.0.recv().await
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
    /// The link is gone: the stack stops.
    LinkClosed,
}

/// Where a connection is in its life, as far as the application is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The client's handshake has not completed.
    Handshake,
    /// The application has been given a [`Request`].
    Offered,
}

#[derive(Debug)]
struct Conn {
    tuple: FourTuple,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    shared: Arc<Shared>,
    phase: Phase,
    handshake_deadline: Instant,
    /// `close()` was called: our FIN is queued or sent.
    fin_sent: bool,
    /// Already queued for servicing in this round.
    dirty: bool,
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
    /// answers them as a closed port does (RST).
    orphans: SocketSet<'static>,
    wake_tx: mpsc::UnboundedSender<ConnId>,
    wake_rx: mpsc::UnboundedReceiver<ConnId>,
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    epoch: Instant,
    next_id: ConnId,
    dirty: Vec<ConnId>,
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
    /// A stack on `link` (its other end is the TUN adapter or a test's client).
    pub fn new(config: Config, link: Link) -> (Stack, Requests) {
        let mut device = PrismDevice::new(Medium::Ip, config.mtu);
        // `prism_trap::classify` verified every incoming checksum already.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
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
        let stack = Stack {
            table: Table::new(config.max_half_open),
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
        };
        (stack, Requests(requests_rx))
    }

    /// The stack's counters, readable while it runs.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Runs until the link closes.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut woken = Vec::new();
        let mut due = Vec::new();
        loop {
            let deadline = self.timers.next();
            let event = tokio::select! {
                received = self.link.recv_batch(&mut batch) => match received {
                    Ok(_) => Event::Packets,
                    Err(LinkClosed) => Event::LinkClosed,
                },
                _ = self.wake_rx.recv_many(&mut woken, 1024) => Event::Woken,
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    Event::Timer
                }
            };
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
                Event::LinkClosed => break,
            }
            self.service_dirty(now);
            if self.flush().await.is_err() {
                break;
            }
        }
        debug!(counters = %self.counters.snapshot(), "stack stopped");
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
        Counters::add(&self.counters.packets_in, batch.len() as u64);
        for packet in batch.drain(..) {
            let segment = match classify(&packet) {
                Ok(Packet::Tcp(segment)) => segment,
                Ok(Packet::Other { protocol }) => {
                    trace!(protocol, "non-TCP packet dropped");
                    Counters::add(&self.counters.drop_not_tcp, 1);
                    continue;
                }
                Err(malformed) => {
                    trace!(%malformed, "packet dropped");
                    Counters::add(self.malformed_counter(malformed), 1);
                    continue;
                }
            };
            let target = self.target(&segment);
            self.device.push_rx(packet);
            let sockets = match target.and_then(|id| self.conns.get_mut(&id)) {
                Some(conn) => {
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

    /// The connection a segment goes to, opening one for a new SYN.
    fn target(&mut self, segment: &Segment) -> Option<ConnId> {
        match self.table.decide(segment) {
            Decision::Existing(id) => Some(id),
            Decision::Open => self.open(segment.tuple),
            Decision::Reopen(old) => {
                self.retire(old);
                self.open(segment.tuple)
            }
            Decision::Refuse => {
                debug!(tuple = ?segment.tuple, "half-open cap reached; SYN refused");
                Counters::add(&self.counters.syn_refused, 1);
                None
            }
            Decision::NoConnection => {
                Counters::add(&self.counters.no_connection, 1);
                None
            }
        }
    }

    /// Creates the listening socket for exactly `tuple`.
    fn open(&mut self, tuple: FourTuple) -> Option<ConnId> {
        let endpoint = IpListenEndpoint {
            addr: Some(tuple.destination.ip().into()),
            port: tuple.destination.port(),
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.tcp_rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tcp_tx_buffer]),
        );
        // Prism relays what the application already batched; Nagle would only add delay.
        socket.set_nagle_enabled(false);
        if socket.listen(endpoint).is_err() {
            // Port 0: not a connectable endpoint. smoltcp answers it as a closed port.
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
        self.table.insert(tuple, id);
        self.conns.insert(
            id,
            Conn {
                tuple,
                sockets,
                handle,
                shared,
                phase: Phase::Handshake,
                handshake_deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                fin_sent: false,
                dirty: false,
            },
        );
        Counters::add(&self.counters.connections_opened, 1);
        trace!(id, ?tuple, "connection opened");
        Some(id)
    }

    /// Forgets a connection whose tuple a new SYN reuses (it was closing gracefully).
    fn retire(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            self.table.remove(&conn.tuple);
            self.timers.set(id, None);
            Counters::add(&self.counters.connections_closed, 1);
        }
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
        let mut wake_read = false;
        let mut wake_write = false;
        let socket = conn.sockets.get_mut::<tcp::Socket>(conn.handle);

        if conn.phase == Phase::Handshake {
            match socket.state() {
                TcpState::Listen | TcpState::SynReceived => {
                    if Instant::now() >= conn.handshake_deadline {
                        socket.abort();
                    }
                }
                TcpState::Closed | TcpState::TimeWait => {}
                _ => {
                    self.table.established(&conn.tuple);
                    conn.phase = Phase::Offered;
                    if !self.offer(conn.tuple, &conn.shared) {
                        socket.abort();
                    }
                }
            }
        }

        match state.answer {
            Answer::Rejected(why) if socket.is_open() => {
                debug!(id, ?why, "application rejected the connection");
                Counters::add(&self.counters.requests_rejected, 1);
                socket.abort();
            }
            Answer::Accepted if state.abort && socket.is_open() => socket.abort(),
            Answer::Accepted if !state.reset => {
                // Application to client.
                while !state.outbound.is_empty() && socket.can_send() {
                    match socket.send_slice(&state.outbound) {
                        Ok(n) if n > 0 => {
                            state.outbound.advance(n);
                            wake_write = true;
                        }
                        _ => break,
                    }
                }
                if state.outbound.is_empty()
                    && (state.outbound_shutdown || state.app_gone)
                    && !conn.fin_sent
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
                    let cap = shared.capacity;
                    while state.inbound_len < cap && socket.can_recv() {
                        let room = cap - state.inbound_len;
                        let chunk = socket.recv(|b| {
                            let n = b.len().min(room);
                            (n, Bytes::copy_from_slice(b.get(..n).unwrap_or_default()))
                        });
                        match chunk {
                            Ok(chunk) if !chunk.is_empty() => {
                                state.inbound_len += chunk.len();
                                state.inbound.push_back(chunk);
                                wake_read = true;
                            }
                            _ => break,
                        }
                    }
                    state.inbound_blocked = socket.can_recv();
                    if !state.inbound_fin && !socket.can_recv() && fin_received(socket.state()) {
                        state.inbound_fin = true;
                        wake_read = true;
                    }
                }
            }
            _ => {}
        }

        // Transmit everything smoltcp has for this connection (one segment per pass).
        while self
            .iface
            .poll_egress(now, &mut self.device, &mut conn.sockets)
            == PollResult::SocketStateChanged
        {}

        let socket = conn.sockets.get::<tcp::Socket>(conn.handle);
        let finished = match (socket.state(), conn.phase) {
            (TcpState::Closed, _) => true,
            // A RST during the handshake sends smoltcp back to Listen.
            (TcpState::Listen, Phase::Handshake) => true,
            (TcpState::TimeWait, _) => {
                self.table.closing(&conn.tuple);
                false
            }
            _ => false,
        };
        if finished {
            let graceful = conn.fin_sent && state.inbound_fin;
            if graceful {
                Counters::add(&self.counters.connections_closed, 1);
            } else {
                state.reset = true;
                Counters::add(&self.counters.connections_reset, 1);
            }
            wake_read = true;
            wake_write = true;
            self.table.remove(&conn.tuple);
            self.timers.set(id, None);
            trace!(id, graceful, "connection finished");
        } else {
            let mut deadline = self
                .iface
                .poll_at(now, &conn.sockets)
                .map(|at| self.to_instant(at));
            if conn.phase == Phase::Handshake {
                deadline = Some(
                    deadline.map_or(conn.handshake_deadline, |d| d.min(conn.handshake_deadline)),
                );
            }
            self.timers.set(id, deadline);
        }
        let wakers = state.take_wakers(wake_read, wake_write);
        drop(state);
        wakers.wake();
        if !finished {
            self.conns.insert(id, conn);
        }
    }

    /// Hands a connection whose handshake completed to the application. False when the
    /// application is not taking connections (its queue is full or gone).
    fn offer(&self, tuple: FourTuple, shared: &Arc<Shared>) -> bool {
        let request = Request::new(
            Arc::clone(shared),
            tuple.source,
            tuple.destination,
            self.config.handshake,
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
        Ok(())
    }
}

/// States in which the client's FIN has arrived.
fn fin_received(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::CloseWait | TcpState::LastAck | TcpState::Closing | TcpState::TimeWait
    )
}
