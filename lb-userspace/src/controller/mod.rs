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

use anyhow::{Context as _, bail, ensure};
use lb_common::{NO_BACKEND, flow_hash, flow_hash6, real_backend, real_id, reason, ring_slot, source_hash, source_hash6, table_event};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use self::{
    announcing::Announcing,
    cluster_link::{ClusterInbox, ClusterLink},
    health_set::HealthSet,
    walker::{FlowWalker, WalkerInbox},
};
use crate::{
    config::{self, Config, HashMode, format_mac},
    control::{self, Call, Pong, Request, Response, status::Reloads},
    dataplane::{self, Dataplane, Desired, LoadOptions, Stats},
    health::{Report, State},
    neigh::{self, Neighbours},
    plan::{self, BackendRuntime, DownSet, Fresh, Ids},
    probe_route::ProbeRoutes,
};

mod announcing;
mod cluster_link;
mod ha;
mod health_set;
mod report;
mod shutdown;
mod walker;

pub use self::{announcing::withdraw_without_controller, cluster_link::fingerprint};

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
        let mac6 = tunnel6(b).and_then(|a6| old.get(&b.name).and_then(|rt| rt.mac6).or_else(|| neigh.mac(a6)));
        runtime.insert(b.name.clone(), BackendRuntime { mac, mac6, drained });
    }
    runtime
}

/// A dual-stack tunnelled backend's IPv6 address: its IPv6 tunnel frames go to that route's next
/// hop, resolved apart from the IPv4 one (`BackendRuntime::mac6`).
fn tunnel6(b: &config::Backend) -> Option<IpAddr> {
    (b.forward != config::Forward::L2 && b.address.is_some()).then_some(b.address6.map(IpAddr::V6)).flatten()
}

/// Ids for maps adopted without a saved controller state: listeners recognised by VIP and
/// port, backends by the MAC their reals were written with; other names get fresh ids (and the
/// flows of whatever held those ids are deleted before they are used).
fn recover_ids(config: &Config, dp: &Dataplane, neigh: &Neighbours) -> Ids {
    let dataplane::MapIds { listeners: by_endpoint, backends: by_mac, tunnelled } = dp.ids_in_maps();
    let mut ids = Ids::default();
    for l in &config.listeners {
        if let Some(&id) = by_endpoint.get(&(l.vip, l.port)) {
            ids.listeners.insert(l.name.clone(), id);
        }
    }
    for b in &config.backends {
        let id = if b.forward == config::Forward::L2 {
            b.mac.or_else(|| neigh.mac(b.primary())).and_then(|m| by_mac.get(&m))
        } else {
            [b.address.map(IpAddr::V4), b.address6.map(IpAddr::V6)].into_iter().flatten().find_map(|a| tunnelled.get(&a))
        };
        if let Some(&id) = id {
            ids.backends.insert(b.name.clone(), id);
        }
    }
    ids
}

/// The balancer's controller: the config and the ids, MACs, weights and drains it runs with,
/// the maps' desired state, and its parts: the health checks ([`HealthSet`]), the flow-table
/// walks ([`FlowWalker`]) and the announcements and cluster link (`ha`).
pub struct Controller {
    opts: RunOptions,
    config: Config,
    ids: Ids,
    runtime: BTreeMap<String, BackendRuntime>,
    /// Weights set from the CLI; a reload drops them.
    weights: BTreeMap<String, u32>,
    /// Ids given to new names since the last apply (see `Desired::fresh_backends`).
    fresh: Fresh,
    health: HealthSet,
    neigh: Neighbours,
    dp: Dataplane,
    src_mac: [u8; 6],
    /// What the maps were last written with.
    desired: Desired,
    node: String,
    /// The last counter sample, and rates (packets/s, new flows/s) per real from the two last.
    sample: (Instant, Stats),
    rates: BTreeMap<u32, (f64, f64)>,
    /// Set by `dsrlb stop`: detach and unpin on the way out.
    stopping: bool,
    flows: FlowWalker,
    reloads: Reloads,
    /// What this node announces to the routers, and its link to the other nodes (see `ha`).
    announcing: Announcing,
    link: ClusterLink,
    /// `next_program`, as found when it was last set.
    next: Option<dataplane::chain::Next>,
}

