//! The flows a node shares with the other nodes of its cluster (see `crate::cluster`): its
//! exceptions, found by a walk of its flow table, and the other nodes' exceptions, merged into
//! it by a worker thread of its own (in arrival order, so a peer's `SYNCED` mark is passed on
//! only once every flow it sent before is in the table).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use lb_common::{
    FLOW_WAYS, FlowAddrs6, FlowKey, NO_BACKEND, flow_hash, flow_hash6, real_backend, real_listener, ring_slot, source_hash, source_hash6,
};
use tokio::sync::mpsc;

use crate::{
    cluster::{Entry, Exceptions, Group},
    config::Config,
    dataplane::{Desired, flow_key_of},
    flow_table::{Flow, FlowTable, Merged, PeerFlow},
    maglev,
    plan::Ids,
};

/// What a walk needs to know of one listener.
#[derive(Clone, Debug)]
pub struct ListenerView {
    pub vip: IpAddr,
    pub port: u16,
    pub hash_source: bool,
    pub source_prefix64: bool,
    /// As written to the listener's active ring copy.
    pub ring: Arc<Vec<u32>>,
    /// The ring the config alone gives (every backend up, the configured weights): what
    /// another node whose checks or drains differ from ours may be using. Empty until
    /// [`RingView::with_nominal`].
    pub nominal: Arc<Vec<u32>>,
    /// Idle units from which a flow is over.
    pub expire: u32,
    /// The backends whose flows stay where they are pinned (in the listener, not reset after
    /// a failure), by id, with their names.
    pub backends: BTreeMap<u32, String>,
}

/// The rings as this node applies them now.
#[derive(Clone, Debug, Default)]
pub struct RingView {
    pub ring_size: u32,
    pub listeners: BTreeMap<u32, ListenerView>,
    /// Share every live confirmed flow, not only the exceptions: while another node's config
    /// differs from this one's (a reload that reached some nodes first), its rings differ too,
    /// and no ring of ours says which flows it would send elsewhere.
    pub share_all: bool,
}

impl RingView {
    /// From what the controller last wrote.
    #[must_use]
    pub fn new(desired: &Desired, ids: &Ids, ring_size: u32) -> Self {
        let name_of: BTreeMap<u32, &String> = ids.backends.iter().map(|(n, id)| (*id, n)).collect();
        let listeners = desired
            .listeners
            .iter()
            .map(|l| {
                let backends =
                    l.reals.iter().filter(|r| !r.down).filter_map(|r| Some((r.backend, (*name_of.get(&r.backend)?).clone()))).collect();
                let view = ListenerView {
                    vip: l.vip,
                    port: l.port,
                    hash_source: l.hash_source,
                    source_prefix64: l.source_prefix64,
                    ring: Arc::new(l.ring.clone()),
                    nominal: Arc::new(Vec::new()),
                    expire: l.idle_expire,
                    backends,
                };
                (l.id, view)
            })
            .collect();
        Self { ring_size, listeners, share_all: false }
    }

    /// Adds each listener's nominal ring, built from `config` (Maglev: tens of milliseconds
    /// for a large ring, so off the controller's loop).
    #[must_use]
    pub fn with_nominal(mut self, config: &Config, ids: &Ids) -> Self {
        for c in &config.listeners {
            let Some(l) = ids.listeners.get(&c.name).and_then(|id| self.listeners.get_mut(id)) else { continue };
            let members: Vec<(&str, u32)> =
                c.backends.iter().filter_map(|b| config.backend(b).map(|b| (b.name.as_str(), b.weight))).collect();
            let ring = maglev::build(&members, config.ring_size, config.ring_seed.as_ref())
                .into_iter()
                .map(|slot| members.get(slot as usize).and_then(|(name, _)| ids.backends.get(*name)).copied().unwrap_or(NO_BACKEND))
                .collect();
            l.nominal = Arc::new(ring);
        }
        self
    }

    /// The backend id the listener's ring gives a flow (as the program picks it), or
    /// `NO_BACKEND`.
    #[must_use]
    pub fn pick(&self, l: &ListenerView, flow: &Flow) -> u32 {
        Self::pick_in(&l.ring, l, flow, self.ring_size)
    }

