//! Packet fixtures for the edge: frames that are not this node's, ICMP "fragmentation needed"
//! steered by the flow it quotes, the flood guard, idle flows, and storm control. Pushed
//! through the loaded XDP program with `BPF_PROG_TEST_RUN`, like `xdp_fixtures`.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{FLOW_S_AGE_SHIFT, FlowKey, flow_meta, flow_meta_split, real_backend, reason, table_event};
use lb_userspace::plan;
use tests::{
    fixture::{
        CLIENT, Case, Lb, VIP, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, assert_dsr_rewrite, driver_runs, live_flows, mac_of, new_flows,
        pin_to_cpu, syn,
    },
    frame::{ICMP_DEST_UNREACH, Ipv4Frame, L4, LB_MAC, TCP_ACK, TCP_RST, TCP_SYN},
    require_root, wait,
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const VMAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];

fn ack(sport: u16) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_ACK).build()
}

/// A frame built with another destination MAC.
fn to_mac(mut f: Ipv4Frame, mac: [u8; 6]) -> Vec<u8> {
    f.dst_mac = mac;
    f.build()
}

fn table_events(lb: &Lb) -> Vec<u64> {
    lb.dp.stats().expect("stats").table
}

#[test]
fn only_frames_addressed_to_this_node_are_forwarded() {
    require_root!();
    let text =
        Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)]).replace("ring_size", "accept_macs = [\"00:00:5e:00:01:33\"]\nring_size");
    let mut lb = Lb::with_config(Lb::parse(&text));
    // One SYN per row, each from its own port, to the MAC the row names.
    let syn_to = |i: u16, mac: [u8; 6]| to_mac(Ipv4Frame::tcp(CLIENT, 40000 + 2 * i, VIP, 1883, TCP_SYN), mac);
    let not_ours = |i: u16, what: &str, mac: [u8; 6]| Case::pass(what, syn_to(i, mac), reason::PASS_NOT_OUR_MAC);
    let cases = [
        Case::tx("the interface's own MAC", syn_to(0, LB_MAC)),
        Case::tx("keepalived's virtual MAC (accept_macs)", syn_to(1, VMAC)),
        not_ours(2, "another host's MAC (unknown unicast flooded by a switch)", mac_of(0x99)),
        not_ours(3, "a backend's MAC (a frame seen in promiscuous mode)", mac_of(11)),
        not_ours(4, "broadcast", [0xff; 6]),
        not_ours(5, "IPv4 multicast", [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]),
        not_ours(6, "another VRRP router's virtual MAC", [0x00, 0x00, 0x5e, 0x00, 0x01, 0x34]),
    ];
    lb.check_table(&cases);
    for (i, case) in (0..).zip(&cases).filter(|(_, c)| c.action == XDP_PASS) {
        assert!(lb.dp.flow(CLIENT, 40000 + 2 * i, VIP, 1883).is_none(), "{}: a frame not for this node recorded a flow", case.what);
    }
    // An established flow, cached on this CPU: its frames for another MAC still pass.
    pin_to_cpu(0);
    assert_eq!(lb.run(&syn(41000)).0, XDP_TX);
    assert_eq!(lb.run(&ack(41000)).0, XDP_TX);
    assert_eq!(lb.run(&ack(41000)).0, XDP_TX);
    let foreign = to_mac(Ipv4Frame::tcp(CLIENT, 41000, VIP, 1883, TCP_ACK), mac_of(0x99));
    lb.check_case(&Case::pass("a cached flow's frame for another MAC", foreign, reason::PASS_NOT_OUR_MAC));
    // A fragment to a VIP for another node passes (it is that node's to drop).
    let mut frag = Ipv4Frame::tcp(CLIENT, 41002, VIP, 1883, TCP_SYN);
    frag.frag = 0x2000;
    lb.check_case(&Case::pass("another node's fragment", to_mac(frag.clone(), mac_of(0x99)), reason::PASS_NOT_OUR_MAC));
    assert_eq!(lb.run(&frag.build()).0, XDP_DROP, "our own fragment is dropped");

    // The interface's MAC changes (the controller follows it): the old one is foreign now,
    // and forwarded frames carry the new one as their source.
    lb.src_mac = mac_of(0x03);
    lb.apply();
    assert_eq!(lb.run(&syn(41004)).0, XDP_PASS, "the old MAC is no longer this node's");
    let input = to_mac(Ipv4Frame::tcp(CLIENT, 41006, VIP, 1883, TCP_SYN), mac_of(0x03));
    let (action, out) = lb.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(out[6..12], mac_of(0x03), "forwarded with the new MAC as source");
    assert_eq!(lb.dp.node_macs(), vec![mac_of(0x03), VMAC]);
}

/// A segment the broker sends for the flow `CLIENT:client_port -> VIP:1883` (the answer that a
/// router on the way to the client finds too big).
fn broker_segment(client_port: u16) -> Ipv4Frame {
    let mut f = Ipv4Frame::tcp(VIP, 1883, CLIENT, client_port, TCP_ACK);
    f.payload = vec![0x30; 1400];
    f
}

fn too_big(client_port: u16) -> Ipv4Frame {
    Ipv4Frame::frag_needed(ROUTER, &broker_segment(client_port), 1280, 8)
}

