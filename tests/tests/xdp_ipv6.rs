//! Packet fixtures for the IPv6 data plane, pushed through the loaded XDP program with
//! `BPF_PROG_TEST_RUN`: verdicts and their counters, the DSR rewrite, the flow table's IPv6
//! entries, the ring hashes (4-tuple and source, with and without `source_prefix = 64`),
//! ICMPv6 "packet too big", truncated frames, and the config rules for IPv6 listeners.
//!
//! The balancer has IPv6 listeners on `[2001:db8::100]:1883` (4-tuple hash) and `:8883`
//! (`hash = "source"`) over three backends, two dual-stack and one IPv6-only, and an IPv4
//! listener on `192.0.2.100:1883` over the two dual-stack ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
};

use lb_common::{FlowAddrs6, Ip6, flow_hash6, is_key6, real_backend, reason, ring_slot, source_hash6};
use lb_userspace::{
    config::{self, LoadError},
    dataplane::addr6,
};
use tests::{
    fixture::{CLIENT, Case, Lb, RING, VIP, XDP_ABORTED, XDP_PASS, XDP_TX, mac_of},
    frame::{ExtHeader, Fragment6, IPV6_DSTOPTS, IPV6_HOPOPTS, IPV6_ROUTING, Ipv4Frame, Ipv6Frame, L4v6, TCP_ACK, TCP_SYN},
    require_root,
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

/// The fixture config; `prefix64` adds `source_prefix = 64` to the source-hash listener.
fn config_text(prefix64: bool) -> String {
    let mut text = format!(
        "interface = \"veth0\"\nring_size = {RING}\n\
         [[listener]]\nname = \"mqtt6\"\nvip = \"{VIP6}\"\nport = 1883\n\
         [[listener]]\nname = \"mqtts6\"\nvip = \"{VIP6}\"\nport = 8883\nhash = \"source\"\n{}\
         [[listener]]\nname = \"mqtt4\"\nvip = \"{VIP}\"\nport = 1883\nbackends = [\"b1\", \"b2\"]\n",
        if prefix64 { "source_prefix = 64\n" } else { "" }
    );
    for n in [11u8, 12] {
        let _ = write!(
            text,
            "[[backend]]\nname = \"b{}\"\naddress = \"192.0.2.{n}\"\naddress6 = \"2001:db8::{n}\"\nmac = \"{}\"\n",
            n - 10,
            config::format_mac(mac_of(n))
        );
    }
    let _ = write!(text, "[[backend]]\nname = \"b3\"\naddress = \"2001:db8::13\"\nmac = \"{}\"\n", config::format_mac(mac_of(13)));
    text
}

fn lb6(prefix64: bool) -> Lb {
    let lb = Lb::with_config(Lb::parse(&config_text(prefix64)));
    let b3 = lb.config.backend("b3").expect("b3");
    assert_eq!((b3.address, b3.address6), (None, Some("2001:db8::13".parse().unwrap())), "an IPv6 address given as `address`");
    lb
}

/// Wire values as the program loads them into native integers.
fn wire16(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

/// What the ring of IPv6 listener `name` says for a client tuple (the controller's own view).
fn ring6(lb: &Lb, name: &str, src: Ipv6Addr, sport: u16) -> String {
    let id = lb.ids.listeners[name];
    let l = lb.desired.listeners.iter().find(|l| l.id == id).expect("the listener is planned");
    let IpAddr::V6(vip) = l.vip else { panic!("{name} is not an IPv6 listener") };
    let h = if l.hash_source {
        source_hash6(&addr6(&src), l.source_prefix64)
    } else {
        flow_hash6(&addr6(&src), &addr6(&vip), wire16(sport), wire16(l.port))
    };
    lb.backend_name(l.ring[ring_slot(h, RING) as usize])
}

fn syn6(src: Ipv6Addr, sport: u16) -> Ipv6Frame {
    Ipv6Frame::tcp(src, sport, VIP6, 1883, TCP_SYN)
}

fn verdicts(lb: &Lb) -> Vec<u64> {
    lb.dp.stats().expect("stats").verdicts
}

/// Runs `input` as a row of its own ([`Lb::check_case`]): the action, exactly the counter of
/// `why` moving, and the DSR rewrite for forwarded frames; the output frame.
fn run_expect(lb: &Lb, input: &[u8], action: u32, why: u32, what: &str) -> Vec<u8> {
    lb.check_case(&Case::new(what, input.to_vec(), action, why))
}

const fn ext(kind: u8, len: u8) -> ExtHeader {
    ExtHeader { kind, len }
}

/// The rows of [`verdict_table`].
fn cases() -> Vec<Case> {
    let with_ext = |sport: u16, chain: &[ExtHeader]| {
        let mut f = syn6(CLIENT6, sport);
        f.ext = chain.to_vec();
        f.build()
    };
    let mut dot1q = syn6(CLIENT6, 40002);
    dot1q.vlan = Some((0x8100, 0x0064));
    let mut qinq = syn6(CLIENT6, 40004);
    qinq.vlan = Some((0x88a8, 0x0fff));
    let four = [ext(IPV6_HOPOPTS, 0), ext(IPV6_DSTOPTS, 1), ext(IPV6_ROUTING, 2), ext(IPV6_DSTOPTS, 0)];
    let five = [four.as_slice(), &[ext(IPV6_DSTOPTS, 0)]].concat();
    let mut first_frag = syn6(CLIENT6, 40020);
    first_frag.frag = Some(Fragment6 { offset: 0, more: true });
    first_frag.payload = vec![0x55; 64];
    let mut later_frag = first_frag.clone();
    later_frag.frag = Some(Fragment6 { offset: 11, more: false });
    let mut ext_frag = first_frag.clone();
    ext_frag.ext = vec![ext(IPV6_HOPOPTS, 0)];
    let mut frag_elsewhere = first_frag.clone();
    frag_elsewhere.dst = OTHER6;
    // A UDP fragment to the VIP6 passes, as IPv4 drops only TCP fragments; an atomic fragment
    // (offset 0, no more) is a whole segment and is balanced.
    let mut udp_frag = Ipv6Frame::udp(CLIENT6, 40022, VIP6, 1883);
    udp_frag.frag = Some(Fragment6 { offset: 0, more: true });
    let mut atomic = syn6(CLIENT6, 40024);
    atomic.frag = Some(Fragment6 { offset: 0, more: false });
    let mut multicast_mac = syn6(CLIENT6, 40030);
    multicast_mac.dst_mac = [0x33, 0x33, 0, 0, 0, 1];
    let mut version4 = syn6(CLIENT6, 40032).build();
    version4[14] = 0x40 | (version4[14] & 0x0f);
    let client_ll: Ipv6Addr = "fe80::1".parse().unwrap();
    let ns = Ipv6Frame::neighbor_solicit(client_ll, VIP6);
    assert_eq!(ns.dst, "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap(), "solicited-node address of the VIP");
    assert_eq!(ns.dst_mac, [0x33, 0x33, 0xff, 0x00, 0x01, 0x00], "its multicast MAC");
    let na = Ipv6Frame::neighbor_advert("2001:db8::1".parse().unwrap(), VIP6, [0x02, 0, 0, 0, 0, 0x99]);
    let broker_seg = Ipv6Frame::tcp(VIP6, 1883, CLIENT6, 40040, TCP_ACK);
    let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg, 1280, 20);

    vec![
        Case::tx("SYN to [VIP6]:1883", syn6(CLIENT6, 40000).build()),
        Case::tx("ACK to [VIP6]:1883", Ipv6Frame::tcp(CLIENT6, 40001, VIP6, 1883, TCP_ACK).build()),
        Case::tx("SYN to [VIP6]:8883", Ipv6Frame::tcp(CLIENT6, 40003, VIP6, 8883, TCP_SYN).build()),
        Case::tx("802.1Q tagged SYN", dot1q.build()),
        Case::tx("802.1ad tagged SYN", qinq.build()),
        Case::tx("hop-by-hop before TCP", with_ext(40006, &[ext(IPV6_HOPOPTS, 0)])),
        Case::tx("routing header before TCP", with_ext(40008, &[ext(IPV6_ROUTING, 2)])),
        Case::tx("destination options before TCP", with_ext(40010, &[ext(IPV6_DSTOPTS, 3)])),
        Case::tx("a chain of 4 extension headers", with_ext(40012, &four)),
        Case::pass("a chain of 5 extension headers", with_ext(40014, &five), reason::PASS_NOT_TCP),
        Case::drop("first fragment to VIP6", first_frag.build(), reason::DROP_FRAGMENT),
        Case::drop("later fragment to VIP6", later_frag.build(), reason::DROP_FRAGMENT),
        Case::drop("fragment after hop-by-hop to VIP6", ext_frag.build(), reason::DROP_FRAGMENT),
        Case::pass("fragment to another address", frag_elsewhere.build(), reason::PASS_NO_LISTENER),
        Case::pass("UDP fragment to VIP6", udp_frag.build(), reason::PASS_NOT_TCP),
        Case::tx("atomic fragment (a whole SYN) to VIP6", atomic.build()),
        Case::pass("SYN to [VIP6]:80", Ipv6Frame::tcp(CLIENT6, 40022, VIP6, 80, TCP_SYN).build(), reason::PASS_NO_LISTENER),
        Case::pass(
            "SYN to another IPv6 address on 1883",
            Ipv6Frame::tcp(CLIENT6, 40024, OTHER6, 1883, TCP_SYN).build(),
            reason::PASS_NO_LISTENER,
        ),
        Case::pass("UDP to [VIP6]:1883", Ipv6Frame::udp(CLIENT6, 40026, VIP6, 1883).build(), reason::PASS_NOT_TCP),
        Case::pass("neighbour solicitation for VIP6", ns.build(), reason::PASS_NOT_TCP),
        Case::pass("neighbour advertisement", na.build(), reason::PASS_NOT_TCP),
        Case::pass("ICMPv6 echo to VIP6", Ipv6Frame::echo_request(CLIENT6, VIP6).build(), reason::PASS_NOT_TCP),
        Case::pass("SYN to VIP6 to a multicast MAC", multicast_mac.build(), reason::PASS_NOT_OUR_MAC),
        Case::pass("version nibble 4 under EtherType IPv6", version4, reason::PASS_MALFORMED).malformed(),
        Case::tx("packet too big about a listener's flow", ptb.build()).counted(reason::TX_ICMP_TOO_BIG),
        Case::tx("IPv4 SYN to VIP:1883 beside them", Ipv4Frame::tcp(CLIENT, 40050, VIP, 1883, TCP_SYN).build()),
    ]
}

#[test]
fn verdict_table() {
    require_root!();
    lb6(false).check_table(&cases());
}

#[test]
fn forwarded_frames_change_only_the_macs_and_follow_the_ring() {
    require_root!();
    let lb = lb6(false);
    let chains: [&[ExtHeader]; 4] = [&[], &[ext(IPV6_HOPOPTS, 0)], &[ext(IPV6_ROUTING, 4), ext(IPV6_DSTOPTS, 0)], &[ext(IPV6_DSTOPTS, 2)]];
    let mut seen = BTreeSet::new();
    for i in 0..120u16 {
        let client = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 1, 0, 0, 0, i);
        let sport = 33000 + 2 * i;
        let mut f = syn6(client, sport);
        f.ext = chains[usize::from(i % 4)].to_vec();
        if i % 3 == 0 {
            f.vlan = Some((0x8100, 42));
        }
        f.payload = vec![0xab; usize::from(i % 7)];
        let input = f.build();
        let what = format!("SYN [{client}]:{sport} (chain of {}, vlan {:?})", f.ext.len(), f.vlan);
        let out = run_expect(&lb, &input, XDP_TX, reason::TX, &what);
        let got = lb.backend_of(&out);
        assert_eq!(got, ring6(&lb, "mqtt6", client, sport), "{what}: the program and the controller disagree on the ring pick");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3, "120 flows did not reach all three backends: {seen:?}");
}

#[test]
fn flows_are_recorded_with_their_addresses_and_stick() {
    require_root!();
    let mut lb = lb6(false);
    let sport = 41000;
    let (action, out) = lb.run(&syn6(CLIENT6, sport).build());
    assert_eq!(action, XDP_TX, "SYN");
    let first = lb.backend_of(&out);
    assert_eq!(first, ring6(&lb, "mqtt6", CLIENT6, sport), "a new flow follows the ring");

    let flow = lb.dp.flow(CLIENT6, sport, VIP6, 1883).expect("the SYN recorded the IPv6 flow");
    assert_eq!(
        flow.addrs6,
        Some(FlowAddrs6 { src: Ip6 { octets: CLIENT6.octets() }, dst: Ip6 { octets: VIP6.octets() } }),
        "the flow's addresses (FLOW_ADDRS6)"
    );
    assert!(is_key6(&flow.key), "an IPv6 flow's key carries the IPv6 mark: {:?}", flow.key);
    assert_eq!(real_backend(flow.real()), lb.ids.backends[&first], "the flow table records the backend the SYN went to");
    let neighbour = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
    assert!(lb.dp.flow(neighbour, sport, VIP6, 1883).is_none(), "another client with the same ports has no flow");
    assert!(lb.dp.flow(CLIENT6, sport, OTHER6, 1883).is_none(), "the same client to another address has no flow");

    let ack = Ipv6Frame::tcp(CLIENT6, sport, VIP6, 1883, TCP_ACK).build();
    let mut data = Ipv6Frame::tcp(CLIENT6, sport, VIP6, 1883, TCP_ACK | 0x08);
    data.payload = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".to_vec();
    let data = data.build();
    for (i, f) in [&ack, &data, &data, &ack, &data].into_iter().enumerate() {
        let (action, out) = lb.run(f);
        assert_eq!((action, lb.backend_of(&out)), (XDP_TX, first.clone()), "segment {i} after the SYN changed backend");
    }

    // An IPv4 flow with the same ports on the IPv4 listener of the same port: its own hash, its
    // own entry, and the IPv6 one stays.
    let v4 = Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_SYN).build();
    let (action, out) = lb.run(&v4);
    assert_eq!(action, XDP_TX, "IPv4 SYN");
    let first4 = lb.backend_of(&out);
    assert_eq!(first4, lb.ring_choice(lb.listener_index("mqtt4"), CLIENT, sport, 1883), "the IPv4 flow goes by the IPv4 ring and hash");
    let flow4 = lb.dp.flow(CLIENT, sport, VIP, 1883).expect("the IPv4 flow is recorded");
    assert!(flow4.addrs6.is_none() && !is_key6(&flow4.key), "an IPv4 flow is not an IPv6 one: {flow4:?}");
    assert_eq!(real_backend(flow4.real()), lb.ids.backends[&first4]);
    assert_eq!(lb.dp.flow(CLIENT6, sport, VIP6, 1883).expect("the IPv6 flow is still there").real(), flow.real());
    assert_eq!(lb.backend_of(&lb.run(&ack).1), first, "the IPv6 flow after the IPv4 one");

    // Its backend goes down: new flows avoid it, the flow is re-picked and stays where it went.
    lb.set_down(&first, true);
    for p in (42000..42060).step_by(2) {
        let (action, out) = lb.run(&syn6(CLIENT6, p).build());
        assert_eq!(action, XDP_TX, "new SYN from port {p}");
        let got = lb.backend_of(&out);
        assert_ne!(got, first, "port {p}: a new flow went to the down backend");
        assert_eq!(got, ring6(&lb, "mqtt6", CLIENT6, p), "port {p}: new flows follow the new ring");
    }
    let (action, out) = lb.run(&ack);
    assert_eq!(action, XDP_TX, "ACK after the backend went down");
    let moved = lb.backend_of(&out);
    assert_ne!(moved, first, "the flow stayed on its down backend");
    let flow = lb.dp.flow(CLIENT6, sport, VIP6, 1883).expect("the re-picked flow is in the table");
    assert_eq!(real_backend(flow.real()), lb.ids.backends[&moved], "the table records the re-pick");
    assert_eq!(flow.addrs6, Some(FlowAddrs6 { src: Ip6 { octets: CLIENT6.octets() }, dst: Ip6 { octets: VIP6.octets() } }));
    for _ in 0..3 {
        assert_eq!(lb.backend_of(&lb.run(&data).1), moved, "the re-picked flow moved again");
    }
    // The IPv4 flow: re-picked only if it was on the same backend.
    let got4 = lb.backend_of(&lb.run(&Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_ACK).build()).1);
    if first4 == first {
        assert_ne!(got4, first, "the IPv4 flow stayed on its down backend");
    } else {
        assert_eq!(got4, first4, "the IPv4 flow on a healthy backend moved");
    }
}

