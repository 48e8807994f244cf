//! The controller's part in a multi-node deployment: what this node announces to the routers
//! (`[announce]`, see `crate::announce`) and the flows it shares with the other nodes
//! (`[cluster]`, see `crate::cluster` and `crate::exceptions`).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::{NO_BACKEND, real_id};
use tokio::sync::mpsc;

use super::Controller;
use crate::{
    announce::{self, Announcer},
    cluster::{self, Cluster, Exceptions},
    config::{self, Config},
    control::status::{AnnounceStatus, ClusterStatus, LastWalk, VipStatus},
    dataplane,
    exceptions::{self, Done, Incoming, Job, MergeCounts, RingView},
    flow_table::{FlowTable, PeerFlow},
};

/// How often the announced routes are put back if someone removed them.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// After `dsrlb stop` withdraws the VIPs: the listeners must see no packet this long before
/// the program is detached (the routers have moved the traffic elsewhere).
const QUIET: Duration = Duration::from_secs(1);

/// The receiving ends the controller's loop selects on.
pub struct HaInbox {
    pub events: mpsc::Receiver<cluster::Event>,
    /// A walk's exceptions; `None` when the walk failed.
    pub found: mpsc::Receiver<Option<Exceptions>>,
    pub done: mpsc::Receiver<Done>,
}

/// Exception walks: one at a time, after a ring change and every `sync_interval`.
#[derive(Debug)]
struct Walks {
    walking: bool,
    /// A ring changed since the last walk started.
    due: bool,
    next: Instant,
    /// When the last one ended, what it found, and how long it took.
    last: Option<(Instant, usize, Duration)>,
    started: Instant,
}

/// Walks that peers' greetings call for. A peer whose config differs builds other rings, and
/// this node then shares every live flow with it (`RingView::share_all`), so a greeting calls
/// for a walk when the peer's sameness changed, not for each connection: at most one per peer
/// per `sync_interval`, and the regular walk takes in what that holds back. A peer that
/// reconnects in a loop cannot make this node walk its table in a loop.
#[derive(Debug, Default)]
struct Greetings {
    /// Per peer: whether its config was the same at its last greeting, and when a greeting of
    /// it last called for a walk.
    seen: HashMap<Ipv4Addr, (bool, Option<Instant>)>,
}

impl Greetings {
    /// A greeting from `from` at `now`: whether it calls for a walk now.
    fn walk_due(&mut self, from: Ipv4Addr, same: bool, now: Instant, interval: Duration) -> bool {
        // A peer not heard from yet counts as the same: it adds nothing to share.
        let (was_same, forced) = self.seen.entry(from).or_insert((true, None));
        let changed = std::mem::replace(was_same, same) != same;
        if !changed || forced.is_some_and(|at| now.saturating_duration_since(at) < interval) {
            return false;
        }
        *forced = Some(now);
        true
    }
}

/// A join that took in the exceptions of every node that runs.
const JOINED_ALL: &str = "with every running node's exceptions";

/// Merge jobs the controller hands the merge thread before it waits for some to be done: a
/// peer that sends faster than the table takes its flows is slowed down through TCP.
const MERGE_BACKLOG: usize = 16;

pub struct Ha {
    announcer: Option<Announcer>,
    /// The program is attached (announcing starts only then).
    attached: bool,
    /// Why this node does not forward although it runs (the link is gone, the interface down):
    /// nothing is announced and `dsrlb ping` fails.
    unannounced: Option<String>,
    /// Merge jobs handed to the merge thread and not done yet.
    merges_pending: usize,
    next_repair: Instant,
    cluster: Option<Cluster>,
    events: mpsc::Sender<cluster::Event>,
    found: mpsc::Sender<Option<Exceptions>>,
    merger: std::sync::mpsc::Sender<Job>,
    /// Until every other node has sent its exceptions, or `join_wait` passed: since when, and
    /// who has. Nothing is announced meanwhile (nor withdrawn), and `dsrlb ping` fails.
    joining: Option<(Instant, BTreeSet<Ipv4Addr>)>,
    /// How the last join ended: every running node's exceptions taken in, or `join_wait`
    /// passed without some.
    joined_how: Option<&'static str>,
    walks: Walks,
    greetings: Greetings,
    merges: MergeCounts,
}

