//! L3 direct server return: a tunnelled real's frames are wrapped in an outer IP header (IP in
//! IP, or GUE over UDP) to the broker's address and bounced to the next hop towards it, whose
//! MAC the controller resolved (`RealInfo::dst_mac`). The outer header has the client's family
//! (IPv4 in IPv4, IPv6 in IPv6); the broker's decap program, or a kernel tunnel device, unwraps
//! it, and the broker answers the client directly.
//!
//! A client packet larger than the tunnel's path takes (`RealTunnel::max_inner`) is not
//! forwarded: IPv4 with DF and every IPv6 packet are answered in place with ICMP
//! "fragmentation needed" / ICMPv6 "packet too big" from the VIP to the client, naming the MTU
//! that fits, as Katran does; the client's stack lowers its segment size and resends. IPv4
//! without DF is dropped and counted (the balancer does not fragment). An ICMP error being
//! forwarded is never answered with another.
//!
//! Frame layout (an optional VLAN tag stays where it was):
//!
//! ```text
//! in:   | Ethernet (14 or 18) | client IP packet ...                           |
//! IPIP: | Ethernet            | outer IPv4 (20) or IPv6 (40) | client IP packet |
//! GUE:  | Ethernet            | outer IPv4 / IPv6 | UDP (8)  | client IP packet |
//! ```

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, RealInfo, RealTunnel, TUNNEL_GUE, TUNNEL_L2, gue_source_port, tunnel_flow_label, tunnel_overhead,
};
use lb_ebpf::hdr::{ETH_HLEN, IP_DF, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr, UdpHdr, mapped_v4};

use crate::{
    Verdict,
    maps::{ANSWER_TOKENS, REAL_TUNNELS},
    parse::ptr_at,
};

const ETH_ALEN: usize = 6;
/// The shortest Ethernet frame without its FCS: shorter packets are padded to it.
const ETH_MIN_FRAME: usize = 60;
const VLAN_HLEN: usize = 4;
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();
/// The outer header's TTL or hop limit.
const OUTER_TTL: u8 = 64;

/// Bytes of the client's packet an ICMP answer quotes: its IPv4 header with the longest options
/// and the 8 bytes after it (RFC 792), or as much of its IPv6 packet as fits the minimum MTU of
/// 1,280 bytes with the answer's own 48 (RFC 4443 2.4): whatever extension headers it carries,
/// the quote reaches its TCP ports, which the client's kernel needs to find the connection.
/// Fixed sizes keep the checksum loops bounded; a too-big packet is always longer (a tunnel's
/// path MTU is at least `TUNNEL_MIN_MTU`, so an IPv6 packet too big for it has over 1,280
/// bytes).
const QUOTE4: usize = 68;
const QUOTE6: usize = 1280 - 40 - ICMP_HLEN;
/// ICMP header: type, code, checksum, and a 32-bit field (IPv4: unused and the next-hop MTU;
/// IPv6: the MTU).
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// What became of a frame for a tunnelled real.
pub enum Sent {
    /// Wrapped and bounced to the next hop: this many bytes on the wire.
    Forwarded(u64),
    /// Too big for the tunnel: answered with an ICMP error to the client.
    Answered,
}

/// Copies an IPv6 address, as two 8-byte words: a plain 16-byte assignment becomes a call to
/// a `memmove` subprogram.
///
/// # Safety
/// 16 bytes at `from` and at `to` must be readable and writable (`to` in the frame).
#[inline(always)]
unsafe fn copy6(to: *mut lb_common::Addr6, from: *const lb_common::Addr6) {
    let (to, from) = (to.cast::<u64>(), from.cast::<u64>());
    // SAFETY: the caller's.
    unsafe {
        core::ptr::write_volatile(to, core::ptr::read_volatile(from));
        core::ptr::write_volatile(to.add(1), core::ptr::read_volatile(from.add(1)));
    }
}

/// The ones' complement sum of `n` 16-bit words at `p` (unfolded; `n` at most 620, the
/// ICMPv6 answer's header and quote).
///
/// # Safety
/// `n` words at `p` must be inside the frame.
#[inline(always)]
unsafe fn sum16(p: *const u16, n: usize) -> u32 {
    let mut s = 0u32;
    for i in 0..n {
        // SAFETY: the caller's.
        s += u32::from(unsafe { *p.add(i) });
    }
    s
}

