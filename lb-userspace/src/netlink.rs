//! The kernel's routing netlink (`rtnetlink`): one connection per user, run on the tokio
//! runtime, and the few lookups every user needs.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{Error, Handle, RouteMessageBuilder, packet_route::route::RouteMessage};

pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const EEXIST: i32 = 17;
pub const ENODEV: i32 = 19;

/// A connection whose task runs on the current tokio runtime.
///
/// # Errors
/// When the netlink socket cannot be opened.
pub fn connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening a routing netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The positive errno of a kernel refusal.
#[must_use]
pub fn errno(e: &Error) -> Option<i32> {
    match e {
        Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// The index of interface `name`, in the calling thread's network namespace.
///
/// # Errors
/// When there is no such interface or netlink fails.
pub async fn ifindex(handle: &Handle, name: &str) -> anyhow::Result<u32> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => anyhow::bail!("no interface {name}"),
        Err(e) if errno(&e) == Some(ENODEV) => anyhow::bail!("no interface {name}"),
        Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
    }
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
