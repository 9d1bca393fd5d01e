//! [`Counters`]: what the stack did and what it dropped, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

prism_device::counters! {
    /// Packets read from the link.
    packets_in,
    /// Packets written to the link.
    packets_out,
    /// TCP super-packets (up to 64 KB) the kernel handed over whole: offload at work.
    super_packets_in,
    /// TCP super-packets sent for the kernel to segment: offload at work.
    super_packets_out,
    /// Packets dropped as not IPv4/IPv6.
    drop_version,
    /// Packets dropped as truncated or with inconsistent lengths.
    drop_truncated,
    /// Packets dropped for a bad IPv4 or TCP checksum.
    drop_checksum,
    /// IPv4 fragments dropped.
    drop_fragment,
    /// TCP packets dropped for a non-unicast address.
    drop_address,
    /// Non-TCP packets dropped: nobody takes them ([`Stack::divert_other_protocols`] was not
    /// called).
    ///
    /// [`Stack::divert_other_protocols`]: crate::Stack::divert_other_protocols
    drop_not_tcp,
    /// Non-TCP packets handed to whoever takes them (the relay).
    diverted,
    /// Non-TCP packets dropped because their taker's queue was full.
    drop_divert_full,
    /// TCP segments for no connection, answered with RST (a SYN to port 0 is dropped, and so
    /// is a segment that proves no SYN cookie while cookies are in use, unless the stack is
    /// stopping).
    no_connection,
    /// Connections opened (SYN accepted).
    connections_opened,
    /// TCP segments handed to a connection's socket (the SYNs that opened one included). With
    /// the drops and refusals, every packet read is counted exactly once.
    segments_in,
    /// Retransmitted SYNs absorbed while a consistent handshake waited.
    syn_absorbed,
    /// Consistent handshakes done the fast way because the pending cap was reached.
    consistent_as_fast,
    /// Consistent handshakes the application did not answer in time.
    pending_timeouts,
    /// ICMP destination-unreachable errors sent.
    unreachable_sent,
    /// Connections offered to the application.
    requests_offered,
    /// Connections refused because the application's request queue was full or gone.
    requests_dropped,
    /// Connections the application rejected.
    requests_rejected,
    /// Connections that ended with a reset (either side).
    connections_reset,
    /// Connections that ended gracefully.
    connections_closed,
    /// Connections reset because their client answered nothing for two minutes while they
    /// waited on it (it is gone): they are also in `connections_reset`.
    gave_up,
    /// SYNs refused because the stack is shutting down.
    syn_refused_stopping,
    /// SYNs answered with a SYN cookie, without state, because the half-open cap was reached:
    /// a SYN flood, or clients that never complete their handshakes.
    syn_cookies_sent,
    /// Connections opened when a client's ACK returned a valid SYN cookie.
    syn_cookies_accepted,
    /// Bytes the clients sent, handed to the application's streams.
    bytes_from_clients,
    /// Bytes the application sent, handed to the clients' connections.
    bytes_to_clients,
    /// Receive buffers grown from their initial size to the full one.
    rx_buffers_grown,
    /// Send buffers grown to the full size (from empty or from the initial size); a connection
    /// whose buffer was released while idle may grow one again.
    tx_buffers_grown,
    /// Send buffers given back because everything in them was acknowledged and the application
    /// had nothing more for the client.
    tx_buffers_released,
    /// Receive buffers of their initial size given back while empty (an idle connection holds
    /// none; the next segment brings one back).
    rx_buffers_released,
    /// Busy polling: times the polling task woke for traffic and polled for its window.
    busy_poll_windows,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
