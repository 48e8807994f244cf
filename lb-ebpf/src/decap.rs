//! The brokers' decapsulation program (`dsrlb-decap`, an object of its own, loaded by
//! `dsrlb decap attach` on a broker host, never by `dsrlb run`). Tunnelled frames from a
//! balancer (IPIP, IPv6 in IPv6, GUE over UDP in either family) whose inner destination is one
//! of the VIPs this host holds lose their outer header here and go to the kernel as the client's
//! own packet; the broker then answers the client directly. Everything else passes untouched.
//! Hosts whose kernels have the `ipip` or `fou` modules could use a tunnel device instead; many
//! hardened broker hosts do not load them, and the machines dsrlb is tested on have none.
//!
//! The VIPs and the allowed sources are each a hash map; while both sets have at most
//! `DECAP_RULE_ADDRS` addresses (a host's VIPs and its balancers are a few), the whole rule is
//! instead one `DECAP_RULES` entry, whose lists the program compares word by word: a hash
//! lookup of a 16-byte key cost more than all the rest of a decap (`xdp_bench`).
//!
//! GUE: version 1 (the inner IP header straight after the UDP header, as Katran sends it), and
//! version 0 with a header of protocol 4 or 41 and no flags; control messages and flagged
//! headers pass untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{DECAP_MAX_ADDRS, DECAP_RULE_ADDRS, DECAP_RULE_SLOTS, DecapConf, DecapRule, Ip6, decap_reason as why};
use lb_ebpf::hdr::{
    ETH_HLEN, IP_MF_OFFSET_MASK, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV6_DSTOPTS, IPV6_FRAGMENT, IPV6_HOPOPTS, IPV6_MAX_EXT,
    IPV6_ROUTING, Ipv4Hdr, Ipv6Hdr, UdpHdr,
};

/// VIPs this host holds (IPv4 as IPv4-mapped IPv6): a tunnel frame for one is decapsulated.
#[btf_map]
static DECAP_VIPS: HashMap<Ip6, u8, { DECAP_MAX_ADDRS as usize }> = HashMap::new();

/// Outer sources allowed to send tunnel frames for the VIPs (the balancers' tunnel sources),
/// unless `DecapConf::any_source`.
#[btf_map]
static DECAP_SOURCES: HashMap<Ip6, u8, { DECAP_MAX_ADDRS as usize }> = HashMap::new();

#[btf_map]
static DECAP_CONF: Array<DecapConf, 1> = Array::new();

/// The whole rule, when its sets are small (`DecapConf::rule` names the entry in use).
#[btf_map]
static DECAP_RULES: Array<DecapRule, { DECAP_RULE_SLOTS as usize }> = Array::new();

/// Frames by [`why`], per CPU.
#[btf_map]
static DECAP_STATS: PerCpuArray<u64, { why::COUNT as usize }> = PerCpuArray::new();

const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
/// IPv6 extension headers followed to the upper layer: the balancer's chain and a fragment
/// header, with room to spare. A longer chain ends on an extension header, which counts as a
/// tunnel that may hide behind it.
const IPV6_EXT_WALK: usize = IPV6_MAX_EXT + 4;
/// The offset bits of an IPv6 fragment header's `frag_off`, in wire order.
const IP6_OFFSET_MASK: u16 = 0xfff8_u16.to_be();
/// IPv4 `frag_off`'s offset bits, in wire order.
const IP_OFFSET_MASK: u16 = 0x1fff_u16.to_be();
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// GUE version 0's header (with no optional fields: no flags).
const GUE_HLEN: usize = 4;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

/// A pointer to a `T` at `offset`, or `None` when it would reach past the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn mapped(v4_be: u32) -> Ip6 {
    // Built as two words: a zeroed byte array would become a call to a `memset` subprogram.
    let b = v4_be.to_ne_bytes();
    Ip6::from_words([0, u64::from_ne_bytes([0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]])])
}

/// What the outer headers say: the outer source, how many bytes to strip after the Ethernet
/// header, and the inner family (`true`: IPv6).
struct Tunnel {
    source: Source,
    strip: usize,
    inner6: bool,
}

