//! [`Direct`]: an operating-system socket to the original destination.
//!
//! The TUN captures the destinations Prism serves, so a plain socket to one of them would be
//! routed straight back into the TUN. [`Outside`] sends it out another way: `bind_interface`
//! (SO_BINDTODEVICE), `fwmark` (SO_MARK, for a policy-routing rule), or the product's `protect`
//! hook (Android's `VpnService.protect`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prism_device::Outside;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::{ConnectError, Connecting, Connector, Target, Upstream};

/// Connects to the destination itself with an OS socket.
#[derive(Debug, Clone)]
pub struct Direct {
    outside: Outside,
    timeout: Duration,
}

impl Default for Direct {
    fn default() -> Self {
        Self {
            outside: Outside::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Direct {
    /// A connector with no binding, no mark and a 10 s connect timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends upstream connections out of `interface` (SO_BINDTODEVICE; Linux).
    pub fn bind_interface(mut self, interface: impl Into<String>) -> Self {
        self.outside.bind_interface = Some(interface.into());
        self
    }

    /// Marks upstream sockets with `mark` (SO_MARK; Linux), for a policy-routing rule.
    pub fn fwmark(mut self, mark: u32) -> Self {
        self.outside.fwmark = Some(mark);
        self
    }

    /// How every socket this connector opens avoids Prism's own device (binding, mark, and the
    /// product's `protect` hook, called before each connect).
    pub fn outside(mut self, outside: Outside) -> Self {
        self.outside = outside;
        self
    }

    /// Gives up on a connect after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.timeout
    }

    /// Connects to one socket address with this connector's binding and mark.
    pub async fn connect_addr(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        match self.outside.loops_back(addr) {
            Ok(true) => return Err(ConnectError::Loop { destination: addr }),
            Ok(false) => {}
            // The question could not be asked: the connect itself will tell.
            Err(error) => tracing::debug!(%addr, %error, "route check failed"),
        }
        let socket = self.socket(addr)?;
        match tokio::time::timeout(self.timeout, socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                stream.set_nodelay(true)?;
                Ok(stream)
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(ConnectError::TimedOut),
        }
    }

    fn socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        self.outside.prepare(&socket)?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Resolves `host` and tries its addresses in order.
    pub async fn connect_host(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        self.connect_any(tokio::net::lookup_host((host, port)).await?)
            .await
    }

    /// Tries `addrs` in order; the last failure if none answers.
    pub async fn connect_any(
        &self,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<TcpStream, ConnectError> {
        let mut last = ConnectError::HostUnreachable;
        for addr in addrs {
            match self.connect_addr(addr).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

impl Connector for Direct {
    fn connect<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        Box::pin(async move {
            let stream = match target {
                Target::Ip(addr) => self.connect_addr(*addr).await?,
                Target::Domain(host, port) => self.connect_host(host, *port).await?,
            };
            Ok(Box::new(stream) as Box<dyn Upstream>)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = Direct::new()
            .connect(&Target::Ip(addr))
            .await
            .err()
            .unwrap();
        assert!(matches!(error, ConnectError::Refused), "{error:?}");
    }

    #[tokio::test]
    async fn an_open_port_connects_by_address_and_by_name() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let direct = Direct::new();
        direct
            .connect(&Target::Ip(listener.local_addr().unwrap()))
            .await
            .unwrap();
        direct
            .connect(&Target::Domain("localhost".into(), port))
            .await
            .unwrap();
    }
}
