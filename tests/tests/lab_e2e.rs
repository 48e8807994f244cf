//! End to end in the lab: real mosquitto brokers, real MQTT clients, `dsrlb run` in the
//! balancer's namespace. These prove direct server return rather than assume it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tests::{
    balancer::{Balancer, xdp_attached},
    client::MqttConn,
    lab::{self, INTERNAL_PORT, LabGuard, VIP, VIP_INTERNAL, WireCount},
    netns::in_netns,
    require_root, wait,
};

const T: Duration = Duration::from_secs(5);

fn in_client<R: Send>(lab: &LabGuard, f: impl FnOnce() -> R + Send) -> R {
    in_netns(&lab.ns("client"), f).expect("entering the client namespace")
}

/// Opens `n` sessions to `to` from `from`, ids `{prefix}-{i}`, and closes each after CONNACK.
fn sessions(lab: &LabGuard, from: Option<Ipv4Addr>, to: SocketAddrV4, prefix: &str, n: usize) {
    in_client(lab, || {
        for i in 0..n {
            let c =
                MqttConn::connect(from, to, &format!("{prefix}-{i}"), T).unwrap_or_else(|e| panic!("session {prefix}-{i} to {to}: {e}"));
            c.disconnect();
        }
    });
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// Subscribes with rumqttc (3.1.1 or 5), publishes `n` messages with another client, returns
/// how many the subscriber got.
fn pubsub(lab: &LabGuard, v5: bool, tls: Option<&[u8]>, port: u16, topic: &str, n: usize) -> usize {
    in_client(lab, || {
        if v5 {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(pubsub_v5(port, topic, n))
        } else {
            tests::mqtt::pubsub(&VIP.to_string(), port, tls, topic.trim_end_matches("/#"), topic, n)
        }
    })
}

async fn pubsub_v5(port: u16, topic: &str, n: usize) -> usize {
    use rumqttc::v5::{
        AsyncClient, Event as E5, MqttOptions as O5,
        mqttbytes::{QoS as Q5, v5::Packet as P5},
    };
    let (sub, mut sub_loop) = AsyncClient::new(O5::new("sub5", VIP.to_string(), port), 64);
    sub.subscribe(topic, Q5::AtLeastOnce).await.expect("subscribe");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let E5::Incoming(P5::SubAck(_)) = tokio::time::timeout_at(deadline, sub_loop.poll()).await.expect("SUBACK").expect("sub") {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (publ, mut pub_loop) = AsyncClient::new(O5::new("pub5", VIP.to_string(), port), 64);
    let base = topic.trim_end_matches("/#").to_owned();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            publ.publish(format!("{base}/{i}"), Q5::AtLeastOnce, false, format!("m{i}")).await.expect("publish");
        }
        let mut acked = 0;
        while acked < n {
            if let Ok(E5::Incoming(P5::PubAck(_))) = pub_loop.poll().await {
                acked += 1;
            }
        }
    });
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got < n {
        match tokio::time::timeout_at(deadline, sub_loop.poll()).await {
            Ok(Ok(E5::Incoming(P5::Publish(_)))) => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber: {e}"),
            Err(_) => break,
        }
    }
    tokio::time::timeout(T, publisher).await.expect("publisher finished").expect("publisher task");
    got
}

#[test]
fn publish_and_subscribe_through_the_vip_v311_and_v5() {
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let got = pubsub(&lab, false, None, 1883, "e2e/v311/#", 20);
    assert_eq!(got, 20, "MQTT 3.1.1: messages lost");
    let got = pubsub(&lab, true, None, 1883, "e2e/v5/#", 20);
    assert_eq!(got, 20, "MQTT 5: messages lost");
}

#[test]
fn tls_through_the_vip_verifies_the_lab_ca() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let ca = std::fs::read(lab.ca_pem()).expect("lab CA");
    let got = pubsub(&lab, false, Some(&ca), 8883, "e2e/tls/#", 10);
    assert_eq!(got, 10, "TLS: messages lost");
    // TLS is end to end: nothing in the balancer's namespace listens on 8883, so the handshake
    // the client verified against the lab CA was a broker's.
    let listening = lab.exec(&lab.ns("lb"), "ss", &["-Hltn", "sport = :8883"]).expect("ss");
    assert!(listening.trim().is_empty(), "something in the balancer's namespace listens on 8883: {listening}");
    assert!(lb.attached());
}

