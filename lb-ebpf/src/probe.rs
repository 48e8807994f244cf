//! Health probes to a tunnelled backend (`forward = "ipip"` or `"gue"`) along the DSR path.
//!
//! The controller's VIP probe is a TCP connection from the balancer to VIP:port whose socket
//! carries the backend's probe mark (`lb_common::PROBE_MARK_BASE | id`); policy routing sends
//! it to the next hop towards the broker. This TC egress program (on the balancer's interface,
//! attached by the controller while it has tunnelled backends) wraps such packets the way the
//! XDP program wraps client traffic, from the entries in `PROBE_TUNNELS`: so the probe reaches
//! VIP:port only through the broker's decap and VIP, and a broker without either is
//! `vip-misconfigured`. Every other packet passes untouched, at the cost of one load and
//! compare. (TC rather than an LWT route: the kernel offers it on every interface, it is how
//! Katran encapsulates its health checks, and the same object and maps serve both.)

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use lb_common::{PROBE_MARK_BASE, PROBE_MARK_MASK, RealTunnel, TUNNEL_GUE, TUNNEL_L2, gue_source_port, probe_tunnel_slot, tunnel_overhead};
use lb_ebpf::hdr::{ETH_HLEN, IP_DF, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr, UdpHdr, mapped_v4};

use crate::maps::PROBE_TUNNELS;

/// TCX's "next": the packet goes on to the programs and filters after this one (`TC_ACT_OK`
/// would end the chain, and the legacy `tc` filters would not see it either).
const TCX_NEXT: i32 = -1;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;

#[inline(always)]
pub fn encap(ctx: &TcContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let (mark, protocol) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).protocol) };
    if mark & PROBE_MARK_MASK != PROBE_MARK_BASE {
        return TCX_NEXT;
    }
    let ipv6 = match u32::from(u16::from_be(protocol as u16)) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return TCX_NEXT,
    };
    let Some(t) = PROBE_TUNNELS.get(probe_tunnel_slot(mark & !PROBE_MARK_MASK, ipv6)) else {
        return TCX_NEXT;
    };
    if t.mode == TUNNEL_L2 {
        return TCX_NEXT;
    }
    match wrap(ctx, t, ipv6) {
        Ok(()) => TCX_NEXT,
        // A probe that cannot be wrapped must not leave bare: it would reach the broker as if it
        // held the VIP on its segment.
        Err(()) => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn wrap(ctx: &TcContext, t: &RealTunnel, ipv6: bool) -> Result<(), ()> {
    let inner = ctx.skb.len().checked_sub(ETH_HLEN as u32).ok_or(())?;
    let gue = t.mode == TUNNEL_GUE;
    let over = tunnel_overhead(t.mode, ipv6);
    let mut flags = u64::from(if ipv6 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 });
    if gue {
        flags |= u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
    }
    ctx.skb.adjust_room(over as i32, BPF_ADJ_ROOM_MAC, flags).map_err(|_| ())?;
    let total = inner + over;
    let ip_len = if ipv6 { 40 } else { 20 };
    if ipv6 {
        let h = Ipv6Hdr {
            ver_tc_flow: (6_u32 << 28).to_be(),
            payload_len: ((total - 40) as u16).to_be(),
            next_header: if gue { IPPROTO_UDP } else { IPPROTO_IPV6 },
            hop_limit: 64,
            saddr: t.src.words(),
            daddr: t.dst.words(),
        };
        ctx.skb.store(ETH_HLEN, &h, 0).map_err(|_| ())?;
    } else {
        let mut h = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0,
            tot_len: (total as u16).to_be(),
            id: 0,
            frag_off: IP_DF,
            ttl: 64,
            protocol: if gue { IPPROTO_UDP } else { IPPROTO_IPIP },
            check: 0,
            saddr: mapped_v4(&t.src),
            daddr: mapped_v4(&t.dst),
        };
        let words = (&raw const h).cast::<u16>();
        let mut sum = 0u32;
        for i in 0..10 {
            // SAFETY: ten 16-bit words of a 20-byte header on the stack.
            sum += u32::from(unsafe { *words.add(i) });
        }
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        h.check = !(sum as u16);
        ctx.skb.store(ETH_HLEN, &h, 0).map_err(|_| ())?;
    }
    if gue {
        // The socket's flow hash picks the port: a probe connection is one flow, like a client's.
        // SAFETY: the context the kernel passed.
        let hash = unsafe { (*ctx.skb.skb).hash };
        let udp =
            UdpHdr { source: gue_source_port(u64::from(hash)).to_be(), dest: t.gue_port_be, len: ((inner + 8) as u16).to_be(), check: 0 };
        ctx.skb.store(ETH_HLEN + ip_len, &udp, 0).map_err(|_| ())?;
    }
    Ok(())
}
