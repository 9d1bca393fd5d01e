//! [`Counters`]: what the relay moved and what it refused.

use std::sync::atomic::{AtomicU64, Ordering};

prism_device::counters! {
    /// Packets sent into the tunnel.
    sent,
    /// Packets received from the tunnel and delivered.
    received,
    /// Non-TCP packets answered with ICMP administratively prohibited (no relay).
    prohibited,
    /// Packets the relay task dropped as not IP (or TCP, which the stack keeps).
    drop_malformed,
    /// Multicast, broadcast and link-local packets kept off the relay.
    drop_link_local,
    /// Packets too big for the relay, answered with ICMP fragmentation needed / packet too big.
    too_big,
    /// Datagrams shorter than a header and tag.
    drop_truncated,
    /// Datagrams of another version or kind.
    drop_version,
    /// Datagrams that did not authenticate (forged, corrupted, another key).
    drop_auth,
    /// Datagrams whose counter was seen before or is too old.
    drop_replay,
    /// Datagrams for a session the receiver does not know.
    drop_session,
    /// Packets whose source (server) or destination (client) the session does not own.
    drop_spoofed,
    /// Hellos of a new session that took over addresses another session owned (a restart).
    takeovers,
    /// Packets from the server's TUN for an address no session owns.
    drop_no_session,
    /// Hellos accepted (sessions registered or refreshed), on the server.
    hellos,
    /// Hellos the server acknowledged, on the client.
    hello_acks,
    /// Identities: handshakes answered (server) or completed (client).
    handshakes,
    /// Identities: sessions replaced by a newer one of the same client (key rotations).
    rekeys,
    /// Handshake initiations without a valid mac1: not made for this server's key.
    drop_mac,
    /// Handshake initiations from a client key the server does not allow.
    drop_unknown_key,
    /// Handshake initiations beyond the rate the server answers (1,000 a second, 10 for each
    /// proven source address).
    drop_handshake_busy,
    /// Cookie replies: sent by a server under load to initiations that had not shown their
    /// source address (server); taken in (client).
    cookies,
    /// Packets dropped on the client while waiting for its first handshake (beyond the few
    /// it holds until then).
    drop_before_handshake,
    /// Datagrams not sent because the cipher refused to seal them (it does only for payloads
    /// beyond 256 GiB: never expected).
    seal_failed,
    /// Datagrams the kernel would not send (no route to the peer, or an error it reported
    /// for the send): lost.
    drop_send,
    /// Runs of equal datagrams (UDP GSO) the kernel refused to segment, then sent one at a time:
    /// datagrams longer than the path's MTU, which the kernel fragments. Runs of that size are
    /// not tried again.
    gso_refused,
    /// DNS queries handed to the DNS-over-TCP forwarder instead of the relay.
    dns_queries,
    /// DNS queries dropped because the forwarder had too many in flight.
    drop_dns_busy,
}

impl Counters {
    /// Adds one to `counter`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