/// Folds a sum to the 16-bit checksum field (already complemented).
#[inline(always)]
const fn fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Sends a frame for tunnelled real `real_id` (`real` has `REAL_F_IPIP` or `REAL_F_GUE`).
/// `hash` gives the flow's, for the GUE source port and the IPv6 flow label (computed only
/// when one is written); `answer`: a frame
/// too big for the path is answered with an ICMP error (false for an ICMP error being
/// forwarded, which is dropped instead).
#[inline(always)]
pub fn send(ctx: &XdpContext, real_id: u32, real: &RealInfo, ipv6: bool, hash: impl Fn() -> u64, answer: bool) -> Result<Sent, Verdict> {
    let Some(t) = REAL_TUNNELS.get(real_id) else {
        return Err(Verdict::DropInternal);
    };
    if t.mode == TUNNEL_L2 {
        // The controller writes a real's tunnel before naming it; never seen unless it failed.
        return Err(Verdict::DropInternal);
    }
    // SAFETY: inside the frame (checked by `ptr_at`).
    let ethertype = unsafe { *ptr_at::<u16>(ctx, ETH_HLEN - 2)? };
    let tagged = ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD;
    match (tagged, ipv6) {
        (false, false) => send4::<ETH_HLEN>(ctx, real, t, &hash, answer),
        (true, false) => send4::<{ ETH_HLEN + VLAN_HLEN }>(ctx, real, t, &hash, answer),
        (false, true) => send6::<ETH_HLEN>(ctx, real, t, &hash, answer),
        (true, true) => send6::<{ ETH_HLEN + VLAN_HLEN }>(ctx, real, t, &hash, answer),
    }
}

/// Whether a frame whose IP packet claims to end at byte `end` really does: the frame holds
/// it, and holds nothing after it but the padding of a minimum-size Ethernet frame.
#[inline(always)]
fn claim_fits(ctx: &XdpContext, end: usize) -> bool {
    let len = ctx.data_end() - ctx.data();
    end <= len && (end == len || len <= ETH_MIN_FRAME)
}

/// Whether an IPv4 source may be sent an ICMP error: unicast (not 0/8, loopback, multicast,
/// reserved or broadcast), as RFC 1812 asks of routers.
#[inline(always)]
fn answerable4(src_be: u32) -> bool {
    let first = src_be.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// Whether an IPv6 source may be sent an ICMPv6 error: not unspecified, loopback or multicast.
#[inline(always)]
fn answerable6(src: &lb_common::Addr6) -> bool {
    let b = src[0].to_ne_bytes();
    let unspecified_or_loopback = src[0] == 0 && (src[1] == 0 || src[1] == u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1]));
    b[0] != 0xff && !unspecified_or_loopback
}

/// Answers each CPU may send per second, and at once after a quiet spell: what Linux allows
/// its own ICMP errors by default (`icmp_msgs_per_sec`, `icmp_msgs_burst`), per CPU here. An
/// attacker who spoofs a victim's address gets no more reflected at it than that, and never
/// more bytes than it sent.
const ANSWERS_PER_SEC: u64 = 1000;
const ANSWER_BURST: u64 = 50;

/// Takes a token from this CPU's bucket of ICMP answers (`ANSWER_TOKENS`: the time the
/// bucket was last full, in ns; a token every 1/`ANSWERS_PER_SEC` s up to `ANSWER_BURST`).
#[inline(always)]
fn answer_allowed() -> bool {
    const EVERY_NS: u64 = 1_000_000_000 / ANSWERS_PER_SEC;
    let Some(tat) = ANSWER_TOKENS.get_ptr_mut(0) else { return false };
    // SAFETY: a helper without arguments; this CPU's slot of a per-CPU map.
    let (now, tat) = (unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }, unsafe { &mut *tat });
    // A generic cell rate algorithm, as storm control's: `tat` runs at most a burst ahead.
    let next = if *tat > now { *tat } else { now };
    if next - now > EVERY_NS * (ANSWER_BURST - 1) {
        return false;
    }
    *tat = next + EVERY_NS;
    true
}