#[test]
fn new_flows_spread_over_every_backend() {
    require_root!();
    let lb = lb6(false);
    let mut seen = BTreeMap::<String, usize>::new();
    for i in 0..300u16 {
        let client = Ipv6Addr::new(0x2001, 0xdb8, 0xc0 + (i % 5), 0, 0x1234, 0, i / 7, i);
        let sport = 20000 + 2 * i;
        let (action, out) = lb.run(&syn6(client, sport).build());
        assert_eq!(action, XDP_TX, "SYN from [{client}]:{sport}");
        let got = lb.backend_of(&out);
        assert_eq!(got, ring6(&lb, "mqtt6", client, sport), "[{client}]:{sport}: ring pick");
        *seen.entry(got).or_default() += 1;
    }
    for name in BACKENDS {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!(n >= 60, "{name} got {n} of 300 IPv6 flows (under 20%): {seen:?}");
    }
    let s = lb.dp.stats().expect("stats");
    assert_eq!(s.total().new_flows, 300, "one new flow per IPv6 4-tuple");
    assert_eq!(s.listener(lb.ids.listeners["mqtt6"]).packets, 300, "counted on the IPv6 listener");
    assert_eq!(lb.dp.flow_count(), 300, "every flow is in the table");
}

/// Pairs of clients that differ only in the low 64 bits (a host and its privacy address).
fn privacy_pairs() -> Vec<(Ipv6Addr, Ipv6Addr)> {
    (1..=24u16)
        .map(|c| {
            let a = Ipv6Addr::new(0x2001, 0xdb8, 0xa, c, 0, 0, 0, 1);
            let b = Ipv6Addr::new(0x2001, 0xdb8, 0xa, c, 0x5e3f, 0x91c2 ^ c, 0x07d4, 0xbb00 | c);
            (a, b)
        })
        .collect()
}

