//! Bounds-checked header parsing: Ethernet, one optional VLAN tag, IPv4 (honouring IHL) or IPv6
//! (with a bounded chain of extension headers), TCP, and ICMP "fragmentation needed" / ICMPv6
//! "packet too big" down to the ports of the TCP segment it quotes.

use aya_ebpf::programs::XdpContext;
use lb_common::{Addr6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, fold6};
use lb_ebpf::hdr::{IP_MF_OFFSET_MASK, IPV6_DSTOPTS, IPV6_FRAGMENT, IPV6_HOPOPTS, IPV6_MAX_EXT, IPV6_ROUTING, Ipv4Hdr, Ipv6Hdr};

use crate::Verdict;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;

// EtherTypes as they read from the wire into a native u16.
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();

/// The IPv6 fragment header.
#[repr(C)]
struct FragHdr {
    next_header: u8,
    reserved: u8,
    /// Offset (13 bits), two reserved bits, "more fragments", in wire order.
    frag_off: u16,
    id: u32,
}

/// `FragHdr::frag_off` bits, in wire order: the offset and "more fragments".
const IP6_OFFSET_MF: u16 = 0xfff9_u16.to_be();

/// The two bytes that open every IPv6 extension header this parser follows.
#[repr(C)]
struct ExtHdr {
    next_header: u8,
    /// Length in 8-byte units, not counting the first 8.
    len: u8,
}

const ICMPV6_PKT_TOOBIG: u8 = 2;

/// The ICMP header of a "destination unreachable" message; the quoted datagram follows.
#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    unused: u16,
    next_hop_mtu: u16,
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// The part of a TCP header the balancer reads, padded to the minimum header length so one
/// bounds check covers a whole (option-less) header.
#[repr(C)]
struct TcpHdr {
    source: u16,
    dest: u16,
    seq: u32,
    ack_seq: u32,
    doff_res: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg_ptr: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the data plane needs from a TCP/IPv4 frame. Addresses and ports keep wire order.
pub struct Tcp4 {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, ...).
    pub flags: u8,
}

/// What the data plane needs from a TCP/IPv6 frame: the ports and flags as [`Tcp4`] holds
/// them (its addresses the [`fold6`] of the real ones), and the addresses.
pub struct Tcp6 {
    pub tcp: Tcp4,
    pub src: Addr6,
    pub dst: Addr6,
}

/// A frame that the parser recognised as IPv4 or IPv6 to be looked at further.
pub enum Parsed {
    /// A TCP segment (never a fragment).
    Tcp(Tcp4),
    /// An IPv4 fragment with protocol TCP: no ports to look at, only the destination.
    TcpFragment { dst_be: u32 },
    /// ICMP "fragmentation needed" sent to the source of a TCP segment it quotes: the flow of
    /// that segment as its client sends it (the quoted destination is the client, the quoted
    /// source, which is also this message's destination, the server), `flags` 0.
    IcmpTooBig(Tcp4),
    /// A TCP/IPv6 segment (no fragment header).
    Tcp6(Tcp6),
    /// A fragment of a TCP/IPv6 packet (not an atomic one): no ports to look at, only the
    /// destination.
    Fragment6 { dst: Addr6 },
    /// ICMPv6 "packet too big" about a TCP segment its destination sent, as `IcmpTooBig`.
    IcmpTooBig6(Tcp6),
}

