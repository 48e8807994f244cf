//! IPv6 end to end in the dual-stack lab: IPv6 listeners (1883, and 8883 with TLS) beside the
//! IPv4 ones, real mosquitto brokers listening on both families, health checks and the DSR-path
//! VIP probe over IPv6, backends known by their IPv6 address alone (MACs from NDP), and brokers
//! that hold the VIP on `lo` without answering neighbour solicitations for it.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tests::{
    balancer::{Balancer, StatusExt as _},
    client::MqttConn,
    frame::checksum,
    lab::{self, CLIENT6, LabGuard, VIP6, WireCount, broker_addr6},
    netns::{PacketSocket, in_netns},
    require_root, wait,
};

const T: Duration = Duration::from_secs(5);

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), port)
}

fn in_client<R: Send>(lab: &LabGuard, f: impl FnOnce() -> R + Send) -> R {
    in_netns(&lab.ns("client"), f).expect("entering the client namespace")
}

/// Health checks over IPv6: MQTT on 1883, MQTT over TLS (against the lab CA) on 8883, both
/// with the DSR-path VIP probe (on by default).
fn health() -> String {
    "check = \"mqtt\"\ninter = \"300ms\"\ntimeout = \"250ms\"\nfall = 2\nrise = 1".to_owned()
}

fn wait_state(lb: &Balancer, listener: &str, backend: &str, want: &str) {
    wait::until(format!("{listener}/{backend} {want}"), Duration::from_secs(15), || lb.state(listener, backend) == want);
}

/// Publishes `n` QoS 1 messages through `VIP6:port` (TLS when `ca` is given, verified against
/// it by the VIP's address) to a subscriber there; how many arrived.
fn pubsub6(lab: &LabGuard, ca: Option<&[u8]>, port: u16, topic: &str, n: usize) -> usize {
    in_client(lab, || tests::mqtt::pubsub(&VIP6.to_string(), port, ca, &format!("v6-{port}"), topic, n))
}

