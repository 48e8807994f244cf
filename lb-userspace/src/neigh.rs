//! Backend MACs from the kernel's neighbour tables (ARP for IPv4, NDP for IPv6), over rtnetlink: a watcher task dumps the
//! table for the balancer's interface, asks the kernel to resolve the wanted addresses it lacks
//! (as a packet to them would), and publishes what it found. The controller reads the latest
//! snapshot and never waits for an answer.

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

/// States in which an entry holds a usable link-layer address (the kernel's `NUD_VALID`).
const NUD_VALID: u16 = libc::NUD_PERMANENT | libc::NUD_NOARP | libc::NUD_REACHABLE | libc::NUD_PROBE | libc::NUD_STALE | libc::NUD_DELAY;

/// How often the table is read while a wanted address is missing, and otherwise.
const WHILE_MISSING: Duration = Duration::from_millis(200);
const OTHERWISE: Duration = Duration::from_secs(5);

/// The watcher's two ends: the latest snapshot, and the addresses to resolve.
pub struct Neighbours {
    macs: watch::Receiver<Macs>,
    wanted: watch::Sender<BTreeSet<IpAddr>>,
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
        let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
        tokio::spawn(watch_table(handle, ifindex, macs_tx, wanted_rx));
        Ok(Self { macs, wanted })
    }

    /// The MAC of `addr`, if the latest snapshot has it.
    #[must_use]
    pub fn mac(&self, addr: IpAddr) -> Option<[u8; 6]> {
        self.macs.borrow().get(&addr).copied()
    }

    /// The addresses the watcher keeps resolved (every backend without a configured MAC).
    pub fn want(&self, addrs: BTreeSet<IpAddr>) {
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

async fn watch_table(handle: Handle, ifindex: u32, macs: watch::Sender<Macs>, mut wanted: watch::Receiver<BTreeSet<IpAddr>>) {
    loop {
        let want = wanted.borrow_and_update().clone();
        match dump(&handle, ifindex).await {
            Ok(found) => {
                for &addr in want.iter().filter(|a| !found.contains_key(a)) {
                    solicit(&handle, ifindex, addr).await;
                }
                macs.send_if_modified(|m| {
                    let changed = *m != found;
                    *m = found;
                    changed
                });
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "reading the neighbour table failed"),
        }
        let missing = want.iter().any(|a| !macs.borrow().contains_key(a));
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
