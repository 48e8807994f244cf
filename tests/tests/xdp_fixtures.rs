//! Packet fixtures pushed through the loaded XDP program with `BPF_PROG_TEST_RUN`.
//!
//! Each test loads a fresh object, fills its maps through the controller's own planning code
//! (`config` → `plan` → `Dataplane::apply`), and checks verdicts, output frames and counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{FLOW_CACHE_REVALIDATE, reason};
use lb_userspace::config::{self, Config};
use tests::{
    fixture::{
        CLIENT, Case, Lb, RING, VIP, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, bench_tuple, live_flows, mac_of, new_flows, pin_to_cpu, syn,
    },
    frame::{self, Ipv4Frame, Ipv6Frame, L4, TCP_ACK, TCP_SYN},
    require_root,
};

#[test]
fn verdict_table() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let other = Ipv4Addr::new(192, 0, 2, 200);
    let mut udp = Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, 0);
    udp.l4 = L4::Udp { sport: 40000, dport: 1883 };
    let mut icmp = Ipv4Frame::tcp(CLIENT, 0, VIP, 0, 0);
    icmp.l4 = L4::IcmpEcho;
    let mut dot1q = Ipv4Frame::tcp(CLIENT, 40002, VIP, 1883, TCP_SYN);
    dot1q.vlan = Some((0x8100, 0x0064));
    let mut qinq = dot1q.clone();
    qinq.vlan = Some((0x88a8, 0x0fff));
    let mut opts = Ipv4Frame::tcp(CLIENT, 40004, VIP, 1883, TCP_SYN);
    opts.ip_options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    let mut max_opts = Ipv4Frame::tcp(CLIENT, 40006, VIP, 1883, TCP_SYN);
    max_opts.ip_options = vec![0x01; 40]; // IHL 15
    let mut first_frag = Ipv4Frame::tcp(CLIENT, 40008, VIP, 1883, TCP_SYN);
    first_frag.frag = 0x2000; // MF
    let mut later_frag = first_frag.clone();
    later_frag.frag = 0x0010; // offset 128 bytes
    let mut frag_elsewhere = first_frag.clone();
    frag_elsewhere.dst = other;
    let mut stacked = dot1q.build();
    stacked.splice(16..16, [0x81, 0x00, 0x00, 0x05]);
    // Forwarded rows carry the whole frame that must come out: the DSR rewrite of the input,
    // to the backend the listener's ring names.
    let forwarded = |what: &str, f: &Ipv4Frame, listener: &str| Case::tx(what, f.build()).frame(lb.forwarded(f, listener));

    let cases = vec![
        forwarded("SYN to VIP:1883", &Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_SYN), "mqtt"),
        forwarded("ACK to VIP:1883", &Ipv4Frame::tcp(CLIENT, 40010, VIP, 1883, TCP_ACK), "mqtt"),
        forwarded("SYN to VIP:8883", &Ipv4Frame::tcp(CLIENT, 40012, VIP, 8883, TCP_SYN), "mqtts"),
        forwarded("802.1Q tagged SYN", &dot1q, "mqtt"),
        forwarded("802.1ad tagged SYN", &qinq, "mqtt"),
        forwarded("IP options (IHL 6)", &opts, "mqtt"),
        forwarded("IP options (IHL 15)", &max_opts, "mqtt"),
        Case::pass("UDP to VIP:1883", udp.build(), reason::PASS_NOT_TCP),
        Case::pass("ICMP echo to VIP", icmp.build(), reason::PASS_NOT_TCP),
        Case::pass("TCP to VIP:80", Ipv4Frame::tcp(CLIENT, 40014, VIP, 80, TCP_SYN).build(), reason::PASS_NO_LISTENER),
        Case::pass("TCP to another host:1883", Ipv4Frame::tcp(CLIENT, 40016, other, 1883, TCP_SYN).build(), reason::PASS_NO_LISTENER),
        Case::pass("ARP request for the VIP", frame::arp_request(CLIENT, VIP), reason::PASS_NOT_IP),
        Case::pass(
            "IPv6 SYN to an address no listener has",
            Ipv6Frame::tcp("2001:db8::1".parse().unwrap(), 40000, "2001:db8::100".parse().unwrap(), 1883, TCP_SYN).build(),
            reason::PASS_NO_LISTENER,
        ),
        Case::pass("two VLAN tags", stacked, reason::PASS_VLAN_STACKED),
        Case::drop("first fragment to VIP", first_frag.build(), reason::DROP_FRAGMENT),
        Case::drop("later fragment to VIP", later_frag.build(), reason::DROP_FRAGMENT),
        Case::pass("fragment to another host", frag_elsewhere.build(), reason::PASS_NO_LISTENER),
    ];
    lb.check_table(&cases);
}