impl Ha {
    /// The channels and the merge thread; nothing runs on the network yet ([`Controller::ha_start`]).
    pub fn new(table: Arc<FlowTable>) -> (Self, HaInbox) {
        let (events, events_rx) = mpsc::channel(64);
        let (found, found_rx) = mpsc::channel(1);
        let (done_tx, done) = mpsc::channel(64);
        let merger = exceptions::spawn_merger(table, done_tx);
        let ha = Self {
            announcer: None,
            attached: false,
            unannounced: None,
            merges_pending: 0,
            next_repair: Instant::now() + REPAIR_EVERY,
            cluster: None,
            events,
            found,
            merger,
            joining: None,
            joined_how: None,
            walks: Walks { walking: false, due: true, next: Instant::now(), last: None, started: Instant::now() },
            greetings: Greetings::default(),
            merges: MergeCounts::default(),
        };
        (ha, HaInbox { events: events_rx, found: found_rx, done })
    }
}

/// A digest of what the rings are built from (listeners, their backends, weights, ring size,
/// ring seed): nodes whose digests differ build different rings, and sessions move when the
/// routers move them between such nodes.
#[must_use]
pub fn fingerprint(c: &Config) -> u64 {
    use std::fmt::Write as _;
    let mut s = format!("ring_size {}\n", c.ring_size);
    // The seed's digest, not the seed (the fingerprint crosses the network); none when unseeded,
    // so an unseeded config keeps the fingerprint it had before seeds.
    if let Some(seed) = &c.ring_seed {
        let _ = writeln!(s, "ring_seed {:016x}", seed.digest());
    }
    let mut listeners: Vec<&config::Listener> = c.listeners.iter().collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    for l in listeners {
        // As an IPv4-only config always read (a rolling upgrade keeps its fingerprint).
        let prefix = if l.source_prefix64 { " source_prefix 64" } else { "" };
        let _ = writeln!(s, "listener {} {}:{} {:?}{prefix} {:?}", l.name, l.vip, l.port, l.hash, l.backends);
    }
    for b in &c.backends {
        let _ = writeln!(s, "backend {} {}", b.name, b.weight);
    }
    lb_common::control_checksum(s.as_bytes())
}

/// This node's cluster settings for `c`, if it has a `[cluster]`.
///
/// # Errors
/// When none of the nodes is an address of this host.
pub fn cluster_settings(c: &Config) -> anyhow::Result<Option<cluster::Settings>> {
    let Some(cl) = &c.cluster else { return Ok(None) };
    let me = cluster::find_me(&cl.nodes, &cluster::host_ipv4s()?)?;
    // A live flow is sent again well before the other node's copy would expire.
    let shortest = c.listeners.iter().map(|l| l.flow_idle_timeout).min().unwrap_or(config::DEFAULT_FLOW_IDLE_TIMEOUT);
    let refresh = (shortest / 4).max(cl.sync_interval);
    Ok(Some(cluster::Settings {
        me,
        nodes: cl.nodes.clone(),
        fingerprint: fingerprint(c),
        sync_interval: cl.sync_interval,
        refresh,
        key: cl.key.clone(),
    }))
}

impl Controller {
    /// Starts the announcer and the cluster sync the config asks for. Before the program is
    /// attached: a node joining a cluster takes the others' exceptions into its table first.
    pub(super) fn ha_start(&mut self) -> anyhow::Result<()> {
        if let Some(settings) = cluster_settings(&self.config)? {
            self.ha.cluster = Some(Cluster::start(settings, self.ha.events.clone())?);
            let wait = self.config.cluster.as_ref().map_or(Duration::ZERO, |c| c.join_wait);
            self.ha.joining = (!wait.is_zero()).then(|| (Instant::now(), BTreeSet::new()));
        }
        if self.config.announce.is_some() {
            self.ha.announcer = Some(Announcer::start()?);
        }
        self.ha_after_apply();
        Ok(())
    }

    /// After every apply: a ring may have changed (walk for exceptions), and a listener may
    /// have gained or lost its last usable backend (announce or withdraw its VIP).
    pub(super) fn ha_after_apply(&mut self) {
        self.ha.walks.due = true;
        self.update_announcement();
    }

    /// VIPs with a listener that can take new flows: a backend in its ring. A listener that
    /// fails open (`all_down = "forward"`) counts: its ring then holds every backend with a
    /// weight, as every node's does when all are up, and when every node's checks fail at
    /// once (a shared cause), withdrawing everywhere would take the VIP off the network.
    fn usable_vips(&self) -> BTreeSet<IpAddr> {
        self.desired.listeners.iter().filter(|l| l.ring.iter().any(|&s| s != NO_BACKEND)).map(|l| l.vip).collect()
    }