/// The backend of a SYN to `[VIP6]:8883`, checked against the controller's ring.
fn source_pick(lb: &Lb, src: Ipv6Addr, sport: u16) -> String {
    let (action, out) = lb.run(&Ipv6Frame::tcp(src, sport, VIP6, 8883, TCP_SYN).build());
    assert_eq!(action, XDP_TX, "SYN from [{src}]:{sport} to 8883");
    let got = lb.backend_of(&out);
    assert_eq!(got, ring6(lb, "mqtts6", src, sport), "[{src}]:{sport}: the source-hash ring pick");
    got
}

#[test]
fn source_hash_keeps_a_client_and_with_prefix_64_its_network_on_one_backend() {
    require_root!();
    let lb = lb6(false);
    let mut per_client = BTreeMap::<Ipv6Addr, BTreeSet<String>>::new();
    for c in 1..=20u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0xb, c, 0, 0, 0, 0x10 + c);
        for sport in (40000..40020).step_by(2) {
            per_client.entry(src).or_default().insert(source_pick(&lb, src, sport));
        }
    }
    assert!(per_client.values().all(|s| s.len() == 1), "a client spread over several backends: {per_client:?}");
    assert!(per_client.values().flatten().collect::<BTreeSet<_>>().len() >= 2, "20 clients all on one backend");
    // Without source_prefix the whole address counts: some privacy pair lands apart.
    let pairs = privacy_pairs();
    let apart = pairs.iter().filter(|(a, b)| source_pick(&lb, *a, 45000) != source_pick(&lb, *b, 45000)).count();
    assert!(apart >= 1, "all {} pairs differing in the low 64 bits share a backend without source_prefix = 64", pairs.len());
    drop(lb);

    let lb = lb6(true);
    let l = &lb.desired.listeners[lb.listener_index("mqtts6")];
    assert!(l.hash_source && l.source_prefix64, "source_prefix = 64 reaches the plan");
    let mut used = BTreeSet::new();
    for (a, b) in &pairs {
        let (pa, pb) = (source_pick(&lb, *a, 46000), source_pick(&lb, *b, 46002));
        assert_eq!(pa, pb, "with source_prefix = 64, {a} and {b} went to different backends");
        used.insert(pa);
    }
    assert!(used.len() >= 2, "{} /64 networks all on one backend: {used:?}", pairs.len());
    // The 4-tuple listener is untouched by the other's prefix setting.
    let spread: BTreeSet<String> = (0..30u16).map(|p| lb.backend_of(&lb.run(&syn6(pairs[0].0, 47000 + 2 * p).build()).1)).collect();
    assert!(spread.len() >= 2, "the 4-tuple listener hashed one client's ports onto one backend");
}

