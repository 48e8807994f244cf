//! The ring hashes, which the XDP program and the controller (`dsrlb flow`) must agree on and
//! every balancer computes alike (they are not seeded): IPv4's, then IPv6's.

use crate::Addr6;

/// 64-bit finaliser (murmur3's fmix64): every input bit affects every output bit.
#[inline(always)]
#[must_use]
pub const fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash that picks a ring slot for a new flow. Both the XDP program and the controller's
/// `dsrlb flow` use it, so it lives here. Inputs are the wire (big-endian) values as loaded
/// into a native integer, so both sides see the same numbers.
///
/// Linux hands out even ephemeral ports to `connect()`, so the port pair is multiplied into
/// the high bits before the finaliser rather than XORed into the low ones.
#[inline(always)]
#[must_use]
pub const fn flow_hash(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16) -> u64 {
    let addrs = ((src_be as u64) << 32) | dst_be as u64;
    let ports = ((sport_be as u64) << 16) | dport_be as u64;
    mix64(addrs ^ ports.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Maps a hash onto `0..ring_size` by multiply-and-shift (Lemire's fast range) instead of a
/// division: uniform for a well-mixed hash, and a few cycles instead of a 64-bit `div`.
#[inline(always)]
#[must_use]
pub const fn ring_slot(hash: u64, ring_size: u32) -> u32 {
    (((hash >> 32) * ring_size as u64) >> 32) as u32
}

/// The hash a tunnel spreads a flow by (its GUE source port and IPv6 flow label): the
/// addresses folded to one word (`addrs`), the ports multiplied in, one finaliser. Cheaper than
/// the ring's IPv6 hash; it only needs to spread flows over ECMP paths and receive queues.
#[inline(always)]
#[must_use]
pub const fn tunnel_hash(addrs: u64, sport_be: u16, dport_be: u16) -> u64 {
    let ports = ((sport_be as u64) << 16) | dport_be as u64;
    mix64(addrs ^ ports.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The hash for `hash = "source"` listeners: the client address alone.
#[inline(always)]
#[must_use]
pub const fn source_hash(src_be: u32) -> u64 {
    mix64((src_be as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995)
}

/// An IPv6 address's unseeded 32-bit fold: what `ListenerInfo::vip_be` holds for an IPv6
/// listener (a first, one-word compare before the full one).
#[inline(always)]
#[must_use]
pub const fn fold6(a: &Addr6) -> u32 {
    let x = a[0] ^ a[1];
    #[expect(clippy::cast_possible_truncation, reason = "folding the halves")]
    let w = (x ^ (x >> 32)) as u32;
    w
}

/// An IPv6 address mixed down to the 32 bits the ring hashes take: the same on every balancer
/// (like the IPv4 ring hash, it is not seeded). `prefix64`: the first 64 bits alone.
#[inline(always)]
#[must_use]
pub const fn ring_word6(a: &Addr6, prefix64: bool) -> u32 {
    let low = if prefix64 { 0 } else { a[1] };
    let h = mix64(a[0] ^ low.wrapping_mul(0xc2b2_ae3d_27d4_eb4f));
    #[expect(clippy::cast_possible_truncation, reason = "folding the halves")]
    let w = (h ^ (h >> 32)) as u32;
    w
}

/// The ring hash of an IPv6 4-tuple (the counterpart of [`flow_hash`]).
#[inline(always)]
#[must_use]
pub const fn flow_hash6(src: &Addr6, dst: &Addr6, sport_be: u16, dport_be: u16) -> u64 {
    flow_hash(ring_word6(src, false), ring_word6(dst, false), sport_be, dport_be)
}

/// The ring hash of an IPv6 client for `hash = "source"` (the counterpart of [`source_hash`]).
#[inline(always)]
#[must_use]
pub const fn source_hash6(src: &Addr6, prefix64: bool) -> u64 {
    source_hash(ring_word6(src, prefix64))
}
