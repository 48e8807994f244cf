//! Filling a running controller's flow table with `n` confirmed flows, through the
//! controller's own merge path (`FlowTable::merge`, as a cluster peer's flows come in), for the
//! scale benchmark and the full-table tests.

use std::net::{IpAddr, Ipv4Addr};

use lb_userspace::{
    dataplane::flow_key_of,
    flow_table::{Flow, FlowTable, Merged, PeerFlow},
};

/// A flow of the table that `f` picks, waited for up to 10 s (the one real connection a test
/// made through the VIP): its real and its age are those of a live flow now.
///
/// # Panics
/// When no flow matches.
pub fn live_flow(table: &FlowTable, f: impl Fn(&Flow) -> bool) -> Flow {
    crate::wait::until("a live flow in the table", std::time::Duration::from_secs(10), || {
        let mut found = None;
        table.walk(|x| {
            if found.is_none() && f(x) {
                found = Some(*x);
            }
        });
        found
    })
}

/// Client `i` of the fill: 10.0.0.0/8 less its first address, ports 1024 and up, so `n` up to
/// 16 million distinct clients.
#[must_use]
pub fn client(i: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(0x0a00_0000 + 1 + i / 64), 1024 + u16::try_from(i % 64).unwrap_or(0))
}

/// Counts of what the merges did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    pub inserted: usize,
    /// Refreshed, kept, full or capped: anything but a new flow.
    pub other: usize,
}

/// The peer [`fill`]'s flows come from.
pub const PEER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 200);

/// Merges `n` confirmed flows to `vip:port`, pinned to `real` with age `now` (a live flow's),
/// into `table`, whose listener expires flows idle `expire` age units. A merged flow counts as
/// idle `flow_table::MERGE_IDLE_FLOOR` units at least (about a minute; a peer's copy is never
/// fresher): it expires that much sooner.
pub fn fill(table: &FlowTable, n: u32, vip: IpAddr, port: u16, real: u32, now: u32, expire: u32) -> Filled {
    let mut out = Filled::default();
    for i in 0..n {
        let (ip, sport) = client(i);
        let (key, addrs6) = flow_key_of(ip.into(), sport, vip, port, table.seed());
        let flow = PeerFlow { key, addrs6, real, closing: false, opened: false, age: now, relayed: false };
        match table.merge(&flow, PEER, now, expire, true) {
            Merged::Inserted => out.inserted += 1,
            _ => out.other += 1,
        }
    }
    out
}