#[test]
fn packet_too_big_follows_the_flow_table_then_the_ring() {
    require_root!();
    let mut lb = lb6(false);
    let too_big = |lb: &Lb| lb.dp.stats().expect("stats").verdict(reason::TX_ICMP_TOO_BIG);
    let forwarded = |lb: &Lb| lb.dp.stats().expect("stats").total().packets;
    let broker_seg = |client: Ipv6Addr, sport: u16| {
        let mut f = Ipv6Frame::tcp(VIP6, 1883, client, sport, TCP_ACK | 0x08);
        f.payload = vec![0x30; 1400];
        f
    };

    // A flow the table holds.
    let sport = 43000;
    let (action, out) = lb.run(&syn6(CLIENT6, sport).build());
    assert_eq!(action, XDP_TX);
    let first = lb.backend_of(&out);
    let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, sport), 1280, 64).build();
    let (tb, fw) = (too_big(&lb), forwarded(&lb));
    let out = run_expect(&lb, &ptb, XDP_TX, reason::TX_ICMP_TOO_BIG, "packet too big about a held flow");
    assert_eq!(lb.backend_of(&out), first, "packet too big went elsewhere than its flow");
    assert_eq!((too_big(&lb), forwarded(&lb)), (tb + 1, fw), "counted as too-big, not as a forward of the flow");

    // The ring moves under held flows: b3 down while they start, then up. Flows whose slot now
    // names b3 stay where the table has them, and so do their too-big messages.
    lb.set_down("b3", true);
    let ports: Vec<u16> = (44000..44120).step_by(2).collect();
    let held: Vec<String> = ports.iter().map(|&p| lb.backend_of(&lb.run(&syn6(CLIENT6, p).build()).1)).collect();
    assert!(held.iter().all(|b| b != "b3"));
    lb.set_down("b3", false);
    let mut checked = 0;
    for (&p, b) in ports.iter().zip(&held) {
        let ring = ring6(&lb, "mqtt6", CLIENT6, p);
        if &ring == b {
            continue;
        }
        checked += 1;
        let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, p), 1280, 64).build();
        let out = run_expect(&lb, &ptb, XDP_TX, reason::TX_ICMP_TOO_BIG, &format!("packet too big for port {p}"));
        assert_eq!(&lb.backend_of(&out), b, "port {p}: packet too big followed the ring ({ring}), not the flow table");
    }
    assert!(checked >= 5, "only {checked} of {} held flows have a ring slot that moved", ports.len());

    // Another backend goes down: the held flow's message still goes where the table says.
    let other = BACKENDS.iter().find(|b| **b != first).expect("another backend");
    lb.set_down(other, true);
    let out = run_expect(&lb, &ptb, XDP_TX, reason::TX_ICMP_TOO_BIG, "packet too big after another backend went down");
    assert_eq!(lb.backend_of(&out), first, "packet too big left its flow's backend");
    lb.set_down(other, false);

    // A flow the table does not hold: the ring decides, and nothing is recorded.
    for i in 0..30u16 {
        let client = Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, i);
        let p = 50000 + 2 * i;
        let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(client, p), 1280, 8).build();
        let out = run_expect(&lb, &ptb, XDP_TX, reason::TX_ICMP_TOO_BIG, &format!("packet too big about unseen [{client}]:{p}"));
        assert_eq!(lb.backend_of(&out), ring6(&lb, "mqtt6", client, p), "unseen [{client}]:{p}: not the ring's choice");
        assert!(lb.dp.flow(client, p, VIP6, 1883).is_none(), "packet too big recorded a flow");
    }

    // Quotes that name no listener's flow, or too little of one.
    for quote in [0, 2, 3] {
        let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, sport), 1280, quote).build();
        run_expect(&lb, &ptb, XDP_PASS, reason::PASS_MALFORMED, &format!("packet too big quoting {quote} bytes past the header"));
    }
    let udp = Ipv6Frame::udp(VIP6, 1883, CLIENT6, sport);
    let ptb = Ipv6Frame::packet_too_big(ROUTER6, &udp, 1280, 8).build();
    run_expect(&lb, &ptb, XDP_PASS, reason::PASS_NO_LISTENER, "packet too big quoting UDP");
    let mut elsewhere = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, sport), 1280, 64);
    elsewhere.dst = OTHER6;
    run_expect(&lb, &elsewhere.build(), XDP_PASS, reason::PASS_NO_LISTENER, "packet too big to another address than the quoted source");
    let mut foreign = Ipv6Frame::packet_too_big(ROUTER6, &Ipv6Frame::tcp(OTHER6, 1883, CLIENT6, sport, TCP_ACK), 1280, 64);
    foreign.dst = VIP6;
    run_expect(&lb, &foreign.build(), XDP_PASS, reason::PASS_NO_LISTENER, "packet too big to VIP6 quoting another source");
    let no_port = Ipv6Frame::packet_too_big(ROUTER6, &Ipv6Frame::tcp(VIP6, 1884, CLIENT6, sport, TCP_ACK), 1280, 64);
    run_expect(&lb, &no_port.build(), XDP_PASS, reason::PASS_NO_LISTENER, "packet too big about a port no listener has");
    let mut multicast = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, sport), 1280, 64);
    multicast.dst_mac = [0x33, 0x33, 0, 0, 0, 1];
    run_expect(&lb, &multicast.build(), XDP_PASS, reason::PASS_NOT_OUR_MAC, "packet too big to a multicast MAC");
    let mut other_kind = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg(CLIENT6, sport), 1280, 64);
    other_kind.l4 = match other_kind.l4 {
        L4v6::Icmp { mtu_or_rest, body, .. } => L4v6::Icmp { kind: 1, code: 4, mtu_or_rest, body },
        l4 => l4,
    };
    run_expect(&lb, &other_kind.build(), XDP_PASS, reason::PASS_NOT_TCP, "destination unreachable quoting the flow");
}

