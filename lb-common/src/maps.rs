//! The maps' names, sizes and value types: listeners, ports, VIPs, reals and rings, the node,
//! storm control, the layout and the controller's state, and the counters.

use crate::flow_meta;

/// Names of the maps in the object; also the file names of their pins.
pub mod map_names {
    pub const LISTENERS: &str = "LISTENERS";
    pub const VIPS: &str = "VIPS";
    pub const REALS: &str = "REALS";
    pub const RINGS: &str = "RINGS";
    pub const FLOWS: &str = "FLOWS";
    pub const LAYOUT: &str = "LAYOUT";
    pub const VERDICT_STATS: &str = "VERDICT_STATS";
    pub const REAL_STATS: &str = "REAL_STATS";
    pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    pub const CLOCK: &str = "CLOCK";
    pub const CONTROL: &str = "CONTROL";
    pub const NODE: &str = "NODE";
    pub const CONN_RATE: &str = "CONN_RATE";
    pub const LISTENER_STATS: &str = "LISTENER_STATS";
    pub const TABLE_STATS: &str = "TABLE_STATS";
    pub const LISTENER_VIP6: &str = "LISTENER_VIP6";
    pub const VIPS6: &str = "VIPS6";
    pub const FLOW_ADDRS6: &str = "FLOW_ADDRS6";
    pub const NEXT: &str = "NEXT";
    pub const REAL_TUNNELS: &str = "REAL_TUNNELS";
    pub const PROBE_TUNNELS: &str = "PROBE_TUNNELS";
}

/// Compile-time sizes of the fixed maps. The ring and flow maps are sized at load time from the
/// config; the numbers here are only the defaults compiled into the object.
pub const MAX_LISTENERS: u32 = 32;
pub const MAX_BACKENDS: u32 = 256;
pub const MAX_VIPS: u32 = 256;
/// Each listener owns two ring copies (active and standby) so a rebuild never shows a
/// half-written ring: see [`ListenerInfo::ring_copy`].
pub const RING_COPIES: u32 = 2;
pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// Flows the flow table holds by default (`flow_table_size`).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;

/// A ring slot that holds no real: the listener has no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Value of `LISTENERS`, indexed by listener id: where the listener is and which of its two
/// ring copies is active. Eight bytes that the controller writes with one atomic store (the map
/// is mmapable) and the program reads with one load, so a ring switch or a moved listener is
/// never seen half-written. A slot no listener uses is all zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerInfo {
    /// The VIP; for an IPv6 listener ([`LISTENER_F_IPV6`]) its [`fold6`](crate::fold6), and
    /// the address itself in `LISTENER_VIP6` (written before this entry).
    pub vip_be: u32,
    pub port_be: u16,
    /// `LISTENER_F_*`.
    pub flags: u8,
    /// The active ring copy, 0 or 1: the ring starts at [`ring_base`] in `RINGS`.
    pub ring_copy: u8,
}

/// `ListenerInfo::flags`: pick by the source address alone (`hash = "source"`).
pub const LISTENER_F_HASH_SOURCE: u8 = 1;
/// `ListenerInfo::flags`: new connections pass storm control (`CONN_RATE`, `max_conn_rate`).
pub const LISTENER_F_CONN_RATE: u8 = 2;
/// `ListenerInfo::flags`: the VIP is an IPv6 address (`LISTENER_VIP6` holds it).
pub const LISTENER_F_IPV6: u8 = 4;
/// `ListenerInfo::flags`: with `LISTENER_F_HASH_SOURCE` on an IPv6 listener, hash only the
/// source's first 64 bits (`source_prefix = 64`), so a client's privacy addresses share a broker.
pub const LISTENER_F_SOURCE_PREFIX64: u8 = 8;

/// An IPv6 address as the data plane holds it: its 16 wire bytes as two native `u64`
/// (`u64::from_ne_bytes` of each half), so the program compares and hashes it in two words.
pub type Addr6 = [u64; 2];

