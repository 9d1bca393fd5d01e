//! Whole-machine routing that cannot loop, the way wg-quick does it: a routing table of
//! Prism's own holds the default route through the TUN; policy rules send every packet that
//! does not carry Prism's firewall mark to that table, except what the main table routes more
//! specifically than its default (`suppress_prefixlength 0`) and the `--exclude` prefixes.
//! Every socket Prism opens toward the outside carries the mark, so it never meets the TUN.
//!
//! Every rule and route added here carries Prism's routing protocol number ([`PROTOCOL`]), so
//! the ones a crashed run left behind are recognised and removed at the next start
//! ([`Policy::sweep`]), and nothing of anyone else's is touched. Only one run at a time may
//! own them in a network namespace ([`Claim`]): a second would sweep away the rules of a
//! first that is still serving, and the machine's traffic would leave outside the VPN.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tracing::info;

/// Prism's routing table, and the firewall mark its sockets carry unless `--fwmark` says
/// otherwise ("pr" in ASCII).
pub(crate) const TABLE: u32 = 0x7072;
/// The routing protocol number on every rule and route Prism adds (unassigned in iproute2's
/// rt_protos).
pub(crate) const PROTOCOL: u8 = 0x70;
/// Rule priorities, before the main table's 32766: excluded prefixes, the main table without
/// its default route, then everything unmarked into Prism's table.
const EXCLUDE_PRIORITY: u32 = 32760;
const SUPPRESS_PRIORITY: u32 = 32761;
const DIVERT_PRIORITY: u32 = 32762;

/// The right to sweep and install Prism's policy rules in this network namespace, held while
/// it lives: a listening Unix socket with an abstract name, which each network namespace has
/// its own of and which the kernel releases when the process ends, however it ends (a run
/// killed with SIGKILL leaves rules behind, never the claim).
#[derive(Debug)]
pub(crate) struct Claim {
    _socket: UnixListener,
}

impl Claim {
    /// The claim; an error naming the holder (its pid, from the socket's peer credentials)
    /// while another process has it.
    pub(crate) fn take() -> Result<Claim> {
        let name = UnixAddr::from_abstract_name(format!("prism-policy-{TABLE:x}"))
            .context("cannot name Prism's policy claim")?;
        match UnixListener::bind_addr(&name) {
            Ok(socket) => Ok(Claim { _socket: socket }),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
                let holder = UnixStream::connect_addr(&name)
                    .ok()
                    .and_then(|stream| getsockopt(&stream, PeerCredentials).ok())
                    .map_or_else(String::new, |peer| format!(" (pid {})", peer.pid()));
                bail!(
                    "another prism run{holder} routes the whole machine in this network \
                     namespace; stop it first (two default routes through Prism would take each \
                     other's rules away)"
                )
            }
            Err(error) => Err(error).context("cannot claim Prism's policy rules"),
        }
    }
}

/// Which families the default route covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Families {
    pub(crate) v4: bool,
    pub(crate) v6: bool,
}

impl Families {
    /// Whether the default route covers any family.
    pub(crate) fn any(self) -> bool {
        self.v4 || self.v6
    }
}

/// The rules and routes this run added, removed on exit.
#[derive(Debug)]
pub(crate) struct Policy {
    handle: Handle,
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
}