/// Runs every truncation of `full` from an Ethernet header up to one byte short: each must
/// pass as malformed. No truncation is forwarded or aborted.
fn truncations_pass_as_malformed(lb: &Lb, full: &[u8], what: &str) {
    let stats = lb.dp.stats().expect("stats");
    let (packets, too_big) = (stats.total().packets, stats.verdict(reason::TX_ICMP_TOO_BIG));
    for len in 14..full.len() {
        let input = &full[..len];
        let before = verdicts(lb);
        let (action, out) = lb.run(input);
        assert_ne!(action, XDP_ABORTED, "{what}, length {len}: aborted");
        assert_ne!(action, XDP_TX, "{what}, length {len} of {}: forwarded", full.len());
        assert_eq!(action, XDP_PASS, "{what}, length {len}: action");
        let after = verdicts(lb);
        let moved: Vec<usize> = (0..after.len()).filter(|&i| after[i] != before[i]).collect();
        assert_eq!(moved, vec![reason::PASS_MALFORMED as usize], "{what}, length {len}: counted as malformed");
        assert_eq!(out, input, "{what}, length {len}: the frame changed");
    }
    let stats = lb.dp.stats().expect("stats");
    assert_eq!((stats.total().packets, stats.verdict(reason::TX_ICMP_TOO_BIG)), (packets, too_big), "{what}: a truncation was forwarded");
}