#[test]
fn return_traffic_bypasses_the_balancer_and_brokers_see_the_client() {
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let (stop, wire) = (AtomicBool::new(false), WireCount::default());
    std::thread::scope(|s| {
        // TCP over IPv4 to the VIP, and from it.
        s.spawn(|| {
            wire.count(&lab, &stop, |f| {
                let tcp4 = f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 6;
                (tcp4 && f[30..34] == VIP.octets(), tcp4 && f[26..30] == VIP.octets())
            });
        });
        wait::until("the capture on the balancer's port", Duration::from_secs(5), || wire.ready.load(Ordering::SeqCst));
        in_client(&lab, || {
            for i in 0..10 {
                let mut c = MqttConn::connect(None, vip(1883), &format!("dsr-{i}"), T).expect("connect via VIP");
                for _ in 0..5 {
                    c.ping().expect("PINGRESP through DSR");
                }
                c.disconnect();
            }
        });
        // Every client frame has crossed the balancer's port by now; let the capture read them.
        wait::until("the client's frames on the balancer's port", Duration::from_secs(5), || wire.to_vip.load(Ordering::SeqCst) >= 10 * 8);
        stop.store(true, Ordering::SeqCst);
    });
    let (to_vip, from_vip) = (wire.to_vip.into_inner(), wire.from_vip.into_inner());
    assert!(to_vip >= 10 * 8, "client-to-VIP frames must cross the balancer: saw {to_vip}");
    assert_eq!(from_vip, 0, "broker-to-client frames crossed the balancer's wire");

    // The brokers saw the client's own address, never the balancer's.
    let all: Vec<_> = (0..lab.brokers).flat_map(|b| lab.sessions(b)).filter(|s| s.client_id.starts_with("dsr-")).collect();
    assert_eq!(all.len(), 10, "{all:?}");
    assert!(all.iter().all(|s| s.from.ip() == lab::CLIENT_ADDR), "brokers saw {all:?}");
}

#[test]
fn connections_spread_over_brokers() {
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    sessions(&lab, None, vip(1883), "spread", 200);
    let counts = lab.landed("spread", 200);
    assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
    for (b, n) in counts.iter().enumerate() {
        assert!(*n >= 60, "broker b{} got {n} of 200 (< 30%): {counts:?}", b + 1);
    }
}

#[test]
fn several_listeners_each_with_its_own_ring() {
    require_root!();
    let lab = LabGuard::up(3);
    // The internal listener on the second VIP uses only b3; the external ones use b1 and b2.
    let config = lab
        .config("check = \"none\"")
        .replace("port = 1883\n", "port = 1883\nbackends = [\"b1\", \"b2\"]\n")
        .replace("port = 8883\n", "port = 8883\nbackends = [\"b1\", \"b2\"]\n")
        .replace(&format!("port = {INTERNAL_PORT}\n"), &format!("port = {INTERNAL_PORT}\nbackends = [\"b3\"]\n"));
    let _lb = Balancer::start(&lab, &config);
    sessions(&lab, None, vip(1883), "ext", 40);
    sessions(&lab, None, SocketAddrV4::new(VIP_INTERNAL, INTERNAL_PORT), "int", 40);
    let ext = lab.landed("ext", 40);
    let int = lab.landed("int", 40);
    assert_eq!(ext[2], 0, "external listener reached b3: {ext:?}");
    assert!(ext[0] > 0 && ext[1] > 0, "external listener used one broker only: {ext:?}");
    assert_eq!(int, vec![0, 0, 40], "internal listener must use b3 only");

    // 8883 is its own listener too: a TLS session lands on b1 or b2.
    let ca = std::fs::read(lab.ca_pem()).expect("CA");
    in_client(&lab, || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let mut o = MqttOptions::new("tls-listener", VIP.to_string(), 8883);
            o.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
            let (_c, mut ev) = rumqttc::AsyncClient::new(o, 8);
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) =
                    tokio::time::timeout(T, ev.poll()).await.expect("CONNACK in time").expect("TLS connect")
                {
                    break;
                }
            }
        });
    });
    let b = lab.broker_of("tls-listener").expect("some broker logged the TLS session");
    assert!(b < 2, "8883 reached b3");
}

