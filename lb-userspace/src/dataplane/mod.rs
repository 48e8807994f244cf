//! The loaded XDP object and its maps, as the controller sees them: what the maps should say
//! ([`Desired`]) and the handle that holds them ([`Dataplane`]). Loading, pinning and attaching
//! are in `load`, writing a desired state as a diff in `apply`, counters in `stats`, the
//! interface facts in `iface`; hooks for tests and benchmarks in `testing` (feature `testing`).

mod apply;
pub mod chain;
pub mod clock;
mod events;
mod iface;
mod load;
mod stats;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::{
    Addr6, FLOW_CACHE_VALID, FlowAddrs6, FlowCacheEntry, FlowKey, Ip6, LISTENER_F_IPV6, ListenerInfo, NO_MAC, NodeInfo, PortInfo, RealInfo,
    flow_cache_slot, flow_key6, map_names as names, real_backend,
};

pub use self::{
    iface::{interface_ips, interface_mac, interface_running, xdp_mode},
    load::{LINK_PIN, MAP_NAMES, Start, link_live, pinned_forwarded, unpin_all},
    stats::Stats,
};
use crate::{
    flow_table::{Flow, FlowTable},
    mapped::Mapped,
};

/// Sizes fixed when the object is loaded, and which object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ring_size: u32,
    pub flow_table_size: u32,
    pub object: Object,
}

impl LoadOptions {
    /// These sizes, with the object for this CPU ([`Object::native`]).
    #[must_use]
    pub const fn new(ring_size: u32, flow_table_size: u32) -> Self {
        Self { ring_size, flow_table_size, object: Object::native() }
    }
}

/// Which build of the XDP program is loaded (`lb_ebpf::order`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    /// Plain loads and stores: correct where every load is an acquire and every store a release
    /// (x86-64), on any kernel.
    Plain,
    /// BPF ISA v4 with load-acquire and store-release: correct on any CPU, from Linux 6.15.
    Ordered,
}

impl Object {
    /// The plain object on x86-64, the ordered one elsewhere.
    #[must_use]
    pub const fn native() -> Self {
        if cfg!(target_arch = "x86_64") { Self::Plain } else { Self::Ordered }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Plain => "dsrlb",
            Self::Ordered => "dsrlb-ordered",
        }
    }
}

/// What the maps should say: produced by [`crate::plan`], written by [`Dataplane::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub listeners: Vec<DesiredListener>,
    /// Listener id to name, for the data plane's event log.
    pub listener_names: BTreeMap<u32, String>,
    /// The balancer interface's MAC: the source of every forwarded frame, and the first
    /// destination MAC it forwards frames for.
    pub src_mac: [u8; 6],
    /// Further destination MACs it forwards frames for (`accept_macs`).
    pub accept_macs: Vec<[u8; 6]>,
    /// Backend and listener ids given to a name since the last apply: flows still pinned to
    /// their reals (from whoever held the id before) are deleted and their counters start from
    /// zero before anything is written for them.
    pub fresh_backends: BTreeSet<u32>,
    pub fresh_listeners: BTreeSet<u32>,
    /// `PROBE_TUNNELS` entries (`lb_common::probe_tunnel_slot`): how the health probes of
    /// tunnelled backends are wrapped.
    pub probe_tunnels: BTreeMap<u32, lb_common::RealTunnel>,
}

/// Storm control as `CONN_RATE` holds it (`lb_common::ConnRate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRateWanted {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredListener {
    /// Stable id: index of its reals and of its two ring copies.
    pub id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub hash_source: bool,
    /// With `hash_source` on an IPv6 VIP: hash the client's first 64 bits (`source_prefix = 64`).
    pub source_prefix64: bool,
    /// `ring_size` backend ids, or [`NO_BACKEND`].
    pub ring: Vec<u32>,
    /// Every backend of the listener, in the ring or not (drained, down): flows may still
    /// point at them.
    pub reals: Vec<DesiredReal>,
    /// `max_conn_rate`, if any.
    pub conn_rate: Option<ConnRateWanted>,
    /// Idle age units from which the listener's flows are over (`flow_idle_timeout`).
    pub idle_expire: u32,
    /// Every backend is marked down and the listener fails open (`all_down = "forward"`): the
    /// ring spreads new flows over all of them. Written nowhere; for status and logs.
    pub fail_open: bool,
}

/// A backend as one listener uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DesiredReal {
    pub backend: u32,
    pub dst_mac: [u8; 6],
    /// Failed this listener's checks: flows pinned to it are re-picked.
    pub down: bool,
    /// Tunnelled (`forward = "ipip"` or `"gue"`): where to; `dst_mac` is the next hop's.
    pub tunnel: Option<lb_common::RealTunnel>,
}

