//! Backend MACs from the kernel's neighbour tables (ARP for IPv4, NDP for IPv6), over rtnetlink: a watcher task dumps the
//! table for the balancer's interface, asks the kernel to resolve the wanted addresses it lacks
//! (as a packet to them would), and publishes what it found. The controller reads the latest
//! snapshot and never waits for an answer.
//!
//! A tunnelled backend (`forward = "ipip"` or `"gue"`) is reached through the next hop of its
//! route: the watcher asks the kernel for that route each time it reads the table (`ip route
//! get`, so policy routing counts), resolves the gateway (or the address itself when the route
//! has none), and publishes the gateway's MAC under the backend's address. A route that leaves
//! by another interface gives no MAC: the backend is `no-mac`, out of every ring, until it
//! comes back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion,
    packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
};
use tokio::sync::watch;

use crate::netlink;

/// Resolved neighbours of the interface: address to MAC.
pub type Macs = BTreeMap<IpAddr, [u8; 6]>;

/// Tunnelled backends' next hops, as last looked up: the gateway of the backend's route (or the
/// backend itself, on the link), or why there is none usable. A backend not yet looked up is
/// absent. The probes' routes follow these (see `probe_route`): one source for both paths.
pub type NextHops = BTreeMap<IpAddr, Result<IpAddr, String>>;

/// States in which an entry holds a usable link-layer address (the kernel's `NUD_VALID`).
const NUD_VALID: u16 = libc::NUD_PERMANENT | libc::NUD_NOARP | libc::NUD_REACHABLE | libc::NUD_PROBE | libc::NUD_STALE | libc::NUD_DELAY;

/// How often the table is read while a wanted address is missing, and otherwise.
const WHILE_MISSING: Duration = Duration::from_millis(200);
const OTHERWISE: Duration = Duration::from_secs(5);

/// The addresses the watcher keeps resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// On the link: their own MACs.
    pub direct: BTreeSet<IpAddr>,
    /// Tunnelled backends: the MAC of their route's next hop.
    pub routed: BTreeSet<IpAddr>,
}

/// The watcher's two ends: the latest snapshot, and the addresses to resolve.
pub struct Neighbours {
    macs: watch::Receiver<Macs>,
    wanted: watch::Sender<Wanted>,
    /// Routed addresses whose route does not leave by the interface (or that have none).
    unroutable: watch::Receiver<BTreeSet<IpAddr>>,
    next_hops: watch::Receiver<NextHops>,
}

impl Neighbours {
    /// Reads the table once and starts the watcher on the current tokio runtime.
    ///
    /// # Errors
    /// When the interface does not exist or netlink fails.
    pub async fn start(interface: &str) -> anyhow::Result<Self> {
        let handle = netlink::connect()?;
        let ifindex = netlink::ifindex(&handle, interface).await?;
        let first = dump(&handle, ifindex).await?;
        let (macs_tx, macs) = watch::channel(first);
        let (wanted, wanted_rx) = watch::channel(Wanted::default());
        let (unroutable_tx, unroutable) = watch::channel(BTreeSet::new());
        let (next_hops_tx, next_hops) = watch::channel(NextHops::new());
        tokio::spawn(watch_table(handle, ifindex, macs_tx, wanted_rx, (unroutable_tx, next_hops_tx)));
        Ok(Self { macs, wanted, unroutable, next_hops })
    }

    /// The tunnelled backends' next hops, as the watcher last looked them up; wakes on a change.
    #[must_use]
    pub fn next_hops(&self) -> watch::Receiver<NextHops> {
        self.next_hops.clone()
    }

    /// The MAC of `addr`, if the latest snapshot has it.
    #[must_use]
    pub fn mac(&self, addr: IpAddr) -> Option<[u8; 6]> {
        self.macs.borrow().get(&addr).copied()
    }

    /// Whether routed address `addr` has no route out of the interface (as last looked up).
    #[must_use]
    pub fn unroutable(&self, addr: IpAddr) -> bool {
        self.unroutable.borrow().contains(&addr)
    }

    /// The addresses the watcher keeps resolved (every backend without a configured MAC).
    pub fn want(&self, addrs: Wanted) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != addrs;
            *w = addrs;
            changed
        });
    }

    /// A receiver that wakes when a snapshot differs from the last.
    #[must_use]
    pub fn changes(&self) -> watch::Receiver<Macs> {
        self.macs.clone()
    }
}

