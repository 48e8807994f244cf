//! Flow-state sharing between balancer nodes, through the programs themselves: two balancers
//! loaded side by side (two nodes), the exceptions one node's walk finds, merged into the
//! other's flow table, and frames pushed through both with `BPF_PROG_TEST_RUN`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use lb_common::{FLOW_CONFIRM_UNITS, FlowKey, real_id};
use lb_userspace::{
    cluster::Exceptions,
    exceptions::{self, RingView},
    flow_table::{FlowTable, MERGE_IDLE_FLOOR, Merged, PeerFlow},
};
use tests::{
    fixture::{CLIENT, Lb, RING, VIP, XDP_TX, syn},
    frame::{Ipv4Frame, Ipv6Frame, TCP_ACK, TCP_FIN, TCP_SYN},
    require_root,
};

fn ack(sport: u16) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_ACK).build()
}

/// The backend a node sends the frame to.
fn forwarded_to(lb: &Lb, frame: &[u8]) -> String {
    let (action, out) = lb.run(frame);
    assert_eq!(action, XDP_TX);
    lb.backend_of(&out)
}

/// A walk as the controller makes it: against this node's ring and the config's.
fn walk(lb: &Lb) -> Exceptions {
    let now = lb.dp.now_age().expect("clock");
    exceptions::find(lb.dp.flow_table(), &RingView::new(&lb.desired, &lb.ids, RING).with_nominal(&lb.config, &lb.ids), now)
}

/// A walk against this node's ring alone.
fn walk_local(lb: &Lb) -> Exceptions {
    let now = lb.dp.now_age().expect("clock");
    exceptions::find(lb.dp.flow_table(), &RingView::new(&lb.desired, &lb.ids, RING), now)
}

/// Takes `found` (another node's exceptions) into `lb`'s table, as the controller does: by
/// listener VIP:port and backend name, as this node's ids. Returns the merge results.
fn merge(lb: &Lb, found: &Exceptions) -> Vec<Merged> {
    let now = lb.dp.now_age().expect("clock");
    let mut out = Vec::new();
    for g in &found.groups {
        let at = g.listener.expect("a listener");
        let l = lb.config.listeners.iter().find(|l| l.vip == at.ip() && l.port == at.port()).expect("a listener of this node");
        let real = real_id(lb.ids.listeners[&l.name], lb.ids.backends[&g.backend]);
        for e in &g.entries {
            let age = now.wrapping_sub(u32::from(e.idle)) & 0xffff;
            let (key, addrs6) = exceptions::key_of(e.client, at, lb.dp.flow_table().seed());
            out.push(lb.dp.flow_table().merge(
                &PeerFlow { key, addrs6, real, closing: e.closing, opened: e.opened, age, relayed: e.relayed },
                PEER,
                now,
                u32::MAX,
                true,
            ));
        }
    }
    out
}

/// A peer's IPv4 flow `key` pinned to `real`, idle `idle` units at `now`, merged into `t`.
fn merge_one(t: &FlowTable, key: FlowKey, real: u32, closing: bool, idle: u32, now: u32) -> Merged {
    t.merge(
        &PeerFlow { key, addrs6: None, real, closing, opened: false, age: now.wrapping_sub(idle) & 0xffff, relayed: false },
        PEER,
        now,
        u32::MAX,
        true,
    )
}

/// The sessions' next segments, a keepalive after they opened: their flows confirm.
fn confirm(lb: &Lb, ports: &[u16], pinned: &[String]) {
    lb.pass_time(FLOW_CONFIRM_UNITS);
    for (p, was) in ports.iter().zip(pinned) {
        assert_eq!(&forwarded_to(lb, &ack(*p)), was);
        assert!(lb.dp.flow(CLIENT, *p, VIP, 1883).expect("held").confirmed());
    }
}

