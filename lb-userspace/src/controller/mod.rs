//! `dsrlb run`: the controller. It owns the data plane, the health checks and the control
//! socket, and turns every change (a check result, a drain, a reload, a MAC change) into a new
//! desired state that [`Dataplane::apply`] writes as a diff.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::{
    NO_BACKEND, flow_hash, flow_hash6, real_backend, real_id, real_listener, reason, ring_slot, source_hash, source_hash6, table_event,
};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    config::{self, CheckKind, Config, HashMode, OnDown, format_mac},
    control::{self, Call, Request, Response, status::Reloads},
    dataplane::{self, Dataplane, Desired, LoadOptions, Stats},
    health::{self, PairHealth, Report, State},
    neigh::Neighbours,
    plan::{self, BackendRuntime, DownSet, Fresh, Ids, Out},
    probe_route::{self, ProbeRoutes},
};

mod ha;
mod report;

pub use ha::{HaInbox, fingerprint, withdraw_without_controller};

/// How often backend MACs are re-read from the neighbour table.
const MAC_REFRESH: Duration = Duration::from_secs(5);

/// Options of `dsrlb run` besides the config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
    pub socket: PathBuf,
    /// bpffs directory for the maps' and the link's pins.
    pub pin_dir: PathBuf,
    pub stats_every: Option<Duration>,
    /// Where `GET /metrics` is served; `None` for no endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// Who may use the control socket besides root and this user.
    pub access: control::Access,
}

/// What a controller saves so the next one can adopt the pinned maps as they are: kept in the
/// pinned `CONTROL` map itself, so it exists exactly as long as the maps do.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Saved {
    ids: Ids,
    drained: BTreeSet<String>,
    weights: BTreeMap<String, u32>,
    /// (listener id, backend id, state) of every pair not up.
    out: Vec<(u32, u32, State)>,
}

/// Every backend's MAC: configured, known from before (`old`, then `adopted`: what the pinned
/// maps hold), or from the neighbour table's latest snapshot. Nothing waited for: a backend that
/// does not resolve now starts without a MAC (`no-mac`, out of every ring); the neighbour
/// watcher keeps asking the kernel, and [`Controller::refresh_macs`] takes its answer.
fn resolve_macs(
    config: &Config,
    old: &BTreeMap<String, BackendRuntime>,
    adopted: &BTreeMap<String, [u8; 6]>,
    neigh: &Neighbours,
) -> BTreeMap<String, BackendRuntime> {
    let mut runtime = BTreeMap::new();
    for b in &config.backends {
        let drained = old.get(&b.name).is_some_and(|r| r.drained);
        let mac = b
            .mac
            .or_else(|| old.get(&b.name).and_then(|rt| rt.mac))
            .or_else(|| adopted.get(&b.name).copied())
            .or_else(|| neigh.mac(b.primary()));
        runtime.insert(b.name.clone(), BackendRuntime { mac, drained });
    }
    runtime
}

/// Ids for maps adopted without a saved controller state: listeners recognised by VIP and
/// port, backends by the MAC their reals were written with; other names get fresh ids (and the
/// flows of whatever held those ids are deleted before they are used).
fn recover_ids(config: &Config, dp: &Dataplane, neigh: &Neighbours) -> Ids {
    let dataplane::MapIds { listeners: by_endpoint, backends: by_mac } = dp.ids_in_maps();
    let mut ids = Ids::default();
    for l in &config.listeners {
        if let Some(&id) = by_endpoint.get(&(l.vip, l.port)) {
            ids.listeners.insert(l.name.clone(), id);
        }
    }
    for b in &config.backends {
        let mac = b.mac.or_else(|| neigh.mac(b.primary()));
        if let Some(&id) = mac.and_then(|m| by_mac.get(&m)) {
            ids.backends.insert(b.name.clone(), id);
        }
    }
    ids
}

type Pair = (String, String);

/// Probe tasks and routes to start, with everything that can fail already done.
struct ProbePlan {
    targets: BTreeMap<Pair, health::Target>,
    routes: probe_route::Wanted,
}