#[test]
fn every_truncation_passes_as_malformed() {
    require_root!();
    let lb = lb6(false);
    let mut hbh = syn6(CLIENT6, 45000);
    hbh.ext = vec![ext(IPV6_HOPOPTS, 1)];
    let mut tagged = hbh.clone();
    tagged.vlan = Some((0x8100, 7));
    tagged.ext.push(ext(IPV6_DSTOPTS, 0));
    // A quote of the ports alone: every truncation cuts into them or before.
    let broker_seg = Ipv6Frame::tcp(VIP6, 1883, CLIENT6, 45002, TCP_ACK);
    let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg, 1280, 4);
    for (what, f) in
        [("SYN with hop-by-hop", hbh.build()), ("tagged SYN with two headers", tagged.build()), ("packet too big", ptb.build())]
    {
        truncations_pass_as_malformed(&lb, &f, what);
        // Whole, it is forwarded: the truncations are what made the difference.
        let (action, _) = lb.run(&f);
        assert_eq!(action, XDP_TX, "{what}: the whole frame");
    }

    // A too-big message with a longer quote: cut before the end of the quoted ports it passes as
    // malformed; from there on it is a shorter but whole quote, forwarded to the same backend.
    let ptb = Ipv6Frame::packet_too_big(ROUTER6, &broker_seg, 1280, 40).build();
    let ports_end = 14 + 40 + 8 + 40 + 4;
    truncations_pass_as_malformed(&lb, &ptb[..ports_end], "packet too big, cut in the quote's ports");
    let want = ring6(&lb, "mqtt6", CLIENT6, 45002);
    for len in ports_end..=ptb.len() {
        let (action, out) = lb.run(&ptb[..len]);
        assert_eq!(action, XDP_TX, "packet too big cut to {len} bytes, past the quoted ports");
        assert_eq!(lb.backend_of(&out), want, "packet too big cut to {len} bytes");
    }
}

