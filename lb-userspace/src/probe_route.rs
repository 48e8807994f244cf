//! Policy routing that sends health probes for VIP:port along the DSR path to one backend.
//!
//! A probe socket carries the mark [`mark`]`(backend)`; a rule sends marked packets to that
//! backend's table, whose routes say "each VIP via this backend's address". The kernel then
//! resolves the backend's MAC and sends a frame with destination IP = VIP to that MAC: exactly
//! what the XDP program does with client traffic. The broker accepts it only if it holds the
//! VIP, and answers the balancer directly from the VIP.
//!
//! A tunnelled backend (`forward = "ipip"` or `"gue"`) is probed the same way, through the next
//! hop of its route: the balancer's TC egress program (`dsrlb_probe_encap`) wraps the marked
//! packets as the XDP program wraps client traffic, so the probe reaches VIP:port only through
//! the broker's decap.
//!
//! The rules and routes are kept over rtnetlink by a task that reconciles the kernel's with the
//! wanted ones whenever they are set: what is missing is added (also when someone removed it),
//! what is ours and not wanted is removed. The next hops towards tunnelled backends are the
//! data path's own: the neighbour watcher (`neigh`) looks them up (`ip route get`, every 5 s)
//! for the MACs it writes, and publishes them; whenever one moves, the task replaces the probe
//! routes through it, so the probes follow the route the clients' frames follow (the frames
//! once the new gateway's MAC is resolved; a probe left on a gateway that went away would mark
//! a healthy broker `vip-misconfigured`). A move never lists the routing table (an edge node may hold a full
//! BGP table); only a change of the wanted set, or the retry of a failed reconcile, does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion,
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};
use tokio::sync::watch;

use crate::{neigh::NextHops, netlink};

/// Marks and tables live in a block of their own: `0x0d5b_0000 | backend id`.
const MARK_BASE: u32 = lb_common::PROBE_MARK_BASE;
const MARK_MASK: u32 = lb_common::PROBE_MARK_MASK;
const TABLE_BASE: u32 = 0x000d_5b00;
/// Tables `TABLE_BASE ..= TABLE_BASE + TABLE_SPAN - 1` are ours.
const TABLE_SPAN: u32 = 0x100;
/// Rule preference: before the main table (32766), after local (0).
const RULE_PREF: u32 = 9130;

#[must_use]
pub const fn mark(backend: u32) -> u32 {
    MARK_BASE | backend
}

const fn table(backend: u32) -> u32 {
    TABLE_BASE + backend
}

/// Backend id to the (VIP, backend address, tunnelled) it is probed through: one per VIP, the
/// address of the VIP's family; a tunnelled backend's probes go to its route's next hop. IPv4
/// and IPv6 each get the backend's rule and table.
pub type Wanted = BTreeMap<u32, BTreeSet<(IpAddr, IpAddr, bool)>>;