/// Moves the frame's start `by` bytes earlier (`by` < 0) or later.
#[inline(always)]
fn adjust_head(ctx: &XdpContext, by: i32) -> Result<(), Verdict> {
    // SAFETY: the helper checks the bounds; every packet pointer is derived anew after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, by) } != 0 {
        return Err(Verdict::DropInternal);
    }
    Ok(())
}

/// Writes the Ethernet header of a frame whose start moved `moved` bytes earlier: `dst` and
/// `src` as the MACs, and the rest of the old `L2` header (tag and EtherType) copied forward.
///
/// # Safety
/// `L2 + moved` bytes from the frame's start must be inside it, `moved` ≥ `L2` - 12.
#[inline(always)]
unsafe fn write_eth<const L2: usize>(start: usize, moved: usize, dst: *const u16, src: *const u16) {
    let eth = start as *mut u16;
    let old = (start + moved) as *const u16;
    // Word by word, volatile: a plain loop is turned into a call to a `memmove` subprogram
    // (the regions could overlap, as far as the compiler knows), which costs more than the
    // whole copy.
    // SAFETY: the caller's.
    unsafe {
        for i in 0..ETH_ALEN / 2 {
            core::ptr::write_volatile(eth.add(i), core::ptr::read_volatile(dst.add(i)));
            core::ptr::write_volatile(eth.add(ETH_ALEN / 2 + i), core::ptr::read_volatile(src.add(i)));
        }
        for i in (2 * ETH_ALEN) / 2..L2 / 2 {
            core::ptr::write_volatile(eth.add(i), core::ptr::read_volatile(old.add(i)));
        }
    }
}

#[inline(always)]
fn send4<const L2: usize>(
    ctx: &XdpContext,
    real: &RealInfo,
    t: &RealTunnel,
    hash: impl Fn() -> u64,
    answer: bool,
) -> Result<Sent, Verdict> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, L2)?;
    // SAFETY (every deref below): inside the frame, checked by `ptr_at` since the last
    // adjustment.
    let (tos, tot_len, frag_off) = unsafe { ((*ip).tos, u16::from_be((*ip).tot_len), (*ip).frag_off) };
    // The outer length is the client's claim, checked against the frame before anything is
    // written: no longer than it, and no shorter unless the rest is Ethernet padding (the frame
    // at its minimum size), so bytes past the claim never ride out over the path MTU.
    if !claim_fits(ctx, L2 + usize::from(tot_len)) || tot_len < 20 {
        return Err(Verdict::PassMalformed);
    }
    if tot_len > t.max_inner {
        // (SAFETY: the header is inside the frame, as above.)
        if !answer || frag_off & IP_DF == 0 || !answerable4(unsafe { (*ip).saddr }) || !answer_allowed() {
            return Err(Verdict::DropTooBig);
        }
        return answer4::<L2>(ctx, t.max_inner);
    }
    let gue = t.mode == TUNNEL_GUE;
    let over = tunnel_overhead(t.mode, false) as usize;
    adjust_head(ctx, -(over as i32))?;
    // The new Ethernet header, the outer IPv4 header and the UDP header, in one check.
    let outer = ptr_at::<[u8; 28]>(ctx, L2).map_err(|_| Verdict::DropInternal)?.cast::<Ipv4Hdr>();
    let start = ctx.data();
    unsafe { write_eth::<L2>(start, over, (&raw const real.dst_mac).cast(), (&raw const real.src_mac).cast()) };
    let len = u32::from(tot_len) + over as u32;
    unsafe {
        (*outer).ver_ihl = 0x45;
        (*outer).tos = tos;
        (*outer).tot_len = (len as u16).to_be();
        (*outer).id = 0;
        (*outer).frag_off = IP_DF;
        (*outer).ttl = OUTER_TTL;
        (*outer).protocol = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
        (*outer).check = 0;
        (*outer).saddr = mapped_v4(&t.src);
        (*outer).daddr = mapped_v4(&t.dst);
        (*outer).check = fold(sum16(outer.cast(), 10));
        if gue {
            let udp = outer.cast::<u8>().add(20).cast::<UdpHdr>();
            (*udp).source = gue_source_port(hash()).to_be();
            (*udp).dest = t.gue_port_be;
            (*udp).len = (tot_len + 8).to_be();
            // Zero: no checksum (RFC 768); the inner packet carries its own.
            (*udp).check = 0;
        }
    }
    Ok(Sent::Forwarded(u64::from(len) + L2 as u64))
}

