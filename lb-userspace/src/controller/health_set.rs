//! The controller's health checks: a [`PairHealth`] per (listener, backend) pair of the config,
//! the probe tasks and their DSR probe routes, and the down set the maps were last written with.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_rustls::rustls::ClientConfig;

use crate::{
    config::{self, CheckKind, Config, OnDown},
    health::{self, LogLimit, Outcome, PairHealth, Report, State},
    plan::{DownSet, Ids, Out},
    probe_route::{self, ProbeRoutes},
};

/// A (listener, backend) pair, by name.
pub type Pair = (String, String);

/// At most one log line this often for probes that fail on this host's side (status and the
/// metrics count every one).
const LOCAL_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Probe tasks and routes to start, with everything that can fail already done.
pub struct ProbePlan {
    targets: BTreeMap<Pair, health::Target>,
    routes: probe_route::Wanted,
}

/// Every pair's health, the probes that feed it, and the down set last applied.
pub struct HealthSet {
    pairs: BTreeMap<Pair, PairHealth>,
    probes: BTreeMap<Pair, (health::Target, JoinHandle<()>)>,
    reports: mpsc::Sender<Report>,
    /// Taken on the way out, to clear.
    routes: Option<ProbeRoutes>,
    /// The down set the maps were last written with: a pair whose grace ran out since changes
    /// it, and the next tick applies.
    applied_down: DownSet,
    /// Probes that could not be made on this host's side, logged at most this often.
    local_errors_log: LogLimit,
}

impl HealthSet {
    /// No pairs yet; the probes report to `reports` and route through `routes`.
    pub fn new(reports: mpsc::Sender<Report>, routes: Option<ProbeRoutes>) -> Self {
        Self {
            pairs: BTreeMap::new(),
            probes: BTreeMap::new(),
            reports,
            routes,
            applied_down: DownSet::new(),
            local_errors_log: LogLimit::new(LOCAL_ERROR_LOG_EVERY),
        }
    }

    /// The pair's health (every pair of the config has one after [`Self::sync`]).
    pub fn get(&self, pair: &Pair) -> Option<&PairHealth> {
        self.pairs.get(pair)
    }

    /// Every pair's health, to put back with [`Self::put_back`] when a reload fails.
    pub fn keep(&self) -> BTreeMap<Pair, PairHealth> {
        self.pairs.clone()
    }

    pub fn put_back(&mut self, pairs: BTreeMap<Pair, PairHealth>) {
        self.pairs = pairs;
    }

    fn config_pairs(config: &Config) -> impl Iterator<Item = (Pair, &config::Health)> {
        config.listeners.iter().flat_map(|l| l.health.iter().map(move |(b, h)| ((l.name.clone(), b.clone()), h)))
    }

    /// Health entries for every pair of `config`: existing ones keep their state, unchecked
    /// pairs are always up, removed pairs go.
    pub fn sync(&mut self, config: &Config) {
        self.pairs = self.synced(config);
    }

    /// The pairs as [`Self::sync`] would leave them for `config`, for [`Self::put_back`].
    pub fn synced(&self, config: &Config) -> BTreeMap<Pair, PairHealth> {
        Self::config_pairs(config)
            .map(|(p, h)| {
                let kept = self.pairs.get(&p).filter(|_| h.check != CheckKind::None).cloned();
                let health = kept.unwrap_or_else(|| PairHealth::new(h));
                (p, health)
            })
            .collect()
    }

    /// Puts back the states a previous controller saved: (listener id, backend id, state) of
    /// every pair not up, named through `ids`.
    pub fn restore(&mut self, out: &[(u32, u32, State)], ids: &Ids) {
        for &(lid, bid, state) in out {
            let (l, b) = (name_of(&ids.listeners, lid), name_of(&ids.backends, bid));
            if let Some(h) = l.zip(b).and_then(|pair| self.pairs.get_mut(&pair)) {
                h.restore(state);
            }
        }
    }

    /// What the next controller needs to restore: every pair not up, by ids.
    pub fn out(&self, ids: &Ids) -> Vec<(u32, u32, State)> {
        self.pairs
            .iter()
            .filter(|(_, h)| h.state != State::Up)
            .filter_map(|((l, b), h)| Some((*ids.listeners.get(l)?, *ids.backends.get(b)?, h.state)))
            .collect()
    }

