//! The loaded XDP object and its maps: load, attach, write a desired state as a diff, read
//! counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    ConnRate, Counters, FLOW_CACHE_VALID, FlowCacheEntry, FlowKey, LAYOUT_VERSION, LISTENER_F_CONN_RATE, LISTENER_F_HASH_SOURCE, Layout,
    ListenerCounters, ListenerInfo, MAX_BACKENDS, MAX_LISTENERS, MAX_NODE_MACS, NO_BACKEND, NO_MAC, NodeInfo, PORT_SLOTS, PortInfo,
    REAL_F_ACTIVE, REAL_F_DOWN, REAL_SLOTS, RING_COPIES, RING_NONE, RING_SLOTS_PER_ENTRY, RealInfo, RingEntry, VipInfo, flow_cache_slot,
    flow_table_buckets, mac_word, map_names as names, real_backend, real_id, real_listener, reason, ring_base, ring_entries, table_event,
};

use crate::{
    EBPF_OBJ,
    flow_table::{Flow, FlowTable},
    mapped::Mapped,
};

/// Sizes fixed when the object is loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ring_size: u32,
    pub flow_table_size: u32,
    /// Destination MAC of the `xdp_floor` benchmark program.
    pub floor_dst_mac: [u8; 6],
}

/// What the maps should say: produced by [`crate::plan`], written by [`Dataplane::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub listeners: Vec<DesiredListener>,
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
    pub vip: Ipv4Addr,
    pub port: u16,
    pub hash_source: bool,
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
}

/// Ids the maps hold, as far as they can be recognised without names.
#[derive(Clone, Debug, Default)]
pub struct MapIds {
    /// Listener id by (VIP, port).
    pub listeners: BTreeMap<(Ipv4Addr, u16), u32>,
    /// Backend id by the MAC its reals were written with.
    pub backends: BTreeMap<[u8; 6], u32>,
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

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub verdicts: Vec<u64>,
    /// Per real id.
    pub reals: BTreeMap<u32, Counters>,
    /// Per listener id (listeners in use).
    pub listeners: BTreeMap<u32, ListenerCounters>,
    /// Flow table inserts, by `lb_common::table_event`.
    pub table: Vec<u64>,
}

fn add(total: &mut Counters, c: &Counters) {
    total.packets += c.packets;
    total.bytes += c.bytes;
    total.new_flows += c.new_flows;
}

impl Stats {
    #[must_use]
    pub fn verdict(&self, reason: u32) -> u64 {
        self.verdicts.get(reason as usize).copied().unwrap_or(0)
    }

    /// Summed over a listener's reals.
    #[must_use]
    pub fn listener(&self, id: u32) -> Counters {
        let mut t = Counters::default();
        self.reals.iter().filter(|(r, _)| real_listener(**r) == id).for_each(|(_, c)| add(&mut t, c));
        t
    }

    /// Summed over a backend's reals (all its listeners).
    #[must_use]
    pub fn backend(&self, id: u32) -> Counters {
        let mut t = Counters::default();
        self.reals.iter().filter(|(r, _)| real_backend(**r) == id).for_each(|(_, c)| add(&mut t, c));
        t
    }

    /// Flow table inserts that did `event` (`lb_common::table_event`).
    #[must_use]
    pub fn table_event(&self, event: u32) -> u64 {
        self.table.get(event as usize).copied().unwrap_or(0)
    }

    /// Summed over everything forwarded.
    #[must_use]
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        self.reals.values().for_each(|c| add(&mut t, c));
        t
    }
}

/// Every pinned map of the object, in the order they are pinned and unpinned.
pub const MAP_NAMES: [&str; 14] = [
    names::LISTENERS,
    names::LISTEN_PORTS,
    names::VIPS,
    names::REALS,
    names::RINGS,
    names::FLOWS,
    names::LAYOUT,
    names::CONTROL,
    names::NODE,
    names::CONN_RATE,
    names::VERDICT_STATS,
    names::REAL_STATS,
    names::LISTENER_STATS,
    names::TABLE_STATS,
];

/// The pin of the XDP link, beside the maps' pins.
pub const LINK_PIN: &str = "link";

/// How [`Dataplane::open_pinned`] found the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Nothing usable was pinned: new maps, pinned now.
    Fresh,
    /// A live attachment and its maps were pinned: adopted, flow table and all.
    Adopted,
}

/// The maps' content as last written, so an apply writes only differences.
#[derive(Default)]
struct Written {
    /// Listener id to its `LISTENERS` value.
    listeners: BTreeMap<u32, ListenerInfo>,
    /// Content of each ring copy, by copy number (`id * RING_COPIES + copy`).
    rings: BTreeMap<u32, Vec<u32>>,
    reals: BTreeMap<u32, RealInfo>,
    vips: BTreeMap<u32, u32>,
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
}