#[inline(always)]
fn send6<const L2: usize>(
    ctx: &XdpContext,
    real: &RealInfo,
    t: &RealTunnel,
    hash: impl Fn() -> u64,
    answer: bool,
) -> Result<Sent, Verdict> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, L2)?;
    // SAFETY (every deref below): inside the frame, checked by `ptr_at` since the last
    // adjustment.
    let (vtf, payload) = unsafe { (u32::from_be((*ip).ver_tc_flow), u32::from(u16::from_be((*ip).payload_len))) };
    let inner = payload + 40;
    if !claim_fits(ctx, L2 + inner as usize) {
        return Err(Verdict::PassMalformed);
    }
    if inner > u32::from(t.max_inner) {
        // (SAFETY: the header is inside the frame, as above.)
        if !answer || !answerable6(unsafe { &(*ip).saddr }) || !answer_allowed() {
            return Err(Verdict::DropTooBig);
        }
        return answer6::<L2>(ctx, t.max_inner);
    }
    let gue = t.mode == TUNNEL_GUE;
    let over = tunnel_overhead(t.mode, true) as usize;
    adjust_head(ctx, -(over as i32))?;
    let outer = ptr_at::<[u8; 48]>(ctx, L2).map_err(|_| Verdict::DropInternal)?.cast::<Ipv6Hdr>();
    let start = ctx.data();
    unsafe { write_eth::<L2>(start, over, (&raw const real.dst_mac).cast(), (&raw const real.src_mac).cast()) };
    // Version 6, the client's traffic class, and a flow label from the flow's hash (RFC 6438),
    // for routers that spread by it.
    let hash = hash();
    let label = tunnel_flow_label(hash);
    unsafe {
        (*outer).ver_tc_flow = (6 << 28 | (vtf & 0x0ff0_0000) | label).to_be();
        (*outer).payload_len = ((inner + over as u32 - 40) as u16).to_be();
        (*outer).next_header = if gue { IPPROTO_UDP } else { IPPROTO_IPV6 };
        (*outer).hop_limit = OUTER_TTL;
        copy6(&raw mut (*outer).saddr, (&raw const t.src).cast());
        copy6(&raw mut (*outer).daddr, (&raw const t.dst).cast());
        if gue {
            let udp = outer.cast::<u8>().add(40).cast::<UdpHdr>();
            (*udp).source = gue_source_port(hash).to_be();
            (*udp).dest = t.gue_port_be;
            (*udp).len = ((inner + 8) as u16).to_be();
            // Zero, as tunnels over IPv6 may send (RFC 6935); the decap program accepts it, a
            // kernel fou device needs `udp6zerocsumrx`.
            (*udp).check = 0;
        }
    }
    Ok(Sent::Forwarded(u64::from(inner + over as u32) + L2 as u64))
}

