//! The program on a real veth: SYNs from a client namespace come back with a backend's MAC.
//! And `dsrlb run` itself: a bad config attaches nothing; SIGTERM detaches.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::programs::XdpMode;
use lb_common::reason;
use lb_userspace::{
    config,
    dataplane::{self, Dataplane, LoadOptions, testing::TestPrograms},
    plan::{self, BackendRuntime, DownSet, Ids},
};
use tests::{
    dsrlb_bin,
    netns::{Netns, PacketSocket, veth},
    require_root, wait,
};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];

const CONFIG: &str = r#"
interface = "lb0"
xdp_mode = "native"
flow_table_size = 65536

[health]
check = "none"

[[listener]]
name = "mqtt"
vip = "192.0.2.100"
port = 1883

[[backend]]
name = "b1"
address = "192.0.2.11"
mac = "02:00:00:00:00:11"

[[backend]]
name = "b2"
address = "192.0.2.12"
mac = "02:00:00:00:00:12"
"#;

/// A client namespace and a balancer namespace joined by a veth pair; the client routes the
/// VIP via the balancer's address.
fn two_namespaces(tag: &str) -> (Netns, Netns) {
    let lb = Netns::new(&format!("dsrlb-t-{tag}-lb"));
    let cl = Netns::new(&format!("dsrlb-t-{tag}-cl"));
    veth(&lb, "lb0", &cl, "cl0");
    lb.ip(&["addr", "add", "192.0.2.2/24", "dev", "lb0"]);
    cl.ip(&["addr", "add", "192.0.2.1/24", "dev", "cl0"]);
    cl.ip(&["route", "add", "192.0.2.100/32", "via", "192.0.2.2"]);
    // Bounced SYNs would otherwise carry partial checksums (see the README's lab notes).
    cl.exec("ethtool", &["-K", "cl0", "tx", "off"]);
    (lb, cl)
}

/// Sends `n` SYNs to VIP:1883 from the client namespace (each `connect` times out: nothing
/// answers) while capturing on `cl0`; returns the frames that came back from the balancer.
fn syns_and_capture(cl: &Netns, n: usize, lb_mac: [u8; 6]) -> Vec<Vec<u8>> {
    let done = AtomicBool::new(false);
    cl.run(|| {
        let sock = PacketSocket::open("cl0");
        std::thread::scope(|s| {
            s.spawn(|| {
                cl.run(|| {
                    for _ in 0..n {
                        let _ = TcpStream::connect_timeout(&SocketAddr::from((VIP, 1883)), Duration::from_millis(150));
                    }
                });
                done.store(true, Ordering::SeqCst);
            });
            let mut bounced = Vec::new();
            // Each receive waits up to 200 ms on its own; done once the SYNs are sent and quiet.
            let _ = wait::within(Duration::from_secs(30), Duration::ZERO, || match sock.recv() {
                Some(f) if f.len() >= 34 && f[6..12] == lb_mac && f[12..14] == [0x08, 0x00] => {
                    bounced.push(f);
                    false
                }
                None => done.load(Ordering::SeqCst),
                Some(_) => false,
            });
            bounced
        })
    })
}

#[test]
fn syns_to_the_vip_bounce_with_a_backend_mac() {
    require_root!();
    let (lb, cl) = two_namespaces("smoke");
    let cfg = config::parse(CONFIG, "smoke.toml").expect("valid");
    let mut dp = Dataplane::load(&LoadOptions::new(cfg.ring_size, cfg.flow_table_size)).expect("load");
    let lb_mac = lb.run(|| dataplane::interface_mac("lb0")).expect("lb0 MAC");
    let mut ids = Ids::default();
    ids.update(&cfg).expect("ids");
    let runtime = cfg.backends.iter().map(|b| (b.name.clone(), BackendRuntime { mac: b.mac, ..BackendRuntime::default() })).collect();
    dp.apply(&plan::desired(&cfg, &ids, &runtime, &DownSet::new(), lb_mac).expect("plan")).expect("apply");
    lb.run(|| dp.attach("lb0", XdpMode::Driver)).expect("attach to lb0");
    // The receiving side of a veth needs an XDP program of its own to get XDP_TX frames.
    let mut pass = TestPrograms::load(B1_MAC).expect("load the test object");
    cl.run(|| pass.attach("xdp_pass", "cl0", XdpMode::Driver, None)).expect("attach xdp_pass to cl0");

    let bounced = syns_and_capture(&cl, 12, lb_mac);
    assert!(!bounced.is_empty(), "no frame came back from the balancer");
    let mut seen = std::collections::BTreeSet::new();
    for f in &bounced {
        let dst: [u8; 6] = f[..6].try_into().expect("6");
        assert!(dst == B1_MAC || dst == B2_MAC, "bounced frame to {dst:02x?}, not a backend");
        assert_eq!(f[30..34], VIP.octets(), "destination IP kept");
        assert_eq!(f[23], 6, "TCP");
        seen.insert(dst);
    }
    let stats = dp.stats().expect("stats");
    let tx = stats.verdict(reason::TX);
    assert!(tx >= bounced.len() as u64, "TX counter {tx} < {} frames seen", bounced.len());
    let new_flows: u64 = stats.total().new_flows;
    assert!(new_flows >= 12, "12 connections made {new_flows} new flows");
    assert_eq!(stats.listener(ids.listeners["mqtt"]).packets, tx);
    eprintln!("{} bounced frames, backends {seen:02x?}, TX {tx}, new flows {new_flows}", bounced.len());
}