/// The receiving ends the controller's loop selects on, besides the signals.
struct Inbox {
    calls: mpsc::Receiver<Call>,
    reports: mpsc::Receiver<Report>,
    walker: WalkerInbox,
    cluster: ClusterInbox,
    neighbours: watch::Receiver<neigh::Macs>,
}

/// What a plan says the maps should hold, and the down set it was made with.
struct Planned {
    desired: Desired,
    down: DownSet,
}

impl Planned {
    /// Plans the maps for `config` (with CLI weights applied), `ids` (`fresh` given since the
    /// last write), the backends' `runtime` and the pairs `down`.
    fn new(
        config: &Config,
        ids: &Ids,
        fresh: &Fresh,
        runtime: &BTreeMap<String, BackendRuntime>,
        down: DownSet,
        src_mac: [u8; 6],
    ) -> anyhow::Result<Self> {
        let mut desired = plan::desired(config, ids, runtime, &down, src_mac)?;
        desired.fresh_backends.clone_from(&fresh.backends);
        desired.fresh_listeners.clone_from(&fresh.listeners);
        Ok(Self { desired, down })
    }
}

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "node".to_owned(), |h| h.trim().to_owned())
}

impl Controller {
    /// Resolves, loads and fills the maps, then attaches. Nothing is attached when a step
    /// fails.
    ///
    /// # Errors
    /// When any step fails.
    fn start(
        opts: RunOptions,
        mut config: Config,
        calls: mpsc::Receiver<Call>,
        (neigh, routes): (Neighbours, ProbeRoutes),
    ) -> anyhow::Result<(Self, Inbox)> {
        let src_mac = dataplane::interface_mac(&config.interface)?;
        vips_are_not_ours(&config)?;
        resolve_tunnel(&mut config)?;
        let load = LoadOptions::new(config.ring_size, config.flow_table_size);
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
        // A MAC the maps hold is kept only for a backend forwarded the same way: a tunnelled
        // real's is its router's, which a broker now on the segment must not inherit.
        let backend_macs = dp.backend_macs();
        let adopted: BTreeMap<String, [u8; 6]> = saved
            .ids
            .backends
            .iter()
            .filter_map(|(name, id)| {
                let (mac, tunnelled) = backend_macs.get(id)?;
                let forward = config.backend(name)?.forward;
                (*tunnelled == (forward != config::Forward::L2)).then(|| (name.clone(), *mac))
            })
            .collect();
        let mut runtime = resolve_macs(&config, &BTreeMap::new(), &adopted, &neigh);
        for (name, rt) in &mut runtime {
            rt.drained = saved.drained.contains(name);
        }
        let mut ids = saved.ids.clone();
        let fresh = ids.update(&config)?;
        neigh.want(wanted_neighbours(&config));
        let (link, cluster_inbox) = ClusterLink::new(dp.flow_table_handle());
        let (flows, walker_inbox) = FlowWalker::new();
        let (reports, reports_rx) = mpsc::channel::<Report>(1024);
        let inbox = Inbox { calls, reports: reports_rx, walker: walker_inbox, cluster: cluster_inbox, neighbours: neigh.changes() };
        let mut c = Self {
            opts,
            config,
            ids,
            runtime,
            weights: saved.weights.clone(),
            fresh,
            health: HealthSet::new(reports, Some(routes)),
            neigh,
            dp,
            src_mac,
            desired: Desired::default(),
            node: node_name(),
            sample: (Instant::now(), Stats::default()),
            rates: BTreeMap::new(),
            stopping: false,
            flows,
            reloads: Reloads::default(),
            announcing: Announcing::new(),
            link,
            next: None,
        };
        c.health.sync(&c.config);
        c.health.restore(&saved.out, &saved.ids);
        // Everything that can fail before anything is written or attached.
        let probes = HealthSet::plan(&c.config, &c.ids, &c.node)?;
        c.next = c.dp.set_next(c.config.next_program.as_deref())?;
        let before = if start == dataplane::Start::Adopted { Some(c.dp.flow_count()) } else { None };
        // Attached, the maps are marked this build's layout at once: an older controller refuses
        // them from then on.
        let attach = |c: &mut Self| {
            c.dp.attach_pinned_link(&c.config.interface, dataplane::xdp_mode(c.config.xdp_mode), &c.opts.pin_dir, c.next.as_ref())?;
            c.dp.mark_layout()
        };
        // Adopted, this build's program takes over the maps as they are, and only then are they
        // changed to this config: the program it replaces (an older build's, in an upgrade)
        // never runs on maps it may misread, such as a real newly marked tunnelled, which a
        // program from before tunnels would send on as an L2 frame. The maps as they are keep
        // serving: this build adopts only layouts it reads (`lb_common::LAYOUT_VERSION`). A
        // fresh program is attached once its maps are filled.
        if start == dataplane::Start::Adopted {
            attach(&mut c)?;
        }
        c.apply().context("filling the maps")?;
        c.ha_start()?;
        if start == dataplane::Start::Fresh {
            attach(&mut c)?;
        }
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
        c.health.start(probes);
        c.sample = (Instant::now(), c.dp.stats()?);
        Ok((c, inbox))
    }

