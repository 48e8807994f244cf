//! L3 direct server return in the tunnelled lab: broker b1 on the balancer's segment, b2 (IPIP)
//! and b3 (GUE) in another subnet behind a router, each with `dsrlb decap` set up by
//! `deploy/backend-setup.sh --decap`. The balancer reaches b2 and b3 only through the router;
//! they answer the clients directly through it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use lb_userspace::config::Forward;
use tests::{
    balancer::{Balancer, StatusExt as _},
    client::{MqttConn, hold_sessions},
    lab::{CLIENT_ADDR, CLIENT6, LabGuard, VIP, VIP_GUE, VIP_IPIP, VIP6, VIP6_GUE, VIP6_IPIP},
    netns::{PacketSocket, in_netns},
    require_root, wait,
};

const T: Duration = Duration::from_secs(5);

/// Pairs start down (`alpha`) until a probe passes: "up" then proves the probe along the
/// tunnel got through.
fn health() -> String {
    "check = \"mqtt\"\ninter = \"300ms\"\ntimeout = \"250ms\"\nfall = 2\nrise = 1\nalpha = true".to_owned()
}

fn in_client<R: Send>(lab: &LabGuard, f: impl FnOnce() -> R + Send) -> R {
    in_netns(&lab.ns("client"), f).expect("entering the client namespace")
}

fn wait_state(lb: &Balancer, listener: &str, backend: &str, want: &str) {
    wait::until(format!("{listener}/{backend} {want}"), Duration::from_secs(20), || lb.state(listener, backend) == want);
}

/// Every pair of the tunnelled config up.
fn wait_all_up(lb: &Balancer) {
    for l in ["mqtt", "mqtts", "mqtt6"] {
        for b in ["b1", "b2", "b3"] {
            wait_state(lb, l, b, "up");
        }
    }
    for (mode, b) in [("ipip", "b2"), ("gue", "b3")] {
        for l in [mode.to_owned(), format!("{mode}-tls"), format!("{mode}6"), format!("{mode}6-tls")] {
            wait_state(lb, &l, b, "up");
        }
    }
}

fn pubsub(lab: &LabGuard, host: IpAddr, port: u16, ca: Option<&[u8]>, id: &str, n: usize, size: usize) -> usize {
    in_client(lab, || tests::mqtt::pubsub_sized(&host.to_string(), port, ca, id, &format!("{id}/#"), n, size))
}

/// The MAC of the router's interface on the segment.
fn router_mac(lab: &LabGuard) -> [u8; 6] {
    // (`ip`, not sysfs: the lab enters network namespaces only, and /sys is the host's.)
    let text = lab.exec(&lab.ns("dc"), "ip", &["-br", "link", "show", "eth0"]).expect("router MAC");
    let mac = text.split_whitespace().nth(2).expect("ip -br link: name, state, MAC");
    let bytes: Vec<u8> = mac.split(':').map(|h| u8::from_str_radix(h, 16).expect("hex")).collect();
    bytes.try_into().expect("six bytes")
}

/// What crossed the balancer's bridge port.
#[derive(Default)]
struct Wire {
    ready: AtomicBool,
    /// Frames to the router that are tunnel frames (IPIP, IPv6 in IPv6, UDP to the GUE port).
    tunnelled: AtomicUsize,
    /// Frames to the router that are TCP to a VIP, unwrapped: must be none.
    bare: AtomicUsize,
    /// TCP from a VIP to the client: must be none (the brokers answer through the router).
    from_vip: AtomicUsize,
    /// UDP source ports of GUE frames.
    gue_ports: std::sync::Mutex<BTreeSet<u16>>,
}

const VIPS4: [Ipv4Addr; 3] = [VIP, VIP_IPIP, VIP_GUE];
const VIPS6: [Ipv6Addr; 3] = [VIP6, VIP6_IPIP, VIP6_GUE];