#[test]
fn icmp_frag_needed_reaches_the_broker_of_the_flow_it_quotes() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ports: Vec<u16> = (20000..20400).step_by(2).collect();
    for &p in &ports {
        assert_eq!(lb.run(&syn(p)).0, XDP_TX);
        assert_eq!(lb.run(&ack(p)).0, XDP_TX);
    }
    // A broker joins: the ring moves some tuples to it, their flows stay where they are.
    lb.set_backends(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let flows_before = lb.dp.flows();
    let stats_before = lb.dp.stats().expect("stats");
    let mut moved_by_ring = 0;
    for &p in &ports {
        let recorded = lb.backend_name(real_backend(lb.dp.flow(CLIENT, p, VIP, 1883).expect("recorded").real()));
        moved_by_ring += usize::from(lb.ring_choice(0, CLIENT, p, 1883) != recorded);
        let input = too_big(p).build();
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_TX, "port {p}");
        assert_eq!(lb.backend_of(&out), recorded, "port {p}: the ICMP went elsewhere than its flow");
        assert_dsr_rewrite(&input, &out, lb.mac(&recorded), "frag-needed");
    }
    assert!(moved_by_ring > 20, "only {moved_by_ring} flows differ from the new ring");
    // Counted as ICMP, not as the flows' packets; nothing in the table changed.
    let stats = lb.dp.stats().expect("stats");
    let n = ports.len() as u64;
    assert_eq!(stats.verdict(reason::TX_ICMP_TOO_BIG) - stats_before.verdict(reason::TX_ICMP_TOO_BIG), n);
    assert_eq!(stats.listeners[&lb.ids.listeners["mqtt"]].icmp_too_big, n);
    assert_eq!(stats.total(), stats_before.total(), "ICMP counted as the flows' own packets");
    assert_eq!(lb.dp.flows(), flows_before, "an ICMP error refreshed, confirmed or recorded a flow");

    // A longer quote (RFC 1812 routers quote as much as fits in 576 bytes) and a tagged frame.
    let mut long = Ipv4Frame::frag_needed(ROUTER, &broker_segment(ports[0]), 1280, 548);
    long.vlan = Some((0x8100, 7));
    long.ip_options = vec![0x01; 4];
    let recorded = lb.backend_name(real_backend(lb.dp.flow(CLIENT, ports[0], VIP, 1883).expect("recorded").real()));
    let (action, out) = lb.run(&long.build());
    assert_eq!((action, lb.backend_of(&out)), (XDP_TX, recorded), "a tagged frame with a long quote");
}

#[test]
fn icmp_frag_needed_for_an_unseen_flow_goes_where_its_syn_goes_and_records_nothing() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    for p in (30000..30200).step_by(2) {
        let (action, out) = lb.run(&too_big(p).build());
        assert_eq!(action, XDP_TX);
        let via_icmp = lb.backend_of(&out);
        assert_eq!(via_icmp, lb.ring_choice(0, CLIENT, p, 1883), "port {p}");
        assert_eq!(lb.dp.flow_count(), 0, "port {p}: an ICMP error recorded a flow");
        let (_, out) = lb.run(&syn(p));
        assert_eq!(lb.backend_of(&out), via_icmp, "port {p}: the flow's SYN went elsewhere than its ICMP error");
        lb.dp.clear_flows();
    }
}

#[test]
fn icmp_that_is_not_about_a_listener_flow_passes_untouched() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let other = Ipv4Addr::new(192, 0, 2, 200);
    let mut not_a_listener_port = broker_segment(20000);
    if let L4::Tcp { sport, .. } = &mut not_a_listener_port.l4 {
        *sport = 80;
    }
    let mut from_another_host = broker_segment(20000);
    from_another_host.src = other;
    let mut udp = broker_segment(20000);
    udp.l4 = L4::Udp { sport: 1883, dport: 20000 };
    let mut later_fragment = broker_segment(20000);
    later_fragment.frag = 0x0010;
    let mut port_unreachable = too_big(20000);
    if let L4::IcmpError { code, .. } = &mut port_unreachable.l4 {
        *code = 3;
    }
    // Sent to the VIP, but quoting a datagram from another source.
    let mut misaddressed = Ipv4Frame::frag_needed(ROUTER, &from_another_host, 1280, 8);
    misaddressed.dst = VIP;
    let quoting = |what: &str, quoted: &Ipv4Frame| {
        Case::pass(what, Ipv4Frame::frag_needed(ROUTER, quoted, 1280, 8).build(), reason::PASS_NO_LISTENER)
    };
    lb.check_table(&[
        quoting("quotes a port no listener uses", &not_a_listener_port),
        quoting("quotes another host's segment", &from_another_host),
        Case::pass("to the VIP, quoting another host", misaddressed.build(), reason::PASS_NO_LISTENER),
        quoting("quotes UDP", &udp),
        quoting("quotes a later fragment", &later_fragment),
        Case::pass("port unreachable (type 3 code 3)", port_unreachable.build(), reason::PASS_NOT_TCP),
        Case::pass("for another node's MAC", to_mac(too_big(20000), mac_of(0x99)), reason::PASS_NOT_OUR_MAC),
    ]);
    let f = too_big(20000);
    if let L4::IcmpError { kind, .. } = f.l4 {
        assert_eq!(kind, ICMP_DEST_UNREACH);
    }
}

#[test]
fn every_truncation_of_an_icmp_frag_needed_is_safe() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    // Ethernet, IP, ICMP header, quoted IP header, quoted ports: the shortest frame forwarded.
    let whole = 14 + 20 + 8 + 20 + 4;
    for quote in [8, 28] {
        let full = Ipv4Frame::frag_needed(ROUTER, &broker_segment(20000), 1280, quote).build();
        for len in 14..=full.len() {
            let input = &full[..len];
            let mut out = vec![0u8; full.len() + 256];
            let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() };
            let r = lb.dp.balancer().test_run(opts).expect("BPF_PROG_TEST_RUN");
            assert_ne!(r.return_value, XDP_ABORTED, "length {len}: aborted");
            let want = if len >= whole { XDP_TX } else { XDP_PASS };
            assert_eq!(r.return_value, want, "length {len} of {} (quote {quote})", full.len());
            if want == XDP_PASS {
                assert_eq!(&out[..r.data_size_out as usize], input, "length {len}: passed untouched");
            }
        }
    }
    assert!(lb.dp.stats().expect("stats").verdict(reason::PASS_MALFORMED) > 0);
}

