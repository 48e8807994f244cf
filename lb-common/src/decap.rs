//! The brokers' decapsulation program (`dsrlb-decap`, see `dsrlb decap`): its settings and the
//! reasons it counts. It strips the outer header of IPIP (IPv4 in IPv4), IPv6 in IPv6 and GUE
//! (over UDP) frames whose inner destination is one of the VIPs the broker holds, and passes
//! the inner packet to the kernel. Addresses in its maps are [`Ip6`](crate::Ip6): IPv6 as they
//! are, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).

/// The UDP port GUE arrives on unless `--gue-port` says another (Katran's).
pub const DECAP_GUE_PORT: u16 = 6080;
/// VIPs, and allowed outer sources, a decap program holds at most (each).
pub const DECAP_MAX_ADDRS: u32 = 256;

/// `DECAP_CONF[0]`: set by `dsrlb decap attach`. While `rule` names a [`DecapRule`], the whole
/// rule is that one, and the other fields and the hash maps are not read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConf {
    /// The GUE UDP port, in wire order; zero: no GUE (the program is loaded but not set).
    pub gue_port_be: u16,
    /// 1: tunnelled frames from any outer source are decapsulated (`--any-source`); 0: only
    /// from the sources in `DECAP_SOURCES` (or the rule's own list, as below).
    pub any_source: u8,
    /// 0: the rule is this and the hash maps `DECAP_VIPS` and `DECAP_SOURCES` (sets too large
    /// for a [`DecapRule`]); 1 or 2: it is `DECAP_RULES[rule - 1]`. Older programs, which had
    /// no rules, read this byte as padding, and their dsrlb wrote it 0.
    pub rule: u8,
    pub pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<DecapConf>() == 8);

/// VIPs, and sources, a [`DecapRule`] holds at most.
pub const DECAP_RULE_ADDRS: usize = 8;
/// `DECAP_RULES` entries: the one in use, and the one the next settings are written to.
pub const DECAP_RULE_SLOTS: u32 = 2;

/// The whole rule, when its sets are small (a host's VIPs and its balancers are a few), matched
/// by comparing words: a hash map's lookup of a 16-byte key costs more than all the rest of a
/// decap. The writer fills the entry not in use, then names it in [`DecapConf::rule`] (a
/// single byte changes): the program reads the old rule or the new one, whole, never one being
/// written (an entry is written again only by a later `dsrlb decap attach`, a process start
/// away: a run of the program takes microseconds, in a section the kernel does not preempt
/// except on real-time kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapRule {
    /// As [`DecapConf`]'s.
    pub gue_port_be: u16,
    /// As [`DecapConf`]'s.
    pub any_source: u8,
    /// VIPs and sources in use, from the first of each; at most [`DECAP_RULE_ADDRS`].
    pub vip_count: u8,
    pub source_count: u8,
    pub pad: [u8; 3],
    pub vips: [crate::Ip6; DECAP_RULE_ADDRS],
    pub sources: [crate::Ip6; DECAP_RULE_ADDRS],
}

const _: () = assert!(core::mem::size_of::<DecapRule>() == 8 + 32 * DECAP_RULE_ADDRS);

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
    unsafe impl aya::Pod for super::DecapRule {}
}