/// An outer source as `DECAP_SOURCES` keys it; an IPv4-mapped IPv6 source is none of them (it
/// would match the IPv4 source it maps, from a family the balancer's anti-spoofing may not
/// cover).
#[derive(Clone, Copy)]
enum Source {
    Key(Ip6),
    Mapped6,
}

/// The rule in force: `DECAP_CONF` with the hash maps, or the small rule it names.
#[derive(Clone, Copy)]
struct Rule {
    gue_port_be: u16,
    any_source: bool,
    /// The sets as lists, or `None`: in the hash maps.
    small: Option<&'static DecapRule>,
}

/// The rule in force; `None` when the program is not set (or names no rule it has).
#[inline(always)]
fn rule() -> Option<Rule> {
    let conf: &DecapConf = DECAP_CONF.get(0)?;
    // Read once (a volatile read: the compiler may not load it again): the rule named, whole,
    // or the conf's own.
    // SAFETY: a map value, read as a byte.
    let which = unsafe { core::ptr::read_volatile(&raw const conf.rule) };
    match which {
        0 => Some(Rule { gue_port_be: conf.gue_port_be, any_source: conf.any_source != 0, small: None }),
        1 | 2 => {
            let r = DECAP_RULES.get(u32::from(which) - 1)?;
            Some(Rule { gue_port_be: r.gue_port_be, any_source: r.any_source != 0, small: Some(r) })
        }
        _ => None,
    }
}

/// Whether `key` is one of the first `count` of `addrs`.
#[inline(always)]
fn among(addrs: &[Ip6; DECAP_RULE_ADDRS], count: u8, key: &Ip6) -> bool {
    let [k0, k1] = key.words();
    let n = usize::from(count);
    for (i, a) in addrs.iter().enumerate() {
        if i >= n {
            break;
        }
        let [a0, a1] = a.words();
        if a0 == k0 && a1 == k1 {
            return true;
        }
    }
    false
}

/// Whether `dst` is a VIP held here.
#[inline(always)]
fn held(rule: &Rule, dst: &Ip6) -> bool {
    match rule.small {
        Some(r) => among(&r.vips, r.vip_count, dst),
        // SAFETY: a map lookup, read only for presence.
        None => unsafe { DECAP_VIPS.get(dst) }.is_some(),
    }
}

/// Whether `source` may send tunnel frames for the VIPs.
#[inline(always)]
fn allowed(rule: &Rule, source: Source) -> bool {
    rule.any_source
        || match (source, rule.small) {
            (Source::Key(k), Some(r)) => among(&r.sources, r.source_count, &k),
            // SAFETY: a map lookup, read only for presence.
            (Source::Key(k), None) => unsafe { DECAP_SOURCES.get(&k) }.is_some(),
            (Source::Mapped6, _) => false,
        }
}

#[inline(always)]
fn is_mapped6(a: &Ip6) -> bool {
    let o = &a.octets;
    o[0] | o[1] | o[2] | o[3] | o[4] | o[5] | o[6] | o[7] | o[8] | o[9] == 0 && o[10] == 0xff && o[11] == 0xff
}

/// Neither a tunnel frame for us nor one to drop: passed untouched under this reason.
type Pass = u32;

/// An outer packet that is never unwrapped here but may carry a tunnel (`tunnel`: see
/// [`carries_tunnel`]) to a kernel tunnel device, after reassembly or past extension headers:
/// from a source that is no balancer it is dropped, whatever its inner destination; otherwise
/// it passes, as a fragment (`fragment`) or as no tunnel.
#[inline(always)]
fn not_unwrapped(rule: &Rule, tunnel: bool, fragment: bool, source: Source) -> (u32, Pass) {
    if tunnel && !allowed(rule, source) {
        (xdp_action::XDP_DROP, why::DROP_FOREIGN_SOURCE)
    } else if fragment {
        (xdp_action::XDP_PASS, why::PASS_FRAGMENT)
    } else {
        (xdp_action::XDP_PASS, why::PASS_NOT_TUNNEL)
    }
}

