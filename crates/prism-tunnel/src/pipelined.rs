//! The SOCKS5 exchange pipelined: the greeting, the credentials and the CONNECT request leave
//! in one write, and the replies are read after, in one round trip instead of two or three.
//! For a client that already has its SYN-ACK (the fast handshake), [`Pipelined`] even hands
//! the connection over before the replies arrive, so the client's first bytes follow the
//! request at once and the proxy's replies come back with the target's first answer: a new
//! connection costs the same round trips through the proxy as without one. tokio-socks waits
//! for each reply before the next message, so these few messages are written here.
//!
//! A proxy that reads the request and the data after it from one buffer must keep that data:
//! dante does; a proxy that does not breaks, which is why pipelining is an option (as in
//! hev-socks5-tunnel).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Duration, Sleep};

use crate::{ConnectError, Target, Upstream};

/// Methods of the greeting: none, and username/password (RFC 1929).
const NO_AUTH: u8 = 0;
const PASSWORD: u8 = 2;

/// The greeting, the credentials if any, and the CONNECT request for `target`, as one message.
pub(crate) fn hello(target: &Target, auth: Option<(&str, &str)>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    match auth {
        None => out.extend_from_slice(&[5, 1, NO_AUTH]),
        Some((user, pass)) => {
            // Only username/password offered: the proxy must take it or refuse, so the
            // credentials that follow are never read as a request.
            out.extend_from_slice(&[5, 1, PASSWORD, 1]);
            for part in [user, pass] {
                let len = u8::try_from(part.len())
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("a user and password of 1 to 255 bytes each")?;
                out.push(len);
                out.extend_from_slice(part.as_bytes());
            }
        }
    }
    out.extend_from_slice(&[5, 1, 0]);
    match target {
        Target::Ip(addr) => {
            match addr.ip() {
                std::net::IpAddr::V4(ip) => {
                    out.push(1);
                    out.extend_from_slice(&ip.octets());
                }
                std::net::IpAddr::V6(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&addr.port().to_be_bytes());
        }
        Target::Domain(host, port) => {
            let len = u8::try_from(host.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or("a host name of 1 to 255 bytes")?;
            out.extend_from_slice(&[3, len]);
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
    Ok(out)
}

/// How far the proxy's replies are read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Replies {
    /// At least this many bytes in all are needed.
    Need(usize),
    /// Complete and successful: the connection carries the target's bytes from here.
    Done,
}

/// Reads the replies to [`hello`] received so far: the chosen method, the credentials' status
/// (with `auth`), and the CONNECT reply with its bound address. An error is the refusal in
/// them (the reply code as the client should hear it), or a reply that is not SOCKS5.
pub(crate) fn replies(b: &[u8], auth: bool) -> Result<Replies, ReplyError> {
    let need = |n: usize| Ok(Replies::Need(n));
    let (Some(&version), Some(&method)) = (b.first(), b.get(1)) else {
        return need(2);
    };
    if version != 5 {
        return Err(proxy("not a SOCKS5 reply"));
    }
    let mut at = 2;
    match (method, auth) {
        (NO_AUTH, false) => {}
        (PASSWORD, true) => {
            let (Some(&v), Some(&status)) = (b.get(2), b.get(3)) else {
                return need(4);
            };
            if v != 1 || status != 0 {
                return Err(proxy("authentication failed"));
            }
            at = 4;
        }
        (0xff, _) => return Err(proxy("no acceptable authentication method")),
        _ => return Err(proxy("chose a method that was not offered")),
    }
    let Some(&[version, code, _, kind]) = b.get(at..at + 4) else {
        return need(at + 4);
    };
    if version != 5 {
        return Err(proxy("not a SOCKS5 reply"));
    }
    match code {
        0 => {}
        2 => return Err(ReplyError::Connect(ConnectError::NotAllowed)),
        3 => return Err(ReplyError::Connect(ConnectError::NetworkUnreachable)),
        4 => return Err(ReplyError::Connect(ConnectError::HostUnreachable)),
        5 => return Err(ReplyError::Connect(ConnectError::Refused)),
        6 => return Err(ReplyError::Connect(ConnectError::TtlExpired)),
        _ => return Err(proxy("the CONNECT failed")),
    }
    let address = match kind {
        1 => 4,
        4 => 16,
        3 => match b.get(at + 4) {
            Some(&len) => 1 + usize::from(len),
            None => return need(at + 5),
        },
        _ => return Err(proxy("an unknown address type in the reply")),
    };
    let total = at + 4 + address + 2;
    if b.len() < total {
        return need(total);
    }
    Ok(Replies::Done)
}

/// What is wrong with the replies.
#[derive(Debug)]
pub(crate) enum ReplyError {
    /// The proxy refused the CONNECT with a code the client hears as such.
    Connect(ConnectError),
    /// The proxy failed otherwise.
    Proxy(String),
}

impl ReplyError {
    /// As a connect error, naming `proxy` when it is the proxy's fault.
    pub(crate) fn into_connect_error(self, proxy: &str) -> ConnectError {
        match self {
            ReplyError::Connect(error) => error,
            ReplyError::Proxy(reason) => ConnectError::Proxy {
                proxy: proxy.to_owned(),
                reason,
            },
        }
    }
}

fn proxy(reason: &str) -> ReplyError {
    ReplyError::Proxy(reason.to_owned())
}

/// A connection to the proxy whose [`hello`] is sent and whose replies are still to come:
/// writes go straight through (the client's first bytes follow the request), and the first
/// read takes the replies off first. A refusal in them, or no replies within the connect
/// timeout, fails that read with the [`ConnectError`] inside the `io::Error`, which resets the
/// client and is counted as the connect's outcome (`serve`).
#[derive(Debug)]
pub(crate) struct Pipelined {
    stream: TcpStream,
    /// What waits for the replies; gone once they were complete.
    pending: Option<Box<Pending>>,
}

#[derive(Debug)]
struct Pending {
    got: Vec<u8>,
    auth: bool,
    deadline: Pin<Box<Sleep>>,
    /// The proxy's address, for errors.
    proxy: String,
}

impl Pipelined {
    /// `stream` after [`hello`] was written; the replies are due within `timeout`.
    pub(crate) fn new(stream: TcpStream, auth: bool, timeout: Duration, proxy: String) -> Self {
        Self {
            stream,
            pending: Some(Box::new(Pending {
                got: Vec::with_capacity(32),
                auth,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                proxy,
            })),
        }
    }

    /// Reads the replies until they are complete, and no further: what follows is the
    /// target's.
    pub(crate) fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        while let Some(p) = &mut self.pending {
            let total = match replies(&p.got, p.auth) {
                Ok(Replies::Done) => {
                    self.pending = None;
                    break;
                }
                Ok(Replies::Need(total)) => total,
                Err(error) => return Poll::Ready(Err(error.into_connect_error(&p.proxy))),
            };
            if p.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(ConnectError::TimedOut));
            }
            let mut chunk = [0u8; 262];
            let want = chunk.get_mut(..total - p.got.len()).unwrap_or_default();
            let mut buf = ReadBuf::new(want);
            let failed = match ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {
                    p.got.extend_from_slice(buf.filled());
                    continue;
                }
                Ok(()) => proxy("closed the connection before its reply"),
                Err(error) => ReplyError::Proxy(format!("failed while replying: {error}")),
            };
            return Poll::Ready(Err(failed.into_connect_error(&p.proxy)));
        }
        Poll::Ready(Ok(()))
    }

    /// The connection to the proxy, once the replies are read.
    pub(crate) fn into_stream(self) -> TcpStream {
        self.stream
    }
}

