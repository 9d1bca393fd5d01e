//! [`Stats`]: one typed snapshot of everything the engine counts, and its JSON form (what the
//! `prism` binary writes to its stats file and the C ABI returns).

use prism_stack::{Connection, Report};

/// The engine at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The stack's counters: packets, drops by reason, connections, bytes each way
    /// (`bytes_from_clients`, `bytes_to_clients`).
    pub stack: prism_stack::Snapshot,
    /// The relay's counters (all zero without a relay).
    pub relay: prism_relay::Snapshot,
    /// The upstream connects and how they ended (refused, unreachable, a loop, the proxy...).
    pub upstream: prism_tunnel::Snapshot,
    /// The Ethernet gateway's counters, on an Ethernet source.
    pub gateway: Option<prism_l2::Counters>,
    /// Packets the device refused to take (each dropped).
    pub device_refused_writes: u64,
    /// Connections the stack holds, in any state.
    pub open: usize,
    /// Of those, the ones whose handshake has not completed.
    pub half_open: usize,
    /// Of those, consistent handshakes waiting for their upstream.
    pub pending: usize,
    /// Each connection the stack holds: client, original destination, age, bytes, state.
    pub connections: Vec<Connection>,
}

impl Stats {
    pub(crate) fn new(
        report: Report,
        relay: prism_relay::Snapshot,
        upstream: prism_tunnel::Snapshot,
        gateway: Option<prism_l2::Counters>,
        device_refused_writes: u64,
    ) -> Stats {
        Stats {
            stack: report.counters,
            relay,
            upstream,
            gateway,
            device_refused_writes,
            open: report.open,
            half_open: report.half_open,
            pending: report.pending,
            connections: report.connections,
        }
    }

    /// Every counter by one flat name: the stack's as they are, the relay's with `relay_`, the
    /// upstream's with `upstream_`, the gateway's with `l2_`, then `tun_refused_writes`, `open`, `half_open` and `pending`.
    pub fn fields(&self) -> Vec<(String, u64)> {
        let prefixed = |prefix: &'static str, fields: Vec<(&'static str, u64)>| {
            fields
                .into_iter()
                .map(move |(name, value)| (format!("{prefix}{name}"), value))
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        prefixed("", self.stack.fields())
            .chain(prefixed("relay_", self.relay.fields()))
            .chain(prefixed("upstream_", self.upstream.fields()))
            .chain(prefixed(
                "l2_",
                self.gateway.map(|g| g.fields()).unwrap_or_default(),
            ))
            .chain([
                ("tun_refused_writes".to_owned(), self.device_refused_writes),
                ("open".to_owned(), count(self.open)),
                ("half_open".to_owned(), count(self.half_open)),
                ("pending".to_owned(), count(self.pending)),
            ])
            .collect()
    }

    /// One JSON object: every field of [`Stats::fields`], and `connections`, an array of
    /// objects with `source`, `destination`, `age_ms`, `bytes_from_client`, `bytes_to_client`
    /// and `state`.
    pub fn to_json(&self) -> String {
        use serde_json::{Map, Value, json};
        let mut object: Map<String, Value> = self
            .fields()
            .into_iter()
            .map(|(name, value)| (name, Value::from(value)))
            .collect();
        let connections = self
            .connections
            .iter()
            .map(|c| {
                json!({
                    "source": c.source.to_string(),
                    "destination": c.destination.to_string(),
                    "age_ms": u64::try_from(c.age.as_millis()).unwrap_or(u64::MAX),
                    "bytes_from_client": c.bytes_from_client,
                    "bytes_to_client": c.bytes_to_client,
                    "state": c.state.name(),
                })
            })
            .collect();
        object.insert("connections".to_owned(), Value::Array(connections));
        Value::Object(object).to_string()
    }
}