    /// Probe tasks and DSR probe routes for every checked pair of `config` (ids from `ids`,
    /// client ids naming `node`), with everything that can fail (TLS files) done:
    /// [`Self::start`] then cannot fail.
    pub fn plan(config: &Config, ids: &Ids, node: &str) -> anyhow::Result<ProbePlan> {
        let mut targets: BTreeMap<Pair, health::Target> = BTreeMap::new();
        let mut routes = probe_route::Wanted::new();
        let mut tls_cache: BTreeMap<PathBuf, Arc<ClientConfig>> = BTreeMap::new();
        for l in &config.listeners {
            for (b, h) in &l.health {
                if h.check == CheckKind::None {
                    continue;
                }
                let backend = config.backend(b).context("pair names a known backend")?;
                let id = *ids.backends.get(b).with_context(|| format!("backend {b}: no id"))?;
                let tls = match &h.tls_ca {
                    Some(ca) if h.check.tls() => Some(if let Some(c) = tls_cache.get(ca) {
                        c.clone()
                    } else {
                        let c = crate::tls::client_config(ca).with_context(|| format!("listener {}: tls_ca", l.name))?;
                        tls_cache.insert(ca.clone(), c.clone());
                        c
                    }),
                    _ => None,
                };
                let address = backend.address_for(l.vip).with_context(|| format!("backend {b}: no address of {}'s family", l.vip))?;
                if h.vip_check {
                    routes.entry(id).or_default().insert((l.vip, address, backend.forward != crate::config::Forward::L2));
                }
                targets.insert(
                    (l.name.clone(), b.clone()),
                    health::Target {
                        listener: l.name.clone(),
                        backend: b.clone(),
                        real: SocketAddr::new(address, l.port),
                        vip: SocketAddr::new(l.vip, l.port),
                        mark: probe_route::mark(id),
                        health: h.clone(),
                        client_id: format!("dsrlb-hc-{node}-{}-{b}", l.name),
                        tls,
                    },
                );
            }
        }
        Ok(ProbePlan { targets, routes })
    }

    /// Starts the planned probes (changed settings restart a task, removed pairs stop theirs) and
    /// installs their routes; a route the kernel refuses is a warning (the pair's VIP checks
    /// fail, and the listener fails open if that takes every backend out).
    pub fn start(&mut self, plan: ProbePlan) {
        let ProbePlan { targets: wanted, routes } = plan;
        if let Some(r) = &self.routes {
            r.set(routes);
        }
        let stale: Vec<Pair> =
            self.probes.iter().filter(|(p, (t, _))| wanted.get(*p).is_none_or(|w| !same_target(w, t))).map(|(p, _)| p.clone()).collect();
        for p in stale {
            if let Some((_, task)) = self.probes.remove(&p) {
                task.abort();
            }
        }
        for (p, t) in wanted {
            if !self.probes.contains_key(&p) {
                let task = tokio::spawn(health::supervise(t.clone(), self.reports.clone()));
                self.probes.insert(p, (t, task));
            }
        }
    }

    /// The pairs out of their rings, and whether their flows are re-picked: a pair marked down
    /// resets its flows only with `on_down = "reset"` and once `on_down_grace` has passed; a
    /// refusing broker (CONNACK 3) keeps its sessions.
    pub fn down_set(&self, config: &Config) -> DownSet {
        down_set(&self.pairs, config)
    }
    /// The down set the maps were last written with.
    pub const fn applied_down(&self) -> &DownSet {
        &self.applied_down
    }

    /// The maps were written with `down`.
    pub fn applied(&mut self, down: DownSet) {
        self.applied_down = down;
    }

    /// Whether a pair's `on_down_grace` has run out since the last apply.
    pub fn down_changed(&self, config: &Config) -> bool {
        self.down_set(config) != self.applied_down
    }

    /// A health report: updates the pair's state; returns whether it changed (its listener's
    /// ring must be rebuilt). A local error (the probe could not be made) changes no state: it
    /// is counted, shown and logged, at most every [`LOCAL_ERROR_LOG_EVERY`] over all pairs.
    /// A report from a pair a reload removed is dropped.
    pub fn on_report(&mut self, config: &Config, r: &Report) -> bool {
        let pair = (r.listener.clone(), r.backend.clone());
        let Some(settings) = config.listeners.iter().find(|l| l.name == r.listener).and_then(|l| l.health.get(&r.backend)) else {
            return false;
        };
        let (fall, rise) = (settings.fall, settings.rise);
        let Some(h) = self.pairs.get_mut(&pair) else { return false };
        if let Outcome::Local(why) = &r.outcome {
            h.observe(&r.outcome, fall, rise);
            if let Some(held_back) = self.local_errors_log.allow(Instant::now()) {
                tracing::warn!(
                    listener = %r.listener, backend = %r.backend, state = h.state.as_str(), error = %why, held_back,
                    "a health probe could not be made on this host's side: not the broker's failure, its state is kept (unchecked)"
                );
            }
            return false;
        }
        h.last_took = Some(r.took);
        let Some(state) = h.observe(&r.outcome, fall, rise) else { return false };
        tracing::info!(listener = %r.listener, backend = %r.backend, state = state.as_str(), detail = %h.last, "backend state changed");
        true
    }

