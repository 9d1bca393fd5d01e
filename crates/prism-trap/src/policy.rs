//! [`HandshakePolicy`]: which handshake a new connection gets, decided at its SYN.

use std::collections::HashMap;
use std::fmt;

use crate::{FourTuple, Handshake};

/// Chooses the handshake of each new connection when its SYN arrives (before any SYN-ACK, so
/// the choice cannot wait for the application's answer). A plain [`Handshake`] is a policy
/// that always answers itself.
pub trait HandshakePolicy: Send + Sync + fmt::Debug {
    /// The handshake for a connection with this tuple.
    fn handshake(&self, tuple: &FourTuple) -> Handshake;
}

impl HandshakePolicy for Handshake {
    fn handshake(&self, _tuple: &FourTuple) -> Handshake {
        *self
    }
}

/// One mode for most connections and another for chosen destination ports; for example
/// consistent for SSH and game ports, fast for the web.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// The mode for ports not listed.
    pub default: Handshake,
    /// Destination ports with their own mode.
    pub ports: HashMap<u16, Handshake>,
}

impl HandshakePolicy for PortPolicy {
    fn handshake(&self, tuple: &FourTuple) -> Handshake {
        self.ports
            .get(&tuple.destination.port())
            .copied()
            .unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(port: u16) -> FourTuple {
        FourTuple {
            source: "10.0.0.2:40000".parse().unwrap(),
            destination: format!("192.0.2.1:{port}").parse().unwrap(),
        }
    }

    #[test]
    fn listed_ports_override_the_default() {
        let policy = PortPolicy {
            default: Handshake::Fast,
            ports: HashMap::from([(22, Handshake::Consistent)]),
        };
        assert_eq!(policy.handshake(&tuple(22)), Handshake::Consistent);
        assert_eq!(policy.handshake(&tuple(80)), Handshake::Fast);
        assert_eq!(
            Handshake::Consistent.handshake(&tuple(80)),
            Handshake::Consistent
        );
    }
}
