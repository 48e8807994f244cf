//! The brokers' decapsulation program (`dsrlb-decap`) through `BPF_PROG_TEST_RUN`: tunnel
//! frames for a VIP held here lose their outer header and come out as the client's own frame,
//! byte for byte (IPIP, IPv6 in IPv6, GUE version 1 over either family, GUE version 0 with
//! options); everything else passes untouched: frames that are no tunnel, tunnel frames for
//! addresses that are no VIP here, outer fragments and every truncation short of the inner
//! header; tunnel frames from a source that is not a balancer, and nested ones, are dropped.
//! Each frame moves one counter, its reason's. The outer frames are built here by hand, not by
//! the code under test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{DECAP_GUE_PORT, decap_reason as why};
use lb_userspace::decap::{Loaded, Settings};
use tests::{
    fixture::{Case, UnderTest as _, check_case, check_table},
    frame::{Ipv4Frame, Ipv6Frame, TCP_ACK, TCP_SYN, checksum},
    require_root,
    tunnel::{BROKER, BROKER6, CLIENT, CLIENT6, LB, LB6, STRANGER, VIP, VIP6, eth, gue0, ipv4, ipv6, udp},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const BROKER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
fn settings(any_source: bool) -> Settings {
    Settings {
        vips: [IpAddr::V4(VIP), IpAddr::V6(VIP6)].into_iter().collect(),
        sources: (!any_source).then(|| [IpAddr::V4(LB), IpAddr::V6(LB6)].into_iter().collect()),
        gue_port: DECAP_GUE_PORT,
    }
}

/// A client's frame to `dst`, addressed as it will leave the decap program.
fn inner4(dst: Ipv4Addr, flags: u8) -> Ipv4Frame {
    let mut f = Ipv4Frame::tcp(CLIENT, 40000, dst, 1883, flags);
    f.dst_mac = BROKER_MAC;
    f.src_mac = ROUTER_MAC;
    f.payload = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c".to_vec();
    f
}

fn inner6(dst: Ipv6Addr) -> Ipv6Frame {
    let mut f = Ipv6Frame::tcp(CLIENT6, 40000, dst, 1883, TCP_SYN);
    f.dst_mac = BROKER_MAC;
    f.src_mac = ROUTER_MAC;
    f
}

/// An IPv4 tunnel frame from `src` to the broker.
fn outer4(src: Ipv4Addr, protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(BROKER_MAC, ROUTER_MAC, 0x0800);
    f.extend_from_slice(&ipv4(src, BROKER, protocol, frag, payload));
    f
}

fn outer6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(BROKER_MAC, ROUTER_MAC, 0x86dd);
    f.extend_from_slice(&ipv6(src, BROKER6, next, payload));
    f
}

/// A row: `output` is the whole frame that must come out; `None`, the input untouched.
fn row(what: &str, input: Vec<u8>, action: u32, reason: u32, output: Option<Vec<u8>>) -> Case {
    let case = Case::new(what, input, action, reason);
    match output {
        Some(frame) => case.frame(frame),
        None => case,
    }
}