/// Ids the maps hold, as far as they can be recognised without names.
#[derive(Clone, Debug, Default)]
pub struct MapIds {
    /// Listener id by (VIP, port).
    pub listeners: BTreeMap<(IpAddr, u16), u32>,
    /// Backend id by the MAC its reals were written with (forwarded by MAC only: tunnelled
    /// backends share their next hop's).
    pub backends: BTreeMap<[u8; 6], u32>,
    /// Tunnelled backend id by its address.
    pub tunnelled: BTreeMap<IpAddr, u32>,
}

/// What one [`Dataplane::apply`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub ring_slots_written: usize,
    pub listeners_switched: usize,
    pub reals_written: usize,
    /// Flow entries deleted because their listener was removed or moved.
    pub flows_purged: usize,
}

/// The maps' content as last written, so an apply writes only differences.
#[derive(Default)]
struct Written {
    /// Listener id to its `LISTENERS` value.
    listeners: BTreeMap<u32, ListenerInfo>,
    /// Content of each ring copy, by copy number (`id * RING_COPIES + copy`).
    rings: BTreeMap<u32, Vec<u32>>,
    reals: BTreeMap<u32, RealInfo>,
    /// `REAL_TUNNELS` entries that are not zero.
    tunnels: BTreeMap<u32, lb_common::RealTunnel>,
    /// `PROBE_TUNNELS` entries that are not zero (not pinned: empty in a new load).
    probe_tunnels: BTreeMap<u32, lb_common::RealTunnel>,
    vips: BTreeMap<u32, u32>,
    /// Listener id to its `LISTENER_VIP6` value (IPv6 listeners only).
    vip6: BTreeMap<u32, Addr6>,
    vips6: BTreeMap<Addr6, u32>,
    /// Used `LISTEN_PORTS` slots and their values.
    ports: BTreeMap<u32, PortInfo>,
    node: Option<NodeInfo>,
    /// Listener id to its `CONN_RATE` settings (none: no limit).
    conn_rates: BTreeMap<u32, ConnRateWanted>,
}

pub struct Dataplane {
    ebpf: Ebpf,
    /// `LISTENERS`, `LISTEN_PORTS` and `NODE`, mapped: each word is written with one store.
    listeners: Mapped,
    ports: Mapped,
    node: Mapped,
    /// `CONTROL`, mapped: the controller's state, kept with the pins.
    control: Mapped,
    /// 10^9 / the kernel's HZ: the program's clock is jiffies times this (`NodeInfo`).
    ns_per_jiffy: u32,
    /// Shared with the controller's expiry sweep, which walks it off the event loop.
    flows: Arc<FlowTable>,
    ring_size: u32,
    written: Written,
    /// The flow cache generation, written into every used `LISTEN_PORTS` slot.
    generation: u32,
    /// Reals whose `REAL_STATS` slot may be non-zero (ever written, or found non-zero on
    /// adoption): the forwarded total is summed over them.
    counted: BTreeSet<u32>,
    /// The program's event log (`AYA_LOGS`), read by [`Self::flush_events`].
    logger: aya_log::EbpfLogger<events::EventSink>,
    events: events::EventSink,
    /// `dsrlb trace`'s maps, until the controller hands them to its control socket.
    tracer: Option<trace::Tracer>,
    /// The interface whose TC egress runs `dsrlb_probe_encap`, once attached.
    probe_encap: Option<String>,
}

impl Dataplane {
    /// The trace maps, once (the controller lends them to `dsrlb trace` clients).
    pub fn take_tracer(&mut self) -> Option<trace::Tracer> {
        self.tracer.take()
    }

    /// Reads the data plane's rare events into the log (the controller does every second).
    pub fn flush_events(&mut self) {
        self.logger.flush();
    }

    /// The data plane's last events, oldest first, as logged (listener names for ids).
    #[must_use]
    pub fn recent_events(&self) -> Vec<String> {
        self.events.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }

    #[must_use]
    pub const fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// The program id attached now (for logs and tests).
    ///
    /// # Errors
    /// When the program is not loaded.
    pub fn program_id(&self) -> anyhow::Result<u32> {
        let prog: &aya::programs::Xdp = self.ebpf.program("dsrlb").and_then(|p| p.try_into().ok()).context("dsrlb is not in the object")?;
        Ok(prog.info()?.id())
    }

