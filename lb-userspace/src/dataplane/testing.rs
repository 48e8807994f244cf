//! Hooks for tests and benchmarks, not part of the production API (feature `testing`): a
//! balancer loaded without pins, its programs by name, single flows evicted or read raw, and the
//! test object (`dsrlb-test`: the floor program, the benchmark driver, a pass-all program, the
//! adoption witness).

use std::net::IpAddr;

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{Xdp, XdpMode},
};

use super::{Dataplane, LoadOptions, map_mut};
use crate::flow_table::{Flow, FlowTable};

/// The test object loaded: the floor program (`xdp_floor`), the benchmark driver
/// (`xdp_bench_flows`, which tail-calls a balancer's `dsrlb` or the floor) and `xdp_pass`.
pub struct TestPrograms {
    ebpf: Ebpf,
}

impl TestPrograms {
    /// Loads the test object; the floor program writes `floor_dst_mac` as every frame's
    /// destination.
    ///
    /// # Errors
    /// When the kernel refuses it.
    pub fn load(floor_dst_mac: [u8; 6]) -> anyhow::Result<Self> {
        let mut ebpf =
            EbpfLoader::new().override_global("FLOOR_DST_MAC", &floor_dst_mac, true).load(TEST_OBJ).context("loading dsrlb-test")?;
        for name in ["xdp_floor", "xdp_floor_adjust", "xdp_pass", "xdp_bench_flows", "xdp_bench_redo"] {
            let prog: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("program {name} missing"))?.try_into()?;
            prog.load().with_context(|| format!("verifying program {name}"))?;
        }
        Ok(Self { ebpf })
    }

    /// One of `xdp_floor`, `xdp_floor_adjust`, `xdp_pass`, `xdp_bench_flows`, `xdp_bench_redo`.
    ///
    /// # Panics
    /// On another name.
    #[must_use]
    pub fn program(&self, name: &str) -> &Xdp {
        self.ebpf.program(name).and_then(|p| p.try_into().ok()).expect("program in dsrlb-test")
    }

    /// Attaches program `name` to `interface` in the calling thread's namespace, for as long as
    /// `self` lives; or, with `pin`, through a link pinned there, which outlives it.
    ///
    /// # Errors
    /// When attaching or pinning fails.
    pub fn attach(&mut self, name: &str, interface: &str, mode: XdpMode, pin: Option<&std::path::Path>) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        let id = prog.attach(interface, mode).with_context(|| format!("attaching {name} to {interface} in {mode:?} mode"))?;
        if let Some(pin) = pin {
            let link = aya::programs::links::FdLink::try_from(prog.take_link(id)?).context("the kernel gave a netlink attachment")?;
            drop(link.pin(pin).with_context(|| format!("pinning the link at {}", pin.display()))?);
        }
        Ok(())
    }

    /// Sets up the driver `xdp_bench_flows`: it addresses every run to `dp`'s own MAC, jumps to
    /// `dp`'s balancer (or, with `floor`, to the floor program), and its next run is tuple
    /// `start` of its sequence, which starts again after `wrap` runs (0: never); with `keep` it
    /// only writes the MAC, and every run is the frame given.
    ///
    /// # Errors
    /// When the program array refuses the program or a map write fails.
    pub fn drive(&mut self, dp: &Dataplane, floor: bool, start: u32, wrap: u32, keep: bool) -> anyhow::Result<()> {
        self.target(dp, floor)?;
        let mac = dp.own_mac();
        let mut seq: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, "BENCH_FLOWS")?;
        let words = [
            start,
            wrap,
            u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]),
            u32::from_le_bytes([mac[4], mac[5], 0, 0]),
            u32::from(keep),
            RESTORE_NONE,
            0,
            0,
            0,
        ];
        for (i, w) in (0..).zip(words) {
            seq.set(i, w, 0).context("setting up the driver's sequence")?;
        }
        Ok(())
    }

    /// As [`Self::drive`] with a sequence per CPU: CPU `i` runs tuples `bases[i]` onwards (its
    /// `next` back to 0 after `wrap` runs, 0: never), so CPUs driven at once share no tuple
    /// and no counter.
    ///
    /// # Errors
    /// When a map write fails or `bases` does not name every CPU.
    pub fn drive_per_cpu(&mut self, dp: &Dataplane, bases: &[u32], wrap: u32) -> anyhow::Result<()> {
        use aya::maps::{PerCpuArray, PerCpuValues};
        self.drive(dp, false, 0, wrap, false)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        ensure!(bases.len() >= cpus, "{} bases for {cpus} CPUs", bases.len());
        let values = PerCpuValues::try_from(bases[..cpus].iter().map(|&b| [0, b]).collect::<Vec<[u32; 2]>>())?;
        let mut per: PerCpuArray<&mut MapData, [u32; 2]> = map_mut(&mut self.ebpf, "BENCH_CPU")?;
        per.set(0, values, 0).context("setting the per-CPU sequences")?;
        let mut seq: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, "BENCH_FLOWS")?;
        seq.set(8, 1, 0).context("switching the driver to per-CPU sequences")
    }

    /// Makes the driver undo, before every run but the first, what the last run did to the
    /// frame's length (`BPF_PROG_TEST_RUN` runs each repeat on the previous output): `Unwrap`
    /// strips the `bytes` of outer headers a tunnel added; `Rewrap(header)` puts back the
    /// Ethernet and outer headers (14 + `bytes`) a decap removed; `None` undoes nothing. The next
    /// run is a first run again.
    ///
    /// # Errors
    /// When a map write fails or `bytes` is no tunnel's overhead.
    pub fn restore(&mut self, how: Restore<'_>) -> anyhow::Result<()> {
        let (mode, bytes) = match how {
            Restore::None => (RESTORE_NONE, 0),
            Restore::Unwrap(bytes) => (RESTORE_UNWRAP, bytes),
            Restore::Rewrap(header) => {
                let bytes = u32::try_from(header.len()).unwrap_or(0).saturating_sub(14);
                ensure!(matches!(bytes, 20 | 28 | 40 | 48), "a rewrap header of {} bytes", header.len());
                let mut words = [0u16; 32];
                for (w, pair) in words.iter_mut().zip(header.chunks(2)) {
                    *w = u16::from_ne_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
                }
                let mut wrap: Array<&mut MapData, [u16; 32]> = map_mut(&mut self.ebpf, "BENCH_WRAP")?;
                wrap.set(0, words, 0).context("storing the rewrap header")?;
                (RESTORE_REWRAP, bytes)
            }
        };
        ensure!(mode == RESTORE_NONE || matches!(bytes, 20 | 28 | 40 | 48), "{bytes} bytes is no tunnel's overhead");
        let mut seq: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, "BENCH_FLOWS")?;
        for (i, w) in [(5, mode), (6, bytes), (7, 0)] {
            seq.set(i, w, 0).context("setting up the driver's restore")?;
        }
        Ok(())
    }

    /// Points the driver at `program` (say, the decap program) instead of a balancer.
    ///
    /// # Errors
    /// When the program array refuses the program.
    pub fn target_program(&mut self, program: &Xdp) -> anyhow::Result<()> {
        let fd = program.fd()?.try_clone()?;
        let mut map: aya::maps::ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, "BENCH_TARGET")?;
        map.set(0, &fd, 0).context("pointing xdp_bench_flows at its target")
    }

    /// Points the driver at the test object's `xdp_bench_redo`: the control for its undo.
    ///
    /// # Errors
    /// When the program array refuses the program.
    pub fn target_redo(&mut self) -> anyhow::Result<()> {
        let fd = self.program("xdp_bench_redo").fd()?.try_clone()?;
        let mut map: aya::maps::ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, "BENCH_TARGET")?;
        map.set(0, &fd, 0).context("pointing xdp_bench_flows at its target")
    }

    /// Points the driver at `dp`'s balancer, or at the floor; its sequence is left as it is.
    ///
    /// # Errors
    /// When the program array refuses the program.
    pub fn target(&mut self, dp: &Dataplane, floor: bool) -> anyhow::Result<()> {
        let fd = if floor { self.program("xdp_floor").fd()?.try_clone()? } else { dp.balancer().fd()?.try_clone()? };
        let mut map: aya::maps::ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, "BENCH_TARGET")?;
        map.set(0, &fd, 0).context("pointing xdp_bench_flows at its target")
    }
}

