//! [`Outside`]: how the sockets Prism opens itself (to an upstream, a proxy, the relay server)
//! reach the outside world instead of being routed back into Prism's own device.
//!
//! A default route through the TUN captures every socket of the machine, Prism's own included.
//! Three ways out, in the order platforms offer them: an interface to bind to
//! (`SO_BINDTODEVICE`), a firewall mark that a policy rule routes around the TUN (`SO_MARK`),
//! and a product's own hook called with each socket before it connects (Android's
//! `VpnService.protect(fd)`). Invariant: every socket Prism opens toward the outside passes
//! through [`Outside::prepare`] before its first packet.

use std::fmt;
use std::io;
use std::sync::Arc;

use socket2::Socket;

/// A product's hook, called with the descriptor of every socket Prism opens toward the outside
/// before it connects. An error fails that one connection (or the relay's start).
#[cfg(unix)]
pub type Protect = Arc<dyn Fn(std::os::fd::BorrowedFd<'_>) -> io::Result<()> + Send + Sync>;

/// How Prism's own sockets avoid its device. The default does nothing special: right when the
/// device carries only some routes, and the upstream is not among them.
#[derive(Clone, Default)]
pub struct Outside {
    /// Bind to this interface (`SO_BINDTODEVICE`; Linux and Android).
    pub bind_interface: Option<String>,
    /// Mark with this firewall mark (`SO_MARK`; Linux and Android).
    pub fwmark: Option<u32>,
    /// Hand each socket to the product before it connects.
    #[cfg(unix)]
    pub protect: Option<Protect>,
    /// The device's own addresses: a socket whose route would leave from one of them is
    /// headed back into the device (a loop), and [`Outside::loops_back`] says so.
    pub device_addresses: Vec<std::net::IpAddr>,
}

impl fmt::Debug for Outside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Outside");
        s.field("bind_interface", &self.bind_interface)
            .field("fwmark", &self.fwmark)
            .field("device_addresses", &self.device_addresses);
        #[cfg(unix)]
        s.field("protect", &self.protect.is_some());
        s.finish()
    }
}

impl Outside {
    /// Whether a socket prepared as this one says, connecting to `destination`, would be
    /// routed back into the device: asks the kernel with a UDP socket of the same binding,
    /// mark and hook (connecting one sends nothing) which source address it would use. An
    /// error means the question could not be asked; the caller goes on.
    pub fn loops_back(&self, destination: std::net::SocketAddr) -> io::Result<bool> {
        if self.device_addresses.is_empty() {
            return Ok(false);
        }
        let probe = Socket::new(
            socket2::Domain::for_address(destination),
            socket2::Type::DGRAM,
            None,
        )?;
        self.prepare(&probe)?;
        match probe.connect(&destination.into()) {
            Ok(()) => {}
            // No route at all is not a loop; the real connect reports it.
            Err(error) if error.raw_os_error() == Some(101) => return Ok(false),
            Err(error) => return Err(error),
        }
        let source = probe.local_addr()?.as_socket().map(|address| address.ip());
        Ok(source.is_some_and(|ip| self.device_addresses.contains(&ip)))
    }

    /// Applies the binding, the mark and the product's hook to a socket not yet connected.
    pub fn prepare(&self, socket: &Socket) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            if let Some(interface) = &self.bind_interface {
                socket
                    .bind_device(Some(interface.as_bytes()))
                    .map_err(|error| {
                        io::Error::new(
                            error.kind(),
                            format!("cannot bind a socket to {interface}: {error}"),
                        )
                    })?;
            }
            if let Some(mark) = self.fwmark {
                socket.set_mark(mark).map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!("cannot mark a socket with {mark:#x}: {error}"),
                    )
                })?;
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        if self.bind_interface.is_some() || self.fwmark.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "bind-interface and fwmark are only supported on Linux and Android",
            ));
        }
        #[cfg(unix)]
        if let Some(protect) = &self.protect {
            use std::os::fd::AsFd;
            protect(socket.as_fd()).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("the protect hook refused a socket: {error}"),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    #[test]
    fn a_route_that_leaves_from_the_device_is_a_loop() {
        let loopback: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let this_host = Outside {
            device_addresses: vec!["127.0.0.1".parse().unwrap()],
            ..Outside::default()
        };
        assert!(this_host.loops_back(loopback).unwrap());
        let elsewhere = Outside {
            device_addresses: vec!["10.255.255.1".parse().unwrap()],
            ..Outside::default()
        };
        assert!(!elsewhere.loops_back(loopback).unwrap());
        assert!(!Outside::default().loops_back(loopback).unwrap());
    }

    #[test]
    fn the_hook_sees_the_socket_and_its_error_fails_the_socket() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let outside = Outside {
            protect: Some(Arc::new(move |fd| {
                log.lock().unwrap().push(fd.as_raw_fd());
                Ok(())
            })),
            ..Outside::default()
        };
        let socket = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        outside.prepare(&socket).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![socket.as_raw_fd()]);

        let refusing = Outside {
            protect: Some(Arc::new(|_| Err(io::Error::other("no")))),
            ..Outside::default()
        };
        let error = refusing.prepare(&socket).unwrap_err();
        assert!(error.to_string().contains("protect hook"), "{error}");
    }
}
