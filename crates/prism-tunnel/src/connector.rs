//! [`Connector`]: how an accepted connection reaches its destination; [`serve`] runs one for
//! every request.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use prism_stack::{Request, Requests};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::ConnectError;
use crate::relay::relay;

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
    fn reset(self)
    where
        Self: Sized,
    {
    }

    /// Ready when a read would not wait, so the relay can wait without holding a read buffer.
    /// The default says "ready" at once; the relay then keeps a buffer while it waits in
    /// `poll_read`, which costs memory per idle connection but is otherwise the same.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

impl Upstream for TcpStream {
    fn reset(self) {
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

/// Opens upstream connections.
pub trait Connector: Send + Sync + 'static {
    /// The stream an upstream connection is.
    type Upstream: Upstream;

    /// Connects to `target`.
    fn connect(
        &self,
        target: &Target,
    ) -> impl Future<Output = Result<Self::Upstream, ConnectError>> + Send;
}

/// Connects every request with `connector` and relays its bytes, until the stack stops. A
/// failed connect rejects the request with the matching [`prism_stack::Rejection`].
pub async fn serve<C: Connector>(mut requests: Requests, connector: Arc<C>) {
    while let Some(request) = requests.next().await {
        let connector = Arc::clone(&connector);
        tokio::spawn(async move { handle(request, &*connector).await });
    }
}

async fn handle<C: Connector>(request: Request, connector: &C) {
    let target = Target::Ip(request.destination());
    // Boxed: the connect future (1.3 KB for SOCKS5) is freed once connected instead of
    // sizing the task that lives as long as the connection.
    match Box::pin(connector.connect(&target)).await {
        Ok(upstream) => {
            let stream = request.accept();
            if let Err(error) = relay(stream, upstream).await {
                debug!(%target, %error, "relay ended with an error");
            }
        }
        Err(error) => {
            debug!(%target, %error, "upstream connect failed");
            request.reject(error.rejection());
        }
    }
}