#[test]
fn exceptions_of_one_node_are_forwarded_alike_by_another() {
    require_root!();
    let two = [("b1", 11, 100), ("b2", 12, 100)];
    let three = [("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)];
    let mut a = Lb::new(&two);
    let mut b = Lb::new(&two);
    // Sessions opened on node A (SYN, the handshake's ACK; their next segment confirms them).
    let ports: Vec<u16> = (20000..20600).step_by(2).collect();
    let pinned: Vec<String> = ports
        .iter()
        .map(|&p| {
            let got = forwarded_to(&a, &syn(p));
            assert_eq!(forwarded_to(&a, &ack(p)), got);
            got
        })
        .collect();
    assert!(walk(&a).is_empty(), "connections that follow the ring are not shared");
    confirm(&a, &ports, &pinned);
    assert!(walk(&a).is_empty(), "no exceptions while the ring is the one the flows were made with");

    // A broker is added on both nodes: a third of the ring moves to it.
    a.set_backends(&three);
    b.set_backends(&three);
    let found = walk(&a);
    let moved: Vec<(u16, &String)> =
        ports.iter().zip(&pinned).filter(|&(&p, was)| a.ring_choice(0, CLIENT, p, 1883) != **was).map(|(p, w)| (*p, w)).collect();
    assert!(moved.len() > 50, "only {} of {} sessions' slots moved to the new broker", moved.len(), ports.len());
    assert_eq!(found.len(), moved.len(), "the walk finds exactly the sessions the ring would now send elsewhere");
    for g in &found.groups {
        assert_eq!(g.listener, Some(SocketAddr::V4(SocketAddrV4::new(VIP, 1883))));
        for e in &g.entries {
            let i = ports.iter().position(|&p| p == e.client.port()).expect("one of ours");
            assert_eq!(g.backend, pinned[i], "port {}: an exception names the broker its session is on", e.client.port());
            assert!(!e.closing);
        }
    }
    // Node A still forwards every session to its broker; node B, which never saw them, sends
    // the moved ones where the new ring says: to a broker that answers with a reset.
    for (p, was) in ports.iter().zip(&pinned) {
        assert_eq!(&forwarded_to(&a, &ack(*p)), was);
    }
    let lost_without = moved.iter().filter(|(p, was)| forwarded_to(&b, &ack(*p)) != **was).count();
    assert_eq!(lost_without, moved.len(), "without the exceptions, node B sends every moved session to the wrong broker");

    // With them: node B forwards every session as node A does, and now finds them as its own
    // exceptions (it would pass them on to a third node).
    let b2 = {
        let mut fresh = Lb::new(&two);
        fresh.set_backends(&three);
        fresh
    };
    let results = merge(&b2, &found);
    assert!(results.iter().all(|r| *r == Merged::Inserted), "{results:?}");
    for (p, was) in ports.iter().zip(&pinned) {
        assert_eq!(&forwarded_to(&b2, &ack(*p)), was, "port {p}: node B sends a synced session elsewhere than node A");
    }
    assert_eq!(walk(&b2).len(), moved.len(), "the merged flows are exceptions of node B too");
    // A closing session is passed on as closing (node B has seen none of its frames since).
    b2.pass_time(MERGE_IDLE_FLOOR + 1);
    let (p, _) = moved[0];
    forwarded_to(&a, &Ipv4Frame::tcp(CLIENT, p, VIP, 1883, TCP_FIN | TCP_ACK).build());
    let again = walk(&a);
    let closing: Vec<u16> = again.groups.iter().flat_map(|g| g.entries.iter().filter(|e| e.closing).map(|e| e.client.port())).collect();
    assert_eq!(closing, vec![p]);
    assert!(merge(&b2, &again).iter().all(|r| *r == Merged::Refreshed), "node B holds them all already");
    assert!(b2.dp.flow(CLIENT, p, VIP, 1883).expect("held").closing());
    drop(b);
}

#[test]
fn a_merge_never_displaces_this_nodes_own_sessions() {
    require_root!();
    let config = Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]);
    let lb = Lb::with_table(config, 1024);
    let at = SocketAddrV4::new(VIP, 1883);
    let (b1, b2) = (lb.ids.backends["b1"], lb.ids.backends["b2"]);
    let real = |b: u32| real_id(lb.ids.listeners["mqtt"], b);
    let now = lb.dp.now_age().expect("clock");
    let t = lb.dp.flow_table();
    let key = |p: u16| exceptions::key_of(SocketAddrV4::new(CLIENT, p).into(), at.into(), t.seed()).0;

    // A session of this node's own, confirmed: a peer's copy pinned elsewhere is refused...
    let (_, out) = lb.session(CLIENT, 40000, 1883);
    let own = lb.backend_of(&out);
    let other = if own == "b1" { b2 } else { b1 };
    assert_eq!(merge_one(t, key(40000), real(other), false, 0, now), Merged::Kept);
    assert_eq!(forwarded_to(&lb, &ack(40000)), own);
    // ... and the same pin refreshes it.
    let mine = lb.ids.backends[&own];
    assert_eq!(merge_one(t, key(40000), real(mine), false, 0, now), Merged::Refreshed);

    // A mid-flow miss recorded from the ring (unconfirmed) gives way to the peer's pin.
    let guess = forwarded_to(&lb, &ack(40002));
    let right = if guess == "b1" { b2 } else { b1 };
    assert_eq!(merge_one(t, key(40002), real(right), false, 0, now), Merged::Inserted);
    assert_ne!(forwarded_to(&lb, &ack(40002)), guess, "the peer's pin was not taken");

    // A table full of confirmed flows: merges fill it and then give up, displacing none.
    let results: Vec<Merged> = (0..6000u16).map(|i| merge_one(t, key(1000 + i), real(b1), false, 0, now)).collect();
    let inserted = results.iter().filter(|r| **r == Merged::Inserted).count();
    let full = results.iter().filter(|r| **r == Merged::Full).count();
    assert!(full > 0, "6000 flows fit a table of 2048 slots?");
    assert_eq!(inserted + full, 6000);
    assert!(lb.dp.flow(CLIENT, 40000, VIP, 1883).is_some() && lb.dp.flow(CLIENT, 40002, VIP, 1883).is_some());
    let mut held = 0;
    t.walk(|_| held += 1);
    assert_eq!(held, inserted + 2, "a merge replaced a confirmed flow");

    // The same pin with a closing mark, while this node still sees the session's frames: a
    // peer does not close what this node carries...
    assert_eq!(forwarded_to(&lb, &ack(40000)), own);
    assert_eq!(merge_one(t, key(40000), real(mine), true, 0, now), Merged::Kept);
    assert!(!lb.dp.flow(CLIENT, 40000, VIP, 1883).expect("held").closing());
    // ... but once its frames go elsewhere (a failover), the peer's close is taken in.
    lb.pass_time(MERGE_IDLE_FLOOR + 1);
    assert_eq!(merge_one(t, key(40000), real(mine), true, 0, now), Merged::Refreshed);
    assert!(lb.dp.flow(CLIENT, 40000, VIP, 1883).expect("held").closing());
}

