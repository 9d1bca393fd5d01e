//! [`Connector`]: how an accepted connection reaches its destination; [`serve`] runs one for
//! every request.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

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
}

impl Upstream for TcpStream {
    fn reset(self) {
        // SO_LINGER 0: close() sends RST. If it cannot be set, a FIN is the best left to do.
        let _ = self.set_zero_linger();
    }
}

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
    match connector.connect(&target).await {
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