/// Tuples from `net` (a /16 as its first two octets), `n` of them, distinct.
fn tuples(net: [u8; 2], n: u32) -> Vec<(Ipv4Addr, u16)> {
    (0..n)
        .map(|i| (Ipv4Addr::new(net[0], net[1], u8::try_from(i >> 8).expect("< 2^16"), u8::try_from(i & 0xff).expect("byte")), 40000))
        .collect()
}

fn send(lb: &Lb, (src, sport): (Ipv4Addr, u16), flags: u8) -> u32 {
    lb.run(&Ipv4Frame::tcp(src, sport, VIP, 1883, flags).build()).0
}

#[test]
fn a_flood_of_unconfirmed_flows_never_displaces_confirmed_ones() {
    require_root!();
    // 2,048 slots; 1,300 connections whose handshake completed (SYN, then ACK) fill most.
    let mut lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]), 1024);
    let sessions = tuples([10, 1], 1300);
    open_and_confirm(&lb, &sessions);
    let held: Vec<((Ipv4Addr, u16), u32)> = sessions
        .iter()
        .filter_map(|&(a, p)| lb.dp.flow(a, p, VIP, 1883).filter(lb_userspace::flow_table::Flow::confirmed).map(|f| ((a, p), f.real())))
        .collect();
    assert!(held.len() > 1200, "only {} of 1300 sessions recorded and confirmed", held.len());
    let events0 = table_events(&lb);
    assert_eq!(events0[table_event::CONFIRMED as usize], held.len() as u64, "one confirmation per held session");

    // A spoofed SYN flood of 16 times the table's size, then as many made-up ACKs: every frame
    // a new tuple, forwarded by the ring.
    lb.bench_flows(0);
    assert_eq!(new_flows(&lb, 16 * 1024), XDP_TX);
    assert_eq!(driver_runs(&lb, TCP_ACK, 16 * 1024), XDP_TX);
    for ((a, p), real) in &held {
        let f = lb.dp.flow(*a, *p, VIP, 1883).unwrap_or_else(|| panic!("{a}:{p}: a confirmed session was displaced by the flood"));
        assert_eq!((f.real(), f.confirmed()), (*real, true), "{a}:{p}");
    }
    let events = table_events(&lb);
    let delta = |e: u32| events[e as usize] - events0[e as usize];
    assert!(delta(table_event::REFUSED) > 0, "no insert found its buckets full of confirmed flows: {events:?}");
    assert!(delta(table_event::REPLACE_UNCONFIRMED) > 10_000, "the flood's flows did not replace each other: {events:?}");
    assert_eq!(delta(table_event::CONFIRMED), 0, "a flood frame confirmed a flow");
    assert_eq!(
        delta(table_event::INSERT_FREE) + delta(table_event::REPLACE_UNCONFIRMED) + delta(table_event::REFUSED) + delta(table_event::RACED),
        2 * 16 * 1024,
        "every flood frame is one insert outcome: {events:?}"
    );

    // Two frames per made-up tuple, back to back (SYN then ACK, and ACK then ACK): the second
    // finds its tuple recorded a moment ago, and confirms nothing.
    for (first, second) in [(TCP_SYN, TCP_ACK), (TCP_ACK, TCP_ACK)] {
        let before = table_events(&lb);
        for round in 0..16u32 {
            lb.test.drive(&lb.dp, false, round * 512, 0, false).expect("driver");
            assert_eq!(driver_runs(&lb, first, 512), XDP_TX);
            lb.test.drive(&lb.dp, false, round * 512, 0, false).expect("driver");
            assert_eq!(driver_runs(&lb, second, 512), XDP_TX);
        }
        let after = table_events(&lb);
        assert_eq!(
            after[table_event::CONFIRMED as usize],
            before[table_event::CONFIRMED as usize],
            "a flood's second frame confirmed a flow"
        );
        assert!(lb.dp.flows().iter().filter(|f| f.confirmed()).count() == held.len(), "the table holds confirmed flows of the flood");
    }
    for ((a, p), real) in &held {
        let f = lb.dp.flow(*a, *p, VIP, 1883).unwrap_or_else(|| panic!("{a}:{p}: a confirmed session was displaced by the flood"));
        assert_eq!((f.real(), f.confirmed()), (*real, true), "{a}:{p}");
    }
}

/// Sessions as clients make them: SYN and the handshake's ACK, then a segment a keepalive
/// later, which confirms each flow (`lb_common::FLOW_CONFIRM_UNITS`).
fn open_and_confirm(lb: &Lb, sessions: &[(Ipv4Addr, u16)]) {
    for &t in sessions {
        assert_eq!(send(lb, t, TCP_SYN), XDP_TX);
        assert_eq!(send(lb, t, TCP_ACK), XDP_TX);
    }
    lb.pass_time(lb_common::FLOW_CONFIRM_UNITS);
    for &t in sessions {
        assert_eq!(send(lb, t, TCP_ACK), XDP_TX);
    }
}