/// An IPv6 address as the maps hold it: its 16 bytes in wire order (so `bpftool` shows them in
/// order), 8-aligned so the program reads it as the two words of an [`Addr6`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ip6 {
    pub octets: [u8; 16],
}

impl Ip6 {
    #[inline(always)]
    #[must_use]
    pub const fn from_words(w: Addr6) -> Self {
        // SAFETY: 16 bytes to 16 bytes, every bit pattern valid.
        unsafe { core::mem::transmute::<Addr6, Self>(w) }
    }

    #[inline(always)]
    #[must_use]
    pub const fn words(self) -> Addr6 {
        // SAFETY: as above.
        unsafe { core::mem::transmute::<Self, Addr6>(self) }
    }
}

/// Ring slots per `RINGS` entry: four 16-bit real ids in one 8-byte value. An array map
/// spends at least 8 bytes on every value, so one 32-bit id per entry would take four times
/// the memory, and four times the cache a new flow's ring read competes for.
pub const RING_SLOTS_PER_ENTRY: u32 = 4;

/// A `RINGS` entry: the real ids of four consecutive ring slots, [`RING_NONE`] for none.
pub type RingEntry = [u16; RING_SLOTS_PER_ENTRY as usize];

/// A ring slot that names no real: the listener has no usable backend.
pub const RING_NONE: u16 = u16::MAX;
const _: () = assert!(REAL_SLOTS <= RING_NONE as u32, "a real id fits a ring slot");

/// `RINGS` entries of one ring copy.
#[inline(always)]
#[must_use]
pub const fn ring_entries(ring_size: u32) -> u32 {
    ring_size.div_ceil(RING_SLOTS_PER_ENTRY)
}

/// Index of the entry holding slot 0 of ring copy `copy` of listener `id` in `RINGS`.
#[inline(always)]
#[must_use]
pub const fn ring_base(id: u32, copy: u32, ring_size: u32) -> u32 {
    (id * RING_COPIES + copy) * ring_entries(ring_size)
}

/// Value of `LISTEN_PORTS`, indexed by the port's wire value read as a native integer. Eight
/// bytes, written and read whole like [`ListenerInfo`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// The flow cache tag (`FLOW_CACHE_VALID | generation`, see
    /// [`FlowCacheEntry`](crate::FlowCacheEntry)); 0 when no listener uses the port.
    pub tag: u32,
    /// Bit `i` set: listener `i` uses the port.
    pub listeners: u32,
}
const _: () = assert!(MAX_LISTENERS <= 32, "PortInfo::listeners holds one bit per listener");

/// The 8-byte values that are written with one store and read with one load.
macro_rules! word_value {
    ($($t:ty),*) => {$(
        impl $t {
            /// The value as the 8-byte word it occupies in the map.
            #[inline(always)]
            #[must_use]
            pub const fn to_word(self) -> u64 {
                // SAFETY: 8 bytes of integers with no padding (asserted below).
                unsafe { core::mem::transmute::<Self, u64>(self) }
            }

            #[inline(always)]
            #[must_use]
            pub const fn from_word(word: u64) -> Self {
                // SAFETY: every bit pattern is a valid value of integers.
                unsafe { core::mem::transmute::<u64, Self>(word) }
            }
        }
    )*};
}
word_value!(ListenerInfo, PortInfo);

/// Value of `VIPS` (key: the VIP address, network byte order). Only consulted for IP fragments,
/// which carry no port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    pub listeners: u32,
}

/// `RealInfo::flags`: the real is in use (a slot that was never filled has 0).
pub const REAL_F_ACTIVE: u32 = 1;
/// `RealInfo::flags`: the backend failed this listener's checks; flows pinned to it are
/// re-picked.
pub const REAL_F_DOWN: u32 = 2;