/// Listeners on one port at three VIPs, each over its own backend: `text` with `{VIP_A}` etc.
fn shared_port_config(vips: [&str; 3]) -> Config {
    let mut text = format!("interface = \"veth0\"\nring_size = {RING}\n");
    for (i, vip) in vips.iter().enumerate() {
        let _ = write!(text, "[[listener]]\nname = \"l{i}\"\nvip = \"{vip}\"\nport = 1883\nbackends = [\"b{i}\"]\n");
    }
    for i in 0..3u8 {
        let n = 11 + i;
        let _ = write!(text, "[[backend]]\nname = \"b{i}\"\naddress = \"192.0.2.{n}\"\nmac = \"{}\"\n", config::format_mac(mac_of(n)));
    }
    config::parse(&text, "fixture.toml").expect("fixture config is valid")
}

#[test]
fn listeners_sharing_a_port_are_told_apart_by_vip_and_follow_a_move() {
    require_root!();
    let [a, b, c, d] = [100, 101, 102, 103].map(|n| Ipv4Addr::new(192, 0, 2, n));
    let mut lb = Lb::with_config(shared_port_config(["192.0.2.100", "192.0.2.101", "192.0.2.102"]));
    let to = |lb: &Lb, vip: Ipv4Addr, sport: u16| {
        let (action, out) = lb.run(&Ipv4Frame::tcp(CLIENT, sport, vip, 1883, TCP_SYN).build());
        (action == XDP_TX).then(|| lb.backend_of(&out))
    };
    // Each VIP reaches only its listener's backend, whatever its bit in the port's set.
    for sport in (41000..41040).step_by(2) {
        assert_eq!(to(&lb, a, sport).as_deref(), Some("b0"), "VIP a");
        assert_eq!(to(&lb, b, sport).as_deref(), Some("b1"), "VIP b");
        assert_eq!(to(&lb, c, sport).as_deref(), Some("b2"), "VIP c");
        assert_eq!(to(&lb, d, sport), None, "VIP d has no listener on the port");
    }
    // Listener l1 moves from b to d: b stops being served at once, d starts, the others stay.
    lb.config = shared_port_config(["192.0.2.100", "192.0.2.103", "192.0.2.102"]);
    lb.apply();
    assert_eq!(to(&lb, b, 42000), None, "the old address of a moved listener");
    assert_eq!(to(&lb, d, 42000).as_deref(), Some("b1"), "the new address");
    assert_eq!(to(&lb, a, 42000).as_deref(), Some("b0"));
    assert_eq!(to(&lb, c, 42000).as_deref(), Some("b2"));
}

#[test]
fn every_truncation_is_handled_without_abort() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let mut tagged = Ipv4Frame::tcp(CLIENT, 40020, VIP, 1883, TCP_SYN);
    tagged.vlan = Some((0x8100, 7));
    tagged.ip_options = vec![0x01; 8];
    for full in [syn(40018), tagged.build()] {
        for len in 0..=full.len() {
            let input = &full[..len];
            let mut out = vec![0u8; full.len() + 256];
            let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() };
            match lb.dp.balancer().test_run(opts) {
                Ok(r) => {
                    assert_ne!(r.return_value, XDP_ABORTED, "length {len}: aborted");
                    let want = if len == full.len() { XDP_TX } else { XDP_PASS };
                    assert_eq!(r.return_value, want, "length {len} of {}", full.len());
                }
                // The kernel itself refuses XDP test input shorter than an Ethernet header.
                Err(e) => assert!(len < 14, "length {len}: test_run failed: {e}"),
            }
        }
    }
    let s = lb.dp.stats().expect("stats");
    assert!(s.verdict(reason::PASS_MALFORMED) > 0, "truncated frames are counted as malformed");
}

#[test]
fn same_flow_same_backend_and_ring_decides_new_flows() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let mut seen = BTreeMap::<String, usize>::new();
    for sport in (32768..33768).step_by(2) {
        let input = syn(sport);
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_TX);
        let first = lb.backend_of(&out);
        assert_eq!(first, lb.ring_choice(0, CLIENT, sport, 1883), "port {sport}: the program and the controller disagree on the ring pick");
        for _ in 0..3 {
            let (_, again) = lb.run(&Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_ACK).build());
            assert_eq!(lb.backend_of(&again), first, "port {sport}: a later segment changed backend");
        }
        *seen.entry(first).or_default() += 1;
    }
    // Even ports only, as Linux hands them out: all three backends still get a fair share.
    for (name, n) in &seen {
        assert!(*n > 100, "{name} got {n} of 500 flows: {seen:?}");
    }
    assert_eq!(seen.len(), 3);
    let s = lb.dp.stats().expect("stats");
    let new_flows: u64 = s.total().new_flows;
    let packets: u64 = s.total().packets;
    assert_eq!(new_flows, 500, "one new flow per 4-tuple");
    assert_eq!(packets, 2000);
    assert_eq!(s.listener(lb.ids.listeners["mqtt"]).packets, 2000);
    assert_eq!(s.total().bytes, 2000 * syn(1).len() as u64);
}