    fn pick_in(ring: &[u32], l: &ListenerView, flow: &Flow, ring_size: u32) -> u32 {
        let key = &flow.key;
        let hash = match &flow.addrs6 {
            Some(a) if l.hash_source => source_hash6(&a.src.words(), l.source_prefix64),
            Some(a) => flow_hash6(&a.src.words(), &a.dst.words(), key.sport_be, key.dport_be),
            None if l.hash_source => source_hash(key.src_be),
            None => flow_hash(key.src_be, key.dst_be, key.sport_be, key.dport_be),
        };
        ring.get(ring_slot(hash, ring_size) as usize).copied().unwrap_or(NO_BACKEND)
    }

    /// Whether every node would send this flow to `backend`: this node's ring does, and so
    /// does the nominal ring (when built).
    fn follows_rings(&self, l: &ListenerView, flow: &Flow, backend: u32) -> bool {
        self.pick(l, flow) == backend && (l.nominal.is_empty() || Self::pick_in(&l.nominal, l, flow, self.ring_size) == backend)
    }
}

/// The client end of a flow (IPv4 or IPv6).
#[must_use]
pub fn client_of(flow: &Flow) -> SocketAddr {
    let port = u16::from_be_bytes(flow.key.sport_be.to_ne_bytes());
    match &flow.addrs6 {
        Some(a) => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a.src.octets)), port),
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(flow.key.src_be.to_ne_bytes())), port),
    }
}

/// The flow table key of a client's flow to a listener (an IPv6 one's with the table's
/// `seed`), and an IPv6 flow's addresses.
#[must_use]
pub fn key_of(client: SocketAddr, listener: SocketAddr, seed: u64) -> (FlowKey, Option<FlowAddrs6>) {
    flow_key_of(client.ip(), client.port(), listener.ip(), listener.port(), seed)
}

/// The live confirmed flows of the table, and the connections an admitted SYN opened that have
/// not confirmed yet (their first keepalive may be a minute away, and a failover before it
/// must not lose them), that the current ring (or the nominal ring, when the view has it:
/// another node's checks may differ from ours) would send elsewhere, grouped by listener and
/// backend (`now`: the flow clock's age). Flows recorded mid-flow and not confirmed (what a
/// flood of made-up segments records) are not shared, nor flows of a backend that is reset
/// (down past its grace) or gone: every node re-picks those anyway.
#[must_use]
pub fn find(table: &FlowTable, view: &RingView, now: u32) -> Exceptions {
    let walked = std::time::Instant::now();
    let mut groups: BTreeMap<(u32, u32), Vec<Entry>> = BTreeMap::new();
    // A peer's copy is shared while it lives (`Idle::of`: the peer's refresh lag counts), with
    // the idle time its peer last told, marked relayed (`Idle::shared`).
    let idle_at = table.idle_at(now);
    table.walk(|f| {
        let Some(l) = view.listeners.get(&real_listener(f.real())) else { return };
        let backend = real_backend(f.real());
        let opened = f.kind() == lb_common::FLOW_K_OPENED;
        if !(f.confirmed() || opened) || !l.backends.contains_key(&backend) || (!view.share_all && view.follows_rings(l, f, backend)) {
            return;
        }
        if idle_at.of(f, l.expire) >= l.expire {
            return;
        }
        let (idle, relayed) = idle_at.shared(f);
        let entry = Entry { client: client_of(f), idle: u16::try_from(idle).unwrap_or(u16::MAX), closing: f.closing(), opened, relayed };
        groups.entry((real_listener(f.real()), backend)).or_default().push(entry);
    });
    let groups = groups
        .into_iter()
        .map(|((lid, bid), entries)| {
            let l = &view.listeners[&lid];
            Group { listener: Some(SocketAddr::new(l.vip, l.port)), backend: l.backends[&bid].clone(), entries }
        })
        .collect();
    Exceptions { groups, complete: true, walked: Some(walked) }
}

/// Flows of one real to take in, from one peer.
#[derive(Debug)]
pub struct Incoming {
    pub from: Ipv4Addr,
    pub flows: Vec<PeerFlow>,
    pub now: u32,
    pub expire: u32,
}

/// Work for the merge thread, in arrival order.
#[derive(Debug)]
pub enum Job {
    Merge(Incoming),
    /// A peer's round is complete: note it in the table (at the flow clock's age then, when it
    /// could be read) and report it, once what came before is merged.
    Synced(Ipv4Addr, Option<u32>),
    /// A peer connected (greeted) at that age (`None`: the clock could not be read): note it in
    /// the table once what came before is merged (`FlowTable::peer_connected`); nothing is
    /// reported.
    Connected(Ipv4Addr, Option<u32>),
}