/// An outer IPv6 packet whose first next header (`next`) is none a tunnel starts with, such as
/// an extension header or a fragment header: a balancer sends neither, so nothing behind them
/// is unwrapped ([`not_unwrapped`]).
#[inline(always)]
fn behind_extensions(ctx: &XdpContext, rule: &Rule, next: u8, source: Source) -> (u32, Pass) {
    let upper = upper6(ctx, next, ETH_HLEN + IPV6_HLEN);
    not_unwrapped(rule, carries_tunnel(ctx, &upper, rule), upper.fragment, source)
}

/// A packet's upper layer: past an IPv6 packet's extension headers, or an IPv4 header's.
struct Upper {
    /// The upper-layer protocol (where the walk stopped, when it did not end).
    protocol: u8,
    /// Where its header starts; `None` in a later fragment (which has none) and when the walk
    /// did not end.
    l4: Option<usize>,
    /// The chain has a fragment header.
    fragment: bool,
    /// The walk did not reach the upper layer: the chain is longer than [`IPV6_EXT_WALK`] or
    /// runs past the frame.
    unfinished: bool,
}

/// Follows an IPv6 packet's extension headers from next header `next` at `off` (hop-by-hop,
/// routing, destination options, fragment) to its upper layer.
#[inline(always)]
fn upper6(ctx: &XdpContext, mut next: u8, mut off: usize) -> Upper {
    let mut fragment = false;
    for _ in 0..IPV6_EXT_WALK {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else { return Upper { protocol: next, l4: None, fragment, unfinished: true } };
                // SAFETY: inside the frame (checked by `ptr_at`).
                let [n, len] = unsafe { *h };
                next = n;
                off += (usize::from(len) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(h) = ptr_at::<[u16; 2]>(ctx, off) else { return Upper { protocol: next, l4: None, fragment, unfinished: true } };
                // SAFETY: as above.
                let [first, frag_off] = unsafe { *h };
                fragment = true;
                next = first.to_ne_bytes()[0];
                if frag_off & IP6_OFFSET_MASK != 0 {
                    // A later fragment: the kernel takes the packet's protocol from the first
                    // one, which is checked in its turn; this one's next header is judged as
                    // IPv4's (a tunnel protocol counts, anything else does not).
                    return Upper { protocol: next, l4: None, fragment, unfinished: false };
                }
                off += 8;
            }
            _ => return Upper { protocol: next, l4: Some(off), fragment, unfinished: false },
        }
    }
    let unfinished = matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT);
    Upper { protocol: next, l4: (!unfinished).then_some(off), fragment, unfinished }
}

