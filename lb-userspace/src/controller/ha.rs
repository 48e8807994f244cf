//! The controller's part in a multi-node deployment: what this node announces to the routers
//! (`[announce]`, see `crate::announce`) and the flows it shares with the other nodes
//! (`[cluster]`, see `crate::cluster` and `crate::exceptions`).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::{NO_BACKEND, real_id};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Controller;
use crate::{
    announce::{self, Announcer},
    cluster::{self, Cluster, Exceptions},
    config::{self, Config},
    dataplane,
    exceptions::{self, Done, Incoming, Job, MergeCounts, RingView},
    flow_table::FlowTable,
};

/// How often the announced routes are put back if someone removed them.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// After `dsrlb stop` withdraws the VIPs: the listeners must see no packet this long before
/// the program is detached (the routers have moved the traffic elsewhere).
const QUIET: Duration = Duration::from_secs(1);

/// The receiving ends the controller's loop selects on.
pub struct HaInbox {
    pub events: mpsc::Receiver<cluster::Event>,
    pub found: mpsc::Receiver<Exceptions>,
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

pub struct Ha {
    announcer: Option<Announcer>,
    /// Why nothing is announced although `[announce]` is configured (the link is gone).
    unannounced: Option<String>,
    next_repair: Instant,
    cluster: Option<Cluster>,
    events: mpsc::Sender<cluster::Event>,
    found: mpsc::Sender<Exceptions>,
    merger: std::sync::mpsc::Sender<Job>,
    /// Until every other node has sent its exceptions, or `join_wait` passed: since when, and
    /// who has. Nothing is announced meanwhile (nor withdrawn), and `dsrlb ping` fails.
    joining: Option<(Instant, BTreeSet<Ipv4Addr>)>,
    walks: Walks,
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
            unannounced: None,
            next_repair: Instant::now() + REPAIR_EVERY,
            cluster: None,
            events,
            found,
            merger,
            joining: None,
            walks: Walks { walking: false, due: true, next: Instant::now(), last: None, started: Instant::now() },
            merges: MergeCounts::default(),
        };
        (ha, HaInbox { events: events_rx, found: found_rx, done })
    }
}

