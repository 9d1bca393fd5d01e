//! [`Control`]: what an owner asks of a running stack (a report, a shutdown), and the
//! [`Report`] it answers with. The stack task answers between two events, so a report is one
//! consistent moment of every connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::Snapshot;

/// What the stack task is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// Answer with a report.
    Report(oneshot::Sender<Report>),
    /// Stop taking connections and end every open one within the grace period.
    Shutdown(Duration),
}

/// A handle on a running stack; cheap to clone.
#[derive(Debug, Clone)]
pub struct Control(pub(crate) mpsc::UnboundedSender<Command>);

impl Control {
    /// Every counter, the connection counts and the open connections, at one moment. `None`
    /// once the stack has stopped (its last report is what [`Stack::run`] returned).
    ///
    /// [`Stack::run`]: crate::Stack::run
    pub async fn report(&self) -> Option<Report> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::Report(tx)).ok()?;
        rx.await.ok()
    }

    /// Stops the stack: new SYNs are refused with RST; every open connection gets a FIN at
    /// once (a RST if the application had queued bytes the socket never took, or never
    /// accepted it) and, if it has not closed within `grace`, a RST; every [`Stream`] fails at
    /// once; the request queue ends. [`Stack::run`] returns when no connection is left, at the latest
    /// after `grace`. Idempotent; a shorter grace period than one already running wins.
    ///
    /// [`Stream`]: crate::Stream
    /// [`Stack::run`]: crate::Stack::run
    pub fn shutdown(&self, grace: Duration) {
        // A stack that is gone has nothing left to stop.
        let _ = self.0.send(Command::Shutdown(grace));
    }
}

/// The stack at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Every counter.
    pub counters: Snapshot,
    /// Connections the stack holds, in any state.
    pub open: usize,
    /// Of those, the ones whose handshake has not completed.
    pub half_open: usize,
    /// Of those, consistent handshakes waiting for the application's answer.
    pub pending: usize,
    /// Each connection the stack holds.
    pub connections: Vec<Connection>,
}

/// One connection, as the stack sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Connection {
    /// The client's address and port.
    pub source: SocketAddr,
    /// The address and port the client asked for.
    pub destination: SocketAddr,
    /// Time since its SYN.
    pub age: Duration,
    /// Bytes the client sent, handed to the application's stream.
    pub bytes_from_client: u64,
    /// Bytes the application sent that entered the connection's socket.
    pub bytes_to_client: u64,
    /// Where it is in its life.
    pub state: ConnectionState,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// The client's handshake has not completed.
    Handshake,
    /// A consistent handshake waits for the upstream (the SYN-ACK is withheld).
    Pending,
    /// Both directions open.
    Established,
    /// The client sent FIN; Prism may still send.
    ClientClosed,
    /// Prism sent FIN; the client may still send.
    PrismClosed,
    /// Both sides sent FIN; only the last acknowledgements are left.
    Closing,
}

impl ConnectionState {
    /// A short lower-case name, for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ConnectionState::Handshake => "handshake",
            ConnectionState::Pending => "pending",
            ConnectionState::Established => "established",
            ConnectionState::ClientClosed => "client_closed",
            ConnectionState::PrismClosed => "prism_closed",
            ConnectionState::Closing => "closing",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