impl Wire {
    fn classify(&self, f: &[u8], router: [u8; 6]) {
        let to_router = f.get(..6) == Some(&router[..]);
        let v4 = f.len() >= 38 && f[12..14] == [0x08, 0x00];
        let v6 = f.len() >= 58 && f[12..14] == [0x86, 0xdd];
        let vip4 = |a: &[u8]| VIPS4.iter().any(|v| v.octets() == a);
        let vip6 = |a: &[u8]| VIPS6.iter().any(|v| v.octets() == a);
        let (proto, l4) = if v4 {
            (f[23], 14 + usize::from(f[14] & 0x0f) * 4)
        } else if v6 {
            (f[20], 54)
        } else {
            return;
        };
        let gue = proto == 17 && f.len() >= l4 + 8 && f[l4 + 2..l4 + 4] == 6080u16.to_be_bytes();
        if to_router && (proto == 4 || proto == 41 || gue) {
            self.tunnelled.fetch_add(1, Ordering::SeqCst);
            if gue {
                self.gue_ports.lock().expect("ports").insert(u16::from_be_bytes([f[l4], f[l4 + 1]]));
            }
        }
        if proto == 6 {
            let (to_vip, from_vip_to_client) = if v4 {
                (vip4(&f[30..34]), vip4(&f[26..30]) && f[30..34] == CLIENT_ADDR.octets())
            } else {
                (vip6(&f[38..54]), vip6(&f[22..38]) && f[38..54] == CLIENT6.octets())
            };
            if to_router && to_vip {
                self.bare.fetch_add(1, Ordering::SeqCst);
            }
            if from_vip_to_client {
                self.from_vip.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Counts until `stop`, on the balancer's bridge port.
    fn count(&self, lab: &LabGuard, stop: &AtomicBool) {
        let router = router_mac(lab);
        in_netns(&lab.ns("sw"), || {
            let sock = PacketSocket::open("p-lb");
            self.ready.store(true, Ordering::SeqCst);
            wait::repeat(Duration::from_mins(2), stop, || {
                if let Some(f) = sock.recv() {
                    self.classify(&f, router);
                }
            });
        })
        .expect("switch namespace");
    }
}

/// Publish/subscribe and TLS through IPIP and GUE in both families; every frame the balancer
/// sends towards the router is a tunnel frame, no reply crosses the balancer; sessions land on
/// the broker of their tunnel; `bpftool` shows each tunnelled real's mode and address.
#[test]
fn pubsub_and_tls_over_ipip_and_gue_in_both_families_return_directly() {
    require_root!();
    let lab = LabGuard::tunnelled(3);
    let lb = Balancer::start(&lab, &lab.config_tunnelled(&health()));
    // Every pair up: the VIP probes of b2 and b3 went through their tunnels (a bare probe
    // would reach no VIP: the brokers are not on the balancer's segment).
    wait_all_up(&lb);
    // `dsrlb status` says how each broker is reached.
    let status = lb.status();
    let forward = |l: &str, b: &str| status.backend(l, b).map(|s| s.forward);
    assert_eq!(
        (forward("mqtt", "b1"), forward("mqtt", "b2"), forward("mqtt", "b3")),
        (Some(Forward::L2), Some(Forward::Ipip), Some(Forward::Gue)),
        "{status:?}"
    );
    let (ok, text, _) = lb.cli(&["status"]);
    assert!(ok && text.contains("198.18.1.12 (ipip)") && text.contains("198.18.1.13 (gue)"), "{text}");
    let ca = std::fs::read(lab.ca_pem()).expect("lab CA");
    let (stop, wire) = (AtomicBool::new(false), Wire::default());
    std::thread::scope(|s| {
        s.spawn(|| wire.count(&lab, &stop));
        wait::until("the capture on the balancer's port", T, || wire.ready.load(Ordering::SeqCst));
        for (host, port, tls, id) in [
            (IpAddr::V4(VIP_IPIP), 1883, false, "ipip4"),
            (IpAddr::V4(VIP_GUE), 1883, false, "gue4"),
            (IpAddr::V6(VIP6_IPIP), 1883, false, "ipip6"),
            (IpAddr::V6(VIP6_GUE), 1883, false, "gue6"),
            (IpAddr::V4(VIP_IPIP), 8883, true, "ipip4-tls"),
            (IpAddr::V4(VIP_GUE), 8883, true, "gue4-tls"),
            (IpAddr::V6(VIP6_IPIP), 8883, true, "ipip6-tls"),
            (IpAddr::V6(VIP6_GUE), 8883, true, "gue6-tls"),
        ] {
            let got = pubsub(&lab, host, port, tls.then_some(ca.as_slice()), id, 20, 0);
            assert_eq!(got, 20, "{id}: messages lost through {host}:{port}");
        }
        stop.store(true, Ordering::SeqCst);
    });
    for (prefix, broker) in [("ipip", 1), ("gue", 2)] {
        for id in [format!("{prefix}4-sub"), format!("{prefix}6-pub"), format!("{prefix}4-tls-pub"), format!("{prefix}6-tls-sub")] {
            assert_eq!(lab.broker_of(&id), Some(broker), "{id} must land on b{}", broker + 1);
        }
    }
    // The brokers see the clients' own addresses (the client's first, or one of its others).
    let sessions: Vec<_> = (1..3).flat_map(|b| lab.sessions(b)).filter(|s| !s.client_id.starts_with("dsrlb-hc-")).collect();
    assert_eq!(sessions.len(), 16, "{sessions:?}");
    let clients: Vec<IpAddr> = std::iter::once(IpAddr::V4(CLIENT_ADDR))
        .chain(std::iter::once(IpAddr::V6(CLIENT6)))
        .chain(lab.client_extra_addrs6().into_iter().map(IpAddr::V6))
        .collect();
    assert!(sessions.iter().all(|s| clients.contains(&s.from.ip())), "{sessions:?}");
    let (tunnelled, bare, from_vip) = (wire.tunnelled.into_inner(), wire.bare.into_inner(), wire.from_vip.into_inner());
    assert!(tunnelled >= 8 * 10, "client frames to b2 and b3 must leave the balancer wrapped: saw {tunnelled}");
    assert_eq!(bare, 0, "a frame to a VIP went to the router unwrapped");
    assert_eq!(from_vip, 0, "broker replies crossed the balancer's port");

    // bpftool shows each tunnelled real's mode and broker address.
    let dump = lab
        .exec(&lab.ns("lb"), "bpftool", &["-j", "map", "dump", "pinned", &lab.pin_dir().join("REAL_TUNNELS").display().to_string()])
        .expect("bpftool map dump");
    let entries: serde_json::Value = serde_json::from_str(&dump).expect("bpftool JSON");
    let tunnels: Vec<(u64, Vec<u64>)> = entries
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|e| {
            let v = &e["formatted"]["value"];
            let mode = v["mode"].as_u64().filter(|&m| m != 0)?;
            let octets = v["dst"]["octets"].as_array()?.iter().filter_map(serde_json::Value::as_u64).collect();
            Some((mode, octets))
        })
        .collect();
    let has = |mode: u64, last: &[u64]| tunnels.iter().any(|(m, o)| *m == mode && o.ends_with(last));
    assert!(has(1, &[198, 18, 1, 12]), "b2's IPIP tunnel (mode 1 to ::ffff:198.18.1.12) in the dump: {tunnels:?}");
    assert!(has(2, &[198, 18, 1, 13]), "b3's GUE tunnel (mode 2 to ::ffff:198.18.1.13) in the dump: {tunnels:?}");
    assert!(has(2, &[0, 0x13]), "b3's IPv6 tunnel in the dump: {tunnels:?}");
}

fn verdict(lb: &Balancer, name: &str) -> u64 {
    let status = lb.status();
    status.verdicts.get(name).copied().unwrap_or_else(|| panic!("no verdict {name} in {status:?}"))
}

/// `n` connections (client ids `{prefix}-0..n`) to `vip`:1883, closed at once.
fn connect_many(lab: &LabGuard, vip: Ipv4Addr, prefix: &str, n: usize) {
    in_client(lab, || {
        for i in 0..n {
            MqttConn::connect(None, SocketAddrV4::new(vip, 1883), &format!("{prefix}-{i}"), T)
                .unwrap_or_else(|e| panic!("{prefix}-{i}: {e}"))
                .disconnect();
        }
    });
}

/// 200 connections spread over the L2 broker and the two tunnelled ones; GUE source ports follow
/// the flows; a tunnelled broker that fails is out within the usual bound and the others'
/// sessions live on; a drained tunnelled broker keeps its sessions and takes no new one.
#[test]
fn spread_gue_ports_failure_and_drain() {
    require_root!();
    let lab = LabGuard::tunnelled(3);
    let lb = Balancer::start(&lab, &lab.config_tunnelled(&health()));
    wait_all_up(&lb);

    connect_many(&lab, VIP, "spread", 200);
    let counts = lab.landed("spread", 200);
    assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
    assert!(counts.iter().all(|&n| n >= 40), "200 connections over b1 (l2), b2 (ipip), b3 (gue): {counts:?}");

    let (stop, wire) = (AtomicBool::new(false), Wire::default());
    std::thread::scope(|s| {
        s.spawn(|| wire.count(&lab, &stop));
        wait::until("the capture on the balancer's port", T, || wire.ready.load(Ordering::SeqCst));
        connect_many(&lab, VIP_GUE, "gue-ports", 200);
        stop.store(true, Ordering::SeqCst);
    });
    let ports = wire.gue_ports.into_inner().expect("ports");
    eprintln!("{} distinct GUE source ports over 200 flows", ports.len());
    assert!(ports.len() >= 32, "GUE source ports must vary by flow: {} distinct over 200 flows", ports.len());

    // Sessions held on every broker; then b3 (GUE) fails.
    let mut held = hold_sessions(&lab, "held", 60);
    let on = |b: usize| held.iter().filter(|(id, _)| lab.broker_of(id) == Some(b)).count();
    assert!((0..3).all(|b| on(b) > 0), "held sessions on every broker: {:?}", (0..3).map(on).collect::<Vec<_>>());
    let failed = std::time::Instant::now();
    lab.stop_broker(2).expect("stopping b3");
    wait::until("mqtt/b3 down", Duration::from_secs(5), || lb.state("mqtt", "b3") != "up");
    eprintln!("tunnelled broker b3 out after {:?}", failed.elapsed());
    let mut lost = Vec::new();
    for (id, c) in &mut held {
        if lab.broker_of(id) != Some(2) && c.ping().is_err() {
            lost.push(id.clone());
        }
    }
    assert!(lost.is_empty(), "sessions on b1 and b2 lost when b3 failed: {lost:?}");
    lab.start_broker(2).expect("restarting b3");
    wait_state(&lb, "mqtt", "b3", "up");

    // Drain b2 (IPIP): its sessions stay, new connections go elsewhere.
    let (ok, _, err) = lb.cli(&["drain", "b2"]);
    assert!(ok, "dsrlb drain b2: {err}");
    for (id, c) in held.iter_mut().filter(|(id, _)| lab.broker_of(id) == Some(1)) {
        c.ping().unwrap_or_else(|e| panic!("{id} on drained b2: {e}"));
    }
    connect_many(&lab, VIP, "after-drain", 60);
    let counts = lab.landed("after-drain", 60);
    assert_eq!(counts[1], 0, "a drained tunnelled broker took new connections: {counts:?}");
    for (_, c) in held {
        c.disconnect();
    }
}

/// A tunnelled broker without the decap program, or without the VIP, answers the plain probe
/// but not the probe through its tunnel: `vip-misconfigured`, and it gets no session.
#[test]
fn tunnelled_brokers_without_decap_or_vip_are_vip_misconfigured() {
    require_root!();
    let lab = LabGuard::tunnelled(3);
    let lb = Balancer::start(&lab, &lab.config_tunnelled(&health()));
    wait_all_up(&lb);

    // b2 without decap.
    let root = lab.decap_pin_root(1).display().to_string();
    lab.exec(&lab.broker_ns(1), &tests::dsrlb_bin().display().to_string(), &["decap", "detach", "eth0", "--pin-root", &root])
        .expect("dsrlb decap detach on b2");
    wait_state(&lb, "mqtt", "b2", "vip-misconfigured");
    connect_many(&lab, VIP, "no-decap", 40);
    let counts = lab.landed("no-decap", 40);
    assert_eq!((counts.iter().sum::<usize>(), counts[1]), (40, 0), "b2 without decap got sessions: {counts:?}");
    lab.setup_tunnelled_broker(1, &[]).expect("decap back on b2");
    wait_state(&lb, "mqtt", "b2", "up");

    // b3 without the VIP.
    lab.set_broker_vip(2, false).expect("removing the VIP from b3");
    wait_state(&lb, "mqtt", "b3", "vip-misconfigured");
    assert_eq!(lb.state("gue", "b3"), "up", "b3 still holds its own listener's VIP");
    connect_many(&lab, VIP, "no-vip", 40);
    let counts = lab.landed("no-vip", 40);
    assert_eq!((counts.iter().sum::<usize>(), counts[2]), (40, 0), "b3 without the VIP got sessions: {counts:?}");
    lab.set_broker_vip(2, true).expect("the VIP back on b3");
    wait_state(&lb, "mqtt", "b3", "up");

    // A tunnelled broker whose route leaves by another interface than the balancer's: a reload
    // that adds one is refused, naming it, and changes nothing.
    lab.exec(&lab.ns("lb"), "ip", &["route", "add", "203.0.113.0/24", "dev", "lo"]).expect("a route out of lo");
    lab.exec(&lab.ns("lb"), "ip", &["-6", "route", "add", "2001:db8:ffff::/48", "dev", "lo"]).expect("an IPv6 route out of lo");
    let config = std::fs::read_to_string(&lb.config).expect("config");
    let bad =
        format!("{config}\n[[backend]]\nname = \"b9\"\naddress = \"203.0.113.9\"\naddress6 = \"2001:db8:ffff::9\"\nforward = \"ipip\"\n");
    std::fs::write(&lb.config, bad).expect("writing the config");
    let (ok, _, err) = lb.cli(&["reload"]);
    assert!(!ok && err.contains("backend b9 (203.0.113.9)") && err.contains("not eth0"), "{err}");
    assert!(lb.status().listeners.iter().all(|l| l.backends.iter().all(|b| b.name != "b9")), "half-applied");
    assert_eq!(lb.state("mqtt", "b2"), "up", "the running state is unchanged");
}

/// The gateways named by dsrlb's probe tables in the balancer's namespace (`ip route show table
/// all`, tables `0xd5b00..0xd5c00`), of one family.
fn probe_gateways(lab: &LabGuard, v6: bool) -> BTreeSet<String> {
    let family = if v6 { "-6" } else { "-4" };
    let text = lab.exec(&lab.ns("lb"), "ip", &[family, "route", "show", "table", "all"]).expect("ip route show table all");
    let mut gateways = BTreeSet::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |w: &str| words.iter().position(|x| *x == w).and_then(|i| words.get(i + 1)).copied();
        let ours = after("table").and_then(|t| t.parse::<u32>().ok()).is_some_and(|t| (0xd5b00..0xd5c00).contains(&t));
        if let (true, Some(gw)) = (ours, after("via")) {
            gateways.insert(gw.to_owned());
        }
    }
    gateways
}

/// The route to the tunnelled brokers' network moves to another gateway (another interface of
/// the router, with a MAC of its own), then the old one goes away: the data path sends the
/// tunnelled brokers' frames to the new gateway's MAC, and the probes follow the new next hop
/// too, so the tunnelled brokers stay up and keep taking sessions. And a controller started
/// while that route is missing probes them along it once it comes.
#[test]
fn probes_follow_a_tunnelled_brokers_route_to_a_new_next_hop() {
    require_root!();
    let lab = LabGuard::tunnelled(3);
    let mut lb = Balancer::start(&lab, &lab.config_tunnelled(&health()));
    wait_all_up(&lb);
    let (dc, lbns) = (lab.ns("dc"), lab.ns("lb"));
    let (old4, old6) = (tests::lab::DC_ROUTER.to_string(), tests::lab::DC_ROUTER6.to_string());
    let (new4, new6) = ("192.0.2.253", "2001:db8::fd");
    assert!(probe_gateways(&lab, false).contains(&old4) && probe_gateways(&lab, true).contains(&old6), "no probe route via the router");
    let old_mac = lb_userspace::config::format_mac(router_mac(&lab));
    assert_eq!(lb.status().backend("mqtt", "b2").expect("mqtt/b2").mac, old_mac, "b2's frames go to the router");
    // A second gateway on the router: a macvlan on its segment port, and the balancer's routes
    // to the brokers' network move to it. (ARP for it answered by it alone: by default Linux
    // answers for any of its addresses on any interface, here with the old gateway's MAC.)
    lab.exec(&dc, "sysctl", &["-qw", "net.ipv4.conf.all.arp_ignore=1"]).expect("arp_ignore");
    lab.exec(&dc, "ip", &["link", "add", "gw2", "link", "eth0", "type", "macvlan", "mode", "bridge"]).expect("a second gateway");
    lab.exec(&dc, "ip", &["addr", "add", &format!("{new4}/24"), "dev", "gw2"]).expect("its address");
    lab.exec(&dc, "ip", &["-6", "addr", "add", &format!("{new6}/64"), "dev", "gw2", "nodad"]).expect("its IPv6 address");
    lab.exec(&dc, "ip", &["link", "set", "gw2", "up"]).expect("gw2 up");
    let text = lab.exec(&dc, "ip", &["-br", "link", "show", "gw2"]).expect("gw2's MAC");
    let new_mac = text.split_whitespace().nth(2).expect("ip -br link: name, state, MAC").to_owned();
    lab.exec(&lbns, "ip", &["route", "replace", "198.18.1.0/24", "via", new4]).expect("moving the route");
    lab.exec(&lbns, "ip", &["-6", "route", "replace", "2001:db8:b::/64", "via", new6]).expect("moving the IPv6 route");
    // Both follow within the 5 s the next hops are asked for again: the data path (the MAC in
    // use) and the probe routes.
    wait::until_every("the data path and the probe routes to follow", Duration::from_secs(20), Duration::from_millis(200), || {
        let (g4, g6) = (probe_gateways(&lab, false), probe_gateways(&lab, true));
        let mac = lb.status().backend("mqtt", "b2").expect("mqtt/b2").mac.clone();
        if g4.contains(new4) && !g4.contains(&old4) && g6.contains(new6) && !g6.contains(&old6) && mac == new_mac {
            Ok(())
        } else {
            Err(format!("probe gateways {g4:?} {g6:?}, b2's MAC {mac} (new gateway's {new_mac})"))
        }
    });
    // The old gateway goes away: a probe or a frame still sent there would be lost.
    lab.exec(&dc, "ip", &["addr", "del", &format!("{old4}/24"), "dev", "eth0"]).expect("removing the old address");
    lab.exec(&dc, "ip", &["-6", "addr", "del", &format!("{old6}/64"), "dev", "eth0"]).expect("removing the old address");
    for (family, addr) in [("-4", old4.as_str()), ("-6", old6.as_str())] {
        let _ = lab.exec(&lbns, "ip", &[family, "neigh", "del", addr, "dev", "eth0"]);
    }
    // Ten more probes of each tunnelled pair: up, and at most an isolated failure (this
    // machine may be busy; a probe left on the old gateway would fail every time).
    let pairs = [("mqtt", "b2"), ("mqtt", "b3"), ("mqtt6", "b2"), ("mqtt6", "b3")];
    let counts = |lb: &Balancer| {
        let s = lb.status();
        pairs.map(|(l, b)| s.backend(l, b).map_or_else(|| panic!("no {l}/{b}"), |b| (b.checks, b.check_failures)))
    };
    let before = counts(&lb);
    let after = wait::until_every("ten more probes of each pair", Duration::from_secs(30), Duration::from_millis(200), || {
        let now = counts(&lb);
        if now.iter().zip(&before).all(|(n, b)| n.0 >= b.0 + 10) { Ok(now) } else { Err(format!("{now:?}")) }
    });
    for (((l, b), n), was) in pairs.iter().zip(&after).zip(&before) {
        assert!(n.1 <= was.1 + 1, "{l}/{b}: {} of {} probes failed after the old gateway went away", n.1 - was.1, n.0 - was.0);
        assert_eq!(lb.state(l, b), "up", "{l}/{b}");
    }
    // And the clients' sessions reach the tunnelled brokers through the new gateway.
    connect_many(&lab, VIP_IPIP, "moved-ipip", 10);
    assert_eq!(lab.landed("moved-ipip", 10)[1], 10, "sessions through IPIP after the move");
    connect_many(&lab, VIP_GUE, "moved-gue", 10);
    assert_eq!(lab.landed("moved-gue", 10)[2], 10, "sessions through GUE after the move");

    // A controller that starts while the route to the brokers' network is missing (BGP not
    // settled yet): the tunnelled brokers get no probe route then, nor a rule; once the route
    // comes, the probes get both, and every pair comes up.
    lab.exec(&lbns, "ip", &["route", "del", "198.18.1.0/24"]).expect("removing the route");
    lab.exec(&lbns, "ip", &["-6", "route", "del", "2001:db8:b::/64"]).expect("removing the IPv6 route");
    assert!(lb.stop().success(), "dsrlb exited with an error on SIGTERM");
    lb.restart(&lab);
    wait_state(&lb, "mqtt", "b2", "no-mac");
    assert!(!probe_gateways(&lab, false).contains(new4), "a probe route via the gateway of a route that is gone");
    lab.exec(&lbns, "ip", &["route", "add", "198.18.1.0/24", "via", new4]).expect("the route back");
    lab.exec(&lbns, "ip", &["-6", "route", "add", "2001:db8:b::/64", "via", new6]).expect("the IPv6 route back");
    wait_all_up(&lb);
}

/// Publishes through each tunnel: one 1,400-byte and one 256 KB message; all must arrive.
fn big_publishes(lab: &LabGuard, round: &str) {
    for (host, name) in
        [(IpAddr::V4(VIP_IPIP), "ipip4"), (IpAddr::V4(VIP_GUE), "gue4"), (IpAddr::V6(VIP6_IPIP), "ipip6"), (IpAddr::V6(VIP6_GUE), "gue6")]
    {
        for size in [1400, 256 * 1024] {
            let id = format!("{round}-{name}-{size}");
            assert_eq!(pubsub(lab, host, 1883, None, &id, 1, size), 1, "{id}: a {size}-byte PUBLISH through {host} was lost");
        }
    }
}

/// Forgets what the client learned of the paths (its PMTU exceptions).
fn flush_client_paths(lab: &LabGuard) {
    for fam in ["-4", "-6"] {
        lab.exec(&lab.ns("client"), "ip", &[fam, "route", "flush", "cache"]).expect("ip route flush cache");
    }
}

/// The path MTU: full-size segments from the client do not fit a 1500-byte path once wrapped.
/// Without a clamp the balancer answers them with ICMP "fragmentation needed" / "packet too
/// big" and big messages still arrive; with `backend-setup.sh --advmss 1432` on the brokers the
/// clients never send a segment that needs it.
#[test]
fn path_mtu_by_icmp_and_by_the_advmss_clamp() {
    require_root!();
    let lab = LabGuard::tunnelled(3);
    let lb = Balancer::start(&lab, &lab.config_tunnelled(&health()));
    wait_all_up(&lb);

    flush_client_paths(&lab);
    let before = verdict(&lb, "tx/too_big_answered");
    big_publishes(&lab, "icmp");
    let answered = verdict(&lb, "tx/too_big_answered") - before;
    eprintln!("without the clamp: {answered} frames answered with ICMP too big");
    assert!(answered > 0, "full-size segments must have met the tunnel's MTU and been answered");
    assert_eq!(verdict(&lb, "drop/too_big"), 0, "the clients set DF: nothing is dropped");

    for b in [1, 2] {
        let out = lab.setup_tunnelled_broker(b, &["--advmss", "1432"]).expect("backend-setup.sh --advmss");
        assert!(
            out.contains("ok    advmss 1432 on the -4 default route") && out.contains("ok    advmss 1392 on the -6 default route"),
            "{out}"
        );
    }
    flush_client_paths(&lab);
    let before = verdict(&lb, "tx/too_big_answered");
    big_publishes(&lab, "clamped");
    assert_eq!(verdict(&lb, "tx/too_big_answered"), before, "with advmss clamped no segment may need the ICMP answer");
}