/// Value of `REALS`. A real is a backend as one listener uses it (Katran's word): health is
/// per listener (a broker's TLS port can fail while its plain port works), so the down flag is
/// too. Key: [`real_id`]. The two MACs are the 12 bytes that replace the Ethernet destination
/// and source of a forwarded frame, in wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealInfo {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub flags: u32,
}

impl RealInfo {
    #[must_use]
    pub const fn usable(&self) -> bool {
        self.flags & (REAL_F_ACTIVE | REAL_F_DOWN) == REAL_F_ACTIVE
    }
}

/// `RealInfo::flags`: frames to the real go inside an outer IP header ([`RealTunnel`], mode
/// [`TUNNEL_IPIP`]: IPv4 in IPv4 or IPv6 in IPv6); `dst_mac` is then the next hop's MAC.
pub const REAL_F_IPIP: u32 = 4;
/// `RealInfo::flags`: as [`REAL_F_IPIP`], inside UDP (GUE, mode [`TUNNEL_GUE`]).
pub const REAL_F_GUE: u32 = 8;
/// Either tunnel flag.
pub const REAL_F_TUNNEL: u32 = REAL_F_IPIP | REAL_F_GUE;

/// `RealTunnel::mode`: no tunnel (the MAC rewrite, `forward = "l2"`).
pub const TUNNEL_L2: u8 = 0;
/// `RealTunnel::mode`: IP in IP of the client's family (protocol 4 or 41).
pub const TUNNEL_IPIP: u8 = 1;
/// `RealTunnel::mode`: GUE variant 1 (the client's IP packet straight after a UDP header).
pub const TUNNEL_GUE: u8 = 2;

/// Bytes a tunnel adds in front of the client's IP packet, by mode and by whether the client
/// (and so the outer header) is IPv6: 20 or 40 for IP in IP, 28 or 48 for GUE.
#[inline(always)]
#[must_use]
pub const fn tunnel_overhead(mode: u8, ipv6: bool) -> u32 {
    let ip = if ipv6 { 40 } else { 20 };
    if mode == TUNNEL_GUE { ip + 8 } else { ip }
}

/// The smallest path MTU a tunnel may be configured with: IPv6's minimum link MTU plus the
/// largest overhead, so a client's packet of 1,280 bytes always fits.
pub const TUNNEL_MIN_MTU: u32 = 1280 + 48;

/// Value of `REAL_TUNNELS`, indexed by real id like `REALS`: where a tunnelled real's frames
/// go (`REAL_F_IPIP`, `REAL_F_GUE`). Written by the controller before the real's `REALS` entry
/// names a tunnel, zero for every other real. The outer header has the family of the client's
/// packet (a listener's family; IPv4 in IPv6 and IPv6 in IPv4 are not supported), so the
/// addresses are IPv6 for an IPv6 listener's reals and IPv4-mapped (`::ffff:a.b.c.d`, the
/// IPv4 address in the last four bytes) for an IPv4 listener's. `bpftool map dump` shows
/// each field by name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealTunnel {
    /// The broker's address: the outer destination.
    pub dst: Ip6,
    /// The balancer's `tunnel_source` (or `tunnel_source6`): the outer source.
    pub src: Ip6,
    /// [`TUNNEL_IPIP`] or [`TUNNEL_GUE`] ([`TUNNEL_L2`] in an unused entry).
    pub mode: u8,
    pub pad: u8,
    /// The largest client IP packet that fits the path once wrapped (`tunnel_mtu` less
    /// [`tunnel_overhead`]). A larger one is answered with ICMP "fragmentation needed" or
    /// ICMPv6 "packet too big" naming this MTU (IPv4 without DF: dropped).
    pub max_inner: u16,
    /// GUE's destination port, in wire order (`gue_port`).
    pub gue_port_be: u16,
    pub pad2: u16,
}