#[test]
fn a_flow_confirms_by_a_segment_a_second_or_more_after_it_was_recorded() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    // The steps below count in the program's clock units (1.07 s), moving only this flow's
    // clock; the real one must not tick between them. Start just after it ticked.
    let unit = lb.dp.now_age().expect("clock");
    wait::until("the flow clock's next unit", Duration::from_secs(3), || lb.dp.now_age().expect("clock") != unit);
    // After a failover to this node, a session arrives mid-flow: no SYN.
    let (action, out) = lb.run(&ack(42000));
    assert_eq!(action, XDP_TX);
    assert_eq!(lb.backend_of(&out), lb.ring_choice(0, CLIENT, 42000, 1883), "a mid-flow miss follows the ring");
    let f = lb.dp.flow(CLIENT, 42000, VIP, 1883).expect("recorded");
    assert_eq!(f.kind(), lb_common::FLOW_K_MIDFLOW, "recorded unconfirmed, without SYN");
    // Its next segment at once confirms nothing (a flood sends its frames back to back) ...
    assert_eq!(lb.run(&ack(42000)).0, XDP_TX);
    assert!(!lb.dp.flow(CLIENT, 42000, VIP, 1883).expect("kept").confirmed(), "a segment in the same second confirmed the flow");
    // ... one a unit later does not either (it may be a few microseconds later) ...
    lb.pass_time_for(CLIENT, 42000, 1883, lb_common::FLOW_CONFIRM_UNITS - 1);
    assert_eq!(lb.run(&ack(42000)).0, XDP_TX);
    assert!(!lb.dp.flow(CLIENT, 42000, VIP, 1883).expect("kept").confirmed(), "a segment one unit later confirmed the flow");
    // ... and one FLOW_CONFIRM_UNITS after the recording does, as a keepalive does.
    lb.pass_time_for(CLIENT, 42000, 1883, 1);
    assert_eq!(lb.run(&ack(42000)).0, XDP_TX);
    assert!(lb.dp.flow(CLIENT, 42000, VIP, 1883).expect("kept").confirmed(), "its segment a keepalive later confirms it");
    // A new connection: its SYN, a retransmitted SYN and the handshake's ACK leave it
    // unconfirmed; its first segment a keepalive later confirms it.
    assert_eq!(lb.run(&syn(42002)).0, XDP_TX);
    assert_eq!(lb.run(&syn(42002)).0, XDP_TX);
    assert_eq!(lb.run(&ack(42002)).0, XDP_TX);
    let f = lb.dp.flow(CLIENT, 42002, VIP, 1883).expect("recorded");
    assert_eq!(f.kind(), lb_common::FLOW_K_OPENED, "recorded by its SYN, unconfirmed");
    lb.pass_time_for(CLIENT, 42002, 1883, lb_common::FLOW_CONFIRM_UNITS);
    assert_eq!(lb.run(&ack(42002)).0, XDP_TX);
    assert!(lb.dp.flow(CLIENT, 42002, VIP, 1883).expect("kept").confirmed());
    assert_eq!(table_events(&lb)[table_event::CONFIRMED as usize], 2);
}

/// The slot (bucket, way) of a flow, read raw.
fn slot_of(lb: &Lb, (a, p): (Ipv4Addr, u16)) -> (u32, usize) {
    let key = FlowKey {
        src_be: u32::from_ne_bytes(a.octets()),
        dst_be: u32::from_ne_bytes(VIP.octets()),
        sport_be: p.to_be(),
        dport_be: 1883u16.to_be(),
    };
    let (addrs, ports) = key.words();
    let t = lb.dp.flow_table();
    (0..t.buckets())
        .flat_map(|b| (0..4).map(move |w| (b, w)))
        .find(|&(b, w)| {
            let (a, m) = t.raw(b, w);
            a == addrs && flow_meta_split(m).0 == ports && flow_meta_split(m).1 != 0
        })
        .expect("the flow's slot")
}

#[test]
fn a_table_full_of_confirmed_flows_forwards_a_new_one_unrecorded_until_a_slot_is_stale() {
    require_root!();
    // Two buckets, eight slots: every tuple lives in one of the two.
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 4);
    let held = tuples([10, 2], 8);
    open_and_confirm(&lb, &held);
    assert_eq!(lb.dp.flows().iter().filter(|f| f.confirmed()).count(), 8);
    let newcomer = (Ipv4Addr::new(10, 3, 0, 1), 40000);
    let before = table_events(&lb);
    let new_flows_before = lb.dp.stats().expect("stats").total().new_flows;
    let (action, out) = lb.run(&Ipv4Frame::tcp(newcomer.0, newcomer.1, VIP, 1883, TCP_SYN).build());
    assert_eq!((action, lb.backend_of(&out)), (XDP_TX, lb.ring_choice(0, newcomer.0, newcomer.1, 1883)), "forwarded by the ring");
    assert_eq!(lb.dp.stats().expect("stats").total().new_flows, new_flows_before + 1);
    assert_eq!(table_events(&lb)[table_event::REFUSED as usize], before[table_event::REFUSED as usize] + 1);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_none());
    for &(a, p) in &held {
        assert!(lb.dp.flow(a, p, VIP, 1883).is_some(), "{a}:{p} displaced");
    }
    // One session closes. A confirmed flow closing for less than FLOW_REOPEN_UNITS is kept
    // (a spoofed RST must not expose a live session to the next flood) ...
    assert_eq!(send(&lb, held[3], TCP_ACK | 0x01), XDP_TX);
    assert_eq!(send(&lb, newcomer, TCP_ACK), XDP_TX);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_none(), "a session closing a moment ago was replaced");
    // ... and once its close is old, the newcomer's next segment takes its slot.
    lb.pass_time(lb_common::FLOW_REOPEN_UNITS);
    assert_eq!(send(&lb, newcomer, TCP_ACK), XDP_TX);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_some(), "recorded over the closing flow");
    assert!(lb.dp.flow(held[3].0, held[3].1, VIP, 1883).is_none());
    assert_eq!(table_events(&lb)[table_event::REPLACE_STALE as usize], before[table_event::REPLACE_STALE as usize] + 1);
}