fn parse_err(text: &str) -> (String, String) {
    match config::parse(text, "t.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(LoadError::Invalid(e)) => (e.field.clone(), e.to_string()),
        Err(e) => panic!("not a validation error: {e}\n{text}"),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).expect("needle in text")
}

#[test]
fn config_rules_for_ipv6() {
    // The fixture config itself: listeners of both families, a dual-stack and an IPv6-only backend.
    let cfg = config::parse(&config_text(true), "t.toml").expect("the fixture config is valid");
    let l = cfg.listeners.iter().find(|l| l.name == "mqtts6").expect("mqtts6");
    assert_eq!((l.vip, l.source_prefix64), (IpAddr::V6(VIP6), true));
    let b1 = cfg.backend("b1").expect("b1");
    assert_eq!((b1.address, b1.address6), (Some("192.0.2.11".parse().unwrap()), Some("2001:db8::11".parse().unwrap())));
    assert_eq!(cfg.listeners.iter().find(|l| l.name == "mqtt6").expect("mqtt6").backends, BACKENDS, "all three serve IPv6");

    let head = "interface = \"veth0\"\n";
    let v4_only = "[[backend]]\nname = \"v4only\"\naddress = \"192.0.2.21\"\nmac = \"02:00:00:00:00:21\"\n";
    let dual = "[[backend]]\nname = \"dual\"\naddress = \"192.0.2.22\"\naddress6 = \"2001:db8::22\"\n";

    // An IPv6 listener naming a backend without an IPv6 address.
    let text = format!(
        "{head}[[listener]]\nname = \"v4\"\nvip = \"192.0.2.100\"\nport = 1883\n\
         [[listener]]\nname = \"v6\"\nvip = \"{VIP6}\"\nport = 1883\nbackends = [\"dual\", \"v4only\"]\n{dual}{v4_only}"
    );
    let (field, msg) = parse_err(&text);
    assert_eq!(field, "listener[1].backends", "{msg}");
    let line = line_of(&text, "name = \"v4only\"");
    assert!(msg.contains("listener[1].backends") && msg.contains("\"v4only\"") && msg.contains(&format!("line {line}")), "{msg}");
    assert!(msg.contains("backend[1].address6"), "the message names the field to add: {msg}");
    // Without a list every backend serves it: the same error.
    let text = format!("{head}[[listener]]\nname = \"v6\"\nvip = \"{VIP6}\"\nport = 1883\n{dual}{v4_only}");
    let (field, msg) = parse_err(&text);
    assert!(field == "listener[0].backends" && msg.contains("\"v4only\"") && msg.contains("line"), "{msg}");
    // Listing only the dual-stack one is fine, and so is the IPv4 listener over both.
    let ok = format!(
        "{head}[[listener]]\nname = \"v4\"\nvip = \"192.0.2.100\"\nport = 1883\n\
         [[listener]]\nname = \"v6\"\nvip = \"{VIP6}\"\nport = 1883\nbackends = [\"dual\"]\n{dual}{v4_only}"
    );
    let cfg = config::parse(&ok, "t.toml").expect("an IPv6 listener over its dual-stack backend");
    assert_eq!(cfg.backend("dual").expect("dual").address6, Some("2001:db8::22".parse().unwrap()));

    // address6 must be an IPv6 address.
    let text = format!(
        "{head}[[listener]]\nname = \"v6\"\nvip = \"{VIP6}\"\nport = 1883\n{dual}\
         [[backend]]\nname = \"bad\"\naddress = \"192.0.2.23\"\naddress6 = \"192.0.2.24\"\n"
    );
    let (field, msg) = parse_err(&text);
    assert_eq!(field, "backend[1].address6", "{msg}");
    assert!(
        msg.contains("backend[1].address6") && msg.contains(&format!("t.toml:{}", line_of(&text, "address6 = \"192.0.2.24\""))),
        "{msg}"
    );

    // source_prefix = 64: only an IPv6 VIP with hash = "source".
    let listener =
        |vip: &str, hash: &str| format!("{head}[[listener]]\nname = \"l\"\nvip = \"{vip}\"\nport = 8883\n{hash}source_prefix = 64\n{dual}");
    let (field, msg) = parse_err(&listener("192.0.2.100", "hash = \"source\"\n"));
    assert_eq!(field, "listener[0].source_prefix", "{msg}");
    assert!(msg.contains("source_prefix"), "{msg}");
    let (field, msg) = parse_err(&listener(&VIP6.to_string(), ""));
    assert_eq!(field, "listener[0].source_prefix", "on a 4-tuple IPv6 listener: {msg}");
    let cfg =
        config::parse(&listener(&VIP6.to_string(), "hash = \"source\"\n"), "t.toml").expect("source_prefix on an IPv6 source listener");
    assert!(cfg.listeners[0].source_prefix64);

    // IPv4 VIPs in 240.0.0.0/4 are refused: IPv6 flow keys are marked with that range.
    for vip in ["240.0.0.1", "250.1.2.3", "255.255.255.254"] {
        let text = format!("{head}[[listener]]\nname = \"l\"\nvip = \"{vip}\"\nport = 1883\n{dual}");
        let (field, msg) = parse_err(&text);
        assert_eq!(field, "listener[0].vip", "VIP {vip}: {msg}");
    }
    let text = format!("{head}[[listener]]\nname = \"l\"\nvip = \"239.255.255.255\"\nport = 1883\n{dual}");
    assert!(config::parse(&text, "t.toml").is_err(), "a multicast VIP");
    let text = format!("{head}[[listener]]\nname = \"l\"\nvip = \"223.255.255.1\"\nport = 1883\n{dual}");
    config::parse(&text, "t.toml").expect("a VIP just below 224/4");
}

