//! The flows this node shares with the other nodes (`[cluster]`, see `crate::cluster` and
//! `crate::exceptions`): the sync's connections, the walks for exceptions, the merges of what
//! peers send, and the join that waits for their exceptions before the node announces.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    cluster::{self, Cluster, Exceptions, PeerConfig},
    config::{self, Config},
    control::status::{ClusterStatus, LastWalk},
    exceptions::{self, Done, Incoming, Job, MergeCounts, RingView},
    flow_table::FlowTable,
    plan::Ids,
};

/// The receiving ends the controller's loop selects on.
pub struct ClusterInbox {
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

/// The cluster sync, while `[cluster]` asks for one, and the walks, merges and join around it.
pub struct ClusterLink {
    /// The flow table the merge thread writes (and whose copies' lag the settings give).
    table: Arc<FlowTable>,
    cluster: Option<Cluster>,
    events: mpsc::Sender<cluster::Event>,
    found: mpsc::Sender<Option<Exceptions>>,
    merger: std::sync::mpsc::Sender<Job>,
    /// Merge jobs handed to the merge thread and not done yet.
    merges_pending: usize,
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

impl ClusterLink {
    /// The channels and the merge thread; nothing runs on the network yet ([`Self::start`]).
    pub fn new(table: Arc<FlowTable>) -> (Self, ClusterInbox) {
        let (events, events_rx) = mpsc::channel(64);
        let (found, found_rx) = mpsc::channel(1);
        let (done_tx, done) = mpsc::channel(64);
        let merger = exceptions::spawn_merger(Arc::clone(&table), done_tx);
        let link = Self {
            table,
            cluster: None,
            events,
            found,
            merger,
            merges_pending: 0,
            joining: None,
            joined_how: None,
            walks: Walks { walking: false, due: true, next: Instant::now(), last: None, started: Instant::now() },
            greetings: Greetings::default(),
            merges: MergeCounts::default(),
        };
        (link, ClusterInbox { events: events_rx, found: found_rx, done })
    }

    /// Starts the sync with `settings` (none without `[cluster]`); a node joins, waiting up to
    /// `join_wait` for the others' exceptions.
    pub fn start(&mut self, settings: Option<cluster::Settings>, join_wait: Duration) -> anyhow::Result<()> {
        self.table.set_peer_lag(peer_lag(settings.as_ref()));
        if let Some(settings) = settings {
            self.cluster = Some(Cluster::start(settings, self.events.clone())?);
            self.joining = (!join_wait.is_zero()).then(|| (Instant::now(), BTreeSet::new()));
        }
        Ok(())
    }

    /// Whether the loop may take another cluster event (the merge thread keeps up).
    pub const fn takes_events(&self) -> bool {
        self.merges_pending < MERGE_BACKLOG
    }

    /// Still waiting for the other nodes' exceptions.
    pub const fn joining(&self) -> bool {
        self.joining.is_some()
    }

    /// A ring may have changed: walk for exceptions.
    pub fn ring_changed(&mut self) {
        self.walks.due = true;
    }

    /// The nodes a joining node still waits for: every other node that has not sent its
    /// exceptions, unless it is down (our connection to it failed, and it has not connected to
    /// us): a node that is not running holds no sessions.
    fn join_missing(&self) -> Vec<Ipv4Addr> {
        let (Some((_, have)), Some(c)) = (&self.joining, &self.cluster) else { return Vec::new() };
        let down: BTreeSet<String> =
            c.peers().into_iter().filter(|p| !p.out_connected && !p.in_connected && p.out_error.is_some()).map(|p| p.node).collect();
        c.settings()
            .nodes
            .iter()
            .filter(|n| n.ip() != c.settings().me.ip() && !have.contains(n.ip()) && !down.contains(&n.to_string()))
            .map(|n| *n.ip())
            .collect()
    }

    /// Ends the join; returns whether one ended (the announcement follows).
    fn joined(&mut self, how: &'static str) -> bool {
        let Some((since, _)) = self.joining.take() else { return false };
        tracing::info!(after = ?since.elapsed(), how, "joined the cluster");
        self.joined_how = Some(how);
        true
    }

    /// Every second: the join ends when every node's exceptions are in or `join_wait` has
    /// passed; returns whether it ended now.
    pub fn tick_join(&mut self, join_wait: Option<Duration>) -> bool {
        let mut ended = false;
        if self.joining.is_some() && self.join_missing().is_empty() {
            ended |= self.joined(JOINED_ALL);
        }
        if let (Some((since, _)), Some(wait)) = (&self.joining, join_wait)
            && since.elapsed() >= wait
        {
            let missing = self.join_missing();
            tracing::warn!(
                missing = ?missing,
                "joined the cluster without every node's exceptions (join_wait passed): sessions those nodes pinned elsewhere than the \
                 ring may be reset if routed here"
            );
            ended |= self.joined("join_wait passed without every node's exceptions");
        }
        ended
    }

    /// Whether a walk for exceptions is due: a ring changed, or `sync_interval` passed.
    pub fn walk_due(&self) -> bool {
        self.cluster.is_some() && !self.walks.walking && (self.walks.due || Instant::now() >= self.walks.next)
    }