    /// Saves what the next controller needs to adopt the pins, in the pinned `CONTROL` map.
    fn save(&mut self) -> anyhow::Result<()> {
        let out = self.health.out(&self.ids);
        let saved = Saved {
            ids: self.ids.clone(),
            drained: self.runtime.iter().filter(|(_, r)| r.drained).map(|(n, _)| n.clone()).collect(),
            weights: self.weights.clone(),
            out,
        };
        let bytes = serde_json::to_vec(&saved).context("encoding the controller state")?;
        self.dp.save_control(&bytes)
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
        let down = self.health.down_set(&self.config);
        let planned = Planned::new(&self.effective_config(), &self.ids, &self.fresh, &self.runtime, down, self.src_mac)?;
        self.write(planned)
    }

    /// Writes a plan to the maps (the difference from the last), then tells the parts that
    /// follow it (the announcements) and saves the state for the next controller.
    fn write(&mut self, planned: Planned) -> anyhow::Result<()> {
        let Planned { desired, down } = planned;
        if !desired.probe_tunnels.is_empty() {
            // Before the maps name a tunnelled backend: its probes are wrapped from the start.
            self.dp.attach_probe_encap(&self.config.interface)?;
        }
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
        self.health.applied(down);
        self.ha_after_apply();
        self.save()
    }

    /// Applies when a pair's `on_down_grace` has run out since the last apply.
    fn apply_if_down_changed(&mut self) {
        if self.health.down_changed(&self.config)
            && let Err(e) = self.apply()
        {
            tracing::error!(error = %format!("{e:#}"), "applying an on_down reset failed");
        }
    }

    /// A health report: a pair's state that changed rebuilds its listener's ring.
    fn on_report(&mut self, r: &Report) {
        if self.health.on_report(&self.config, r)
            && let Err(e) = self.apply()
        {
            tracing::error!(error = %format!("{e:#}"), "applying a health change failed");
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
            if let Some(a6) = tunnel6(b)
                && let Some(mac) = self.neigh.mac(a6)
                && rt.mac6 != Some(mac)
            {
                tracing::info!(backend = %b.name, new = %format_mac(mac), "IPv6 next hop's MAC resolved or changed: its IPv6 rings follow");
                rt.mac6 = Some(mac);
                changed = true;
            }
            // A tunnelled backend whose route no longer leaves by the interface (or is gone) has
            // no next hop: out of every ring (`no-mac`) until it has one again. (A backend on the
            // segment keeps the MAC it had while its neighbour entry is briefly missing.)
            if b.forward != config::Forward::L2 {
                for (addr, mac) in [(Some(b.primary()), &mut rt.mac), (tunnel6(b), &mut rt.mac6)] {
                    if let Some(addr) = addr
                        && mac.is_some()
                        && self.neigh.unroutable(addr)
                    {
                        tracing::warn!(backend = %b.name, %addr, "tunnelled backend has no next hop on the interface: out of its rings");
                        *mac = None;
                        changed = true;
                    }
                }
            }
        }
        if changed && let Err(e) = self.apply() {
            tracing::error!(error = %format!("{e:#}"), "applying a MAC change failed");
        }
    }