/// The reconciling task's end: set what is wanted; clear it all on the way out.
pub struct ProbeRoutes {
    wanted: watch::Sender<Wanted>,
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl ProbeRoutes {
    /// Starts the reconciler for `interface` on the current tokio runtime, beginning from a
    /// clean slate (rules and tables a previous controller left are removed by the first round);
    /// tunnelled backends are probed through `next_hops` (the neighbour watcher's).
    ///
    /// # Errors
    /// When the interface does not exist or netlink fails.
    pub async fn start(interface: &str, next_hops: watch::Receiver<NextHops>) -> anyhow::Result<Self> {
        let handle = netlink::connect()?;
        let ifindex = netlink::ifindex(&handle, interface).await?;
        let (wanted, rx) = watch::channel(Wanted::new());
        let task = tokio::spawn(reconciler(handle.clone(), ifindex, rx, next_hops));
        Ok(Self { wanted, handle, task })
    }

    /// What the kernel should hold; the reconciler makes it so (now, and again on every call,
    /// which also puts back what someone removed). A route the kernel refuses is logged.
    pub fn set(&self, wanted: Wanted) {
        self.wanted.send_replace(wanted);
    }

    /// Stops the reconciler and removes every rule and route of ours.
    pub async fn clear(self) {
        self.task.abort();
        if let Err(e) = reconcile(&self.handle, 0, &Via::new()).await {
            tracing::warn!(error = %format!("{e:#}"), "removing the DSR-path probe routes failed");
        }
    }
}

/// The first wait before a failed reconcile is retried; doubled on each failure in a row, up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between retries of a failed reconcile.
const MAX_RETRY: Duration = Duration::from_secs(80);

async fn reconciler(handle: Handle, ifindex: u32, mut wanted: watch::Receiver<Wanted>, mut hops: watch::Receiver<NextHops>) {
    let mut want = wanted.borrow_and_update().clone();
    let mut problems = Problems::new();
    let mut via = resolve(&want, &hops.borrow_and_update(), &mut problems);
    // Without the watcher (it ended), the probe routes keep the last next hops.
    let mut watched = true;
    // How long to wait before retrying a failed reconcile: doubled on each failure in a row (a
    // route the kernel keeps refusing must not list the routing table every 5 s), reset on
    // success.
    let mut retry = FIRST_RETRY;
    loop {
        // The whole set, listing what the kernel holds: at the start, when the wanted set
        // changes, when a backend's table gains or loses its rule, and again after a wait while
        // the last attempt failed.
        let mut retry_at = match reconcile(&handle, ifindex, &via).await {
            Ok(()) => {
                retry = FIRST_RETRY;
                None
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?retry, "DSR-path probe routes incomplete: VIP checks of some backends will fail");
                Some(tokio::time::Instant::now() + retry)
            }
        };
        loop {
            tokio::select! {
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    want = wanted.borrow_and_update().clone();
                    settle(&want, &mut hops, &mut watched).await;
                    via = resolve(&want, &hops.borrow_and_update(), &mut problems);
                    break;
                }
                moved = hops.changed(), if watched => {
                    if moved.is_err() {
                        watched = false;
                        continue;
                    }
                    let now = resolve(&want, &hops.borrow_and_update(), &mut problems);
                    // Nothing moved; or the wanted set changed meanwhile, and its branch redoes
                    // the whole set with the next hops as they are then.
                    if now == via || wanted.has_changed().unwrap_or(true) {
                        continue;
                    }
                    if retry_at.is_some() {
                        // The retry reconciles the whole set, with these.
                        via = now;
                        continue;
                    }
                    // A backend's table that gains its first route of a family, or loses its
                    // last, needs its rule added or removed: the whole set.
                    if rules_of(&now) != rules_of(&via) {
                        via = now;
                        break;
                    }
                    // Otherwise only the routes that moved are written: no listing of the
                    // routing table (an edge node may hold a full BGP table).
                    if follow(&handle, ifindex, &via, &now).await.is_err() {
                        retry_at = Some(tokio::time::Instant::now() + retry);
                    }
                    via = now;
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    retry = (retry * 2).min(MAX_RETRY);
                    break;
                }
            }
        }
    }
}

/// How long a new wanted set waits for the watcher's first look at its tunnelled backends.
const SETTLE: Duration = Duration::from_secs(2);

