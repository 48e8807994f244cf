//! `dsrlb decap` on a real veth: a broker namespace with the VIPs on `lo` and a listener on
//! them, and a namespace in front of it that plays the balancer, sending tunnel frames (IPIP,
//! IPv6 in IPv6, GUE) that carry a client's SYN. Without the decap program the broker's kernel
//! (no ipip module) never answers; with it, the broker answers the client directly, from the
//! VIP. The CLI attaches, shows, updates and detaches it, and refuses bad options by name.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener},
    time::Duration,
};

use aya::programs::XdpMode;

use lb_common::DECAP_GUE_PORT;
use lb_userspace::dataplane::testing::TestPrograms;
use tests::{
    dsrlb_bin,
    frame::{Ipv4Frame, Ipv6Frame, TCP_SYN},
    netns::{Netns, PacketSocket, veth},
    require_root,
    tunnel::{BROKER, BROKER6, CLIENT, CLIENT6, LB, LB6, STRANGER, VIP, VIP6, eth, ipv4, ipv6, udp},
    wait,
};

struct Lab {
    lb: Netns,
    broker: Netns,
    lb_mac: [u8; 6],
    broker_mac: [u8; 6],
    pin_root: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.dsrlb(&["detach", "br0"]);
        let _ = std::fs::remove_dir(&self.pin_root);
    }
}

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    ns.run(|| lb_userspace::dataplane::interface_mac(ifname)).expect("the interface's MAC")
}

impl Lab {
    /// The two namespaces, the broker with the VIPs on lo.
    fn new() -> Self {
        let lab = Self::new_bare("dc");
        lab.broker.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"]);
        lab.broker.ip(&["addr", "add", "2001:db8::100/128", "dev", "lo"]);
        lab
    }

    /// The two namespaces (`dsrlb-t-TAG-lb`, `-br`), linked and routed, no VIP anywhere.
    fn new_bare(tag: &str) -> Self {
        let lb = Netns::new(&format!("dsrlb-t-{tag}-lb"));
        let broker = Netns::new(&format!("dsrlb-t-{tag}-br"));
        veth(&lb, "lb0", &broker, "br0");
        lb.ip(&["addr", "add", "203.0.113.2/24", "dev", "lb0"]);
        lb.ip(&["addr", "add", "2001:db8:f::2/64", "dev", "lb0", "nodad"]);
        broker.ip(&["addr", "add", "203.0.113.11/24", "dev", "br0"]);
        broker.ip(&["addr", "add", "2001:db8:f::11/64", "dev", "br0", "nodad"]);
        // Replies go straight to the clients, through the router (here: the other namespace).
        broker.ip(&["route", "add", "198.51.100.0/24", "via", "203.0.113.2"]);
        broker.ip(&["-6", "route", "add", "2001:db8:c::/64", "via", "2001:db8:f::2"]);
        let (lb_mac, broker_mac) = (mac_of(&lb, "lb0"), mac_of(&broker, "br0"));
        let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/dsrlb-decap-test-{tag}-{}", std::process::id()));
        Self { lb, broker, lb_mac, broker_mac, pin_root }
    }

    /// `dsrlb decap ARGS --pin-root ROOT` in the broker's namespace: success and output.
    fn dsrlb(&self, args: &[&str]) -> (bool, String) {
        let out =
            self.broker.command(dsrlb_bin()).arg("decap").args(args).arg("--pin-root").arg(&self.pin_root).output().expect("dsrlb decap");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    fn status(&self) -> serde_json::Value {
        let (ok, out) = self.dsrlb(&["status", "br0", "--json"]);
        assert!(ok, "{out}");
        let all: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        all[0].clone()
    }

    fn ipip(&self, src: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(self.broker_mac, self.lb_mac, 0x0800);
        f.extend_from_slice(&ipv4(src, BROKER, protocol, 0x4000, payload));
        f
    }

    fn ip6ip6(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(self.broker_mac, self.lb_mac, 0x86dd);
        f.extend_from_slice(&ipv6(LB6, BROKER6, 41, payload));
        f
    }

    /// Sends `frame` from the balancer's side `tries` times (a first frame may go before the
    /// broker's neighbour entry exists) and whether a SYN-ACK from `vip` to `client` port `port`
    /// comes back on that link.
    fn answered(&self, frame: &[u8], vip: IpAddr, port: u16) -> bool {
        self.lb.run(|| {
            let sock = PacketSocket::open("lb0");
            (0..3).any(|_| {
                sock.send(frame);
                wait::within(Duration::from_secs(1), Duration::ZERO, || sock.recv().is_some_and(|f| is_syn_ack(&f, vip, port))).is_some()
            })
        })
    }
}

/// A SYN-ACK from `vip` to the client's port `port`.
fn is_syn_ack(f: &[u8], vip: IpAddr, port: u16) -> bool {
    let (l4, src_ok) = match vip {
        IpAddr::V4(v) => (14 + 20, f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[9 + 14] == 6 && f[26..30] == v.octets()),
        IpAddr::V6(v) => (14 + 40, f.len() >= 74 && f[12..14] == [0x86, 0xdd] && f[6 + 14] == 6 && f[22..38] == v.octets()),
    };
    src_ok && f[l4 + 2..l4 + 4] == port.to_be_bytes() && f[l4 + 13] & 0x12 == 0x12
}

fn syn4(port: u16) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, port, VIP, 1883, TCP_SYN).datagram()
}