    /// Re-reads the config; applies only the difference, or changes nothing and says why.
    fn reload(&mut self) -> anyhow::Result<String> {
        let mut new = config::load(&self.opts.config_path).map_err(anyhow::Error::new)?;
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
        resolve_tunnel(&mut new)?;
        // A backend forwarded another way now keeps none of its old MACs: a tunnelled one's was
        // its router's (and the other way round).
        let mut old = self.runtime.clone();
        for (name, rt) in &mut old {
            if self.config.backend(name).map(|b| b.forward) != new.backend(name).map(|b| b.forward) {
                (rt.mac, rt.mac6) = (None, None);
            }
        }
        let runtime = resolve_macs(&new, &old, &BTreeMap::new(), &self.neigh);
        let mut ids = self.ids.clone();
        let mut fresh = self.fresh.clone();
        let given = ids.update(&new)?;
        fresh.listeners.extend(given.listeners);
        fresh.backends.extend(given.backends);
        let health = self.health.synced(&new);
        // The one plan, made before committing anything (an error here leaves everything as it
        // was) and written after.
        let planned = Planned::new(&new, &ids, &fresh, &runtime, health_set::down_set(&health, &new), self.src_mac)?;
        let probes = HealthSet::plan(&new, &ids, &self.node)?;
        let cluster = cluster_link::cluster_settings(&new)?;
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
            (self.config.clone(), self.ids.clone(), self.fresh.clone(), self.runtime.clone(), self.weights.clone(), self.health.keep());
        self.config = new;
        self.ids = ids;
        self.fresh = fresh;
        self.runtime = runtime;
        self.neigh.want(wanted_neighbours(&self.config));
        self.weights.clear();
        self.health.put_back(health);
        if let Err(e) = self.write(planned).and_then(|()| self.ha_reconfigure(cluster)) {
            // A map write failed part way (the plan itself was made above), or the cluster
            // sync could not start with the new settings: put the old state back, in memory and
            // in the maps.
            let health;
            (self.config, self.ids, self.fresh, self.runtime, self.weights, health) = before;
            self.health.put_back(health);
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
        self.health.start(probes);
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

    /// A request from the control socket or the metrics endpoint; whether it was `dsrlb stop`.
    fn on_call(&mut self, (req, reply): Call) -> bool {
        if matches!(req, Request::Status | Request::Metrics) {
            self.queue((req, reply));
        } else {
            let _ = reply.send(self.handle(req));
        }
        if self.stopping {
            tracing::info!("dsrlb stop: detaching");
        }
        self.stopping
    }

    /// A status or metrics request: answered from a walk of the flow table ([`FlowWalker`]),
    /// so the loop keeps serving while the walk runs.
    fn queue(&mut self, call: Call) {
        if let Some((req, reply)) = self.flows.ask(call) {
            let _ = reply.send(self.handle(req));
            return;
        }
        if !self.flows.walk_wanted() {
            return;
        }
        let now = self.dp.now_age().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; counting idle flows as live");
            0
        });
        self.flows.walk(self.dp.flow_table_handle(), now, self.expire_units());
    }

