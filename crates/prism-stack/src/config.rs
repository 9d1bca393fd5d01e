//! [`Config`]: the knobs of the stack.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prism_trap::{Handshake, HandshakePolicy};

/// Each socket's receive and send buffer unless configured. smoltcp's window only spans the
/// local link to the TUN's kernel (tens of microseconds), where 256 KiB covers more than
/// 20 Gbit/s; the upstream's long path is the kernel's TCP. Larger buffers cost memory per
/// connection once grown, even untouched: jemalloc keeps metadata pages per large allocation
/// (allocated up front for 10,000 connections, 2 MiB buffers cost 216 MB, 256 KiB ones 150 MB).
pub const DEFAULT_TCP_BUFFER: usize = 256 * 1024;

/// What each socket's buffers start at unless configured: both fit one 4 KiB page, and a
/// connection that never sends a burst larger than this never takes more.
pub const DEFAULT_TCP_INITIAL_BUFFER: usize = 1024;

/// How the stack is set up. `Config::default()` suits a TUN with a 1500-byte MTU. Whether
/// the link carries virtio-net frames is the link's own [`Framing`](prism_device::Framing).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// IP MTU of the link; sets the MSS Prism announces.
    pub mtu: usize,
    /// The stack's own addresses with prefix lengths. With AnyIP the stack answers for every
    /// address anyway; these only name it.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Receive buffer of each connection's socket (client to application), once grown. This
    /// is the window offered to the client. Allocated zeroed, so the OS commits pages only as
    /// they are used. At most 1 GiB (TCP's window scale reaches no further).
    pub tcp_rx_buffer: usize,
    /// Send buffer of each connection's socket (application to client), once grown.
    pub tcp_tx_buffer: usize,
    /// What the receive buffer starts at (the window the SYN-ACK offers), and the send buffer
    /// once the application first has bytes for the client (it starts empty; straight to the
    /// full size if they do not fit). Each grows to its full size the first time the small one
    /// limits the connection: the client sent at least half of it in one go, or the
    /// application has more to send than it holds. Idle and chatty connections stay small.
    pub tcp_initial_buffer: usize,
    /// Bytes queued between the socket and the application, each way, per connection.
    pub stream_buffer: usize,
    /// Most connections whose handshake has not completed. SYNs beyond it are answered with
    /// SYN cookies, without state: under a SYN flood real clients still get in (at least 1).
    pub max_half_open: usize,
    /// Most requests waiting for the application; connections beyond it get RST.
    pub request_queue: usize,
    /// Picks each new connection's handshake at its SYN. A plain [`Handshake`] applies to all.
    pub handshake: Arc<dyn HandshakePolicy>,
    /// Most consistent handshakes waiting for the application's answer. SYNs beyond it are
    /// answered with SYN cookies and get the fast handshake (at least 1).
    pub max_pending: usize,
    /// How long a consistent handshake waits for the application's answer before the client
    /// is told the host is unreachable.
    pub pending_timeout: Duration,
    /// Busy polling, off by default: for this long after each round of the stack, one runtime
    /// worker polls for I/O instead of sleeping, so that a request/response exchange does not
    /// wait for the kernel to wake Prism's thread. Costs that worker's core while traffic
    /// flows; an idle stack does not poll. 50 µs covers a local round trip.
    pub busy_poll: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mtu: 1500,
            addresses: Vec::new(),
            tcp_rx_buffer: DEFAULT_TCP_BUFFER,
            tcp_tx_buffer: DEFAULT_TCP_BUFFER,
            tcp_initial_buffer: DEFAULT_TCP_INITIAL_BUFFER,
            stream_buffer: 256 * 1024,
            max_half_open: 4096,
            request_queue: 1024,
            handshake: Arc::new(Handshake::Fast),
            max_pending: 1024,
            pending_timeout: Duration::from_secs(15),
            busy_poll: None,
        }
    }
}