#[test]
fn source_hash_keeps_one_client_on_one_backend() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let mut per_client = BTreeMap::<Ipv4Addr, BTreeSet<String>>::new();
    for c in 1..=30u8 {
        let src = Ipv4Addr::new(198, 51, 100, c);
        for sport in (40000..40040).step_by(2) {
            let (action, out) = lb.run(&Ipv4Frame::tcp(src, sport, VIP, 8883, TCP_SYN).build());
            assert_eq!(action, XDP_TX);
            let b = lb.backend_of(&out);
            assert_eq!(b, lb.ring_choice(1, src, sport, 8883));
            per_client.entry(src).or_default().insert(b);
        }
    }
    assert!(per_client.values().all(|s| s.len() == 1), "a client spread over several backends: {per_client:?}");
    let used: BTreeSet<&String> = per_client.values().flatten().collect();
    assert!(used.len() >= 2, "30 clients all on one backend");
}

#[test]
fn backend_set_change_keeps_existing_flows() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ports: Vec<u16> = (20000..20400).step_by(2).collect();
    let before: Vec<String> = ports.iter().map(|&p| lb.backend_of(&lb.run(&syn(p)).1)).collect();

    lb.set_backends(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    for (p, b) in ports.iter().zip(&before) {
        let (_, out) = lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build());
        assert_eq!(&lb.backend_of(&out), b, "port {p}: an established flow moved when a backend was added");
    }
    let mut to_new = 0;
    for p in (30000..30400).step_by(2) {
        let (_, out) = lb.run(&syn(p));
        let got = lb.backend_of(&out);
        assert_eq!(got, lb.ring_choice(0, CLIENT, p, 1883), "new flows follow the new ring");
        to_new += usize::from(got == "b3");
    }
    assert!(to_new > 30, "only {to_new} of 200 new flows reached the added backend");

    // Removing a backend: its flows are re-picked, the others stay.
    lb.set_backends(&[("b2", 12, 100), ("b3", 13, 100)]);
    for (p, b) in ports.iter().zip(&before) {
        let (action, out) = lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build());
        assert_eq!(action, XDP_TX);
        let got = lb.backend_of(&out);
        if b == "b1" {
            assert_ne!(got, "b1", "port {p}: a flow stayed on a removed backend");
        } else {
            assert_eq!(&got, b, "port {p}: a flow on a remaining backend moved");
        }
    }
}

#[test]
fn flows_on_a_down_backend_move_and_others_stay() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let ports: Vec<u16> = (50000..50300).step_by(2).collect();
    let before: Vec<String> = ports.iter().map(|&p| lb.backend_of(&lb.run(&syn(p)).1)).collect();
    assert!(before.iter().any(|b| b == "b1"));

    lb.set_down("b1", true);
    let new_flows_before: u64 = lb.dp.stats().expect("stats").total().new_flows;
    let mut moved = 0u64;
    for (p, b) in ports.iter().zip(&before) {
        let (_, out) = lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build());
        let got = lb.backend_of(&out);
        if b == "b1" {
            assert_ne!(got, "b1", "port {p}: still sent to the down backend");
            moved += 1;
            // The entry was repointed: the next segment goes to the same new backend.
            let (_, again) = lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build());
            assert_eq!(lb.backend_of(&again), got);
        } else {
            assert_eq!(&got, b, "port {p}: a flow on a healthy backend moved");
        }
    }
    let new_flows_after: u64 = lb.dp.stats().expect("stats").total().new_flows;
    assert_eq!(new_flows_after - new_flows_before, moved, "each re-pick counts as a new flow on its new backend");

    // Back up: it takes new flows again, the moved ones stay where they went.
    lb.set_down("b1", false);
    let back = (60000..60200).step_by(2).filter(|&p| lb.backend_of(&lb.run(&syn(p)).1) == "b1").count();
    assert!(back > 10, "b1 got only {back} of 100 new flows after coming back");
}