/// The tunnel frame's outer headers, or what to do with a frame that is none to unwrap.
#[inline(always)]
fn outer(ctx: &XdpContext, rule: &Rule) -> Result<Tunnel, (u32, Pass)> {
    let pass = |reason| (xdp_action::XDP_PASS, reason);
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(pass(why::PASS_MALFORMED))?;
    // SAFETY: inside the frame (checked by `ptr_at`).
    let (proto, dst0) = unsafe { ((*eth).proto, (*eth).dst[0]) };
    let (source, l4, protocol) = if proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(pass(why::PASS_MALFORMED))?;
        // SAFETY: as above.
        let (ver_ihl, frag_off, protocol, saddr) = unsafe { ((*ip).ver_ihl, (*ip).frag_off, (*ip).protocol, (*ip).saddr) };
        if protocol != IPPROTO_IPIP && protocol != IPPROTO_UDP && protocol != IPPROTO_IPV6 {
            return Err(pass(why::PASS_NOT_TUNNEL));
        }
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        if ver_ihl >> 4 != 4 || ihl < 20 {
            return Err(pass(why::PASS_MALFORMED));
        }
        let source = Source::Key(mapped(saddr));
        if frag_off & IP_MF_OFFSET_MASK != 0 {
            // A fragment: a first one shows its transport header (UDP's port), a later one none.
            let first = frag_off & IP_OFFSET_MASK == 0;
            let upper = Upper { protocol, l4: first.then_some(ETH_HLEN + ihl), fragment: true, unfinished: false };
            return Err(not_unwrapped(rule, carries_tunnel(ctx, &upper, rule), true, source));
        }
        (source, ihl, protocol)
    } else if proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(pass(why::PASS_MALFORMED))?;
        // SAFETY: as above.
        let (ver, protocol, saddr) = unsafe { (u32::from_be((*ip).ver_tc_flow) >> 28, (*ip).next_header, (*ip).saddr) };
        if ver != 6 {
            return Err(pass(why::PASS_MALFORMED));
        }
        let saddr = Ip6::from_words(saddr);
        let source = if is_mapped6(&saddr) { Source::Mapped6 } else { Source::Key(saddr) };
        if protocol != IPPROTO_IPIP && protocol != IPPROTO_UDP && protocol != IPPROTO_IPV6 {
            return Err(behind_extensions(ctx, rule, protocol, source));
        }
        (source, IPV6_HLEN, protocol)
    } else {
        return Err(pass(why::PASS_NOT_TUNNEL));
    };
    // A tunnel frame is unicast to this host: broadcast and multicast ones are not ours.
    if dst0 & 1 != 0 {
        return Err(pass(why::PASS_NOT_OURS));
    }
    if protocol != IPPROTO_UDP {
        return Ok(Tunnel { source, strip: l4, inner6: protocol == IPPROTO_IPV6 });
    }
    let udp: *const UdpHdr = ptr_at(ctx, ETH_HLEN + l4).ok_or(pass(why::PASS_MALFORMED))?;
    // SAFETY: as above.
    if rule.gue_port_be == 0 || unsafe { (*udp).dest } != rule.gue_port_be {
        return Err(pass(why::PASS_NOT_TUNNEL));
    }
    let gue = ETH_HLEN + l4 + UDP_HLEN;
    let first: *const [u8; 4] = ptr_at(ctx, gue).ok_or(pass(why::PASS_MALFORMED))?;
    // SAFETY: as above.
    let [b0, b1, f0, f1] = unsafe { *first };
    match b0 >> 6 {
        // Version 1: the inner IP header itself; its version says the family.
        1 => Ok(Tunnel { source, strip: l4 + UDP_HLEN, inner6: b0 >> 4 == 6 }),
        // Version 0: a data message of protocol 4 or 41 with no flags and so no optional fields.
        // Flags (remote checksum offload and others) would ask this end to do what it does not:
        // such frames, and control messages, pass untouched.
        0 if b0 == 0 && f0 | f1 == 0 && (b1 == IPPROTO_IPIP || b1 == IPPROTO_IPV6) => {
            Ok(Tunnel { source, strip: l4 + UDP_HLEN + GUE_HLEN, inner6: b1 == IPPROTO_IPV6 })
        }
        _ => Err(pass(why::PASS_NOT_TUNNEL)),
    }
}

/// Whether a packet whose upper layer is `upper` is, or may be, a tunnel frame: IPIP or IPv6
/// in IPv6, UDP to the GUE port (a first fragment too short to show the port counts as one),
/// or an IPv6 chain of extension headers that [`upper6`] could not follow to its end.
#[inline(always)]
fn carries_tunnel(ctx: &XdpContext, upper: &Upper, rule: &Rule) -> bool {
    if upper.unfinished {
        return true;
    }
    match (upper.protocol, upper.l4) {
        (IPPROTO_IPIP | IPPROTO_IPV6, _) => true,
        // SAFETY: inside the frame (checked by `ptr_at`).
        (IPPROTO_UDP, Some(l4)) => {
            ptr_at::<UdpHdr>(ctx, l4).is_none_or(|u| rule.gue_port_be != 0 && unsafe { (*u).dest } == rule.gue_port_be)
        }
        _ => false,
    }
}