/// Turns an IPv4 frame too big for the tunnel into ICMP "fragmentation needed" to its source,
/// from its destination (the VIP), naming `mtu`, and bounces it back the way it came.
#[inline(always)]
fn answer4<const L2: usize>(ctx: &XdpContext, mtu: u16) -> Result<Sent, Verdict> {
    const ADD: usize = 20 + ICMP_HLEN;
    adjust_head(ctx, -(ADD as i32))?;
    // The new headers and the quote (which is the old packet's start, where it already is).
    let ip = ptr_at::<[u8; ADD + QUOTE4]>(ctx, L2).map_err(|_| Verdict::DropInternal)?.cast::<Ipv4Hdr>();
    let start = ctx.data();
    // SAFETY (every deref below): inside the frame, checked by `ptr_at` just above.
    unsafe {
        let old = start + ADD;
        let (client_mac, our_mac) = (*((old + ETH_ALEN) as *const [u16; 3]), *(old as *const [u16; 3]));
        write_eth::<L2>(start, ADD, client_mac.as_ptr(), our_mac.as_ptr());
        let quoted = (old + L2) as *const Ipv4Hdr;
        let (client, vip) = ((*quoted).saddr, (*quoted).daddr);
        (*ip).ver_ihl = 0x45;
        (*ip).tos = 0;
        (*ip).tot_len = ((ADD + QUOTE4) as u16).to_be();
        (*ip).id = 0;
        (*ip).frag_off = 0;
        (*ip).ttl = OUTER_TTL;
        (*ip).protocol = IPPROTO_ICMP;
        (*ip).check = 0;
        (*ip).saddr = vip;
        (*ip).daddr = client;
        (*ip).check = fold(sum16(ip.cast(), 10));
        let icmp = ip.cast::<u8>().add(20);
        *icmp = ICMP_DEST_UNREACH;
        *icmp.add(1) = ICMP_FRAG_NEEDED;
        *icmp.add(2).cast::<u16>() = 0;
        *icmp.add(4).cast::<u16>() = 0;
        *icmp.add(6).cast::<u16>() = mtu.to_be();
        *icmp.add(2).cast::<u16>() = fold(sum16(icmp.cast(), (ICMP_HLEN + QUOTE4) / 2));
    }
    trim(ctx, L2 + ADD + QUOTE4)?;
    Ok(Sent::Answered)
}

/// As [`answer4`] for IPv6: ICMPv6 "packet too big".
#[inline(always)]
fn answer6<const L2: usize>(ctx: &XdpContext, mtu: u16) -> Result<Sent, Verdict> {
    const ADD: usize = 40 + ICMP_HLEN;
    adjust_head(ctx, -(ADD as i32))?;
    let ip = ptr_at::<[u8; ADD + QUOTE6]>(ctx, L2).map_err(|_| Verdict::DropInternal)?.cast::<Ipv6Hdr>();
    let start = ctx.data();
    // SAFETY (every deref below): inside the frame, checked by `ptr_at` just above.
    unsafe {
        let old = start + ADD;
        let (client_mac, our_mac) = (*((old + ETH_ALEN) as *const [u16; 3]), *(old as *const [u16; 3]));
        write_eth::<L2>(start, ADD, client_mac.as_ptr(), our_mac.as_ptr());
        let quoted = (old + L2) as *const Ipv6Hdr;
        let len = (ICMP_HLEN + QUOTE6) as u16;
        (*ip).ver_tc_flow = (6_u32 << 28).to_be();
        (*ip).payload_len = len.to_be();
        (*ip).next_header = IPPROTO_ICMPV6;
        (*ip).hop_limit = OUTER_TTL;
        // (The quoted header starts after the new one: the copies do not overlap.)
        copy6(&raw mut (*ip).saddr, &raw const (*quoted).daddr);
        copy6(&raw mut (*ip).daddr, &raw const (*quoted).saddr);
        let icmp = ip.cast::<u8>().add(40);
        *icmp = ICMPV6_PKT_TOOBIG;
        *icmp.add(1) = 0;
        *icmp.add(2).cast::<u16>() = 0;
        *icmp.add(4).cast::<u16>() = 0;
        *icmp.add(6).cast::<u16>() = mtu.to_be();
        // The pseudo-header: both addresses, the length and the next header (RFC 8200 8.1).
        let pseudo = sum16(ip.cast::<u8>().add(8).cast(), 16) + u32::from(len.to_be()) + u32::from(u16::from(IPPROTO_ICMPV6).to_be());
        *icmp.add(2).cast::<u16>() = fold(pseudo + sum16(icmp.cast(), (ICMP_HLEN + QUOTE6) / 2));
    }
    trim(ctx, L2 + ADD + QUOTE6)?;
    Ok(Sent::Answered)
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn trim(ctx: &XdpContext, len: usize) -> Result<(), Verdict> {
    let have = ctx.data_end() - ctx.data();
    if have > len {
        // SAFETY: the helper checks the bounds.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - len) as i32)) } != 0 {
            return Err(Verdict::DropInternal);
        }
    }
    Ok(())
}
