//! The kernel's routing netlink (`rtnetlink`), the one way this crate asks the kernel about
//! interfaces, their addresses and XDP attachment, routes, rules and neighbours: a connection
//! per user, run on the tokio runtime, [`blocking`] for callers outside async code, and the
//! lookups every user needs. Errors are the kernel's errno, as `libc` names them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;
use rtnetlink::{
    Error, Handle, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage, LinkXdp},
        route::RouteMessage,
    },
};

/// A connection whose task runs on the current tokio runtime.
///
/// # Errors
/// When the netlink socket cannot be opened.
pub fn connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening a routing netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs `f` on a connection of its own and waits for it: for synchronous callers, inside a
/// tokio runtime or not. It runs on a thread of its own (a runtime cannot wait inside
/// another), which shares the calling thread's network namespace.
///
/// # Errors
/// When the socket cannot be opened, or as `f`.
pub fn blocking<T, F, Fut>(f: F) -> anyhow::Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = anyhow::Result<T>>,
{
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().context("starting a runtime for netlink")?;
            runtime.block_on(async { f(connect()?).await })
        });
        run.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The positive errno of a kernel refusal.
#[must_use]
pub fn errno(e: &Error) -> Option<i32> {
    match e {
        Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A kernel refusal as the `std::io::Error` of its errno (so that callers can tell `EBUSY`),
/// with `what` as context; anything else as it is.
fn refusal(e: Error, what: String) -> anyhow::Error {
    match errno(&e) {
        Some(code) => anyhow::Error::new(std::io::Error::from_raw_os_error(code)).context(what),
        None => anyhow::Error::new(e).context(what),
    }
}

/// Interface `name` as the kernel describes it (flags, type, MAC, XDP attachment), in the
/// connection's network namespace.
///
/// # Errors
/// When there is no such interface or netlink fails.
pub async fn link(handle: &Handle, name: &str) -> anyhow::Result<LinkMessage> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link),
        Ok(None) => bail!("no interface {name}"),
        Err(e) if errno(&e) == Some(libc::ENODEV) => bail!("no interface {name}"),
        Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
    }
}

/// The index of interface `name`, in the connection's network namespace.
///
/// # Errors
/// When there is no such interface or netlink fails.
pub async fn ifindex(handle: &Handle, name: &str) -> anyhow::Result<u32> {
    Ok(link(handle, name).await?.header.index)
}

/// The MTU of interface `name` (from netlink: sysfs shows the interfaces of the network
/// namespace it was mounted in, which need not be this process's).
///
/// # Errors
/// When there is no such interface or netlink fails.
pub async fn mtu(handle: &Handle, name: &str) -> anyhow::Result<u32> {
    link(handle, name)
        .await?
        .attributes
        .iter()
        .find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
        .with_context(|| format!("{name} reports no MTU"))
}

/// The IPv4 and IPv6 addresses of interface `name` (each address's local one, as
/// `getifaddrs` gives them).
///
/// # Errors
/// When there is no such interface or netlink fails.
pub async fn addresses(handle: &Handle, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let index = ifindex(handle, name).await?;
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("listing the addresses of {name}"))?;
    Ok(messages
        .iter()
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None });
            local.or_else(|| m.attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None }))
        })
        .collect())
}

/// Sets the XDP attributes `xdp` on interface `name` (attaching or detaching a program).
///
/// # Errors
/// When there is no such interface or the kernel refuses, as the `std::io::Error` of its errno
/// with `what` as context.
pub async fn set_xdp(handle: &Handle, name: &str, xdp: Vec<LinkXdp>, what: String) -> anyhow::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex(handle, name).await?;
    msg.attributes.push(LinkAttribute::Xdp(xdp));
    handle.link().set(msg).execute().await.map_err(|e| refusal(e, what))
}

/// A route to `addr` alone (/32 or /128), through `gateway` if one is given, for the caller to
/// finish (kind, protocol, table, interface) and [`replace_route`].
///
/// # Errors
/// When the kernel's message cannot hold it (a gateway of the other family).
pub fn host_route(addr: IpAddr, gateway: Option<IpAddr>) -> anyhow::Result<RouteMessageBuilder<IpAddr>> {
    let len = if addr.is_ipv6() { 128 } else { 32 };
    let route = RouteMessageBuilder::<IpAddr>::new().destination_prefix(addr, len);
    let route = match gateway {
        Some(g) => route.and_then(|r| r.gateway(g)),
        None => route,
    };
    route.map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Adds `route`, or replaces the route to the same destination in its table.
///
/// # Errors
/// When netlink fails.
pub async fn replace_route(handle: &Handle, route: RouteMessage) -> Result<(), Error> {
    handle.route().add(route).replace().execute().await
}

/// Every IPv4 and IPv6 route, in every table.
///
/// # Errors
/// When netlink fails.
pub async fn all_routes(handle: &Handle) -> anyhow::Result<Vec<RouteMessage>> {
    let mut routes: Vec<RouteMessage> =
        handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().try_collect().await.context("listing routes")?;
    routes.extend(
        handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .context("listing IPv6 routes")?,
    );
    Ok(routes)
}

/// Where the kernel would send a packet to `addr` (`ip route get`): the outgoing interface's
/// index and the gateway, if the route has one (none: `addr` is on the link).
///
/// # Errors
/// When there is no route or netlink fails.
pub async fn route_get(handle: &Handle, addr: IpAddr) -> anyhow::Result<(u32, Option<IpAddr>)> {
    use futures::StreamExt as _;
    use rtnetlink::{
        packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
        packet_route::{
            AddressFamily, RouteNetlinkMessage,
            route::{RouteAddress, RouteAttribute},
        },
    };
    let mut msg = RouteMessage::default();
    let (family, len, dst) = match addr {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.attributes.push(RouteAttribute::Destination(dst));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut answers = handle.clone().request(req).map_err(|e| anyhow::anyhow!("asking for the route to {addr}: {e}"))?;
    while let Some(m) = answers.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                let mut oif = None;
                let mut gateway = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
                        _ => {}
                    }
                }
                let oif = oif.with_context(|| format!("the route to {addr} names no interface"))?;
                return Ok((oif, gateway));
            }
            NetlinkPayload::Error(e) => {
                let errno = e.code.map_or(0, |c| -c.get());
                bail!("no route to {addr}: {}", std::io::Error::from_raw_os_error(errno));
            }
            _ => {}
        }
    }
    bail!("no answer for the route to {addr}")
}