#[test]
fn flows_idle_past_their_timeout_are_not_live_and_go_first() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)]).replace("ring_size", "flow_idle_timeout = \"5s\"\nring_size");
    let lb = Lb::with_table(Lb::parse(&text), 4);
    let expire = plan::expire_units(Duration::from_secs(5));
    assert_eq!(expire, 6, "5 s is five units of 1.07 s, and one more");
    let held = tuples([10, 4], 8);
    open_and_confirm(&lb, &held);
    // One confirmed flow last sent a frame `expire` units ago (as if its client vanished).
    let (bucket, way) = slot_of(&lb, held[5]);
    let (addrs, meta) = lb.dp.flow_table().raw(bucket, way);
    let (ports, state) = flow_meta_split(meta);
    let aged = (state & 0xffff) | (lb.dp.now_age().expect("clock").wrapping_sub(expire) & 0xffff) << FLOW_S_AGE_SHIFT;
    lb.dp.flow_table().set_raw(bucket, way, addrs, flow_meta(ports, aged));
    let live = |lb: &Lb| lb.dp.flows_per_real(lb.dp.now_age().expect("clock"), |_| expire).values().sum::<usize>();
    assert_eq!(live(&lb), 7, "an expired flow counts as live");
    assert_eq!(live_flows(&lb), 8, "without a timeout it would");
    // A new connection replaces it, confirmed as it was, rather than being refused.
    let before = table_events(&lb);
    let newcomer = (Ipv4Addr::new(10, 5, 0, 1), 40000);
    assert_eq!(send(&lb, newcomer, TCP_SYN), XDP_TX);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_some(), "the newcomer was not recorded");
    assert!(lb.dp.flow(held[5].0, held[5].1, VIP, 1883).is_none(), "the expired flow is still there");
    assert_eq!(table_events(&lb)[table_event::REPLACE_STALE as usize], before[table_event::REPLACE_STALE as usize] + 1);
}

#[test]
fn a_cached_flow_keeps_its_table_age_that_of_its_last_frame() {
    require_root!();
    pin_to_cpu(0);
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    assert_eq!(lb.session(CLIENT, 43000, 1883).0, XDP_TX);
    assert_eq!(lb.run(&ack(43000)).0, XDP_TX);
    assert_eq!(lb.dp.cached_flow(CLIENT, 43000, VIP, 1883).expect("cache").len(), 1, "the flow is cached");
    let age = lb.dp.flow(CLIENT, 43000, VIP, 1883).expect("recorded").age();
    // Wait for the table's clock to move on (one unit is 1.07 s).
    let at = lb.wait_clock_past(age);
    // One frame, well within the cache's frame budget: the table must see it.
    assert_eq!(lb.run(&ack(43000)).0, XDP_TX);
    let after = lb.dp.flow(CLIENT, 43000, VIP, 1883).expect("recorded").age();
    assert!(
        after == at || after == lb.dp.now_age().expect("clock"),
        "the table's age of a flow stayed {after} (frame at {at}): a cached frame did not refresh it"
    );
}

/// Found by the soak: a client that lost its connection without a word to the balancer (its
/// broker reset it) reconnects from a source port its old flow still holds. The SYN leaves the
/// confirmed flow as it was, old age included; if it still cached the flow as "seen now", the
/// handshake's ACK and CONNECT were served from the cache, the table kept the old age, the
/// sweep expired the flow under the live session, and its next ping (a minute later) took the
/// ring, to another broker once the ring had changed: a reset. A SYN with ACK (which nothing
/// charges, and which anyone can spoof) leaves the flow as it was too.
#[test]
fn a_syn_on_a_confirmed_flow_does_not_hide_the_next_frames_from_the_table() {
    require_root!();
    pin_to_cpu(0);
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    for (port, flags) in [(43100, TCP_SYN), (43102, TCP_SYN | TCP_ACK)] {
        assert_eq!(lb.session(CLIENT, port, 1883).0, XDP_TX);
        assert!(lb.dp.flow(CLIENT, port, VIP, 1883).expect("recorded").confirmed());
        // Start just after a tick, so the SYN and the ACK below share one unit of the clock
        // (the cache serves only frames in the unit it was filled in).
        let now = lb.wait_clock_past(lb.dp.now_age().expect("clock"));
        // The old connection's last frame was a while ago (30 units, about 32 s: a ping's
        // silence).
        let old = 30;
        lb.pass_time_for(CLIENT, port, 1883, old);
        let rewound = lb.dp.flow(CLIENT, port, VIP, 1883).expect("recorded").age();
        assert!(lb_common::flow_idle(now, rewound) >= old, "the flow's age {rewound} is not {old} units before {now}");
        // The reconnect's SYN (or a spoofed SYN-ACK): it must not cache the flow as seen now
        // (the session's own entry is of an earlier unit, and no longer served).
        assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, port, VIP, 1883, flags).build()).0, XDP_TX);
        assert!(
            lb.dp.cached_flow(CLIENT, port, VIP, 1883).expect("cache").is_empty(),
            "flags {flags:#x}: the flow was cached though the table kept its age {rewound}"
        );
        // The handshake's ACK reaches the table and refreshes it.
        assert_eq!(lb.run(&ack(port)).0, XDP_TX);
        let after = lb.dp.flow(CLIENT, port, VIP, 1883).expect("recorded");
        assert!(after.confirmed());
        let end = lb.dp.now_age().expect("clock");
        assert!(
            lb_common::flow_idle(end, after.age()) <= lb_common::flow_idle(end, now),
            "flags {flags:#x}: after it and an ACK at age {now}, the table has the flow's age {} (rewound to {rewound}): the ACK \
             was served from a cache, and the sweep would expire this live session",
            after.age()
        );
    }
}

/// SYNs from port `from` on, one every 5 ms, until one is admitted (at most 2 s: the limit's
/// quiet spell); the admitted one's port.
fn first_admitted(lb: &Lb, from: u16) -> u16 {
    let mut p = from;
    wait::until_every("a SYN admitted after a quiet spell", Duration::from_secs(2), Duration::from_millis(5), || {
        if lb.run(&syn(p)).0 == XDP_TX {
            return Some(p);
        }
        p += 2;
        None
    })
}

