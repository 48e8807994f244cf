//! Packet fixtures for L3 direct server return (`forward = "ipip"` and `"gue"`), pushed through
//! the loaded XDP program with `BPF_PROG_TEST_RUN`: the wrapped frame byte for byte for each
//! mode and family (outer header fields, checksum, TTL, DF, flow label, GUE header and port),
//! a VLAN tag kept, a listener that mixes a MAC-rewrite broker and a tunnelled one, frames too
//! big for the path and their ICMP answers, ICMP errors forwarded inside the tunnel, every
//! truncation, GUE source ports spread by flow, and the config rules.
//!
//! The balancer (tunnel source 203.0.113.2 / 2001:db8:f::2, path MTU 1500) has listeners on
//! 192.0.2.100 and [2001:db8::100]: port 1883 over broker `i` (IPIP), 1884 over `g` (GUE), and
//! 1885 (IPv4) over `l` (MAC rewrite) and `i`.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{DECAP_GUE_PORT, gue_source_port, reason, tunnel_flow_label, tunnel_hash};
use lb_userspace::{config, dataplane::addr6};
use tests::{
    fixture::{CLIENT, Case, Lb, NEXT_HOP_MAC, RING, VIP, XDP_TX, mac_of},
    frame::{CLIENT_MAC, ExtHeader, IPV6_DSTOPTS, Ipv4Frame, Ipv6Frame, LB_MAC, TCP_ACK, TCP_SYN, checksum, ethernet},
    require_root,
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
const SOURCE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const SOURCE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 2);
const BROKER_I: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const BROKER_I6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 11);
const BROKER_G: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const BROKER_G6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 12);
const MTU: usize = 1500;

fn config_text(extra: &str) -> String {
    format!(
        "interface = \"veth0\"\nring_size = {RING}\ntunnel_source = \"{SOURCE}\"\ntunnel_source6 = \"{SOURCE6}\"\ntunnel_mtu = {MTU}\n{extra}\
         [[listener]]\nname = \"ipip4\"\nvip = \"{VIP}\"\nport = 1883\nbackends = [\"i\"]\n\
         [[listener]]\nname = \"gue4\"\nvip = \"{VIP}\"\nport = 1884\nbackends = [\"g\"]\n\
         [[listener]]\nname = \"mixed\"\nvip = \"{VIP}\"\nport = 1885\nbackends = [\"i\", \"l\"]\n\
         [[listener]]\nname = \"ipip6\"\nvip = \"{VIP6}\"\nport = 1883\nbackends = [\"i\"]\n\
         [[listener]]\nname = \"gue6\"\nvip = \"{VIP6}\"\nport = 1884\nbackends = [\"g\"]\n\
         [[backend]]\nname = \"i\"\naddress = \"{BROKER_I}\"\naddress6 = \"{BROKER_I6}\"\nforward = \"ipip\"\n\
         [[backend]]\nname = \"g\"\naddress = \"{BROKER_G}\"\naddress6 = \"{BROKER_G6}\"\nforward = \"gue\"\n\
         [[backend]]\nname = \"l\"\naddress = \"192.0.2.13\"\nmac = \"{}\"\n",
        config::format_mac(mac_of(13))
    )
}

fn lb() -> Lb {
    Lb::with_config(Lb::parse(&config_text("")))
}

