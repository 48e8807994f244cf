//! The brokers' decapsulation program (`dsrlb-decap`, see `dsrlb decap`): its settings and the
//! reasons it counts. It strips the outer header of IPIP (IPv4 in IPv4), IPv6 in IPv6 and GUE
//! (over UDP) frames whose inner destination is one of the VIPs the broker holds, and passes
//! the inner packet to the kernel. Addresses in its maps are [`Ip6`](crate::Ip6): IPv6 as they
//! are, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).

/// The UDP port GUE arrives on unless `--gue-port` says another (Katran's).
pub const DECAP_GUE_PORT: u16 = 6080;
/// VIPs, and allowed outer sources, a decap program holds at most (each).
pub const DECAP_MAX_ADDRS: u32 = 256;

/// `DECAP_CONF[0]`: set by `dsrlb decap attach`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConf {
    /// The GUE UDP port, in wire order; zero: no GUE (the program is loaded but not set).
    pub gue_port_be: u16,
    /// 1: tunnelled frames from any outer source are decapsulated (`--any-source`); 0: only
    /// from the sources in `DECAP_SOURCES`.
    pub any_source: u8,
    /// Where the program finds the VIPs: 0, in `DECAP_VIPS` (a set too large for a list); 1
    /// or 2, in `DECAP_LISTS[DECAP_LIST_VIPS + n - 1]` (which then holds what `DECAP_VIPS`
    /// holds).
    pub vip_list: u8,
    /// As `vip_list`, for the sources: `DECAP_SOURCES`, or `DECAP_LISTS[DECAP_LIST_SOURCES +
    /// n - 1]`.
    pub source_list: u8,
    pub pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<DecapConf>() == 8);

/// Addresses a [`DecapList`] holds at most.
pub const DECAP_LIST_LEN: usize = 8;
/// `DECAP_LISTS` slots of the VIPs (this one and the next) and of the sources.
pub const DECAP_LIST_VIPS: u32 = 0;
pub const DECAP_LIST_SOURCES: u32 = 2;
pub const DECAP_LIST_SLOTS: u32 = 4;

/// A small set of addresses (a host's VIPs, the balancers' tunnel sources), matched by
/// comparing words: a hash map's lookup of a 16-byte key costs more than the rest of a decap.
/// Each set has two slots: the writer fills the one not in use, then names it in
/// [`DecapConf`], so the program never reads a list being written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapList {
    /// Addresses in use, from the first; at most [`DECAP_LIST_LEN`].
    pub count: u32,
    pub pad: u32,
    pub addrs: [crate::Ip6; DECAP_LIST_LEN],
}

const _: () = assert!(core::mem::size_of::<DecapList>() == 8 + 16 * DECAP_LIST_LEN);

/// Indices of `DECAP_STATS` (per CPU, `u64` frames): every frame the program sees is counted
/// once, under the reason for what it did.
pub mod decap_reason {
    /// Decapsulated: the inner packet went to the kernel (`XDP_PASS`).
    pub const DECAPSULATED: u32 = 0;
    /// No tunnel frame (not IPIP, IPv6 in IPv6 or UDP to the GUE port), passed untouched.
    pub const PASS_NOT_TUNNEL: u32 = 1;
    /// A tunnel frame whose inner destination is no VIP held here, passed untouched.
    pub const PASS_NOT_OURS: u32 = 2;
    /// Headers too short or inconsistent to read, passed untouched for the kernel to judge.
    pub const PASS_MALFORMED: u32 = 3;
    /// A fragment of a tunnel frame (the outer header is fragmented), passed untouched: it can
    /// only be decapsulated whole. The MTU advice in the docs keeps tunnel frames unfragmented.
    pub const PASS_FRAGMENT: u32 = 4;
    /// A tunnel frame for a VIP from an outer source that is not allowed (`--source`), dropped:
    /// only the balancers may put packets from any client address on this host's VIPs.
    pub const DROP_FOREIGN_SOURCE: u32 = 5;
    /// A tunnel frame for a VIP whose inner packet is a tunnel frame again, dropped: a balancer
    /// never nests them, and unwrapping one layer would hand the kernel another.
    pub const DROP_NESTED: u32 = 6;
    /// How many reasons there are.
    pub const COUNT: u32 = 7;
    /// Their names, as `dsrlb decap status` shows them.
    pub const NAMES: [&str; COUNT as usize] =
        ["decapsulated", "pass_not_tunnel", "pass_not_ours", "pass_malformed", "pass_fragment", "drop_foreign_source", "drop_nested"];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, integers only, no padding (asserted above).
    unsafe impl aya::Pod for super::DecapConf {}
    // SAFETY: `#[repr(C)]`, integers and byte arrays only, no padding (asserted above).
    unsafe impl aya::Pod for super::DecapList {}
}