pub struct Controller {
    opts: RunOptions,
    config: Config,
    ids: Ids,
    runtime: BTreeMap<String, BackendRuntime>,
    /// Weights set from the CLI; a reload drops them.
    weights: BTreeMap<String, u32>,
    health: BTreeMap<Pair, PairHealth>,
    probes: BTreeMap<Pair, (health::Target, JoinHandle<()>)>,
    reports: mpsc::Sender<Report>,
    /// Taken on the way out, to clear.
    routes: Option<ProbeRoutes>,
    neigh: Neighbours,
    dp: Dataplane,
    src_mac: [u8; 6],
    desired: Desired,
    node: String,
    /// The last counter sample, and rates (packets/s, new flows/s) per real from the two last.
    sample: (Instant, Stats),
    rates: BTreeMap<u32, (f64, f64)>,
    /// Set by `dsrlb stop`: detach and unpin on the way out.
    stopping: bool,
    /// Live flows per real, from the last flow-table walk, and when it ended.
    live_flows: Option<(Instant, BTreeMap<u32, usize>)>,
    /// A walk runs; requests wait for it, with the way back; and where it reports.
    walking: bool,
    waiting: Vec<(Request, oneshot::Sender<Response>)>,
    walked: mpsc::Sender<BTreeMap<u32, usize>>,
    /// Flows removed for idleness since start, and whether a sweep runs now.
    expired_total: u64,
    sweeping: bool,
    swept: mpsc::Sender<usize>,
    /// Ids given to new names since the last apply (see `Desired::fresh_backends`).
    fresh: Fresh,
    /// The down set the maps were last written with: a pair whose grace ran out since changes
    /// it, and the next tick applies.
    applied_down: DownSet,
    reloads: Reloads,
    /// Announcements and the cluster (see `ha`).
    ha: ha::Ha,
    /// `next_program`, as found when it was last set.
    next: Option<dataplane::chain::Next>,
    /// Probes that could not be made on this host's side, logged at most this often.
    local_errors_log: health::LogLimit,
}

/// At most one log line this often for probes that fail on this host's side (status and the
/// metrics count every one).
const LOCAL_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// How old a flow-table walk may be before status or metrics walk again.
const FLOW_WALK_EVERY: Duration = Duration::from_secs(2);

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "node".to_owned(), |h| h.trim().to_owned())
}