/// Returns a pointer to a `T` at `offset` in the frame, or `PassMalformed` when it would run
/// past the end.
///
/// Headers are read through plain (not unaligned) loads, as C XDP programs do: packet data is
/// at least 2-byte aligned, and the kernel only allows programs with unaligned packet access on
/// CPUs that handle it. Unaligned reads would make LLVM split every load into bytes.
/// (Mutable, for `tunnel`, which writes headers through it.)
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Verdict> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(Verdict::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

/// Parses up to the TCP ports. Anything that is not TCP over IPv4 or IPv6 comes back as the pass
/// verdict that says why.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Verdict> {
    let mut l3 = ETH_HLEN;
    // SAFETY (all derefs below): `ptr_at` checked that the whole header lies in the frame.
    let mut ethertype = unsafe { *ptr_at::<u16>(ctx, ETH_HLEN - 2)? };
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = unsafe { *ptr_at::<u16>(ctx, ETH_HLEN + VLAN_HLEN - 2)? };
        l3 += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(Verdict::PassVlanStacked);
        }
    }
    if ethertype == ETH_P_IPV6 {
        return parse6(ctx, l3);
    }
    if ethertype != ETH_P_IP {
        return Err(Verdict::PassNotIp);
    }

    let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
    let ver_ihl = unsafe { (*ip).ver_ihl };
    if ver_ihl >> 4 != 4 {
        return Err(Verdict::PassMalformed);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < core::mem::size_of::<Ipv4Hdr>() {
        return Err(Verdict::PassMalformed);
    }
    let protocol = unsafe { (*ip).protocol };
    let dst_be = unsafe { (*ip).daddr };
    let fragment = unsafe { (*ip).frag_off } & IP_MF_OFFSET_MASK != 0;
    if protocol == IPPROTO_ICMP && !fragment {
        return too_big(ctx, dst_be, l3 + ihl);
    }
    if protocol != IPPROTO_TCP {
        return Err(Verdict::PassNotTcp);
    }
    if fragment {
        return Ok(Parsed::TcpFragment { dst_be });
    }
    let src_be = unsafe { (*ip).saddr };

    // `ihl` is at most 60, so the verifier can bound the offset; the check covers the options.
    let tcp = ptr_at::<TcpHdr>(ctx, l3 + ihl)?;
    Ok(Parsed::Tcp(Tcp4 {
        src_be,
        dst_be,
        sport_be: unsafe { (*tcp).source },
        dport_be: unsafe { (*tcp).dest },
        flags: unsafe { (*tcp).flags },
    }))
}

/// An ICMP message at `l4` to `dst_be`: "fragmentation needed" about a whole TCP segment that
/// `dst_be` sent, or the pass verdict that says why not. Other ICMP passes as not TCP; a
/// quoted datagram that is not such a segment (UDP, a later fragment, another source) as no
/// listener's; a quote cut short as malformed.
#[inline(always)]
fn too_big(ctx: &XdpContext, dst_be: u32, l4: usize) -> Result<Parsed, Verdict> {
    // SAFETY (all derefs below): `ptr_at` checked that the whole header lies in the frame.
    let icmp = ptr_at::<IcmpHdr>(ctx, l4)?;
    if unsafe { (*icmp).kind } != ICMP_DEST_UNREACH || unsafe { (*icmp).code } != ICMP_FRAG_NEEDED {
        return Err(Verdict::PassNotTcp);
    }
    let inner_l3 = l4 + core::mem::size_of::<IcmpHdr>();
    let inner = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?;
    let ver_ihl = unsafe { (*inner).ver_ihl };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < core::mem::size_of::<Ipv4Hdr>() {
        return Err(Verdict::PassMalformed);
    }
    let quoted_src = unsafe { (*inner).saddr };
    if unsafe { (*inner).protocol } != IPPROTO_TCP || unsafe { (*inner).frag_off } & IP_MF_OFFSET_MASK != 0 || quoted_src != dst_be {
        return Err(Verdict::PassNoListener);
    }
    // RFC 792 quotes at least 8 bytes of the datagram: the ports are the first four.
    let ports = ptr_at::<[u16; 2]>(ctx, inner_l3 + ihl)?;
    Ok(Parsed::IcmpTooBig(Tcp4 {
        src_be: unsafe { (*inner).daddr },
        dst_be: quoted_src,
        sport_be: unsafe { (*ports)[1] },
        dport_be: unsafe { (*ports)[0] },
        flags: 0,
    }))
}