/// A digest of what the rings are built from (listeners, their backends, weights, ring size):
/// nodes whose digests differ build different rings, and sessions move when the routers move
/// them between such nodes.
#[must_use]
pub fn fingerprint(c: &Config) -> u64 {
    use std::fmt::Write as _;
    let mut s = format!("ring_size {}\n", c.ring_size);
    let mut listeners: Vec<&config::Listener> = c.listeners.iter().collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    for l in listeners {
        let _ = writeln!(s, "listener {} {}:{} {:?} {:?}", l.name, l.vip, l.port, l.hash, l.backends);
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
    Ok(Some(cluster::Settings { me, nodes: cl.nodes.clone(), fingerprint: fingerprint(c), sync_interval: cl.sync_interval, refresh }))
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

    /// VIPs with a listener that can take new flows: a backend in its ring, and not failing
    /// open (then this node's checks are likelier broken than every broker: let the nodes
    /// whose checks pass take the traffic).
    fn usable_vips(&self) -> BTreeSet<Ipv4Addr> {
        self.desired.listeners.iter().filter(|l| !l.fail_open && l.ring.iter().any(|&s| s != NO_BACKEND)).map(|l| l.vip).collect()
    }

    fn update_announcement(&self) {
        let (Some(a), Some(cfg)) = (&self.ha.announcer, self.config.announce) else { return };
        if self.ha.joining.is_some() {
            return; // the kernel keeps what it has (a restarting node stays announced)
        }
        let vips = if self.ha.unannounced.is_some() { BTreeSet::new() } else { self.usable_vips() };
        a.set(announce::Wanted { table: cfg.table, vips });
    }

    /// Every second: the link still attached, the join's deadline, a walk due, repairs.
    pub(super) fn ha_tick(&mut self) {
        if self.ha.announcer.is_some() {
            let live = dataplane::link_live(&self.opts.pin_dir, &self.config.interface);
            if !live && self.ha.unannounced.is_none() {
                let why = format!("the XDP link in {} is no longer attached to {}", self.opts.pin_dir.display(), self.config.interface);
                tracing::error!(%why, "withdrawing every VIP: this node no longer forwards");
                self.ha.unannounced = Some(why);
                self.update_announcement();
            } else if live && self.ha.unannounced.is_some() {
                self.ha.unannounced = None;
                self.update_announcement();
            }
            if Instant::now() >= self.ha.next_repair {
                self.ha.next_repair = Instant::now() + REPAIR_EVERY;
                if self.ha.joining.is_none()
                    && let Some(a) = &self.ha.announcer
                {
                    a.repair();
                }
            }
        }
        if self.ha.joining.is_some() && self.join_missing().is_empty() {
            self.joined();
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
            self.joined();
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

    fn joined(&mut self) {
        if let Some((since, _)) = self.ha.joining.take() {
            tracing::info!(after = ?since.elapsed(), "joined the cluster");
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
        let view = RingView::new(&self.desired, &self.ids, self.config.ring_size);
        let (table, found) = (self.dp.flow_table_handle(), self.ha.found.clone());
        tokio::task::spawn_blocking(move || {
            let _ = found.blocking_send(exceptions::find(&table, &view, now));
        });
    }

    /// A walk ended: every peer gets what it lacks.
    pub(super) fn exceptions_found(&mut self, e: Exceptions) {
        let w = &mut self.ha.walks;
        w.walking = false;
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
                    let l = self.config.listeners.iter().find(|l| l.vip == *at.ip() && l.port == at.port())?;
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
                let flows = group
                    .entries
                    .iter()
                    .filter(|e| u32::from(e.idle) < expire)
                    .map(|e| (exceptions::key_of(e.client, at), e.closing, now.wrapping_sub(u32::from(e.idle)) & 0xffff))
                    .collect();
                let _ = self.ha.merger.send(Job::Merge(Incoming { real, flows, now, expire }));
            }
            cluster::Event::Synced { from } => {
                let _ = self.ha.merger.send(Job::Synced(from));
            }
        }
    }

    #[expect(clippy::needless_pass_by_value, reason = "taken from the channel whole")]
    pub(super) fn on_merge_done(&mut self, done: Done) {
        match done {
            Done::Merged(c) => {
                self.ha.merges.add(&c);
                if c.inserted > 0 {
                    self.live_flows = None;
                }
            }
            Done::Synced(from) => {
                if let Some((_, have)) = &mut self.ha.joining {
                    have.insert(from);
                    if self.join_missing().is_empty() {
                        self.joined();
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
    pub(super) fn ha_status(&self) -> Value {
        let announce = self.config.announce.map(|cfg| {
            let held = self.ha.announcer.as_ref().map(Announcer::held).unwrap_or_default();
            let usable = self.usable_vips();
            let vips: BTreeSet<Ipv4Addr> = self.config.listeners.iter().map(|l| l.vip).collect();
            let vips: Vec<Value> = vips
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
                    json!({ "vip": vip.to_string(), "announced": held.vips.contains(&vip), "why": why })
                })
                .collect();
            json!({ "table": cfg.table, "vips": vips, "error": held.error })
        });
        let cluster = self.ha.cluster.as_ref().map(|c| {
            let last = self.ha.walks.last.map(|(at, n, took)| {
                json!({ "exceptions": n, "ago_s": at.elapsed().as_secs(), "took_ms": u64::try_from(took.as_millis()).unwrap_or(u64::MAX) })
            });
            json!({
                "me": c.settings().me.to_string(),
                "joined": self.ha.joining.is_none(),
                "fingerprint": format!("{:016x}", c.settings().fingerprint),
                "last_walk": last,
                "merged": self.ha.merges,
                "peers": c.peers(),
            })
        });
        json!({ "announce": announce, "cluster": cluster })
    }

    /// For the metrics: (VIP, announced) and the peers, exceptions, merges.
    pub(super) fn ha_metrics(&self, s: &mut crate::metrics::Snapshot) {
        if let Some(a) = &self.ha.announcer {
            let held = a.held();
            let vips: BTreeSet<Ipv4Addr> = self.config.listeners.iter().map(|l| l.vip).collect();
            s.announced = vips.into_iter().map(|v| (v.to_string(), held.vips.contains(&v))).collect();
        }
        if let Some(c) = &self.ha.cluster {
            s.peers = c.peers();
            s.exceptions = self.ha.walks.last.map(|(_, n, _)| n as u64);
            s.merges = Some(self.ha.merges);
            s.joined = Some(self.ha.joining.is_none());
        }
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
        match (self.config.announce, self.ha.announcer.is_some()) {
            (Some(_), false) => self.ha.announcer = Some(Announcer::start()?),
            (None, true) => {
                if let Some(a) = self.ha.announcer.take() {
                    tokio::spawn(async move {
                        if let Err(e) = a.withdraw_all().await {
                            tracing::error!(error = %format!("{e:#}"), "withdrawing the VIPs after [announce] was removed failed");
                        }
                    });
                }
            }
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
