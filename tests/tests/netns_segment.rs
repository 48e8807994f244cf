//! A small lab with no broker and no TLS: `dsrlb run` on one Ethernet segment (a bridge) in
//! front of two stand-in TCP servers, and a few hundred real connections through the VIP, each
//! answered straight from the server its SYN was bounced to. It needs only `ip`, `nsenter` and
//! `ethtool`, so `cargo xtask test-arm64` runs it on an emulated arm64 kernel as well; the
//! x86-64 suite runs it too.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use aya::programs::XdpMode;
use lb_userspace::{
    control::status::Status,
    dataplane::{self, testing::TestPrograms},
};
use tests::{
    balancer::StatusExt as _,
    dsrlb_bin,
    netns::{Netns, in_netns, sh},
    require_root, wait,
};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const CONNECTIONS: usize = 300;

const CONFIG: &str = r#"
interface = "eth0"
xdp_mode = "native"
flow_table_size = 65536

[health]
check = "tcp"
inter = "1s"

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

/// Writes `value` to `/proc/sys/KEY` (dots as slashes) inside namespace `ns`.
fn sysctl(ns: &Netns, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(|| std::fs::write(&path, value)).unwrap_or_else(|e| panic!("{} in {}: {e}", path, ns.name));
}

/// The segment: `sw` holds the bridge; client, balancer and two servers each have `eth0` on it.
struct Segment {
    cl: Netns,
    lb: Netns,
    servers: [Netns; 2],
    sw: Netns,
}

