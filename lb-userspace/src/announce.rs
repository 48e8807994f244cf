//! VIP announcements for routers: one `blackhole VIP/32` route per announced VIP in a kernel
//! routing table of its own (`[announce] table`), marked with the routing protocol number
//! [`RTPROT_DSRLB`]. A BGP speaker on the node (BIRD's `kernel` protocol with `learn`, FRR's
//! `ip import-table`, GoBGP with zebra) exports that table to the routers: dsrlb decides what is
//! announced, the speaker announces it, and nothing in between is ours to write.
//!
//! The routes live in the kernel, not in this process: a controller that crashes or is killed
//! leaves them (forwarding continues from the pins, so the node should stay in the routers'
//! ECMP group), and a node that dies loses them with its BGP session (hold time, or BFD). The
//! table is never consulted for forwarding on the node: no rule points at it.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Context as _;
use rtnetlink::{
    Handle,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};
use tokio::sync::watch;

use crate::netlink;

/// The routing protocol number of dsrlb's routes (`ip route ... proto 213`): unassigned in
/// iproute2's `rt_protos`. Every IPv4 route with it, in any table, is dsrlb's.
pub const RTPROT_DSRLB: u8 = 213;

/// What should be announced: the table and the VIPs in it (none: withdraw everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub table: u32,
    pub vips: BTreeSet<IpAddr>,
}

/// What the kernel held after the last reconcile, and its error if it failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub vips: BTreeSet<IpAddr>,
    pub error: Option<String>,
}

/// The reconciling task's ends.
pub struct Announcer {
    wanted: watch::Sender<Wanted>,
    held: watch::Receiver<Held>,
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the reconciler on the current tokio runtime. Nothing changes in the kernel until
    /// the first [`Self::set`]: routes a previous controller left stay announced meanwhile.
    ///
    /// # Errors
    /// When netlink cannot be opened.
    pub fn start() -> anyhow::Result<Self> {
        let handle = netlink::connect()?;
        let (wanted, rx) = watch::channel(Wanted::default());
        let (held_tx, held) = watch::channel(Held::default());
        let task = tokio::spawn(reconciler(handle.clone(), rx, held_tx));
        Ok(Self { wanted, held, handle, task })
    }

    /// What should be announced; the reconciler makes it so (and puts back what someone
    /// removed, at the next call).
    pub fn set(&self, wanted: Wanted) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    /// Asks for the same again: repairs routes removed behind our back.
    pub fn repair(&self) {
        self.wanted.send_modify(|_| {});
    }

    /// What the kernel held after the last reconcile.
    #[must_use]
    pub fn held(&self) -> Held {
        self.held.borrow().clone()
    }

    /// What is wanted now.
    #[must_use]
    pub fn wanted(&self) -> Wanted {
        self.wanted.borrow().clone()
    }

    /// Stops reconciling and leaves the routes as they are (a controller that exits keeps the
    /// node announced: forwarding continues from the pins).
    pub fn leave(self) {
        self.task.abort();
    }

    /// Stops reconciling and withdraws every route of ours.
    ///
    /// # Errors
    /// When netlink fails.
    pub async fn withdraw_all(self) -> anyhow::Result<usize> {
        self.task.abort();
        withdraw_all(&self.handle).await
    }
}

async fn reconciler(handle: Handle, mut wanted: watch::Receiver<Wanted>, held: watch::Sender<Held>) {
    // The first value is the empty default, not a decision: wait for the controller's.
    if wanted.changed().await.is_err() {
        return;
    }
    loop {
        let want = wanted.borrow_and_update().clone();
        let now = match reconcile(&handle, &want).await {
            Ok(vips) => Held { vips, error: None },
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "announcing the VIPs failed");
                let vips = ours(&handle).await.map(|r| r.into_iter().filter(|(t, _, _)| *t == want.table).map(|(_, v, _)| v).collect());
                Held { vips: vips.unwrap_or_default(), error: Some(format!("{e:#}")) }
            }
        };
        held.send_replace(now);
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

/// The table and host-route destination (/32, /128) of one of our routes.
fn fields(r: &RouteMessage) -> Option<(u32, IpAddr)> {
    if r.header.protocol != RouteProtocol::Other(RTPROT_DSRLB) {
        return None;
    }
    let len = r.header.destination_prefix_length;
    let (mut table, mut dst) = (u32::from(r.header.table), None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) if len == 32 => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) if len == 128 => dst = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    Some((table, dst?))
}

/// Every route of ours (IPv4 and IPv6), in any table.
async fn ours(handle: &Handle) -> anyhow::Result<Vec<(u32, IpAddr, RouteMessage)>> {
    let routes = netlink::all_routes(handle).await?;
    Ok(routes.into_iter().filter_map(|r| fields(&r).map(|(t, v)| (t, v, r))).collect())
}

/// Makes our routes exactly `want`; returns the VIPs announced.
async fn reconcile(handle: &Handle, want: &Wanted) -> anyhow::Result<BTreeSet<IpAddr>> {
    let mut present = BTreeSet::new();
    for (table, vip, r) in ours(handle).await? {
        if table == want.table && want.vips.contains(&vip) {
            present.insert(vip);
            continue;
        }
        match handle.route().del(r).execute().await {
            Err(e) if netlink::errno(&e) != Some(libc::ESRCH) => return Err(e).with_context(|| format!("withdrawing {vip}")),
            _ => tracing::info!(%vip, table, "VIP withdrawn"),
        }
    }
    let missing: Vec<IpAddr> = want.vips.difference(&present).copied().collect();
    for vip in missing {
        let route = netlink::host_route(vip, None)
            .with_context(|| format!("a route for {vip}"))?
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Other(RTPROT_DSRLB))
            .table_id(want.table)
            .build();
        netlink::replace_route(handle, route).await.with_context(|| format!("announcing {vip} (a route in table {})", want.table))?;
        tracing::info!(%vip, table = want.table, "VIP announced");
        present.insert(vip);
    }
    Ok(present)
}

/// Removes every route of ours, in any table; returns how many there were.
///
/// # Errors
/// When netlink fails.
pub async fn withdraw_all(handle: &Handle) -> anyhow::Result<usize> {
    let mut n = 0;
    for (table, vip, r) in ours(handle).await? {
        match handle.route().del(r).execute().await {
            Err(e) if netlink::errno(&e) != Some(libc::ESRCH) => return Err(e).with_context(|| format!("withdrawing {vip}")),
            _ => {
                tracing::info!(%vip, table, "VIP withdrawn");
                n += 1;
            }
        }
    }
    Ok(n)
}
