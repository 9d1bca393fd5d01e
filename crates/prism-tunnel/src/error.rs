//! [`ConnectError`]: why an upstream connection failed, precisely enough to tell the client.

use std::io;

use prism_stack::Rejection;

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The destination refused the connection (RST, or SOCKS5 reply 0x05).
    #[error("connection refused")]
    Refused,
    /// The destination host is unreachable (EHOSTUNREACH, or SOCKS5 reply 0x04).
    #[error("host unreachable")]
    HostUnreachable,
    /// The destination network is unreachable (ENETUNREACH, or SOCKS5 reply 0x03).
    #[error("network unreachable")]
    NetworkUnreachable,
    /// The proxy's connection attempt ran out of hops (SOCKS5 reply 0x06).
    #[error("TTL expired")]
    TtlExpired,
    /// Policy forbids the connection (EACCES/EPERM, or SOCKS5 reply 0x02).
    #[error("connection not allowed")]
    NotAllowed,
    /// No answer in time.
    #[error("timed out")]
    TimedOut,
    /// The socket would be routed back into Prism's own device: connecting would loop.
    #[error("{destination} is routed back into Prism's own device")]
    Loop {
        /// The destination (the upstream, or the proxy).
        destination: std::net::SocketAddr,
    },
    /// The SOCKS5 proxy failed in another way (unreachable proxy, bad reply, auth failure).
    #[error("SOCKS5 proxy {proxy}: {reason}")]
    Proxy {
        /// The proxy's address.
        proxy: String,
        /// What went wrong.
        reason: String,
    },
    /// Any other operating-system error.
    #[error("{0}")]
    Io(io::Error),
}

impl ConnectError {
    /// Whether nothing will work until someone acts: the proxy is unreachable, refuses the
    /// credentials or answers nonsense, or a local resource failed. A destination refusing or
    /// unreachable is not such a failure.
    pub fn needs_attention(&self) -> bool {
        matches!(
            self,
            ConnectError::Proxy { .. } | ConnectError::Io(_) | ConnectError::Loop { .. }
        )
    }

    /// What a user can do about it, as a clause to append to the message (empty if nothing
    /// specific).
    pub fn hint(&self) -> &'static str {
        const EMFILE: i32 = 24;
        const ENFILE: i32 = 23;
        match self {
            ConnectError::Io(error) if matches!(error.raw_os_error(), Some(EMFILE | ENFILE)) => {
                "; out of descriptors: if Prism's own upstream is routed back into its TUN, \
                 use --default-route or --bind-interface"
            }
            ConnectError::Proxy { reason, .. } if reason.to_lowercase().contains("auth") => {
                "; check the user and password in the socks5:// URL"
            }
            ConnectError::Proxy { .. } => "; clients are refused until the proxy answers",
            ConnectError::Loop { .. } => {
                "; refused: leave it out of --route, or let Prism's own sockets bypass the TUN \
                 (--default-route, which marks them, or --bind-interface)"
            }
            _ => "",
        }
    }

    /// How the client should hear of this failure.
    pub fn rejection(&self) -> Rejection {
        match self {
            ConnectError::Refused | ConnectError::Proxy { .. } | ConnectError::Io(_) => {
                Rejection::Refused
            }
            ConnectError::HostUnreachable | ConnectError::TtlExpired => Rejection::HostUnreachable,
            ConnectError::NetworkUnreachable => Rejection::NetworkUnreachable,
            ConnectError::NotAllowed | ConnectError::Loop { .. } => Rejection::Prohibited,
            ConnectError::TimedOut => Rejection::TimedOut,
        }
    }
}

impl From<io::Error> for ConnectError {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            io::ErrorKind::HostUnreachable => ConnectError::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => ConnectError::NetworkUnreachable,
            io::ErrorKind::TimedOut => ConnectError::TimedOut,
            io::ErrorKind::PermissionDenied => ConnectError::NotAllowed,
            _ => ConnectError::Io(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_what_the_client_should_see() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, Rejection::Refused),
            (io::ErrorKind::HostUnreachable, Rejection::HostUnreachable),
            (
                io::ErrorKind::NetworkUnreachable,
                Rejection::NetworkUnreachable,
            ),
            (io::ErrorKind::TimedOut, Rejection::TimedOut),
            (io::ErrorKind::PermissionDenied, Rejection::Prohibited),
            (io::ErrorKind::Other, Rejection::Refused),
        ];
        for (kind, rejection) in cases {
            assert_eq!(
                ConnectError::from(io::Error::from(kind)).rejection(),
                rejection
            );
        }
    }
}