#[test]
fn no_usable_backend_drops_and_counts() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100)]);
    let (action, _) = lb.run(&syn(41000));
    assert_eq!(action, XDP_TX);
    // Drain (weight 0): the established flow stays, a new one has nowhere to go.
    lb.set_backends(&[("b1", 11, 0)]);
    let (action, _) = lb.run(&Ipv4Frame::tcp(CLIENT, 41000, VIP, 1883, TCP_ACK).build());
    assert_eq!(action, XDP_TX, "a drained backend keeps its existing flows");
    let (action, out) = lb.run(&syn(41002));
    assert_eq!(action, XDP_DROP);
    assert_eq!(out, syn(41002));
    // Down, with all_down = "drop": the existing flow is re-picked, finds nothing, and is dropped.
    lb.config = Lb::parse(&Lb::config_text(&[("b1", 11, 100)]).replace("ring_size", "all_down = \"drop\"\nring_size"));
    lb.apply();
    lb.set_down("b1", true);
    let (action, _) = lb.run(&Ipv4Frame::tcp(CLIENT, 41000, VIP, 1883, TCP_ACK).build());
    assert_eq!(action, XDP_DROP);
    assert_eq!(lb.dp.stats().expect("stats").verdict(reason::DROP_NO_BACKEND), 2);
}

#[test]
fn every_backend_down_fails_open_and_keep_leaves_flows_where_they_are() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ports: Vec<u16> = (46000..46200).step_by(2).collect();
    let before: Vec<String> = ports.iter().map(|&p| lb.backend_of(&lb.run(&syn(p)).1)).collect();
    // Both marked down (a broken probe route marks every backend vip-misconfigured, say): by
    // default the listener fails open. New flows still spread over both, established ones stay.
    lb.set_down("b1", true);
    lb.set_down("b2", true);
    assert!(lb.desired.listeners.iter().all(|l| l.fail_open), "the listeners do not say they fail open");
    for (p, b) in ports.iter().zip(&before) {
        let (action, out) = lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build());
        assert_eq!((action, &lb.backend_of(&out)), (XDP_TX, b), "port {p}: failing open moved or dropped an established flow");
    }
    let spread: BTreeSet<String> = (47000..47100).step_by(2).map(|p| lb.backend_of(&lb.run(&syn(p)).1)).collect();
    assert_eq!(spread.len(), 2, "new flows did not go to both backends while failing open");
    // One comes back: it takes every new flow; the other is out, its flows reset (re-picked).
    lb.set_down("b2", false);
    assert!(lb.desired.listeners.iter().all(|l| !l.fail_open));
    for p in (48000..48100).step_by(2) {
        assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), "b2");
    }
    // With on_down = "keep", a down backend leaves the ring but keeps its flows.
    let on_b1: Vec<u16> = ports.iter().zip(&before).filter(|(_, b)| *b == "b1").map(|(p, _)| *p).collect();
    assert!(!on_b1.is_empty());
    for l in &lb.config.listeners {
        lb.down.insert((l.name.clone(), "b1".to_owned()), lb_userspace::plan::Out { reset: false });
    }
    lb.apply();
    for p in &on_b1 {
        assert_eq!(lb.backend_of(&lb.run(&Ipv4Frame::tcp(CLIENT, *p, VIP, 1883, TCP_ACK).build()).1), "b1", "port {p}: a kept flow moved");
    }
    for p in (49000..49100).step_by(2) {
        assert_eq!(lb.backend_of(&lb.run(&syn(p)).1), "b2", "a new flow went to a backend marked down");
    }
}

#[test]
fn ring_switch_writes_only_changed_slots() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    // Down and up again: the standby copy of each listener already holds the older ring, so
    // the second switch writes only slots that differ from it.
    lb.set_down("b2", true);
    let before = lb.desired.clone();
    lb.set_down("b2", false);
    let report = lb.dp.apply(&before).expect("re-apply the down state");
    assert_eq!(report.ring_slots_written, 0, "the standby copies already hold this ring: {report:?}");
    assert_eq!(report.listeners_switched, 2);
}