/// The test object's `xdp_adopt_witness` on a running balancer's pinned link, in place of its
/// program, reading its pinned `REALS`: what an older build's program would see while a
/// controller adopts the pins.
pub struct AdoptWitness {
    ebpf: Ebpf,
}

impl AdoptWitness {
    /// Puts the witness on the link pinned in `pins`, watching real `real`.
    ///
    /// # Errors
    /// When `pins` holds no link or `REALS`, or the kernel refuses the program.
    pub fn replace(pins: &std::path::Path, real: u32) -> anyhow::Result<Self> {
        use aya::programs::{
            links::{FdLink, PinnedLink},
            xdp::XdpLink,
        };
        let reals = pins.join(lb_common::map_names::REALS);
        ensure!(reals.exists(), "no REALS pinned in {}", pins.display());
        let mut ebpf = EbpfLoader::new()
            .override_global("FLOOR_DST_MAC", &[0u8; 6], true)
            .map_pin_path(lb_common::map_names::REALS, &reals)
            .load(TEST_OBJ)
            .context("loading dsrlb-test")?;
        let mut watch: Array<&mut MapData, u32> = map_mut(&mut ebpf, "ADOPT_WATCH")?;
        watch.set(0, real, 0).context("writing ADOPT_WATCH")?;
        let prog: &mut Xdp = ebpf.program_mut("xdp_adopt_witness").context("program xdp_adopt_witness missing")?.try_into()?;
        prog.load().context("verifying xdp_adopt_witness")?;
        let pin = pins.join(super::LINK_PIN);
        let link = XdpLink::try_from(FdLink::from(PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?))
            .context("the pinned link is not an XDP link")?;
        prog.attach_to_link(link).context("replacing the program on the pinned link")?;
        Ok(Self { ebpf })
    }