    /// A walk finished: answer every request that waited for it.
    fn on_walked(&mut self, flows: walker::LiveFlows) {
        for (req, reply) in self.flows.walked(flows) {
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

    /// Every second: the data plane's events, a counter sample, a sweep when due, a down set
    /// whose grace ran out, and the announcements and cluster link.
    fn tick(&mut self) {
        self.dp.flush_events();
        if let Err(e) = self.sample_stats() {
            tracing::warn!(error = %format!("{e:#}"), "reading counters failed");
        }
        if self.flows.sweep_due(Instant::now()) {
            let every = self.sweep_every();
            match self.dp.now_age() {
                Ok(now) => self.flows.sweep(self.dp.flow_table_handle(), now, self.expire_units(), every),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; no expiry this round");
                    self.flows.next_sweep_in(every);
                }
            }
        }
        self.apply_if_down_changed();
        self.ha_tick();
    }

    fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => self.dp.stats().and_then(|stats| self.status(&stats)).and_then(to_value),
            Request::Drain { backend } => self.set_drained(&backend, true).map(Value::from),
            Request::Undrain { backend } => self.set_drained(&backend, false).map(Value::from),
            Request::Weight { backend, weight } => self.set_weight(&backend, weight).map(Value::from),
            Request::Reload => self.reload_logged().map(Value::from),
            Request::Flow { client, vip } => self.flow(&client, &vip).and_then(to_value),
            Request::Trace { listener, backend, .. } => self.trace_names(listener.as_deref(), backend.as_deref()).and_then(to_value),
            Request::Metrics => self.metrics().map(Value::from),
            Request::Ping => match self.ha_not_ready() {
                Some(why) => Err(anyhow::anyhow!("not ready: {why}")),
                None => self.dp.program_id().map(|program| Pong { serving: true, program }).and_then(to_value),
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

/// The addresses whose MACs come from the neighbour table: backends without a configured one,
/// on the link or (tunnelled) through their route's next hop.
fn wanted_neighbours(config: &Config) -> neigh::Wanted {
    let unset = || config.backends.iter().filter(|b| b.mac.is_none());
    neigh::Wanted {
        direct: unset().filter(|b| b.forward == config::Forward::L2).map(config::Backend::primary).collect(),
        routed: unset().filter(|b| b.forward != config::Forward::L2).flat_map(|b| std::iter::once(b.primary()).chain(tunnel6(b))).collect(),
    }
}

/// Fills the tunnel settings the config leaves unset from the interface (its first IPv4 and
/// global IPv6 address, its MTU), and refuses a tunnelled backend whose route leaves by another
/// interface: the program sends every frame back out of the one it came in by (`XDP_TX`).
fn resolve_tunnel(config: &mut Config) -> anyhow::Result<()> {
    let tunnelled: Vec<&config::Backend> = config.backends.iter().filter(|b| b.forward != config::Forward::L2).collect();
    if tunnelled.is_empty() {
        return Ok(());
    }
    let interface = config.interface.clone();
    let own = dataplane::interface_ips(&interface).with_context(|| format!("reading the addresses of {interface}"))?;
    let t = &mut config.tunnel;
    if t.source.is_none() {
        t.source = own.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
    }
    if t.source6.is_none() {
        t.source6 = own.iter().find_map(|a| match a {
            IpAddr::V6(v6) if !v6.is_unicast_link_local() && !v6.is_loopback() => Some(*v6),
            _ => None,
        });
    }
    let name = interface.clone();
    let link_mtu = crate::netlink::blocking(move |h| async move { crate::netlink::mtu(&h, &name).await })?;
    if let Some(mtu) = t.mtu {
        // Wrapped frames leave by the interface: the path cannot take more than it does.
        ensure!(mtu <= link_mtu, "tunnel_mtu {mtu} is larger than {interface}'s MTU {link_mtu}: wrapped frames would not fit the link");
    } else {
        ensure!(
            link_mtu >= lb_common::TUNNEL_MIN_MTU,
            "{interface}'s MTU is {link_mtu}: tunnelled backends need a path MTU of at least {}",
            lb_common::TUNNEL_MIN_MTU
        );
        t.mtu = Some(link_mtu);
    }
    let addrs: Vec<(String, IpAddr)> = tunnelled
        .iter()
        .flat_map(|b| [b.address.map(IpAddr::V4), b.address6.map(IpAddr::V6)].into_iter().flatten().map(|a| (b.name.clone(), a)))
        .collect();
    let interface2 = interface.clone();
    crate::netlink::blocking(move |h| async move {
        let ifindex = crate::netlink::ifindex(&h, &interface2).await?;
        for (name, a) in &addrs {
            // No route yet (the routing daemon not up, say) is no reason to refuse: the backend
            // waits without a next hop (`no-mac`) until it has one. A route by another interface
            // is a config the program cannot serve.
            let oif = match crate::netlink::route_get(&h, *a).await {
                Ok((oif, _)) => oif,
                Err(e) => {
                    tracing::warn!(backend = %name, address = %a, error = %format!("{e:#}"), "tunnelled backend has no route yet");
                    continue;
                }
            };
            ensure!(
                oif == ifindex,
                "backend {name} ({a}): its route leaves by interface index {oif}, not {interface2} (index {ifindex}); the balancer \
                 sends tunnelled frames out of {interface2} only: route {a} through a gateway on {interface2}"
            );
        }
        Ok(())
    })
}

/// An answer's data as JSON.
fn to_value(data: impl serde::Serialize) -> anyhow::Result<Value> {
    serde_json::to_value(data).context("encoding the answer")
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

/// `dsrlb run`: starts (or adopts) the balancer and serves until SIGINT or SIGTERM, which leave
/// forwarding running from the pins; SIGHUP reloads; `dsrlb stop` detaches and unpins.
///
/// # Errors
/// When starting fails; nothing stays attached then.
pub async fn run(opts: RunOptions, config: Config) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while loading must still mean "detach and exit".
    let mut signals = Signals::new()?;
    let (call_tx, calls) = mpsc::channel::<Call>(64);
    let traces = std::sync::Arc::new(dataplane::trace::TraceHub::default());
    let read_only_group = config.read_only_group.as_ref().map(|g| g.gid);
    let server = control::Sockets::serve(&opts.socket, opts.access, read_only_group, call_tx.clone(), Some(traces.clone()))?;
    let metrics = serve_metrics(opts.metrics, call_tx).await;
    // The probes' routes follow the neighbour watcher's next hops: one source for both paths.
    let watched = match Neighbours::start(&config.interface).await {
        Ok(n) => ProbeRoutes::start(&config.interface, n.next_hops()).await.map(|r| (n, r)),
        Err(e) => Err(e),
    };
    let started = match watched {
        Ok(watchers) => Controller::start(opts, config, calls, watchers),
        Err(e) => Err(e.context(format!("watching {} over netlink", config.interface))),
    };
    let (mut c, mut inbox) = match started {
        Ok(c) => c,
        Err(e) => {
            drop(server.close());
            return Err(e);
        }
    };
    if let Some(tracer) = c.dp.take_tracer() {
        traces.install(tracer);
    }
    show(&c.describe());
    tracing::info!(interface = %c.config.interface, "serving");
    c.serve(&mut inbox, &mut signals).await;
    // The loop has ended: a request sent from now on is refused at once, and those queued are
    // answered so, rather than left waiting for an answer that would never come.
    inbox.calls.close();
    while let Ok((_, reply)) = inbox.calls.try_recv() {
        let _ = reply.send(control::Response::err("the controller is shutting down"));
    }
    c.shut_down(server, metrics).await
}

/// The signals `dsrlb run` acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
    }
}

/// Serves `GET /metrics` at `addr`, if one is given; a failure to bind is a warning.
async fn serve_metrics(addr: Option<SocketAddr>, calls: mpsc::Sender<Call>) -> Option<tokio::task::JoinHandle<()>> {
    let addr = addr?;
    match crate::metrics::serve(addr, calls).await {
        Ok(task) => {
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(task)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no metrics endpoint");
            None
        }
    }
}

impl Controller {
    /// The event loop: each event goes to the part it is for, until a signal or `dsrlb stop`.
    async fn serve(&mut self, inbox: &mut Inbox, signals: &mut Signals) {
        let stats_every = self.opts.stats_every;
        let mut sample = tokio::time::interval(Duration::from_secs(1));
        let mut print = tokio::time::interval(stats_every.unwrap_or(Duration::from_hours(1)));
        let mut macs = tokio::time::interval(MAC_REFRESH);
        self.flows.next_sweep_in(self.sweep_every());
        let tty = std::io::stdout().is_terminal();
        loop {
            tokio::select! {
                _ = signals.int.recv() => { tracing::info!("SIGINT: exiting; forwarding continues from the pins (dsrlb stop detaches)"); break; }
                _ = signals.term.recv() => { tracing::info!("SIGTERM: exiting; forwarding continues from the pins (dsrlb stop detaches)"); break; }
                _ = signals.hup.recv() => { let _ = self.reload_logged(); }
                Some(call) = inbox.calls.recv() => if self.on_call(call) { break },
                Some(r) = inbox.reports.recv() => self.on_report(&r),
                Some(flows) = inbox.walker.walked.recv() => self.on_walked(flows),
                Some(removed) = inbox.walker.swept.recv() => self.flows.swept(removed),
                _ = sample.tick() => self.tick(),
                Some(event) = inbox.cluster.events.recv(), if self.ha_takes_events() => self.on_cluster_event(event),
                Some(found) = inbox.cluster.found.recv() => self.exceptions_found(found),
                Some(done) = inbox.cluster.done.recv() => self.on_merge_done(done),
                _ = macs.tick() => self.refresh_macs(),
                Ok(()) = inbox.neighbours.changed() => self.refresh_macs(),
                _ = print.tick(), if stats_every.is_some() => {
                    let line = self.stats_line();
                    if tty { show(&format!("\r\x1b[K{line}")); } else { show(&format!("{line}\n")); }
                }
            }
        }
        if tty && stats_every.is_some() {
            show("\n");
        }
    }
}