/// Decapsulates or passes: the action and the reason it is counted under.
#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, u32) {
    let Some(rule) = rule() else { return (xdp_action::XDP_PASS, why::PASS_NOT_TUNNEL) };
    let t = match outer(ctx, &rule) {
        Ok(t) => t,
        Err(verdict) => return verdict,
    };
    let inner = ETH_HLEN + t.strip;
    // The inner destination and upper layer (its protocol, and where its header is: none in a
    // later fragment).
    let (dst, upper) = if t.inner6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
        // SAFETY: inside the frame.
        let (ver, next, daddr) = unsafe { (u32::from_be((*ip).ver_tc_flow) >> 28, (*ip).next_header, (*ip).daddr) };
        if ver != 6 {
            return (xdp_action::XDP_PASS, why::PASS_MALFORMED);
        }
        let daddr = Ip6::from_words(daddr);
        // An IPv4-mapped destination would match the IPv4 VIP it maps.
        if is_mapped6(&daddr) {
            return (xdp_action::XDP_PASS, why::PASS_NOT_OURS);
        }
        // The upper layer, past any extension headers (a tunnel could hide behind them).
        (daddr, upper6(ctx, next, inner + IPV6_HLEN))
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
        // SAFETY: inside the frame.
        let (ver_ihl, protocol, daddr, frag_off) = unsafe { ((*ip).ver_ihl, (*ip).protocol, (*ip).daddr, (*ip).frag_off) };
        if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
            return (xdp_action::XDP_PASS, why::PASS_MALFORMED);
        }
        let later_fragment = frag_off & IP_OFFSET_MASK != 0;
        let l4 = (!later_fragment).then(|| inner + usize::from(ver_ihl & 0x0f) * 4);
        (mapped(daddr), Upper { protocol, l4, fragment: frag_off & IP_MF_OFFSET_MASK != 0, unfinished: false })
    };
    if !held(&rule, &dst) {
        return (xdp_action::XDP_PASS, why::PASS_NOT_OURS);
    }
    if !allowed(&rule, t.source) {
        return (xdp_action::XDP_DROP, why::DROP_FOREIGN_SOURCE);
    }
    if carries_tunnel(ctx, &upper, &rule) {
        return (xdp_action::XDP_DROP, why::DROP_NESTED);
    }
    // The Ethernet header moves forward over the outer headers, which are read and done with:
    // its MACs stay, the EtherType becomes the inner family's. It is written in place before
    // the frame's start moves, so no packet pointer is needed after the helper.
    let Ok(delta) = i32::try_from(t.strip) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
    let Some(old_eth) = ptr_at::<[u16; 6]>(ctx, 0) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
    let old_eth = old_eth.cast::<u16>();
    // SAFETY: inside the frame (checked just above), 2-aligned as packet data is. Volatile:
    // read here, under the check, not merged into the next one (which the verifier could not
    // follow).
    let macs: [u16; 6] = core::array::from_fn(|i| unsafe { core::ptr::read_volatile(old_eth.add(i)) });
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, t.strip) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
    let to = new_eth.cast_mut().cast::<u16>();
    // SAFETY: inside the frame (checked just above), 2-aligned. Word by word and volatile: a
    // plain copy becomes a call to a `memmove` subprogram.
    unsafe {
        for (i, w) in macs.iter().enumerate() {
            core::ptr::write_volatile(to.add(i), *w);
        }
        (*new_eth.cast_mut()).proto = if t.inner6 { ETH_P_IPV6 } else { ETH_P_IP };
    }
    // SAFETY: the helper checks the new start against the frame; the context is the program's.
    // It cannot fail (the new start was checked above to leave an Ethernet header); were it
    // to, the outer header is already overwritten and the frame can only be aborted (which the
    // xdp_exception tracepoint shows).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return (xdp_action::XDP_ABORTED, why::PASS_MALFORMED);
    }
    (xdp_action::XDP_PASS, why::DECAPSULATED)
}

#[xdp]
pub fn dsrlb_decap(ctx: XdpContext) -> u32 {
    let (action, reason) = decap(&ctx);
    if let Some(n) = DECAP_STATS.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a per-CPU map.
        unsafe { *n += 1 };
    }
    action
}

lb_ebpf::object_end!();
