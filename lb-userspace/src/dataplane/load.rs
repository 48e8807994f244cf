//! Loading the object, pinning its maps, adopting pins a live balancer left, attaching through a
//! pinned link, and the clock the program keeps.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, LinkType, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    ConnRate, Counters, FLOW_CACHE_VALID, FLOW_WAYS, Ip6, LAYOUT_VERSION, LAYOUT_VERSION_ADOPTED, LISTENER_F_IPV6, Layout, ListenerInfo,
    MAX_LISTENERS, PORT_SLOTS, PortInfo, REAL_SLOTS, RING_COPIES, RealInfo, RealTunnel, RingEntry, VipInfo, flow_table_buckets,
    map_names as names, reason, ring_base, ring_entries,
};

use super::{ConnRateWanted, Dataplane, LoadOptions, Object, Written, apply::unpack_ring, map_mut};
use crate::{EBPF_OBJ, EBPF_OBJ_ORDERED, flow_table::FlowTable, mapped::Mapped};

/// Every pinned map of the object, in the order they are pinned and unpinned.
pub const MAP_NAMES: [&str; 19] = [
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
    names::LISTENER_VIP6,
    names::VIPS6,
    names::FLOW_ADDRS6,
    names::REAL_TUNNELS,
    // Pinned so that it outlives the controller: the kernel empties a program array when the
    // last of its file descriptors and pins goes, and the program's own reference does not count.
    names::NEXT,
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

impl Dataplane {
    pub(super) fn load_with(opts: LoadOptions, pin_dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let ring_entries = MAX_LISTENERS
            .checked_mul(RING_COPIES)
            .and_then(|n| n.checked_mul(ring_entries(opts.ring_size)))
            .context("ring_size too large for the rings map")?;
        let object = object_for(opts.object, std::env::consts::ARCH, &kernel_release())?;
        let buckets = flow_table_buckets(opts.flow_table_size);
        let bucket_mask = buckets - 1;
        let flow_slots = u32::try_from(FLOW_WAYS)
            .ok()
            .and_then(|ways| buckets.checked_mul(ways))
            .context("flow_table_size too large for the flow addresses map")?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::RINGS, ring_entries)
            .map_max_entries(names::FLOWS, buckets)
            .map_max_entries(names::FLOW_ADDRS6, flow_slots)
            .override_global("FLOW_BUCKET_MASK", &bucket_mask, true)
            .override_global("RING_SIZE", &opts.ring_size, true);
        if let Some(dir) = pin_dir {
            for name in MAP_NAMES {
                // An existing pin is opened; a missing one is created and pinned.
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(object).with_context(|| format!("loading the XDP object {} (maps and programs)", opts.object.name()))?;
        for name in ["dsrlb", "dsrlb_clock"] {
            let prog: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?.try_into()?;
            prog.load().with_context(|| format!("verifying program {name}"))?;
        }
        if pin_dir.is_some() {
            // Pinned maps keep the size they were made with; a different config size would be
            // silently ignored, so refuse it.
            for (name, want) in [(names::RINGS, ring_entries), (names::FLOWS, buckets), (names::FLOW_ADDRS6, flow_slots)] {
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
        let flows = Arc::new(FlowTable::new(mapped(names::FLOWS)?, mapped(names::FLOW_ADDRS6)?, flow_seed(&mut ebpf)?));
        let tracer = Some(super::trace::Tracer::take(&mut ebpf)?);
        let events = super::events::EventSink::default();
        let logger =
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, events.clone()).context("opening the program's event log (AYA_LOGS)")?;
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
            probe_encap: None,
            generation: 0,
            counted: BTreeSet::new(),
            logger,
            events,
            tracer,
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
        let live = link_live(dir, interface);
        if live {
            // Before anything is loaded over them: maps of another layout would be misread.
            let layout = dir.join(names::LAYOUT);
            ensure!(layout.exists(), "{}", stale_layout("no LAYOUT map"));
            let map = MapData::from_pin(&layout).with_context(|| format!("opening {}", layout.display()))?;
            let version = Array::<MapData, Layout>::try_from(aya::maps::Map::Array(map))?.get(&0, 0)?.version;
            ensure!(adoptable(version), "{}", stale_layout(&format!("layout version {version}")));
            drop_outgrown_counters(dir)?;
        } else {
            unpin_all(dir)?;
        }
        let mut dp = Self::load_with(*opts, Some(dir))?;
        if live {
            dp.read_back().context("reading the adopted maps")?;
        }
        Ok((dp, if live { Start::Adopted } else { Start::Fresh }))
    }

    /// Attaches `dsrlb_probe_encap` to `interface`'s TC egress (TCX), once: the health probes of
    /// tunnelled backends are wrapped there (see the program's module). The link lives as long
    /// as this `Dataplane` (the controller): probes need it only while it runs.
    ///
    /// # Errors
    /// When the program does not verify or the kernel refuses the attachment (TCX needs Linux
    /// 6.6).
    pub fn attach_probe_encap(&mut self, interface: &str) -> anyhow::Result<()> {
        use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
        if self.probe_encap.as_deref() == Some(interface) {
            return Ok(());
        }
        let prog: &mut SchedClassifier =
            self.ebpf.program_mut("dsrlb_probe_encap").context("program dsrlb_probe_encap missing from the object")?.try_into()?;
        if prog.fd().is_err() {
            prog.load().context("verifying program dsrlb_probe_encap")?;
        }
        prog.attach_with_options(interface, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("attaching the probe encapsulation to {interface}'s TC egress (TCX, Linux 6.6 or later)"))?;
        tracing::info!(%interface, "health probes to tunnelled backends are wrapped on TC egress");
        self.probe_encap = Some(interface.to_owned());
        Ok(())
    }

    /// Attaches the balancer through a link pinned at `dir/link`; see [`Self::attach_pinned`].
    ///
    /// # Errors
    /// When attaching, updating or pinning fails.
    /// An interface that runs another XDP program is refused, unless that program is `next`
    /// (attached through netlink, as xdp-filter does): it is detached, if it is still that
    /// program, and the balancer attached in its place, passing it every frame it does not take.
    /// Frames that arrive between the two see no program.
    pub fn attach_pinned_link(
        &mut self,
        interface: &str,
        mode: XdpMode,
        dir: &std::path::Path,
        next: Option<&super::chain::Next>,
    ) -> anyhow::Result<()> {
        let pin = dir.join(LINK_PIN);
        let mut taken = None;
        if !pin.exists()
            && let Some(there) = super::chain::attached(interface)?
        {
            match next {
                Some(n) if n.id == there.prog_id => {
                    super::chain::detach(interface, there)?;
                    taken = Some(there);
                    tracing::info!(program = n.id, name = %n.name, %interface, "took over the interface from the next program");
                }
                _ => bail!(
                    "{interface} already runs XDP program {} ({}): to run it after the balancer, pin it and name the pin in \
                     next_program; or unload it first",
                    there.prog_id,
                    program_name(there.prog_id)
                ),
            }
        }
        let attached = self.attach_pinned("dsrlb", interface, mode, &pin);
        if attached.is_err()
            && let Some(there) = taken
        {
            // The interface is not left without the program it had.
            match super::chain::attach_id(interface, there.prog_id, there.mode_flag) {
                Ok(()) => {
                    tracing::warn!(program = there.prog_id, %interface, "attaching failed: the next program is back on the interface");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), program = there.prog_id, %interface, "attaching failed, and putting the next program back failed too");
                }
            }
        }
        attached
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
            let tunnels: Array<&MapData, RealTunnel> = self.map_ref(names::REAL_TUNNELS)?;
            for (i, t) in tunnels.iter().enumerate() {
                let t = t?;
                if t != RealTunnel::default() {
                    w.tunnels.insert(u32::try_from(i).expect("< REAL_SLOTS"), t);
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
        {
            let vips: HashMap<&MapData, Ip6, VipInfo> = self.map_ref(names::VIPS6)?;
            for entry in &vips {
                let (k, v) = entry?;
                w.vips6.insert(k.words(), v.listeners);
            }
            let listener_vip6: Array<&MapData, Ip6> = self.map_ref(names::LISTENER_VIP6)?;
            for (&id, info) in &w.listeners {
                if info.flags & LISTENER_F_IPV6 != 0 {
                    w.vip6.insert(id, listener_vip6.get(&id, 0)?.words());
                }
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
}

/// 10^9 / HZ, measured once per process (the tick rate does not change while the kernel runs).
static NS_PER_JIFFY: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The kernel's `jiffies`, read by running `dsrlb_clock`.
pub(super) fn jiffies(ebpf: &Ebpf) -> anyhow::Result<u64> {
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
        // An older layout's states read the same here (`lb_common::LAYOUT_VERSION`); the maps
        // are marked this layout's once this build's program runs on them
        // (`Dataplane::mark_layout`): an upgrade that fails before then can still go back.
        ensure!(adoptable(layout.version), "{}", stale_layout(&format!("layout version {}", layout.version)));
        return Ok(layout.flow_seed);
    }
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the kernel's random source gave no bytes"))?;
    let flow_seed = u64::from_ne_bytes(bytes) | 1;
    map.set(0, Layout { version: LAYOUT_VERSION, flow_seed }, 0).context("writing LAYOUT")?;
    Ok(flow_seed)
}

impl Dataplane {
    /// Marks the maps this build's layout (`lb_common::LAYOUT_VERSION`), once its program is
    /// attached: an older controller refuses them from then on, whose program would misread
    /// the states this one writes.
    ///
    /// # Errors
    /// When `LAYOUT` cannot be read or written.
    pub fn mark_layout(&mut self) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, Layout> = map_mut(&mut self.ebpf, names::LAYOUT)?;
        let layout = map.get(&0, 0).context("reading LAYOUT")?;
        if layout.version != LAYOUT_VERSION {
            map.set(0, Layout { version: LAYOUT_VERSION, ..layout }, 0).context("writing LAYOUT")?;
            tracing::info!(from = layout.version, to = LAYOUT_VERSION, "the adopted maps now carry this build's layout version");
        }
        Ok(())
    }
}

/// Removes the pin of a counters map made by an older build with fewer entries than this one
/// counts (`VERDICT_STATS` grows with each new reason): the new map starts from zero, and the
/// running program keeps counting into the old one until it is replaced. Nothing else is lost.
fn drop_outgrown_counters(dir: &std::path::Path) -> anyhow::Result<()> {
    let pin = dir.join(names::VERDICT_STATS);
    if !pin.exists() {
        return Ok(());
    }
    let map = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let have = map.info().context("reading the pinned counters' size")?.max_entries();
    if have < reason::COUNT {
        tracing::info!(have, want = reason::COUNT, "the pinned verdict counters are of an older build: they start again from zero");
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    Ok(())
}

/// Whether this build adopts maps of layout `version`.
const fn adoptable(version: u64) -> bool {
    version >= LAYOUT_VERSION_ADOPTED && version <= LAYOUT_VERSION
}

/// Why pinned maps are refused, and what to do.
fn stale_layout(what: &str) -> String {
    format!(
        "the pinned maps were made by another dsrlb ({what}; this one reads layout version {LAYOUT_VERSION}): run \
         `dsrlb stop` and start again (the flow table starts empty; connections keep their brokers as long as the \
         backend set does not change meanwhile)"
    )
}

/// Frames the pinned program has forwarded so far (every real's counters, all CPUs): how
/// `dsrlb stop` without a controller sees the traffic stop after it withdrew the VIPs.
///
/// # Errors
/// When the pinned counters cannot be read.
pub fn pinned_forwarded(dir: &std::path::Path) -> anyhow::Result<u64> {
    let path = dir.join(names::REAL_STATS);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let stats = PerCpuArray::<MapData, Counters>::try_from(aya::maps::Map::PerCpuArray(map))?;
    let mut total = 0u64;
    for i in 0..REAL_SLOTS {
        total += stats.get(&i, 0)?.iter().map(|c| c.packets).sum::<u64>();
    }
    Ok(total)
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
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0) && st.f_type == libc::BPF_FS_MAGIC
}

/// Whether the link pinned in `dir` is attached to `interface`: an XDP link whose program is
/// the one the interface runs (a link whose interface went away, or that someone detached, is
/// not: the interface runs no program, or another).
#[must_use]
pub fn link_live(dir: &std::path::Path, interface: &str) -> bool {
    let pin = dir.join(LINK_PIN);
    if !pin.exists() {
        return false;
    }
    let Ok(info) = PinnedLink::from_pin(&pin).map(FdLink::from).and_then(|link| link.info()) else { return false };
    matches!(info.link_type(), Ok(LinkType::Xdp))
        && super::chain::attached(interface).ok().flatten().is_some_and(|there| there.prog_id == info.program_id())
}

/// The name of loaded program `id`, for messages.
fn program_name(id: u32) -> String {
    super::chain::program_info(id).ok().and_then(|p| p.name_as_str().map(str::to_owned)).unwrap_or_else(|| "name unknown".to_owned())
}

/// The kernel's release (`uname -r`), or "" when it cannot be read.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The first kernel with BPF load-acquire and store-release (the ordered object's).
const ORDERED_KERNEL: (u32, u32) = (6, 15);

/// The object `want` for this CPU (`arch`) and kernel (`release`), or why it cannot run: the
/// plain object's flow table protocol relies on x86-64's memory ordering, and the ordered
/// object's instructions need Linux 6.15 (on arm64 or x86-64).
fn object_for(want: Object, arch: &str, release: &str) -> anyhow::Result<&'static [u8]> {
    match want {
        Object::Plain => {
            ensure!(
                arch == "x86_64",
                "the plain XDP object's flow table relies on x86-64 memory ordering and this CPU is {arch}: it takes the ordered object"
            );
            Ok(EBPF_OBJ)
        }
        Object::Ordered => {
            // Linux 6.15 JIT-compiles load-acquire and store-release on arm64 and x86-64; other
            // CPUs' JITs came later, and nothing here has run there.
            ensure!(matches!(arch, "aarch64" | "x86_64"), "dsrlb runs on x86-64 and arm64; this CPU is {arch}");
            let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().ok());
            let version = parts.next().flatten().zip(parts.next().flatten());
            let why = if arch == "x86_64" { String::new() } else { format!("this CPU ({arch}) orders memory weakly: ") };
            ensure!(
                version.is_some_and(|v| v >= ORDERED_KERNEL),
                "{why}the ordered XDP object needs BPF load-acquire and store-release, which Linux {}.{} brought; this kernel is {}",
                ORDERED_KERNEL.0,
                ORDERED_KERNEL.1,
                if release.is_empty() { "of an unknown release" } else { release }
            );
            Ok(EBPF_OBJ_ORDERED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x86-64 takes either object; any other CPU only the ordered one, from Linux 6.15, and is
    /// told why otherwise.
    #[test]
    fn the_object_fits_the_cpu_and_kernel() {
        assert!(std::ptr::eq(object_for(Object::Plain, "x86_64", "5.10.0-28-amd64").unwrap(), EBPF_OBJ));
        assert!(std::ptr::eq(object_for(Object::Ordered, "x86_64", "6.18.44-fc-v1045").unwrap(), EBPF_OBJ_ORDERED));
        assert!(std::ptr::eq(object_for(Object::Ordered, "aarch64", "7.2.0-1-arm64").unwrap(), EBPF_OBJ_ORDERED));
        assert!(std::ptr::eq(object_for(Object::Ordered, "aarch64", "6.15.0").unwrap(), EBPF_OBJ_ORDERED));
        let plain = object_for(Object::Plain, "aarch64", "7.2.0").unwrap_err().to_string();
        assert!(plain.contains("aarch64") && plain.contains("ordered object"), "{plain}");
        let old = object_for(Object::Ordered, "aarch64", "6.14.11-arm64").unwrap_err().to_string();
        assert!(old.contains("aarch64") && old.contains("6.15") && old.contains("6.14.11-arm64"), "{old}");
        let other = object_for(Object::Ordered, "riscv64", "7.2.0").unwrap_err().to_string();
        assert!(other.contains("riscv64"), "{other}");
        let unknown = object_for(Object::Ordered, "aarch64", "").unwrap_err().to_string();
        assert!(unknown.contains("unknown release"), "{unknown}");
        let native = if cfg!(target_arch = "x86_64") { Object::Plain } else { Object::Ordered };
        assert_eq!(Object::native(), native, "the object a {} build loads", std::env::consts::ARCH);
    }
}