fn rows() -> Vec<Case> {
    let syn = inner4(VIP, TCP_SYN);
    let (syn_dg, syn_out) = (syn.datagram(), syn.build());
    let v6 = inner6(VIP6);
    let (v6_dg, v6_out) = (v6.datagram(), v6.build());
    let other = inner4(Ipv4Addr::new(192, 0, 2, 99), TCP_ACK).datagram();
    let other6 = inner6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99)).datagram();
    let gue_port = DECAP_GUE_PORT;
    vec![
        row("IPIP from the balancer", outer4(LB, 4, 0x4000, &syn_dg), XDP_PASS, why::DECAPSULATED, Some(syn_out.clone())),
        row("IPv6 in IPv6 from the balancer", outer6(LB6, 41, &v6_dg), XDP_PASS, why::DECAPSULATED, Some(v6_out.clone())),
        row("GUE 1 over IPv4", outer4(LB, 17, 0x4000, &udp(gue_port, &syn_dg)), XDP_PASS, why::DECAPSULATED, Some(syn_out.clone())),
        row("GUE 1 over IPv6", outer6(LB6, 17, &udp(gue_port, &v6_dg)), XDP_PASS, why::DECAPSULATED, Some(v6_out.clone())),
        row(
            "GUE 0, protocol 4",
            outer4(LB, 17, 0, &udp(gue_port, &gue0(4, &[], false, &syn_dg))),
            XDP_PASS,
            why::DECAPSULATED,
            Some(syn_out.clone()),
        ),
        row(
            "GUE 0, protocol 41, IPv6 inside IPv4",
            outer4(LB, 17, 0, &udp(gue_port, &gue0(41, &[], false, &v6_dg))),
            XDP_PASS,
            why::DECAPSULATED,
            Some(v6_out),
        ),
        row("the client's frame itself (no tunnel)", syn_out.clone(), XDP_PASS, why::PASS_NOT_TUNNEL, None),
        row("UDP to another port", outer4(LB, 17, 0, &udp(gue_port + 1, &syn_dg)), XDP_PASS, why::PASS_NOT_TUNNEL, None),
        row("a GUE control message", outer4(LB, 17, 0, &udp(gue_port, &gue0(4, &[], true, &syn_dg))), XDP_PASS, why::PASS_NOT_TUNNEL, None),
        row(
            "GUE 0 of another protocol",
            outer4(LB, 17, 0, &udp(gue_port, &gue0(47, &[], false, &syn_dg))),
            XDP_PASS,
            why::PASS_NOT_TUNNEL,
            None,
        ),
        row("IPIP for an address that is no VIP here", outer4(LB, 4, 0, &other), XDP_PASS, why::PASS_NOT_OURS, None),
        row("IPv6 in IPv6 for an address that is no VIP here", outer6(LB6, 41, &other6), XDP_PASS, why::PASS_NOT_OURS, None),
        row("IPIP from a source that is no balancer", outer4(STRANGER, 4, 0, &syn_dg), XDP_DROP, why::DROP_FOREIGN_SOURCE, None),
        row(
            "GUE from a source that is no balancer",
            outer4(STRANGER, 17, 0, &udp(gue_port, &syn_dg)),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row("IPIP in IPIP", outer4(LB, 4, 0, &nested4(&syn_dg)), XDP_DROP, why::DROP_NESTED, None),
        row("GUE in IPIP", outer4(LB, 4, 0, &inner_udp_to_vip(gue_port)), XDP_DROP, why::DROP_NESTED, None),
        row("the first fragment of an IPIP frame", outer4(LB, 4, 0x2000, &syn_dg), XDP_PASS, why::PASS_FRAGMENT, None),
        row("a later fragment of an IPIP frame", outer4(LB, 4, 0x0010, &syn_dg), XDP_PASS, why::PASS_FRAGMENT, None),
        row(
            "IPIP whose inner header is not IPv4",
            outer4(LB, 4, 0, &{
                let mut d = syn_dg.clone();
                d[0] = 0x65;
                d
            }),
            XDP_PASS,
            why::PASS_MALFORMED,
            None,
        )
        .malformed(),
        row(
            "an outer IPv4 header with IHL 4",
            {
                let mut f = outer4(LB, 4, 0, &syn_dg);
                f[14] = 0x44;
                f
            },
            XDP_PASS,
            why::PASS_MALFORMED,
            None,
        )
        .malformed(),
    ]
}

