//! The maps, declared with BTF so `bpftool map dump` shows field names.
//!
//! `RINGS` and `FLOWS` are resized by the controller at load time from `ring_size` and
//! `flow_table_size`; the sizes here are the defaults.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    btf_maps::{Array, HashMap, PerCpuArray, ProgramArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    ConnRate, ControlState, Counters, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_SIZE, FLOW_CACHE_SLOTS, FLOW_WAYS, FlowAddrs6, FlowBucket,
    FlowCacheEntry, Ip6, Layout, ListenerCounters, ListenerInfo, MAX_LISTENERS, MAX_VIPS, NodeInfo, PORT_SLOTS, PROBE_TUNNEL_SLOTS,
    PortInfo, REAL_SLOTS, RING_COPIES, RealInfo, RealTunnel, RingEntry, TraceConf, TraceEvent, VipInfo, flow_table_buckets, reason,
    ring_entries, table_event,
};

/// Map flags of the maps the controller reads and writes through memory it maps
/// (`lb_common::PortInfo`, `lb_common::FLOW_WAYS`).
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;

/// Listener id to where it listens and its active ring copy.
#[btf_map]
pub static LISTENERS: Array<ListenerInfo, { MAX_LISTENERS as usize }, MMAPABLE> = Array::new();

/// Port to the listeners on it and the flow cache tag (see `lb_common::PORT_SLOTS`).
#[btf_map]
pub static LISTEN_PORTS: Array<PortInfo, { PORT_SLOTS as usize }, MMAPABLE> = Array::new();

/// VIP addresses, consulted only for fragments.
#[btf_map]
pub static VIPS: HashMap<u32, VipInfo, { MAX_VIPS as usize }> = HashMap::new();

/// IPv6 VIP addresses, consulted only for fragments.
#[btf_map]
pub static VIPS6: HashMap<Ip6, VipInfo, { MAX_VIPS as usize }> = HashMap::new();

/// Listener id to its IPv6 VIP (`lb_common::LISTENER_F_IPV6`; zero for an IPv4 listener).
#[btf_map]
pub static LISTENER_VIP6: Array<Ip6, { MAX_LISTENERS as usize }> = Array::new();

/// Real id (`lb_common::real_id`) to MACs and state.
#[btf_map]
pub static REALS: Array<RealInfo, { REAL_SLOTS as usize }> = Array::new();

/// Real id to where a tunnelled real's frames go (`lb_common::RealTunnel`); zero for the
/// others.
#[btf_map]
pub static REAL_TUNNELS: Array<RealTunnel, { REAL_SLOTS as usize }> = Array::new();

/// `probe_tunnel_slot(backend, ipv6)` to the tunnel a tunnelled backend's health probes along
/// the DSR path are wrapped in (`probe::encap`); zero for the others. Not pinned: the
/// controller fills it when it starts.
#[btf_map]
pub static PROBE_TUNNELS: Array<RealTunnel, { PROBE_TUNNEL_SLOTS as usize }> = Array::new();

/// Per CPU: the rate limit of ICMP "too big" answers (`tunnel::answer_allowed`). Not pinned.
#[btf_map]
pub static ANSWER_TOKENS: PerCpuArray<u64, 1> = PerCpuArray::new();

/// All Maglev rings, back to back: two copies per listener, each `ring_size` real ids packed
/// four to an entry (`lb_common::RING_SLOTS_PER_ENTRY`).
#[btf_map]
pub static RINGS: Array<RingEntry, { (MAX_LISTENERS * RING_COPIES * ring_entries(DEFAULT_RING_SIZE)) as usize }> = Array::new();

/// The flow table (`lb_common::FLOW_WAYS`): 4-tuple to real, shared by all CPUs (a flow seen
/// on two CPUs has one backend).
#[btf_map]
pub static FLOWS: Array<FlowBucket, { flow_table_buckets(DEFAULT_FLOW_TABLE_SIZE) as usize }, MMAPABLE> = Array::new();