impl AsyncRead for Pipelined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(error) = ready!(this.poll_replies(cx)) {
            let kind = match error {
                ConnectError::Refused => io::ErrorKind::ConnectionRefused,
                ConnectError::TimedOut => io::ErrorKind::TimedOut,
                _ => io::ErrorKind::Other,
            };
            return Poll::Ready(Err(io::Error::new(kind, error)));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pipelined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Upstream for Pipelined {
    fn reset(self: Box<Self>) {
        Box::new(self.stream).reset();
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // While the replies are due, the read itself waits for them or for the deadline.
        if self.pending.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.stream.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
    use super::*;

    #[test]
    fn the_hello_is_the_greeting_the_credentials_and_the_request() {
        let v4 = Target::Ip("192.0.2.7:443".parse().unwrap());
        assert_eq!(
            hello(&v4, None).unwrap(),
            [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 7, 1, 187]
        );
        let named = Target::Domain("ab".into(), 80);
        assert_eq!(
            hello(&named, Some(("u", "pw"))).unwrap(),
            [
                5, 1, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 3, 2, b'a', b'b', 0, 80
            ]
        );
        let v6 = hello(&Target::Ip("[2001:db8::1]:22".parse().unwrap()), None).unwrap();
        assert_eq!((v6[6], v6.len()), (4, 3 + 4 + 16 + 2));
        assert!(hello(&v4, Some(("", "pw"))).is_err());
        assert!(hello(&Target::Domain("x".repeat(256), 80), None).is_err());
    }

    #[test]
    fn replies_are_read_exactly_and_refusals_keep_their_meaning() {
        let ok = [5, 0, 5, 0, 0, 1, 10, 0, 0, 1, 0, 80];
        for n in 0..ok.len() {
            let asked = replies(&ok[..n], false);
            assert!(
                matches!(asked, Ok(Replies::Need(total)) if total > n && total <= ok.len()),
                "{n} bytes: {asked:?}"
            );
        }
        assert_eq!(replies(&ok, false).unwrap(), Replies::Done);
        let authed = [5, 2, 1, 0, 5, 0, 0, 3, 1, b'h', 0, 80];
        assert_eq!(replies(&authed, true).unwrap(), Replies::Done);
        assert_eq!(replies(&authed[..9], true).unwrap(), Replies::Need(12));
        let refused = [5, 0, 5, 5, 0, 1];
        assert!(matches!(
            replies(&refused, false),
            Err(ReplyError::Connect(ConnectError::Refused))
        ));
        assert!(matches!(
            replies(&[5, 2, 1, 1], true),
            Err(ReplyError::Proxy(_))
        ));
        assert!(matches!(
            replies(&[5, 0xff], false),
            Err(ReplyError::Proxy(_))
        ));
        assert!(matches!(replies(&[5, 2], false), Err(ReplyError::Proxy(_))));
        assert!(matches!(replies(&[4, 0], false), Err(ReplyError::Proxy(_))));
    }
}