/// What a peer must not do to this node's sessions (issue 21, the cluster sync): close or
/// repoint a flow this node has just seen a frame of, keep its copies fresher than this node's
/// own traffic, or insert without bound.
#[test]
fn a_peer_cannot_close_repoint_or_flood_what_this_node_carries() {
    require_root!();
    let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 1024);
    let at = SocketAddrV4::new(VIP, 1883);
    let real = |b: &str| real_id(lb.ids.listeners["mqtt"], lb.ids.backends[b]);
    let t = lb.dp.flow_table();
    let now = lb.dp.now_age().expect("clock");
    let key = |p: u16| exceptions::key_of(SocketAddrV4::new(CLIENT, p).into(), at.into(), t.seed()).0;
    let other = |b: &str| if b == "b1" { "b2" } else { "b1" };

    // A connection this node saw open (SYN, ACK: not yet confirmed) is neither closed nor
    // repointed by a peer, however fresh the peer says its copy is.
    let opened = forwarded_to(&lb, &syn(41000));
    forwarded_to(&lb, &ack(41000));
    assert_eq!(merge_one(t, key(41000), real(other(&opened)), false, 0, now), Merged::Kept, "a peer repointed a new connection");
    assert_eq!(merge_one(t, key(41000), real(&opened), true, 0, now), Merged::Kept, "a peer closed a new connection");
    let f = lb.dp.flow(CLIENT, 41000, VIP, 1883).expect("held");
    assert!(!f.closing() && f.real() == real(&opened));
    // A confirmed session with a frame just now: the same.
    let (_, out) = lb.session(CLIENT, 41002, 1883);
    let own = lb.backend_of(&out);
    assert_eq!(merge_one(t, key(41002), real(other(&own)), false, 0, now), Merged::Kept);
    assert_eq!(merge_one(t, key(41002), real(&own), true, 0, now), Merged::Kept);
    assert_eq!(forwarded_to(&lb, &ack(41002)), own);
    // A session closing here (its client's FIN went through this node) is not repointed either.
    forwarded_to(&lb, &Ipv4Frame::tcp(CLIENT, 41002, VIP, 1883, TCP_FIN | TCP_ACK).build());
    assert_eq!(merge_one(t, key(41002), real(other(&own)), false, 0, now), Merged::Kept);

    // A peer's idle 0 counts as MERGE_IDLE_FLOOR: its copy is never fresher than a frame here.
    assert_eq!(merge_one(t, key(41004), real("b1"), false, 0, now), Merged::Inserted);
    let f = lb.dp.flow(CLIENT, 41004, VIP, 1883).expect("merged");
    assert!(f.confirmed());
    assert_eq!(f.idle(now), MERGE_IDLE_FLOOR, "a peer's idle 0 was taken as is");

    // A peer inserts at most the flows the table is sized for (half its slots, 1,024 here) before
    // it is capped.
    let slots = u64::from(t.buckets()) * 4;
    let mut budget = exceptions::PeerBudget::new(slots, std::time::Instant::now());
    let flood = exceptions::Incoming {
        from: std::net::Ipv4Addr::new(192, 0, 2, 3),
        flows: (0..6000u16)
            .map(|i| PeerFlow {
                key: key(1000 + i),
                addrs6: None,
                real: real("b1"),
                closing: false,
                opened: false,
                age: now,
                relayed: false,
            })
            .collect(),
        now,
        expire: u32::MAX,
    };
    let c = exceptions::merge_all(t, &flood, &mut budget, slots);
    assert_eq!(c.inserted, slots / 2, "{c:?}");
    assert_eq!(c.capped + c.inserted + c.full, 6000, "{c:?}");
    assert!(c.capped > 0, "{c:?}");
}