    /// Frames the witness saw, and those of them that found the watched real tunnelled.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let map: aya::maps::PerCpuArray<&MapData, u64> =
            aya::maps::PerCpuArray::try_from(self.ebpf.map("ADOPT_SEEN").context("map ADOPT_SEEN")?)?;
        let sum = |i: u32| map.get(&i, 0).map(|v| v.iter().sum::<u64>());
        Ok((sum(0)?, sum(1)?))
    }
}

/// What the driver undoes before each run (see [`TestPrograms::restore`]).
#[derive(Clone, Copy, Debug)]
pub enum Restore<'a> {
    None,
    Unwrap(u32),
    Rewrap(&'a [u8]),
}

const RESTORE_NONE: u32 = 0;
const RESTORE_UNWRAP: u32 = 1;
const RESTORE_REWRAP: u32 = 2;

/// The test object, built beside the production one.
pub static TEST_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsrlb-test"));

impl Dataplane {
    /// Loads the object and its programs into the kernel; nothing is attached.
    ///
    /// # Errors
    /// When the kernel refuses the maps or a program.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        Self::load_with(*opts, None)
    }

    /// The balancer program (`dsrlb`), to run frames through with `BPF_PROG_TEST_RUN`.
    #[must_use]
    pub fn balancer(&self) -> &Xdp {
        self.ebpf.program("dsrlb").and_then(|p| p.try_into().ok()).expect("dsrlb is in the object")
    }

    /// Attaches the balancer to `interface` (no pin): the attachment lasts as long as `self`.
    ///
    /// # Errors
    /// When the interface is missing or the driver refuses the mode.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut("dsrlb").context("no program dsrlb")?.try_into()?;
        prog.attach(interface, mode).with_context(|| format!("attaching dsrlb to {interface} in {mode:?} mode"))?;
        Ok(())
    }

    /// Overwrites every slot of listener `id`'s active ring with `real` as the program reads it
    /// (a real id outside `REALS` makes the lookup that cannot fail fail: an internal drop).
    ///
    /// # Errors
    /// When the listener was never written or the map write fails.
    pub fn fill_ring(&mut self, id: u32, real: u16) -> anyhow::Result<()> {
        use aya::maps::{Array, MapData};
        let copy = u32::from(self.written.listeners.get(&id).context("no such listener")?.ring_copy);
        let base = lb_common::ring_base(id, copy, self.ring_size);
        let mut rings: Array<&mut MapData, lb_common::RingEntry> = super::map_mut(&mut self.ebpf, lb_common::map_names::RINGS)?;
        for e in 0..lb_common::ring_entries(self.ring_size) {
            rings.set(base + e, [real; lb_common::RING_SLOTS_PER_ENTRY as usize], 0)?;
        }
        Ok(())
    }

    /// This node's own MAC as last applied (what the driver addresses its runs to).
    fn own_mac(&self) -> [u8; 6] {
        self.node_macs().first().copied().unwrap_or([0xff; 6])
    }

    /// Deletes one flow the way a replacement in the table does: the per-CPU flow caches are
    /// left alone. Tests use it to tell which of the two served a frame.
    ///
    /// # Errors
    /// When the table does not hold the flow.
    pub fn evict_flow(&mut self, src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> anyhow::Result<()> {
        let (src, dst) = (src.into(), dst.into());
        let (key, addrs6) = self.flow_key(src, sport, dst, dport);
        ensure!(self.flows.remove(&key, addrs6.as_ref()), "no flow {src}:{sport} -> {dst}:{dport} in the table");
        Ok(())
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

    /// The flow table, for tests that look at or set single slots.
    #[must_use]
    pub fn flow_table(&self) -> &FlowTable {
        &self.flows
    }

    /// Buckets in the flow table.
    #[must_use]
    pub fn flow_table_buckets(&self) -> u32 {
        self.flows.buckets()
    }
}

/// The flow table of a balancer whose maps are pinned in `dir` (a running controller's),
/// mapped into this process: benchmarks fill it through [`FlowTable::merge`] and read it as the
/// controller does.
///
/// # Errors
/// When a pin is missing or the maps cannot be mapped.
pub fn pinned_flow_table(dir: &std::path::Path) -> anyhow::Result<FlowTable> {
    use aya::maps::{Array, MapData};
    let open = |name: &str| MapData::from_pin(dir.join(name)).with_context(|| format!("opening {}", dir.join(name).display()));
    let layout: Array<MapData, lb_common::Layout> = Array::try_from(aya::maps::Map::Array(open(lb_common::map_names::LAYOUT)?))?;
    let seed = layout.get(&0, 0).context("reading LAYOUT")?.flow_seed;
    ensure!(seed != 0, "LAYOUT holds no seed yet");
    let flows = crate::mapped::Mapped::new(&open(lb_common::map_names::FLOWS)?, "FLOWS")?;
    let addrs6 = crate::mapped::Mapped::new(&open(lb_common::map_names::FLOW_ADDRS6)?, "FLOW_ADDRS6")?;
    Ok(FlowTable::new(flows, addrs6, seed))
}