    /// Starts a walk of `table` for exceptions at age `now`, in a thread of its own: flows that
    /// `view` (the rings of `config` and `ids`) would not pick, and every flow while a peer's
    /// config differs. The next is due in `interval`.
    pub fn walk(&mut self, table: Arc<FlowTable>, now: u32, mut view: RingView, (config, ids): (Config, Ids), interval: Duration) {
        let w = &mut self.walks;
        w.walking = true;
        w.due = false;
        w.next = Instant::now() + interval;
        w.started = Instant::now();
        view.share_all = self.cluster.as_ref().is_some_and(|c| c.peers().iter().any(|p| p.config == PeerConfig::Differs));
        let found = self.found.clone();
        tokio::task::spawn_blocking(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exceptions::find(&table, &view.with_nominal(&config, &ids), now)));
            let _ = found.blocking_send(result.ok());
        });
    }

    /// A walk ended: every peer gets what it lacks.
    pub fn found(&mut self, e: Option<Exceptions>) {
        let w = &mut self.walks;
        w.walking = false;
        let Some(e) = e else {
            tracing::error!("the walk for exceptions failed (a bug: please report it); the next one is due in sync_interval");
            return;
        };
        w.last = Some((Instant::now(), e.len(), w.started.elapsed()));
        if let Some(c) = &self.cluster {
            c.publish(e);
        }
    }

    /// Flows from a peer, named as this node's reals, to the merge thread.
    pub fn merge(&mut self, incoming: Incoming) {
        if self.merger.send(Job::Merge(incoming)).is_ok() {
            self.merges_pending += 1;
        }
    }

    /// Flows from a peer for a listener or backend this node does not have.
    pub fn unknown(&mut self, flows: usize) {
        self.merges.unknown += flows as u64;
    }

    /// A peer greeted (at flow clock age `now`, `None` when the clock could not be read: noted
    /// in the table after the merges before it); a peer whose config differs builds other
    /// rings: walk again, sharing every flow while it differs (see `RingView::share_all`), and
    /// only the exceptions after.
    pub fn greeted(&mut self, from: Ipv4Addr, same: bool, interval: Duration, now: Option<u32>) {
        // Not counted as pending: the merge thread reports nothing for it.
        let _ = self.merger.send(Job::Connected(from, now));
        if !same {
            tracing::warn!(peer = %from, "a node's config differs from this one's: sharing every live flow until they agree");
        }
        if self.greetings.walk_due(from, same, Instant::now(), interval) {
            self.walks.due = true;
        }
    }

    /// A peer has sent a whole round (after the merges before it), taken in at flow clock age
    /// `now` (`None`: the clock could not be read; the round is not noted in the table).
    pub fn synced(&mut self, from: Ipv4Addr, now: Option<u32>) {
        if self.merger.send(Job::Synced(from, now)).is_ok() {
            self.merges_pending += 1;
        }
    }

    /// The merge thread finished a job: returns whether flows were inserted (the live counts
    /// are stale) and whether the join ended.
    pub fn merge_done(&mut self, done: &Done) -> (bool, bool) {
        self.merges_pending = self.merges_pending.saturating_sub(1);
        match done {
            Done::Merged(c) => {
                self.merges.add(c);
                (c.inserted > 0, false)
            }
            Done::Synced(from) => {
                let Some((_, have)) = &mut self.joining else { return (false, false) };
                have.insert(*from);
                (false, self.join_missing().is_empty() && self.joined(JOINED_ALL))
            }
        }
    }

    /// Why `dsrlb ping` must fail while joining (for at most `join_wait`).
    pub fn not_ready(&self, join_wait: Duration) -> Option<String> {
        let (since, _) = self.joining.as_ref()?;
        Some(format!(
            "joining the cluster: waiting for the exceptions of {:?} (at most {} s more)",
            self.join_missing(),
            join_wait.saturating_sub(since.elapsed()).as_secs()
        ))
    }

    /// `cluster` for `dsrlb status`.
    pub fn status(&self) -> Option<ClusterStatus> {
        let c = self.cluster.as_ref()?;
        Some(ClusterStatus {
            me: c.settings().me.to_string(),
            insecure: c.settings().key.is_none(),
            joined: self.joining.is_none(),
            joined_how: self.joined_how.map(str::to_owned),
            fingerprint: format!("{:016x}", c.settings().fingerprint),
            last_walk: self.walks.last.map(|(at, n, took)| LastWalk {
                exceptions: n,
                ago_s: at.elapsed().as_secs(),
                took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            }),
            merged: self.merges,
            peers: c.peers(),
        })
    }

    /// Applies a reload's `[cluster]` (`settings` computed from the new config before anything
    /// changed). A cluster whose settings changed restarts its connections (its peers get
    /// everything again) on the same socket; a new address that cannot be bound fails the
    /// reload, and the old settings stay.
    pub fn reconfigure(&mut self, settings: Option<cluster::Settings>) -> anyhow::Result<()> {
        let changed = self.cluster.as_ref().map(|c| c.settings().clone()) != settings;
        let lag = peer_lag(settings.as_ref());
        match (&mut self.cluster, settings) {
            (Some(c), Some(new)) => anyhow::Context::context(c.reconfigure(new), "the cluster sync with the new settings")?,
            (None, Some(new)) => self.cluster = Some(Cluster::start(new, self.events.clone())?),
            (Some(_), None) => {
                self.cluster = None;
                self.joining = None;
            }
            (None, None) => {}
        }
        if changed {
            self.walks.due = true;
        }
        self.table.set_peer_lag(lag);
        Ok(())
    }

    /// Stops the sync (on the way out).
    pub fn stop(&mut self) {
        self.cluster = None;
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

/// How much more recent than a peer's last word on a flow its frames may be, in flow-clock
/// units (0 without a cluster): a live flow is sent again `refresh` after it was, in the first
/// round after that (rounds are `sync_interval` apart), from a walk up to `sync_interval` old.
fn peer_lag(settings: Option<&cluster::Settings>) -> u32 {
    settings.map_or(0, |s| {
        let lag = s.refresh + s.sync_interval * 2;
        lb_common::age_units(lag.as_secs() + u64::from(lag.subsec_nanos() > 0)) + 1
    })
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