    fn map_ref<'a, T>(&'a self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).with_context(|| format!("map {name} missing"))?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// Nanoseconds per jiffy of the program's clock (10^9 / the kernel's HZ, as measured).
    #[must_use]
    pub const fn ns_per_jiffy(&self) -> u32 {
        self.ns_per_jiffy
    }

    /// The flow table's age now (`lb_common::flow_age` of the program's clock, read by running
    /// `dsrlb_clock`).
    ///
    /// # Errors
    /// When the clock program cannot run.
    pub fn now_age(&self) -> anyhow::Result<u32> {
        Ok(lb_common::flow_age(lb_common::clock_ns(load::jiffies(&self.ebpf)?, self.ns_per_jiffy)))
    }

    /// The MACs frames are forwarded for, as last written (the interface's first).
    #[must_use]
    pub fn node_macs(&self) -> Vec<[u8; 6]> {
        let node = self.written.node.unwrap_or_default();
        node.macs
            .iter()
            .filter(|&&w| w != NO_MAC)
            .map(|w| {
                let b = w.to_le_bytes();
                [b[0], b[1], b[2], b[3], b[4], b[5]]
            })
            .collect()
    }

    /// The controller state last saved with [`Self::save_control`] (the valid `CONTROL` entry
    /// with the highest generation), if any.
    #[must_use]
    pub fn load_control(&self) -> Option<Vec<u8>> {
        (0..2u32)
            .filter_map(|slot| {
                let generation = self.control.load(slot, 0);
                let (checksum, len) = (self.control.load(slot, 1), usize::try_from(self.control.load(slot, 2)).ok()?);
                if generation == 0 || len > lb_common::CONTROL_STATE_BYTES {
                    return None;
                }
                let bytes: Vec<u8> = (0..len.div_ceil(8)).flat_map(|w| self.control.load(slot, 3 + w).to_le_bytes()).take(len).collect();
                (lb_common::control_checksum(&bytes) == checksum).then_some((generation, bytes))
            })
            .max_by_key(|(generation, _)| *generation)
            .map(|(_, bytes)| bytes)
    }

    /// Saves the controller state in the `CONTROL` entry not holding the newest one, and
    /// publishes it by writing its generation last.
    ///
    /// # Errors
    /// When `bytes` does not fit.
    pub fn save_control(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        ensure!(bytes.len() <= lb_common::CONTROL_STATE_BYTES, "the controller state ({} bytes) does not fit CONTROL", bytes.len());
        let newest = (0..2u32).max_by_key(|&slot| self.control.load(slot, 0)).unwrap_or(0);
        let (slot, generation) = (1 - newest, self.control.load(newest, 0) + 1);
        self.control.store(slot, 0, 0);
        for (w, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.control.store(slot, 3 + w, u64::from_le_bytes(word));
        }
        self.control.store(slot, 1, lb_common::control_checksum(bytes));
        self.control.store(slot, 2, bytes.len() as u64);
        self.control.store(slot, 0, generation);
        Ok(())
    }

    /// Listener ids as the maps hold them, by (VIP, port); and backend ids by the MAC of any of
    /// their reals: what a controller without its saved state can recognise.
    #[must_use]
    pub fn ids_in_maps(&self) -> MapIds {
        let listeners = self
            .written
            .listeners
            .iter()
            .map(|(&id, l)| {
                let vip = match self.written.vip6.get(&id) {
                    Some(a) if l.flags & LISTENER_F_IPV6 != 0 => IpAddr::V6(ipv6_of(a)),
                    _ => IpAddr::V4(Ipv4Addr::from(l.vip_be.to_ne_bytes())),
                };
                ((vip, u16::from_be(l.port_be)), id)
            })
            .collect();
        let backends = self
            .written
            .reals
            .iter()
            .filter(|(_, info)| info.flags & lb_common::REAL_F_TUNNEL == 0)
            .map(|(&r, info)| (info.dst_mac, real_backend(r)))
            .collect();
        let tunnelled = self
            .written
            .tunnels
            .iter()
            .map(|(&r, t)| {
                let a = Ipv6Addr::from(t.dst.octets);
                (a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4), real_backend(r))
            })
            .collect();
        MapIds { listeners, backends, tunnelled }
    }

    /// The MAC each backend id's reals were last written with, and whether they were tunnelled
    /// (for adoption: a broker that is off when the controller restarts keeps the MAC it had).
    /// An IPv4 listener's real says it when there is one: a dual-stack tunnelled backend's IPv6
    /// reals hold its IPv6 next hop's MAC.
    #[must_use]
    pub fn backend_macs(&self) -> BTreeMap<u32, ([u8; 6], bool)> {
        let mut out = BTreeMap::new();
        for v6 in [true, false] {
            for (&r, info) in &self.written.reals {
                if self.written.vip6.contains_key(&lb_common::real_listener(r)) == v6 {
                    out.insert(real_backend(r), (info.dst_mac, info.flags & lb_common::REAL_F_TUNNEL != 0));
                }
            }
        }
        out
    }

    /// The flow table's key of a client tuple (either family; both addresses of one), and an
    /// IPv6 flow's addresses.
    #[must_use]
    pub fn flow_key(&self, src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> (FlowKey, Option<FlowAddrs6>) {
        flow_key_of(src.into(), sport, dst.into(), dport, self.flows.seed())
    }

    /// The flow table's slot for a client tuple, if it holds one.
    #[must_use]
    pub fn flow(&self, src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Option<Flow> {
        let (key, addrs6) = self.flow_key(src, sport, dst, dport);
        self.flows.find(&key, addrs6.as_ref())
    }

    /// The two flow table buckets a client tuple may live in.
    #[must_use]
    pub fn flow_buckets(&self, src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> [u32; 2] {
        self.flows.buckets_of(&self.flow_key(src, sport, dst, dport).0)
    }

    /// The flow table, for walks made off the controller's event loop (expiry).
    #[must_use]
    pub fn flow_table_handle(&self) -> Arc<FlowTable> {
        Arc::clone(&self.flows)
    }

    /// The usable `FLOW_CACHE` entries of a client tuple (current tag, filled in the clock's
    /// current unit), one per CPU that has it cached, with the frames each has served since it
    /// was filled.
    ///
    /// # Errors
    /// When the map read fails.
    pub fn cached_flow(
        &self,
        src: impl Into<IpAddr>,
        sport: u16,
        dst: impl Into<IpAddr>,
        dport: u16,
    ) -> anyhow::Result<Vec<FlowCacheEntry>> {
        self.cached_flow_within(src, sport, dst, dport, 0)
    }

    /// As [`Self::cached_flow`], with entries filled up to `units` of the clock before its
    /// current one: a check made after frames ran must not depend on the clock not ticking in
    /// between (an entry of the last unit was usable when the frames ran).
    ///
    /// # Errors
    /// When the map read fails.
    pub fn cached_flow_within(
        &self,
        src: impl Into<IpAddr>,
        sport: u16,
        dst: impl Into<IpAddr>,
        dport: u16,
        units: u32,
    ) -> anyhow::Result<Vec<FlowCacheEntry>> {
        let map: PerCpuArray<&MapData, FlowCacheEntry> = self.map_ref(names::FLOW_CACHE)?;
        let key = self.flow_key(src, sport, dst, dport).0;
        let values = map.get(&flow_cache_slot(&key), 0).context("reading the flow cache")?;
        let tag = FLOW_CACHE_VALID | self.generation;
        let now = self.now_age()?;
        Ok(values.iter().filter(|e| e.key == key && e.tag == tag && lb_common::flow_idle(now, e.age.into()) <= units).copied().collect())
    }

    /// Slots in use in the flow table, closing flows included (a walk of the table).
    #[must_use]
    pub fn flow_count(&self) -> usize {
        let mut n = 0;
        self.flows.walk(|_| n += 1);
        n
    }

    /// How many live flows point at each real (a walk of the table): not closing, and idle
    /// less than `expire(listener id)` age units at age `now`.
    #[must_use]
    pub fn flows_per_real(&self, now: u32, expire: impl Fn(u32) -> u32) -> BTreeMap<u32, usize> {
        self.flows.live_per_real(now, expire)
    }
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The `FLOWS` key of a client tuple.
/// An IPv6 address as the data plane holds it (`lb_common::Addr6`).
#[must_use]
pub fn addr6(a: &Ipv6Addr) -> Addr6 {
    let o = a.octets();
    let half = |i: usize| u64::from_ne_bytes(o[i..i + 8].try_into().expect("8 bytes"));
    [half(0), half(8)]
}

/// The address an [`Addr6`] holds.
#[must_use]
pub fn ipv6_of(a: &Addr6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&a[0].to_ne_bytes());
    o[8..].copy_from_slice(&a[1].to_ne_bytes());
    Ipv6Addr::from(o)
}

/// The flow table key of a tuple (an IPv6 one's with the table's `seed`), and an IPv6 flow's
/// addresses. A tuple of mixed families has no flow: it gets an IPv4 key of the IPv4 halves.
#[must_use]
pub fn flow_key_of(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, seed: u64) -> (FlowKey, Option<FlowAddrs6>) {
    let (sport_be, dport_be) = (u16::from_ne_bytes(sport.to_be_bytes()), u16::from_ne_bytes(dport.to_be_bytes()));
    if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
        let a = FlowAddrs6 { src: Ip6 { octets: s.octets() }, dst: Ip6 { octets: d.octets() } };
        return (flow_key6(&a.src.words(), &a.dst.words(), sport_be, dport_be, seed), Some(a));
    }
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        IpAddr::V6(_) => 0,
    };
    (FlowKey { src_be: v4(src), dst_be: v4(dst), sport_be, dport_be }, None)
}