fn segment() -> Segment {
    let sw = Netns::new("dsrlb-seg-sw");
    sw.ip(&["link", "add", "br0", "type", "bridge"]);
    sw.ip(&["link", "set", "br0", "up"]);
    let host = |role: &str, addr: &str, mac: Option<&str>| {
        let ns = Netns::new(&format!("dsrlb-seg-{role}"));
        let port = format!("p-{role}");
        sh("ip", &["link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &port, "netns", &sw.name]);
        sw.ip(&["link", "set", &port, "master", "br0"]);
        sw.ip(&["link", "set", &port, "up"]);
        if let Some(mac) = mac {
            ns.ip(&["link", "set", "eth0", "address", mac]);
        }
        ns.ip(&["addr", "add", addr, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns
    };
    let cl = host("cl", "192.0.2.1/24", None);
    let lb = host("lb", "192.0.2.2/24", None);
    let servers = [host("b1", "192.0.2.11/24", Some("02:00:00:00:00:11")), host("b2", "192.0.2.12/24", Some("02:00:00:00:00:12"))];
    // The client reaches the VIP through the balancer. Bounced SYNs would carry partial
    // checksums the servers drop, and GRO on the client's port would merge segments into frames
    // too big to bounce.
    cl.ip(&["route", "add", &format!("{VIP}/32"), "via", "192.0.2.2"]);
    cl.exec("ethtool", &["-K", "eth0", "tx", "off"]);
    sw.exec("ethtool", &["-K", "p-cl", "gro", "off"]);
    // Direct server return: the VIP on `lo`, ARP kept to the servers' own addresses.
    for s in &servers {
        s.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        for (k, v) in tests::lab::DSR_BACKEND_SYSCTLS {
            sysctl(s, k, v);
        }
    }
    Segment { cl, lb, servers, sw }
}

/// A stand-in server in `ns` on port 1883: to every connection it says its name, then answers
/// each line with its name again, until the client closes.
fn serve(ns: &Netns, name: &'static str) {
    let listener = ns.run(|| TcpListener::bind("0.0.0.0:1883")).unwrap_or_else(|e| panic!("binding {name}: {e}"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = writeln!(conn, "{name}");
                let mut lines = BufReader::new(conn.try_clone().expect("clone")).lines();
                while let Some(Ok(_)) = lines.next() {
                    if writeln!(conn, "{name}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut s = String::new();
    r.read_line(&mut s)?;
    Ok(s.trim().to_owned())
}

/// The CLI of the controller under test.
struct Cli {
    socket: PathBuf,
    pins: PathBuf,
    ns: String,
}

impl Cli {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        tests::netns::nsenter(&self.ns, dsrlb_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pins)
            .args(args)
            .output()
            .expect("starting the dsrlb CLI")
    }

    fn status(&self) -> Option<Status> {
        let out = self.cli(&["status", "--json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    }
}

/// `dsrlb run`, stopped (SIGTERM, then `dsrlb stop`) when the test ends, also on a panic.
struct Running {
    child: Child,
    cli: Cli,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGTERM) };
        if wait::within(Duration::from_secs(10), Duration::from_millis(50), || self.child.try_wait().ok().flatten()).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = self.cli.cli(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.cli.pins);
    }
}

/// A directory removed when the test ends, also on a panic.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_few_hundred_connections_through_the_vip_reach_both_servers_and_stay_on_theirs() {
    require_root!();
    let seg = segment();
    serve(&seg.servers[0], "b1");
    serve(&seg.servers[1], "b2");

    // XDP_TX on a veth reaches the peer only if the peer runs an XDP program itself.
    let mut pass = TestPrograms::load([2, 0, 0, 0, 0, 1]).expect("loading the test object");
    seg.sw.run(|| pass.attach("xdp_pass", "p-lb", XdpMode::Driver, None)).expect("xdp_pass on the balancer's bridge port");

    let tmp = TempDir(std::env::temp_dir().join(format!("dsrlb-segment-{}", std::process::id())));
    let dir = &tmp.0;
    std::fs::create_dir_all(dir).expect("temp dir");
    let config = dir.join("dsrlb.toml");
    std::fs::write(&config, CONFIG).expect("writing the config");
    let pins = Path::new("/sys/fs/bpf/dsrlb-segment").to_path_buf();
    let _ = dataplane::unpin_all(&pins);
    let child = tests::netns::nsenter(&seg.lb.name, dsrlb_bin())
        .arg("--socket")
        .arg(dir.join("control.sock"))
        .arg("--pin-dir")
        .arg(&pins)
        .args(["run", "--metrics", "off", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting dsrlb run");
    let mut running = Running { child, cli: Cli { socket: dir.join("control.sock"), pins: pins.clone(), ns: seg.lb.name.clone() } };
    let Running { child, cli } = &mut running;

    // Both servers pass their health checks (the balancer's TCP connects from its namespace).
    let up = || cli.status().is_some_and(|s| ["b1", "b2"].iter().all(|b| s.backend("mqtt", b).is_some_and(|x| x.state == "up")));
    wait::until_up("dsrlb serving with both servers up", child, Duration::from_mins(1), Duration::from_millis(200), up);

    // The program is compiled by the JIT on this CPU (on arm64 too: the ordered object there).
    let attached = seg.lb.run(|| dataplane::chain::attached("eth0")).expect("netlink").expect("an XDP program on eth0");
    let info = dataplane::chain::program_info(attached.prog_id).expect("program info");
    assert!(info.size_jitted() > 0, "the balancer's program is not JIT-compiled on {}", std::env::consts::ARCH);

    // The connections, all held open at once: each says which server took it, and a line sent
    // on it later (an established frame) is answered by the same one. With both servers up the
    // ring alone would keep that; the flow table is checked below.
    let conns: Vec<(BufReader<TcpStream>, String)> = in_netns(&seg.cl.name, || {
        (0..CONNECTIONS)
            .map(|i| {
                let s = TcpStream::connect_timeout(&SocketAddr::from((VIP, 1883)), Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connection {i} through the VIP: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                let mut r = BufReader::new(s);
                let first = read_line(&mut r).unwrap_or_else(|e| panic!("connection {i}: no greeting: {e}"));
                (r, first)
            })
            .collect()
    })
    .expect("entering the client namespace");
    let on = |b: &str| conns.iter().filter(|(_, first)| first == b).count();
    let (b1, b2) = (on("b1"), on("b2"));
    assert_eq!(b1 + b2, CONNECTIONS, "greetings from neither server");
    assert!(b1 >= CONNECTIONS / 4 && b2 >= CONNECTIONS / 4, "spread {b1}/{b2} over two equal servers");
    // The balancer's flow table, read from userspace over mmap as the controller reads it. A
    // flow confirms when it talks again a little later (`lb_common::FLOW_CONFIRM_UNITS`), as a
    // session's next PINGREQ would: every connection speaks each round, is answered by the
    // server that greeted it, until a confirmed flow stands for every connection.
    let table = dataplane::testing::pinned_flow_table(&pins).expect("the pinned flow table");
    let mut conns = conns;
    let confirmed = wait::until_every("a confirmed flow for every connection", Duration::from_secs(30), Duration::from_millis(500), || {
        for (i, (r, first)) in conns.iter_mut().enumerate() {
            writeln!(r.get_mut(), "again").expect("write");
            let again = read_line(r).unwrap_or_else(|e| panic!("connection {i}: no answer: {e}"));
            assert_eq!(&again, first, "connection {i} moved to another server");
        }
        let mut confirmed = 0;
        table.walk(|f| {
            if f.confirmed() && u16::from_be(f.key.dport_be) == 1883 {
                confirmed += 1;
            }
        });
        (confirmed >= CONNECTIONS).then_some(confirmed)
    });
    assert_eq!(confirmed, CONNECTIONS, "more confirmed flows than connections");
    let status = cli.status().expect("status");
    assert!(["b1", "b2"].iter().all(|b| status.backend("mqtt", b).is_some_and(|x| x.state == "up")), "{status:?}");
    drop(running);
}