/// Waits, for at most [`SETTLE`], until the watcher has published a next hop (or why there is
/// none) for every tunnelled backend `want` names, so that the reconcile, which lists the
/// routing table, is made once with them all rather than once without and again with them.
async fn settle(want: &Wanted, hops: &mut watch::Receiver<NextHops>, watched: &mut bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while *watched {
        let missing = {
            let known = hops.borrow();
            want.values().flatten().any(|&(_, addr, tunnelled)| tunnelled && !known.contains_key(&addr))
        };
        if !missing {
            return;
        }
        tokio::select! {
            changed = hops.changed() => if changed.is_err() { *watched = false },
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// The (backend, IPv6) rules a set of probe routes needs.
fn rules_of(via: &Via) -> BTreeSet<(u32, bool)> {
    via.iter().flat_map(|(&b, pairs)| pairs.iter().map(move |(vip, _)| (b, vip.is_ipv6()))).collect()
}

/// Backend id to the (VIP, gateway) pairs of its table: the backend's own address, or for a
/// tunnelled backend the next hop of its route (left out when its route leaves by another
/// interface or there is none: its VIP checks fail, and it shows `vip-misconfigured`).
type Via = BTreeMap<u32, BTreeSet<(IpAddr, IpAddr)>>;

/// Tunnelled backends' addresses whose next hop is unusable, and why: warned of when that
/// starts or changes, told when it ends, never repeated.
type Problems = BTreeMap<IpAddr, String>;

/// The probe routes `want` needs through the next hops the neighbour watcher last found. A
/// tunnelled backend it has not looked up yet gets no route until it has (the watcher's
/// publication wakes the reconciler).
fn resolve(want: &Wanted, next_hops: &NextHops, problems: &mut Problems) -> Via {
    let hops: BTreeMap<IpAddr, Result<IpAddr, String>> = want
        .values()
        .flatten()
        .filter(|&&(_, _, t)| t)
        .filter_map(|&(_, addr, _)| {
            next_hops.get(&addr).map(|h| {
                (addr, h.clone().map_err(|why| format!("no usable route to a tunnelled backend ({why}): its VIP checks will fail")))
            })
        })
        .collect();
    let now: Problems = hops.iter().filter_map(|(a, h)| h.as_ref().err().map(|e| (*a, e.clone()))).collect();
    for (addr, why) in &now {
        if problems.get(addr) != Some(why) {
            tracing::warn!(backend = %addr, "{why}");
        }
    }
    for addr in problems.keys().filter(|a| !now.contains_key(a) && hops.contains_key(a)) {
        tracing::info!(backend = %addr, "the route to a tunnelled backend is usable again");
    }
    *problems = now;
    let mut via = Via::new();
    for (&b, pairs) in want {
        for &(vip, addr, tunnelled) in pairs {
            let gateway = if tunnelled { hops.get(&addr).and_then(|h| h.as_ref().ok().copied()) } else { Some(addr) };
            if let Some(g) = gateway {
                via.entry(b).or_default().insert((vip, g));
            }
        }
    }
    via
}

/// Moves the probe routes from `old` to `new` (the same backends and VIPs, some through another
/// gateway or none): each moved route replaced in place, each that lost its gateway removed.
async fn follow(handle: &Handle, ifindex: u32, old: &Via, new: &Via) -> anyhow::Result<()> {
    let gateway = |v: &Via, b: u32, vip: IpAddr| v.get(&b).and_then(|p| p.iter().find(|(x, _)| *x == vip).map(|&(_, g)| g));
    let mut result = Ok(());
    let routes: BTreeSet<(u32, IpAddr)> = old.iter().chain(new).flat_map(|(&b, p)| p.iter().map(move |&(vip, _)| (b, vip))).collect();
    for (b, vip) in routes {
        let (from, to) = (gateway(old, b, vip), gateway(new, b, vip));
        if from == to {
            continue;
        }
        let done = if let Some(g) = to {
            tracing::info!(%vip, from = ?from, to = %g, backend = b, "a tunnelled backend's next hop moved: its probe route follows");
            let route = netlink::host_route(vip, Some(g))?.output_interface(ifindex).table_id(table(b)).build();
            netlink::replace_route(handle, route).await.map_err(anyhow::Error::from)
        } else {
            let route = netlink::host_route(vip, from)?.output_interface(ifindex).table_id(table(b)).build();
            match handle.route().del(route).execute().await {
                Err(e) if netlink::errno(&e) != Some(libc::ESRCH) => Err(e.into()),
                _ => Ok(()),
            }
        };
        if let Err(e) = done {
            tracing::warn!(%vip, backend = b, error = %format!("{e:#}"), "moving a DSR-path probe route failed: retried");
            result = Err(e);
        }
    }
    result
}

/// The fwmark, table and priority of a rule.
fn rule_fields(r: &RuleMessage) -> (Option<u32>, u32, u32) {
    let (mut fwmark, mut table, mut prio) = (None, u32::from(r.header.table), 0);
    for a in &r.attributes {
        match a {
            RuleAttribute::FwMark(m) => fwmark = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => prio = *p,
            _ => {}
        }
    }
    (fwmark, table, prio)
}

/// A route's table, host-route destination (/32 or /128) and gateway.
fn route_fields(r: &RouteMessage) -> (u32, Option<IpAddr>, Option<IpAddr>) {
    let (mut table, mut dst, mut gw) = (u32::from(r.header.table), None, None);
    let len = r.header.destination_prefix_length;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) if len == 32 => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) if len == 128 => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gw = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    (table, dst, gw)
}

/// Makes our rules and routes exactly `want` (`ifindex`: the interface the routes go out of).
async fn reconcile(handle: &Handle, ifindex: u32, want: &Via) -> anyhow::Result<()> {
    let ours = |mark: u32| mark & MARK_MASK == MARK_BASE;
    // Rules: one per wanted backend and family, `fwmark mark(b) lookup table(b)` at RULE_PREF.
    for (family, v6) in [(IpVersion::V4, false), (IpVersion::V6, true)] {
        let wants = |b: u32| want.get(&b).is_some_and(|pairs| pairs.iter().any(|(vip, _)| vip.is_ipv6() == v6));
        let rules: Vec<RuleMessage> = handle.rule().get(family).execute().try_collect().await.context("listing rules")?;
        let mut have = BTreeSet::new();
        for r in rules {
            let (fwmark, t, prio) = rule_fields(&r);
            let Some(m) = fwmark.filter(|&m| ours(m) && prio == RULE_PREF) else { continue };
            let b = m & !MARK_MASK;
            if wants(b) && t == table(b) && have.insert(b) {
                continue;
            }
            match handle.rule().del(r).execute().await {
                Err(e) if netlink::errno(&e) != Some(libc::ENOENT) => return Err(e).context("removing a stale probe rule"),
                _ => {}
            }
        }
        for &b in want.keys().filter(|&&b| wants(b) && !have.contains(&b)) {
            let added = if v6 {
                handle.rule().add().v6().priority(RULE_PREF).fw_mark(mark(b)).table_id(table(b)).action(RuleAction::ToTable).execute().await
            } else {
                handle.rule().add().v4().priority(RULE_PREF).fw_mark(mark(b)).table_id(table(b)).action(RuleAction::ToTable).execute().await
            };
            match added {
                Err(e) if netlink::errno(&e) != Some(libc::EEXIST) => {
                    return Err(e).with_context(|| format!("adding the probe rule of backend {b}"));
                }
                _ => {}
            }
        }
    }
    // Routes: in each wanted backend's table, `VIP/32 via address dev interface` (/128 for
    // IPv6), or via the next hop towards a tunnelled backend's address; nothing else in our
    // tables.
    let routes = netlink::all_routes(handle).await?;
    let mut present = BTreeSet::new();
    for r in routes {
        let (t, dst, gw) = route_fields(&r);
        if !(TABLE_BASE..TABLE_BASE + TABLE_SPAN).contains(&t) {
            continue;
        }
        let b = t - TABLE_BASE;
        let keep = match (want.get(&b), dst, gw) {
            (Some(pairs), Some(vip), Some(gw)) => pairs.contains(&(vip, gw)),
            _ => false,
        };
        if keep && let (Some(vip), Some(gw)) = (dst, gw) {
            present.insert((b, vip, gw));
            continue;
        }
        match handle.route().del(r).execute().await {
            Err(e) if netlink::errno(&e) != Some(libc::ESRCH) => return Err(e).context("removing a stale probe route"),
            _ => {}
        }
    }
    let mut refused = 0;
    for (&b, pairs) in want {
        for &(vip, addr) in pairs.iter().filter(|&&(v, a)| !present.contains(&(b, v, a))) {
            let route = netlink::host_route(vip, Some(addr))
                .with_context(|| format!("a probe route for {vip} via {addr}"))?
                .output_interface(ifindex)
                .table_id(table(b))
                .build();
            // One route the kernel refuses leaves the others in place, and the whole is tried
            // again later.
            if let Err(e) = netlink::replace_route(handle, route).await {
                tracing::warn!(%vip, via = %addr, error = %e, "a DSR-path probe route was refused: that backend's VIP checks will fail");
                refused += 1;
            }
        }
    }
    anyhow::ensure!(refused == 0, "{refused} probe routes refused");
    Ok(())
}
