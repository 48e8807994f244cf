//! Bounds-checked header parsing: Ethernet, one optional VLAN tag, IPv4 (honouring IHL), TCP.

use aya_ebpf::programs::XdpContext;
use lb_common::IPPROTO_TCP;

use crate::Verdict;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;

// EtherTypes as they read from the wire into a native u16 (the program only runs little-endian
// on the hosts we target, but `to_be` keeps it right on either).
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();

/// IPv4 `frag_off` bits, in wire order: "more fragments" and the 13-bit offset.
const IP_MF_OFFSET_MASK: u16 = 0x3fff_u16.to_be();

/// What the data plane needs from a TCP/IPv4 frame. Addresses and ports keep wire order.
pub struct Tcp4 {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

/// A frame that the parser recognised as IPv4 to be looked at further.
pub enum Parsed {
    /// A TCP segment (never a fragment).
    Tcp(Tcp4),
    /// An IPv4 fragment with protocol TCP: no ports to look at, only the destination.
    TcpFragment { dst_be: u32 },
}

/// Returns a pointer to a `T` at `offset` in the frame, or `None` when it would run past the end.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Verdict> {
    let p = ptr_at::<T>(ctx, offset).ok_or(Verdict::PassMalformed)?;
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; packet data has no
    // alignment guarantee, hence the unaligned read.
    Ok(unsafe { p.read_unaligned() })
}

/// Parses up to the TCP ports. Anything that is not TCP over IPv4 comes back as the pass verdict
/// that says why.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Verdict> {
    let mut l3 = ETH_HLEN;
    let mut ethertype: u16 = read(ctx, ETH_HLEN - 2)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = read(ctx, ETH_HLEN + VLAN_HLEN - 2)?;
        l3 += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(Verdict::PassVlanStacked);
        }
    }
    if ethertype != ETH_P_IP {
        return Err(Verdict::PassNotIpv4);
    }

    // The fixed part of the IPv4 header: [ver/ihl, tos, len(2), id(2), frag(2), ttl, proto,
    // csum(2), src(4), dst(4)].
    let hdr: [u8; IPV4_MIN_HLEN] = read(ctx, l3)?;
    if hdr[0] >> 4 != 4 {
        return Err(Verdict::PassMalformed);
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Verdict::PassMalformed);
    }
    if hdr[9] != IPPROTO_TCP {
        return Err(Verdict::PassNotTcp);
    }
    let dst_be = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    if u16::from_ne_bytes([hdr[6], hdr[7]]) & IP_MF_OFFSET_MASK != 0 {
        return Ok(Parsed::TcpFragment { dst_be });
    }
    let src_be = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);

    // `ihl` is at most 60, so the verifier can bound `l4`; the check covers the options too.
    let l4 = l3 + ihl;
    let tcp: [u8; TCP_MIN_HLEN] = read(ctx, l4)?;
    Ok(Parsed::Tcp(Tcp4 {
        src_be,
        dst_be,
        sport_be: u16::from_ne_bytes([tcp[0], tcp[1]]),
        dport_be: u16::from_ne_bytes([tcp[2], tcp[3]]),
    }))
}
