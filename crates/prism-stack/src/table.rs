//! [`Table`]: the connection table and the decision each TCP segment leads to. Pure: no
//! sockets, tasks or clocks; the stack asks it once per segment.

use std::collections::HashMap;

use prism_trap::{FourTuple, Segment};

/// What the stack should do with a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision<Id> {
    /// It belongs to this connection (a retransmitted SYN included: nothing new is created).
    Existing(Id),
    /// A SYN to a new tuple: open a connection for exactly this tuple (or, at a cap, answer it
    /// with a SYN cookie).
    Open,
    /// No connection and not a SYN: the ACK of a SYN cookie, or the stack answers as TCP does
    /// for a closed port (RST).
    NoConnection,
}

#[derive(Debug)]
struct Entry<Id> {
    id: Id,
    half_open: bool,
}

/// Maps 4-tuples to connection ids and counts half-open connections.
#[derive(Debug, Default)]
pub(crate) struct Table<Id> {
    entries: HashMap<FourTuple, Entry<Id>>,
    half_open: usize,
}

impl<Id: Copy> Table<Id> {
    /// What `segment` means.
    pub(crate) fn decide(&self, segment: &Segment) -> Decision<Id> {
        match self.entries.get(&segment.tuple) {
            Some(entry) => Decision::Existing(entry.id),
            None if !segment.is_initial_syn() => Decision::NoConnection,
            None => Decision::Open,
        }
    }

    /// Records a new, half-open connection for `tuple`.
    pub(crate) fn insert(&mut self, tuple: FourTuple, id: Id) {
        let entry = Entry {
            id,
            half_open: true,
        };
        if let Some(old) = self.entries.insert(tuple, entry) {
            self.forget(&old);
        }
        self.half_open += 1;
    }

    /// The handshake of `tuple` completed (or the connection left the handshake in any other
    /// way): it no longer counts as half-open.
    pub(crate) fn established(&mut self, tuple: &FourTuple) {
        if let Some(entry) = self.entries.get_mut(tuple) {
            if entry.half_open {
                entry.half_open = false;
                self.half_open -= 1;
            }
        }
    }

    /// Forgets `tuple`, returning its id.
    pub(crate) fn remove(&mut self, tuple: &FourTuple) -> Option<Id> {
        let entry = self.entries.remove(tuple)?;
        self.forget(&entry);
        Some(entry.id)
    }

    fn forget(&mut self, entry: &Entry<Id>) {
        if entry.half_open {
            self.half_open -= 1;
        }
    }

    /// Connections in the table.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Connections whose handshake has not completed.
    pub(crate) fn half_open(&self) -> usize {
        self.half_open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(port: u16, syn: bool, ack: bool) -> Segment {
        Segment {
            tuple: FourTuple {
                source: format!("10.0.0.2:{port}").parse().unwrap(),
                destination: "192.0.2.1:80".parse().unwrap(),
            },
            syn,
            ack,
            rst: false,
            fin: false,
            data: false,
        }
    }

    #[test]
    fn a_syn_to_a_new_tuple_opens_and_its_retransmit_does_not() {
        let mut table = Table::default();
        let syn = segment(1000, true, false);
        assert_eq!(table.decide(&syn), Decision::Open);
        table.insert(syn.tuple, 7u32);
        assert_eq!(table.decide(&syn), Decision::Existing(7));
        assert_eq!(table.len(), 1);
        assert_eq!(table.half_open(), 1);
    }

    #[test]
    fn segments_without_a_connection_are_not_opened() {
        let table: Table<u32> = Table::default();
        assert_eq!(
            table.decide(&segment(1000, false, true)),
            Decision::NoConnection
        );
        assert_eq!(
            table.decide(&segment(1000, true, true)),
            Decision::NoConnection
        );
    }

    #[test]
    fn half_open_connections_are_counted_until_their_handshakes_complete() {
        let mut table = Table::default();
        table.insert(segment(1, true, false).tuple, 1u32);
        table.insert(segment(2, true, false).tuple, 2);
        assert_eq!(table.half_open(), 2);

        table.established(&segment(1, true, false).tuple);
        table.established(&segment(1, true, false).tuple); // twice counts once
        assert_eq!(table.half_open(), 1);

        assert_eq!(table.remove(&segment(2, true, false).tuple), Some(2));
        assert_eq!(table.half_open(), 0);
    }
}