#[test]
fn client_close_marks_the_flow_and_a_reused_tuple_starts_fresh() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ports: Vec<u16> = (42000..42400).step_by(2).collect();
    for &p in &ports {
        assert_eq!(lb.run(&syn(p)).0, XDP_TX);
    }
    let live = |lb: &Lb| live_flows(lb);
    assert_eq!(live(&lb), ports.len());
    // A backend joins: the ring moves some tuples, established flows stay where they are.
    lb.set_backends(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]);
    let moved: Vec<u16> = ports.iter().copied().filter(|&p| lb.ring_choice(0, CLIENT, p, 1883) == "b3").collect();
    assert!(moved.len() > 20, "only {} tuples moved to b3", moved.len());
    for &p in &moved {
        let (_, out) = lb.run(&syn(p));
        assert_ne!(lb.backend_of(&out), "b3", "port {p}: a SYN retransmit on a live flow must keep its backend");
    }
    // The client closes these flows (FIN, or RST for a few); they stop counting as live but
    // still steer the rest of the close.
    for (i, &p) in moved.iter().enumerate() {
        let flags = if i % 4 == 0 { 0x04 } else { 0x11 };
        let (_, out) = lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 1883, flags).build());
        assert_ne!(lb.backend_of(&out), "b3", "port {p}: the FIN goes where the flow was");
        let f = lb.dp.flow(CLIENT, p, VIP, 1883).expect("entry kept");
        assert!(f.closing(), "the client's FIN or RST marks the flow closing");
        let (_, out) = lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 1883, TCP_ACK).build());
        assert_ne!(lb.backend_of(&out), "b3", "port {p}: the last ACK goes where the flow was");
    }
    assert_eq!(live(&lb), ports.len() - moved.len(), "closing flows are not live");
    // A SYN soon after the close (a spoofed RST or FIN, then a spoofed SYN; or a client that
    // reuses its tuple at once) goes where the flow was: a close alone never moves a session.
    for &p in &moved {
        let (_, out) = lb.run(&syn(p));
        assert_ne!(lb.backend_of(&out), "b3", "port {p}: a SYN right after a close moved the flow");
        assert!(lb.dp.flow(CLIENT, p, VIP, 1883).expect("kept").closing(), "port {p}: the early SYN reopened the flow");
    }
    // A new connection reusing a tuple closed a TIME_WAIT ago follows the current ring.
    lb.pass_time(lb_common::FLOW_REOPEN_UNITS);
    for &p in &moved {
        let (_, out) = lb.run(&syn(p));
        assert_eq!(lb.backend_of(&out), "b3", "port {p}: a reused tuple must start from the ring");
    }
    assert_eq!(live(&lb), ports.len());
}

#[test]
fn removing_a_listener_stops_its_established_flows() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100)]);
    let tls = Ipv4Frame::tcp(CLIENT, 43000, VIP, 8883, TCP_SYN).build();
    assert_eq!(lb.run(&tls).0, XDP_TX);
    assert_eq!(lb.run(&syn(43000)).0, XDP_TX);
    // Drop the 8883 listener from the config: its flow entries go with it.
    lb.config.listeners.retain(|l| l.name != "mqtts");
    lb.apply();
    let (action, _) = lb.run(&Ipv4Frame::tcp(CLIENT, 43000, VIP, 8883, TCP_ACK).build());
    assert_eq!(action, XDP_PASS, "an established flow of a removed listener is still forwarded");
    assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, 43000, VIP, 1883, TCP_ACK).build()).0, XDP_TX, "the other listener is untouched");
}

#[test]
fn flow_cache_serves_established_frames_revalidates_and_follows_every_change() {
    require_root!();
    // The cache is per CPU: stay on one.
    pin_to_cpu(0);
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let ack = |dport: u16| Ipv4Frame::tcp(CLIENT, 44000, VIP, dport, TCP_ACK).build();
    let new_flows = |lb: &Lb| lb.dp.stats().expect("stats").total().new_flows;
    let first = lb.backend_of(&lb.run(&syn(44000)).1);
    // The session's next segment comes a keepalive later (its flow confirms then).
    lb.pass_time_for(CLIENT, 44000, 1883, lb_common::FLOW_CONFIRM_UNITS);
    // A cache entry serves only within the table clock's unit it was filled in (1.07 s): start
    // at the beginning of one, so what follows runs well within it.
    lb.fresh_clock_unit();
    // The first established frame reads FLOWS, confirms the flow and fills this CPU's cache slot.
    assert_eq!(lb.backend_of(&lb.run(&ack(1883)).1), first);
    assert!(lb.dp.flow(CLIENT, 44000, VIP, 1883).expect("held").confirmed());

    // Remove the flow behind the cache's back, as a replacement in the table would: the cache
    // alone serves the flow (no miss, so no new flow), for exactly FLOW_CACHE_REVALIDATE frames ...
    lb.dp.evict_flow(CLIENT, 44000, VIP, 1883).expect("evict");
    let nf = new_flows(&lb);
    for i in 0..FLOW_CACHE_REVALIDATE {
        let (action, out) = lb.run(&ack(1883));
        assert_eq!((action, lb.backend_of(&out)), (XDP_TX, first.clone()), "cached frame {i}");
    }
    assert_eq!(new_flows(&lb), nf, "cache hits never consult FLOWS");
    assert!(lb.dp.flow(CLIENT, 44000, VIP, 1883).is_none());
    // ... then the next frame goes through FLOWS again: the miss re-inserts the flow.
    assert_eq!(lb.backend_of(&lb.run(&ack(1883)).1), first);
    assert_eq!(new_flows(&lb), nf + 1, "the revalidating frame missed FLOWS and re-inserted the flow");
    assert!(lb.dp.flow(CLIENT, 44000, VIP, 1883).is_some());

    // A real changing (its MAC here) invalidates every cached entry at once.
    lb.pass_time_for(CLIENT, 44000, 1883, lb_common::FLOW_CONFIRM_UNITS);
    lb.fresh_clock_unit();
    assert_eq!(lb.backend_of(&lb.run(&ack(1883)).1), first, "confirms the re-inserted flow and refills the cache");
    let cached = |lb: &Lb| lb.dp.cached_flow(CLIENT, 44000, VIP, 1883).expect("cache").len();
    assert_eq!(cached(&lb), 1, "one CPU has the flow cached");
    lb.runtime.get_mut(&first).expect("runtime").mac = Some(mac_of(0x77));
    lb.apply();
    assert_eq!(cached(&lb), 0, "a new generation leaves no valid cache entry");
    assert_eq!(lb.run(&ack(1883)).1[..6], mac_of(0x77), "a cached entry kept the old MAC");
    lb.runtime.get_mut(&first).expect("runtime").mac = Some(mac_of(if first == "b1" { 11 } else { 12 }));
    lb.apply();

    // So does the real going down: the cached flow is re-picked at once.
    assert_eq!(lb.backend_of(&lb.run(&ack(1883)).1), first);
    lb.set_down(&first, true);
    assert_ne!(lb.backend_of(&lb.run(&ack(1883)).1), first, "a cached flow stayed on a down backend");
    lb.set_down(&first, false);

    // And a listener that moves to another VIP (same id, same port, same reals): its flows are
    // purged, and a cached one must not be forwarded any more.
    assert_eq!(lb.run(&ack(8883)).0, XDP_TX);
    lb.pass_time_for(CLIENT, 44000, 8883, lb_common::FLOW_CONFIRM_UNITS);
    lb.fresh_clock_unit();
    assert_eq!(lb.run(&ack(8883)).0, XDP_TX, "confirmed");
    assert_eq!(lb.dp.cached_flow(CLIENT, 44000, VIP, 8883).expect("cache").len(), 1, "cached");
    lb.config.listeners.iter_mut().find(|l| l.name == "mqtts").expect("mqtts").vip = Ipv4Addr::new(192, 0, 2, 101).into();
    lb.apply();
    assert_eq!(lb.run(&ack(8883)).0, XDP_PASS, "a cached flow of a moved listener was still forwarded");
}