impl Controller {
    /// Resolves, loads and fills the maps, then attaches. Nothing is attached when a step
    /// fails.
    ///
    /// # Errors
    /// When any step fails.
    pub fn start(
        opts: RunOptions,
        config: Config,
        reports: mpsc::Sender<Report>,
        swept: mpsc::Sender<usize>,
        walked: mpsc::Sender<BTreeMap<u32, usize>>,
        (neigh, routes): (Neighbours, ProbeRoutes),
    ) -> anyhow::Result<(Self, HaInbox)> {
        let src_mac = dataplane::interface_mac(&config.interface)?;
        vips_are_not_ours(&config)?;
        let load = LoadOptions { ring_size: config.ring_size, flow_table_size: config.flow_table_size };
        let (dp, start) = Dataplane::open_pinned(&load, &opts.pin_dir, &config.interface)?;
        let saved = match start {
            dataplane::Start::Fresh => Saved::default(),
            dataplane::Start::Adopted => match dp.load_control().map(|bytes| serde_json::from_slice::<Saved>(&bytes)) {
                Some(Ok(saved)) => saved,
                broken => {
                    let problem = broken.map_or_else(|| "missing".to_owned(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                    tracing::warn!(
                        pins = %opts.pin_dir.display(),
                        %problem,
                        "the pinned controller state is not usable: ids recovered from the maps (listeners by VIP and port, backends by MAC); drains, CLI weights and health start afresh"
                    );
                    Saved { ids: recover_ids(&config, &dp, &neigh), ..Saved::default() }
                }
            },
        };
        let backend_macs = dp.backend_macs();
        let adopted: BTreeMap<String, [u8; 6]> =
            saved.ids.backends.iter().filter_map(|(name, id)| backend_macs.get(id).map(|m| (name.clone(), *m))).collect();
        let mut runtime = resolve_macs(&config, &BTreeMap::new(), &adopted, &neigh);
        for (name, rt) in &mut runtime {
            rt.drained = saved.drained.contains(name);
        }
        let mut ids = saved.ids.clone();
        let fresh = ids.update(&config)?;
        neigh.want(wanted_neighbours(&config));
        let (ha, inbox) = ha::Ha::new(dp.flow_table_handle());
        let mut c = Self {
            opts,
            config,
            ids,
            runtime,
            weights: saved.weights.clone(),
            health: BTreeMap::new(),
            probes: BTreeMap::new(),
            reports,
            routes: Some(routes),
            neigh,
            dp,
            src_mac,
            desired: Desired::default(),
            node: node_name(),
            sample: (Instant::now(), Stats::default()),
            rates: BTreeMap::new(),
            stopping: false,
            live_flows: None,
            walking: false,
            waiting: Vec::new(),
            walked,
            expired_total: 0,
            sweeping: false,
            swept,
            fresh,
            applied_down: DownSet::new(),
            reloads: Reloads::default(),
            ha,
            next: None,
            local_errors_log: health::LogLimit::new(LOCAL_ERROR_LOG_EVERY),
        };
        c.sync_health();
        for &(lid, bid, state) in &saved.out {
            let (l, b) = (name_of(&saved.ids.listeners, lid), name_of(&saved.ids.backends, bid));
            if let Some(h) = l.zip(b).and_then(|pair| c.health.get_mut(&pair)) {
                h.restore(state);
            }
        }
        // Everything that can fail before anything is written or attached.
        let probes = c.plan_probes(&c.config, &c.ids)?;
        c.next = c.dp.set_next(c.config.next_program.as_deref())?;
        let before = if start == dataplane::Start::Adopted { Some(c.dp.flow_count()) } else { None };
        c.apply().context("filling the maps")?;
        c.ha_start()?;
        c.dp.attach_pinned_link(&c.config.interface, dataplane::xdp_mode(c.config.xdp_mode), &c.opts.pin_dir, c.next.as_ref())?;
        c.dp.mark_layout()?;
        if let Some(next) = &c.next {
            tracing::info!(program = next.id, name = %next.name, pin = %next.path.display(), "frames the balancer passes go on to the next program");
        }
        c.ha_attached();
        match start {
            dataplane::Start::Adopted => tracing::info!(
                pins = %c.opts.pin_dir.display(),
                flows = before.unwrap_or(0),
                program = c.dp.program_id().unwrap_or(0),
                "adopted the pinned balancer: flow table kept, program replaced in place"
            ),
            dataplane::Start::Fresh => tracing::info!(pins = %c.opts.pin_dir.display(), "attached and pinned"),
        }
        c.start_probes(probes);
        c.sample = (Instant::now(), c.dp.stats()?);
        Ok((c, inbox))
    }

    /// Saves what the next controller needs to adopt the pins, in the pinned `CONTROL` map.
    fn save(&mut self) -> anyhow::Result<()> {
        let out = self
            .health
            .iter()
            .filter(|(_, h)| h.state != State::Up)
            .filter_map(|((l, b), h)| Some((*self.ids.listeners.get(l)?, *self.ids.backends.get(b)?, h.state)))
            .collect();
        let saved = Saved {
            ids: self.ids.clone(),
            drained: self.runtime.iter().filter(|(_, r)| r.drained).map(|(n, _)| n.clone()).collect(),
            weights: self.weights.clone(),
            out,
        };
        let bytes = serde_json::to_vec(&saved).context("encoding the controller state")?;
        self.dp.save_control(&bytes)
    }

    fn pairs(config: &Config) -> impl Iterator<Item = (Pair, &config::Health)> {
        config.listeners.iter().flat_map(|l| l.health.iter().map(move |(b, h)| ((l.name.clone(), b.clone()), h)))
    }

    /// Health entries for every pair of the config: existing ones keep their state.
    fn sync_health(&mut self) {
        let wanted: BTreeMap<Pair, config::Health> = Self::pairs(&self.config).map(|(p, h)| (p, h.clone())).collect();
        self.health.retain(|p, _| wanted.contains_key(p));
        for (p, h) in &wanted {
            self.health.entry(p.clone()).or_insert_with(|| PairHealth::new(h));
            if h.check == CheckKind::None {
                // Unchecked pairs are always up.
                self.health.insert(p.clone(), PairHealth::new(h));
            }
        }
    }

    /// Probe tasks and DSR probe routes for every checked pair; changed settings restart a
    /// task, removed pairs stop theirs.
    /// Probe tasks and DSR probe routes for every checked pair of `config` (ids from `ids`),
    /// with everything that can fail (TLS files) done: [`Self::start_probes`] then cannot fail.
    fn plan_probes(&self, config: &Config, ids: &Ids) -> anyhow::Result<ProbePlan> {
        let mut targets: BTreeMap<Pair, health::Target> = BTreeMap::new();
        let mut routes = probe_route::Wanted::new();
        let mut tls_cache: BTreeMap<PathBuf, std::sync::Arc<tokio_rustls::rustls::ClientConfig>> = BTreeMap::new();
        for l in &config.listeners {
            for (b, h) in &l.health {
                if h.check == CheckKind::None {
                    continue;
                }
                let backend = config.backend(b).context("pair names a known backend")?;
                let id = *ids.backends.get(b).with_context(|| format!("backend {b}: no id"))?;
                let tls = match &h.tls_ca {
                    Some(ca) if h.check == CheckKind::MqttTls => Some(if let Some(c) = tls_cache.get(ca) {
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
                    routes.entry(id).or_default().insert((l.vip, address));
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
                        client_id: format!("dsrlb-hc-{}-{}-{}", self.node, l.name, b),
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
    fn start_probes(&mut self, plan: ProbePlan) {
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
    fn down_set(&self) -> DownSet {
        let mut out = DownSet::new();
        for l in &self.config.listeners {
            for b in &l.backends {
                let pair = (l.name.clone(), b.clone());
                let Some(h) = self.health.get(&pair).filter(|h| h.state != State::Up) else { continue };
                let grace_over = h.out_since.is_none_or(|t| t.elapsed() >= l.failure.on_down_grace);
                let reset = h.state != State::Refusing && l.failure.on_down == OnDown::Reset && grace_over;
                out.insert(pair, Out { reset });
            }
        }
        out
    }

    /// The config with CLI weight overrides applied.
    fn effective_config(&self) -> Config {
        let mut c = self.config.clone();
        for b in &mut c.backends {
            if let Some(&w) = self.weights.get(&b.name) {
                b.weight = w;
            }
        }
        c
    }

    /// Plans from the current state and writes the difference.
    fn apply(&mut self) -> anyhow::Result<()> {
        let down = self.down_set();
        let mut desired = plan::desired(&self.effective_config(), &self.ids, &self.runtime, &down, self.src_mac)?;
        desired.fresh_backends.clone_from(&self.fresh.backends);
        desired.fresh_listeners.clone_from(&self.fresh.listeners);
        let report = self.dp.apply(&desired)?;
        tracing::debug!(?report, "maps written");
        self.fresh = Fresh::default();
        for (l, d) in self.config.listeners.iter().zip(&desired.listeners) {
            let was = self.desired.listeners.iter().find(|w| w.id == d.id).is_some_and(|w| w.fail_open);
            if d.fail_open && !was {
                tracing::warn!(listener = %l.name, "every backend is marked down: failing open, new flows go to all of them (all_down = \"forward\")");
            } else if was && !d.fail_open {
                tracing::info!(listener = %l.name, "no longer failing open: a backend is up again");
            }
        }
        self.desired = desired;
        self.applied_down = down;
        self.ha_after_apply();
        self.save()
    }

    /// Applies when a pair's `on_down_grace` has run out since the last apply.
    fn apply_if_down_changed(&mut self) {
        if self.down_set() != self.applied_down
            && let Err(e) = self.apply()
        {
            tracing::error!(error = %format!("{e:#}"), "applying an on_down reset failed");
        }
    }

    /// A health report: update the pair's state; a change rebuilds that listener's ring. A
    /// local error (the probe could not be made) changes no state: it is counted, shown and
    /// logged, at most every [`LOCAL_ERROR_LOG_EVERY`] over all pairs.
    fn on_report(&mut self, r: &Report) {
        let pair = (r.listener.clone(), r.backend.clone());
        let Some(settings) = self.config.listeners.iter().find(|l| l.name == r.listener).and_then(|l| l.health.get(&r.backend)) else {
            return; // a report from a pair removed by a reload
        };
        let (fall, rise) = (settings.fall, settings.rise);
        let Some(h) = self.health.get_mut(&pair) else { return };
        if let health::Outcome::Local(why) = &r.outcome {
            h.observe(&r.outcome, fall, rise);
            if let Some(held_back) = self.local_errors_log.allow(Instant::now()) {
                tracing::warn!(
                    listener = %r.listener, backend = %r.backend, state = h.state.as_str(), error = %why, held_back,
                    "a health probe could not be made on this host's side: not the broker's failure, its state is kept (unchecked)"
                );
            }
            return;
        }
        h.last_took = Some(r.took);
        if let Some(state) = h.observe(&r.outcome, fall, rise) {
            tracing::info!(listener = %r.listener, backend = %r.backend, state = state.as_str(), detail = %h.last, "backend state changed");
            if let Err(e) = self.apply() {
                tracing::error!(error = %format!("{e:#}"), "applying a health change failed");
            }
        }
    }

    /// Re-reads the interface's MAC and takes the neighbour watcher's MACs of backends without a
    /// configured one; applies changes.
    fn refresh_macs(&mut self) {
        let mut changed = false;
        match dataplane::interface_mac(&self.config.interface) {
            Ok(mac) if mac != self.src_mac => {
                tracing::info!(interface = %self.config.interface, old = %format_mac(self.src_mac), new = %format_mac(mac), "interface MAC changed");
                self.src_mac = mac;
                changed = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading the interface MAC failed"),
        }
        for b in &self.config.backends {
            if b.mac.is_some() {
                continue;
            }
            let Some(rt) = self.runtime.get_mut(&b.name) else { continue };
            if let Some(mac) = self.neigh.mac(b.primary())
                && rt.mac != Some(mac)
            {
                let old = rt.mac.map_or_else(|| "none".to_owned(), format_mac);
                tracing::info!(backend = %b.name, %old, new = %format_mac(mac), "backend MAC resolved or changed: its rings follow");
                rt.mac = Some(mac);
                changed = true;
            }
        }
        if changed && let Err(e) = self.apply() {
            tracing::error!(error = %format!("{e:#}"), "applying a MAC change failed");
        }
    }

    /// Re-reads the config; applies only the difference, or changes nothing and says why.
    fn reload(&mut self) -> anyhow::Result<String> {
        let new = config::load(&self.opts.config_path).map_err(anyhow::Error::new)?;
        for (what, same) in [
            ("interface", new.interface == self.config.interface),
            ("xdp_mode", new.xdp_mode == self.config.xdp_mode),
            ("ring_size", new.ring_size == self.config.ring_size),
            ("flow_table_size", new.flow_table_size == self.config.flow_table_size),
        ] {
            if !same {
                bail!("{what} cannot change on reload (the maps and the attachment depend on it): restart the controller");
            }
        }
        if new.read_only_group != self.config.read_only_group {
            bail!(
                "read_only_group cannot change on reload (the read-only socket is made at start): restart the controller (it adopts \
                 the running balancer; no flow is lost)"
            );
        }
        vips_are_not_ours(&new)?;
        let runtime = resolve_macs(&new, &self.runtime, &BTreeMap::new(), &self.neigh);
        let mut ids = self.ids.clone();
        let fresh = ids.update(&new)?;
        // Plan before committing anything: an error here leaves everything as it was.
        plan::desired(&new, &ids, &runtime, &self.down_set(), self.src_mac)?;
        let probes = self.plan_probes(&new, &ids)?;
        let cluster = ha::cluster_settings(&new)?;
        // The next program first: a pin that is missing or refused changes nothing.
        // Looked up again even when the path is the same: the program pinned there may have been
        // replaced (xdp-filter loaded anew).
        let next = if new.next_program.is_none() && self.next.is_none() {
            None
        } else {
            let next = self.dp.set_next(new.next_program.as_deref())?;
            if next != self.next {
                tracing::info!(next = ?next, "next_program changed");
            }
            next
        };
        let added: Vec<String> = new.backends.iter().filter(|b| self.config.backend(&b.name).is_none()).map(|b| b.name.clone()).collect();
        let removed: Vec<String> = self.config.backends.iter().filter(|b| new.backend(&b.name).is_none()).map(|b| b.name.clone()).collect();
        // A new ring seed is a ring change like any other, for every slot at once: flows stay where
        // the flow table pins them (and are shared as exceptions), new flows follow the new rings.
        let reseeded = new.ring_seed != self.config.ring_seed;
        let before =
            (self.config.clone(), self.ids.clone(), self.fresh.clone(), self.runtime.clone(), self.weights.clone(), self.health.clone());
        self.config = new;
        self.ids = ids;
        self.fresh.listeners.extend(fresh.listeners);
        self.fresh.backends.extend(fresh.backends);
        self.runtime = runtime;
        self.neigh.want(wanted_neighbours(&self.config));
        self.weights.clear();
        self.sync_health();
        if let Err(e) = self.apply().and_then(|()| self.ha_reconfigure(cluster)) {
            // A map write failed part way (the plan itself was checked above), or the cluster
            // sync could not start with the new settings: put the old state back, in memory and
            // in the maps.
            (self.config, self.ids, self.fresh, self.runtime, self.weights, self.health) = before;
            if next != self.next
                && let Err(again) = self.dp.set_next(self.config.next_program.as_deref())
            {
                tracing::error!(error = %format!("{again:#}"), "restoring next_program after a failed reload failed");
            }
            if let Err(again) = self.apply() {
                tracing::error!(error = %format!("{again:#}"), "restoring the maps after a failed reload failed too");
            }
            return Err(e);
        }
        self.next = next;
        // Setting the probe routes also repairs them (rules someone removed are put back).
        self.start_probes(probes);
        if reseeded {
            tracing::warn!(
                "ring_seed_file changed: every ring was rebuilt; open flows stay on their brokers, new flows follow the new rings"
            );
        }
        let seed_note = if reseeded { "; the ring seed changed: every ring was rebuilt, open flows stay where they are" } else { "" };
        Ok(format!("reload applied: backends added {added:?}, removed {removed:?}{seed_note}"))
    }

    fn set_drained(&mut self, name: &str, drained: bool) -> anyhow::Result<String> {
        let rt = self.runtime.get_mut(name).with_context(|| format!("no backend named {name:?}"))?;
        rt.drained = drained;
        self.apply()?;
        tracing::info!(backend = %name, drained, "drain changed");
        Ok(format!("{name} {}", if drained { "drained: no new flows, existing flows stay" } else { "undrained" }))
    }

    fn set_weight(&mut self, name: &str, weight: u32) -> anyhow::Result<String> {
        if self.config.backend(name).is_none() {
            bail!("no backend named {name:?}");
        }
        if weight > config::MAX_WEIGHT {
            bail!("weight must be between 0 and {}", config::MAX_WEIGHT);
        }
        self.weights.insert(name.to_owned(), weight);
        self.apply()?;
        tracing::info!(backend = %name, weight, "weight changed");
        Ok(format!("{name} weight {weight} (until the next reload)"))
    }

    /// Takes a counter sample and updates per-real rates.
    fn sample_stats(&mut self) -> anyhow::Result<()> {
        let now = self.dp.stats()?;
        let secs = self.sample.0.elapsed().as_secs_f64().max(1e-3);
        self.rates = now
            .reals
            .iter()
            .map(|(id, c)| {
                let p = self.sample.1.reals.get(id).copied().unwrap_or_default();
                (*id, ((c.packets.saturating_sub(p.packets)) as f64 / secs, (c.new_flows.saturating_sub(p.new_flows)) as f64 / secs))
            })
            .collect();
        self.sample = (Instant::now(), now);
        Ok(())
    }

    /// Live flows per real from the last walk of the flow table (empty before the first).
    fn live_flows(&self) -> BTreeMap<u32, usize> {
        self.live_flows.as_ref().map(|(_, flows)| flows.clone()).unwrap_or_default()
    }

    /// A status or metrics request: answered from a walk of the flow table, which runs in a
    /// thread of its own (a walk reads the whole table: 32 MB at the default size, up to 4 GiB)
    /// so the loop keeps serving meanwhile. Metrics reuse a walk up to [`FLOW_WALK_EVERY`] old;
    /// status waits for one that starts after it asked.
    fn queue(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let fresh = self.live_flows.as_ref().is_some_and(|(at, _)| at.elapsed() < FLOW_WALK_EVERY);
        if req == Request::Metrics && fresh {
            let _ = reply.send(self.handle(req));
            return;
        }
        self.waiting.push((req, reply));
        if self.walking {
            return;
        }
        let now = match self.dp.now_age() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; counting idle flows as live");
                0
            }
        };
        self.walking = true;
        let (table, expire, done) = (self.dp.flow_table_handle(), self.expire_units(), self.walked.clone());
        tokio::task::spawn_blocking(move || {
            let flows = table.live_per_real(now, |l| expire.get(&l).copied().unwrap_or(u32::MAX));
            let _ = done.blocking_send(flows);
        });
    }

    /// A walk finished: answer every request that waited for it.
    fn walked(&mut self, flows: BTreeMap<u32, usize>) {
        self.walking = false;
        self.live_flows = Some((Instant::now(), flows));
        for (req, reply) in std::mem::take(&mut self.waiting) {
            let _ = reply.send(self.handle(req));
        }
    }

    /// Listener id to the idle age units from which its flows are over.
    fn expire_units(&self) -> BTreeMap<u32, u32> {
        self.config.listeners.iter().map(|l| (self.ids.listeners[&l.name], plan::expire_units(l.flow_idle_timeout))).collect()
    }

    /// How often expired flows are removed: an eighth of the shortest timeout, 1 s to 60 s.
    fn sweep_every(&self) -> Duration {
        let shortest = self.config.listeners.iter().map(|l| l.flow_idle_timeout).min().unwrap_or(config::DEFAULT_FLOW_IDLE_TIMEOUT);
        (shortest / 8).clamp(Duration::from_secs(1), Duration::from_mins(1))
    }

    /// Starts removing flows idle past their listener's timeout, in a thread of its own (a
    /// walk of the whole table); [`Self::swept`] takes the count. One sweep at a time.
    fn sweep(&mut self) {
        if self.sweeping {
            return;
        }
        let now = match self.dp.now_age() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; no expiry this round");
                return;
            }
        };
        self.sweeping = true;
        let (table, expire, done) = (self.dp.flow_table_handle(), self.expire_units(), self.swept.clone());
        tokio::task::spawn_blocking(move || {
            let removed = table.remove_where(|f| f.idle(now) >= expire.get(&real_listener(f.real())).copied().unwrap_or(u32::MAX));
            let _ = done.blocking_send(removed);
        });
    }

    fn swept(&mut self, removed: usize) {
        self.sweeping = false;
        self.expired_total += removed as u64;
        if removed > 0 {
            tracing::debug!(removed, "expired idle flows");
            self.live_flows = None;
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => self.dp.stats().and_then(|stats| self.status(&stats)).and_then(to_value),
            Request::Drain { backend } => self.set_drained(&backend, true).map(Value::from),
            Request::Undrain { backend } => self.set_drained(&backend, false).map(Value::from),
            Request::Weight { backend, weight } => self.set_weight(&backend, weight).map(Value::from),
            Request::Reload => self.reload_logged().map(Value::from),
            Request::Flow { client, vip } => self.flow(&client, &vip),
            Request::Trace { listener, backend, .. } => self.trace_names(listener.as_deref(), backend.as_deref()).and_then(to_value),
            Request::Metrics => self.metrics().map(Value::from),
            Request::Ping => match self.ha_not_ready() {
                Some(why) => Err(anyhow::anyhow!("not ready: {why}")),
                None => self.dp.program_id().map(|id| json!({ "serving": true, "program": id })),
            },
            Request::Stop => {
                self.stopping = true;
                Ok(Value::from(if self.config.announce.is_some() {
                    format!(
                        "stopping: withdrawing the VIPs, then detaching and removing the pins in {} once traffic stops",
                        self.opts.pin_dir.display()
                    )
                } else {
                    format!("stopping: detaching and removing the pins in {}", self.opts.pin_dir.display())
                }))
            }
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    fn reload_logged(&mut self) -> anyhow::Result<String> {
        match self.reload() {
            Ok(msg) => {
                tracing::info!("{msg}");
                self.reloads.applied += 1;
                self.reloads.last_error = None;
                Ok(msg)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload rejected; running state unchanged");
                self.reloads.rejected += 1;
                self.reloads.last_error = Some(format!("{e:#}"));
                Err(e.context("reload rejected; the running state is unchanged"))
            }
        }
    }
}

/// The addresses whose MACs come from the neighbour table: backends without a configured one.
fn wanted_neighbours(config: &Config) -> BTreeSet<IpAddr> {
    config.backends.iter().filter(|b| b.mac.is_none()).map(config::Backend::primary).collect()
}

/// An answer's data as JSON.
fn to_value(data: impl serde::Serialize) -> anyhow::Result<Value> {
    serde_json::to_value(data).context("encoding the answer")
}

/// The name holding `id`.
fn name_of(ids: &BTreeMap<String, u32>, id: u32) -> Option<String> {
    ids.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone())
}

/// Refuses a listener whose VIP is an address of the balancer's interface: frames to it for the
/// listener's port would be sent to a broker instead of this host.
fn vips_are_not_ours(config: &Config) -> anyhow::Result<()> {
    let own = dataplane::interface_ips(&config.interface).with_context(|| format!("reading the addresses of {}", config.interface))?;
    if let Some(l) = config.listeners.iter().find(|l| own.contains(&l.vip)) {
        bail!(
            "listener {}: VIP {} is an address of {} (the balancer's own): traffic for it to port {} would leave this host for a \
             broker. The VIP is routed to the balancer (or its VRRP next hop), not held by it",
            l.name,
            l.vip,
            config.interface,
            l.port
        );
    }
    Ok(())
}

/// Age units as seconds, roughly (a unit is 2^30 ns).
fn idle_secs(units: u32) -> u64 {
    (u64::from(units) << lb_common::FLOW_AGE_NS_SHIFT) / 1_000_000_000
}

/// Writes to stdout, ignoring a closed one: the controller serves whoever reads its output or not.
fn show(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn same_target(a: &health::Target, b: &health::Target) -> bool {
    a.real == b.real && a.vip == b.vip && a.mark == b.mark && a.health == b.health
}

/// `dsrlb run`: starts (or adopts) the balancer and serves until SIGINT or SIGTERM, which leave
/// forwarding running from the pins; SIGHUP reloads; `dsrlb stop` detaches and unpins.
///
/// # Errors
/// When starting fails; nothing stays attached then.
#[expect(clippy::too_many_lines, reason = "the controller's one event loop, its start and its end, read top to bottom")]
pub async fn run(opts: RunOptions, config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a signal that arrives while loading must still mean "detach and exit".
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (report_tx, mut reports) = mpsc::channel::<Report>(1024);
    let (swept_tx, mut swept) = mpsc::channel::<usize>(1);
    let (walked_tx, mut walked) = mpsc::channel::<BTreeMap<u32, usize>>(1);
    let (call_tx, mut calls) = mpsc::channel::<Call>(64);
    let traces = std::sync::Arc::new(dataplane::trace::TraceHub::default());
    let read_only_group = config.read_only_group.as_ref().map(|g| g.gid);
    let server = control::Sockets::serve(&opts.socket, opts.access, read_only_group, call_tx.clone(), Some(traces.clone()))?;
    let metrics = match opts.metrics {
        None => None,
        Some(addr) => match crate::metrics::serve(addr, call_tx).await {
            Ok(task) => {
                tracing::info!(%addr, "metrics at http://{addr}/metrics");
                Some(task)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no metrics endpoint");
                None
            }
        },
    };
    let stats_every = opts.stats_every;
    let kernel = match (Neighbours::start(&config.interface).await, ProbeRoutes::start(&config.interface).await) {
        (Ok(n), Ok(r)) => (n, r),
        (Err(e), _) | (_, Err(e)) => {
            server.close();
            return Err(e.context(format!("watching {} over netlink", config.interface)));
        }
    };
    let mut neighbour_changes = kernel.0.changes();
    let (mut c, mut inbox) = match Controller::start(opts, config, report_tx, swept_tx, walked_tx, kernel) {
        Ok(c) => c,
        Err(e) => {
            server.close();
            return Err(e);
        }
    };
    if let Some(tracer) = c.dp.take_tracer() {
        traces.install(tracer);
    }
    show(&c.describe());
    tracing::info!(interface = %c.config.interface, "serving");

    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let mut print = tokio::time::interval(stats_every.unwrap_or(Duration::from_hours(1)));
    let mut macs = tokio::time::interval(MAC_REFRESH);
    let mut next_sweep = Instant::now() + c.sweep_every();
    let tty = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = int.recv() => { tracing::info!("SIGINT: exiting; forwarding continues from the pins (dsrlb stop detaches)"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM: exiting; forwarding continues from the pins (dsrlb stop detaches)"); break; }
            _ = hup.recv() => { let _ = c.reload_logged(); }
            Some(r) = reports.recv() => c.on_report(&r),
            Some((req, reply)) = calls.recv() => {
                if matches!(req, Request::Status | Request::Metrics) {
                    c.queue(req, reply);
                } else {
                    let _ = reply.send(c.handle(req));
                }
                if c.stopping { tracing::info!("dsrlb stop: detaching"); break; }
            }
            Some(flows) = walked.recv() => c.walked(flows),
            _ = sample.tick() => {
                c.dp.flush_events();
                if let Err(e) = c.sample_stats() {
                    tracing::warn!(error = %format!("{e:#}"), "reading counters failed");
                }
                if Instant::now() >= next_sweep {
                    c.sweep();
                    next_sweep = Instant::now() + c.sweep_every();
                }
                c.apply_if_down_changed();
                c.ha_tick();
            }
            Some(event) = inbox.events.recv(), if c.ha_takes_events() => c.on_cluster_event(event),
            Some(found) = inbox.found.recv() => c.exceptions_found(found),
            Some(done) = inbox.done.recv() => c.on_merge_done(done),
            Some(removed) = swept.recv() => c.swept(removed),
            _ = macs.tick() => c.refresh_macs(),
            Ok(()) = neighbour_changes.changed() => c.refresh_macs(),
            _ = print.tick(), if stats_every.is_some() => {
                let line = c.stats_line();
                if tty { show(&format!("\r\x1b[K{line}")); } else { show(&format!("{line}\n")); }
            }
        }
    }
    if tty && stats_every.is_some() {
        show("\n");
    }
    // `dsrlb stop` withdraws the VIPs and waits for the traffic to go before anything else.
    c.ha_shutdown().await;
    server.close();
    if let Some(m) = metrics {
        m.abort();
    }
    for (_, (_, task)) in std::mem::take(&mut c.probes) {
        task.abort();
    }
    if let Some(routes) = c.routes.take() {
        routes.clear().await;
    }
    let stop = c.stopping.then(|| c.opts.pin_dir.clone());
    // `dsrlb stop` gives the interface back to the next program, in the balancer's mode; the fd
    // keeps it loaded until then.
    let hand_back = match (&c.next, c.stopping) {
        (Some(n), true) => dataplane::chain::program_fd(n.id)
            .map(|fd| (fd, n.id, c.config.interface.clone(), dataplane::chain::mode_flag_of(&c.config.interface)))
            .map_err(|e| tracing::error!(error = %format!("{e:#}"), "the next program cannot be given the interface back"))
            .ok(),
        _ => None,
    };
    if let Err(e) = c.save() {
        tracing::error!(error = %format!("{e:#}"), "saving the controller state failed");
    }
    // Our handles close here; the pins keep the attachment unless this is `dsrlb stop`.
    drop(c);
    if let Some(dir) = stop {
        dataplane::unpin_all(&dir)?;
    }
    if let Some((fd, id, interface, Some(mode))) = hand_back {
        // The kernel releases the unpinned link from a work queue: busy until it has.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match dataplane::chain::attach_fd(&interface, &fd, id, mode) {
                Ok(()) => {
                    tracing::info!(program = id, %interface, "the interface is back with the next program");
                    break;
                }
                Err(e) if Instant::now() < deadline && dataplane::chain::is_busy(&e) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), program = id, %interface, "giving the interface back to the next program failed");
                    break;
                }
            }
        }
    }
    Ok(())
}