/// Health probes along the DSR path carry the socket mark `PROBE_MARK_BASE | backend id`
/// (the controller's policy routing, and the probe encapsulation of tunnelled backends).
pub const PROBE_MARK_BASE: u32 = 0x0d5b_0000;
/// The bits of a probe mark that say it is one.
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;

/// Entries of `PROBE_TUNNELS`: one per backend and family.
pub const PROBE_TUNNEL_SLOTS: u32 = MAX_BACKENDS * 2;

/// The `PROBE_TUNNELS` index of backend `backend`'s tunnel for `ipv6` packets.
#[inline(always)]
#[must_use]
pub const fn probe_tunnel_slot(backend: u32, ipv6: bool) -> u32 {
    (backend & (MAX_BACKENDS - 1)) * 2 + ipv6 as u32
}

/// The outer IPv6 header's flow label of a tunnelled flow (RFC 6438): 20 bits of its hash, for
/// routers that spread by the label.
#[inline(always)]
#[must_use]
#[expect(clippy::cast_possible_truncation, reason = "20 bits of the hash are kept")]
pub const fn tunnel_flow_label(hash: u64) -> u32 {
    (hash ^ (hash >> 20) ^ (hash >> 40)) as u32 & 0x000f_ffff
}

/// The outer GUE source port of a flow: its hash spread over the dynamic ports
/// (49152–65535), so ECMP routers and the brokers' receive queues spread the flows.
#[inline(always)]
#[must_use]
#[expect(clippy::cast_possible_truncation, reason = "14 bits of the hash are kept")]
pub const fn gue_source_port(hash: u64) -> u16 {
    let h = (hash ^ (hash >> 32)) as u32;
    let h = h ^ (h >> 16);
    0xc000 | (h as u16 & 0x3fff)
}

/// Entries of `REALS` and `REAL_STATS`.
pub const REAL_SLOTS: u32 = MAX_LISTENERS * MAX_BACKENDS;
const _: () = assert!(MAX_BACKENDS.is_power_of_two());
const REAL_SHIFT: u32 = MAX_BACKENDS.trailing_zeros();

/// The real of backend `backend` in listener `listener`.
#[inline(always)]
#[must_use]
pub const fn real_id(listener: u32, backend: u32) -> u32 {
    (listener << REAL_SHIFT) | (backend & (MAX_BACKENDS - 1))
}

/// The listener of a real.
#[inline(always)]
#[must_use]
pub const fn real_listener(real: u32) -> u32 {
    real >> REAL_SHIFT
}

/// The backend of a real.
#[inline(always)]
#[must_use]
pub const fn real_backend(real: u32) -> u32 {
    real & (MAX_BACKENDS - 1)
}

/// Value of `LAYOUT`, one entry pinned with the other maps: the version of the maps' layout,
/// so a controller never adopts pinned maps it would misread, and the flow table's hash seed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// [`LAYOUT_VERSION`] of the controller that made the maps; 0 in maps just made.
    pub version: u64,
    /// The seed of [`flow_buckets`](crate::flow_buckets), drawn when the flow table is made.
    pub flow_seed: u64,
}