#[test]
fn flow_table_holds_its_size_in_flows() {
    require_root!();
    // 8,192 flows in a table sized for them: two-choice buckets at half load keep every one
    // (one choice per flow would lose about 300 of them).
    let mut lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)]), 8192);
    assert_eq!(lb.dp.flow_table_buckets(), 4096);
    lb.bench_flows(0);
    let before = lb.dp.stats().expect("stats").total().new_flows;
    assert_eq!(new_flows(&lb, 8192), XDP_TX);
    assert_eq!(lb.dp.stats().expect("stats").total().new_flows - before, 8192, "every run was a new flow");
    let mut kept = 0;
    for n in 0..8192u32 {
        let (src, sport) = bench_tuple(n);
        if let Some(f) = lb.dp.flow(src, sport, VIP, 1883) {
            kept += 1;
            let backend = lb.ids.backends.iter().find(|(_, id)| **id == lb_common::real_backend(f.real())).expect("known").0;
            assert_eq!(*backend, lb.ring_choice(0, src, sport, 1883), "flow {src}:{sport} recorded another backend than its ring slot");
        }
    }
    // At this load losing more than a couple has a chance below one in ten thousand.
    assert!(kept >= 8188, "only {kept} of 8192 flows kept");
    assert_eq!(lb.dp.flow_count(), kept, "no slot holds anything else");
}