/// Wire values as the program loads them into native integers.
fn wire16(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

/// The tunnel hash as the program computes it: addresses as loaded into native words.
fn hash4(src: Ipv4Addr, sport: u16, dport: u16) -> u64 {
    let addrs = u64::from(u32::from_ne_bytes(src.octets())) << 32 | u64::from(u32::from_ne_bytes(VIP.octets()));
    tunnel_hash(addrs, wire16(sport), wire16(dport))
}

fn hash6(src: Ipv6Addr, sport: u16, dport: u16) -> u64 {
    let (s, d) = (addr6(&src), addr6(&VIP6));
    tunnel_hash(s[0] ^ s[1].rotate_left(17) ^ d[0].rotate_left(31) ^ d[1].rotate_left(47), wire16(sport), wire16(dport))
}

/// The outer IPv4 header the balancer writes (no options, ID 0, DF, TTL 64) before `payload`.
fn outer4(protocol: u8, tos: u8, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&u16::try_from(20 + payload.len()).expect("small").to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&SOURCE.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// The outer IPv6 header (traffic class `tc`, flow label from `hash`, hop limit 64).
fn outer6(next: u8, tc: u8, hash: u64, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let first = 6 << 28 | u32::from(tc) << 20 | tunnel_flow_label(hash);
    let mut h = first.to_be_bytes().to_vec();
    h.extend_from_slice(&u16::try_from(payload.len()).expect("small").to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&SOURCE6.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// GUE variant 1: a UDP header (source port from the flow's hash, checksum zero) before the
/// client's packet.
fn gue(hash: u64, inner: &[u8]) -> Vec<u8> {
    let mut u = gue_source_port(hash).to_be_bytes().to_vec();
    u.extend_from_slice(&DECAP_GUE_PORT.to_be_bytes());
    u.extend_from_slice(&u16::try_from(8 + inner.len()).expect("small").to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(inner);
    u
}

fn frame(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = ethernet(NEXT_HOP_MAC, LB_MAC, None, ethertype);
    f.extend_from_slice(l3);
    f
}

fn syn4(sport: u16, dport: u16) -> Ipv4Frame {
    Ipv4Frame::tcp(CLIENT, sport, VIP, dport, TCP_SYN)
}

fn syn6(sport: u16, dport: u16) -> Ipv6Frame {
    Ipv6Frame::tcp(CLIENT6, sport, VIP6, dport, TCP_SYN)
}

/// An IPv4 frame whose datagram is `len` bytes long (payload after the TCP header).
fn sized4(sport: u16, dport: u16, len: usize, df: bool) -> Ipv4Frame {
    let mut f = Ipv4Frame::tcp(CLIENT, sport, VIP, dport, TCP_ACK);
    f.payload = vec![0x5a; len - 40];
    if !df {
        f.frag = 0;
    }
    f
}

fn sized6(sport: u16, dport: u16, len: usize) -> Ipv6Frame {
    let mut f = Ipv6Frame::tcp(CLIENT6, sport, VIP6, dport, TCP_ACK);
    f.payload = vec![0x5a; len - 60];
    f
}

/// ICMP "fragmentation needed" from the VIP to the client, naming `mtu` and quoting the first
/// 68 bytes of `offending`'s datagram, back to the client's MAC.
fn frag_needed_answer(offending: &[u8], mtu: u16) -> Vec<u8> {
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&offending[..68]);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&u16::try_from(20 + icmp.len()).expect("small").to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&VIP.octets());
    ip.extend_from_slice(&CLIENT.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(CLIENT_MAC, LB_MAC, None, 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// ICMPv6 "packet too big" from the VIP to the client, naming `mtu` and quoting the first 1,232
/// bytes of `offending`'s packet (the answer fills IPv6's minimum MTU, 1,280 bytes).
fn too_big6_answer(offending: &[u8], mtu: u32) -> Vec<u8> {
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&offending[..1232]);
    let len = u32::try_from(icmp.len()).expect("small");
    let mut pseudo: u32 =
        VIP6.octets().chunks(2).chain(CLIENT6.octets().chunks(2)).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    pseudo += len + 58;
    let c = checksum(&icmp, pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(CLIENT_MAC, LB_MAC, None, 0x86dd);
    f.extend_from_slice(&0x6000_0000_u32.to_be_bytes());
    f.extend_from_slice(&u16::try_from(icmp.len()).expect("small").to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&VIP6.octets());
    f.extend_from_slice(&CLIENT6.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Every mode and family, byte for byte; a VLAN tag kept; the path MTU's edge; ICMP answers.
fn cases() -> Vec<Case> {
    let ipip4 = syn4(40001, 1883);
    let gue4 = syn4(40002, 1884);
    let ipip6 = syn6(40003, 1883);
    let gue6 = syn6(40004, 1884);
    let mut tagged = syn4(40005, 1883);
    tagged.vlan = Some((0x8100, 0x0064));
    let tagged_out = {
        let mut f = ethernet(NEXT_HOP_MAC, LB_MAC, Some((0x8100, 0x0064)), 0x0800);
        f.extend_from_slice(&outer4(4, 0, BROKER_I, &tagged.datagram()));
        f
    };
    // Traffic class 0xb8 (EF) is carried to the outer header.
    let mut ef6 = syn6(40006, 1883);
    let ef6_bytes = {
        let mut b = ef6.build();
        b[14] = 0x6b;
        b[15] = 0x80;
        ef6.payload.clear();
        b
    };
    // The largest packets that fit a 1500-byte path: 1480 (IPIP), 1472 (GUE), 1460 and 1452.
    let fits4 = sized4(40010, 1883, MTU - 20, true);
    let fits_gue4 = sized4(40011, 1884, MTU - 28, true);
    let fits6 = sized6(40012, 1883, MTU - 40);
    let fits_gue6 = sized6(40013, 1884, MTU - 48);
    let big4 = sized4(40014, 1883, MTU - 19, true);
    let big_gue4 = sized4(40015, 1884, MTU - 27, true);
    let big4_no_df = sized4(40016, 1883, MTU - 19, false);
    let big6 = sized6(40017, 1883, MTU - 39);
    let big_gue6 = sized6(40018, 1884, MTU - 47);
    // 64 bytes of destination options before the TCP header: the ports are past byte 88.
    let mut big6_ext = sized6(40019, 1883, MTU - 39 - 64);
    big6_ext.ext = vec![ExtHeader { kind: IPV6_DSTOPTS, len: 7 }];
    assert_eq!(big6_ext.datagram().len(), MTU - 39);
    vec![
        Case::tx("IPIP, IPv4", ipip4.build()).frame(frame(0x0800, &outer4(4, 0, BROKER_I, &ipip4.datagram()))),
        Case::tx("GUE, IPv4", gue4.build())
            .frame(frame(0x0800, &outer4(17, 0, BROKER_G, &gue(hash4(CLIENT, 40002, 1884), &gue4.datagram())))),
        Case::tx("IPv6 in IPv6", ipip6.build())
            .frame(frame(0x86dd, &outer6(41, 0, hash6(CLIENT6, 40003, 1883), BROKER_I6, &ipip6.datagram()))),
        Case::tx("GUE, IPv6", gue6.build()).frame(frame(
            0x86dd,
            &outer6(17, 0, hash6(CLIENT6, 40004, 1884), BROKER_G6, &gue(hash6(CLIENT6, 40004, 1884), &gue6.datagram())),
        )),
        Case::tx("a VLAN tag stays", tagged.build()).frame(tagged_out),
        Case::tx("the traffic class is kept", ef6_bytes.clone())
            .frame(frame(0x86dd, &outer6(41, 0xb8, hash6(CLIENT6, 40006, 1883), BROKER_I6, &ef6_bytes[14..]))),
        Case::tx("1480 bytes fit IPIP on 1500", fits4.build()).frame(frame(0x0800, &outer4(4, 0, BROKER_I, &fits4.datagram()))),
        Case::tx("1472 bytes fit GUE on 1500", fits_gue4.build())
            .frame(frame(0x0800, &outer4(17, 0, BROKER_G, &gue(hash4(CLIENT, 40011, 1884), &fits_gue4.datagram())))),
        Case::tx("1460 bytes fit IPv6 in IPv6", fits6.build())
            .frame(frame(0x86dd, &outer6(41, 0, hash6(CLIENT6, 40012, 1883), BROKER_I6, &fits6.datagram()))),
        Case::tx("1452 bytes fit GUE over IPv6", fits_gue6.build()).frame(frame(
            0x86dd,
            &outer6(17, 0, hash6(CLIENT6, 40013, 1884), BROKER_G6, &gue(hash6(CLIENT6, 40013, 1884), &fits_gue6.datagram())),
        )),
        Case::new("1481 bytes with DF: fragmentation needed, MTU 1480", big4.build(), XDP_TX, reason::TX_TOO_BIG_ANSWERED)
            .frame(frag_needed_answer(&big4.datagram(), 1480)),
        Case::new("1473 bytes for GUE: MTU 1472", big_gue4.build(), XDP_TX, reason::TX_TOO_BIG_ANSWERED)
            .frame(frag_needed_answer(&big_gue4.datagram(), 1472)),
        Case::drop("1481 bytes without DF: dropped", big4_no_df.build(), reason::DROP_TOO_BIG),
        Case::new("IPv6, 1461 bytes: packet too big, MTU 1460", big6.build(), XDP_TX, reason::TX_TOO_BIG_ANSWERED)
            .frame(too_big6_answer(&big6.datagram(), 1460)),
        Case::new("IPv6 GUE, 1453 bytes: MTU 1452", big_gue6.build(), XDP_TX, reason::TX_TOO_BIG_ANSWERED)
            .frame(too_big6_answer(&big_gue6.datagram(), 1452)),
        Case::new(
            "IPv6 with 64 bytes of options, 1461 bytes: the quote reaches its ports",
            big6_ext.build(),
            XDP_TX,
            reason::TX_TOO_BIG_ANSWERED,
        )
        .frame(too_big6_answer(&big6_ext.datagram(), 1460)),
    ]
}

#[test]
fn every_mode_and_family_byte_for_byte() {
    require_root!();
    let lb = lb();
    lb.check_table(&cases());
}

/// An ICMP error about a tunnelled flow goes to the flow's broker inside its tunnel, whatever
/// its size allows; one too big to wrap is dropped, never answered with another ICMP error.
#[test]
fn icmp_errors_about_a_flow_travel_in_its_tunnel() {
    require_root!();
    let lb = lb();
    let seg = syn4(40100, 1883);
    lb.check_case(&Case::tx("opens the flow", seg.build()).frame(frame(0x0800, &outer4(4, 0, BROKER_I, &seg.datagram()))));
    // The broker's reply as it left the broker, quoted by a router on the path to the client.
    let reply = Ipv4Frame::tcp(VIP, 1883, CLIENT, 40100, TCP_ACK);
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let icmp = Ipv4Frame::frag_needed(router, &reply, 1400, 8);
    lb.check_case(
        &Case::new("fragmentation needed, forwarded", icmp.build(), XDP_TX, reason::TX_ICMP_TOO_BIG)
            .frame(frame(0x0800, &outer4(4, 0, BROKER_I, &icmp.datagram()))),
    );
    // The same error with a quote that fills the path: too big to wrap, dropped.
    let mut long_reply = reply.clone();
    long_reply.payload = vec![0; 1500];
    let long = Ipv4Frame::frag_needed(router, &long_reply, 1400, 1490 - 48);
    assert_eq!(long.datagram().len(), 1490);
    lb.check_case(&Case::drop("a 1490-byte ICMP error to a tunnel of 1480", long.build(), reason::DROP_TOO_BIG));
}

/// A listener may mix a broker on the segment (MAC rewrite) and a tunnelled one: each flow goes
/// the way its broker is reached.
#[test]
fn one_listener_mixes_a_mac_rewrite_and_a_tunnel() {
    require_root!();
    let lb = lb();
    let mixed = lb.listener_index("mixed");
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41064 {
        let f = syn4(sport, 1885);
        let backend = lb.ring_choice(mixed, CLIENT, sport, 1885);
        let want = if backend == "l" {
            Ipv4Frame { dst_mac: mac_of(13), src_mac: LB_MAC, ..f.clone() }.build()
        } else {
            frame(0x0800, &outer4(4, 0, BROKER_I, &f.datagram()))
        };
        lb.check_case(&Case::tx(format!("mixed, port {sport} to {backend}"), f.build()).frame(want));
        seen.insert(backend);
    }
    assert_eq!(seen.len(), 2, "64 flows reached both brokers: {seen:?}");
}

/// Every prefix of a tunnelled frame, and a frame whose IP length claims more than it carries,
/// passes untouched (nothing is written before the lengths are checked).
#[test]
fn every_truncation_passes_untouched() {
    require_root!();
    let lb = lb();
    for (what, whole) in [("IPv4", sized4(42000, 1883, 200, true).build()), ("IPv6", sized6(42001, 1883, 200).build())] {
        // BPF_PROG_TEST_RUN takes nothing shorter than an Ethernet header.
        for len in 14..whole.len() {
            lb.check_case(&Case::pass(format!("{what} cut to {len} bytes"), whole[..len].to_vec(), reason::PASS_MALFORMED).malformed());
        }
    }
}

/// GUE source ports follow the flow: one flow keeps its port, and 200 flows use at least 32.
#[test]
fn gue_source_ports_spread_by_flow() {
    require_root!();
    let lb = lb();
    let mut ports = std::collections::BTreeSet::new();
    for sport in 43000..43200 {
        let (action, out) = lb.run(&syn4(sport, 1884).build());
        assert_eq!(action, XDP_TX);
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!(port >= 0xc000, "port {port} outside the dynamic range");
        let (_, again) = lb.run(&Ipv4Frame::tcp(CLIENT, sport, VIP, 1884, TCP_ACK).build());
        assert_eq!(u16::from_be_bytes([again[34], again[35]]), port, "a flow's port changed");
        ports.insert(port);
    }
    assert!(ports.len() >= 32, "only {} distinct GUE source ports over 200 flows", ports.len());
}

/// What the config refuses, by name.
#[test]
fn config_rules() {
    let err = |text: &str| config::parse(text, "t.toml").expect_err("refused").to_string();
    let base = config_text("");
    let e = err(&base.replace("forward = \"ipip\"", "forward = \"gre\""));
    assert!(e.contains("forward") && e.contains("gre"), "{e}");
    let e = err(&base.replace("forward = \"gue\"\n", "forward = \"gue\"\nmac = \"02:00:00:00:00:01\"\n"));
    assert!(e.contains("backend[1].mac") && e.contains("l2"), "{e}");
    let e = err(&config_text("").replace("tunnel_mtu = 1500", "tunnel_mtu = 1300"));
    assert!(e.contains("tunnel_mtu") && e.contains("1328"), "{e}");
    let e = err(&config_text("").replace("tunnel_source = \"203.0.113.2\"", "tunnel_source = \"2001:db8::1\""));
    assert!(e.contains("tunnel_source") && e.contains("IPv4"), "{e}");
    let e = err(&config_text("gue_port = 0\n"));
    assert!(e.contains("gue_port"), "{e}");
    let ok = config::parse(&config_text("gue_port = 5555\n"), "t.toml").expect("valid");
    assert_eq!(ok.tunnel.gue_port, 5555);
    assert_eq!(ok.backend("g").map(|b| b.forward), Some(config::Forward::Gue));
    assert_eq!(ok.backend("l").map(|b| b.forward), Some(config::Forward::L2));
}

/// A frame longer than its IP packet claims (more than Ethernet padding) is refused before
/// anything is written; too-big frames from sources no ICMP error may go to are dropped, not
/// answered; and answers are rate-limited per CPU (a burst of 50, then 1,000 a second).
#[test]
fn trailing_bytes_unanswerable_sources_and_the_answer_rate() {
    require_root!();
    let lb = lb();
    // 200 bytes of frame, the IPv4 header claiming 100 (its checksum fixed: only the claim lies).
    let mut long = sized4(44000, 1883, 186, true).build();
    long[16..18].copy_from_slice(&100u16.to_be_bytes());
    long[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&long[14..34], 0);
    long[24..26].copy_from_slice(&c.to_be_bytes());
    lb.check_case(&Case::pass("a claim 100 bytes short of the frame", long, reason::PASS_MALFORMED).malformed());
    // Minimum-size frames carry padding past the claim: still forwarded.
    let mut padded = syn4(44001, 1883).build();
    let claim = padded.len() - 14;
    padded.resize(60, 0);
    let mut want = frame(0x0800, &outer4(4, 0, BROKER_I, &padded[14..14 + claim]));
    want.extend_from_slice(&[0; 6]);
    lb.check_case(&Case::tx("a SYN padded to 60 bytes", padded).frame(want).malformed());

    for (what, src) in [("multicast", Ipv4Addr::new(224, 0, 0, 9)), ("loopback", Ipv4Addr::LOCALHOST), ("zero", Ipv4Addr::UNSPECIFIED)] {
        let mut f = sized4(44002, 1883, 1481, true);
        f.src = src;
        lb.check_case(&Case::drop(format!("too big from a {what} source"), f.build(), reason::DROP_TOO_BIG));
    }
    let mut f6 = sized6(44003, 1883, 1461);
    f6.src = "ff02::1".parse().expect("v6");
    lb.check_case(&Case::drop("IPv6 too big from a multicast source", f6.build(), reason::DROP_TOO_BIG));

    // 200 too-big frames back to back on this CPU: the burst is answered, the rest dropped.
    tests::fixture::pin_to_cpu(0);
    let big = sized4(44004, 1883, 1481, true).build();
    let started = std::time::Instant::now();
    let answered = (0..200).filter(|_| lb.run(&big).0 == XDP_TX).count();
    let took_ms = started.elapsed().as_millis();
    assert!(took_ms < 100, "200 runs took {took_ms} ms: too slow to see the limit");
    let bound = 50 + usize::try_from(took_ms).expect("small") + 1;
    assert!((50..=bound).contains(&answered), "answered {answered} of 200 in {took_ms} ms (at most {bound})");
}