/// The layout of the maps this build reads and writes. Version 1 had no `LAYOUT` map: an LRU
/// hash flow table, a hash of listeners and a ring id per 8-byte entry. Version 2 had no
/// `FLOW_S_CONFIRMED`, counted ages in jiffies and had no `NODE`, `CONN_RATE`,
/// `LISTENER_STATS`, `TABLE_STATS` or `CONTROL` (its controller kept its ids in a file).
/// Version 3 gained `LISTENER_VIP6`, `VIPS6` and `FLOW_ADDRS6` without a change to the maps it
/// had: a controller adopting pins made before them creates them empty (every flow there is an
/// IPv4 flow). Version 4 split the state's live and confirmed bits into a kind
/// ([`FLOW_S_KIND`](crate::FLOW_S_KIND)): the states version 3 wrote read the same
/// (unconfirmed as [`FLOW_K_MIDFLOW`](crate::FLOW_K_MIDFLOW), confirmed as
/// [`FLOW_K_CONFIRMED`](crate::FLOW_K_CONFIRMED)), so a controller adopts version 3 maps and
/// marks them 4; a version 3 controller refuses version 4 maps, whose `FLOW_K_OPENED` it would
/// take for no flow.
///
/// A controller that adopts maps puts its program on the link before it writes its config
/// into them, so that the program it replaces never runs on a config it may misread; this
/// build's program, in turn, runs for a moment on whatever a newer build left. So the version
/// goes up with every change a program of the version before would misread: a map's layout,
/// and also a new meaning in one it reads (a flag, a state, a mode). (Tunnels, which gave
/// `RealInfo::flags` two flags, came in version 4 without a new version: this rule came after.)
pub const LAYOUT_VERSION: u64 = 4;
/// The oldest layout this build adopts (see [`LAYOUT_VERSION`]).
pub const LAYOUT_VERSION_ADOPTED: u64 = 3;

/// Destination MACs a node forwards frames for: its interface's own and up to six more
/// (`accept_macs`, e.g. keepalived's virtual MAC).
pub const MAX_NODE_MACS: usize = 7;

/// A MAC as the 8-byte word [`NodeInfo::macs`] holds: the six bytes in wire order, read as a
/// little-endian integer, the top two bytes zero.
#[inline(always)]
#[must_use]
pub const fn mac_word(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

/// A [`NodeInfo::macs`] entry that matches no frame (a 48-bit MAC never has the top bits).
pub const NO_MAC: u64 = u64::MAX;

/// Value of `NODE` (one entry, one cache line, mmapable): what the node is, written by the
/// controller word by word (each word is read with one load).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Nanoseconds per jiffy (10^9 / the kernel's HZ, which the controller measures): the
    /// program's clock is `bpf_jiffies64() * ns_per_jiffy`, one load where the kernel inlines
    /// the helper (a coarse-clock helper call costs more than the whole flow cache hit).
    pub ns_per_jiffy: u32,
    /// Flows idle this many age units or more are expired: replaced before any open flow
    /// even when confirmed. The longest of the listeners' timeouts (the controller removes
    /// each listener's expired flows by its own).
    pub idle_expire: u32,
    /// Frames to a listener are forwarded only when their destination MAC is one of these
    /// ([`mac_word`]; unused entries [`NO_MAC`]): never a flooded, broadcast or multicast
    /// frame, nor one meant for another node of the segment.
    pub macs: [u64; MAX_NODE_MACS],
}

impl Default for NodeInfo {
    fn default() -> Self {
        Self { ns_per_jiffy: 0, idle_expire: 0xffff, macs: [NO_MAC; MAX_NODE_MACS] }
    }
}

impl NodeInfo {
    /// The first word: `ns_per_jiffy` and `idle_expire`, in memory order.
    #[must_use]
    pub const fn head(&self) -> u64 {
        flow_meta(self.ns_per_jiffy, self.idle_expire)
    }
}

/// The clock both sides share: `jiffies` as nanoseconds ([`NodeInfo::ns_per_jiffy`]).
#[inline(always)]
#[must_use]
pub const fn clock_ns(jiffies: u64, ns_per_jiffy: u32) -> u64 {
    jiffies.wrapping_mul(ns_per_jiffy as u64)
}

/// Bytes a [`ControlState`] holds.
pub const CONTROL_STATE_BYTES: usize = (1 << 18) - 24;

/// Value of `CONTROL` (two entries, mmapable, pinned with the other maps; the program never
/// reads it): what a controller needs to adopt the maps it did not make, kept exactly as long as
/// they are. The controller writes the entry not holding the newest state, then publishes it by
/// writing its `generation` last; a reader takes the valid entry with the highest generation.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ControlState {
    /// 0: never written.
    pub generation: u64,
    /// Of `bytes[..len]` ([`control_checksum`]).
    pub checksum: u64,
    pub len: u64,
    pub bytes: [u8; CONTROL_STATE_BYTES],
}