#[test]
fn storm_control_admits_its_rate_and_never_limits_established_traffic() {
    require_root!();
    // 100 new connections a second, five at once: one every 10 ms after a burst of five.
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)])
        .replace("port = 1883\n", "port = 1883\nmax_conn_rate = 100\nmax_conn_burst = 5\n");
    let lb = Lb::with_config(Lb::parse(&text));
    let t0 = Instant::now();
    let mut admitted = Vec::new();
    let mut dropped = Vec::new();
    for p in (44000..44080).step_by(2) {
        let input = syn(p);
        let (action, out) = lb.run(&input);
        match action {
            XDP_TX => admitted.push(p),
            XDP_DROP => {
                assert_eq!(out, input, "a dropped SYN is untouched");
                dropped.push(p);
            }
            other => panic!("port {p}: action {other}"),
        }
    }
    let elapsed_ms = u64::try_from(t0.elapsed().as_millis()).expect("short");
    // The burst, plus one per 10 ms that passed, plus one clock tick (the clock is coarse).
    let bound = 5 + usize::try_from(elapsed_ms / 10 + 2).expect("small");
    assert!(admitted.len() >= 5 && admitted.len() <= bound, "{} admitted in {elapsed_ms} ms (bound {bound})", admitted.len());
    assert!(!dropped.is_empty());
    let stats = lb.dp.stats().expect("stats");
    assert_eq!(stats.verdict(reason::DROP_CONN_RATE), dropped.len() as u64);
    assert_eq!(stats.listeners[&lb.ids.listeners["mqtt"]].conn_rate_dropped, dropped.len() as u64);
    assert_eq!(stats.total().new_flows, admitted.len() as u64, "only admitted SYNs made flows");

    // Established traffic is never limited: the admitted flows' segments (and a retransmitted
    // SYN of a live flow), and even a segment of a dropped tuple, which arrives mid-flow.
    for &p in &admitted {
        assert_eq!(lb.run(&ack(p)).0, XDP_TX, "port {p}");
        assert_eq!(lb.run(&syn(p)).0, XDP_TX, "port {p}: a retransmitted SYN of a live flow");
    }
    assert_eq!(lb.run(&ack(dropped[0])).0, XDP_TX, "a segment without SYN is never limited");
    // Another listener has no limit.
    for p in (44000..44080).step_by(2) {
        assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 8883, TCP_SYN).build()).0, XDP_TX);
    }
    // After a quiet spell new connections are admitted again.
    first_admitted(&lb, 45000);
}

#[test]
fn a_flow_refreshed_ahead_of_a_reader_is_not_idle() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)]).replace("ring_size", "flow_idle_timeout = \"5s\"\nring_size");
    let lb = Lb::with_table(Lb::parse(&text), 4);
    let expire = plan::expire_units(Duration::from_secs(5));
    let held = tuples([10, 6], 8);
    open_and_confirm(&lb, &held);
    // A flow whose last frame came a unit or two after a reader took the time (another CPU, or
    // the controller walking the table while a segment arrives): its age is ahead of `now`.
    let now = lb.dp.now_age().expect("clock");
    let (bucket, way) = slot_of(&lb, held[2]);
    let (addrs, meta) = lb.dp.flow_table().raw(bucket, way);
    let (ports, state) = flow_meta_split(meta);
    let ahead = (state & 0xffff) | (now.wrapping_add(2) & 0xffff) << FLOW_S_AGE_SHIFT;
    lb.dp.flow_table().set_raw(bucket, way, addrs, flow_meta(ports, ahead));
    // Counted live, and not removed as expired, by the controller...
    assert_eq!(lb.dp.flows_per_real(now, |_| expire).values().sum::<usize>(), 8, "a flow ahead of the reader counts as idle");
    assert_eq!(lb.dp.flow_table().remove_where(|f| f.idle(now) >= expire), 0, "a sweep removed a flow refreshed during it");
    // ... and not replaced as expired by the program: a newcomer finds only confirmed flows.
    let before = table_events(&lb);
    assert_eq!(send(&lb, (Ipv4Addr::new(10, 7, 0, 1), 40000), TCP_SYN), XDP_TX);
    assert!(lb.dp.flow(held[2].0, held[2].1, VIP, 1883).is_some(), "the program replaced a flow refreshed ahead of it");
    assert_eq!(table_events(&lb)[table_event::REFUSED as usize], before[table_event::REFUSED as usize] + 1);
}

/// Storm control charges every SYN that opens a connection once, whatever came before it on
/// its tuple: an ACK first (which records the flow mid-flow) used to make the SYN after it a
/// "retransmit" of a live flow, forwarded uncharged (issue 21, the storm control back door).
#[test]
fn storm_control_charges_a_syn_after_an_ack_and_never_a_retransmit_twice() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)])
        .replace("port = 1883\n", "port = 1883\nmax_conn_rate = 100\nmax_conn_burst = 5\n");
    let lb = Lb::with_config(Lb::parse(&text));
    // A client's session, opened before the attack.
    let session = 48000;
    assert_eq!(lb.session(CLIENT, session, 1883).0, XDP_TX);
    let charged0 = table_events(&lb)[table_event::SYN_CHARGED as usize];
    let drops0 = lb.dp.stats().expect("stats").verdict(reason::DROP_CONN_RATE);
    // An attacker's tuples, each an ACK then a SYN, back to back.
    let t0 = Instant::now();
    let mut admitted = 0usize;
    for p in (46000..46400).step_by(2) {
        assert_eq!(lb.run(&ack(p)).0, XDP_TX, "port {p}: a segment without SYN is never limited");
        match lb.run(&syn(p)).0 {
            XDP_TX => admitted += 1,
            XDP_DROP => {}
            other => panic!("port {p}: action {other}"),
        }
    }
    let elapsed_ms = u64::try_from(t0.elapsed().as_millis()).expect("short");
    let bound = 5 + usize::try_from(elapsed_ms / 10 + 2).expect("small");
    assert!(admitted <= bound, "{admitted} of 200 ACK-then-SYN tuples admitted in {elapsed_ms} ms (the limit allows {bound})");
    let stats = lb.dp.stats().expect("stats");
    assert_eq!(stats.verdict(reason::DROP_CONN_RATE) - drops0, 200 - admitted as u64);
    assert_eq!(stats.table[table_event::SYN_CHARGED as usize] - charged0, admitted as u64, "each admitted SYN on a held flow is charged");

    // A SYN admitted, then its retransmits while the limit is spent: forwarded, never charged.
    let p = first_admitted(&lb, 47000);
    for q in (47500..47540).step_by(2) {
        let _ = lb.run(&syn(q));
    }
    let drops = lb.dp.stats().expect("stats").verdict(reason::DROP_CONN_RATE);
    for _ in 0..5 {
        assert_eq!(lb.run(&syn(p)).0, XDP_TX, "port {p}: a retransmitted SYN of an admitted connection was dropped");
    }
    assert_eq!(lb.dp.stats().expect("stats").verdict(reason::DROP_CONN_RATE), drops, "a retransmit was charged");
    // A SYN on a confirmed session (spoofed, or a client that rebooted onto the same port) is
    // charged like a new connection, and dropped while the limit is spent; the session's own
    // segments never are.
    assert_eq!(lb.run(&syn(session)).0, XDP_DROP, "a SYN on a confirmed flow went uncharged");
    assert_eq!(lb.run(&ack(session)).0, XDP_TX);
    assert!(lb.dp.flow(CLIENT, session, VIP, 1883).expect("held").confirmed(), "a dropped SYN changed the session's flow");
}