    /// The program is attached: from now on, what is usable is announced.
    pub(super) fn ha_attached(&mut self) {
        self.ha.attached = true;
        self.update_announcement();
    }

    /// Whether the loop may take another cluster event (the merge thread keeps up).
    pub(super) const fn ha_takes_events(&self) -> bool {
        self.ha.merges_pending < MERGE_BACKLOG
    }

    fn update_announcement(&self) {
        let (Some(a), Some(cfg)) = (&self.ha.announcer, self.config.announce) else { return };
        if !self.ha.attached {
            return;
        }
        // Not forwarding (link or carrier gone): nothing, even while joining. Joining: the
        // kernel keeps what it has (a restarting node stays announced).
        let vips = if self.ha.unannounced.is_some() {
            BTreeSet::new()
        } else if self.ha.joining.is_some() {
            return;
        } else {
            self.usable_vips()
        };
        a.set(announce::Wanted { table: cfg.table, vips });
    }

    /// Every second: the link still attached, the join's deadline, a walk due, repairs.
    pub(super) fn ha_tick(&mut self) {
        if self.ha.attached {
            let why = if !dataplane::link_live(&self.opts.pin_dir, &self.config.interface) {
                Some(format!("the XDP link in {} is no longer attached to {}", self.opts.pin_dir.display(), self.config.interface))
            } else if !dataplane::interface_running(&self.config.interface).unwrap_or(false) {
                Some(format!("{} is down or has no carrier", self.config.interface))
            } else {
                None
            };
            match (&why, &self.ha.unannounced) {
                (Some(w), None) => {
                    tracing::error!(why = %w, "this node no longer forwards: every VIP withdrawn, dsrlb ping fails");
                    self.ha.unannounced = why;
                    self.update_announcement();
                }
                (None, Some(_)) => {
                    tracing::info!("forwarding again: VIPs announced as usable, dsrlb ping answers");
                    self.ha.unannounced = None;
                    self.update_announcement();
                }
                _ => {}
            }
        }
        if self.ha.announcer.is_some() && Instant::now() >= self.ha.next_repair {
            self.ha.next_repair = Instant::now() + REPAIR_EVERY;
            if self.ha.joining.is_none()
                && let Some(a) = &self.ha.announcer
            {
                a.repair();
            }
        }
        if self.ha.joining.is_some() && self.join_missing().is_empty() {
            self.joined(JOINED_ALL);
        }
        if let (Some((since, _)), Some(cl)) = (&self.ha.joining, &self.config.cluster)
            && since.elapsed() >= cl.join_wait
        {
            let missing = self.join_missing();
            tracing::warn!(
                missing = ?missing,
                "joined the cluster without every node's exceptions (join_wait passed): sessions those nodes pinned elsewhere than the \
                 ring may be reset if routed here"
            );
            self.joined("join_wait passed without every node's exceptions");
        }
        if self.ha.cluster.is_some() && (self.ha.walks.due || Instant::now() >= self.ha.walks.next) {
            self.walk_exceptions();
        }
    }

    /// The nodes a joining node still waits for: every other node that has not sent its
    /// exceptions, unless it is down (our connection to it failed, and it has not connected to
    /// us): a node that is not running holds no sessions.
    fn join_missing(&self) -> Vec<Ipv4Addr> {
        let (Some((_, have)), Some(c)) = (&self.ha.joining, &self.ha.cluster) else { return Vec::new() };
        let down: BTreeSet<String> =
            c.peers().into_iter().filter(|p| !p.out_connected && !p.in_connected && p.out_error.is_some()).map(|p| p.node).collect();
        c.settings()
            .nodes
            .iter()
            .filter(|n| n.ip() != c.settings().me.ip() && !have.contains(n.ip()) && !down.contains(&n.to_string()))
            .map(|n| *n.ip())
            .collect()
    }

    fn joined(&mut self, how: &'static str) {
        if let Some((since, _)) = self.ha.joining.take() {
            tracing::info!(after = ?since.elapsed(), how, "joined the cluster");
            self.ha.joined_how = Some(how);
            self.update_announcement();
        }
    }

