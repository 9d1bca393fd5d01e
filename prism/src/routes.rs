//! Routes through the TUN, added over netlink (rtnetlink) and removed again on the way out.

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::{Handle, RouteMessageBuilder};

/// Routes this process added, to be removed on exit.
#[derive(Debug)]
pub(crate) struct Routes {
    handle: Handle,
    added: Vec<(IpNet, RouteMessage)>,
}

fn message(net: IpNet, index: u32, via: Option<IpAddr>) -> RouteMessage {
    match (net.network(), via) {
        (IpAddr::V4(addr), via) => {
            let mut route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(addr, net.prefix_len())
                .output_interface(index);
            if let Some(IpAddr::V4(gateway)) = via {
                route = route.gateway(gateway);
            }
            route.build()
        }
        (IpAddr::V6(addr), via) => {
            let mut route = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(addr, net.prefix_len())
                .output_interface(index);
            if let Some(IpAddr::V6(gateway)) = via {
                route = route.gateway(gateway);
            }
            route.build()
        }
    }
}

impl Routes {
    /// Opens a netlink connection.
    pub(crate) fn new() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            added: Vec::new(),
        })
    }

    /// The netlink handle, for the policy rules.
    pub(crate) fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Routes `net` through interface `index` (named `name` in messages), via the next hop
    /// `via` if given (TAP mode).
    pub(crate) async fn add(
        &mut self,
        net: IpNet,
        index: u32,
        name: &str,
        via: Option<IpAddr>,
    ) -> Result<()> {
        let route = message(net.trunc(), index, via);
        let hop = via.map(|v| format!(" via {v}")).unwrap_or_default();
        self.handle
            .route()
            .add(route.clone())
            .execute()
            .await
            .with_context(|| format!("cannot add route {net}{hop} dev {name}"))?;
        self.added.push((net, route));
        Ok(())
    }

    /// Removes every route added, newest first. Failures are logged: the interface going away
    /// removes its routes anyway.
    pub(crate) async fn remove_all(&mut self) {
        while let Some((net, route)) = self.added.pop() {
            if let Err(error) = self.handle.route().del(route).execute().await {
                tracing::debug!(%net, %error, "route already gone");
            }
        }
    }
}
