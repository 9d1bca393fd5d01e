//! [`Direct`]: an operating-system socket to the original destination.
//!
//! The TUN captures the destinations Prism serves, so a plain socket to one of them would be
//! routed straight back into the TUN. `bind_interface` (SO_BINDTODEVICE) and `fwmark` (SO_MARK,
//! for a policy-routing rule) send it out another way.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::{ConnectError, Connector, Target};

/// Connects to the destination itself with an OS socket.
#[derive(Debug, Clone)]
pub struct Direct {
    bind_interface: Option<String>,
    fwmark: Option<u32>,
    timeout: Duration,
}

impl Default for Direct {
    fn default() -> Self {
        Self {
            bind_interface: None,
            fwmark: None,
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
        self.bind_interface = Some(interface.into());
        self
    }

    /// Marks upstream sockets with `mark` (SO_MARK; Linux), for a policy-routing rule.
    pub fn fwmark(mut self, mark: u32) -> Self {
        self.fwmark = Some(mark);
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
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            if let Some(interface) = &self.bind_interface {
                socket.bind_device(Some(interface.as_bytes()))?;
            }
            if let Some(mark) = self.fwmark {
                socket.set_mark(mark)?;
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        if self.bind_interface.is_some() || self.fwmark.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "bind-interface and fwmark are only supported on Linux",
            ));
        }
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Resolves `host` and tries its addresses in order.
    pub async fn connect_host(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let mut last = ConnectError::HostUnreachable;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match self.connect_addr(addr).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

impl Connector for Direct {
    type Upstream = TcpStream;

    async fn connect(&self, target: &Target) -> Result<TcpStream, ConnectError> {
        match target {
            Target::Ip(addr) => self.connect_addr(*addr).await,
            Target::Domain(host, port) => self.connect_host(host, *port).await,
        }
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
        let error = Direct::new().connect(&Target::Ip(addr)).await.unwrap_err();
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
