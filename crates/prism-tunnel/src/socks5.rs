//! [`Socks5`]: upstream connections through a SOCKS5 proxy (RFC 1928 CONNECT, with no
//! authentication or RFC 1929 username/password), on tokio-socks.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;

use crate::pipelined::{self, Pipelined};
use crate::{ConnectError, Connecting, Connector, Direct, Target, Upstream};

/// A parsed `socks5://[user:pass@]HOST:PORT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Socks5Url {
    host: String,
    port: u16,
    auth: Option<(String, String)>,
}

impl fmt::Debug for Socks5Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Socks5Url")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.auth.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Why a SOCKS5 URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad SOCKS5 URL {url:?}: {reason}; expected socks5://[user:pass@]HOST:PORT")]
pub struct Socks5UrlError {
    url: String,
    reason: &'static str,
}

impl FromStr for Socks5Url {
    type Err = Socks5UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| Socks5UrlError {
            url: s.to_owned(),
            reason,
        };
        let url = url::Url::parse(s).map_err(|_| bad("not a URL"))?;
        if url.scheme() != "socks5" {
            return Err(bad("the scheme is not socks5"));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err(bad("no host")),
        };
        let port = url.port().ok_or_else(|| bad("no port"))?;
        if url.path() != "" && url.path() != "/" || url.query().is_some() {
            return Err(bad("unexpected path or query"));
        }
        let auth = if url.username().is_empty() {
            None
        } else {
            let decode = |part: &str| {
                url::form_urlencoded::parse(format!("x={part}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            let password = url
                .password()
                .ok_or_else(|| bad("a user without a password"))?;
            Some((decode(url.username()), decode(password)))
        };
        Ok(Socks5Url { host, port, auth })
    }
}

impl Socks5Url {
    /// The proxy's addresses: the one the URL names (no resolver is asked for an address), or
    /// what its name resolves to now (the system's resolver, every address it gives, in its
    /// order).
    pub async fn addresses(&self) -> io::Result<Vec<SocketAddr>> {
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name has no address",
            ));
        }
        Ok(addresses)
    }

    /// `host:port` of the proxy, for messages.
    pub fn proxy(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Connects through a SOCKS5 proxy.
#[derive(Debug, Clone)]
pub struct Socks5 {
    url: Socks5Url,
    /// How the proxy itself is reached (binding and mark apply to the proxy connection).
    direct: Direct,
    /// Write the whole exchange at once (see [`Socks5::pipelined`]).
    pipeline: bool,
    /// Where the proxy is, when resolved once (see [`Socks5::reached_at`]); empty, its name
    /// is resolved for every connection.
    addresses: Vec<SocketAddr>,
}

impl Socks5 {
    /// A connector through the proxy at `url`, reaching the proxy with `direct`.
    pub fn new(url: Socks5Url, direct: Direct) -> Self {
        Self {
            url,
            direct,
            pipeline: false,
            addresses: Vec::new(),
        }
    }

    /// Reaches the proxy at `addresses` (from [`Socks5Url::addresses`]), in order, instead of
    /// resolving its name for every connection. An engine that routes the machine's DNS into
    /// its own device needs this: the system's resolver would ask through the TUN, and the
    /// question would come back as a connection through this very proxy, whose name it asks.
    pub fn reached_at(mut self, addresses: Vec<SocketAddr>) -> Self {
        self.addresses = addresses;
        self
    }

    /// Pipelines the exchange: the greeting, the credentials and the CONNECT request leave in
    /// one write, one round trip to the proxy instead of two (three with a password); for a
    /// client with the fast handshake the connection is handed over at once, so its first
    /// bytes follow the request and a new connection costs no round trip more than without a
    /// proxy. The proxy must keep what it receives after the request (dante does); off by
    /// default.
    pub fn pipelined(mut self, on: bool) -> Self {
        self.pipeline = on;
        self
    }

    fn proxy_error(&self, reason: impl fmt::Display) -> ConnectError {
        ConnectError::Proxy {
            proxy: self.url.proxy(),
            reason: reason.to_string(),
        }
    }
}

impl Connector for Socks5 {
    /// The whole exchange (reaching the proxy, negotiating, the proxy's own connect) is
    /// bounded by the connect timeout of the [`Direct`] it was built with: a proxy that never
    /// answers must not hold a consistent handshake for ever.
    fn connect<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        Box::pin(async move {
            let exchange = async {
                if self.pipeline {
                    self.pipelined_exchange(target, true).await
                } else {
                    self.exchange(target)
                        .await
                        .map(|s| Box::new(s) as Box<dyn Upstream>)
                }
            };
            match tokio::time::timeout(self.direct.connect_timeout(), exchange).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::TimedOut),
            }
        })
    }

    /// Pipelined, the connection is handed over once the proxy is reached and the exchange
    /// written, before the replies (see [`Socks5::pipelined`]).
    fn connect_early<'a>(&'a self, target: &'a Target) -> Connecting<'a> {
        if !self.pipeline {
            return self.connect(target);
        }
        Box::pin(async move {
            let exchange = self.pipelined_exchange(target, false);
            match tokio::time::timeout(self.direct.connect_timeout(), exchange).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::TimedOut),
            }
        })
    }
}