/// The checksum of a [`ControlState`]'s bytes (FNV-1a, 64 bits): a torn or foreign write is
/// refused, not misread.
#[must_use]
pub fn control_checksum(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Value of `CONN_RATE`, one per listener: storm control as a generic cell rate algorithm.
/// A new connection (a SYN, see `flow_step`) at `now` is admitted when `tat_ns - now <=
/// tolerance_ns`, and moves `tat_ns` to `max(tat_ns, now) + interval_ns` by compare-and-swap;
/// so admissions stay within `1e9 / interval_ns` per second after a burst of `tolerance_ns /
/// interval_ns + 1`. `interval_ns` 0: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRate {
    /// The theoretical arrival time of the next connection ([`clock_ns`]).
    pub tat_ns: u64,
    pub interval_ns: u64,
    pub tolerance_ns: u64,
    /// The same for retransmitted SYNs of admitted connections (`charge::RETRANSMIT`): their
    /// own budget, as large, so a retransmit is never charged to the connection budget twice
    /// and SYNs repeated on an admitted tuple still reach the brokers at a bounded rate.
    pub retry_tat_ns: u64,
}

/// Value of `LISTENER_STATS` (per CPU), one per listener: what the listener's guards did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerCounters {
    /// SYNs dropped by `max_conn_rate`.
    pub conn_rate_dropped: u64,
    /// ICMP "fragmentation needed" forwarded to a broker by their inner tuple.
    pub icmp_too_big: u64,
}

/// `LISTEN_PORTS` has one slot per port (see [`PortInfo`]): an array lookup the verifier
/// inlines, so TCP to other ports passes without a hash lookup, and the same load gives the flow
/// cache tag and the listeners to compare the destination with.
pub const PORT_SLOTS: u32 = 1 << 16;

/// Value of `REAL_STATS` (per CPU), one per real: a forwarded frame updates one counter, and
/// the controller sums a listener's or a backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

const _: () = assert!(core::mem::size_of::<ListenerInfo>() == 8);
const _: () = assert!(core::mem::size_of::<PortInfo>() == 8);
const _: () = assert!(core::mem::size_of::<VipInfo>() == 4);
const _: () = assert!(core::mem::size_of::<RealInfo>() == 16);
const _: () = assert!(core::mem::size_of::<Layout>() == 16);
const _: () = assert!(core::mem::size_of::<Counters>() == 24);
const _: () = assert!(core::mem::size_of::<NodeInfo>() == 64, "one cache line");
const _: () = assert!(core::mem::size_of::<ConnRate>() == 32);
const _: () = assert!(core::mem::size_of::<ControlState>() == 1 << 18);
const _: () = assert!(core::mem::size_of::<ListenerCounters>() == 16);
const _: () = assert!(core::mem::size_of::<Ip6>() == 16 && core::mem::align_of::<Ip6>() == 8);
const _: () = assert!(core::mem::size_of::<RealTunnel>() == 40);

#[cfg(feature = "user")]
mod pod {
    use super::{
        ConnRate, ControlState, Counters, Ip6, Layout, ListenerCounters, ListenerInfo, NodeInfo, PortInfo, RealInfo, RealTunnel, VipInfo,
    };
    // SAFETY: all of these are `#[repr(C)]`, made only of integers, with no padding (asserted
    // above), so every bit pattern is valid.
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for ListenerInfo {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for RealInfo {}
    unsafe impl aya::Pod for Layout {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for NodeInfo {}
    unsafe impl aya::Pod for ConnRate {}
    unsafe impl aya::Pod for ControlState {}
    unsafe impl aya::Pod for ListenerCounters {}
    unsafe impl aya::Pod for Ip6 {}
    unsafe impl aya::Pod for RealTunnel {}
}
