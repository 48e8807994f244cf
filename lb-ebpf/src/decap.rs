//! The brokers' decapsulation program (`dsrlb-decap`, an object of its own, loaded by
//! `dsrlb decap attach` on a broker host, never by `dsrlb run`). Tunnelled frames from a
//! balancer (IPIP, IPv6 in IPv6, GUE over UDP in either family) whose inner destination is one
//! of the VIPs this host holds lose their outer header here and go to the kernel as the client's
//! own packet; the broker then answers the client directly. Everything else passes untouched.
//! Hosts whose kernels have the `ipip` or `fou` modules could use a tunnel device instead; many
//! hardened broker hosts do not load them, and the machines dsrlb is tested on have none.
//!
//! GUE: version 1 (the inner IP header straight after the UDP header, as Katran sends it), and
//! version 0 with a header of protocol 4 or 41 (its optional fields skipped); control messages
//! pass untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{DECAP_MAX_ADDRS, DecapConf, Ip6, decap_reason as why};
use lb_ebpf::hdr::{IP_MF_OFFSET_MASK, Ipv4Hdr, Ipv6Hdr};

/// VIPs this host holds (IPv4 as IPv4-mapped IPv6): a tunnel frame for one is decapsulated.
#[btf_map]
static DECAP_VIPS: HashMap<Ip6, u8, { DECAP_MAX_ADDRS as usize }> = HashMap::new();

/// Outer sources allowed to send tunnel frames for the VIPs (the balancers' tunnel sources),
/// unless `DecapConf::any_source`.
#[btf_map]
static DECAP_SOURCES: HashMap<Ip6, u8, { DECAP_MAX_ADDRS as usize }> = HashMap::new();

#[btf_map]
static DECAP_CONF: Array<DecapConf, 1> = Array::new();

/// Frames by [`why`], per CPU.
#[btf_map]
static DECAP_STATS: PerCpuArray<u64, { why::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_IPV6: u8 = 41;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// GUE version 0's fixed header.
const GUE_HLEN: usize = 4;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

#[repr(C)]
struct UdpHdr {
    source: u16,
    dest: u16,
    len: u16,
    check: u16,
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
    let mut octets = [0u8; 16];
    octets[10] = 0xff;
    octets[11] = 0xff;
    let b = v4_be.to_ne_bytes();
    octets[12] = b[0];
    octets[13] = b[1];
    octets[14] = b[2];
    octets[15] = b[3];
    Ip6 { octets }
}

/// What the outer headers say: the outer source, how many bytes to strip after the Ethernet
/// header, and the inner family (`true`: IPv6).
struct Tunnel {
    source: Ip6,
    strip: usize,
    inner6: bool,
}

/// The tunnel frame's outer headers, or the reason it is none of ours to unwrap.
#[inline(always)]
fn outer(ctx: &XdpContext, conf: &DecapConf) -> Result<Tunnel, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(why::PASS_MALFORMED)?;
    // SAFETY: inside the frame (checked by `ptr_at`).
    let proto = unsafe { (*eth).proto };
    let (source, l4, protocol) = if proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(why::PASS_MALFORMED)?;
        // SAFETY: as above.
        let (ver_ihl, frag_off, protocol, saddr) = unsafe { ((*ip).ver_ihl, (*ip).frag_off, (*ip).protocol, (*ip).saddr) };
        if protocol != IPPROTO_IPIP && protocol != IPPROTO_UDP && protocol != IPPROTO_IPV6 {
            return Err(why::PASS_NOT_TUNNEL);
        }
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        if ver_ihl >> 4 != 4 || ihl < 20 {
            return Err(why::PASS_MALFORMED);
        }
        if frag_off & IP_MF_OFFSET_MASK != 0 {
            return Err(why::PASS_FRAGMENT);
        }
        (mapped(saddr), ihl, protocol)
    } else if proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(why::PASS_MALFORMED)?;
        // SAFETY: as above.
        let (ver, protocol, saddr) = unsafe { (u32::from_be((*ip).ver_tc_flow) >> 28, (*ip).next_header, (*ip).saddr) };
        if protocol != IPPROTO_IPIP && protocol != IPPROTO_UDP && protocol != IPPROTO_IPV6 {
            // Extension headers included: a balancer sends none.
            return Err(why::PASS_NOT_TUNNEL);
        }
        if ver != 6 {
            return Err(why::PASS_MALFORMED);
        }
        (Ip6::from_words(saddr), IPV6_HLEN, protocol)
    } else {
        return Err(why::PASS_NOT_TUNNEL);
    };
    if protocol != IPPROTO_UDP {
        return Ok(Tunnel { source, strip: l4, inner6: protocol == IPPROTO_IPV6 });
    }
    let udp: *const UdpHdr = ptr_at(ctx, ETH_HLEN + l4).ok_or(why::PASS_MALFORMED)?;
    // SAFETY: as above.
    if conf.gue_port_be == 0 || unsafe { (*udp).dest } != conf.gue_port_be {
        return Err(why::PASS_NOT_TUNNEL);
    }
    let gue = ETH_HLEN + l4 + UDP_HLEN;
    let first: *const [u8; 2] = ptr_at(ctx, gue).ok_or(why::PASS_MALFORMED)?;
    // SAFETY: as above.
    let [b0, b1] = unsafe { *first };
    match b0 >> 6 {
        // Version 1: the inner IP header itself; its version says the family.
        1 => Ok(Tunnel { source, strip: l4 + UDP_HLEN, inner6: b0 >> 4 == 6 }),
        // Version 0: a data message (C clear) of protocol 4 or 41, after `hlen` words of options.
        0 if b0 & 0x20 == 0 && (b1 == IPPROTO_IPIP || b1 == IPPROTO_IPV6) => {
            Ok(Tunnel { source, strip: l4 + UDP_HLEN + GUE_HLEN + usize::from(b0 & 0x1f) * 4, inner6: b1 == IPPROTO_IPV6 })
        }
        _ => Err(why::PASS_NOT_TUNNEL),
    }
}