/// Flow table slot to the addresses of the IPv6 flow it holds (`lb_common::FlowAddrs6`),
/// resized with `FLOWS`.
#[btf_map]
pub static FLOW_ADDRS6: Array<FlowAddrs6, { flow_table_buckets(DEFAULT_FLOW_TABLE_SIZE) as usize * FLOW_WAYS }, MMAPABLE> = Array::new();

/// The maps' layout version and the flow table's hash seed (`lb_common::Layout`), written by the
/// controller when it makes the maps and pinned with them.
#[btf_map]
pub static LAYOUT: Array<Layout, 1> = Array::new();

/// Per-CPU direct-mapped cache in front of `FLOWS` (see `lb_common::FlowCacheEntry`). Not
/// pinned: each loaded program instance starts with an empty one.
#[btf_map]
pub static FLOW_CACHE: PerCpuArray<FlowCacheEntry, { FLOW_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// This node's MACs and the flow table's expiry (`lb_common::NodeInfo`), written word by word.
#[btf_map]
pub static NODE: Array<NodeInfo, 1, MMAPABLE> = Array::new();

/// The controller's state (`lb_common::ControlState`): never read by the programs, pinned with
/// the other maps so a controller that adopts them finds the ids they are written by.
#[btf_map]
pub static CONTROL: Array<ControlState, 2, MMAPABLE> = Array::new();

/// `bpf_jiffies64()` when `dsrlb_clock` last ran (the controller runs it to read the clock).
#[btf_map]
pub static CLOCK: Array<u64, 1> = Array::new();

/// Storm control per listener id (`lb_common::ConnRate`).
#[btf_map]
pub static CONN_RATE: Array<ConnRate, { MAX_LISTENERS as usize }> = Array::new();

/// Per listener id: what its guards did (`lb_common::ListenerCounters`).
#[btf_map]
pub static LISTENER_STATS: PerCpuArray<ListenerCounters, { MAX_LISTENERS as usize }> = PerCpuArray::new();

/// What flow table inserts did, see `lb_common::table_event`.
#[btf_map]
pub static TABLE_STATS: PerCpuArray<u64, { table_event::COUNT as usize }> = PerCpuArray::new();

/// Per CPU: when each rare event was last logged, and the flood guard's state (see `events`).
#[btf_map]
pub static LOG_STATE: PerCpuArray<[u64; 4], 1> = PerCpuArray::new();

/// Packets per verdict and reason, see `lb_common::reason`.
#[btf_map]
pub static VERDICT_STATS: PerCpuArray<u64, { reason::COUNT as usize }> = PerCpuArray::new();

/// Per real.
#[btf_map]
pub static REAL_STATS: PerCpuArray<Counters, { REAL_SLOTS as usize }> = PerCpuArray::new();

/// `dsrlb trace`'s switch and filters (`lb_common::TraceConf`). Not pinned: each loaded
/// program instance has its own, off.
#[btf_map]
pub static TRACE_CONF: Array<TraceConf, 1> = Array::new();

/// `dsrlb trace`'s events (`lb_common::TraceEvent`), read by the controller. Not pinned.
#[btf_map]
pub static TRACE: RingBuf<TraceEvent, { 1 << 20 }> = RingBuf::new();

/// Per CPU: trace events lost because `TRACE` was full.
#[btf_map]
pub static TRACE_LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Per CPU: frames left before `dsrlb trace --sample` takes one (`trace::sampled_in`). Not
/// pinned.
#[btf_map]
pub static TRACE_SAMPLE: PerCpuArray<u32, 1> = PerCpuArray::new();

/// The program that runs after this one on every frame it passes (`next_program`: another
/// XDP program on the same interface, such as xdp-filter's), by tail call; empty: the frame
/// goes to the kernel. Pinned like the others (the kernel empties a program array when its last
/// descriptor and pin go); the controller fills it before attaching.
#[btf_map]
pub static NEXT: ProgramArray<1> = ProgramArray::new();