fn syn6(port: u16) -> Vec<u8> {
    Ipv6Frame::tcp(CLIENT6, port, VIP6, 1883, TCP_SYN).datagram()
}

#[test]
fn a_broker_answers_tunnelled_clients_directly_once_decap_is_attached() {
    require_root!();
    let lab = Lab::new();
    let _listeners: Vec<TcpListener> = lab.broker.run(|| {
        vec![TcpListener::bind((VIP, 1883)).expect("listen on the VIP"), TcpListener::bind((VIP6, 1883)).expect("listen on the VIP6")]
    });
    let ipip = |port| lab.ipip(LB, 4, &syn4(port));

    // Without the program the broker's kernel cannot unwrap IPIP: no answer.
    assert!(!lab.answered(&ipip(41_000), IpAddr::V4(VIP), 41_000), "answered without decap: the test proves nothing");

    // Bad options are refused by name, and attach nothing.
    for (args, want) in [
        (vec!["attach", "br0", "--vip", "192.0.2.100"], "--source"),
        (vec!["attach", "br0", "--vip", "192.0.2.100", "--source", "203.0.113.2", "--any-source"], "cannot be used with"),
        (vec!["attach", "nosuch0", "--vip", "192.0.2.100", "--source", "203.0.113.2"], "nosuch0"),
        (vec!["attach", "..", "--vip", "192.0.2.100", "--source", "203.0.113.2"], "not an interface name"),
        (vec!["attach", "br0", "--vip", "ff02::1", "--source", "203.0.113.2"], "--vip ff02::1: not a host's unicast address"),
        (vec!["detach", "br0"], "no decap program is attached to br0"),
    ] {
        let (ok, out) = lab.dsrlb(&args);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
    }
    assert!(!lab.pin_root.join("br0").exists() && !lab.pin_root.join("nosuch0").exists(), "a refused attach left pins");

    let (ok, out) = lab.dsrlb(&[
        "attach",
        "br0",
        "--vip",
        "192.0.2.100",
        "--vip",
        "2001:db8::100",
        "--source",
        "203.0.113.2",
        "--source",
        "2001:db8:f::2",
    ]);
    assert!(ok && out.contains("attached the decap program to br0"), "{out}");
    assert!(lab.answered(&ipip(41_001), IpAddr::V4(VIP), 41_001), "IPIP: the broker did not answer the client");
    assert!(lab.answered(&lab.ip6ip6(&syn6(41_002)), IpAddr::V6(VIP6), 41_002), "IPv6 in IPv6: no answer");
    assert!(lab.answered(&lab.ipip(LB, 17, &udp(DECAP_GUE_PORT, &syn4(41_003))), IpAddr::V4(VIP), 41_003), "GUE: no answer");
    // A source that is no balancer is dropped, and counted.
    assert!(!lab.answered(&lab.ipip(STRANGER, 4, &syn4(41_004)), IpAddr::V4(VIP), 41_004), "a stranger's IPIP was answered");
    let s = lab.status();
    assert_eq!(s["attached"], true, "{s}");
    assert!(s["frames"]["decapsulated"].as_u64() >= Some(3), "{s}");
    assert!(s["frames"]["drop_foreign_source"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["settings"]["vips"], serde_json::json!(["192.0.2.100", "2001:db8::100"]), "{s}");
    let (ok, text) = lab.dsrlb(&["status"]);
    assert!(ok && text.contains("br0: attached, program") && text.contains("sources  203.0.113.2 2001:db8:f::2"), "{text}");

    // Attaching again updates in place: --any-source lets the stranger in, the program stays.
    let program = s["program"].clone();
    let (ok, out) = lab.dsrlb(&["attach", "br0", "--vip", "192.0.2.100", "--any-source"]);
    assert!(ok && out.contains("updated the decap program on br0"), "{out}");
    assert!(lab.answered(&lab.ipip(STRANGER, 4, &syn4(41_005)), IpAddr::V4(VIP), 41_005), "--any-source: no answer");
    let s = lab.status();
    assert_eq!((s["program"].clone(), s["settings"]["vips"].clone()), (program, serde_json::json!(["192.0.2.100"])), "{s}");
    let not_ours = s["frames"]["pass_not_ours"].as_u64().expect("pass_not_ours");
    assert!(!lab.answered(&lab.ip6ip6(&syn6(41_006)), IpAddr::V6(VIP6), 41_006), "a VIP no longer held was unwrapped");
    let s = lab.status();
    assert!(s["frames"]["pass_not_ours"].as_u64() >= Some(not_ours + 1), "the frame for the VIP no longer held was not counted: {s}");

    // Narrowed again to the balancer: the stranger is refused at once, the balancer is not.
    let (ok, out) = lab.dsrlb(&["attach", "br0", "--vip", "192.0.2.100", "--source", "203.0.113.2"]);
    assert!(ok && out.contains("updated the decap program on br0"), "{out}");
    assert!(!lab.answered(&lab.ipip(STRANGER, 4, &syn4(41_008)), IpAddr::V4(VIP), 41_008), "the stranger still answered after narrowing");
    assert!(lab.answered(&ipip(41_009), IpAddr::V4(VIP), 41_009), "the balancer refused after narrowing");
    assert_eq!(lab.status()["settings"]["sources"], serde_json::json!(["203.0.113.2"]));

    let (ok, out) = lab.dsrlb(&["detach", "br0"]);
    assert!(ok && out.contains("detached"), "{out}");
    assert!(!lab.pin_root.join("br0").exists(), "pins left after detach");
    let link = lab.broker.exec("ip", &["-d", "link", "show", "br0"]);
    assert!(!String::from_utf8_lossy(&link.stdout).contains("prog/xdp"), "still attached after detach");
    assert!(!lab.answered(&ipip(41_007), IpAddr::V4(VIP), 41_007), "answered after detach");

    // Another XDP program on the interface is not replaced.
    let mut other = TestPrograms::load([0; 6]).expect("the test object");
    lab.broker.run(|| other.attach("xdp_pass", "br0", XdpMode::Driver, None)).expect("xdp_pass on br0");
    let (ok, out) = lab.dsrlb(&["attach", "br0", "--vip", "192.0.2.100", "--source", "203.0.113.2"]);
    assert!(!ok && out.contains("br0 already runs XDP program"), "{out}");
    assert!(!lab.pin_root.join("br0").exists(), "a refused attach left pins");
}

/// `backend-setup.sh --decap`: `apply` puts the VIPs on lo and attaches the program with them,
/// after which the broker answers tunnelled clients; `verify` finds it, and fails (naming it)
/// once it is gone; `--decap` without a source is refused.
#[test]
fn the_backend_script_sets_up_decap_and_verifies_it() {
    require_root!();
    let lab = Lab::new_bare("dc2");
    let _listener = lab.broker.run(|| TcpListener::bind(("0.0.0.0", 1883)).expect("listen"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/backend-setup.sh");
    let run = |args: &[&str]| {
        let out = lab
            .broker
            .command("bash")
            .arg(&script)
            .args(args)
            .env("DSRLB", dsrlb_bin())
            .env("DSRLB_DECAP_PIN_ROOT", &lab.pin_root)
            .output()
            .expect("running backend-setup.sh");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, out) = run(&["apply", "--dev", "br0", "--decap", "192.0.2.100"]);
    assert!(!ok && out.contains("--decap needs the balancers' tunnel sources"), "{out}");
    let (ok, out) = run(&["verify", "--dev", "br0", "--decap", "--source", "203.0.113.2", "192.0.2.100"]);
    assert!(!ok && out.contains("FAIL  dsrlb decap is not attached to br0"), "{out}");
    assert!(!lab.answered(&lab.ipip(LB, 4, &syn4(42_000)), IpAddr::V4(VIP), 42_000), "answered before the script ran");

    let (ok, out) = run(&["apply", "--dev", "br0", "--decap", "--source", "203.0.113.2", "192.0.2.100", "2001:db8::100"]);
    assert!(ok, "apply then verify failed:\n{out}");
    assert!(
        out.contains("ok    dsrlb decap holds 192.0.2.100")
            && out.contains("ok    dsrlb decap holds 2001:db8::100")
            && out.contains("ok    dsrlb decap takes 203.0.113.2"),
        "{out}"
    );
    let (ok, out) = run(&["verify", "--dev", "br0", "--decap", "--any-source", "192.0.2.100"]);
    assert!(!ok && out.contains("FAIL  dsrlb decap takes only 203.0.113.2, not any source"), "{out}");
    assert!(lab.answered(&lab.ipip(LB, 4, &syn4(42_001)), IpAddr::V4(VIP), 42_001), "no answer after the script's apply");

    let (ok, out) = lab.dsrlb(&["detach", "br0"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["verify", "--dev", "br0", "--decap", "--source", "203.0.113.2", "192.0.2.100"]);
    assert!(!ok && out.contains("FAIL  dsrlb decap is not attached to br0") && out.contains("ok    192.0.2.100/32 on lo"), "{out}");
}