impl Socks5 {
    /// Reaches the proxy.
    async fn reach(&self) -> Result<TcpStream, ConnectError> {
        let reached = if self.addresses.is_empty() {
            self.direct
                .connect_host(&self.url.host, self.url.port)
                .await
        } else {
            self.direct
                .connect_any(self.addresses.iter().copied())
                .await
        };
        reached.map_err(|e| match e {
            // A proxy routed into Prism's own TUN: the loop is the news, not the proxy.
            ConnectError::Loop { .. } => e,
            other => self.proxy_error(format_args!("cannot reach the proxy: {other}")),
        })
    }

    /// The exchange in one write; the replies read before returning when `wait`.
    async fn pipelined_exchange(
        &self,
        target: &Target,
        wait: bool,
    ) -> Result<Box<dyn Upstream>, ConnectError> {
        use tokio::io::AsyncWriteExt;
        let auth = self
            .url
            .auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()));
        let hello = pipelined::hello(target, auth).map_err(|e| self.proxy_error(e))?;
        let started = tokio::time::Instant::now();
        let mut proxy = self.reach().await?;
        proxy.set_nodelay(true)?;
        proxy.write_all(&hello).await?;
        // The replies are due within what is left of the connect timeout; reaching the proxy
        // took some of it.
        let left = self
            .direct
            .connect_timeout()
            .saturating_sub(started.elapsed());
        let mut pipelined = Pipelined::new(proxy, auth.is_some(), left, self.url.proxy());
        if !wait {
            return Ok(Box::new(pipelined));
        }
        std::future::poll_fn(|cx| pipelined.poll_replies(cx)).await?;
        Ok(Box::new(pipelined.into_stream()))
    }

    async fn exchange(&self, target: &Target) -> Result<TcpStream, ConnectError> {
        let proxy = self.reach().await?;
        let result = match (target, &self.url.auth) {
            (Target::Ip(addr), None) => Socks5Stream::connect_with_socket(proxy, *addr).await,
            (Target::Ip(addr), Some((user, pass))) => {
                Socks5Stream::connect_with_password_and_socket(proxy, *addr, user, pass).await
            }
            (Target::Domain(host, port), None) => {
                Socks5Stream::connect_with_socket(proxy, (host.as_str(), *port)).await
            }
            (Target::Domain(host, port), Some((user, pass))) => {
                Socks5Stream::connect_with_password_and_socket(
                    proxy,
                    (host.as_str(), *port),
                    user,
                    pass,
                )
                .await
            }
        };
        match result {
            Ok(stream) => {
                let stream = stream.into_inner();
                stream.set_nodelay(true)?;
                Ok(stream)
            }
            Err(error) => Err(self.map_error(error)),
        }
    }

    /// SOCKS5 reply codes as the client should hear them.
    fn map_error(&self, error: tokio_socks::Error) -> ConnectError {
        use tokio_socks::Error as E;
        match error {
            E::ConnectionRefused => ConnectError::Refused,
            E::HostUnreachable => ConnectError::HostUnreachable,
            E::NetworkUnreachable => ConnectError::NetworkUnreachable,
            E::TtlExpired => ConnectError::TtlExpired,
            E::ConnectionNotAllowedByRuleset => ConnectError::NotAllowed,
            other => self.proxy_error(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A scripted SOCKS5 server on loopback: accepts no-auth, reads one CONNECT, then answers
    /// with `reply` (after `delay`), or never answers when `reply` is `None`.
    async fn scripted(reply: Option<u8>, delay: Duration) -> Socks5 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 2];
            s.read_exact(&mut greeting).await.unwrap();
            let mut methods = vec![0u8; usize::from(greeting[1])];
            s.read_exact(&mut methods).await.unwrap();
            s.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10]; // VER CMD RSV ATYP=1 addr(4) port(2)
            s.read_exact(&mut request).await.unwrap();
            tokio::time::sleep(delay).await;
            match reply {
                Some(code) => {
                    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0])
                        .await
                        .unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                }
                None => tokio::time::sleep(Duration::from_secs(3600)).await,
            }
        });
        let url = format!("socks5://{addr}").parse().unwrap();
        Socks5::new(url, Direct::new().timeout(Duration::from_millis(300)))
    }

    fn target() -> Target {
        Target::Ip("192.0.2.7:443".parse().unwrap())
    }

    #[tokio::test]
    async fn reply_codes_map_to_precise_errors() {
        type Expect = fn(&ConnectError) -> bool;
        let cases: [(u8, Expect); 6] = [
            (1, |e| matches!(e, ConnectError::Proxy { .. })),
            (2, |e| matches!(e, ConnectError::NotAllowed)),
            (3, |e| matches!(e, ConnectError::NetworkUnreachable)),
            (4, |e| matches!(e, ConnectError::HostUnreachable)),
            (5, |e| matches!(e, ConnectError::Refused)),
            (6, |e| matches!(e, ConnectError::TtlExpired)),
        ];
        for (code, expected) in cases {
            let socks = scripted(Some(code), Duration::ZERO).await;
            let error = socks.connect(&target()).await.err().unwrap();
            assert!(expected(&error), "reply {code}: {error:?}");
        }
        let socks = scripted(Some(0), Duration::ZERO).await;
        socks.connect(&target()).await.unwrap();
    }

    #[tokio::test]
    async fn a_proxy_that_never_answers_times_out() {
        let socks = scripted(None, Duration::ZERO).await;
        let error = socks.connect(&target()).await.err().unwrap();
        assert!(matches!(error, ConnectError::TimedOut), "{error:?}");
    }

    /// A SOCKS5 server on loopback that takes what a pipelining client sends in whatever
    /// pieces it arrives: the greeting, the request, and the data after it, which it echoes
    /// once it has answered the request with `reply` (after `delay`). What it read in its first
    /// read goes to `first`.
    async fn echoing(
        reply: u8,
        delay: Duration,
        first: tokio::sync::oneshot::Sender<Vec<u8>>,
    ) -> Socks5 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; 3 + 10];
            s.read_exact(&mut got).await.unwrap();
            let _ = first.send(got);
            tokio::time::sleep(delay).await;
            s.write_all(&[5, 0, 5, reply, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let url = format!("socks5://{addr}").parse().unwrap();
        Socks5::new(url, Direct::new().timeout(Duration::from_millis(300))).pipelined(true)
    }

    /// `message` written to `up` comes back whole.
    async fn echoes(up: &mut Box<dyn Upstream>, message: &[u8]) {
        up.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        up.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, message);
    }

    #[tokio::test]
    async fn pipelined_the_exchange_leaves_in_one_write_and_early_connections_go_at_once() {
        // Waiting: the greeting and the request arrive together, and the replies are read
        // before the connection is handed over.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let socks = echoing(0, Duration::ZERO, tx).await;
        let mut up = socks.connect(&target()).await.unwrap();
        assert_eq!(
            rx.await.unwrap(),
            [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 7, 1, 187]
        );
        echoes(&mut up, b"ping").await;

        // Early: handed over before the proxy answers; the data written at once comes back
        // behind the replies, which are taken off.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let socks = echoing(0, Duration::from_millis(100), tx).await;
        let started = std::time::Instant::now();
        let mut up = socks.connect_early(&target()).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "waited for the replies"
        );
        echoes(&mut up, b"early").await;

        // Early, and the replies do not come within the connect timeout: the read fails with
        // the timeout, the connect error inside.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let socks = echoing(0, Duration::from_secs(5), tx).await;
        let mut up = socks.connect_early(&target()).await.unwrap();
        let error = up.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        let inner = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<ConnectError>());
        assert!(matches!(inner, Some(ConnectError::TimedOut)), "{error:?}");

        // Early and refused: the first read fails with the refusal.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let socks = echoing(5, Duration::ZERO, tx).await;
        let mut up = socks.connect_early(&target()).await.unwrap();
        let error = up.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{error}"
        );

        // Waiting and refused: the connect fails as without pipelining.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let socks = echoing(5, Duration::ZERO, tx).await;
        let error = socks.connect(&target()).await.err().unwrap();
        assert!(matches!(error, ConnectError::Refused), "{error:?}");
    }

    #[tokio::test]
    async fn an_unreachable_proxy_is_a_proxy_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let socks = Socks5::new(format!("socks5://{addr}").parse().unwrap(), Direct::new());
        let error = socks.connect(&target()).await.err().unwrap();
        assert!(matches!(error, ConnectError::Proxy { .. }), "{error:?}");
        assert!(
            error.to_string().contains("cannot reach the proxy"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_proxy_resolved_once_is_reached_without_its_name() {
        let proxy = scripted(Some(0), Duration::ZERO).await;
        let at = proxy.url.addresses().await.unwrap();
        assert_eq!(at.len(), 1, "an address in the URL is the one address");
        // A name that never resolves (RFC 6761), reached at the addresses found before: it
        // is not asked for again.
        let named: Socks5Url = format!("socks5://proxy.invalid:{}", at[0].port())
            .parse()
            .unwrap();
        let socks = Socks5::new(named, Direct::new().timeout(Duration::from_millis(300)))
            .reached_at(at.clone());
        socks.connect(&target()).await.unwrap();

        let local: Socks5Url = format!("socks5://localhost:{}", at[0].port())
            .parse()
            .unwrap();
        let resolved = local.addresses().await.unwrap();
        assert!(resolved.contains(&at[0]), "{resolved:?} lacks {}", at[0]);
    }

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let url: Socks5Url = "socks5://127.0.0.1:1080".parse().unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.auth.clone()),
            ("127.0.0.1", 1080, None)
        );

        let url: Socks5Url = "socks5://al%40ce:p%3Ass@[fd00::1]:9050".parse().unwrap();
        assert_eq!(url.host, "fd00::1");
        assert_eq!(url.proxy(), "[fd00::1]:9050");
        assert_eq!(url.auth, Some(("al@ce".into(), "p:ss".into())));
        assert!(
            !format!("{url:?}").contains("p:ss"),
            "Debug leaks the password"
        );

        let url: Socks5Url = "socks5://proxy.example:1080/".parse().unwrap();
        assert_eq!(url.host, "proxy.example");
    }

    #[test]
    fn bad_urls_say_why() {
        for bad in [
            "127.0.0.1:1080",
            "http://127.0.0.1:1080",
            "socks5://127.0.0.1",
            "socks5://user@127.0.0.1:1080",
            "socks5://127.0.0.1:1080/path",
        ] {
            let error = bad.parse::<Socks5Url>().unwrap_err();
            assert!(error.to_string().contains("expected socks5://"), "{error}");
        }
    }
}