/// Nodes whose checks disagree build different rings: node A sees b2 down and sends every new
/// session to b1, node B sees both up. A's sessions follow A's ring, but those whose slot the
/// config's ring gives b2 are exceptions for B: the walk finds them, and B forwards them as A.
#[test]
fn sessions_made_while_this_nodes_checks_differ_are_shared() {
    require_root!();
    let two = [("b1", 11, 100), ("b2", 12, 100)];
    let mut a = Lb::new(&two);
    a.set_down("b2", true);
    let ports: Vec<u16> = (30000..30400).step_by(2).collect();
    for &p in &ports {
        assert_eq!(forwarded_to(&a, &syn(p)), "b1");
        assert_eq!(forwarded_to(&a, &ack(p)), "b1");
    }
    confirm(&a, &ports, &vec!["b1".to_owned(); ports.len()]);
    assert!(walk_local(&a).is_empty(), "every session follows node A's own ring");
    let b = Lb::new(&two);
    let elsewhere: Vec<u16> = ports.iter().copied().filter(|&p| b.ring_choice(0, CLIENT, p, 1883) != "b1").collect();
    assert!(elsewhere.len() > 50, "only {} of {} sessions have a b2 slot in the config's ring", elsewhere.len(), ports.len());
    let found = walk(&a);
    let mut shared: Vec<u16> = found.groups.iter().flat_map(|g| g.entries.iter().map(|e| e.client.port())).collect();
    shared.sort_unstable();
    assert_eq!(shared, elsewhere, "the walk shares exactly the sessions the config's ring gives another broker");
    assert!(found.groups.iter().all(|g| g.backend == "b1"));
    assert!(merge(&b, &found).iter().all(|r| *r == Merged::Inserted));
    for &p in &ports {
        assert_eq!(forwarded_to(&b, &ack(p)), "b1", "port {p}: node B sends node A's session elsewhere");
    }
}

/// A reload that has reached node A (a third broker) but not yet node B: B's sessions follow
/// B's ring, so B finds no exceptions, but A's ring would move a third of them. While a peer's
/// config differs, B shares every live flow; A takes them in and forwards each as B does.
#[test]
fn while_configs_differ_every_flow_is_shared() {
    require_root!();
    let two = [("b1", 11, 100), ("b2", 12, 100)];
    let three = [("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)];
    let b = Lb::new(&two);
    let mut a = Lb::new(&two);
    a.set_backends(&three);
    let ports: Vec<u16> = (40000..40600).step_by(2).collect();
    let pinned: Vec<String> = ports
        .iter()
        .map(|&p| {
            let got = forwarded_to(&b, &syn(p));
            assert_eq!(forwarded_to(&b, &ack(p)), got);
            got
        })
        .collect();
    confirm(&b, &ports, &pinned);
    assert!(walk(&b).is_empty(), "B's sessions all follow B's rings");
    let moved = ports.iter().zip(&pinned).filter(|&(&p, was)| a.ring_choice(0, CLIENT, p, 1883) != *was).count();
    assert!(moved > 50, "only {moved} of {} sessions would move on node A", ports.len());
    let now = b.dp.now_age().expect("clock");
    let mut view = RingView::new(&b.desired, &b.ids, RING).with_nominal(&b.config, &b.ids);
    view.share_all = true;
    let all = exceptions::find(b.dp.flow_table(), &view, now);
    assert_eq!(all.len(), ports.len(), "every live flow is shared while the configs differ");
    assert!(merge(&a, &all).iter().all(|r| *r == Merged::Inserted));
    for (p, was) in ports.iter().zip(&pinned) {
        assert_eq!(&forwarded_to(&a, &ack(*p)), was, "port {p}: node A sends node B's session elsewhere");
    }
}

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

/// A node with one IPv6 listener (VIP6:1883) over dual-stack backends (name, last byte, weight).
fn node6(backends: &[(&str, u8, u32)]) -> Lb {
    Lb::with_config(Lb::parse(&config6(backends)))
}

fn config6(backends: &[(&str, u8, u32)]) -> String {
    use std::fmt::Write as _;
    let mut text = format!("interface = \"veth0\"\nring_size = {RING}\n[[listener]]\nname = \"mqtt6\"\nvip = \"{VIP6}\"\nport = 1883\n");
    for (name, n, w) in backends {
        let _ = write!(
            text,
            "[[backend]]\nname = \"{name}\"\naddress = \"192.0.2.{n}\"\naddress6 = \"2001:db8::{n}\"\nmac = \"02:00:00:00:00:{n:02x}\"\nweight = {w}\n"
        );
    }
    text
}

/// Client `i`'s IPv6 address: a different /64 each, so the flows spread.
fn client6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x10, i, 0, 0, 0, 1)
}

fn seg6(i: u16, flags: u8) -> Vec<u8> {
    Ipv6Frame::tcp(client6(i), 40000 + i, VIP6, 1883, flags).build()
}