fn xdp_attached(ns: &Netns, ifname: &str) -> bool {
    let out = ns.ip(&["-d", "link", "show", ifname]);
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// A test's own directory, control socket and pins for `dsrlb`; both go when it is dropped.
struct Own {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    pins: std::path::PathBuf,
}

impl Own {
    /// Named by `tag` (the directory with this process's id); pins an earlier run left go.
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dsrlb-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/dsrlb-{tag}"));
        let _ = dataplane::unpin_all(&pins);
        Self { socket: dir.join("control.sock"), dir, pins }
    }

    /// `dsrlb ARGS` here, on this test's socket and pins.
    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(dsrlb_bin());
        c.arg("--socket").arg(&self.socket).arg("--pin-dir").arg(&self.pins).args(args);
        c
    }

    /// `dsrlb run --config CONFIG` in `ns` (metrics off), on this test's socket and pins.
    fn run(&self, ns: &Netns, config: &std::path::Path) -> Command {
        let mut c = ns.command(dsrlb_bin());
        c.arg("--socket").arg(&self.socket).arg("--pin-dir").arg(&self.pins);
        c.args(["run", "--metrics", "off", "--config"]).arg(config);
        c
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.cli(&["stop"]).output();
        let _ = std::fs::remove_dir(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM to a controller; how it exited.
fn sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    child.wait().expect("wait")
}

#[test]
fn dsrlb_run_attaches_serves_outlives_sigterm_and_dsrlb_stop_detaches() {
    require_root!();
    let (lb, cl) = two_namespaces("run");
    let mine = Own::new("smoke");
    let (dir, pins) = (&mine.dir, &mine.pins);

    // A bad config: the error names line and field, and nothing is attached.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, CONFIG.replace("port = 1883", "port = 0")).expect("write");
    let dsrlb_run = |config: &std::path::Path| mine.run(&lb, config);
    let out = dsrlb_run(&bad).output().expect("start dsrlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:12:8: listener[0].port"), "unhelpful error: {err}");
    assert!(!xdp_attached(&lb, "lb0"), "a rejected config attached something");
    // A VIP that is the balancer's own address: refused before anything is loaded.
    let own = dir.join("own.toml");
    std::fs::write(&own, CONFIG.replace("vip = \"192.0.2.100\"", "vip = \"192.0.2.2\"")).expect("write");
    let out = dsrlb_run(&own).output().expect("start dsrlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VIP 192.0.2.2 is an address of lb0"), "{err}");
    assert!(!xdp_attached(&lb, "lb0") && !pins.join("link").exists(), "a refused VIP attached something");

    let good = dir.join("good.toml");
    std::fs::File::create(&good).and_then(|mut f| f.write_all(CONFIG.as_bytes())).expect("write");
    let mut child = dsrlb_run(&good).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start dsrlb");
    wait::until_up("dsrlb attached", &mut child, Duration::from_secs(20), Duration::from_millis(100), || xdp_attached(&lb, "lb0"));
    let lb_mac = lb.run(|| dataplane::interface_mac("lb0")).expect("lb0 MAC");
    // xdp_pass on the client side, from a separately loaded object owned by this test.
    let mut pass = TestPrograms::load(B1_MAC).expect("load the test object");
    cl.run(|| pass.attach("xdp_pass", "cl0", XdpMode::Driver, None)).expect("xdp_pass on cl0");
    let bounced = syns_and_capture(&cl, 4, lb_mac);
    assert!(!bounced.is_empty(), "dsrlb run did not forward");

    // SIGTERM: the controller exits cleanly; forwarding goes on from the pins.
    let status = sigterm(&mut child);
    assert!(status.success(), "dsrlb exited with {status}");
    let stdout = std::io::read_to_string(child.stdout.take().expect("stdout")).expect("read");
    assert!(stdout.contains("listener mqtt 192.0.2.100:1883"), "it prints what it serves: {stdout}");
    assert!(xdp_attached(&lb, "lb0"), "SIGTERM detached the program");
    assert!(!syns_and_capture(&cl, 2, lb_mac).is_empty(), "no forwarding after the controller exited");

    // Pinned maps of another layout (an older dsrlb's, say) are refused before anything is
    // loaded over them, with what to do; forwarding goes on untouched.
    let set_layout_version = |version: u64| {
        use aya::maps::{Array, Map, MapData};
        let map = MapData::from_pin(pins.join("LAYOUT")).expect("LAYOUT pin");
        let mut layout: Array<MapData, lb_common::Layout> = Array::try_from(Map::Array(map)).expect("an array");
        let mut value = layout.get(&0, 0).expect("read");
        value.version = version;
        layout.set(0, value, 0).expect("write");
    };
    let layout_version = || {
        use aya::maps::{Array, Map, MapData};
        let map = MapData::from_pin(pins.join("LAYOUT")).expect("LAYOUT pin");
        let layout: Array<MapData, lb_common::Layout> = Array::try_from(Map::Array(map)).expect("an array");
        layout.get(&0, 0).expect("read").version
    };
    set_layout_version(1);
    let out = dsrlb_run(&good).output().expect("start dsrlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("layout version 1") && err.contains("dsrlb stop"), "{err}");
    assert!(xdp_attached(&lb, "lb0") && !syns_and_capture(&cl, 2, lb_mac).is_empty(), "the refused controller changed the data plane");
    // Maps of layout version 3 (before flows confirmed by time) read the same: adopted, and
    // marked this layout's once this build's program runs on them.
    set_layout_version(lb_common::LAYOUT_VERSION_ADOPTED);
    let mut child = dsrlb_run(&good).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start dsrlb");
    let what = format!("maps of layout {} adopted and marked", lb_common::LAYOUT_VERSION_ADOPTED);
    wait::until_up(what, &mut child, Duration::from_secs(20), Duration::from_millis(100), || layout_version() == lb_common::LAYOUT_VERSION);
    assert!(!syns_and_capture(&cl, 2, lb_mac).is_empty(), "no forwarding after adopting the older layout");
    assert!(sigterm(&mut child).success());

    // `dsrlb stop` with no controller running: detaches and removes the pins.
    let out = mine.cli(&["stop"]).output().expect("dsrlb stop");
    assert!(out.status.success(), "dsrlb stop: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!xdp_attached(&lb, "lb0"), "still attached after dsrlb stop");
    assert!(syns_and_capture(&cl, 2, lb_mac).is_empty(), "frames still bounced after dsrlb stop");
    assert!(std::fs::read_dir(pins).map_or(0, Iterator::count) == 0, "pins left in {}", pins.display());
}

/// A child process killed (and reaped) when dropped, a failed assertion included.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upgrade that changes the maps' meaning: a controller that adopts the pins puts its own
/// program on the link before it writes anything, so the program it replaces (an older build's,
/// which would send a tunnelled real's frames on as L2 frames) never sees the new config. The
/// witness, put on the link in place of the balancer's program, stands for that older program:
/// it counts every frame of a flood, and those that found b1 already marked tunnelled.
#[test]
fn an_adopting_controller_replaces_the_program_before_it_changes_a_map() {
    require_root!();
    let (lb, cl) = two_namespaces("adopt");
    let own = Own::new("adopt");
    let (dir, pins) = (&own.dir, &own.pins);
    let dsrlb_run = |config: &std::path::Path| {
        let mut c = own.run(&lb, config);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let stopped = |child: &mut std::process::Child| {
        let status = sigterm(child);
        assert!(status.success(), "dsrlb exited with {status}");
    };
    // b1 sits on the segment: tunnelled, its next hop is itself.
    for (ip, mac) in [("192.0.2.11", "02:00:00:00:00:11"), ("192.0.2.12", "02:00:00:00:00:12")] {
        lb.ip(&["neigh", "replace", ip, "lladdr", mac, "dev", "lb0", "nud", "permanent"]);
    }
    let (l2, tunnelled) = (dir.join("l2.toml"), dir.join("ipip.toml"));
    std::fs::write(&l2, CONFIG).expect("write");
    let ipip = CONFIG.replace("mac = \"02:00:00:00:00:11\"", "forward = \"ipip\"");
    assert_ne!(ipip, CONFIG);
    std::fs::write(&tunnelled, ipip).expect("write");

    let mut child = dsrlb_run(&l2).spawn().expect("start dsrlb");
    wait::until_up("dsrlb attached", &mut child, Duration::from_secs(20), Duration::from_millis(100), || xdp_attached(&lb, "lb0"));
    stopped(&mut child);
    let reals = || {
        use aya::maps::{Array, Map, MapData};
        let map = MapData::from_pin(pins.join("REALS")).expect("REALS pin");
        let reals: Array<MapData, lb_common::RealInfo> = Array::try_from(Map::Array(map)).expect("an array");
        reals.iter().map(|r| r.expect("read")).collect::<Vec<_>>()
    };
    let b1: Vec<u32> = (0..).zip(reals()).filter(|(_, r)| r.flags != 0 && r.dst_mac == B1_MAC).map(|(i, _)| i).collect();
    let [b1] = b1[..] else { panic!("b1's real: {b1:?}") };
    let tunnelled_now = || reals()[b1 as usize].flags & lb_common::REAL_F_TUNNEL != 0;
    assert!(!tunnelled_now());

    let witness = lb_userspace::dataplane::testing::AdoptWitness::replace(pins, b1).expect("the witness on the pinned link");
    let lb_mac = lb.run(|| dataplane::interface_mac("lb0")).expect("lb0 MAC");
    let mac = lb_mac.map(|b| format!("{b:02x}")).join(":");
    // Bounded: at most 50 million frames or 60 s; stopped once the controller has adopted.
    let mut flood = Killed(
        cl.command(tests::built_bin("flood"))
            .args(["cl0", &mac, "192.0.2.100", "1883", "198.18.0.0/15", "ack", "50000000", "60"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the flood"),
    );
    wait::until("the flood reaches the witness", Duration::from_secs(10), || witness.counts().expect("counts").0 > 10_000);

    let mut child = Killed(dsrlb_run(&tunnelled).spawn().expect("start dsrlb"));
    wait::until_up("b1 tunnelled in the adopted maps", &mut child.0, Duration::from_secs(30), Duration::from_millis(20), tunnelled_now);
    let (seen, saw_new) = witness.counts().expect("counts");
    assert!(flood.0.try_wait().expect("wait").is_none(), "the flood ended before the adoption: nothing was watched");
    eprintln!("the witness saw {seen} frames, {saw_new} of them with b1 tunnelled");
    assert_eq!(saw_new, 0, "the replaced program ran on the new config ({saw_new} of the {seen} frames it saw)");
    // The control: a witness put on the link now reads b1 tunnelled in the balancer's REALS.
    let control = lb_userspace::dataplane::testing::AdoptWitness::replace(pins, b1).expect("a second witness");
    wait::until("the second witness sees b1 tunnelled", Duration::from_secs(10), || control.counts().expect("counts").1 > 0);
    drop(flood);
    stopped(&mut child.0);
}

#[test]
fn backend_setup_script_applies_and_verifies_a_dr_backend() {
    require_root!();
    let (_lb, broker) = two_namespaces("bk");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/backend-setup.sh");
    let run = |action: &str| {
        let out = broker
            .command("bash")
            .arg(&script)
            .args([action, "--dev", "cl0", "192.0.2.100", "192.0.2.101"])
            .output()
            .expect("running backend-setup.sh");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = run("verify");
    assert!(!ok, "a fresh namespace passed verification:\n{out}");
    assert!(out.contains("FAIL  192.0.2.100/32 is not on lo") && out.contains("FAIL  net.ipv4.conf.all.arp_ignore = 0"), "{out}");
    let (ok, out) = run("apply");
    assert!(ok, "apply then verify failed:\n{out}");
    let (ok, out) = run("verify");
    assert!(ok, "{out}");
    assert!(out.contains("ok    192.0.2.101/32 on lo"), "{out}");
    broker.ip(&["addr", "del", "192.0.2.100/32", "dev", "lo"]);
    let (ok, out) = run("verify");
    assert!(!ok && out.contains("FAIL  192.0.2.100/32 is not on lo"), "{out}");
}

/// IPv6 VIPs: on lo as /128, and, checked on this kernel, a broker so set up answers no
/// neighbour solicitation for its VIP (so clients can only reach it through the balancer) yet
/// accepts frames for the VIP sent to its MAC (as the balancer rewrites them).
#[test]
fn backend_setup_script_covers_ipv6_vips() {
    require_root!();
    let (other, broker) = two_namespaces("bk6");
    broker.ip(&["-6", "addr", "add", "2001:db8::11/64", "dev", "cl0", "nodad"]);
    other.ip(&["-6", "addr", "add", "2001:db8::2/64", "dev", "lb0", "nodad"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/backend-setup.sh");
    let run = |action: &str, vips: &[&str]| {
        let out = broker.command("bash").arg(&script).args([action, "--dev", "cl0"]).args(vips).output().expect("running backend-setup.sh");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let vips = ["2001:db8::100", "192.0.2.100"];
    let (ok, out) = run("verify", &vips);
    assert!(!ok && out.contains("FAIL  2001:db8::100/128 is not on lo"), "{out}");
    let (ok, out) = run("apply", &vips);
    assert!(ok, "apply then verify failed:\n{out}");
    assert!(out.contains("ip -6 addr add 2001:db8::100/128 dev lo") && out.contains("net.ipv6.conf.cl0.proxy_ndp=0"), "{out}");
    // Written another way, the same address is found.
    let (ok, out) = run("verify", &["2001:DB8:0:0::100"]);
    assert!(ok && out.contains("ok    2001:DB8:0:0::100/128 on lo"), "{out}");
    let (ok, out) = run("verify", &["2001:db8::100/128"]);
    assert!(!ok && out.contains("not an IPv4 or IPv6 address"), "{out}");

    // A listener on every address of the broker, and connections to it from the other side.
    let listener = broker.run(|| std::net::TcpListener::bind("[::]:18830")).expect("listening in the broker's namespace");
    let connects = |to: &str| {
        let to: std::net::SocketAddr = format!("[{to}]:18830").parse().expect("address");
        other.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
    };
    // Neighbour discovery works on this link (the broker's own address answers) ...
    assert!(connects("2001:db8::11"), "the broker's own address does not answer");
    // ... but a solicitation for the VIP gets no answer: the client side never learns a MAC.
    other.ip(&["-6", "route", "add", "2001:db8::100/128", "dev", "lb0"]);
    assert!(!connects("2001:db8::100"), "the VIP answered directly");
    let neigh = String::from_utf8_lossy(&other.ip(&["-6", "neigh", "show", "2001:db8::100", "dev", "lb0"]).stdout).into_owned();
    assert!(!neigh.contains("lladdr"), "the broker answered a neighbour solicitation for its VIP: {neigh}");
    // Frames for the VIP sent to the broker's MAC, as the balancer sends them, are accepted.
    let mac =
        String::from_utf8_lossy(&broker.ip(&["-br", "link", "show", "cl0"]).stdout).split_whitespace().nth(2).expect("mac").to_owned();
    other.ip(&["-6", "neigh", "replace", "2001:db8::100", "lladdr", &mac, "dev", "lb0", "nud", "permanent"]);
    assert!(connects("2001:db8::100"), "the broker does not accept frames for its IPv6 VIP");
    drop(listener);

    // The VIP on the broker's interface as well: it would answer for it.
    broker.ip(&["-6", "addr", "add", "2001:db8::100/64", "dev", "cl0", "nodad"]);
    let (ok, out) = run("verify", &vips);
    assert!(!ok && out.contains("FAIL  2001:db8::100 is on cl0 too: the broker would answer neighbour solicitations for it"), "{out}");
}

#[test]
fn a_walk_of_a_large_flow_table_does_not_block_the_control_socket() {
    require_root!();
    let (lb, _cl) = two_namespaces("walk");
    let own = Own::new("walk");
    // 2^25 flows: a 1 GiB table, whose walk takes long enough to ask something meanwhile.
    let config = own.dir.join("big.toml");
    std::fs::write(&config, CONFIG.replace("flow_table_size = 65536", "flow_table_size = 33554432")).expect("write");
    let cli = |args: &[&str]| own.cli(args);
    let mut child = own.run(&lb, &config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start dsrlb");
    // The kernel allocates and zeroes the whole table at load (1 GiB, and 2 GiB of IPv6
    // addresses): beside the other tests on a slow 2-core VM that once took over 30 s.
    wait::until_up("dsrlb serving (ping answers)", &mut child, Duration::from_secs(120), Duration::from_millis(100), || {
        cli(&["ping"]).output().is_ok_and(|o| o.status.success())
    });
    // A status (which walks the table) and, right behind it, a ping: the ping is answered
    // first, because the walk runs beside the controller's loop, not on it.
    let finished = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            let out = cli(&["status", "--json"]).output().expect("status");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            finished.lock().expect("lock").push("status");
        });
        std::thread::sleep(Duration::from_millis(30));
        let out = cli(&["ping"]).output().expect("ping");
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok"), "{out:?}");
        finished.lock().expect("lock").push("ping");
    });
    assert_eq!(finished.into_inner().expect("lock"), vec!["ping", "status"], "the ping waited for the walk");
    let _ = sigterm(&mut child);
}