/// A spoofed RST, then a spoofed SYN, on an exception flow (a session pinned to a broker the
/// ring no longer names for its slot): the SYN used to re-pick by the ring and move the
/// session to a broker that resets it (issue 21). A close alone never lets a SYN move a live
/// session: the SYN goes where the flow goes, the session's own next segment clears the mark,
/// and only a tuple silent for FLOW_REOPEN_UNITS after its close is picked again.
#[test]
fn a_spoofed_rst_then_syn_never_moves_an_exception_flow() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ports: Vec<u16> = (49000..49200).step_by(2).collect();
    let pinned: Vec<String> = ports.iter().map(|&p| lb.backend_of(&lb.session(CLIENT, p, 1883).1)).collect();
    lb.set_backends(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let exceptions: Vec<(u16, &String)> =
        ports.iter().zip(&pinned).filter(|&(&p, _)| lb.ring_choice(0, CLIENT, p, 1883) == "b3").map(|(p, b)| (*p, b)).collect();
    assert!(exceptions.len() > 10, "only {} sessions became exceptions", exceptions.len());
    let rst = |p: u16| Ipv4Frame::tcp(CLIENT, p, VIP, 1883, TCP_RST).build();
    for &(p, was) in &exceptions {
        assert_eq!(lb.backend_of(&lb.run(&rst(p)).1), *was, "port {p}: the RST goes where the flow goes");
        assert!(lb.dp.flow(CLIENT, p, VIP, 1883).expect("held").closing());
        // The attacker's SYN, at once and a few seconds later: where the flow goes.
        assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), *was, "port {p}: RST then SYN moved the session");
        lb.pass_time_for(CLIENT, p, 1883, 4);
        assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), *was, "port {p}: RST, then SYN 4 s later moved the session");
        // The session speaks (its keepalive): the mark is cleared, the flow open and confirmed.
        assert_eq!(lb.backend_of(&lb.run(&ack(p)).1), *was);
        let f = lb.dp.flow(CLIENT, p, VIP, 1883).expect("held");
        assert!(!f.closing() && f.confirmed(), "port {p}: the session's own segment did not clear the close: {f:?}");
        assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), *was, "port {p}: a SYN after the cleared close moved the session");
    }
    let events = table_events(&lb);
    assert_eq!(events[table_event::CLOSE_CLEARED as usize], exceptions.len() as u64);
    // A tuple whose close is older than FLOW_REOPEN_UNITS, and silent since, is a new
    // connection reusing it: the ring picks.
    let (p, was) = exceptions[0];
    assert_eq!(lb.backend_of(&lb.run(&rst(p)).1), *was);
    lb.pass_time_for(CLIENT, p, 1883, lb_common::FLOW_REOPEN_UNITS);
    assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), "b3", "a tuple closed a TIME_WAIT ago must start from the ring");
}

/// Made-up ACKs never push out a connection just opened: a segment without SYN that misses
/// replaces only another mid-flow record, an expired or closed flow, or a connection opened
/// FLOW_OPENED_GRACE_UNITS ago or more (a SYN flood's leftovers make way for mid-flow records
/// soon). A SYN replaces any unconfirmed flow.
#[test]
fn an_ack_flood_does_not_push_out_a_connection_just_opened() {
    require_root!();
    // Two buckets, eight slots: every tuple lives in one of the two.
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 4);
    let opened = tuples([10, 8], 8);
    for &t in &opened {
        assert_eq!(send(&lb, t, TCP_SYN), XDP_TX);
        assert_eq!(send(&lb, t, TCP_ACK), XDP_TX);
    }
    let before = table_events(&lb);
    for &t in &tuples([10, 9], 64) {
        assert_eq!(send(&lb, t, TCP_ACK), XDP_TX, "a made-up ACK is forwarded by the ring");
    }
    let after = table_events(&lb);
    assert_eq!(after[table_event::REFUSED as usize] - before[table_event::REFUSED as usize], 64, "{after:?}");
    for &(a, p) in &opened {
        assert!(lb.dp.flow(a, p, VIP, 1883).is_some(), "{a}:{p}: a made-up ACK pushed out a connection just opened");
    }
    // Past the grace, the oldest opened connection makes way for a mid-flow record ...
    lb.pass_time_for(opened[0].0, opened[0].1, 1883, lb_common::FLOW_OPENED_GRACE_UNITS);
    let late = (Ipv4Addr::new(10, 10, 0, 1), 40000);
    assert_eq!(send(&lb, late, TCP_ACK), XDP_TX);
    assert!(lb.dp.flow(late.0, late.1, VIP, 1883).is_some(), "a mid-flow record was refused a slot past its grace");
    assert!(lb.dp.flow(opened[0].0, opened[0].1, VIP, 1883).is_none());
    // ... and a new SYN replaces an unconfirmed flow at once.
    let syn_new = (Ipv4Addr::new(10, 10, 0, 2), 40000);
    assert_eq!(send(&lb, syn_new, TCP_SYN), XDP_TX);
    assert!(lb.dp.flow(syn_new.0, syn_new.1, VIP, 1883).is_some(), "a SYN was refused among unconfirmed flows");
}