#[test]
fn source_hash_keeps_each_client_address_on_one_broker() {
    require_root!();
    let lab = LabGuard::up(2);
    let config = lab.config("check = \"none\"").replace("port = 1883\n", "port = 1883\nhash = \"source\"\n");
    let _lb = Balancer::start(&lab, &config);
    let mut per_addr: BTreeMap<Ipv4Addr, BTreeSet<usize>> = BTreeMap::new();
    for k in 0..8u8 {
        let from = Ipv4Addr::new(192, 0, 2, lab::CLIENT_EXTRA_BASE + k);
        let prefix = format!("src{k}");
        sessions(&lab, Some(from), vip(1883), &prefix, 15);
        let counts = lab.landed(&prefix, 15);
        assert_eq!(counts.iter().sum::<usize>(), 15);
        per_addr.insert(from, counts.iter().enumerate().filter(|(_, n)| **n > 0).map(|(b, _)| b).collect());
    }
    assert!(per_addr.values().all(|b| b.len() == 1), "a client address spread over brokers: {per_addr:?}");
    let used: BTreeSet<usize> = per_addr.values().flatten().copied().collect();
    assert_eq!(used.len(), 2, "8 client addresses all landed on one broker: {per_addr:?}");
}

#[test]
fn weights_three_to_one() {
    require_root!();
    let lab = LabGuard::up(2);
    let config = lab.config("check = \"none\"").replace("name = \"b1\"\n", "name = \"b1\"\nweight = 300\n");
    let _lb = Balancer::start(&lab, &config);
    sessions(&lab, None, vip(1883), "w", 400);
    let counts = lab.landed("w", 400);
    assert_eq!(counts.iter().sum::<usize>(), 400);
    let share = counts[0] as f64 / 400.0 * 100.0;
    assert!((65.0..=85.0).contains(&share), "b1 (weight 3) got {share:.1}% of 400: {counts:?}");
}

#[test]
fn stopped_balancer_leaves_nothing_attached_and_stops_forwarding() {
    require_root!();
    let lab = LabGuard::up(2);
    let mut lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    in_client(&lab, || MqttConn::connect(None, vip(1883), "before-stop", T).expect("served while running").disconnect());
    // SIGTERM ends the controller, not the forwarding.
    let status = lb.stop();
    assert!(status.success(), "dsrlb exited with {status}");
    assert!(xdp_attached(&lab.ns("lb")), "SIGTERM must leave the pinned program attached");
    in_client(&lab, || MqttConn::connect(None, vip(1883), "between", T).expect("forwarding without a controller").disconnect());
    // `dsrlb stop` is what stops it for good.
    let (ok, out, err) = lb.cli(&["stop"]);
    assert!(ok, "dsrlb stop without a controller: {out}{err}");
    assert!(!xdp_attached(&lab.ns("lb")), "XDP program still attached after dsrlb stop");
    assert!(!lab.pin_dir().join("link").exists(), "pins left behind");
    let after = in_client(&lab, || MqttConn::connect(None, vip(1883), "after-stop", Duration::from_secs(2)));
    assert!(after.is_err(), "the VIP still answered after the balancer stopped");
}

#[test]
fn blocking_client_example_works_through_the_vip() {
    // rumqttc's blocking client too, as an operator's script would use it.
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let ok = in_client(&lab, || {
        let (client, mut conn) = Client::new(MqttOptions::new("blocking", VIP.to_string(), 1883), 8);
        client.publish("e2e/blocking", QoS::AtLeastOnce, false, "x").expect("queue publish");
        conn.iter().take(20).any(|e| matches!(e, Ok(Event::Incoming(Packet::PubAck(_)))))
    });
    assert!(ok, "no PUBACK through the VIP");
}