/// Whether an inner packet of `protocol` (and, for UDP, to `dest_be`) is a tunnel frame again.
#[inline(always)]
fn nested(ctx: &XdpContext, protocol: u8, l4: usize, conf: &DecapConf) -> bool {
    match protocol {
        IPPROTO_IPIP | IPPROTO_IPV6 => true,
        // SAFETY: inside the frame (checked by `ptr_at`).
        IPPROTO_UDP => ptr_at::<UdpHdr>(ctx, l4).is_some_and(|u| conf.gue_port_be != 0 && unsafe { (*u).dest } == conf.gue_port_be),
        _ => false,
    }
}

/// Decapsulates or passes: the action and the reason it is counted under.
#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, u32) {
    let Some(conf) = DECAP_CONF.get(0) else { return (xdp_action::XDP_PASS, why::PASS_NOT_TUNNEL) };
    let t = match outer(ctx, conf) {
        Ok(t) => t,
        Err(reason) => return (xdp_action::XDP_PASS, reason),
    };
    let inner = ETH_HLEN + t.strip;
    let (dst, protocol, l4) = if t.inner6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
        // SAFETY: inside the frame.
        let (ver, next, daddr) = unsafe { (u32::from_be((*ip).ver_tc_flow) >> 28, (*ip).next_header, (*ip).daddr) };
        if ver != 6 {
            return (xdp_action::XDP_PASS, why::PASS_MALFORMED);
        }
        (Ip6::from_words(daddr), next, inner + IPV6_HLEN)
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
        // SAFETY: inside the frame.
        let (ver_ihl, protocol, daddr) = unsafe { ((*ip).ver_ihl, (*ip).protocol, (*ip).daddr) };
        if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
            return (xdp_action::XDP_PASS, why::PASS_MALFORMED);
        }
        (mapped(daddr), protocol, inner + usize::from(ver_ihl & 0x0f) * 4)
    };
    // SAFETY: map lookups; the values are read only for presence.
    if unsafe { DECAP_VIPS.get(&dst) }.is_none() {
        return (xdp_action::XDP_PASS, why::PASS_NOT_OURS);
    }
    // SAFETY: as above.
    if conf.any_source == 0 && unsafe { DECAP_SOURCES.get(&t.source) }.is_none() {
        return (xdp_action::XDP_DROP, why::DROP_FOREIGN_SOURCE);
    }
    if nested(ctx, protocol, l4, conf) {
        return (xdp_action::XDP_DROP, why::DROP_NESTED);
    }
    // The Ethernet header moves forward over the outer headers: its MACs stay, the EtherType
    // becomes the inner family's.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
    // SAFETY: inside the frame.
    let (dst_mac, src_mac) = unsafe { ((*eth).dst, (*eth).src) };
    let Ok(delta) = i32::try_from(t.strip) else { return (xdp_action::XDP_PASS, why::PASS_MALFORMED) };
    // SAFETY: the helper checks the new start against the frame; the context is the program's.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return (xdp_action::XDP_PASS, why::PASS_MALFORMED);
    }
    // After the helper every packet pointer is new, and checked again (it cannot fail: the inner
    // header, read above, is longer than an Ethernet header; the frame is beheaded now, so a
    // failure could only drop it).
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return (xdp_action::XDP_DROP, why::PASS_MALFORMED) };
    let eth = eth.cast_mut();
    // SAFETY: inside the frame (checked above).
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
        (*eth).proto = if t.inner6 { ETH_P_IPV6 } else { ETH_P_IP };
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
