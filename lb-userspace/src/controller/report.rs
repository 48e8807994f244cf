//! What the controller shows: `dsrlb status`, the metrics, `dsrlb flow`, the description it
//! prints at start and the stats line of `dsrlb run` on a terminal.

use super::*;
use crate::control::{
    proto::{FlowAnswer, TraceStart},
    status::{BackendStatus, Hash, ListenerStatus, NextProgram, Status},
};

impl Controller {
    /// Everything `dsrlb status` shows, from the counters in `stats` (the rates come from the
    /// last two samples). The metrics are rendered from the same.
    pub(super) fn status(&self, stats: &Stats) -> anyhow::Result<Status> {
        let flows = self.flows.live_flows();
        let cfg = self.effective_config();
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let lid = self.ids.listeners[&l.name];
            let mut backends = Vec::new();
            for b in &l.backends {
                let backend = cfg.backend(b).context("known backend")?;
                let real = real_id(lid, self.ids.backends[b]);
                let h = self.health.get(&(l.name.clone(), b.clone())).context("a pair of the config")?;
                let rt = self.runtime[b];
                let c = stats.reals.get(&real).copied().unwrap_or_default();
                let (packets_per_sec, new_flows_per_sec) = self.rates.get(&real).copied().unwrap_or_default();
                backends.push(BackendStatus {
                    name: b.clone(),
                    address: backend.address,
                    address6: backend.address6,
                    mac: rt.mac.map_or_else(|| "unresolved".to_owned(), format_mac),
                    forward: backend.forward,
                    weight: backend.weight,
                    drained: rt.drained || backend.weight == 0,
                    state: if rt.mac.is_none() { "no-mac" } else { h.state.as_str() }.to_owned(),
                    resetting_flows: self.health.applied_down().get(&(l.name.clone(), b.clone())).is_some_and(|o| o.reset),
                    check: l.health[b].check,
                    last_check: h.last.clone(),
                    check_failures: h.failures_total,
                    checks: h.checks_total,
                    unchecked: h.unchecked.clone(),
                    local_errors: h.local_errors_total,
                    flows: flows.get(&real).copied().unwrap_or(0),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    packets_per_sec,
                    new_flows_per_sec,
                    check_seconds: h.last_took.map(|d| d.as_secs_f64()),
                });
            }
            let c = stats.listener(lid);
            let guards = stats.listeners.get(&lid).copied().unwrap_or_default();
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                vip: l.vip,
                port: l.port,
                hash: if l.hash == HashMode::Source { Hash::Source } else { Hash::FourTuple },
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                flow_idle_timeout: config::show_duration(l.flow_idle_timeout),
                max_conn_rate: l.conn_rate.map(|r| r.rate),
                max_conn_burst: l.conn_rate.map(|r| r.burst),
                conn_rate_dropped: guards.conn_rate_dropped,
                icmp_too_big: guards.icmp_too_big,
                on_down: l.failure.on_down,
                on_down_grace: config::show_duration(l.failure.on_down_grace),
                all_down: l.failure.all_down,
                fail_open: self.desired.listeners.iter().any(|d| d.id == lid && d.fail_open),
                backends,
            });
        }
        let (announce, cluster) = self.ha_status();
        let flows_per_backend = self
            .ids
            .backends
            .iter()
            .map(|(name, &bid)| (name.clone(), flows.iter().filter(|(r, _)| real_backend(**r) == bid).map(|(_, n)| n).sum()))
            .collect();
        let mut flow_table: BTreeMap<String, u64> =
            table_event::LABELS.iter().zip(&stats.table).map(|(e, n)| ((*e).to_owned(), *n)).collect();
        flow_table.insert("expired".to_owned(), self.flows.expired_total());
        let ms = |d: Option<std::time::Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (walk, sweep) = self.flows.last_took();
        Ok(Status {
            interface: cfg.interface.clone(),
            macs: self.dp.node_macs().into_iter().map(format_mac).collect(),
            clock_tick_ns: self.dp.ns_per_jiffy(),
            listeners,
            flows_per_backend,
            flow_table_entries: flows.values().sum(),
            next_program: self.next.as_ref().map(|n| NextProgram { path: n.path.clone(), id: n.id, name: n.name.clone() }),
            flow_table,
            flow_walk_ms: ms(walk),
            flow_sweep_ms: ms(sweep),
            verdicts: reason::LABELS.iter().zip(&stats.verdicts).map(|((v, r), n)| (format!("{v}/{r}"), *n)).collect(),
            reloads: self.reloads.clone(),
            announce,
            cluster,
        })
    }

    /// The Prometheus text: the status, from counters read now (the last sample's when reading
    /// fails).
    pub(super) fn metrics(&self) -> anyhow::Result<String> {
        let fresh = self.dp.stats();
        let status = self.status(fresh.as_ref().unwrap_or(&self.sample.1))?;
        crate::metrics::render(status)
    }

    /// What `dsrlb trace` needs from the controller: its filters checked against the config, the
    /// listener id the program filters by, and the names of listener and backend ids.
    pub(super) fn trace_names(&self, listener: Option<&str>, backend: Option<&str>) -> anyhow::Result<TraceStart> {
        let known = |ids: &BTreeMap<String, u32>| ids.keys().cloned().collect::<Vec<_>>().join(", ");
        let listener_id = match listener {
            None => None,
            Some(name) => Some(
                *self
                    .ids
                    .listeners
                    .get(name)
                    .with_context(|| format!("--listener: no listener named {name:?} (listeners: {})", known(&self.ids.listeners)))?,
            ),
        };
        if let Some(name) = backend {
            anyhow::ensure!(
                self.ids.backends.contains_key(name),
                "--backend: no backend named {name:?} (backends: {})",
                known(&self.ids.backends)
            );
        }
        let by_id = |ids: &BTreeMap<String, u32>| ids.iter().map(|(n, id)| (*id, n.clone())).collect();
        Ok(TraceStart {
            interface: self.config.interface.clone(),
            listener_id,
            listeners: by_id(&self.ids.listeners),
            backends: by_id(&self.ids.backends),
        })
    }

    /// Which backend a flow is pinned to, or would get (Katran's getRealForFlow).
    pub(super) fn flow(&self, client: &str, vip: &str) -> anyhow::Result<FlowAnswer> {
        let client: SocketAddr = client.parse().with_context(|| format!("client {client:?} is not IP:PORT ([IPv6]:PORT)"))?;
        let vip: SocketAddr = vip.parse().with_context(|| format!("vip {vip:?} is not IP:PORT ([IPv6]:PORT)"))?;
        anyhow::ensure!(client.is_ipv6() == vip.is_ipv6(), "client {client} and vip {vip} are of different families");
        let l = self
            .config
            .listeners
            .iter()
            .find(|l| l.vip == vip.ip() && l.port == vip.port())
            .with_context(|| format!("no listener on {vip}"))?;
        let lid = self.ids.listeners[&l.name];
        let name_of = |bid: u32| self.ids.backends.iter().find(|(_, v)| **v == bid).map(|(k, _)| k.clone());
        let buckets = self.dp.flow_buckets(client.ip(), client.port(), vip.ip(), vip.port());
        let expire = plan::expire_units(l.flow_idle_timeout);
        // A flow idle past its timeout is over, whether or not a sweep removed it yet.
        let now = self.dp.now_age()?;
        // A peer's copy: idle as on its peer (`FlowTable::idle_at`).
        let table = self.dp.flow_table_handle();
        let idle_of = |f: &crate::flow_table::Flow| table.idle_at(now).of(f, expire);
        if let Some((f, idle)) =
            self.dp.flow(client.ip(), client.port(), vip.ip(), vip.port()).map(|f| (f, idle_of(&f))).filter(|(_, i)| *i < expire)
        {
            let cached = self.dp.cached_flow(client.ip(), client.port(), vip.ip(), vip.port())?.len();
            return Ok(FlowAnswer::Pinned {
                listener: l.name.clone(),
                backend: name_of(real_backend(f.real())),
                source: "flow table".to_owned(),
                closing: f.closing(),
                confirmed: f.confirmed(),
                idle_s: idle_secs(idle),
                cached_cpus: cached,
                buckets,
            });
        }
        let wire = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
        let hash = match (client.ip(), vip.ip()) {
            (IpAddr::V6(c), IpAddr::V6(v)) => {
                let (c, v) = (dataplane::addr6(&c), dataplane::addr6(&v));
                if l.hash == HashMode::Source {
                    source_hash6(&c, l.source_prefix64)
                } else {
                    flow_hash6(&c, &v, wire(client.port()), wire(vip.port()))
                }
            }
            (IpAddr::V4(c), IpAddr::V4(v)) => {
                let src = u32::from_ne_bytes(c.octets());
                if l.hash == HashMode::Source {
                    source_hash(src)
                } else {
                    flow_hash(src, u32::from_ne_bytes(v.octets()), wire(client.port()), wire(vip.port()))
                }
            }
            _ => unreachable!("families checked above"),
        };
        let d = self.desired.listeners.iter().find(|d| d.id == lid).context("listener planned")?;
        let slot = d.ring[ring_slot(hash, self.config.ring_size) as usize];
        let backend = if slot == NO_BACKEND { None } else { name_of(slot) };
        Ok(FlowAnswer::Ring {
            listener: l.name.clone(),
            backend,
            source: "ring (not in the flow table)".to_owned(),
            slot: ring_slot(hash, self.config.ring_size),
        })
    }

    /// A human summary of what is being served.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "interface {} ({}), xdp_mode {:?}, ring_size {}, flow_table_size {}, control socket {}",
            c.interface,
            format_mac(self.src_mac),
            c.xdp_mode,
            c.ring_size,
            c.flow_table_size,
            self.opts.socket.display()
        );
        if let Some(n) = &self.next {
            let _ = writeln!(out, "frames not for a listener go on to XDP program {} ({}, pinned at {})", n.id, n.name, n.path.display());
        }
        if !c.accept_macs.is_empty() {
            let macs: Vec<String> = c.accept_macs.iter().map(|m| format_mac(*m)).collect();
            let _ = writeln!(out, "also forwarding frames for {}", macs.join(", "));
        }
        if let Some(a) = c.announce {
            let _ = writeln!(
                out,
                "announcing usable VIPs as routes in table {} (proto {}) for this node's BGP speaker",
                a.table,
                crate::announce::RTPROT_DSRLB
            );
        }
        if let Some(cl) = &c.cluster {
            let nodes: Vec<String> = cl.nodes.iter().map(ToString::to_string).collect();
            let auth = if cl.key.is_some() { "authenticated with key_file" } else { "INSECURE: no key_file (insecure = true)" };
            let _ = writeln!(
                out,
                "cluster of {} nodes ({}), sharing exceptions every {:?}, {auth}",
                nodes.len(),
                nodes.join(", "),
                cl.sync_interval
            );
        }
        for (l, d) in c.listeners.iter().zip(&self.desired.listeners) {
            let storm = l.conn_rate.map_or_else(String::new, |r| format!(" max_conn_rate={}/s burst={}", r.rate, r.burst));
            let _ = writeln!(
                out,
                "listener {} {} hash={:?} flow_idle_timeout={}{storm}",
                l.name,
                SocketAddr::new(l.vip, l.port),
                l.hash,
                config::show_duration(l.flow_idle_timeout)
            );
            let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
            for &s in &d.ring {
                *slots.entry(s).or_default() += 1;
            }
            if slots.contains_key(&NO_BACKEND) {
                let _ = writeln!(out, "  (no backend with weight > 0: new connections are dropped)");
            }
            for name in &l.backends {
                let b = c.backend(name).expect("validated");
                let id = self.ids.backends[name];
                let share = slots.get(&id).copied().unwrap_or(0) as f64 * 100.0 / d.ring.len() as f64;
                let _ = writeln!(
                    out,
                    "  backend {:<12} {:<15} {}  weight {:>5}  ring share {share:5.1}%  check {:?}",
                    b.name,
                    b.addresses(),
                    self.runtime[name].mac.map_or_else(|| "no MAC yet".to_owned(), format_mac),
                    b.weight,
                    l.health[name].check
                );
            }
        }
        out
    }

    /// One stats line: per backend, new flows and packets (totals and per second).
    #[must_use]
    pub fn stats_line(&self) -> String {
        let mut line = String::new();
        let stats = &self.sample.1;
        for (name, &id) in &self.ids.backends {
            let c = stats.backend(id);
            let (pps, nfps) =
                self.rates.iter().filter(|(r, _)| real_backend(**r) == id).fold((0.0, 0.0), |(a, b), (_, (p, n))| (a + p, b + n));
            let _ = write!(line, "{name}: {} new ({nfps:.0}/s) {} pkts ({pps:.0}/s) | ", c.new_flows, c.packets);
        }
        let sum =
            |verdict: &str| -> u64 { reason::LABELS.iter().zip(&stats.verdicts).filter(|((v, _), _)| *v == verdict).map(|(_, n)| n).sum() };
        let _ = write!(line, "pass {} drop {}", sum("pass"), sum("drop"));
        line
    }
}