#[test]
fn ipv6_exceptions_of_one_node_are_forwarded_alike_by_another() {
    require_root!();
    let two = [("b1", 11, 100), ("b2", 12, 100)];
    let three = [("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)];
    let mut a = node6(&two);
    let clients: Vec<u16> = (0..300).collect();
    let pinned: Vec<String> = clients
        .iter()
        .map(|&i| {
            let got = forwarded_to(&a, &seg6(i, TCP_SYN));
            assert_eq!(forwarded_to(&a, &seg6(i, TCP_ACK)), got);
            got
        })
        .collect();
    a.pass_time(FLOW_CONFIRM_UNITS);
    for &i in &clients {
        assert_eq!(forwarded_to(&a, &seg6(i, TCP_ACK)), pinned[usize::from(i)]);
    }
    assert!(walk(&a).is_empty(), "no exceptions while the ring is the one the flows were made with");

    // A broker is added: a third of the ring moves to it. Node A's walk finds the IPv6
    // sessions it would now send elsewhere, named by their full addresses.
    a.config = Lb::parse(&config6(&three));
    a.apply();
    let found = walk(&a);
    let mut b = node6(&two);
    b.config = Lb::parse(&config6(&three));
    b.apply();
    let moved: Vec<u16> = clients.iter().copied().filter(|&i| forwarded_to(&b, &seg6(i, TCP_ACK)) != pinned[usize::from(i)]).collect();
    assert!(moved.len() > 50, "only {} of {} IPv6 sessions' slots moved", moved.len(), clients.len());
    assert_eq!(found.len(), moved.len(), "the walk finds exactly the IPv6 sessions the ring now sends elsewhere");
    for g in &found.groups {
        assert_eq!(g.listener, Some(SocketAddr::new(VIP6.into(), 1883)));
        for e in &g.entries {
            let i = clients.iter().position(|&i| SocketAddr::new(client6(i).into(), 40000 + i) == e.client).expect("one of ours");
            assert_eq!(g.backend, pinned[i], "{}: an exception names the broker its session is on", e.client);
        }
    }
    // A fresh node B with the new ring takes them in and forwards every session as A does.
    let b2 = {
        let mut fresh = node6(&two);
        fresh.config = Lb::parse(&config6(&three));
        fresh.apply();
        fresh
    };
    let results = merge(&b2, &found);
    assert!(results.iter().all(|r| *r == Merged::Inserted), "{results:?}");
    for &i in &clients {
        assert_eq!(
            forwarded_to(&b2, &seg6(i, TCP_ACK)),
            pinned[usize::from(i)],
            "client {i}: node B sends a synced IPv6 session elsewhere"
        );
    }
    assert_eq!(walk(&b2).len(), moved.len(), "the merged IPv6 flows are exceptions of node B too");
    let f = b2.dp.flow(client6(moved[0]), 40000 + moved[0], VIP6, 1883).expect("merged flow");
    assert!(f.addrs6.is_some(), "merged with its addresses: {f:?}");
}

/// A connection just opened (its first keepalive not come yet) that the ring now sends elsewhere
/// is shared too, as not confirmed: a failover before its keepalive must not lose it (the VRRP
/// lab test did, when only confirmed flows were shared). The peer keeps it unconfirmed until the
/// session's own next segment there. A flow recorded mid-flow and unconfirmed (what made-up
/// segments record) is not shared.
#[test]
fn connections_just_opened_are_shared_unconfirmed_and_mid_flow_guesses_not_at_all() {
    require_root!();
    let two = [("b1", 11, 100), ("b2", 12, 100)];
    let three = [("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)];
    let mut a = Lb::new(&two);
    let ports: Vec<u16> = (50000..50600).step_by(2).collect();
    let pinned: Vec<String> = ports.iter().map(|&p| forwarded_to(&a, &syn(p))).collect();
    let guesses: Vec<u16> = (51000..51600).step_by(2).collect();
    for &p in &guesses {
        forwarded_to(&a, &ack(p));
    }
    a.set_backends(&three);
    let found = walk(&a);
    let moved: Vec<u16> =
        ports.iter().zip(&pinned).filter(|&(&p, was)| a.ring_choice(0, CLIENT, p, 1883) != *was).map(|(p, _)| *p).collect();
    assert!(moved.len() > 50, "only {} connections moved", moved.len());
    let shared: Vec<u16> = found.groups.iter().flat_map(|g| g.entries.iter().map(|e| e.client.port())).collect();
    assert_eq!(shared.len(), moved.len(), "the walk shares exactly the opened connections the ring moved, and no mid-flow guess");
    assert!(found.groups.iter().all(|g| g.entries.iter().all(|e| e.opened && !e.closing)));
    let mut b = Lb::new(&two);
    b.set_backends(&three);
    assert!(merge(&b, &found).iter().all(|r| *r == Merged::Inserted));
    for &p in &moved {
        let f = b.dp.flow(CLIENT, p, VIP, 1883).expect("merged");
        assert_eq!(f.kind(), lb_common::FLOW_K_OPENED, "port {p}: a copy of an unconfirmed connection came confirmed");
    }
    // After a failover to node B, each session's next segment there goes to its broker and
    // confirms the copy.
    for (p, was) in ports.iter().zip(&pinned) {
        assert_eq!(&forwarded_to(&b, &ack(*p)), was, "port {p}: node B sent a shared connection elsewhere");
    }
    for &p in &moved {
        assert!(b.dp.flow(CLIENT, p, VIP, 1883).expect("held").confirmed(), "port {p}: the session's segment did not confirm the copy");
    }
}

/// A node's table for the tests of peers' copies: flows expire at [`EXPIRE`] idle units (the
/// merge floor is half that), the peers' lag is [`LAG`]; one client's flows to b1, by port.
struct Copies {
    lb: Lb,
    real: u32,
    now: u32,
}

const EXPIRE: u32 = 100;
const LAG: u32 = 20;
/// The peers the copies' words come from.
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const PEER2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);
const PEER3: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);

impl Copies {
    fn new() -> Self {
        let lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 1024);
        let real = real_id(lb.ids.listeners["mqtt"], lb.ids.backends["b1"]);
        lb.dp.flow_table().set_peer_lag(LAG);
        let now = lb.dp.now_age().expect("clock");
        for p in [PEER, PEER2, PEER3] {
            lb.dp.flow_table().peer_connected(p, Some(now));
        }
        Self { lb, real, now }
    }

    fn table(&self) -> &FlowTable {
        self.lb.dp.flow_table()
    }

    fn later(&self, units: u32) -> u32 {
        (self.now + units) & 0xffff
    }

    fn key(&self, p: u16) -> FlowKey {
        exceptions::key_of(SocketAddrV4::new(CLIENT, p).into(), SocketAddrV4::new(VIP, 1883).into(), self.table().seed()).0
    }

    fn held(&self, p: u16) -> bool {
        self.table().find(&self.key(p), None).is_some()
    }

    /// A peer's word on port `p`: idle `idle` units now, relayed or not.
    fn word(&self, p: u16, idle: u32, relayed: bool) -> PeerFlow {
        PeerFlow {
            key: self.key(p),
            addrs6: None,
            real: self.real,
            closing: false,
            opened: false,
            age: self.now.wrapping_sub(idle) & 0xffff,
            relayed,
        }
    }

    fn merge(&self, p: u16, idle: u32, relayed: bool) -> Merged {
        self.table().merge(&self.word(p, idle, relayed), PEER, self.now, EXPIRE, true)
    }

    /// `from`'s word on port `p` `units` from now, idle `idle` units then.
    fn merge_at(&self, from: Ipv4Addr, units: u32, p: u16, idle: u32, relayed: bool) -> Merged {
        let now = self.later(units);
        let word = PeerFlow { age: now.wrapping_sub(idle) & 0xffff, ..self.word(p, 0, relayed) };
        self.table().merge(&word, from, now, EXPIRE, true)
    }

    /// `from` ends a round `units` from now.
    fn synced(&self, from: Ipv4Addr, units: u32) {
        self.table().peer_synced(from, self.later(units));
    }

    /// `from` connects (again) `units` from now.
    fn connected(&self, from: Ipv4Addr, units: u32) {
        self.table().peer_connected(from, Some(self.later(units)));
    }

    /// A sweep `units` from now.
    fn sweep(&self, units: u32) {
        self.table().remove_idle(self.later(units), |_| EXPIRE);
    }

    /// This node's exceptions `units` from now, every flow shared: port to entry.
    fn shared(&self, units: u32) -> std::collections::BTreeMap<u16, lb_userspace::cluster::Entry> {
        let mut view = RingView::new(&self.lb.desired, &self.lb.ids, RING);
        view.share_all = true;
        exceptions::find(self.table(), &view, self.later(units))
            .groups
            .iter()
            .flat_map(|g| &g.entries)
            .map(|e| (e.client.port(), *e))
            .collect()
    }
}

/// A peer's copy lives as long as the original may (`FlowTable::idle_at`), or a node that fails
/// takes with it the sessions whose next frame comes after their copies went. A merge writes the
/// copy of a recent frame `MERGE_IDLE_FLOOR` old (so that "recent" here means a frame seen here),
/// and the peer tells a flow's idle time again only every `refresh`: once the peer has ended a
/// round without it (the flow ended there), the copy counts as idle as on the peer, less the
/// peer's refresh lag. A frame here makes the flow this node's own again, and what this node
/// shares of a copy is as idle as the peer told (copies passed back and forth make each other no
/// younger).
#[test]
fn a_peers_copy_lives_as_long_as_the_original_may() {
    require_root!();
    let c = Copies::new();
    // A flow with a frame on the peer just now: its copy is written 50 old (the floor).
    assert_eq!(c.merge(42000, 0, false), Merged::Inserted);
    assert_eq!(c.table().find(&c.key(42000), None).expect("merged").idle(c.now), 50, "the floor");
    // One idle 70 on the peer: written as it is.
    assert_eq!(c.merge(42001, 70, false), Merged::Inserted);
    // One with a frame on the peer just now, and then one here.
    assert_eq!(c.merge(42002, 0, false), Merged::Inserted);
    assert_eq!(forwarded_to(&c.lb, &ack(42002)), "b1");
    // The peer ends a round a lag later without them: it no longer holds them.
    c.synced(PEER, LAG);

    // 49 units on: the second is 119 idle on the peer, 99 with the lag: it stays; so does the
    // first, 50 units past its written age and its last frame 49 ago.
    c.sweep(49);
    assert!(c.held(42000) && c.held(42001) && c.held(42002));
    // 51 on: the second is over (101 with the lag); the first is not (31), though 101 units
    // past the age in its slot.
    c.sweep(51);
    assert!(c.held(42000), "a peer's copy went 50 units (the floor) before the original");
    assert!(!c.held(42001), "a peer's copy outlived the original and the lag");
    assert!(c.held(42002));
    // 101 on: the flow with a frame here is over as any flow of this node's own.
    c.sweep(101);
    assert!(!c.held(42002), "a frame here left the flow counted as a peer's copy");
    // 110 on: the first copy counts as live (90 with the lag), and is shared as idle as its peer
    // said (110), not younger.
    assert_eq!(c.table().live_per_real(c.later(110), |_| EXPIRE).get(&c.real).copied(), Some(1));
    assert_eq!(c.shared(110).get(&42000).expect("the copy is shared").idle, 110, "a copy was shared younger than its peer said");
    // 121 on: over (101 with the lag).
    c.sweep(121);
    assert!(!c.held(42000), "a peer's copy outlived the original and the lag");
}

/// A restarted controller has no records of the peers' copies; the peers send every flow again.
/// A word that leaves the slot's age as it was (a unit older than the word that wrote it, as two
/// words of one frame may be) is still recorded: else the copy would count by its slot's age
/// alone and go up to the lag before the original (what the two-node soak lost sessions to,
/// when the peer failed in that window).
#[test]
fn a_restarted_node_remembers_copies_whose_slot_kept_its_age() {
    require_root!();
    let c = Copies::new();
    assert_eq!(c.merge(42010, 70, false), Merged::Inserted);
    c.table().forget_copies();
    // The peer connects again and tells the same frame, a unit older: the slot keeps its age.
    c.connected(PEER, 0);
    assert_eq!(c.merge(42010, 71, false), Merged::Refreshed);
    assert_eq!(c.table().find(&c.key(42010), None).expect("held").idle(c.now), 70);
    // It is the peer's flow, and shared as its (relayed), not as this node's own.
    assert!(c.shared(1)[&42010].relayed, "a copy remembered after a restart was shared as this node's own flow");
    // The peer ends a round a lag later without it.
    c.synced(PEER, LAG);
    // 31 on: 101 units past the slot's age, 82 on the peer with the lag: kept.
    c.sweep(31);
    assert!(c.held(42010), "a copy whose slot kept its age after a restart counted by the slot alone");
    // 50 on: 121 on the peer, 101 with the lag: over.
    c.sweep(50);
    assert!(!c.held(42010), "a peer's copy outlived the original and the lag");
}

/// A node passes on its copy of a peer's flow (the peer failed, this node came back with an
/// empty table): the word is the third node's, whose frames may be a lag more recent, and this
/// node's own frames since reach the taker only with its next refresh. The taker keeps such a
/// relayed copy two lags past the word; a relayed word the slot already knew (its own flow told
/// back to it) adds nothing, and a copy shared again is marked relayed.
#[test]
fn a_relayed_copy_lives_a_lag_longer() {
    require_root!();
    let c = Copies::new();
    assert_eq!(c.merge(42020, 70, true), Merged::Inserted);
    assert_eq!(c.merge(42021, 70, false), Merged::Inserted);
    // Its own flow told back to it, relayed: the slot knew that age already.
    assert_eq!(c.merge(42022, 70, false), Merged::Inserted);
    assert_eq!(c.merge(42022, 70, true), Merged::Refreshed);
    // A connection the peer opened, then its word that it confirmed, relayed: the kind changed,
    // the age did not, so the word told nothing new of its frames.
    assert_eq!(c.table().merge(&PeerFlow { opened: true, ..c.word(42023, 70, false) }, PEER, c.now, EXPIRE, true), Merged::Inserted);
    assert_eq!(c.merge(42023, 70, true), Merged::Inserted, "confirmed by the peer's word");
    // The peer ends a round a lag later without them.
    c.synced(PEER, LAG);
    // Shared on as relayed, as idle as told.
    let shared = c.shared(10);
    assert!(shared[&42020].relayed && shared[&42021].relayed, "a copy was shared as if its frames were this node's");
    assert_eq!(shared[&42020].idle, 80);
    // 51 on: 121 idle as told; 81 with two lags, 101 with one.
    c.sweep(51);
    assert!(c.held(42020), "a relayed copy went a lag early");
    assert!(!c.held(42021), "a copy outlived the original and the lag");
    assert!(!c.held(42022), "a flow told back to its node relayed lived a lag longer");
    assert!(!c.held(42023), "a relayed word that only confirmed a copy made it live a lag longer");
    // 71 on: 141, 101 with two lags: over.
    c.sweep(71);
    assert!(!c.held(42020), "a relayed copy outlived two lags");
}

/// The told frame is not the last one the peer may have seen: it tells a live flow again only
/// every refresh, so when it fails the flow's last frame may be a lag after its last word, and
/// that word may tell a frame a keepalive older (the two-node soak lost sessions so). A copy
/// counts from the peer's last word on it (at most a timeout past the told frame), less the lag,
/// until that peer ends a round, on the connection the word came by, a lag after the word
/// without saying it again; from then on (the flow ended there) it counts from the told frame.
/// A relayed word does not renew it, nor take it over (two nodes telling each other their
/// copies would keep both alive; the relaying node's round says nothing of the holder's
/// frames), nor does a word on this node's own flow told back to it.
#[test]
fn a_copy_lives_a_lag_and_a_timeout_past_its_peers_last_word() {
    require_root!();
    let c = Copies::new();
    // A session idle 30 on PEER2 (its last frame told), told again 40 units later (idle 70): PEER2
    // then fails, and ends no round.
    assert_eq!(c.merge_at(PEER2, 0, 42030, 30, false), Merged::Inserted);
    // The same on PEER, which then ends rounds: 10 units after its last word (too soon to say
    // anything), then a lag after it.
    assert_eq!(c.merge_at(PEER, 0, 42031, 30, false), Merged::Inserted);
    // A relayed copy, said again relayed: it counts from its told frame (two lags).
    assert_eq!(c.merge_at(PEER2, 0, 42032, 70, true), Merged::Inserted);
    // This node's own flow, told back: it counts from its frame (and the lag), as before.
    assert_eq!(forwarded_to(&c.lb, &ack(42033)), "b1", "a new flow of this node's own");
    let own_idle = c.table().find(&c.key(42033), None).expect("recorded").idle(c.now);
    // A session idle 30 on PEER3, which then connects again (it came back with an empty table)
    // and ends a round on its new connection.
    assert_eq!(c.merge_at(PEER3, 0, 42034, 30, false), Merged::Inserted);
    // A session on PEER2, of which PEER relays a newer frame (three nodes), and the same again.
    assert_eq!(c.merge_at(PEER2, 0, 42035, 70, false), Merged::Inserted);
    // A copy PEER2 says again and again with the same frame (as two nodes telling each other a
    // flow would): it lives at most a timeout past the frame, the lag and the timeout.
    assert_eq!(c.merge_at(PEER2, 0, 42036, 70, false), Merged::Inserted);

    c.connected(PEER3, 30);
    assert_eq!(c.merge_at(PEER, 30, 42035, 40, true), Merged::Refreshed);
    assert_eq!(c.merge_at(PEER2, 40, 42030, 70, false), Merged::Refreshed);
    assert_eq!(c.merge_at(PEER, 40, 42031, 70, false), Merged::Refreshed);
    assert_eq!(c.merge_at(PEER2, 40, 42032, 110, true), Merged::Refreshed);
    assert!(matches!(c.merge_at(PEER2, 40, 42033, own_idle + 40, true), Merged::Inserted | Merged::Refreshed));
    assert_eq!(c.merge_at(PEER2, 40, 42036, 110, false), Merged::Refreshed);
    c.synced(PEER, 50);
    c.synced(PEER3, 55);
    assert_eq!(c.merge_at(PEER2, 60, 42033, own_idle + 60, false), Merged::Refreshed);

    c.sweep(61);
    assert!([42030, 42031, 42032, 42033, 42034, 42035, 42036].iter().all(|&p| c.held(p)));
    assert_eq!(c.merge_at(PEER, 61, 42035, 71, true), Merged::Refreshed);
    // PEER ends a round a lag after its last word: that copy counts from its told frame.
    c.synced(PEER, 61);
    assert_eq!(c.merge_at(PEER2, 80, 42036, 150, false), Merged::Refreshed);
    // 91 on: 121 past their told frames, 101 with the lag.
    c.sweep(91);
    assert!(!c.held(42031), "a copy outlived its told frame and the lag after its peer's round without it");
    assert!(c.held(42030), "a copy went when its told frame was a timeout and a lag old, its peer's last word not");
    assert!(c.held(42034), "a round of its peer's next connection ended a copy it said before");
    assert!(!c.held(42032), "a copy a relayed word made lived past its told frame and two lags");
    // 120 on: the flow told back is over, a lag and a timeout past its last frame here.
    assert_eq!(c.merge_at(PEER2, 120, 42036, 190, false), Merged::Refreshed);
    c.sweep(120 - own_idle.min(100));
    assert!(!c.held(42033), "a flow told back to its node lived past its frame, the lag and the timeout");
    c.sweep(121);
    assert!(!c.held(42034), "a copy outlived a lag and a timeout past its peer's last word");
    // 131 on: the copy PEER relayed a newer frame of counts from PEER2's word, with two lags.
    c.sweep(131);
    assert!(c.held(42035), "a relayed word took a copy over: its relayer's round ended it");
    c.sweep(141);
    assert!(!c.held(42035), "a relayed word renewed a copy, or it outlived two lags and a timeout past its holder's last word");
    // 149 on: 219 past the frame said again and again, less the timeout and the lag: 99.
    c.sweep(149);
    assert!(c.held(42036));
    c.sweep(151);
    assert!(!c.held(42036), "a copy said again and again lived past its frame, a timeout, the lag and the timeout");
    // 159 on: 119 units past PEER2's last word on the first, 99 with the lag: kept; 161: over.
    c.sweep(159);
    assert!(c.held(42030), "a copy went before a lag and a timeout past its peer's last word");
    c.sweep(161);
    assert!(!c.held(42030), "a copy outlived a lag and a timeout past its peer's last word");
}