impl Dataplane {
    /// Loads the object and its programs into the kernel; nothing is attached.
    ///
    /// # Errors
    /// When the kernel refuses the maps or a program.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        Self::load_with(opts, None)
    }

    fn load_with(opts: &LoadOptions, pin_dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let ring_entries = MAX_LISTENERS
            .checked_mul(RING_COPIES)
            .and_then(|n| n.checked_mul(ring_entries(opts.ring_size)))
            .context("ring_size too large for the rings map")?;
        ensure!(
            cfg!(target_arch = "x86_64"),
            "the flow table's lock-free slot protocol relies on x86-64 memory ordering; this is {}",
            std::env::consts::ARCH
        );
        let buckets = flow_table_buckets(opts.flow_table_size);
        let bucket_mask = buckets - 1;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::RINGS, ring_entries)
            .map_max_entries(names::FLOWS, buckets)
            .override_global("FLOW_BUCKET_MASK", &bucket_mask, true)
            .override_global("RING_SIZE", &opts.ring_size, true)
            .override_global("FLOOR_DST_MAC", &opts.floor_dst_mac, true);
        if let Some(dir) = pin_dir {
            for name in MAP_NAMES {
                // An existing pin is opened; a missing one is created and pinned.
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJ).context("loading the XDP object (maps and programs)")?;
        for name in ["dsrlb", "dsrlb_clock", "xdp_floor", "xdp_pass", "xdp_bench_flows"] {
            let prog: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?.try_into()?;
            prog.load().with_context(|| format!("verifying program {name}"))?;
        }
        if pin_dir.is_some() {
            // Pinned maps keep the size they were made with; a different config size would be
            // silently ignored, so refuse it.
            for (name, want) in [(names::RINGS, ring_entries), (names::FLOWS, buckets)] {
                let have = match ebpf.map(name) {
                    Some(aya::maps::Map::Array(m)) => m.info()?.max_entries(),
                    _ => bail!("map {name} has an unexpected type"),
                };
                ensure!(
                    have == want,
                    "the pinned {name} map has {have} entries but the config asks for {want} (ring_size or \
                     flow_table_size changed): run `dsrlb stop` to start afresh, or restore the old value"
                );
            }
        }
        let mapped = |name: &str| match ebpf.map(name) {
            Some(aya::maps::Map::Array(m)) => Mapped::new(m, name),
            _ => bail!("map {name} is missing or not an array"),
        };
        let (listeners, ports, node) = (mapped(names::LISTENERS)?, mapped(names::LISTEN_PORTS)?, mapped(names::NODE)?);
        let control = mapped(names::CONTROL)?;
        let flows = Arc::new(FlowTable::new(mapped(names::FLOWS)?, flow_seed(&mut ebpf)?));
        let ns_per_jiffy = if let Some(&n) = NS_PER_JIFFY.get() {
            n
        } else {
            let n = measure_ns_per_jiffy(&ebpf).context("measuring the kernel's clock tick")?;
            *NS_PER_JIFFY.get_or_init(|| n)
        };
        Ok(Self {
            ebpf,
            listeners,
            ports,
            node,
            control,
            ns_per_jiffy,
            flows,
            ring_size: opts.ring_size,
            written: Written::default(),
            generation: 0,
            counted: BTreeSet::new(),
        })
    }

    /// Loads with every map pinned under `dir`. When `dir` holds a live XDP link on
    /// `interface`, its maps are adopted (flow table included) and their content read back, so
    /// the next [`Self::apply`] writes only what changed; anything else pinned there is removed
    /// first and the maps start empty.
    ///
    /// # Errors
    /// When bpffs is missing, the pins do not fit the config, or loading fails.
    pub fn open_pinned(opts: &LoadOptions, dir: &std::path::Path, interface: &str) -> anyhow::Result<(Self, Start)> {
        mount_bpffs_if_needed(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        ensure!(on_bpffs(dir), "{} is not on a BPF filesystem: mount one there (mount -t bpf bpf DIR)", dir.display());
        let link = dir.join(LINK_PIN);
        let live = link.exists() && link_ifindex(&link).is_ok_and(|i| i != 0 && i == if_index(interface));
        if live {
            // Before anything is loaded over them: maps of another layout would be misread.
            let layout = dir.join(names::LAYOUT);
            ensure!(layout.exists(), "{}", stale_layout("no LAYOUT map"));
            let map = MapData::from_pin(&layout).with_context(|| format!("opening {}", layout.display()))?;
            let version = Array::<MapData, Layout>::try_from(aya::maps::Map::Array(map))?.get(&0, 0)?.version;
            ensure!(version == LAYOUT_VERSION, "{}", stale_layout(&format!("layout version {version}")));
        } else {
            unpin_all(dir)?;
        }
        let mut dp = Self::load_with(opts, Some(dir))?;
        if live {
            dp.read_back().context("reading the adopted maps")?;
        }
        Ok((dp, if live { Start::Adopted } else { Start::Fresh }))
    }

    /// Attaches the balancer through a link pinned at `dir/link`; see [`Self::attach_pinned`].
    ///
    /// # Errors
    /// When attaching, updating or pinning fails.
    pub fn attach_pinned_link(&mut self, interface: &str, mode: XdpMode, dir: &std::path::Path) -> anyhow::Result<()> {
        self.attach_pinned("dsrlb", interface, mode, &dir.join(LINK_PIN))
    }

    /// Attaches program `name` through a link pinned at `pin`, so the attachment outlives this
    /// process (removing the pin detaches it). An existing pinned link gets this program
    /// atomically (`bpf_link_update`): no packet sees a detached interface.
    ///
    /// # Errors
    /// When attaching, updating or pinning fails.
    pub fn attach_pinned(&mut self, name: &str, interface: &str, mode: XdpMode, pin: &std::path::Path) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        if pin.exists() {
            let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?;
            prog.attach_to_link(link).context("replacing the program on the pinned link")?;
        } else {
            let id = prog.attach(interface, mode).with_context(|| format!("attaching {name} to {interface} in {mode:?} mode"))?;
            let fd_link = FdLink::try_from(prog.take_link(id)?).context("the kernel gave a netlink attachment, which cannot be pinned")?;
            // Dropping the returned handle closes our fd; the pin keeps the link.
            drop(fd_link.pin(pin).with_context(|| format!("pinning the link at {}", pin.display()))?);
        }
        Ok(())
    }

    /// The program id attached now (for logs and tests).
    ///
    /// # Errors
    /// When the program is not loaded.
    pub fn program_id(&self) -> anyhow::Result<u32> {
        Ok(self.program("dsrlb").info()?.id())
    }

    /// Fills `written` from the maps, after adopting them.
    fn read_back(&mut self) -> anyhow::Result<()> {
        let size = self.ring_size;
        let mut w = Written::default();
        for id in 0..MAX_LISTENERS {
            let info = ListenerInfo::from_word(self.listeners.load(id, 0));
            if info != ListenerInfo::default() {
                w.listeners.insert(id, info);
            }
        }
        {
            let rings: Array<&MapData, RingEntry> = self.map_ref(names::RINGS)?;
            for &id in w.listeners.keys() {
                for copy in 0..RING_COPIES {
                    let base = ring_base(id, copy, size);
                    let entries = (0..ring_entries(size)).map(|e| rings.get(&(base + e), 0)).collect::<Result<Vec<RingEntry>, _>>()?;
                    w.rings.insert(id * RING_COPIES + copy, unpack_ring(&entries, size));
                }
            }
        }
        {
            let reals: Array<&MapData, RealInfo> = self.map_ref(names::REALS)?;
            for (i, r) in reals.iter().enumerate() {
                let r = r?;
                if r.flags != 0 {
                    w.reals.insert(u32::try_from(i).expect("< REAL_SLOTS"), r);
                }
            }
        }
        {
            let vips: HashMap<&MapData, u32, VipInfo> = self.map_ref(names::VIPS)?;
            for entry in &vips {
                let (k, v) = entry?;
                w.vips.insert(k, v.listeners);
            }
        }
        for slot in 0..PORT_SLOTS {
            let port = PortInfo::from_word(self.ports.load(slot, 0));
            if port != PortInfo::default() {
                w.ports.insert(slot, port);
            }
        }
        self.generation = w.ports.values().map(|p| p.tag & !FLOW_CACHE_VALID).max().unwrap_or(0);
        w.node = Some(self.read_node());
        {
            let rates: Array<&MapData, ConnRate> = self.map_ref(names::CONN_RATE)?;
            for &id in w.listeners.keys() {
                let r = rates.get(&id, 0)?;
                if r.interval_ns != 0 {
                    w.conn_rates.insert(id, ConnRateWanted { interval_ns: r.interval_ns, tolerance_ns: r.tolerance_ns });
                }
            }
        }
        let mut counted: BTreeSet<u32> = w.reals.keys().copied().collect();
        {
            let stats: PerCpuArray<&MapData, Counters> = self.map_ref(names::REAL_STATS)?;
            for id in 0..REAL_SLOTS {
                if stats.get(&id, 0)?.iter().any(|c| c.packets != 0) {
                    counted.insert(id);
                }
            }
        }
        self.counted = counted;
        self.written = w;
        Ok(())
    }

    #[must_use]
    pub const fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// One of `dsrlb`, `xdp_floor`, `xdp_pass`, `xdp_bench_flows`.
    ///
    /// # Panics
    /// On another name: the four are always in the object.
    #[must_use]
    pub fn program(&self, name: &str) -> &Xdp {
        self.ebpf.program(name).and_then(|p| p.try_into().ok()).expect("program in the object")
    }

    /// Attaches the balancer to `interface`. The attachment lasts as long as `self`.
    ///
    /// # Errors
    /// When the interface is missing or the driver refuses the mode.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        self.attach_program("dsrlb", interface, mode)
    }

    /// Attaches one of the object's programs (see [`Self::program`]) to `interface`, in the
    /// calling thread's network namespace.
    ///
    /// # Errors
    /// When the interface is missing or the driver refuses the mode.
    pub fn attach_program(&mut self, name: &str, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        prog.attach(interface, mode).with_context(|| format!("attaching XDP program {name} to {interface} in {mode:?} mode"))?;
        Ok(())
    }

    fn map_ref<'a, T>(&'a self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).with_context(|| format!("map {name} missing"))?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// Writes `want` as the difference from what was written before.
    ///
    /// Order matters for packets in flight: reals first (so no ring slot names an unset
    /// real), then each changed listener's standby ring copy, then the listener entry that
    /// switches to it in one update, and only then removals.
    ///
    /// # Errors
    /// When `want` is inconsistent (ids out of range, ring of the wrong size) or a map write
    /// fails. Validation happens before any write.
    #[expect(clippy::too_many_lines, reason = "the steps read in the order that keeps packets in flight safe")]
    pub fn apply(&mut self, want: &Desired) -> anyhow::Result<ApplyReport> {
        let size = self.ring_size as usize;
        let mut ids = BTreeSet::new();
        let mut reals: BTreeMap<u32, RealInfo> = BTreeMap::new();
        for l in &want.listeners {
            ensure!(l.id < MAX_LISTENERS, "listener id {} out of range", l.id);
            ensure!(ids.insert(l.id), "listener id {} used twice", l.id);
            ensure!(l.ring.len() == size, "listener {}: ring has {} slots, not {size}", l.id, l.ring.len());
            for r in &l.reals {
                ensure!(r.backend < MAX_BACKENDS, "backend id {} out of range", r.backend);
                let info =
                    RealInfo { dst_mac: r.dst_mac, src_mac: want.src_mac, flags: REAL_F_ACTIVE | if r.down { REAL_F_DOWN } else { 0 } };
                ensure!(reals.insert(real_id(l.id, r.backend), info).is_none(), "listener {}: backend {} twice", l.id, r.backend);
            }
            for &s in &l.ring {
                ensure!(
                    s == NO_BACKEND || l.reals.iter().any(|r| r.backend == s),
                    "listener {}: ring names backend {s}, which is not among its reals",
                    l.id
                );
            }
        }

        ensure!(want.accept_macs.len() < MAX_NODE_MACS, "at most {} accepted MACs", MAX_NODE_MACS - 1);

        let mut report = ApplyReport::default();

        // Ids given to new names: whatever the maps still hold for their reals belongs to a
        // name that is gone. Delete its flows (they would move to the newcomer) and zero its
        // counters before the newcomer's reals are written.
        if !want.fresh_backends.is_empty() || !want.fresh_listeners.is_empty() {
            let fresh =
                |real: u32| want.fresh_backends.contains(&real_backend(real)) || want.fresh_listeners.contains(&real_listener(real));
            report.flows_purged += self.flows.remove_where(|f| fresh(f.real()));
            let stale: Vec<u32> = (0..REAL_SLOTS).filter(|&r| fresh(r)).collect();
            self.zero_counters(&stale, &want.fresh_listeners)?;
            for r in &stale {
                self.written.reals.remove(r);
            }
        }

        // 0. The node's clock, MACs and the flows' expiry, before any listener can match.
        let mut node = NodeInfo { ns_per_jiffy: self.ns_per_jiffy, ..NodeInfo::default() };
        for (word, mac) in node.macs.iter_mut().zip(std::iter::once(&want.src_mac).chain(&want.accept_macs)) {
            *word = mac_word(*mac);
        }
        node.idle_expire = want.listeners.iter().map(|l| l.idle_expire).max().unwrap_or(u32::from(u16::MAX));
        if self.written.node != Some(node) {
            self.write_node(&node);
        }

        // 1. Reals that are new or changed.
        {
            let mut map: Array<&mut MapData, RealInfo> = map_mut(&mut self.ebpf, names::REALS)?;
            for (&id, info) in &reals {
                if self.written.reals.get(&id) != Some(info) {
                    map.set(id, info, 0).with_context(|| format!("writing real {id}"))?;
                    self.written.reals.insert(id, *info);
                    self.counted.insert(id);
                    report.reals_written += 1;
                }
            }
        }

        // 2. Storm control, before a listener it limits is switched on; a listener no longer
        // limited (or gone) drops its settings.
        {
            let wanted: BTreeMap<u32, ConnRateWanted> = want.listeners.iter().filter_map(|l| Some((l.id, l.conn_rate?))).collect();
            let mut map: Array<&mut MapData, ConnRate> = map_mut(&mut self.ebpf, names::CONN_RATE)?;
            for (&id, r) in &wanted {
                if self.written.conn_rates.get(&id) != Some(r) {
                    let value = ConnRate { tat_ns: 0, interval_ns: r.interval_ns, tolerance_ns: r.tolerance_ns, pad: 0 };
                    map.set(id, value, 0).with_context(|| format!("writing the storm control of listener {id}"))?;
                }
            }
            for &id in self.written.conn_rates.keys().filter(|id| !wanted.contains_key(id)) {
                map.set(id, ConnRate::default(), 0).with_context(|| format!("clearing the storm control of listener {id}"))?;
            }
            self.written.conn_rates = wanted;
        }

        // 3. Listeners: fill the standby copy, then switch to it in one store.
        for l in &want.listeners {
            let vip_be = u32::from_ne_bytes(l.vip.octets());
            let port_be = u16::from_ne_bytes(l.port.to_be_bytes());
            let flags =
                if l.hash_source { LISTENER_F_HASH_SOURCE } else { 0 } | if l.conn_rate.is_some() { LISTENER_F_CONN_RATE } else { 0 };
            let current = self.written.listeners.get(&l.id).copied();
            let ring: Vec<u32> = l.ring.iter().map(|&b| if b == NO_BACKEND { NO_BACKEND } else { real_id(l.id, b) }).collect();
            if let Some(info) = current {
                let same_ring = self.written.rings.get(&(l.id * RING_COPIES + u32::from(info.ring_copy))) == Some(&ring);
                if info.vip_be == vip_be && info.port_be == port_be && info.flags == flags && same_ring {
                    continue;
                }
            }
            let copy = current.map_or(0, |info| (u32::from(info.ring_copy) + 1) % RING_COPIES);
            let copy_no = l.id * RING_COPIES + copy;
            let base = ring_base(l.id, copy, self.ring_size);
            {
                let old = self.written.rings.entry(copy_no).or_insert_with(|| vec![0; size]).clone();
                report.ring_slots_written += ring.iter().zip(&old).filter(|(new, was)| new != was).count();
                let (new_entries, old_entries) = (pack_ring(&ring), pack_ring(&old));
                let mut rings: Array<&mut MapData, RingEntry> = map_mut(&mut self.ebpf, names::RINGS)?;
                for (e, (new, was)) in (0..).zip(new_entries.iter().zip(&old_entries)) {
                    if new != was {
                        rings.set(base + e, new, 0).with_context(|| format!("writing ring entry {e} of listener {}", l.id))?;
                    }
                }
                self.written.rings.insert(copy_no, ring);
            }
            #[expect(clippy::cast_possible_truncation, reason = "copy < RING_COPIES")]
            let info = ListenerInfo { vip_be, port_be, flags, ring_copy: copy as u8 };
            // A listener that moved stops matching frames to its old address with this store;
            // its port bits follow in step 4.
            self.listeners.store(l.id, 0, info.to_word());
            self.written.listeners.insert(l.id, info);
            report.listeners_switched += 1;
            if let Some(old) = current
                && (old.vip_be, old.port_be) != (vip_be, port_be)
            {
                report.flows_purged += self.purge_flows(old.vip_be, old.port_be);
            }
        }

        // 4. Listeners no longer wanted, and the flows that recorded them.
        let gone: Vec<u32> = self.written.listeners.keys().copied().filter(|id| !ids.contains(id)).collect();
        for id in gone {
            let old = self.written.listeners[&id];
            self.listeners.store(id, 0, ListenerInfo::default().to_word());
            self.written.listeners.remove(&id);
            report.flows_purged += self.purge_flows(old.vip_be, old.port_be);
        }

        // 5. Listener ports, tagged with the flow cache generation, and VIPs (for fragments).
        self.write_ports();
        let mut vips: BTreeMap<u32, u32> = BTreeMap::new();
        for info in self.written.listeners.values() {
            *vips.entry(info.vip_be).or_default() += 1;
        }
        {
            let mut map: HashMap<&mut MapData, u32, VipInfo> = map_mut(&mut self.ebpf, names::VIPS)?;
            for (&vip, &n) in &vips {
                if self.written.vips.get(&vip) != Some(&n) {
                    map.insert(vip, VipInfo { listeners: n }, 0).context("writing a VIP")?;
                }
            }
            for vip in self.written.vips.keys().filter(|v| !vips.contains_key(v)) {
                map.remove(vip).context("removing a VIP")?;
            }
        }
        self.written.vips = vips;

        // 6. Reals no longer wanted: inactive, so flows still pinned to them are re-picked.
        let gone: Vec<u32> = self.written.reals.keys().copied().filter(|id| !reals.contains_key(id)).collect();
        if !gone.is_empty() {
            let mut map: Array<&mut MapData, RealInfo> = map_mut(&mut self.ebpf, names::REALS)?;
            for id in gone {
                map.set(id, RealInfo { dst_mac: [0; 6], src_mac: [0; 6], flags: 0 }, 0).with_context(|| format!("clearing real {id}"))?;
                self.written.reals.remove(&id);
                report.reals_written += 1;
            }
        }
        if report.reals_written > 0 || report.flows_purged > 0 {
            // Every CPU's flow cache is stale now: a new generation invalidates it at once.
            // Written after the reals and the purges, so an entry filled before sees the old tag.
            self.generation = self.generation.wrapping_add(1) & !FLOW_CACHE_VALID;
            self.write_ports();
        }
        Ok(report)
    }

    /// Zeroes the per-CPU counters of `reals` and of `listeners`.
    fn zero_counters(&mut self, reals: &[u32], listeners: &BTreeSet<u32>) -> anyhow::Result<()> {
        use aya::maps::PerCpuValues;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        {
            let mut map: PerCpuArray<&mut MapData, Counters> = map_mut(&mut self.ebpf, names::REAL_STATS)?;
            for &r in reals.iter().filter(|r| self.counted.contains(r)) {
                let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
                map.set(r, zero, 0).with_context(|| format!("zeroing the counters of real {r}"))?;
            }
        }
        for r in reals {
            self.counted.remove(r);
        }
        let mut map: PerCpuArray<&mut MapData, ListenerCounters> = map_mut(&mut self.ebpf, names::LISTENER_STATS)?;
        for &l in listeners {
            let zero = PerCpuValues::try_from(vec![ListenerCounters::default(); cpus])?;
            map.set(l, zero, 0).with_context(|| format!("zeroing the counters of listener {l}"))?;
        }
        Ok(())
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
        let listeners =
            self.written.listeners.iter().map(|(&id, l)| ((Ipv4Addr::from(l.vip_be.to_ne_bytes()), u16::from_be(l.port_be)), id)).collect();
        let backends = self.written.reals.iter().map(|(&r, info)| (info.dst_mac, real_backend(r))).collect();
        MapIds { listeners, backends }
    }

    /// The MAC each backend id's reals were last written with (for adoption: a broker that is
    /// off when the controller restarts keeps the MAC it had).
    #[must_use]
    pub fn backend_macs(&self) -> BTreeMap<u32, [u8; 6]> {
        self.written.reals.iter().map(|(&r, info)| (real_backend(r), info.dst_mac)).collect()
    }

    /// `NODE` as it is.
    fn read_node(&self) -> NodeInfo {
        let (ns_per_jiffy, idle_expire) = lb_common::flow_meta_split(self.node.load(0, 0));
        let mut node = NodeInfo { ns_per_jiffy, idle_expire, ..NodeInfo::default() };
        for (i, word) in node.macs.iter_mut().enumerate() {
            *word = self.node.load(0, 1 + i);
        }
        node
    }

    /// Writes `NODE` word by word: a frame sees each MAC whole, old or new.
    fn write_node(&mut self, node: &NodeInfo) {
        self.node.store(0, 0, node.head());
        for (i, &word) in node.macs.iter().enumerate() {
            self.node.store(0, 1 + i, word);
        }
        self.written.node = Some(*node);
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
        Ok(lb_common::flow_age(lb_common::clock_ns(jiffies(&self.ebpf)?, self.ns_per_jiffy)))
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

    /// Makes `LISTEN_PORTS` say, for every port a listener uses, which listeners use it, with
    /// the current flow cache tag (`FLOW_CACHE_VALID | generation`) that `FLOW_CACHE` entries
    /// must carry to be used; every other slot is zero.
    fn write_ports(&mut self) {
        let tag = FLOW_CACHE_VALID | self.generation;
        let mut want: BTreeMap<u32, PortInfo> = BTreeMap::new();
        for (&id, info) in &self.written.listeners {
            want.entry(u32::from(info.port_be)).or_insert(PortInfo { tag, listeners: 0 }).listeners |= 1 << id;
        }
        for (&slot, &port) in &want {
            if self.written.ports.get(&slot) != Some(&port) {
                self.ports.store(slot, 0, port.to_word());
            }
        }
        for &slot in self.written.ports.keys().filter(|p| !want.contains_key(p)) {
            self.ports.store(slot, 0, PortInfo::default().to_word());
        }
        self.written.ports = want;
    }

    /// Deletes the flows of a listener that no longer exists at (`vip_be`, `port_be`):
    /// established flows skip the listener lookup, so they would otherwise keep being forwarded.
    fn purge_flows(&self, vip_be: u32, port_be: u16) -> usize {
        self.flows.remove_where(|f| f.key.dst_be == vip_be && f.key.dport_be == port_be)
    }

    /// Reads every counter, summed over CPUs.
    ///
    /// # Errors
    /// When a map read fails.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let verdict_map: PerCpuArray<&MapData, u64> = self.map_ref(names::VERDICT_STATS)?;
        let mut verdicts = Vec::with_capacity(reason::COUNT as usize);
        for r in 0..reason::COUNT {
            verdicts.push(verdict_map.get(&r, 0)?.iter().sum());
        }
        let map: PerCpuArray<&MapData, Counters> = self.map_ref(names::REAL_STATS)?;
        let mut reals = BTreeMap::new();
        let mut forwarded = 0;
        for &id in &self.counted {
            let mut total = Counters::default();
            for c in map.get(&id, 0)?.iter() {
                add(&mut total, c);
            }
            forwarded += total.packets;
            if self.written.reals.contains_key(&id) {
                reals.insert(id, total);
            }
        }
        // The program counts a forwarded frame once, against its real; the `tx` verdict is
        // their sum (reals removed since included).
        verdicts[reason::TX as usize] = forwarded;
        let per_listener: PerCpuArray<&MapData, ListenerCounters> = self.map_ref(names::LISTENER_STATS)?;
        let mut listeners = BTreeMap::new();
        for &id in self.written.listeners.keys() {
            let mut total = ListenerCounters::default();
            for c in per_listener.get(&id, 0)?.iter() {
                total.conn_rate_dropped += c.conn_rate_dropped;
                total.icmp_too_big += c.icmp_too_big;
            }
            listeners.insert(id, total);
        }
        let table_map: PerCpuArray<&MapData, u64> = self.map_ref(names::TABLE_STATS)?;
        let mut table = Vec::with_capacity(table_event::COUNT as usize);
        for e in 0..table_event::COUNT {
            table.push(table_map.get(&e, 0)?.iter().sum());
        }
        Ok(Stats { verdicts, reals, listeners, table })
    }

    /// Sets up the driver `xdp_bench_flows`: it jumps to program `target` (`dsrlb` or
    /// `xdp_floor`), addresses every run to this node's own MAC (as last applied), and its
    /// next run is the first of a sequence of client addresses that starts again after `wrap`
    /// runs (0: never).
    ///
    /// # Errors
    /// When the program array refuses the program or a map write fails.
    pub fn bench_flows(&mut self, target: &str, wrap: u32) -> anyhow::Result<()> {
        self.bench_driver(target, 0, wrap, false)
    }

    /// Points the driver `xdp_bench_flows` at program `target`, its sequence left as it is.
    ///
    /// # Errors
    /// When the program array refuses the program.
    pub fn bench_target(&mut self, target: &str) -> anyhow::Result<()> {
        let fd = self.program(target).fd()?.try_clone()?;
        let mut map: aya::maps::ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, "BENCH_TARGET")?;
        map.set(0, &fd, 0).with_context(|| format!("pointing xdp_bench_flows at {target}"))
    }

    /// As [`Self::bench_flows`], with the sequence's next run at `start`; with `keep` the
    /// driver only writes the MAC, and every run is the frame given.
    ///
    /// # Errors
    /// When the program array refuses the program or a map write fails.
    pub fn bench_driver(&mut self, target: &str, start: u32, wrap: u32, keep: bool) -> anyhow::Result<()> {
        let fd = self.program(target).fd()?.try_clone()?;
        let mac = self.written.node.map_or(NO_MAC, |n| n.macs[0]).to_le_bytes();
        let mut map: aya::maps::ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, "BENCH_TARGET")?;
        map.set(0, &fd, 0).with_context(|| format!("pointing xdp_bench_flows at {target}"))?;
        let mut seq: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, "BENCH_FLOWS")?;
        let words = [
            start,
            wrap,
            u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]),
            u32::from_le_bytes([mac[4], mac[5], 0, 0]),
            u32::from(keep),
        ];
        for (i, w) in (0..).zip(words) {
            seq.set(i, w, 0).context("setting up the driver's sequence")?;
        }
        Ok(())
    }

    /// The flow table's slot for a client tuple, if it holds one.
    #[must_use]
    pub fn flow(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Option<Flow> {
        self.flows.find(&flow_key(src, sport, dst, dport))
    }

    /// The two flow table buckets a client tuple may live in.
    #[must_use]
    pub fn flow_buckets(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> [u32; 2] {
        self.flows.buckets_of(&flow_key(src, sport, dst, dport))
    }

    /// Buckets in the flow table.
    #[must_use]
    pub fn flow_table_buckets(&self) -> u32 {
        self.flows.buckets()
    }

    /// The flow table, for tests that look at or set single slots.
    #[must_use]
    pub fn flow_table(&self) -> &FlowTable {
        &self.flows
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
    pub fn cached_flow(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> anyhow::Result<Vec<FlowCacheEntry>> {
        let map: PerCpuArray<&MapData, FlowCacheEntry> = self.map_ref(names::FLOW_CACHE)?;
        let key = flow_key(src, sport, dst, dport);
        let values = map.get(&flow_cache_slot(&key), 0).context("reading the flow cache")?;
        let tag = FLOW_CACHE_VALID | self.generation;
        let now = self.now_age()?;
        Ok(values.iter().filter(|e| e.key == key && e.tag == tag && u32::from(e.age) == now).copied().collect())
    }

    /// Deletes one flow the way a replacement in the table does: the per-CPU flow caches are
    /// left alone. Tests use it to tell which of the two served a frame.
    ///
    /// # Errors
    /// When the table does not hold the flow.
    pub fn evict_flow(&mut self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> anyhow::Result<()> {
        ensure!(self.flows.remove(&flow_key(src, sport, dst, dport)), "no flow {src}:{sport} -> {dst}:{dport} in the table");
        Ok(())
    }

    /// Slots in use in the flow table, closing flows included (a walk of the table).
    #[must_use]
    pub fn flow_count(&self) -> usize {
        let mut n = 0;
        self.flows.walk(|_| n += 1);
        n
    }

    /// Every slot in use in the flow table (a walk of the table).
    #[must_use]
    pub fn flows(&self) -> Vec<Flow> {
        let mut all = Vec::new();
        self.flows.walk(|f| all.push(*f));
        all
    }

    /// Empties the flow table (benchmarks start from an empty one); returns how many flows
    /// it held.
    #[expect(clippy::must_use_candidate, reason = "emptying is the point; the count is a bonus")]
    pub fn clear_flows(&self) -> usize {
        self.flows.remove_where(|_| true)
    }

    /// How many live flows point at each real (a walk of the table): not closing, and idle
    /// less than `expire(listener id)` age units at age `now`.
    #[must_use]
    pub fn flows_per_real(&self, now: u32, expire: impl Fn(u32) -> u32) -> BTreeMap<u32, usize> {
        self.flows.live_per_real(now, expire)
    }
}

/// 10^9 / HZ, measured once per process (the tick rate does not change while the kernel runs).
static NS_PER_JIFFY: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The kernel's `jiffies`, read by running `dsrlb_clock`.
fn jiffies(ebpf: &Ebpf) -> anyhow::Result<u64> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let prog: &Xdp = ebpf.program("dsrlb_clock").and_then(|p| p.try_into().ok()).context("program dsrlb_clock missing")?;
    let frame = [0u8; 64];
    prog.test_run(TestRunOptions { data_in: Some(&frame), ..TestRunOptions::default() }).context("running dsrlb_clock")?;
    let map: Array<&MapData, u64> = Array::try_from(ebpf.map(names::CLOCK).context("map CLOCK missing")?)?;
    map.get(&0, 0).context("reading CLOCK")
}

/// 10^9 / the kernel's HZ: jiffies counted over 200 ms of the monotonic clock, taken as the
/// nearest common HZ (100, 250, 300, 1000) when within 10% of one.
fn measure_ns_per_jiffy(ebpf: &Ebpf) -> anyhow::Result<u32> {
    let (t0, j0) = (std::time::Instant::now(), jiffies(ebpf)?);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (t1, j1) = (std::time::Instant::now(), jiffies(ebpf)?);
    let hz = (j1 - j0) as f64 / t1.duration_since(t0).as_secs_f64();
    ensure!(hz >= 10.0, "the kernel's jiffies moved {} in {:?}", j1 - j0, t1 - t0);
    let known =
        [100.0, 250.0, 300.0, 1000.0].into_iter().min_by(|a: &f64, b: &f64| (a - hz).abs().total_cmp(&(b - hz).abs())).unwrap_or(hz);
    let hz = if (known - hz).abs() / known < 0.1 { known } else { hz.round() };
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "10^9 / HZ for HZ >= 10")]
    let ns = (1e9 / hz).round() as u32;
    tracing::debug!(hz, ns_per_jiffy = ns, "kernel clock tick");
    Ok(ns)
}

/// The flow table's hash seed: read from `LAYOUT`, or, for maps just made (version 0), drawn
/// from the kernel's random source and written there with this build's layout version.
fn flow_seed(ebpf: &mut Ebpf) -> anyhow::Result<u64> {
    let mut map: Array<&mut MapData, Layout> = map_mut(ebpf, names::LAYOUT)?;
    let layout = map.get(&0, 0).context("reading LAYOUT")?;
    if layout.version != 0 {
        ensure!(layout.version == LAYOUT_VERSION, "{}", stale_layout(&format!("layout version {}", layout.version)));
        return Ok(layout.flow_seed);
    }
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    ensure!(n == 8, "getrandom: {}", std::io::Error::last_os_error());
    let flow_seed = u64::from_ne_bytes(bytes) | 1;
    map.set(0, Layout { version: LAYOUT_VERSION, flow_seed }, 0).context("writing LAYOUT")?;
    Ok(flow_seed)
}

/// Why pinned maps are refused, and what to do.
fn stale_layout(what: &str) -> String {
    format!(
        "the pinned maps were made by another dsrlb ({what}; this one reads layout version {LAYOUT_VERSION}): run \
         `dsrlb stop` and start again (the flow table starts empty; connections keep their brokers as long as the \
         backend set does not change meanwhile)"
    )
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// `xdp_mode` in the config to aya's mode.
#[must_use]
pub const fn xdp_mode(mode: crate::config::XdpModeCfg) -> XdpMode {
    match mode {
        crate::config::XdpModeCfg::Auto => XdpMode::Default,
        crate::config::XdpModeCfg::Native => XdpMode::Driver,
        crate::config::XdpModeCfg::Generic => XdpMode::Skb,
    }
}

/// Reads an interface's MAC with `SIOCGIFHWADDR`, in the calling thread's network namespace
/// (sysfs would show the namespace it was mounted in, which `nsenter --net` does not change).
///
/// # Errors
/// When the interface does not exist or has no Ethernet address.
pub fn interface_mac(interface: &str) -> anyhow::Result<[u8; 6]> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    ensure!(!interface.is_empty() && interface.len() < libc::IFNAMSIZ, "bad interface name {interface:?}");
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked length, zeroed rest).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc != 0 {
        bail!("no interface {interface}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    ensure!(hw.sa_family == libc::ARPHRD_ETHER, "interface {interface} is not Ethernet (hardware type {})", hw.sa_family);
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = src.to_ne_bytes()[0];
    }
    Ok(mac)
}

/// The IPv4 addresses of `interface` (`getifaddrs`), in the calling thread's network namespace.
///
/// # Errors
/// When the kernel's address list cannot be read.
pub fn interface_ipv4s(interface: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    ensure!(unsafe { libc::getifaddrs(&raw mut head) } == 0, "getifaddrs: {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs made; its name is a C string, its address (when
        // not null) a sockaddr of the family it says, here AF_INET.
        unsafe {
            let ifa = &*at;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name);
            if name.to_bytes() == interface.as_bytes() && !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>());
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Removes the link pin first (detaching the program, unless a process still holds the link),
/// then the maps' pins. Missing pins are fine.
///
/// # Errors
/// When a pin exists and cannot be removed.
pub fn unpin_all(dir: &std::path::Path) -> anyhow::Result<()> {
    for name in std::iter::once(LINK_PIN).chain(MAP_NAMES) {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf when `dir` lives there and nothing is mounted yet.
fn mount_bpffs_if_needed(dir: &std::path::Path) -> anyhow::Result<()> {
    let root = std::path::Path::new(BPFFS);
    if !dir.starts_with(root) || on_bpffs(root) {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: valid NUL-terminated strings; no mount data.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting bpffs on {BPFFS}: {} (run as root, or mount -t bpf bpf {BPFFS})", std::io::Error::last_os_error());
    }
    tracing::info!("mounted bpffs on {BPFFS}");
    Ok(())
}

fn on_bpffs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: a zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0) && st.f_type == BPF_FS_MAGIC
}

fn if_index(interface: &str) -> u32 {
    // SAFETY: a valid C string.
    std::ffi::CString::new(interface).map_or(0, |c| unsafe { libc::if_nametoindex(c.as_ptr()) })
}

/// The interface index a pinned XDP link is attached to; 0 once its interface is gone. aya
/// does not expose it, so this asks the kernel directly (`BPF_OBJ_GET`, then
/// `BPF_OBJ_GET_INFO_BY_FD`; `bpf_link_info.xdp.ifindex` sits at offset 16).
fn link_ifindex(pin: &std::path::Path) -> std::io::Result<u32> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zero-padded attr of the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(std::io::Error::other)?) };
    let mut info = [0u32; 32];
    // For BPF_OBJ_GET_INFO_BY_FD: bpf_fd (u32), info_len (u32), info (u64).
    let mut attr = [0u64; 16];
    attr[0] = u64::from(u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(std::io::Error::other)?)
        | (u64::try_from(std::mem::size_of_val(&info)).map_err(std::io::Error::other)? << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: as above; the kernel writes at most info_len bytes into `info`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // type (u32), id, prog_id, pad, then the union: xdp.ifindex.
    const BPF_LINK_TYPE_XDP: u32 = 6;
    if info[0] != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::other(format!("{} is not an XDP link (type {})", pin.display(), info[0])));
    }
    Ok(info[4])
}

/// A ring (real ids, `NO_BACKEND` for none) as `RINGS` entries, four slots each.
fn pack_ring(ring: &[u32]) -> Vec<RingEntry> {
    ring.chunks(RING_SLOTS_PER_ENTRY as usize)
        .map(|chunk| {
            let mut entry = [RING_NONE; RING_SLOTS_PER_ENTRY as usize];
            for (lane, &id) in entry.iter_mut().zip(chunk) {
                *lane = u16::try_from(id).unwrap_or(RING_NONE);
            }
            entry
        })
        .collect()
}

/// The ring of `ring_size` slots that `RINGS` entries hold.
fn unpack_ring(entries: &[RingEntry], ring_size: u32) -> Vec<u32> {
    entries.iter().flatten().take(ring_size as usize).map(|&id| if id == RING_NONE { NO_BACKEND } else { u32::from(id) }).collect()
}

/// The `FLOWS` key of a client tuple.
fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        src_be: u32::from_ne_bytes(src.octets()),
        dst_be: u32::from_ne_bytes(dst.octets()),
        sport_be: u16::from_ne_bytes(sport.to_be_bytes()),
        dport_be: u16::from_ne_bytes(dport.to_be_bytes()),
    }
}
