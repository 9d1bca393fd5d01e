//! [`Handshake`]: when the client's SYN is answered.

use std::fmt;
use std::str::FromStr;

/// How a new connection's handshake is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Handshake {
    /// SYN-ACK at once; the application hears of the connection when the client completes it.
    /// Lowest latency; every port looks open.
    #[default]
    Fast,
    /// SYN-ACK only after the application accepted (its upstream connected); RST or ICMP when
    /// it rejects. The client sees the real round trip and the real refusals.
    Consistent,
}

impl fmt::Display for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Handshake::Fast => "fast",
            Handshake::Consistent => "consistent",
        })
    }
}

/// A handshake name that is neither `fast` nor `consistent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown handshake {0:?}; expected fast or consistent")]
pub struct ParseHandshakeError(String);

impl FromStr for Handshake {
    type Err = ParseHandshakeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fast" => Ok(Handshake::Fast),
            "consistent" => Ok(Handshake::Consistent),
            other => Err(ParseHandshakeError(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_modes() {
        for mode in [Handshake::Fast, Handshake::Consistent] {
            assert_eq!(mode.to_string().parse::<Handshake>(), Ok(mode));
        }
        assert!("slow".parse::<Handshake>().is_err());
        assert_eq!(Handshake::default(), Handshake::Fast);
    }
}