#[test]
fn ipv6_pubsub_tls_health_checks_and_direct_return() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.tls_checked(&lab.config_dual(&health())));
    // The checks reach the brokers over IPv6, by their own address and along the DSR path to
    // the VIP6 (policy routing of the probe's mark).
    for b in ["b1", "b2"] {
        for l in ["mqtt6", "mqtts6", "mqtt"] {
            wait_state(&lb, l, b, "up");
        }
    }
    let status = lb.status();
    let l6 = status.listener("mqtt6").expect("mqtt6 in status");
    assert_eq!(l6.vip, IpAddr::V6(VIP6), "status shows the IPv6 VIP: {l6:?}");

    assert_eq!(pubsub6(&lab, None, 1883, "v6/plain/#", 20), 20, "MQTT over the IPv6 VIP: messages lost");
    let ca = std::fs::read(lab.ca_pem()).expect("lab CA");
    assert_eq!(pubsub6(&lab, Some(&ca), 8883, "v6/tls/#", 10), 10, "MQTT over TLS over the IPv6 VIP: messages lost");
    // IPv4 still works beside it.
    in_client(&lab, || {
        MqttConn::connect(None, std::net::SocketAddrV4::new(lab::VIP, 1883), "v4-beside", T).expect("IPv4 VIP beside IPv6").disconnect();
    });

    // Direct return on the wire: the client's frames to the VIP6 cross the balancer's port,
    // none from the VIP6 does.
    let (stop, wire) = (AtomicBool::new(false), WireCount::default());
    let held = std::thread::scope(|s| {
        // TCP over IPv6 to the VIP6, and from it to the client (the health checks' DSR-path
        // probes from the balancer itself get their answers from the VIP6 on this port, as they
        // must).
        s.spawn(|| {
            wire.count(&lab, &stop, |f| {
                let tcp6 = f.len() >= 54 && f[12..14] == [0x86, 0xdd] && f[20] == 6;
                (tcp6 && f[38..54] == VIP6.octets(), tcp6 && f[22..38] == VIP6.octets() && f[38..54] == CLIENT6.octets())
            });
        });
        wait::until("the capture on the balancer's port", T, || wire.ready.load(Ordering::SeqCst));
        let held = in_client(&lab, || {
            let mut kept = None;
            for i in 0..10 {
                let mut c = MqttConn::connect_ip(Some(CLIENT6.into()), vip6(1883), &format!("dsr6-{i}"), T).expect("connect via VIP6");
                for _ in 0..5 {
                    c.ping().expect("PINGRESP through DSR over IPv6");
                }
                if i == 0 {
                    kept = Some(c);
                } else {
                    c.disconnect();
                }
            }
            kept.expect("one session kept")
        });
        wait::until("the client's IPv6 frames on the balancer's port", T, || wire.to_vip.load(Ordering::SeqCst) >= 10 * 7);
        stop.store(true, Ordering::SeqCst);
        held
    });
    let (to_vip, from_vip) = (wire.to_vip.into_inner(), wire.from_vip.into_inner());
    assert!(to_vip >= 10 * 7, "client-to-VIP6 frames must cross the balancer: saw {to_vip}");
    assert_eq!(from_vip, 0, "broker-to-client IPv6 frames crossed the balancer's wire");
    let all: Vec<_> = (0..lab.brokers).flat_map(|b| lab.sessions(b)).filter(|s| s.client_id.starts_with("dsr6-")).collect();
    assert_eq!(all.len(), 10, "{all:?}");
    assert!(all.iter().all(|s| s.from.ip() == CLIENT6), "brokers saw {all:?}");

    // `dsrlb flow` names the held IPv6 flow readably, from the flow table.
    let (ok, out, err) = lb.cli(&["flow", &held.local.to_string(), &vip6(1883).to_string(), "--json"]);
    assert!(ok, "dsrlb flow over IPv6: {err}");
    let flow: serde_json::Value = serde_json::from_str(&out).expect("flow JSON");
    assert_eq!(flow["source"], "flow table", "{flow}");
    assert_eq!(flow["listener"], "mqtt6", "{flow}");
    let broker = lab.broker_of("dsr6-0").expect("dsr6-0 logged");
    assert_eq!(flow["backend"], format!("b{}", broker + 1), "dsrlb flow names the broker that has the session: {flow}");
    held.disconnect();
}

#[test]
fn ipv6_connections_spread_over_brokers() {
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config_dual("check = \"none\""));
    in_client(&lab, || {
        for i in 0..200 {
            MqttConn::connect_ip(None, vip6(1883), &format!("spread6-{i}"), T).unwrap_or_else(|e| panic!("spread6-{i}: {e}")).disconnect();
        }
    });
    let counts = lab.landed("spread6", 200);
    assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
    for (b, n) in counts.iter().enumerate() {
        assert!(*n >= 60, "broker b{} got {n} of 200 IPv6 connections (< 30%): {counts:?}", b + 1);
    }
}