/// A flood that sends made-up ACKs to the same tuples seconds apart makes flows that confirm
/// (`FLOW_K_MIDFLOW_CONFIRMED`): a real session picked up mid-flow looks the same. Those never
/// displace a session that opened through this node, and never keep a new connection out: a
/// SYN's insert replaces them (made-up ACKs cannot).
#[test]
fn flows_confirmed_mid_flow_give_way_to_new_connections_but_not_to_made_up_acks() {
    require_root!();
    // Two buckets, eight slots: every tuple lives in one of the two.
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 4);
    let session = (Ipv4Addr::new(10, 11, 0, 1), 40000);
    open_and_confirm(&lb, &[session]);
    let spaced = tuples([10, 12], 7);
    for &t in &spaced {
        assert_eq!(send(&lb, t, TCP_ACK), XDP_TX);
    }
    lb.pass_time(lb_common::FLOW_CONFIRM_UNITS);
    for &t in &spaced {
        assert_eq!(send(&lb, t, TCP_ACK), XDP_TX);
    }
    let kinds: Vec<u32> = spaced.iter().map(|&(a, p)| lb.dp.flow(a, p, VIP, 1883).expect("recorded").kind()).collect();
    assert_eq!(kinds, vec![lb_common::FLOW_K_MIDFLOW_CONFIRMED; 7], "the spaced ACKs confirmed their flows, marked mid-flow");
    // More made-up ACKs: refused, nothing displaced.
    let before = table_events(&lb);
    for &t in &tuples([10, 13], 32) {
        assert_eq!(send(&lb, t, TCP_ACK), XDP_TX);
    }
    let after = table_events(&lb);
    assert_eq!(after[table_event::REFUSED as usize] - before[table_event::REFUSED as usize], 32);
    assert_eq!(lb.dp.flows().len(), 8);
    // While they talk (a keepalive or more often), they are sessions like any: a new
    // connection finds no room ...
    let newcomer = (Ipv4Addr::new(10, 14, 0, 1), 40000);
    assert_eq!(send(&lb, newcomer, TCP_SYN), XDP_TX);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_none(), "a flow confirmed mid-flow and talking was replaced");
    // ... but silent for FLOW_MIDFLOW_QUIET_UNITS, they give way: a new connection takes the
    // slot of the least recently used of them.
    lb.pass_time(lb_common::FLOW_MIDFLOW_QUIET_UNITS);
    assert_eq!(send(&lb, session, TCP_ACK), XDP_TX);
    assert_eq!(send(&lb, newcomer, TCP_SYN), XDP_TX);
    assert!(lb.dp.flow(newcomer.0, newcomer.1, VIP, 1883).is_some(), "a new connection was refused among silent flows confirmed mid-flow");
    assert_eq!(table_events(&lb)[table_event::REPLACE_MIDFLOW as usize], 1);
    // Seven more (the first takes the newcomer's slot: unconfirmed for long): each replaces
    // one, and the session that opened here, silent as long, is never one of them.
    lb.pass_time(lb_common::FLOW_MIDFLOW_QUIET_UNITS);
    for &t in &tuples([10, 15], 7) {
        assert_eq!(send(&lb, t, TCP_SYN), XDP_TX);
    }
    let s = lb.dp.flow(session.0, session.1, VIP, 1883).expect("the session that opened here was displaced");
    assert_eq!(s.kind(), lb_common::FLOW_K_CONFIRMED);
    assert!(spaced.iter().all(|&(a, p)| lb.dp.flow(a, p, VIP, 1883).is_none()), "a flow confirmed mid-flow outlived new connections");
}

/// SYNs repeated on an admitted tuple are retransmits for FLOW_SYN_RETRY_UNITS: charged to the
/// retransmit budget (as large as the connection budget), so an attacker who got one SYN
/// admitted cannot pass unlimited SYNs on its tuple (each a new request to the broker when
/// its sequence number changes).
#[test]
fn syns_repeated_on_an_admitted_tuple_are_bounded_by_the_retransmit_budget() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)])
        .replace("port = 1883\n", "port = 1883\nmax_conn_rate = 100\nmax_conn_burst = 5\n");
    let lb = Lb::with_config(Lb::parse(&text));
    assert_eq!(lb.run(&syn(50000)).0, XDP_TX);
    let t0 = Instant::now();
    let passed = (0..200).filter(|_| lb.run(&syn(50000)).0 == XDP_TX).count();
    let elapsed_ms = u64::try_from(t0.elapsed().as_millis()).expect("short");
    let bound = 5 + usize::try_from(elapsed_ms / 10 + 2).expect("small");
    assert!(
        passed >= 5 && passed <= bound,
        "{passed} of 200 repeated SYNs passed in {elapsed_ms} ms (the retransmit budget allows {bound})"
    );
    assert_eq!(table_events(&lb)[table_event::SYN_AGAIN as usize], passed as u64);
    // The connection budget was not touched: a new connection is admitted at once.
    assert_eq!(lb.run(&syn(50002)).0, XDP_TX, "retransmits were charged to the connection budget");
    // A SYN on the tuple after FLOW_SYN_RETRY_UNITS is a new connection's: charged as one.
    lb.pass_time_for(CLIENT, 50000, 1883, lb_common::FLOW_SYN_RETRY_UNITS);
    let charged = table_events(&lb)[table_event::SYN_CHARGED as usize];
    let _ = lb.run(&syn(50000));
    assert_eq!(table_events(&lb)[table_event::SYN_CHARGED as usize], charged + 1);
}
