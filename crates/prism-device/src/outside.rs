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
}

impl fmt::Debug for Outside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Outside");
        s.field("bind_interface", &self.bind_interface)
            .field("fwmark", &self.fwmark);
        #[cfg(unix)]
        s.field("protect", &self.protect.is_some());
        s.finish()
    }
}

impl Outside {
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