/// Two IPv6 flows whose 60-bit keys collide (the seed is secret, so only someone who knows it
/// could aim one) share a bucket: the lookup must pass over the slot whose addresses are not
/// the frame's and find the frame's own flow behind it, as the controller's walk does. It used
/// to end the search in that bucket: the flow's frames then missed, were recorded a second
/// time, and an exception flow went where the ring said.
#[test]
fn a_slot_whose_key_collides_but_whose_addresses_differ_is_passed_over() {
    require_root!();
    let lb = lb6(false);
    let sport = 43000;
    assert_eq!(lb.run(&syn6(CLIENT6, sport).build()).0, XDP_TX);
    let flow = lb.dp.flow(CLIENT6, sport, VIP6, 1883).expect("recorded");
    let t = lb.dp.flow_table();
    let (bucket, way) = (0..t.buckets())
        .flat_map(|b| (0..4).map(move |w| (b, w)))
        .find(|&(b, w)| {
            let (a, m) = t.raw(b, w);
            let (addrs, ports) = flow.key.words();
            a == addrs && lb_common::flow_meta_split(m).0 == ports
        })
        .expect("the flow's slot");
    // The flow moves one way up, pinned to another backend than its ring slot (an exception);
    // a stranger with the same key takes its place, pinned elsewhere too.
    let other = BACKENDS.iter().find(|b| lb.ids.backends[**b] != real_backend(flow.real())).expect("another backend");
    let real_other = lb_common::real_id(lb.ids.listeners["mqtt6"], lb.ids.backends[*other]);
    assert!(way < 3, "the SYN took the last way of an empty bucket");
    let (addrs, meta) = t.raw(bucket, way);
    let (ports, _) = lb_common::flow_meta_split(meta);
    let pinned = lb_common::flow_state(real_other, lb_common::FLOW_K_CONFIRMED, lb.dp.now_age().expect("clock"));
    let own = FlowAddrs6 { src: Ip6 { octets: CLIENT6.octets() }, dst: Ip6 { octets: VIP6.octets() } };
    let stranger = FlowAddrs6 { src: Ip6 { octets: Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 9).octets() }, dst: own.dst };
    t.set_raw(bucket, way + 1, addrs, lb_common::flow_meta(ports, pinned));
    t.set_raw_addrs6(bucket, way + 1, &own);
    t.set_raw(bucket, way, addrs, lb_common::flow_meta(ports, pinned));
    t.set_raw_addrs6(bucket, way, &stranger);
    let (new_flows, held) = (lb.dp.stats().expect("stats").total().new_flows, lb.dp.flows().len());
    let ack = Ipv6Frame::tcp(CLIENT6, sport, VIP6, 1883, TCP_ACK).build();
    for _ in 0..3 {
        let (action, out) = lb.run(&ack);
        assert_eq!((action, lb.backend_of(&out)), (XDP_TX, (*other).to_owned()), "the frame did not find its own flow behind the stranger");
    }
    assert_eq!(lb.dp.stats().expect("stats").total().new_flows, new_flows, "a frame of a held flow counted as a new flow");
    assert_eq!(lb.dp.flows().len(), held, "the flow was recorded a second time");
}