    /// Starts a walk of the flow table for exceptions, in a thread of its own.
    fn walk_exceptions(&mut self) {
        if self.ha.walks.walking {
            return;
        }
        let now = match self.dp.now_age() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; no exception walk this round");
                return;
            }
        };
        let interval = self.config.cluster.as_ref().map_or(config::DEFAULT_SYNC_INTERVAL, |c| c.sync_interval);
        let w = &mut self.ha.walks;
        w.walking = true;
        w.due = false;
        w.next = Instant::now() + interval;
        w.started = Instant::now();
        let mut view = RingView::new(&self.desired, &self.ids, self.config.ring_size);
        view.share_all = self.ha.cluster.as_ref().is_some_and(|c| c.peers().iter().any(|p| p.config == cluster::PeerConfig::Differs));
        let (config, ids) = (self.config.clone(), self.ids.clone());
        let (table, found) = (self.dp.flow_table_handle(), self.ha.found.clone());
        tokio::task::spawn_blocking(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exceptions::find(&table, &view.with_nominal(&config, &ids), now)));
            let _ = found.blocking_send(result.ok());
        });
    }

    /// A walk ended: every peer gets what it lacks.
    pub(super) fn exceptions_found(&mut self, e: Option<Exceptions>) {
        let w = &mut self.ha.walks;
        w.walking = false;
        let Some(e) = e else {
            tracing::error!("the walk for exceptions failed (a bug: please report it); the next one is due in sync_interval");
            return;
        };
        w.last = Some((Instant::now(), e.len(), w.started.elapsed()));
        if let Some(c) = &self.ha.cluster {
            c.publish(e);
        }
    }

    /// Flows from another node: named by listener and backend, taken in as this node's reals.
    pub(super) fn on_cluster_event(&mut self, event: cluster::Event) {
        match event {
            cluster::Event::Flows { from, group } => {
                let real = group.listener.and_then(|at| {
                    let l = self.config.listeners.iter().find(|l| l.vip == at.ip() && l.port == at.port())?;
                    l.backends.contains(&group.backend).then_some(())?;
                    Some((real_id(self.ids.listeners[&l.name], self.ids.backends[&group.backend]), plan_expire(l), at))
                });
                let Some((real, expire, at)) = real else {
                    tracing::debug!(%from, listener = ?group.listener, backend = %group.backend, "flows for a listener or backend this node does not have");
                    self.ha.merges.unknown += group.entries.len() as u64;
                    return;
                };
                let now = match self.dp.now_age() {
                    Ok(now) => now,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; flows from {from} dropped");
                        return;
                    }
                };
                let seed = self.dp.flow_table_handle().seed();
                let flows = group
                    .entries
                    .iter()
                    .filter(|e| u32::from(e.idle) < expire && e.client.is_ipv6() == at.is_ipv6())
                    .map(|e| {
                        let (key, addrs6) = exceptions::key_of(e.client, at, seed);
                        PeerFlow {
                            key,
                            addrs6,
                            real,
                            closing: e.closing,
                            opened: e.opened,
                            age: now.wrapping_sub(u32::from(e.idle)) & 0xffff,
                        }
                    })
                    .collect();
                if self.ha.merger.send(Job::Merge(Incoming { from, flows, now, expire })).is_ok() {
                    self.ha.merges_pending += 1;
                }
            }
            // A peer whose config differs builds other rings: walk again, sharing every flow
            // while it differs (see `RingView::share_all`), and only the exceptions after.
            cluster::Event::Greeted { from, same } => {
                if !same {
                    tracing::warn!(peer = %from, "a node's config differs from this one's: sharing every live flow until they agree");
                }
                let interval = self.config.cluster.as_ref().map_or(config::DEFAULT_SYNC_INTERVAL, |c| c.sync_interval);
                if self.ha.greetings.walk_due(from, same, Instant::now(), interval) {
                    self.ha.walks.due = true;
                }
            }
            cluster::Event::Synced { from } => {
                if self.ha.merger.send(Job::Synced(from)).is_ok() {
                    self.ha.merges_pending += 1;
                }
            }
        }
    }

    #[expect(clippy::needless_pass_by_value, reason = "taken from the channel whole")]
    pub(super) fn on_merge_done(&mut self, done: Done) {
        self.ha.merges_pending = self.ha.merges_pending.saturating_sub(1);
        match done {
            Done::Merged(c) => {
                self.ha.merges.add(&c);
                if c.inserted > 0 {
                    self.flows.forget();
                }
            }
            Done::Synced(from) => {
                if let Some((_, have)) = &mut self.ha.joining {
                    have.insert(from);
                    if self.join_missing().is_empty() {
                        self.joined(JOINED_ALL);
                    }
                }
            }
        }
    }

    /// Why `dsrlb ping` must fail for keepalived: still joining, or not forwarding.
    pub(super) fn ha_not_ready(&self) -> Option<String> {
        if let Some(why) = &self.ha.unannounced {
            return Some(why.clone());
        }
        let (since, _) = self.ha.joining.as_ref()?;
        let wait = self.config.cluster.as_ref().map_or(Duration::ZERO, |c| c.join_wait);
        Some(format!(
            "joining the cluster: waiting for the exceptions of {:?} (at most {} s more)",
            self.join_missing(),
            wait.saturating_sub(since.elapsed()).as_secs()
        ))
    }

    /// `announce` and `cluster` for `dsrlb status`.
    pub(super) fn ha_status(&self) -> (Option<AnnounceStatus>, Option<ClusterStatus>) {
        let announce = self.config.announce.map(|cfg| {
            let held = self.ha.announcer.as_ref().map(Announcer::held).unwrap_or_default();
            let usable = self.usable_vips();
            let vips: BTreeSet<IpAddr> = self.config.listeners.iter().map(|l| l.vip).collect();
            let vips = vips
                .into_iter()
                .map(|vip| {
                    let why = if let Some(u) = &self.ha.unannounced {
                        u.clone()
                    } else if self.ha.joining.is_some() {
                        "joining the cluster: left as it was".to_owned()
                    } else if usable.contains(&vip) {
                        "a listener has a usable backend".to_owned()
                    } else {
                        "no listener on it has a usable backend".to_owned()
                    };
                    VipStatus { vip, announced: held.vips.contains(&vip), why }
                })
                .collect();
            AnnounceStatus { table: cfg.table, vips, error: held.error }
        });
        let cluster = self.ha.cluster.as_ref().map(|c| ClusterStatus {
            me: c.settings().me.to_string(),
            insecure: c.settings().key.is_none(),
            joined: self.ha.joining.is_none(),
            joined_how: self.ha.joined_how.map(str::to_owned),
            fingerprint: format!("{:016x}", c.settings().fingerprint),
            last_walk: self.ha.walks.last.map(|(at, n, took)| LastWalk {
                exceptions: n,
                ago_s: at.elapsed().as_secs(),
                took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            }),
            merged: self.ha.merges,
            peers: c.peers(),
        });
        (announce, cluster)
    }

    /// Applies a reload's `[announce]` and `[cluster]` (the config is already the new one;
    /// `settings` were computed from it before anything changed). A cluster whose settings
    /// changed restarts its connections (its peers get everything again) on the same socket; a
    /// new address that cannot be bound fails the reload, and the old settings stay.
    pub(super) fn ha_reconfigure(&mut self, settings: Option<cluster::Settings>) -> anyhow::Result<()> {
        let changed = self.ha.cluster.as_ref().map(|c| c.settings().clone()) != settings;
        match (&mut self.ha.cluster, settings) {
            (Some(c), Some(new)) => c.reconfigure(new).context("the cluster sync with the new settings")?,
            (None, Some(new)) => self.ha.cluster = Some(Cluster::start(new, self.ha.events.clone())?),
            (Some(_), None) => {
                self.ha.cluster = None;
                self.ha.joining = None;
            }
            (None, None) => {}
        }
        if changed {
            self.ha.walks.due = true;
        }
        match (self.config.announce, &self.ha.announcer) {
            (Some(_), None) => self.ha.announcer = Some(Announcer::start()?),
            // [announce] removed: the same reconciler withdraws everything (and would announce
            // again in order if a later reload put the section back).
            (None, Some(a)) => a.set(announce::Wanted { table: config::DEFAULT_ANNOUNCE_TABLE, vips: BTreeSet::new() }),
            _ => {}
        }
        self.update_announcement();
        Ok(())
    }

    /// On the way out. `dsrlb stop`: withdraw every VIP, then wait until the listeners see no
    /// packet for [`QUIET`] (the routers have moved the traffic), at most `withdraw_wait`, so
    /// that detaching drops nothing the routers still send here. Otherwise the routes stay:
    /// forwarding continues from the pins.
    pub(super) async fn ha_shutdown(&mut self) {
        self.ha.cluster = None;
        let Some(a) = self.ha.announcer.take() else { return };
        if !self.stopping {
            a.leave();
            return;
        }
        if self.config.announce.is_none() {
            // [announce] was removed by a reload: its routes are withdrawn already, and no
            // router steers traffic here by them, so there is nothing to wait for.
            if let Err(e) = a.withdraw_all().await {
                tracing::error!(error = %format!("{e:#}"), "dsrlb stop: withdrawing the VIPs failed");
            }
            return;
        }
        match a.withdraw_all().await {
            Ok(n) => tracing::info!(withdrawn = n, "dsrlb stop: VIPs withdrawn; waiting for the traffic to stop before detaching"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "dsrlb stop: withdrawing the VIPs failed"),
        }
        let wait = self.config.announce.map_or(config::DEFAULT_WITHDRAW_WAIT, |a| a.withdraw_wait);
        let started = Instant::now();
        let packets = |c: &Self| c.dp.stats().map_or(0, |s| s.total().packets);
        let (mut last, mut since) = (packets(self), Instant::now());
        while started.elapsed() < wait && since.elapsed() < QUIET {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = packets(self);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        tracing::info!(after = ?started.elapsed(), quiet = since.elapsed() >= QUIET, "dsrlb stop: detaching");
    }
}