/// What an attacker or an odd sender may try: headers of other shapes, sources that are no
/// balancer, fragments, nesting, broadcast, tags.
fn odd_rows() -> Vec<Case> {
    let syn = inner4(VIP, TCP_SYN);
    let (syn_dg, syn_out) = (syn.datagram(), syn.build());
    let v6_dg = inner6(VIP6).datagram();
    let gue_port = DECAP_GUE_PORT;
    let mut with_ip_options = inner4(VIP, TCP_SYN);
    with_ip_options.ip_options = vec![1, 1, 1, 1];
    let mapped_vip = ipv6(CLIENT6, VIP.to_ipv6_mapped(), 6, &[0; 20]);
    let late_udp_fragment = ipv4(CLIENT, VIP, 17, 0x0010, &[&[0, 0][..], &gue_port.to_be_bytes(), &[0; 12]].concat());
    let mut version5 = syn_dg.clone();
    version5[0] = 0x55;
    let mut broadcast = outer4(LB, 4, 0, &syn_dg);
    broadcast[..6].fill(0xff);
    vec![
        row(
            "GUE 0 with flags and an option (remote checksum offload asks what this end does not do)",
            outer4(LB, 17, 0, &udp(gue_port, &gue0_flagged(&syn_dg))),
            XDP_PASS,
            why::PASS_NOT_TUNNEL,
            None,
        ),
        row("GUE 1 whose inner header is version 5", outer4(LB, 17, 0, &udp(gue_port, &version5)), XDP_PASS, why::PASS_MALFORMED, None)
            .malformed(),
        row(
            "an outer IPv4 header with options",
            with_options(&outer4(LB, 4, 0, &syn_dg)),
            XDP_PASS,
            why::DECAPSULATED,
            Some(syn_out.clone()),
        ),
        row(
            "an inner IPv4 header with options",
            outer4(LB, 4, 0, &with_ip_options.datagram()),
            XDP_PASS,
            why::DECAPSULATED,
            Some(with_ip_options.build()),
        ),
        row("IPv6 in IPv6 from a source that is no balancer", outer6(STRANGER6, 41, &v6_dg), XDP_DROP, why::DROP_FOREIGN_SOURCE, None),
        row(
            "IPIP in IPv6 from the balancer's IPv4 address, IPv4-mapped",
            outer6(LB.to_ipv6_mapped(), 4, &syn_dg),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row("an inner IPv6 packet to the IPv4 VIP, IPv4-mapped", outer6(LB6, 41, &mapped_vip), XDP_PASS, why::PASS_NOT_OURS, None)
            .malformed(),
        row("IPv6 in IPv6 in IPv6", outer6(LB6, 41, &ipv6(CLIENT6, VIP6, 41, &v6_dg)), XDP_DROP, why::DROP_NESTED, None),
        row(
            "an IPv4 fragment of IPIP from a source that is no balancer",
            outer4(STRANGER, 4, 0x2000, &syn_dg),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row("an IPv6 fragment of IPIP from the balancer", frag6(LB6, &syn_dg), XDP_PASS, why::PASS_FRAGMENT, None),
        row(
            "an IPv6 fragment of IPIP from a source that is no balancer",
            frag6(STRANGER6, &syn_dg),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row("IPIP to the broadcast MAC", broadcast, XDP_PASS, why::PASS_NOT_OURS, None),
        row("IPIP with a VLAN tag", vlan(&outer4(LB, 4, 0, &syn_dg)), XDP_PASS, why::PASS_NOT_TUNNEL, None),
        row(
            "an inner UDP first fragment too short to show its port",
            outer4(LB, 4, 0, &ipv4(CLIENT, VIP, 17, 0x2000, &[0xc3, 0x50])),
            XDP_DROP,
            why::DROP_NESTED,
            None,
        ),
        row(
            "a later inner UDP fragment whose bytes look like the GUE port",
            outer4(LB, 4, 0, &late_udp_fragment),
            XDP_PASS,
            why::DECAPSULATED,
            Some([&eth(BROKER_MAC, ROUTER_MAC, 0x0800)[..], &late_udp_fragment].concat()),
        ),
    ]
}

const STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x66);

/// IPv6 extension headers in front of what a tunnel carries, inside and outside: the inner
/// packet's upper layer is found past them (a tunnel behind them is nested; TCP behind them is
/// the client's own), and an outer chain that may hide a tunnel is dropped from a source that
/// is no balancer (a kernel tunnel device would follow it), passed from one.
#[expect(clippy::too_many_lines, reason = "a table of rows")]
fn extension_rows() -> Vec<Case> {
    let syn_dg = inner4(VIP, TCP_SYN).datagram();
    let v6 = inner6(VIP6);
    let (v6_dg, v6_out) = (v6.datagram(), v6.build());
    let tcp6 = &v6_dg[40..];
    let gue_port = DECAP_GUE_PORT;
    let to_vip =
        |chain: &[(u8, Vec<u8>)], upper: &[u8]| ipv6(CLIENT6, VIP6, chain_first(chain), &[&chain_bytes(chain)[..], upper].concat());
    let dst_tcp = to_vip(&[(60, ext(6))], tcp6);
    let late_udp = to_vip(&[(44, fragment(17, 0x0010))], &[&[0, 0][..], &gue_port.to_be_bytes(), &[0; 12]].concat());
    // Nine destination-options headers before `upper`: one more than the walk follows.
    let long = |upper: u8| -> Vec<(u8, Vec<u8>)> { (0..9).map(|i| (60, ext(if i == 8 { upper } else { 60 }))).collect() };
    // Eight headers, as many as the walk follows, of every kind, before `upper`: hop-by-hop,
    // routing, destination options, an atomic fragment header, four destination options.
    let eight = |upper: u8| -> Vec<(u8, Vec<u8>)> {
        let kinds = [0, 43, 60, 44, 60, 60, 60, 60];
        (0..8)
            .map(|i| {
                let next = kinds.get(i + 1).copied().unwrap_or(upper);
                (kinds[i], if kinds[i] == 44 { fragment(next, 0) } else { ext(next) })
            })
            .collect()
    };
    let tcp_behind_eight = to_vip(&eight(6), tcp6);
    // A stranger's GUE frame, and UDP to another port, behind one header.
    let stranger_udp = |first: u8, header: Vec<u8>, port: u16| outer6(STRANGER6, first, &[header, udp(port, &v6_dg)].concat());
    let ipv4_udp_fragment = |frag: u16| outer4(STRANGER, 17, frag, &udp(gue_port, &syn_dg));
    vec![
        row(
            "inside: TCP behind eight headers of every kind",
            outer6(LB6, 41, &tcp_behind_eight),
            XDP_PASS,
            why::DECAPSULATED,
            Some([&v6_out[..14], &tcp_behind_eight].concat()),
        ),
        row("inside: IPIP behind eight headers", outer6(LB6, 41, &to_vip(&eight(4), &syn_dg)), XDP_DROP, why::DROP_NESTED, None),
        row(
            "outside: UDP to another port behind a destination-options header, from a source that is no balancer",
            stranger_udp(60, ext(17), gue_port + 1),
            XDP_PASS,
            why::PASS_NOT_TUNNEL,
            None,
        ),
        row(
            "outside: a first fragment of GUE, from a source that is no balancer",
            stranger_udp(44, fragment(17, 0x0001), gue_port),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row(
            "outside: a later fragment whose next header is destination options, from a source that is no balancer",
            outer6(STRANGER6, 44, &[fragment(60, 0x0010), ext(6), tcp6.to_vec()].concat()),
            XDP_PASS,
            why::PASS_FRAGMENT,
            None,
        ),
        row(
            "outside: a chain cut short, from a source that is no balancer",
            outer6(STRANGER6, 60, &[60, 0]),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        )
        .malformed(),
        row(
            "outside: an IPv4 first fragment of GUE, from a source that is no balancer",
            ipv4_udp_fragment(0x2000),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row(
            "outside: a later IPv4 fragment of UDP, from a source that is no balancer (no port to see)",
            ipv4_udp_fragment(0x0010),
            XDP_PASS,
            why::PASS_FRAGMENT,
            None,
        ),
        row(
            "inside: TCP behind a destination-options header",
            outer6(LB6, 41, &dst_tcp),
            XDP_PASS,
            why::DECAPSULATED,
            Some([&v6_out[..14], &dst_tcp].concat()),
        ),
        row(
            "inside: IPv6 in IPv6 behind a destination-options header",
            outer6(LB6, 41, &to_vip(&[(60, ext(41))], &v6_dg)),
            XDP_DROP,
            why::DROP_NESTED,
            None,
        ),
        row(
            "inside: IPIP behind hop-by-hop and routing headers",
            outer6(LB6, 41, &to_vip(&[(0, ext(43)), (43, ext(4))], &syn_dg)),
            XDP_DROP,
            why::DROP_NESTED,
            None,
        ),
        row(
            "inside: GUE behind an atomic fragment header",
            outer6(LB6, 41, &to_vip(&[(44, fragment(17, 0))], &udp(gue_port, &v6_dg))),
            XDP_DROP,
            why::DROP_NESTED,
            None,
        ),
        row(
            "inside: a later fragment whose bytes look like the GUE port",
            outer6(LB6, 41, &late_udp),
            XDP_PASS,
            why::DECAPSULATED,
            Some([&v6_out[..14], &late_udp].concat()),
        ),
        row("inside: a chain of nine headers", outer6(LB6, 41, &to_vip(&long(6), tcp6)), XDP_DROP, why::DROP_NESTED, None),
        row("inside: a chain cut short", outer6(LB6, 41, &ipv6(CLIENT6, VIP6, 60, &[60, 0])), XDP_DROP, why::DROP_NESTED, None).malformed(),
        row(
            "outside: IPv6 in IPv6 behind a destination-options header, from a source that is no balancer",
            outer6(STRANGER6, 60, &[&ext(41)[..], &v6_dg].concat()),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row(
            "outside: the same from the balancer (which sends none: not unwrapped)",
            outer6(LB6, 60, &[&ext(41)[..], &v6_dg].concat()),
            XDP_PASS,
            why::PASS_NOT_TUNNEL,
            None,
        ),
        row(
            "outside: GUE behind a hop-by-hop header, from a source that is no balancer",
            outer6(STRANGER6, 0, &[&ext(17)[..], &udp(gue_port, &v6_dg)].concat()),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row(
            "outside: IPIP behind destination options and a first fragment, from a source that is no balancer",
            outer6(STRANGER6, 60, &[&ext(44)[..], &fragment(4, 0x0001), &syn_dg].concat()),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
        row(
            "outside: an ICMPv6 message behind a hop-by-hop header (as MLD sends), from anyone",
            outer6(STRANGER6, 0, &[&ext(58)[..], &mld_report(STRANGER6)].concat()),
            XDP_PASS,
            why::PASS_NOT_TUNNEL,
            None,
        ),
        row(
            "outside: a chain of nine headers, from a source that is no balancer",
            outer6(STRANGER6, 60, &[chain_bytes(&long(58)), mld_report(STRANGER6)].concat()),
            XDP_DROP,
            why::DROP_FOREIGN_SOURCE,
            None,
        ),
    ]
}

/// An extension header of 8 bytes (hop-by-hop, routing or destination options: a PadN option
/// fills it) before `next`.
fn ext(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header before `next`: `frag` is its offset (in 8-byte units, shifted left 3) and
/// "more fragments" flag, as the wire has them.
fn fragment(next: u8, frag: u16) -> Vec<u8> {
    let f = frag.to_be_bytes();
    vec![next, 0, f[0], f[1], 0, 0, 0, 9]
}

/// An MLDv2 report without records (ICMPv6 type 143) from `src` to the broker, its checksum
/// right.
fn mld_report(src: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![143, 0, 0, 0, 0, 0, 0, 0];
    let addrs = [src.octets(), BROKER6.octets()].concat();
    let pseudo: u32 = addrs.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>() + 8 + 58;
    let c = checksum(&m, pseudo);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The first header's type of a chain of (type, bytes) and the chain's bytes.
fn chain_first(chain: &[(u8, Vec<u8>)]) -> u8 {
    chain[0].0
}

fn chain_bytes(chain: &[(u8, Vec<u8>)]) -> Vec<u8> {
    chain.iter().flat_map(|(_, b)| b.clone()).collect()
}

/// GUE version 0 with one option word and a flag set (remote checksum offload's).
fn gue0_flagged(payload: &[u8]) -> Vec<u8> {
    let mut g = vec![0x01, 4, 0x00, 0x20, 0, 0, 0, 0];
    g.extend_from_slice(payload);
    g
}

/// `frame` (an IPv4 tunnel frame) with four bytes of NOP options in its outer header.
fn with_options(frame: &[u8]) -> Vec<u8> {
    let mut h = frame[14..34].to_vec();
    h[0] = 0x46;
    let len = u16::from_be_bytes([h[2], h[3]]) + 4;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 1, 1, 1]);
    h[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    [&frame[..14], &h[..], &frame[34..]].concat()
}

/// An IPv6 frame from `src` to the broker carrying the first fragment of an IPIP datagram.
fn frag6(src: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![4, 0, 0x00, 0x01, 0, 0, 0, 7];
    payload.extend_from_slice(inner);
    outer6(src, 44, &payload)
}

/// `frame` with one VLAN tag.
fn vlan(frame: &[u8]) -> Vec<u8> {
    [&frame[..12], &[0x81, 0x00, 0x00, 0x07][..], &frame[12..]].concat()
}

/// An IPv4 datagram to the VIP that is itself IPIP (protocol 4) carrying `inner`.
fn nested4(inner: &[u8]) -> Vec<u8> {
    let mut d = outer4(CLIENT, 4, 0, inner)[14..].to_vec();
    d[16..20].copy_from_slice(&VIP.octets());
    d[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&d[..20], 0);
    d[10..12].copy_from_slice(&c.to_be_bytes());
    d
}

/// An IPv4 datagram to the VIP that is UDP to the GUE port.
fn inner_udp_to_vip(port: u16) -> Vec<u8> {
    let mut d = nested4(&udp(port, &inner4(VIP, TCP_SYN).datagram()));
    d[9] = 17;
    d[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&d[..20], 0);
    d[10..12].copy_from_slice(&c.to_be_bytes());
    d
}

#[test]
fn tunnel_frames_for_held_vips_come_out_as_the_clients_frames_and_nothing_else_changes() {
    require_root!();
    let mut d = Loaded::load().expect("loading dsrlb-decap");
    d.maps.write(&settings(false)).expect("settings");
    assert_eq!(d.maps.settings().expect("read back"), settings(false), "the maps give back what was written");
    check_table(&d, &rows());
    check_table(&d, &odd_rows());
    check_table(&d, &extension_rows());
    // --any-source: the stranger's frame is unwrapped too.
    d.maps.write(&settings(true)).expect("settings");
    let syn = inner4(VIP, TCP_SYN);
    check_case(
        &d,
        &row("IPIP from anyone, --any-source", outer4(STRANGER, 4, 0, &syn.datagram()), XDP_PASS, why::DECAPSULATED, Some(syn.build())),
    );
}

/// Every prefix of each good frame: short of the inner header it passes untouched (as
/// malformed); from the inner header on it is unwrapped, and the output is the same prefix of
/// the client's frame.
#[test]
fn every_truncation_passes_untouched_until_the_inner_header_is_whole() {
    require_root!();
    let mut d = Loaded::load().expect("loading dsrlb-decap");
    d.maps.write(&settings(false)).expect("settings");
    let syn = inner4(VIP, TCP_SYN);
    let v6 = inner6(VIP6);
    let cases: [(&str, Vec<u8>, Vec<u8>, usize); 4] = [
        ("IPIP", outer4(LB, 4, 0, &syn.datagram()), syn.build(), 20),
        ("IPv6 in IPv6", outer6(LB6, 41, &v6.datagram()), v6.build(), 40),
        ("GUE 1 over IPv4", outer4(LB, 17, 0, &udp(DECAP_GUE_PORT, &syn.datagram())), syn.build(), 28),
        ("GUE 0 over IPv6", outer6(LB6, 17, &udp(DECAP_GUE_PORT, &gue0(41, &[], false, &v6.datagram()))), v6.build(), 52),
    ];
    for (what, frame, client, strip) in cases {
        let inner_header = if client[12..14] == [0x86, 0xdd] { 40 } else { 20 };
        for len in 14..frame.len() {
            let cut = &frame[..len];
            let (action, out) = d.run_frame(cut);
            assert_eq!(action, XDP_PASS, "{what} cut to {len}");
            if len < 14 + strip + inner_header {
                assert_eq!(out, cut, "{what} cut to {len}: touched");
            } else {
                assert_eq!(out, client[..len - strip], "{what} cut to {len}: not the client's frame, cut");
            }
        }
    }
}

/// More VIPs and sources than a small rule holds (`DECAP_RULE_ADDRS`): the program reads its
/// hash maps, and every frame is treated as with a few; back to a few, it reads a rule again,
/// which holds only the new sets (an address that went is no longer served), whichever of its
/// two entries was last in use. At the boundary (8 and 9 addresses) the last one counts, and an
/// IPv6 address is matched on both its halves.
#[test]
fn sets_too_large_for_a_rule_work_from_the_maps_and_rules_follow_every_change() {
    require_root!();
    let mut d = Loaded::load().expect("loading dsrlb-decap");
    let extra = |third: u8, n: u8| (1..=n).map(move |i| IpAddr::V4(Ipv4Addr::new(198, 18, third, i)));
    let with = |n: u8| {
        let mut s = settings(false);
        s.vips.extend(extra(1, n));
        s.sources.as_mut().expect("a source list").extend(extra(2, n));
        s
    };
    let syn = inner4(VIP, TCP_SYN);
    let decapsulated = |what: &str, src: Ipv4Addr, inner: &Ipv4Frame| {
        row(what, outer4(src, 4, 0, &inner.datagram()), XDP_PASS, why::DECAPSULATED, Some(inner.build()))
    };
    let untouched = |what: &str, src: Ipv4Addr, inner: &Ipv4Frame, action: u32, reason: u32| {
        row(what, outer4(src, 4, 0, &inner.datagram()), action, reason, None)
    };
    // 6 extra: 8 of each (a rule); 7: 9 (the maps); 20: 22 (the maps). In order (IPv4 as
    // IPv4-mapped IPv6, before the rest) VIP6 and LB6 come last: `rows()` checks both.
    for (round, n) in [6u8, 7, 20, 6, 20, 7, 6].into_iter().enumerate() {
        let s = with(n);
        d.maps.write(&s).expect("settings");
        assert_eq!(d.maps.settings().expect("read back"), s, "round {round} ({n} extra): the sets read back");
        check_table(&d, &rows());
        let (far_vip, far_source) = (Ipv4Addr::new(198, 18, 1, n), Ipv4Addr::new(198, 18, 2, n));
        let to_far = inner4(far_vip, TCP_SYN);
        check_case(&d, &decapsulated(&format!("round {round}: the last extra VIP, from the last extra source"), far_source, &to_far));
        let gone = Ipv4Addr::new(198, 18, 1, n + 1);
        check_case(&d, &untouched(&format!("round {round}: a VIP not held"), LB, &inner4(gone, TCP_SYN), XDP_PASS, why::PASS_NOT_OURS));
        check_case(
            &d,
            &untouched(
                &format!("round {round}: from a source not allowed"),
                Ipv4Addr::new(198, 18, 2, n + 1),
                &syn,
                XDP_DROP,
                why::DROP_FOREIGN_SOURCE,
            ),
        );
        check_case(&d, &untouched(&format!("round {round}: from a stranger"), STRANGER, &to_far, XDP_DROP, why::DROP_FOREIGN_SOURCE));
        // IPv6 destinations that share one half of the VIP's address, not the other.
        let [hi, lo] = [VIP6.segments()[0], VIP6.segments()[7]];
        for (what, dst) in [
            ("the VIP's second half only", Ipv6Addr::new(hi ^ 1, 0xdb8, 0, 0, 0, 0, 0, lo)),
            ("the VIP's first half only", Ipv6Addr::new(hi, 0xdb8, 0, 0, 0, 0, 0, lo ^ 1)),
        ] {
            let v6 = inner6(dst);
            check_case(&d, &row(&format!("round {round}: to {what}"), outer6(LB6, 41, &v6.datagram()), XDP_PASS, why::PASS_NOT_OURS, None));
        }
        // A few again, without the VIP: written to the other entry, which must not serve it.
        let mut fewer = settings(false);
        fewer.vips.remove(&IpAddr::V4(VIP));
        d.maps.write(&fewer).expect("settings");
        assert_eq!(d.maps.settings().expect("read back"), fewer, "round {round}: the VIP went");
        check_case(&d, &untouched(&format!("round {round}: the VIP that went"), LB, &syn, XDP_PASS, why::PASS_NOT_OURS));
        d.maps.write(&settings(false)).expect("settings");
        check_case(&d, &decapsulated(&format!("round {round}: the VIP back"), LB, &syn));
    }
}

/// From any source to a list of balancers, through the hash maps (more VIPs than a rule
/// holds), while frames from a balancer in the list run through the program beside the
/// writer: none is refused on the way. Its source sorts after the 200 others, so an empty list
/// in force would meet many runs.
#[test]
fn a_balancer_both_settings_admit_is_never_refused_while_they_change() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use aya::programs::TestRun as _;
    require_root!();
    let mut d = Loaded::load().expect("loading dsrlb-decap");
    let extra = |third: u8, n: u8| (1..=n).map(move |i| IpAddr::V4(Ipv4Addr::new(198, 18, third, i)));
    let mut any = settings(true);
    any.vips.extend(extra(1, 20));
    let mut list = any.clone();
    list.sources = Some([IpAddr::V4(LB), IpAddr::V6(LB6)].into_iter().chain(extra(2, 200)).collect());
    let frame = outer4(LB, 4, 0, &inner4(VIP, TCP_SYN).datagram());
    for round in 0..10 {
        d.maps.write(&any).expect("any source");
        let (prog, maps) = d.parts();
        let (done, runs, refused) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            s.spawn(|| {
                // Bounded: the writer is done within milliseconds; at most 10 million runs.
                for _ in 0..10_000_000 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut out = vec![0u8; frame.len() + 256];
                    let opts = aya::programs::TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
                    if prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value == XDP_DROP {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    runs.fetch_add(1, Ordering::SeqCst);
                }
            });
            // The reader runs before the change starts.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while runs.load(Ordering::SeqCst) == 0 {
                assert!(std::time::Instant::now() < deadline, "the reader never ran");
                std::hint::spin_loop();
            }
            maps.write(&list).expect("a list");
            done.store(true, Ordering::SeqCst);
        });
        let (runs, refused) = (runs.into_inner(), refused.into_inner());
        assert_eq!(refused, 0, "round {round}: {refused} of {runs} frames from a balancer both settings admit were refused");
        assert_eq!(d.maps.settings().expect("read back"), list, "round {round}");
    }
}