#[test]
fn ipv6_only_backends_resolve_by_ndp_and_a_broker_failure_keeps_the_others_sessions() {
    require_root!();
    let lab = LabGuard::up(2);
    // Backends named by their IPv6 address alone: their MACs can only come from NDP.
    let lb = Balancer::start(&lab, &lab.tls_checked(&lab.config_v6_only(&health())));
    for b in ["b1", "b2"] {
        wait_state(&lb, "mqtt6", b, "up");
    }
    // "up" needs a MAC ("no-mac" before): here only NDP could have given it.
    let status = lb.status();
    let l6 = status.listener("mqtt6").expect("mqtt6 in status");
    for b in &l6.backends {
        assert!(b.mac.len() == 17 && b.mac != "unresolved", "backend resolved by NDP: {b:?}");
        assert!(b.address.is_none() && b.address6.is_some(), "an IPv6-only backend: {b:?}");
    }
    let held: Vec<(String, MqttConn)> = in_client(&lab, || {
        (0..40)
            .map(|i| {
                let id = format!("held6-{i}");
                let c = MqttConn::connect_ip(None, vip6(1883), &id, T).unwrap_or_else(|e| panic!("{id}: {e}"));
                (id, c)
            })
            .collect()
    });
    let counts = lab.landed("held6", 40);
    assert!(counts.iter().all(|&n| n > 0), "held sessions on both brokers: {counts:?}");

    // b2 dies: its listener pairs go down; every session on b1 lives on, and new sessions go
    // to b1.
    lab.stop_broker(1).expect("stopping b2");
    wait_state(&lb, "mqtt6", "b2", "down");
    let on_b1: Vec<&(String, MqttConn)> = held.iter().filter(|(id, _)| lab.broker_of(id) == Some(0)).collect();
    assert_eq!(on_b1.len(), counts[0]);
    in_client(&lab, || {
        for (id, c) in &held {
            if lab.broker_of(id) == Some(0) {
                let mut s = c.stream.try_clone().expect("clone");
                std::io::Write::write_all(&mut s, &lb_userspace::mqtt::PINGREQ).expect("PINGREQ");
                let mut resp = [0u8; 2];
                std::io::Read::read_exact(&mut s, &mut resp).unwrap_or_else(|e| panic!("{id} on b1 lost after b2 died: {e}"));
                assert_eq!(resp, lb_userspace::mqtt::PINGRESP, "{id}");
            }
        }
        for i in 0..20 {
            MqttConn::connect_ip(None, vip6(1883), &format!("after6-{i}"), T)
                .unwrap_or_else(|e| panic!("new session after6-{i} with b2 down: {e}"))
                .disconnect();
        }
    });
    assert_eq!(lab.landed("after6", 20)[0], 20, "new IPv6 sessions all go to the live broker");
}

/// A neighbour solicitation from `src` (MAC `src_mac`) for `target`, to its solicited-node
/// multicast group.
fn neighbour_solicitation(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&src_mac);
    let mut pseudo = 0u32;
    for w in src.octets().chunks(2).chain(group.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += u32::try_from(icmp.len()).expect("fits") + 58;
    let csum = checksum(&icmp, pseudo);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(icmp.len()).expect("fits").to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&group.octets());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn brokers_do_not_answer_neighbour_solicitations_for_the_vip6() {
    require_root!();
    let lab = LabGuard::up(2);
    let link = lab.exec(&lab.ns("client"), "ip", &["-j", "link", "show", "eth0"]).expect("ip link");
    let link: serde_json::Value = serde_json::from_str(&link).expect("ip -j");
    let mac: Vec<u8> =
        link[0]["address"].as_str().expect("client MAC").split(':').map(|b| u8::from_str_radix(b, 16).expect("hex")).collect();
    let mac: [u8; 6] = mac.try_into().expect("6 bytes");
    // The solicitation for the VIP6 first, then one for b1's own address as the control: once
    // b1's advertisement is back, one for the VIP6 would have been too.
    let (vip_answers, control) = in_client(&lab, || {
        let sock = PacketSocket::open("eth0");
        sock.send(&neighbour_solicitation(mac, CLIENT6, VIP6));
        sock.send(&neighbour_solicitation(mac, CLIENT6, broker_addr6(0)));
        let (mut vip_answers, mut control) = (0, false);
        // Each receive waits up to 200 ms on its own.
        let _ = wait::within(T, Duration::ZERO, || {
            if let Some(f) = sock.recv()
                && f.len() >= 78
                && f[12..14] == [0x86, 0xdd]
                && f[20] == 58
                && f[54] == 136
            {
                if f[62..78] == VIP6.octets() {
                    vip_answers += 1;
                }
                control |= f[62..78] == broker_addr6(0).octets();
            }
            control
        });
        (vip_answers, control)
    });
    assert!(control, "b1 did not advertise its own address: the check cannot tell anything");
    assert_eq!(vip_answers, 0, "a broker answered a neighbour solicitation for the VIP6 it holds on lo");
}