/// An IPv6 packet at `l3`: its extension headers (hop-by-hop, routing, destination options) are
/// skipped, at most [`IPV6_MAX_EXT`] of them; a fragment header ends the walk.
#[inline(always)]
fn parse6(ctx: &XdpContext, l3: usize) -> Result<Parsed, Verdict> {
    // SAFETY (all derefs below): `ptr_at` checked that the whole header lies in the frame.
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
    if u32::from_be(unsafe { (*ip).ver_tc_flow }) >> 28 != 6 {
        return Err(Verdict::PassMalformed);
    }
    let dst = unsafe { (*ip).daddr };
    let (mut next, mut l4) = skip_ext(ctx, unsafe { (*ip).next_header }, l3 + core::mem::size_of::<Ipv6Hdr>())?;
    if next == IPV6_FRAGMENT {
        let frag = ptr_at::<FragHdr>(ctx, l4)?;
        if unsafe { (*frag).next_header } != IPPROTO_TCP {
            // As for IPv4, only TCP fragments are dropped.
            return Err(Verdict::PassNotTcp);
        }
        if unsafe { (*frag).frag_off } & IP6_OFFSET_MF != 0 {
            return Ok(Parsed::Fragment6 { dst });
        }
        // An atomic fragment (offset 0, no more): a whole segment behind a fragment header.
        next = IPPROTO_TCP;
        l4 += core::mem::size_of::<FragHdr>();
    }
    match next {
        IPPROTO_TCP => {
            let src = unsafe { (*ip).saddr };
            let tcp = ptr_at::<TcpHdr>(ctx, l4)?;
            Ok(Parsed::Tcp6(Tcp6 {
                tcp: Tcp4 {
                    src_be: fold6(&src),
                    dst_be: fold6(&dst),
                    sport_be: unsafe { (*tcp).source },
                    dport_be: unsafe { (*tcp).dest },
                    flags: unsafe { (*tcp).flags },
                },
                src,
                dst,
            }))
        }
        IPPROTO_ICMPV6 => too_big6(ctx, &dst, l4),
        _ => Err(Verdict::PassNotTcp),
    }
}

/// Follows the extension headers from `next` at `off`: the first header that is not one to
/// skip, and where it starts. A chain longer than [`IPV6_MAX_EXT`] passes as not TCP.
#[inline(always)]
fn skip_ext(ctx: &XdpContext, mut next: u8, mut off: usize) -> Result<(u8, usize), Verdict> {
    for _ in 0..IPV6_MAX_EXT {
        if next != IPV6_HOPOPTS && next != IPV6_ROUTING && next != IPV6_DSTOPTS {
            return Ok((next, off));
        }
        // SAFETY: `ptr_at` checked that the two bytes lie in the frame.
        let ext = ptr_at::<ExtHdr>(ctx, off)?;
        next = unsafe { (*ext).next_header };
        off += (usize::from(unsafe { (*ext).len }) + 1) * 8;
    }
    if next != IPV6_HOPOPTS && next != IPV6_ROUTING && next != IPV6_DSTOPTS {
        return Ok((next, off));
    }
    Err(Verdict::PassNotTcp)
}

/// An ICMPv6 message at `l4` to `dst`: "packet too big" about a whole TCP segment that `dst`
/// sent, as [`too_big`] for IPv4. Neighbour discovery and every other ICMPv6 message pass as
/// not TCP.
#[inline(always)]
fn too_big6(ctx: &XdpContext, dst: &Addr6, l4: usize) -> Result<Parsed, Verdict> {
    // SAFETY (all derefs below): `ptr_at` checked that the whole header lies in the frame.
    // The ICMPv6 header has the same 8-byte shape (type, code, checksum, MTU).
    let icmp = ptr_at::<IcmpHdr>(ctx, l4)?;
    if unsafe { (*icmp).kind } != ICMPV6_PKT_TOOBIG || unsafe { (*icmp).code } != 0 {
        return Err(Verdict::PassNotTcp);
    }
    let inner_l3 = l4 + core::mem::size_of::<IcmpHdr>();
    let inner = ptr_at::<Ipv6Hdr>(ctx, inner_l3)?;
    if u32::from_be(unsafe { (*inner).ver_tc_flow }) >> 28 != 6 {
        return Err(Verdict::PassMalformed);
    }
    let quoted_src = unsafe { (*inner).saddr };
    // Only a segment whose TCP header follows the fixed header directly: the balancer's own
    // clients' segments, as a broker sends them, carry no extension headers.
    if unsafe { (*inner).next_header } != IPPROTO_TCP || quoted_src[0] != dst[0] || quoted_src[1] != dst[1] {
        return Err(Verdict::PassNoListener);
    }
    let client = unsafe { (*inner).daddr };
    let ports = ptr_at::<[u16; 2]>(ctx, inner_l3 + core::mem::size_of::<Ipv6Hdr>())?;
    Ok(Parsed::IcmpTooBig6(Tcp6 {
        tcp: Tcp4 {
            src_be: fold6(&client),
            dst_be: fold6(&quoted_src),
            sport_be: unsafe { (*ports)[1] },
            dport_be: unsafe { (*ports)[0] },
            flags: 0,
        },
        src: client,
        dst: quoted_src,
    }))
}