#[test]
fn flow_table_replaces_the_least_recently_recorded_of_eight_unconfirmed_flows_closing_first() {
    require_root!();
    pin_to_cpu(0);
    // 32 buckets: one tuple in 256 shares a given pair of them.
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 64);
    // Eleven tuples whose two buckets are the same two: eight fill them, more must replace.
    let candidates = (0..100_000u32).map(|n| (Ipv4Addr::from(0x0a00_0000 + (n >> 8)), 1024 + 2 * (n & 0xff) as u16));
    let first = candidates.clone().next().expect("one");
    let home = lb.dp.flow_buckets(first.0, first.1, VIP, 1883);
    let same: Vec<(Ipv4Addr, u16)> = candidates.filter(|&(a, p)| lb.dp.flow_buckets(a, p, VIP, 1883) == home).take(11).collect();
    assert_eq!(same.len(), 11, "not enough tuples share two buckets");
    let send = |(a, p): (Ipv4Addr, u16), flags: u8| assert_eq!(lb.run(&Ipv4Frame::tcp(a, p, VIP, 1883, flags).build()).0, XDP_TX);
    let present = |t: &[(Ipv4Addr, u16)]| t.iter().map(|&(a, p)| lb.dp.flow(a, p, VIP, 1883).is_some()).collect::<Vec<_>>();
    // Eight connections opened one after the other (a unit apart): the first is the oldest.
    // Their handshakes' ACKs come at once, which confirms nothing.
    for (i, &t) in same[..8].iter().enumerate() {
        send(t, TCP_SYN);
        send(t, TCP_ACK);
        lb.pass_time_for(t.0, t.1, 1883, 8 - u32::try_from(i).expect("few"));
    }
    assert_eq!(present(&same[..8]), vec![true; 8]);
    assert!(lb.dp.flows().iter().all(|f| !f.confirmed()), "a handshake's ACK confirmed a flow");
    send(same[8], TCP_SYN);
    assert_eq!(present(&same[..9]), [vec![false], vec![true; 8]].concat(), "the least recently recorded flow went");
    // A closing flow goes before any open one, however recent.
    send(same[4], TCP_ACK | 0x01);
    assert!(lb.dp.flow(same[4].0, same[4].1, VIP, 1883).expect("kept while closing").closing());
    send(same[9], TCP_SYN);
    let want: Vec<bool> = (0..10).map(|i| i != 0 && i != 4).collect();
    assert_eq!(present(&same[..10]), want, "the closing flow went first");
    // A confirmed flow is never replaced: with all eight confirmed, a newcomer is refused.
    lb.pass_time(lb_common::FLOW_CONFIRM_UNITS);
    for (i, &t) in same[..10].iter().enumerate() {
        if want[i] {
            send(t, TCP_ACK);
        }
    }
    assert_eq!(lb.dp.flows().iter().filter(|f| f.confirmed()).count(), 8);
    send(same[10], TCP_SYN);
    assert_eq!(present(&same), [want, vec![false]].concat(), "a new connection displaced a confirmed session");
}

#[test]
fn flow_table_slots_stay_whole_under_writers_on_two_cpus() {
    require_root!();
    // Two buckets (eight slots) and new flows on both CPUs at once: every insert replaces a
    // slot, and the writers race for the same ones. Meanwhile a reader walks the table the way
    // the program reads it: every slot it sees must be one whole flow, its addresses, ports and
    // real written together. (A race that tears a slot is a matter of nanoseconds, so this
    // catches a writer that publishes carelessly, not every one; the BUSY test below checks
    // the states the protocol relies on one by one.)
    let backends: Vec<(String, u8)> = (1..=8).map(|i| (format!("b{i}"), 10 + i)).collect();
    let spec: Vec<(&str, u8, u32)> = backends.iter().map(|(n, m)| (n.as_str(), *m, 100)).collect();
    let mut lb = Lb::with_table(Lb::config(&spec), 4);
    assert_eq!(lb.dp.flow_table_buckets(), 2);
    lb.bench_flows(0);
    let (calls, runs) = (20, 50_000);
    let before = lb.dp.stats().expect("stats").verdict(reason::TX);
    let writing = std::sync::atomic::AtomicUsize::new(2);
    let check = |lb: &Lb| {
        let flows = lb.dp.flows();
        for f in &flows {
            let (src, sport) = (Ipv4Addr::from(u32::from_be(f.key.src_be)), u16::from_be(f.key.sport_be));
            assert_eq!((f.key.dst_be, f.key.dport_be), (u32::from_ne_bytes(VIP.octets()), 1883u16.to_be()), "slot of {src}:{sport}");
            let n = ((u32::from(src) - 0x0b00_0000) << 14) | ((u32::from(sport) - 1024) / 2);
            assert_eq!(bench_tuple(n), (src, sport), "a tuple no run sent: {src}:{sport}");
            let backend = lb.ids.backends.iter().find(|(_, id)| **id == lb_common::real_backend(f.real())).expect("known").0;
            assert_eq!(*backend, lb.ring_choice(0, src, sport, 1883), "slot of {src}:{sport} holds another flow's real");
        }
        flows.len()
    };
    let mut walks = 0;
    std::thread::scope(|s| {
        for cpu in 0..2 {
            let (lb, writing) = (&lb, &writing);
            s.spawn(move || {
                pin_to_cpu(cpu);
                for _ in 0..calls {
                    assert_eq!(new_flows(lb, runs), XDP_TX);
                }
                writing.fetch_sub(1, std::sync::atomic::Ordering::Release);
            });
        }
        while writing.load(std::sync::atomic::Ordering::Acquire) > 0 {
            check(&lb);
            walks += 1;
        }
    });
    assert_eq!(lb.dp.stats().expect("stats").verdict(reason::TX) - before, 2 * u64::from(calls * runs));
    assert_eq!(check(&lb), 8, "a full table");
    assert!(walks > 100, "the reader walked the table only {walks} times while the writers ran");
}

