//! [`Connector`]: how an accepted connection reaches its destination; [`serve`] runs one for
//! every request.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use prism_stack::{Handshake, Request, Requests};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::debug;

use crate::ConnectError;
use crate::alerts::Alerts;
use crate::counters::Counters;
use crate::relay::{Relay, relay};

/// Where an upstream connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port, as the client asked for it.
    Ip(SocketAddr),
    /// A host name and port (for products that map addresses back to names).
    Domain(String, u16),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ip(addr) => addr.fmt(f),
            Target::Domain(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// An upstream byte stream Prism can relay to and reset.
pub trait Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ends the connection abruptly, so the far end sees a reset rather than a clean close.
    fn reset(self: Box<Self>) {}

    /// Ready when a read would not wait, so the relay can wait without holding a read buffer.
    /// The default says "ready" at once; the relay then keeps a buffer while it waits in
    /// `poll_read`, which costs memory per idle connection but is otherwise the same.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

impl Upstream for TcpStream {
    fn reset(self: Box<Self>) {
        // SO_LINGER 0: close() sends RST. If it cannot be set, a FIN is the best left to do.
        let _ = self.set_zero_linger();
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// An in-process upstream (an embedder's own transport, a test): no reset to send, and no read
/// readiness, so the relay holds a read buffer while it waits.
impl Upstream for tokio::io::DuplexStream {}

/// A connect in progress: what [`Connector::connect`] returns.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn Upstream>, ConnectError>> + Send + 'a>>;

/// Opens upstream connections. Object-safe, so a product picks its connector at run time and
/// hands it over as `Arc<dyn Connector>`:
///
/// ```
/// use prism_tunnel::{ConnectError, Connecting, Connector, Target, Upstream};
///
/// struct Refuse;
///
/// impl Connector for Refuse {
///     fn connect<'a>(&'a self, _target: &'a Target) -> Connecting<'a> {
///         Box::pin(async { Err::<Box<dyn Upstream>, _>(ConnectError::Refused) })
///     }
/// }
/// let connector: std::sync::Arc<dyn Connector> = std::sync::Arc::new(Refuse);
/// ```
pub trait Connector: Send + Sync + 'static {
    /// Connects to `target`.
    fn connect<'a>(&'a self, target: &'a Target) -> Connecting<'a>;

    /// Connects to `target` for a client that already has its SYN-ACK (the fast handshake):
    /// the connector may hand the upstream over before the far end confirmed it, and report a
    /// refusal as the first read's error instead (the client is then reset, as it would be
    /// anyway). The default is [`Connector::connect`].
    fn connect_early<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        self.connect(target)
    }
}

/// Connects every request with `connector` and relays its bytes, until the stack stops. A
/// failed connect rejects the request with the matching [`prism_stack::Rejection`]. Every task
/// it starts is its own: when the stack stops, the connects and relays still running are
/// ended (their upstream sockets closed) before `serve` returns. Each connect and its outcome
/// is counted in `counters`.
pub async fn serve(mut requests: Requests, connector: Arc<dyn Connector>, counters: Arc<Counters>) {
    let reports = Arc::new(Reports {
        alerts: Alerts::default(),
        counters,
    });
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            request = requests.next() => match request {
                Some(request) => {
                    tasks.spawn(handle(request, Arc::clone(&connector), Arc::clone(&reports)));
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// Where connects are counted and failures warned about, shared by every connection.
struct Reports {
    alerts: Alerts,
    counters: Arc<Counters>,
}

/// A connection's task: its connect (boxed, so that it is freed once connected instead of
/// sizing a task that lives as long as the connection), then its relay.
struct Handle {
    state: State,
    reports: Arc<Reports>,
}

enum State {
    Connecting(Pin<Box<dyn Future<Output = Option<Relay>> + Send>>),
    Relaying(Relay),
    Done,
}

fn handle(request: Request, connector: Arc<dyn Connector>, reports: Arc<Reports>) -> Handle {
    let connecting = Box::pin(connect(request, connector, Arc::clone(&reports)));
    Handle {
        state: State::Connecting(connecting),
        reports,
    }
}

impl Future for Handle {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Handle { state, reports } = &mut *self;
        loop {
            match state {
                State::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Some(relay) => *state = State::Relaying(relay),
                    None => *state = State::Done,
                },
                State::Relaying(relay) => {
                    // An error is logged by the relay, which knows the connection; a connect
                    // handed over early and refused later is counted and warned about here.
                    if let Err(error) = ready!(Pin::new(relay).poll(cx))
                        && let Some(late) = error
                            .get_ref()
                            .and_then(|e| e.downcast_ref::<ConnectError>())
                    {
                        reports.counters.count_late(late);
                        reports.alerts.connect_failed(late);
                    }
                    *state = State::Done;
                }
                State::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Connects a request's upstream: the relay to run, or `None` once the request is rejected
/// (or cancelled).
async fn connect(
    request: Request,
    connector: Arc<dyn Connector>,
    reports: Arc<Reports>,
) -> Option<Relay> {
    let Reports { alerts, counters } = &*reports;
    let target = Target::Ip(request.destination());
    counters.connects.fetch_add(1, Ordering::Relaxed);
    // Only a client that already has its SYN-ACK may get an upstream not yet confirmed.
    let connecting = if request.handshake() == Handshake::Fast {
        connector.connect_early(&target)
    } else {
        connector.connect(&target)
    };
    let connected = tokio::select! {
        connected = connecting => connected,
        () = request.cancelled() => {
            // The stack gave up on the client (it reset, its handshake timed out, the stack stops):
            // dropping the connect closes its socket now rather than at its timeout.
            debug!(%target, "request cancelled while connecting");
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    match connected {
        Ok(upstream) => {
            counters.count(Ok(()));
            Some(relay(request.accept(), upstream))
        }
        Err(error) => {
            debug!(%target, %error, "upstream connect failed");
            counters.count(Err(&error));
            alerts.connect_failed(&error);
            request.reject(error.rejection());
            None
        }
    }
}
