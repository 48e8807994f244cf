//! `ring_seed_file` in the data plane: client ports picked with the public flow hash and the
//! unseeded ring to all land on one broker do, until the ring is seeded; then new connections
//! from them spread over every broker, while the connections already open stay on the broker
//! the flow table pins them to. Through `BPF_PROG_TEST_RUN`.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt as _, path::PathBuf};

use tests::{
    fixture::{CLIENT, Lb, VIP, XDP_TX, syn},
    frame::{Ipv4Frame, TCP_ACK},
    require_root,
};

const BACKENDS: [(&str, u8, u32); 3] = [("b1", 11, 100), ("b2", 12, 100), ("b3", 13, 100)];

/// A seed file as the config wants it: owner-only.
fn seed_file(name: &str, secret: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsrlb-ring-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, secret).expect("writing the seed");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn config(seed: Option<&PathBuf>) -> lb_userspace::config::Config {
    let text = Lb::config_text(&BACKENDS);
    Lb::parse(&match seed {
        None => text,
        Some(p) => format!("ring_seed_file = \"{}\"\n{text}", p.display()),
    })
}

/// Where the data plane sends a new connection from `port`.
fn new_connection(lb: &Lb, port: u16) -> String {
    let (action, out) = lb.run(&syn(port));
    assert_eq!(action, XDP_TX, "port {port}");
    let backend = lb.backend_of(&out);
    assert_eq!(backend, lb.ring_choice(0, CLIENT, port, 1883), "port {port}: the program and the controller's ring disagree");
    backend
}

#[test]
fn ports_aimed_at_one_broker_spread_once_the_ring_is_seeded_and_open_flows_stay() {
    require_root!();
    let mut lb = Lb::with_config(config(None));
    // Unseeded: anyone can compute which ports land on b1, and they all do.
    let aimed: Vec<u16> = (20_000..=u16::MAX).filter(|&p| lb.ring_choice(0, CLIENT, p, 1883) == "b1").take(400).collect();
    assert_eq!(aimed.len(), 400);
    let (open, fresh) = aimed.split_at(100);
    for &p in open {
        assert_eq!(new_connection(&lb, p), "b1", "port {p}");
        assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 1883, TCP_ACK).build()).0, XDP_TX);
    }

    // Seeded (a reload that adds ring_seed_file): new connections from the aimed ports spread.
    let seed = seed_file("a", "0123456789abcdef0123456789abcdef");
    lb.config = config(Some(&seed));
    lb.apply();
    let mut spread = BTreeMap::<String, usize>::new();
    for &p in &fresh[..200] {
        *spread.entry(new_connection(&lb, p)).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n >= 40), "200 aimed ports did not spread over the three brokers: {spread:?}");
    // The connections open before the seed stay with their broker: the flow table pins them.
    for &p in open {
        let (action, out) = lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 1883, TCP_ACK).build());
        assert_eq!((action, lb.backend_of(&out)), (XDP_TX, "b1".to_owned()), "port {p} left its broker");
    }

    // Another seed, another ring; no seed again, the unseeded ring again.
    let before: Vec<String> = fresh[200..].iter().map(|&p| lb.ring_choice(0, CLIENT, p, 1883)).collect();
    lb.config = config(Some(&seed_file("b", "another seed, 0123456789abcdef")));
    lb.apply();
    let after: Vec<String> = fresh[200..].iter().map(|&p| lb.ring_choice(0, CLIENT, p, 1883)).collect();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(moved > 45, "only {moved} of 100 ports changed broker with another seed");
    lb.config = config(None);
    lb.apply();
    for &p in &fresh[200..250] {
        assert_eq!(new_connection(&lb, p), "b1", "unseeded again, port {p}");
    }
    let _ = std::fs::remove_dir_all(seed.parent().expect("a directory"));
}