#[test]
fn flow_table_passes_over_slots_a_writer_holds() {
    require_root!();
    // What a reader and a writer meet while another CPU fills a slot: its state word is
    // FLOW_S_BUSY, its addresses may be anything. Neither may use it.
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 4);
    let table = lb.dp.flow_table();
    let busy = u64::from(lb_common::FLOW_S_BUSY) << 32;
    let slots = |t: &lb_userspace::flow_table::FlowTable| (0..2).flat_map(|b| (0..4).map(move |w| t.raw(b, w))).collect::<Vec<_>>();
    let new_flows = |lb: &Lb| lb.dp.stats().expect("stats").total().new_flows;
    assert_eq!(lb.run(&syn(45000)).0, XDP_TX);
    let (addrs, meta) =
        (0..2).flat_map(|b| (0..4).map(move |w| (b, w))).map(|(b, w)| table.raw(b, w)).find(|&(_, m)| m != 0).expect("the flow's slot");
    let at = (0..2).flat_map(|b| (0..4).map(move |w| (b, w))).find(|&(b, w)| table.raw(b, w) == (addrs, meta)).expect("slot");
    // The flow's own slot, held by a writer with the flow's addresses still in it: a lookup
    // must not take it (the flow counts as a miss and is inserted again elsewhere).
    table.set_raw(at.0, at.1, addrs, busy | (meta & 0xffff_ffff));
    let nf = new_flows(&lb);
    assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, 45000, VIP, 1883, TCP_ACK).build()).0, XDP_TX);
    assert_eq!(new_flows(&lb), nf + 1, "a held slot was taken for the flow");
    assert_eq!(table.raw(at.0, at.1), (addrs, busy | (meta & 0xffff_ffff)), "a held slot was written");
    assert!(lb.dp.flow(CLIENT, 45000, VIP, 1883).is_some(), "the flow went into another slot");
    // Every slot held: a new flow is forwarded and nothing is written.
    for b in 0..2 {
        for w in 0..4 {
            table.set_raw(b, w, addrs, busy);
        }
    }
    let before = slots(table);
    assert_eq!(lb.run(&syn(45002)).0, XDP_TX, "forwarded by the ring");
    assert_eq!(slots(table), before, "an insert took a held slot");
    assert_eq!(lb.dp.flow_count(), 0);
}

#[test]
fn a_reused_backend_id_starts_with_no_flows_and_zero_counters() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    for p in (50000..50200).step_by(2) {
        assert_eq!(lb.run(&syn(p)).0, XDP_TX);
    }
    let b1 = lb.ids.backends["b1"];
    let on = |lb: &Lb, id: u32| lb.dp.flows().iter().filter(|f| lb_common::real_backend(f.real()) == id).count();
    assert!(on(&lb, b1) > 20);
    // b1 leaves and b3 arrives in the same reload: b3 does not take b1's id.
    lb.set_backends(&[("b2", 12, 100), ("b3", 13, 100)]);
    assert_ne!(lb.ids.backends["b3"], b1, "an id freed by this reload was given out by it");
    // When an id is given again (here: by hand, as when every other id is taken), nothing of its
    // last holder stays: its flows are deleted and its counters start from zero.
    let stats = lb.dp.stats().expect("stats");
    assert!(stats.reals.iter().any(|(r, c)| lb_common::real_backend(*r) == lb.ids.backends["b2"] && c.packets > 0));
    let b2 = lb.ids.backends["b2"];
    lb.desired.fresh_backends.insert(b2);
    let report = lb.dp.apply(&lb.desired).expect("apply");
    assert!(report.flows_purged > 0, "{report:?}");
    assert_eq!(on(&lb, b2), 0, "flows of the id's last holder remain");
    let stats = lb.dp.stats().expect("stats");
    assert!(
        stats.reals.iter().filter(|(r, _)| lb_common::real_backend(**r) == b2).all(|(_, c)| *c == lb_common::Counters::default()),
        "{stats:?}"
    );
}

#[test]
fn the_controller_state_is_kept_in_the_maps() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100)]);
    assert!(lb.dp.load_control().is_none(), "a new map holds a state");
    lb.dp.save_control(b"{\"first\":1}").expect("save");
    assert_eq!(lb.dp.load_control().as_deref(), Some(&b"{\"first\":1}"[..]));
    lb.dp.save_control(b"{\"second\":2}").expect("save");
    assert_eq!(lb.dp.load_control().as_deref(), Some(&b"{\"second\":2}"[..]), "the newest state wins");
    let big = vec![b'x'; lb_common::CONTROL_STATE_BYTES + 1];
    assert!(lb.dp.save_control(&big).is_err(), "a state larger than the map was accepted");
    assert_eq!(lb.dp.load_control().as_deref(), Some(&b"{\"second\":2}"[..]), "a refused save changed the state");
}
