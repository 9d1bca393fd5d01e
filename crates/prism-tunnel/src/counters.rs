//! [`Counters`]: what [`serve`](crate::serve) asked of its connector and how each ended.

use std::sync::atomic::Ordering;

use crate::ConnectError;

prism_device::counters! {
    /// Upstream connects attempted.
    connects,
    /// Upstream connects made (the client's connection was then accepted).
    connected,
    /// Connects the destination refused.
    refused,
    /// Connects to a host or network that is unreachable (or out of hops).
    unreachable,
    /// Connects that timed out.
    timed_out,
    /// Connects that policy forbade.
    not_allowed,
    /// Connects refused because their socket would be routed back into Prism's own device.
    loops,
    /// Connects the SOCKS5 proxy failed (unreachable, refused the credentials, answered
    /// nonsense).
    proxy_failed,
    /// Connects that failed on a local error (no descriptors left, a protect hook refusing).
    local_errors,
    /// Connects dropped because the stack gave up on the client meanwhile (the client reset,
    /// the handshake timed out, the stack is stopping).
    cancelled,
}

impl Counters {
    /// Counts the failure of a connect handed over before it was confirmed
    /// ([`Connector::connect_early`](crate::Connector::connect_early)), which the relay found.
    pub(crate) fn count_late(&self, error: &ConnectError) {
        // Counted as made when the connector handed it over early; it was not.
        self.connected.fetch_sub(1, Ordering::Relaxed);
        self.count(Err(error));
    }

    /// Counts a connect's outcome.
    pub(crate) fn count(&self, outcome: Result<(), &ConnectError>) {
        let counter = match outcome {
            Ok(()) => &self.connected,
            Err(ConnectError::Refused) => &self.refused,
            Err(
                ConnectError::HostUnreachable
                | ConnectError::NetworkUnreachable
                | ConnectError::TtlExpired,
            ) => &self.unreachable,
            Err(ConnectError::TimedOut) => &self.timed_out,
            Err(ConnectError::NotAllowed) => &self.not_allowed,
            Err(ConnectError::Loop { .. }) => &self.loops,
            Err(ConnectError::Proxy { .. }) => &self.proxy_failed,
            Err(ConnectError::Io(_)) => &self.local_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_counter() {
        let counters = Counters::default();
        counters.count(Ok(()));
        counters.count(Err(&ConnectError::Refused));
        counters.count(Err(&ConnectError::TtlExpired));
        counters.count(Err(&ConnectError::Loop {
            destination: "10.0.0.9:1080".parse().unwrap_or(([0, 0, 0, 0], 0).into()),
        }));
        counters.count(Err(&ConnectError::Proxy {
            proxy: "10.0.0.9:1080".into(),
            reason: "cannot reach the proxy".into(),
        }));
        counters.count(Err(&ConnectError::Io(std::io::Error::from_raw_os_error(
            24,
        ))));
        let s = counters.snapshot();
        assert_eq!(
            (
                s.connected,
                s.refused,
                s.unreachable,
                s.loops,
                s.proxy_failed
            ),
            (1, 1, 1, 1, 1)
        );
        assert_eq!((s.local_errors, s.timed_out, s.not_allowed), (1, 0, 0));
    }
}