impl Policy {
    pub(crate) fn new(handle: Handle) -> Policy {
        Policy {
            handle,
            rules: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// Removes the rules and routes of Prism's protocol that an earlier run left (it was
    /// killed); returns how many.
    pub(crate) async fn sweep(&self) -> Result<usize> {
        let mut removed = 0;
        for version in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .context("cannot list the policy rules")?;
            for rule in rules.into_iter().filter(is_prisms_rule) {
                self.handle
                    .rule()
                    .del(rule)
                    .execute()
                    .await
                    .context("cannot remove a policy rule left by an earlier run")?;
                removed += 1;
            }
            let all = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(all)
                .execute()
                .try_collect()
                .await
                .context("cannot list the routes")?;
            for route in routes.into_iter().filter(is_prisms_route) {
                // A route of a device that is gone is gone with it.
                if self.handle.route().del(route).execute().await.is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Sends every unmarked packet of `families` through interface `index` (via `via` on a
    /// TAP), except the prefixes in `exclude` and what the main table routes more specifically
    /// than its default route.
    pub(crate) async fn install(
        &mut self,
        families: Families,
        index: u32,
        via: &[IpAddr],
        mark: u32,
        exclude: &[IpNet],
    ) -> Result<()> {
        for (v6, wanted) in [(false, families.v4), (true, families.v6)] {
            if !wanted {
                continue;
            }
            let gateway = via.iter().find(|g| g.is_ipv6() == v6).copied();
            let route = default_route(v6, index, gateway);
            self.handle
                .route()
                .add(route.clone())
                .execute()
                .await
                .with_context(|| {
                    format!(
                        "cannot add the default route of table {TABLE} ({})",
                        family(v6)
                    )
                })?;
            self.routes.push(route);
            for net in exclude.iter().filter(|n| n.addr().is_ipv6() == v6) {
                self.rule(v6, Rule::Exclude(*net)).await?;
            }
            self.rule(v6, Rule::Suppress).await?;
            self.rule(v6, Rule::Divert(mark)).await?;
        }
        Ok(())
    }

    async fn rule(&mut self, v6: bool, rule: Rule) -> Result<()> {
        let add = self.handle.rule().add();
        let added = match (v6, rule) {
            (false, Rule::Exclude(IpNet::V4(net))) => {
                let request = add
                    .v4()
                    .destination_prefix(net.network(), net.prefix_len())
                    .table_id(MAIN)
                    .priority(EXCLUDE_PRIORITY);
                finish(request, rule).await
            }
            (true, Rule::Exclude(IpNet::V6(net))) => {
                let request = add
                    .v6()
                    .destination_prefix(net.network(), net.prefix_len())
                    .table_id(MAIN)
                    .priority(EXCLUDE_PRIORITY);
                finish(request, rule).await
            }
            (false, Rule::Suppress) => {
                finish(add.v4().table_id(MAIN).priority(SUPPRESS_PRIORITY), rule).await
            }
            (true, Rule::Suppress) => {
                finish(add.v6().table_id(MAIN).priority(SUPPRESS_PRIORITY), rule).await
            }
            (false, Rule::Divert(mark)) => {
                let request = add.v4().fw_mark(mark).table_id(TABLE);
                finish(request.priority(DIVERT_PRIORITY), rule).await
            }
            (true, Rule::Divert(mark)) => {
                let request = add.v6().fw_mark(mark).table_id(TABLE);
                finish(request.priority(DIVERT_PRIORITY), rule).await
            }
            (_, Rule::Exclude(net)) => anyhow::bail!("--exclude {net}: not of this family"),
        };
        let message =
            added.with_context(|| format!("cannot add the policy rule {rule} ({})", family(v6)))?;
        self.rules.push(message);
        Ok(())
    }

    /// Removes what this run added, newest first. Failures are logged: the next start sweeps
    /// what is left.
    pub(crate) async fn remove_all(&mut self) {
        while let Some(rule) = self.rules.pop() {
            if let Err(error) = self.handle.rule().del(rule).execute().await {
                tracing::warn!(%error, "cannot remove a policy rule; the next start will");
            }
        }
        while let Some(route) = self.routes.pop() {
            if let Err(error) = self.handle.route().del(route).execute().await {
                tracing::debug!(%error, "route already gone");
            }
        }
    }
}

/// Marks a rule as Prism's (and, by its kind, suppressing or inverted), adds it, and returns
/// what was added, for its removal.
async fn finish<T>(
    mut request: rtnetlink::RuleAddRequest<T>,
    rule: Rule,
) -> Result<RuleMessage, rtnetlink::Error> {
    let message = request.message_mut();
    // rtnetlink leaves the action unspecified, and the kernel fails every lookup that meets
    // such a rule with EINVAL.
    message.header.action = RuleAction::ToTable;
    message
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL)));
    match rule {
        Rule::Suppress => message.attributes.push(RuleAttribute::SuppressPrefixLen(0)),
        // Every packet *without* the mark.
        Rule::Divert(_) => {
            message.header.flags |= RuleFlags::Invert;
            message.attributes.push(RuleAttribute::FwMask(u32::MAX));
        }
        Rule::Exclude(_) => {}
    }
    let message = message.clone();
    request.execute().await?;
    Ok(message)
}

/// The main routing table's id.
const MAIN: u32 = 254;

#[derive(Debug, Clone, Copy)]
enum Rule {
    Exclude(IpNet),
    Suppress,
    Divert(u32),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Exclude(net) => write!(f, "to {net} lookup main"),
            Rule::Suppress => f.write_str("lookup main suppress_prefixlength 0"),
            Rule::Divert(mark) => write!(f, "not fwmark {mark:#x} lookup {TABLE}"),
        }
    }
}

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

fn default_route(v6: bool, index: u32, via: Option<IpAddr>) -> RouteMessage {
    let protocol = RouteProtocol::Other(PROTOCOL);
    match (v6, via) {
        (false, via) => {
            let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(index)
                .table_id(TABLE)
                .protocol(protocol);
            if let Some(IpAddr::V4(gateway)) = via {
                route = route.gateway(gateway);
            }
            route.build()
        }
        (true, via) => {
            let mut route = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(index)
                .table_id(TABLE)
                .protocol(protocol);
            if let Some(IpAddr::V6(gateway)) = via {
                route = route.gateway(gateway);
            }
            route.build()
        }
    }
}

fn is_prisms_rule(rule: &RuleMessage) -> bool {
    rule.attributes
        .contains(&RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL)))
}

fn is_prisms_route(route: &RouteMessage) -> bool {
    route.header.protocol == RouteProtocol::Other(PROTOCOL)
        || route
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Table(t) if *t == TABLE))
}

/// Logs what the default route does, once at start.
pub(crate) fn describe(families: Families, mark: u32, exclude: &[IpNet]) {
    let routed = match (families.v4, families.v6) {
        (true, true) => "all IPv4 and IPv6",
        (true, false) => "all IPv4",
        (false, true) => "all IPv6",
        (false, false) => return,
    };
    info!(
        routed,
        fwmark = format!("{mark:#x}"),
        table = TABLE,
        exclude = ?exclude,
        "default route through the TUN; Prism's own sockets carry the mark and bypass it"
    );
}