async fn watch_table(
    handle: Handle,
    ifindex: u32,
    macs: watch::Sender<Macs>,
    mut wanted: watch::Receiver<Wanted>,
    (unroutable, published): (watch::Sender<BTreeSet<IpAddr>>, watch::Sender<NextHops>),
) {
    // The last next hop (or why none) of each routed address, to log changes once.
    let mut hops = NextHops::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        let mut next_hops = BTreeMap::new();
        for &addr in &want.routed {
            let hop = match netlink::route_get(&handle, addr).await {
                Ok((oif, gateway)) if oif == ifindex => Ok(gateway.unwrap_or(addr)),
                Ok((oif, _)) => Err(format!("its route leaves by interface index {oif}, not the balancer's")),
                Err(e) => Err(format!("{e:#}")),
            };
            if hops.get(&addr) != Some(&hop) {
                match &hop {
                    Ok(h) => tracing::info!(backend = %addr, next_hop = %h, "tunnelled backend's next hop"),
                    Err(why) => tracing::warn!(backend = %addr, why = %why, "tunnelled backend unreachable from the balancer's interface"),
                }
                hops.insert(addr, hop.clone());
            }
            if let Ok(h) = hop {
                next_hops.insert(addr, h);
            }
        }
        hops.retain(|a, _| want.routed.contains(a));
        published.send_if_modified(|p| {
            let changed = *p != hops;
            p.clone_from(&hops);
            changed
        });
        // Before the MACs that follow from it: a reader woken by those finds it current.
        let lost: BTreeSet<IpAddr> = want.routed.iter().copied().filter(|a| !next_hops.contains_key(a)).collect();
        unroutable.send_if_modified(|u| {
            let changed = *u != lost;
            *u = lost;
            changed
        });
        let needed: BTreeSet<IpAddr> = want.direct.iter().copied().chain(next_hops.values().copied()).collect();
        match dump(&handle, ifindex).await {
            Ok(mut found) => {
                for &addr in needed.iter().filter(|a| !found.contains_key(a)) {
                    solicit(&handle, ifindex, addr).await;
                }
                for &addr in &want.routed {
                    let mac = match next_hops.get(&addr) {
                        // The hop's MAC; while it is being resolved again, the last one known.
                        Some(hop) => found.get(hop).copied().or_else(|| macs.borrow().get(&addr).copied()),
                        // No route out of the interface: no MAC (not the address's own
                        // neighbour entry, should it have one).
                        None => None,
                    };
                    match mac {
                        Some(mac) => found.insert(addr, mac),
                        None => found.remove(&addr),
                    };
                }
                macs.send_if_modified(|m| {
                    let changed = *m != found;
                    *m = found;
                    changed
                });
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "reading the neighbour table failed"),
        }
        let missing = want.direct.iter().chain(&want.routed).any(|a| !macs.borrow().contains_key(a));
        let pause = if missing { WHILE_MISSING } else { OTHERWISE };
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            () = tokio::time::sleep(pause) => {}
        }
        if macs.is_closed() {
            return;
        }
    }
}

/// The resolved IPv4 and IPv6 neighbours of interface `ifindex`.
async fn dump(handle: &Handle, ifindex: u32) -> anyhow::Result<Macs> {
    let mut out = Macs::new();
    dump_family(handle, ifindex, IpVersion::V4, &mut out).await?;
    dump_family(handle, ifindex, IpVersion::V6, &mut out).await?;
    Ok(out)
}

async fn dump_family(handle: &Handle, ifindex: u32, family: IpVersion, out: &mut Macs) -> anyhow::Result<()> {
    let mut stream = handle.neighbours().get().set_family(family).execute();
    while let Some(msg) = stream.try_next().await? {
        if msg.header.ifindex != ifindex || u16::from(msg.header.state) & NUD_VALID == 0 {
            continue;
        }
        let mut dst = None;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
                NeighbourAttribute::LinkLocalAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => {}
            }
        }
        if let (Some(dst), Some(mac)) = (dst, mac.filter(|m| *m != [0; 6])) {
            out.insert(dst, mac);
        }
    }
    Ok(())
}

/// Asks the kernel to resolve `addr` (an ARP request or a neighbour solicitation, as a packet to
/// it would start): a neighbour entry added with `NTF_USE`. Should netlink refuse, a UDP
/// datagram to the discard port does the same.
async fn solicit(handle: &Handle, ifindex: u32, addr: IpAddr) {
    let asked = handle.neighbours().add(ifindex, addr).flags(NeighbourFlags::Use).state(NeighbourState::None).replace().execute().await;
    let any: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    if asked.is_err()
        && let Ok(sock) = tokio::net::UdpSocket::bind((any, 0)).await
    {
        let _ = sock.send_to(&[0], (addr, 9)).await;
    }
}