/// What the merge thread reports.
#[derive(Debug)]
pub enum Done {
    Merged(MergeCounts),
    Synced(Ipv4Addr),
}

/// Results of merges, by [`Merged`] kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeCounts {
    pub inserted: u64,
    pub refreshed: u64,
    pub kept: u64,
    pub full: u64,
    /// Named a listener or backend this node does not have.
    pub unknown: u64,
    /// New to the table, but the peer had inserted its share ([`PeerBudget`]).
    pub capped: u64,
}

impl MergeCounts {
    pub fn add(&mut self, o: &Self) {
        self.inserted += o.inserted;
        self.refreshed += o.refreshed;
        self.kept += o.kept;
        self.full += o.full;
        self.unknown += o.unknown;
        self.capped += o.capped;
    }
}

/// How many flows one peer may insert into this node's table: as many as the table is sized
/// for (half its slots) at once, refilled at that many per flow idle timeout. A peer shares its
/// exceptions (after a ring change, the share of flows that moved) or, while configs differ,
/// every live flow it holds: a node joining with an empty table takes a full peer's flows in
/// one go (`bench scale` measured a quarter of the slots, the cap before, taking 525,291 of a
/// million). This is a rate, not a share of the table: what a peer inserts is confirmed, never
/// replaced, and kept alive by its refreshes, which cost nothing, so a holder of the cluster
/// key that keeps sending new flows fills the table in time (twice as fast as with the old
/// cap), and budgets are per peer address. The cluster key is the trust boundary
/// (`docs/ha.md`); the budget keeps a bug or a misconfigured peer from filling the table at once.
#[derive(Clone, Copy, Debug)]
pub struct PeerBudget {
    tokens: f64,
    at: std::time::Instant,
}

impl PeerBudget {
    /// A full budget for a table of `slots` slots.
    #[must_use]
    pub fn new(slots: u64, at: std::time::Instant) -> Self {
        Self { tokens: Self::cap(slots), at }
    }

    fn cap(slots: u64) -> f64 {
        (slots / 2) as f64
    }

    /// Whether an insert fits at `at`, with `expire` age units the flow idle timeout (the
    /// budget refills meanwhile).
    pub fn available(&mut self, slots: u64, expire: u32, at: std::time::Instant) -> bool {
        let cap = Self::cap(slots);
        let timeout_s = f64::from(expire.max(1)) * (1u64 << lb_common::FLOW_AGE_NS_SHIFT) as f64 / 1e9;
        self.tokens = (self.tokens + at.saturating_duration_since(self.at).as_secs_f64() * cap / timeout_s).min(cap);
        self.at = at;
        self.tokens >= 1.0
    }

    /// One insert made.
    pub fn spend(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Starts the merge thread on `table`; it ends when the returned sender is dropped.
///
/// # Panics
/// When the thread cannot be spawned.
#[must_use]
pub fn spawn_merger(table: Arc<FlowTable>, done: mpsc::Sender<Done>) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("dsrlb-merge".to_owned())
        .spawn(move || {
            let slots = u64::from(table.buckets()) * FLOW_WAYS as u64;
            let mut budgets: BTreeMap<Ipv4Addr, PeerBudget> = BTreeMap::new();
            for job in rx {
                let out = match job {
                    Job::Merge(i) => {
                        let budget = budgets.entry(i.from).or_insert_with(|| PeerBudget::new(slots, std::time::Instant::now()));
                        Done::Merged(merge_all(&table, &i, budget, slots))
                    }
                    Job::Synced(node, now) => {
                        if let Some(now) = now {
                            table.peer_synced(node, now);
                        }
                        Done::Synced(node)
                    }
                    Job::Connected(node, now) => {
                        table.peer_connected(node, now);
                        continue;
                    }
                };
                if done.blocking_send(out).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the merge thread");
    tx
}

/// Merges one peer's flows, within its budget.
#[must_use]
pub fn merge_all(table: &FlowTable, i: &Incoming, budget: &mut PeerBudget, slots: u64) -> MergeCounts {
    let mut c = MergeCounts::default();
    let at = std::time::Instant::now();
    for flow in &i.flows {
        match table.merge(flow, i.from, i.now, i.expire, budget.available(slots, i.expire, at)) {
            Merged::Inserted => {
                c.inserted += 1;
                budget.spend();
            }
            Merged::Refreshed => c.refreshed += 1,
            Merged::Kept => c.kept += 1,
            Merged::Full => c.full += 1,
            Merged::Capped => c.capped += 1,
        }
    }
    c
}