    /// Stops every probe and clears the probe routes (on the way out).
    pub async fn stop(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.probes) {
            task.abort();
        }
        if let Some(routes) = self.routes.take() {
            routes.clear().await;
        }
    }
}

/// [`HealthSet::down_set`] of `pairs` (as [`HealthSet::synced`] gives them).
pub fn down_set(pairs: &BTreeMap<Pair, PairHealth>, config: &Config) -> DownSet {
    let mut out = DownSet::new();
    for l in &config.listeners {
        for b in &l.backends {
            let pair = (l.name.clone(), b.clone());
            let Some(h) = pairs.get(&pair).filter(|h| h.state != State::Up) else { continue };
            let grace_over = h.out_since.is_none_or(|t| t.elapsed() >= l.failure.on_down_grace);
            let reset = h.state != State::Refusing && l.failure.on_down == OnDown::Reset && grace_over;
            out.insert(pair, Out { reset });
        }
    }
    out
}

fn same_target(a: &health::Target, b: &health::Target) -> bool {
    a.real == b.real && a.vip == b.vip && a.mark == b.mark && a.health == b.health
}

/// The name holding `id`.
fn name_of(ids: &BTreeMap<String, u32>, id: u32) -> Option<String> {
    ids.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "interface = \"eth0\"\n[[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n\
                          on_down_grace = \"0s\"\n\
                          [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\n[[backend]]\nname = \"b2\"\naddress = \"192.0.2.12\"\n";

    fn set() -> (HealthSet, Config) {
        let config = config::parse(CONFIG, "t.toml").expect("valid");
        let (tx, _) = mpsc::channel(1);
        let mut set = HealthSet::new(tx, None);
        set.sync(&config);
        (set, config)
    }

    fn report(backend: &str, outcome: Outcome) -> Report {
        Report { listener: "mqtt".into(), backend: backend.into(), outcome, took: Duration::from_millis(3) }
    }

    fn pair(b: &str) -> Pair {
        ("mqtt".to_owned(), b.to_owned())
    }

    /// A pair that fails `fall` rounds is down, in the down set (its flows reset once the grace
    /// is over), and the set differs from the one applied until it is applied.
    #[test]
    fn a_failing_pair_goes_down_and_into_the_down_set() {
        let (mut set, config) = set();
        assert!(set.down_set(&config).is_empty(), "every pair starts up");
        let fall = config.listeners[0].health["b1"].fall;
        let changed: Vec<bool> = (0..fall).map(|_| set.on_report(&config, &report("b1", Outcome::Down("refused".into())))).collect();
        assert_eq!(changed.last(), Some(&true), "the last of `fall` failures changes the state");
        assert_eq!(changed.iter().filter(|c| **c).count(), 1, "once");
        assert_eq!(set.get(&pair("b1")).map(|h| h.state), Some(State::Down));
        let down = set.down_set(&config);
        assert_eq!(down.get(&pair("b1")), Some(&Out { reset: true }), "on_down = reset with no grace");
        assert!(set.down_changed(&config));
        set.applied(down);
        assert!(!set.down_changed(&config));
        assert_eq!(set.out(&Ids::default()), [], "no ids, nothing to save");
    }

    /// A probe this host could not make changes no state, and a report from a pair the config
    /// no longer has is dropped.
    #[test]
    fn local_errors_and_removed_pairs_change_nothing() {
        let (mut set, config) = set();
        for _ in 0..10 {
            assert!(!set.on_report(&config, &report("b2", Outcome::Local("EMFILE".into()))));
        }
        let h = set.get(&pair("b2")).expect("b2");
        assert_eq!((h.state, h.local_errors_total), (State::Up, 10));
        assert!(!set.on_report(&config, &report("gone", Outcome::Down("x".into()))));
        assert!(set.get(&pair("gone")).is_none());
    }

    /// A reload keeps the states of the pairs it keeps and drops the others; states saved by
    /// id come back by name.
    #[test]
    fn sync_keeps_states_and_restore_names_them() {
        let (mut set, config) = set();
        let mut ids = Ids::default();
        ids.update(&config).expect("ids");
        set.restore(&[(ids.listeners["mqtt"], ids.backends["b2"], State::Refusing)], &ids);
        assert_eq!(set.get(&pair("b2")).map(|h| h.state), Some(State::Refusing));
        assert_eq!(set.out(&ids), [(ids.listeners["mqtt"], ids.backends["b2"], State::Refusing)]);
        set.sync(&config);
        assert_eq!(set.get(&pair("b2")).map(|h| h.state), Some(State::Refusing), "kept across a sync");
        let fewer = config::parse(&CONFIG.replace("[[backend]]\nname = \"b2\"\naddress = \"192.0.2.12\"\n", ""), "t.toml").expect("valid");
        set.sync(&fewer);
        assert!(set.get(&pair("b2")).is_none(), "removed with its backend");
    }
}