fn plan_expire(l: &config::Listener) -> u32 {
    crate::plan::expire_units(l.flow_idle_timeout)
}

/// Withdraws every route dsrlb announced (any table), for `dsrlb stop` with no controller
/// running; returns how many there were.
///
/// # Errors
/// When netlink fails.
pub async fn withdraw_without_controller() -> anyhow::Result<usize> {
    let handle = crate::netlink::connect()?;
    announce::withdraw_all(&handle).await.context("withdrawing the VIPs")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greetings call for walks by what changed, not by how many came: a peer that reconnects
    /// in a loop (with its config the same, or flipping between same and different) makes
    /// this node walk its flow table once per `sync_interval` at most.
    #[test]
    fn a_peer_that_reconnects_in_a_loop_cannot_make_the_cluster_walk_in_a_loop() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 3), Ipv4Addr::new(192, 0, 2, 4));
        let interval = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut g = Greetings::default();
        let walks = |g: &mut Greetings, from, same: &dyn Fn(u32) -> bool, at: Instant| {
            (0..1000).filter(|i| g.walk_due(from, same(*i), at + Duration::from_millis(u64::from(*i)), interval)).count()
        };
        assert_eq!(walks(&mut g, a, &|_| true, t0), 0, "greetings of the same config call for no walk");
        assert_eq!(walks(&mut g, a, &|_| false, t0), 1, "a config that turned different calls for one walk");
        assert_eq!(walks(&mut g, a, &|i| i % 2 == 0, t0 + Duration::from_secs(1)), 0, "flipping within sync_interval: none more");
        assert_eq!(walks(&mut g, b, &|_| false, t0), 1, "another peer's change is its own");
        let later = t0 + interval + Duration::from_secs(1);
        assert_eq!(walks(&mut g, a, &|_| true, later), 1, "agreeing again, after sync_interval: one walk");
        assert_eq!(walks(&mut g, a, &|i| i % 2 == 1, later + interval), 1, "flipping for another sync_interval: one walk");
    }

    const CONFIG: &str = "interface = \"eth0\"\n[[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n\
                          [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\n[[backend]]\nname = \"b2\"\naddress = \"192.0.2.12\"\n";

    /// Nodes with different ring seeds build different rings: their fingerprints differ, so each
    /// sees the other's config differ. Unseeded, the fingerprint is the one dsrlb computed before
    /// seeds (a rolling upgrade keeps "config same").
    #[test]
    fn the_fingerprint_covers_the_ring_seed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("dsrlb-fingerprint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let seeded = |secret: &str| {
            let p = dir.join(secret);
            std::fs::write(&p, secret).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            config::parse(&format!("ring_seed_file = {p:?}\n{CONFIG}"), "t.toml").expect("valid")
        };
        let unseeded = config::parse(CONFIG, "t.toml").expect("valid");
        assert_eq!(fingerprint(&unseeded), 0x1157_597f_ca88_e77e, "the unseeded fingerprint changed");
        let (a, a_again, b) = (seeded("seed-a-0123456789abcdef"), seeded("seed-a-0123456789abcdef"), seeded("seed-b-0123456789abcdef"));
        assert_eq!(fingerprint(&a), fingerprint(&a_again), "the same seed");
        assert_ne!(fingerprint(&a), fingerprint(&b), "two seeds");
        assert_ne!(fingerprint(&a), fingerprint(&unseeded), "a seed and none");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
