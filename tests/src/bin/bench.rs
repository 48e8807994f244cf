//! `cargo xtask bench`: dsrlb against HAProxy, direct, and the cheapest possible XDP bounce, in
//! one run on this machine, plus the data-plane micro-benchmark; writes `bench/report.md` and
//! SVG plots.
//!
//! Every path serves the same single broker (b1), so the rows differ only by what sits between
//! clients and broker:
//! - `direct`: clients to the broker's real address;
//! - `haproxy`: Debian's haproxy in the balancer namespace, TCP mode, `balance leastconn`,
//!   `check inter 2s fall 3 rise 2`, bound to the VIP; the namespace tuned as a proxy host is
//!   (`net.ipv4.tcp_tw_reuse=1`, `ip_local_port_range` 1024-65535);
//! - `floor`: `xdp_floor` on the balancer's interface, swapping in b1's MAC, no lookups;
//! - `dsrlb`: `dsrlb run` with b1 as its backend, MQTT health checks every 2 s.
//!
//! - `floor6` and `dsrlb6`: the same two over IPv6 (connection rate and latency only).
//!
//! - the controller with a full table (`bench scale` runs only this part): a million flows
//!   merged into the default table, then status, metrics, restarts, sweeps, and a cluster node
//!   that must receive them all (`scale.rs`);
//! - routed brokers (L3 DSR): the tunnelled lab, dsrlb in front of b1 on its segment (`l2`), b2
//!   behind a router over IPIP and b3 over GUE, each listener on a VIP of its own; connection
//!   rate in five rounds of the three, alternating; then the tunnel alone, b1 over IPIP against
//!   l2 once b1 unwraps (`bench routed` runs only this part).
//!
//! Paths run in alternating order. Connection rate and latency: fifteen rounds, A B C D E F then
//! F E D C B A, each path started, warmed for a second, measured for five, stopped; ratios are
//! taken within each round (neighbouring runs share the machine's state of the moment) and the
//! headline is their median. On this shared 2-core VM whole runs drift by up to ±20%, far more
//! than the balancers differ, so pairing is what makes the ratios mean something. Publish
//! throughput and held sessions: three rounds A B C D; the report gives medians. Memory per
//! held session (haproxy and dsrlb): in those rounds, 9,000 sessions through a fresh balancer
//! on a quiet kernel, its RSS, sockets and the kernel's slab before and after (`bench held` runs
//! only this part).

#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/soak.rs"]
mod soak;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use lb_userspace::dataplane::testing::TestPrograms;
use serde_json::Value;
use tests::{
    lab::{self, Lab, sh},
    netns::nsenter,
    wait,
};

/// Connection-rate rounds. Each runs the four paths back to back, in reverse order every
/// other round (A B C D, D C B A, ...), so `floor` and `dsrlb` are always neighbours and each
/// round gives paired ratios; the headline is the median of those. Per-round p99 ratios spread
/// from 0.9 to 1.2 here, so fifteen rounds rather than nine: a median of nine moved by ±0.05.
const RATE_ROUNDS: usize = 15;
/// Publish-throughput and held-sessions rounds (A B C D, three times).
const LOAD_ROUNDS: usize = 3;
const PATHS: [&str; 4] = ["direct", "haproxy", "floor", "dsrlb"];
/// The connection-rate rounds also run the floor and dsrlb over IPv6 (clients and VIP on
/// 2001:db8::/64, the same broker by its IPv6 address), next to each other.
const RATE_PATHS: [&str; 6] = ["direct", "haproxy", "floor", "dsrlb", "dsrlb6", "floor6"];
/// Just under the broker's open-files limit (20,000, which cannot be raised here).
const HOLD_TARGET: usize = 19_800;
const HOLD_PROCS: usize = 6;
/// Sessions held for the memory figures, haproxy and dsrlb alike: under haproxy's `maxconn`.
const MEM_HOLD: usize = 9_000;

struct Ctx {
    lab: Lab,
    bin: PathBuf,
    out: PathBuf,
}

impl Ctx {
    fn loadgen(&self, ns: &str, args: &[String]) -> anyhow::Result<Value> {
        let out = nsenter(ns, self.bin.join("loadgen")).args(args).output().context("starting loadgen")?;
        if !out.status.success() {
            bail!("loadgen {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("loadgen printed {text:?}"))
    }

    fn client_addrs() -> String {
        (0..lab::CLIENT_EXTRA_COUNT).map(|i| Ipv4Addr::new(192, 0, 2, lab::CLIENT_EXTRA_BASE + i).to_string()).collect::<Vec<_>>().join(",")
    }

    /// The client addresses a path's connections come from.
    fn sources(&self, path: &str) -> String {
        if path.ends_with('6') {
            self.lab.client_extra_addrs6().iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        } else {
            Self::client_addrs()
        }
    }

    /// Holds up to `count` sessions over several processes, then pings them all; the
    /// balancer process `pid`'s memory and the kernel's before the sessions open and once they
    /// all answered.
    fn hold(&self, target: &str, count: usize, pid: Option<u32>) -> anyhow::Result<(u64, u64, Mem, Mem)> {
        let before = Mem::of(pid);
        let mut procs: Vec<Child> = Vec::new();
        for _ in 0..HOLD_PROCS {
            let per = (count / HOLD_PROCS).to_string();
            let child = nsenter(&self.lab.ns("client"), self.bin.join("loadgen"))
                .args([
                    "hold",
                    "--target",
                    target,
                    "--from",
                    &Self::client_addrs(),
                    "--count",
                    &per,
                    "--parallel",
                    "128",
                    "--timeout-ms",
                    "1500",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting loadgen hold")?;
            procs.push(child);
        }
        let mut readers: Vec<_> = procs.iter_mut().map(|c| BufReader::new(c.stdout.take().expect("stdout"))).collect();
        for r in &mut readers {
            let mut line = String::new();
            r.read_line(&mut line)?;
            if !line.starts_with("opened") {
                bail!("loadgen hold said {line:?}");
            }
        }
        // All processes hold theirs now: ping every session.
        for c in &mut procs {
            writeln!(c.stdin.as_mut().expect("stdin"), "ping")?;
        }
        let (mut held, mut alive) = (0, 0);
        for r in &mut readers {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("hold printed {line:?}"))?;
            held += v["held"].as_u64().unwrap_or(0);
            alive += v["alive"].as_u64().unwrap_or(0);
        }
        let after = Mem::of(pid);
        for c in &mut procs {
            let _ = writeln!(c.stdin.as_mut().expect("stdin"), "exit");
            let _ = c.wait();
        }
        Ok((held, alive, before, after))
    }

    /// Waits (up to 90 s) until the lab's namespaces hold under 200 TCP sockets, TIME_WAIT
    /// included: the last run's connections gone, so that the kernel's memory is at rest.
    fn settle(&self) -> anyhow::Result<()> {
        let namespaces = [self.lab.ns("client"), self.lab.ns("lb"), self.lab.broker_ns(0)];
        let sockets = |ns: &str| -> u64 {
            let text = nsenter(ns, "cat").arg("/proc/net/sockstat").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let text = text.unwrap_or_default();
            let tcp = text.lines().find_map(|l| l.strip_prefix("TCP:")).unwrap_or("");
            let words: Vec<&str> = tcp.split_whitespace().collect();
            let field = |name: &str| {
                words.iter().position(|w| *w == name).and_then(|i| words.get(i + 1)?.parse::<u64>().ok()).unwrap_or(u64::MAX / 4)
            };
            field("inuse") + field("tw")
        };
        wait::within(Duration::from_secs(90), Duration::from_millis(500), || namespaces.iter().all(|ns| sockets(ns) < 200))
            .map(drop)
            .with_context(|| {
                format!("TCP sockets did not fall under 200 in 90 s: {:?}", namespaces.iter().map(|ns| sockets(ns)).collect::<Vec<_>>())
            })
    }

    fn rx_packets(&self) -> u64 {
        let text = sh("ip", &["-n", &self.lab.ns("lb"), "-j", "-s", "link", "show", "eth0"]).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
    }
}

/// A balancer process's memory and sockets, and the kernel's slab memory (all sockets of
/// every namespace are in it).
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kb: f64,
    sockets: f64,
    slab_kb: f64,
}

impl Mem {
    fn of(pid: Option<u32>) -> Self {
        let kb = |text: &str, field: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0.0)
        };
        let slab_kb = kb(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default(), "Slab:");
        let Some(pid) = pid else { return Self { slab_kb, ..Self::default() } };
        let rss_kb = kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), "VmRSS:");
        let sockets = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
            d.flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))).count()
        });
        #[expect(clippy::cast_precision_loss, reason = "a count of sockets")]
        Self { rss_kb, sockets: sockets as f64, slab_kb }
    }
}

fn proc_cpu_secs(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.split_whitespace().collect::<Vec<_>>();
            Some((rest[11].parse::<f64>().ok()? + rest[12].parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn prog_stats(id: u32) -> (u64, u64) {
    let text = sh("bpftool", &["-j", "prog", "show", "id", &id.to_string()]).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0))
}

/// What runs on the balancer for one path, and how to read its CPU.
enum Running {
    Direct,
    Haproxy { pid: u32 },
    Floor { _dp: Box<TestPrograms>, prog: u32 },
    Dsrlb { child: Child, prog: u32 },
}

impl Running {
    /// The balancer's process, if the path has one.
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Direct | Self::Floor { .. } => None,
            Self::Haproxy { pid } => Some(*pid),
            Self::Dsrlb { child, .. } => Some(child.id()),
        }
    }

    /// (process CPU seconds, XDP run ns, XDP runs).
    fn cpu(&self) -> (f64, u64, u64) {
        match self {
            Self::Direct => (0.0, 0, 0),
            Self::Haproxy { pid } => (proc_cpu_secs(*pid), 0, 0),
            Self::Floor { prog, .. } => {
                let (ns, n) = prog_stats(*prog);
                (0.0, ns, n)
            }
            Self::Dsrlb { child, prog } => {
                let (ns, n) = prog_stats(*prog);
                (proc_cpu_secs(child.id()), ns, n)
            }
        }
    }
}

fn start(ctx: &Ctx, path: &str) -> anyhow::Result<Running> {
    let lb = ctx.lab.ns("lb");
    match path {
        "direct" => Ok(Running::Direct),
        "haproxy" => {
            sh("ip", &["-n", &lb, "addr", "add", &format!("{}/32", lab::VIP), "dev", "lo"])?;
            // As any proxy at these connection rates is tuned: haproxy closes its side to the
            // broker first, so its outgoing connections pile up in TIME_WAIT; without reuse
            // and a wide port range, connect() spends its time searching for a free port and
            // the rate collapses to about 1,000/s after the first 20,000 connections.
            sh("ip", &["netns", "exec", &lb, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"])?;
            let cfg = ctx.out.join("haproxy.cfg");
            let pidfile = ctx.lab.state.join("haproxy.pid");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 9500\n  log stdout format raw local0 err\ndefaults\n  mode tcp\n  maxconn 9500\n  \
                     timeout connect 5s\n  timeout client 10m\n  timeout server 10m\nfrontend mqtt\n  bind {}:1883\n  \
                     default_backend brokers\nbackend brokers\n  balance leastconn\n  server b1 {}:1883 check inter 2s fall 3 rise 2\n",
                    lab::VIP,
                    lab::broker_addr(0)
                ),
            )?;
            let _ = std::fs::remove_file(&pidfile);
            let out = nsenter(&lb, Path::new("/usr/sbin/haproxy"))
                .args(["-D", "-f"])
                .arg(&cfg)
                .arg("-p")
                .arg(&pidfile)
                .output()
                .context("starting haproxy")?;
            if !out.status.success() {
                bail!("haproxy: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(500));
            let pid = std::fs::read_to_string(&pidfile)?.lines().next().unwrap_or("").trim().parse()?;
            Ok(Running::Haproxy { pid })
        }
        "floor" | "floor6" => {
            // The floor bounces every frame, ARP and NDP included: make sure the clients know
            // the balancer's MAC before it is attached (the paths before it usually taught
            // them). A connection attempt to a closed port resolves it (the RST is the answer).
            tests::netns::in_netns(&ctx.lab.ns("client"), || {
                let _ = std::net::TcpStream::connect_timeout(&(lab::LB_ADDR, 9).into(), Duration::from_secs(1));
                for from in ctx.lab.client_extra_addrs6() {
                    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).ok();
                    if let Some(sock) = sock
                        && sock.bind(&std::net::SocketAddr::new(from.into(), 0).into()).is_ok()
                    {
                        let _ = sock.connect_timeout(&std::net::SocketAddr::new(lab::LB6.into(), 9).into(), Duration::from_secs(1));
                    }
                }
            })?;
            let mac = broker_mac(ctx)?;
            let mut dp = TestPrograms::load(mac)?;
            tests::netns::in_netns(&lb, || dp.attach("xdp_floor", "eth0", XdpMode::Driver, None))??;
            let prog = dp.program("xdp_floor").info()?.id();
            Ok(Running::Floor { _dp: Box::new(dp), prog })
        }
        "dsrlb" | "dsrlb6" => {
            let cfg = ctx.out.join("dsrlb.toml");
            let vip = if path == "dsrlb6" { lab::VIP6.to_string() } else { lab::VIP.to_string() };
            std::fs::write(
                &cfg,
                format!(
                    "interface = \"eth0\"\nxdp_mode = \"native\"\n[health]\ncheck = \"mqtt\"\ninter = \"2s\"\nfall = 3\nrise = 2\n\
                     [[listener]]\nname = \"mqtt\"\nvip = \"{vip}\"\nport = 1883\n[[backend]]\nname = \"b1\"\naddress = \"{}\"\n\
                     address6 = \"{}\"\n",
                    lab::broker_addr(0),
                    lab::broker_addr6(0)
                ),
            )?;
            let child = nsenter(&lb, ctx.bin.join("dsrlb"))
                .arg("--socket")
                .arg(ctx.lab.state.join("control.sock"))
                .arg("--pin-dir")
                .arg(ctx.lab.pin_dir())
                .args(["run", "--metrics", "off", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("starting dsrlb")?;
            let link = ctx.lab.pin_dir().join("link");
            if wait::within(Duration::from_secs(20), Duration::from_millis(50), || {
                link.exists() && ctx.lab.state.join("control.sock").exists()
            })
            .is_none()
            {
                bail!("dsrlb did not come up");
            }
            let text = sh("bpftool", &["-j", "link", "show", "pinned", &link.display().to_string()])?;
            let prog = serde_json::from_str::<Value>(&text)?["prog_id"].as_u64().context("prog_id")?;
            Ok(Running::Dsrlb { child, prog: u32::try_from(prog)? })
        }
        _ => bail!("unknown path {path}"),
    }
}

fn stop(ctx: &Ctx, running: Running) {
    match running {
        Running::Direct | Running::Floor { .. } => {}
        Running::Haproxy { pid } => {
            lab::kill_and_wait(i32::try_from(pid).unwrap_or(0));
            let _ = sh("ip", &["-n", &ctx.lab.ns("lb"), "addr", "del", &format!("{}/32", lab::VIP), "dev", "lo"]);
        }
        Running::Dsrlb { mut child, .. } => {
            let _ = Command::new(ctx.bin.join("dsrlb"))
                .arg("--socket")
                .arg(ctx.lab.state.join("control.sock"))
                .arg("--pin-dir")
                .arg(ctx.lab.pin_dir())
                .arg("stop")
                .output();
            let _ = child.wait();
        }
    }
}

fn broker_mac(ctx: &Ctx) -> anyhow::Result<[u8; 6]> {
    let text = sh("ip", &["-n", &ctx.lab.broker_ns(0), "-j", "link", "show", "eth0"])?;
    let v: Value = serde_json::from_str(&text)?;
    lb_userspace::config::parse_mac(v[0]["address"].as_str().context("address")?).map_err(|e| anyhow::anyhow!(e))
}

/// One path, one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    conn_errors: f64,
    connections: f64,
    msgs: f64,
    ratio: f64,
    held: f64,
    alive: f64,
    /// While the sessions are held: the balancer process's RSS and sockets, and the kernel's
    /// slab memory (every namespace's sockets), per held session.
    rss_b_per_session: f64,
    sockets_per_session: f64,
    slab_b_per_session: f64,
    /// Balancer CPU seconds (process + XDP) during the connection-rate run, and its packets.
    cpu_s: f64,
    xdp_s: f64,
    proc_s: f64,
    packets: f64,
}

/// Connection rate, latency and balancer CPU of one path: started, warmed up for a second
/// (first connections, ARP, caches), then measured for five seconds.
fn measure_rate(ctx: &Ctx, path: &str) -> anyhow::Result<Sample> {
    let target = target(path);
    let running = start(ctx, path)?;
    let result = (|| {
        let client = ctx.lab.ns("client");
        let from = ctx.sources(path);
        ctx.loadgen(&client, &["rate", "--target", &target, "--from", &from, "--workers", "64", "--secs", "1"].map(String::from))?;
        let (c0, x0, _) = running.cpu();
        let p0 = ctx.rx_packets();
        let r =
            ctx.loadgen(&client, &["rate", "--target", &target, "--from", &from, "--workers", "64", "--secs", "5"].map(String::from))?;
        let (c1, x1, _) = running.cpu();
        let p1 = ctx.rx_packets();
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        let xdp_s = (x1 - x0) as f64 / 1e9;
        Ok(Sample {
            rate: f(&r, "rate"),
            p50_us: f(&r, "p50_us"),
            p99_us: f(&r, "p99_us"),
            conn_errors: f(&r, "errors"),
            connections: f(&r, "connections"),
            cpu_s: (c1 - c0) + xdp_s,
            xdp_s,
            proc_s: c1 - c0,
            packets: (p1 - p0) as f64,
            ..Sample::default()
        })
    })();
    stop(ctx, running);
    result
}

/// Publish throughput and held sessions of one path.
fn measure_load(ctx: &Ctx, path: &str) -> anyhow::Result<Sample> {
    let target = target(path);
    let running = start(ctx, path)?;
    let result = (|| {
        // Memory first, on a fresh balancer and a quiet kernel: a count every balancer holds
        // (haproxy's maxconn is 9,500), so that no attempt beyond it counts against the sessions.
        let mem = if matches!(running, Running::Haproxy { .. } | Running::Dsrlb { .. }) {
            ctx.settle()?;
            let (n, _, before, after) = ctx.hold(&target, MEM_HOLD, running.pid())?;
            let per = |a: f64, b: f64| if n > 0 { (a - b) / n as f64 } else { 0.0 };
            Sample {
                rss_b_per_session: per(after.rss_kb, before.rss_kb) * 1024.0,
                sockets_per_session: per(after.sockets, before.sockets),
                slab_b_per_session: per(after.slab_kb, before.slab_kb) * 1024.0,
                ..Sample::default()
            }
        } else {
            Sample::default()
        };
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        let from = Ctx::client_addrs();
        let ps = ctx.loadgen(
            &ctx.lab.ns("client"),
            &["pubsub", "--target", &target, "--from", &from, "--pubs", "4", "--subs", "4", "--secs", "4"].map(String::from),
        )?;
        let (held, alive, _, _) = ctx.hold(&target, HOLD_TARGET, None)?;
        Ok(Sample { msgs: f(&ps, "rate"), ratio: f(&ps, "ratio"), held: held as f64, alive: alive as f64, ..mem })
    })();
    stop(ctx, running);
    result
}

/// Memory per held session, haproxy against dsrlb (issue 25, part 5), from the held-sessions
/// rounds.
fn memory_section(loads: &BTreeMap<&str, Vec<Sample>>) -> String {
    let load_med = |p: &str, f: fn(&Sample) -> f64| median(loads.get(p).into_iter().flatten().map(f).collect());
    let mut r = String::new();
    let slot = (lb_common::FLOW_SLOTS_PER_FLOW as usize * std::mem::size_of::<lb_common::FlowSlot>()) as f64;
    let (h_rss, h_sockets, h_slab) = (
        load_med("haproxy", |s| s.rss_b_per_session),
        load_med("haproxy", |s| s.sockets_per_session),
        load_med("haproxy", |s| s.slab_b_per_session),
    );
    let (d_rss, d_sockets, d_slab) = (
        load_med("dsrlb", |s| s.rss_b_per_session),
        load_med("dsrlb", |s| s.sockets_per_session),
        load_med("dsrlb", |s| s.slab_b_per_session),
    );
    // The kernel's slab grows by every socket of the session: client and broker on both
    // paths, and haproxy's two between them. The difference per session is haproxy's.
    let h_kernel = (h_slab - d_slab).max(0.0);
    let haproxy = h_rss.max(0.0) + h_kernel;
    let dsrlb = slot + d_rss.max(0.0);
    let ratio = if haproxy > 0.0 { dsrlb / haproxy } else { f64::NAN };
    let _ = writeln!(r, "\n### Memory per held session\n");
    let _ = writeln!(
        r,
        "Measured in the held-sessions rounds (`bench held` runs only these), each on a freshly started balancer once the lab's namespaces hold under 200 TCP sockets: the balancer's process before the sessions open and once every session answered its PINGREQ (`/proc/PID/status` VmRSS, socket descriptors in `/proc/PID/fd`), and the kernel's slab memory (`/proc/meminfo` Slab, which holds every socket of every namespace), divided by the sessions held: {MEM_HOLD} through each balancer, under haproxy's `maxconn` (medians of {LOAD_ROUNDS} rounds).\n"
    );
    let _ = writeln!(
        r,
        "| balancer | process RSS B/session | sockets/session | kernel slab B/session (all sockets) | balancer's kernel B/session | flow table B/session | total B/session |"
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- |");
    let _ = writeln!(
        r,
        "| haproxy | {h_rss:.0} | {h_sockets:.2} | {h_slab:.0} | {h_kernel:.0} (its share: haproxy's slab less dsrlb's) | 0 | {haproxy:.0} |"
    );
    let _ = writeln!(
        r,
        "| dsrlb | {d_rss:.0} | {d_sockets:.2} | {d_slab:.0} | 0 | {slot:.0} (two 16-byte slots per flow, preallocated) | {dsrlb:.0} |"
    );
    let _ = writeln!(
        r,
        "\ndsrlb / haproxy per held session: **{ratio:.4}**. Target <= 1/100: {}. dsrlb's column counts its controller's RSS change while the sessions opened (about zero: it holds nothing per session) and the flow table's slots for one flow; the table is allocated whole at start (for the default 1M flows, 32 MB of `FLOWS` and 64 MB of `FLOW_ADDRS6`, the IPv6 flows' addresses), so a held session takes a slot and no memory; spread over only {MEM_HOLD} sessions that fixed 96 MB would be about 10.7 KB each.\n",
        if ratio <= 0.01 { "met" } else { "not met" }
    );
    r
}

fn target(path: &str) -> String {
    match path {
        "direct" => format!("{}:1883", lab::broker_addr(0)),
        "dsrlb6" | "floor6" => format!("[{}]:1883", lab::VIP6),
        _ => format!("{}:1883", lab::VIP),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

#[expect(clippy::many_single_char_names, reason = "plot geometry: x, y, w, k, n, s")]
fn svg_bars(path: &Path, title: &str, ylabel: &str, groups: &[(&str, Vec<f64>)], series: &[&str]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = groups.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0_f64, f64::max).max(1e-9) * 1.15;
    let n = groups.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n as f64, 0.0..max)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_label_formatter(&|y| format!("{y:.0}")).y_desc(ylabel).draw()?;
    // Path names under each group, placed in pixels from the chart's own coordinates.
    let label = TextStyle::from(("sans-serif", 16).into_font())
        .pos(plotters::style::text_anchor::Pos::new(plotters::style::text_anchor::HPos::Center, plotters::style::text_anchor::VPos::Top));
    for (i, (name, _)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(*name, (x, y + 8), label.clone()))?;
    }
    let colors = [RGBColor(46, 110, 190), RGBColor(230, 120, 40), RGBColor(60, 160, 90)];
    let k = series.len();
    for (s, name) in series.iter().enumerate() {
        let color = colors[s % colors.len()];
        chart
            .draw_series(groups.iter().enumerate().map(|(i, (_, v))| {
                let w = 0.7 / k as f64;
                let x0 = i as f64 + 0.15 + w * s as f64;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, v[s])], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    // Each bar's value above it, so small bars stay readable next to large ones.
    let value_style = TextStyle::from(("sans-serif", 12).into_font()).pos(plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Bottom,
    ));
    for (i, (_, v)) in groups.iter().enumerate() {
        for (s, value) in v.iter().enumerate() {
            let w = 0.7 / k as f64;
            let (x, y) = chart.backend_coord(&(i as f64 + 0.15 + w * s as f64 + w * 0.45, *value));
            let text = if *value >= 100.0 { format!("{value:.0}") } else { format!("{value:.2}") };
            root.draw(&Text::new(text, (x, y - 2), value_style.clone()))?;
        }
    }
    if k > 1 {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = sh("uname", &["-r"]).unwrap_or_default().trim().to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| s.lines().next().map(str::to_owned)).unwrap_or_default();
    format!("{cores} cores ({cpu}), kernel {kernel}, {}", mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
}

#[expect(clippy::too_many_lines, reason = "the report, written top to bottom")]
fn run() -> anyhow::Result<()> {
    let bin = std::env::current_exe()?.parent().context("bin dir")?.to_path_buf();
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "bench".into()));
    std::fs::create_dir_all(&out)?;
    let ctx = Ctx { lab: Lab::new("dsrlbb", 1), bin, out: out.clone() };
    let started = Instant::now();
    ctx.lab.up()?;
    // The micro-benchmark runs before run-time statistics are switched on: they add their
    // own timestamps to every program run.
    eprintln!("[bench] data-plane micro-benchmark");
    let micro = Command::new(ctx.bin.join("xdp_bench")).arg("--json").output()?;
    let micro: Value = serde_json::from_slice(&micro.stdout).context("xdp_bench --json")?;
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling kernel.bpf_stats_enabled")?;

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for round in 0..RATE_ROUNDS {
        let order: Vec<&str> = if round % 2 == 0 { RATE_PATHS.to_vec() } else { RATE_PATHS.iter().rev().copied().collect() };
        for path in order {
            eprintln!("[bench] rate round {} of {RATE_ROUNDS}, {path}", round + 1);
            let s = measure_rate(&ctx, path)?;
            eprintln!("[bench]   {:.0} conn/s, p50 {:.0} us, p99 {:.0} us", s.rate, s.p50_us, s.p99_us);
            samples.entry(path).or_default().push(s);
        }
    }
    let mut loads: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut ceiling = Vec::new();
    for round in 0..LOAD_ROUNDS {
        for path in PATHS {
            eprintln!("[bench] load round {} of {LOAD_ROUNDS}, {path}", round + 1);
            let s = measure_load(&ctx, path)?;
            eprintln!("[bench]   {:.0} msgs/s ({:.3} delivered), held {:.0}, alive {:.0}", s.msgs, s.ratio, s.held, s.alive);
            loads.entry(path).or_default().push(s);
        }
        // The load generator's own ceiling: straight at the broker, from its own namespace,
        // spread over 16 loopback sources like the clients' 16 addresses (one source runs out
        // of ports to TIME_WAIT within seconds at these rates).
        let loopbacks = (2..18).map(|i| format!("127.0.0.{i}")).collect::<Vec<_>>().join(",");
        let c = ctx.loadgen(
            &ctx.lab.broker_ns(0),
            &["rate", "--target", "127.0.0.1:1883", "--from", &loopbacks, "--workers", "64", "--secs", "5"].map(String::from),
        )?;
        ceiling.push(c["rate"].as_f64().unwrap_or(0.0));
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    ctx.lab.down()?;
    eprintln!("[bench] routed brokers");
    let routed_section = routed(&ctx.bin)?;
    eprintln!("[bench] the controller with a full table");
    let scale_section = scale::scale()? + &scale::cluster()?;

    let med = |p: &str, f: fn(&Sample) -> f64| median(samples[p].iter().map(f).collect());
    let load_med = |p: &str, f: fn(&Sample) -> f64| median(loads[p].iter().map(f).collect());
    let per10k = |p: &str| med(p, |s| if s.connections > 0.0 { s.cpu_s / s.connections * 1e4 } else { 0.0 });
    let per_mpkt = |p: &str| med(p, |s| if s.packets > 0.0 { s.cpu_s / s.packets * 1e6 } else { 0.0 });
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    // Ratios within each round, then their median.
    let per_round = |a: &str, b: &str, f: fn(&Sample) -> f64| -> Vec<f64> {
        samples[a].iter().zip(&samples[b]).map(|(x, y)| ratio(f(x), f(y))).collect()
    };
    let paired = |a: &str, b: &str, f: fn(&Sample) -> f64| median(per_round(a, b, f));
    let rate = |s: &Sample| s.rate;
    let p50 = |s: &Sample| s.p50_us;
    let p99 = |s: &Sample| s.p99_us;

    let mut r = String::new();
    let _ = writeln!(r, "# dsrlb benchmark report\n");
    let _ = writeln!(r, "Machine: {}. One run of `cargo xtask bench` ({:.0} s).\n", machine(), started.elapsed().as_secs_f64());
    let _ = writeln!(
        r,
        "All four paths serve the same single mosquitto broker; clients, balancer and broker are network namespaces on this one 2-core machine, so every hop shares the CPUs with the load. `floor` is the cheapest possible XDP bounce (one bounds check, a MAC swap, `XDP_TX`) in the same place as dsrlb: the limit any XDP balancer can reach in this lab. haproxy's namespace is tuned as a proxy host at these rates must be (`net.ipv4.tcp_tw_reuse=1`, `ip_local_port_range` 1024-65535): its connections to the broker end in TIME_WAIT on its side, and untuned it falls to about 1,000 connections/s after the first 20,000.\n"
    );
    let _ = writeln!(
        r,
        "Connection rate and latency: {RATE_ROUNDS} rounds, the six paths (the four, then dsrlb and floor over IPv6) back to back in alternating order (A B C D E F, then F E D C B A, ...), each started, warmed up for 1 s and measured for 5 s. A ratio is taken within each round, between neighbouring runs, and the headline is the median of the per-round ratios: whole runs on this shared VM drift by up to ±20%, far more than the paths differ. Publish throughput and held sessions: {LOAD_ROUNDS} rounds A B C D, medians.\n"
    );
    let _ = writeln!(r, "## Headline\n");
    let _ = writeln!(
        r,
        "| ratio (median of per-round ratios) | connection rate | p50 connect latency | p99 connect latency |\n| --- | --- | --- | --- |"
    );
    for (name, other) in [("dsrlb / floor", "floor"), ("dsrlb / haproxy", "haproxy"), ("dsrlb / direct", "direct")] {
        let _ = writeln!(
            r,
            "| {name} | {:.2} | {:.2} | {:.2} |",
            paired("dsrlb", other, rate),
            paired("dsrlb", other, p50),
            paired("dsrlb", other, p99)
        );
    }
    let _ = writeln!(
        r,
        "\nOver IPv6 (clients, VIP and broker on 2001:db8::/64, the same broker): dsrlb6 / floor6 connection rate {:.2}, p50 {:.2}, p99 {:.2}; dsrlb6 / dsrlb (IPv4) connection rate {:.2}. Medians: dsrlb6 {:.0} conn/s, floor6 {:.0} conn/s, dsrlb {:.0} conn/s, floor {:.0} conn/s.",
        paired("dsrlb6", "floor6", rate),
        paired("dsrlb6", "floor6", p50),
        paired("dsrlb6", "floor6", p99),
        paired("dsrlb6", "dsrlb", rate),
        med("dsrlb6", |s| s.rate),
        med("floor6", |s| s.rate),
        med("dsrlb", |s| s.rate),
        med("floor", |s| s.rate)
    );
    let cpu_ratio = ratio(per10k("dsrlb"), per10k("haproxy"));
    let _ = writeln!(r, "\nBalancer CPU per 10,000 connections, dsrlb / haproxy: **{cpu_ratio:.3}**.\n");
    let (rf, rh, lf) = (paired("dsrlb", "floor", rate), paired("dsrlb", "haproxy", rate), paired("dsrlb", "floor", p99));
    let _ = writeln!(
        r,
        "Targets: connection rate >= 0.95 x floor ({}) and >= 1.3 x haproxy ({}); p99 connect latency <= 1.1 x floor ({}); balancer CPU per 10,000 connections <= 1/10 of haproxy's ({}).\n",
        if rf >= 0.95 { "met" } else { "not met" },
        if rh >= 1.3 { "met" } else { "not met" },
        if lf <= 1.1 { "met" } else { "not met" },
        if cpu_ratio <= 0.1 { "met" } else { "not met" }
    );
    let fmt = |v: Vec<f64>| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    let _ = writeln!(r, "Per-round ratios, in round order:\n");
    let _ = writeln!(r, "- dsrlb / floor, rate: {}", fmt(per_round("dsrlb", "floor", rate)));
    let _ = writeln!(r, "- dsrlb / floor, p99: {}", fmt(per_round("dsrlb", "floor", p99)));
    let _ = writeln!(r, "- dsrlb / haproxy, rate: {}", fmt(per_round("dsrlb", "haproxy", rate)));
    let _ = writeln!(r, "- dsrlb / direct, rate: {}\n", fmt(per_round("dsrlb", "direct", rate)));

    let _ = writeln!(r, "## Per path (medians)\n");
    let _ = writeln!(
        r,
        "| path | conn/s | p50 us | p99 us | conn errors | QoS0 msgs/s delivered | delivered/sent | held (of {HOLD_TARGET}) | alive (PINGRESP) | balancer CPU s (proc + XDP) | CPU ms / 10k conns | CPU ms / M pkts |"
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in PATHS {
        let _ = writeln!(
            r,
            "| {p} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0} | {:.3} ({:.3} + {:.4}) | {:.2} | {:.2} |",
            med(p, |s| s.rate),
            med(p, |s| s.p50_us),
            med(p, |s| s.p99_us),
            med(p, |s| s.conn_errors),
            load_med(p, |s| s.msgs),
            load_med(p, |s| s.ratio),
            load_med(p, |s| s.held),
            load_med(p, |s| s.alive),
            med(p, |s| s.cpu_s),
            med(p, |s| s.proc_s),
            med(p, |s| s.xdp_s),
            per10k(p) * 1e3,
            per_mpkt(p) * 1e3
        );
    }
    if load_med("haproxy", |s| s.held) < HOLD_TARGET as f64 {
        let _ = writeln!(
            r,
            "\nhaproxy holds fewer sessions because a proxy spends two file descriptors per session (client and server side) and this machine's open-files hard limit is 20,000 and cannot be raised; its `maxconn` is set to 9500 to stay within it. Sessions beyond that time out (1.5 s) while connecting. The DR paths spend no descriptor on the balancer at all."
        );
    }
    r.push_str(&memory_section(&loads));
    let _ = writeln!(
        r,
        "\nLoad generator ceiling (straight at the broker from the broker's own namespace): {:.0} conn/s (median of {ceiling:.0?}).\n",
        median(ceiling.clone())
    );
    let _ = writeln!(
        r,
        "Balancer CPU is measured during the connection-rate run: for haproxy, its process's CPU seconds (`/proc/PID/stat`); for dsrlb, the XDP program's own run time (`kernel.bpf_stats_enabled=1`, `run_time_ns`) plus the controller's CPU seconds; for floor, its XDP run time. Packets are those received on the balancer's interface in that run.\n"
    );
    let _ = writeln!(r, "Rate rounds, every path (round order):\n");
    for p in RATE_PATHS {
        let rates: Vec<String> = samples[p].iter().map(|s| format!("{:.0}", s.rate)).collect();
        let p99s: Vec<String> = samples[p].iter().map(|s| format!("{:.0}", s.p99_us)).collect();
        let _ = writeln!(r, "- {p}: conn/s {}; p99 us {}", rates.join(", "), p99s.join(", "));
    }

    let _ = writeln!(r);
    r.push_str(&routed_section);
    r.push_str(&scale_section);
    let _ = writeln!(r, "\n## Data plane micro-benchmark (`BPF_PROG_TEST_RUN`)\n");
    let _ =
        writeln!(r, "| path | ns/packet | floor ns | ratio | driver ns | checked after the runs |\n| --- | --- | --- | --- | --- | --- |");
    for row in micro["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            r,
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
            row["path"].as_str().unwrap_or(""),
            row["ns"].as_f64().unwrap_or(0.0),
            row["floor_ns"].as_f64().unwrap_or(0.0),
            row["ratio"].as_f64().unwrap_or(0.0),
            row["driver_ns"].as_f64().unwrap_or(0.0),
            row["check"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        r,
        "\nEvery CPU at once (one thread pinned per CPU, each its own `BPF_PROG_TEST_RUN` loop of 2,000,000 driver runs; million packets per second over the slowest CPU's wall time, the driver included; medians of 5 rounds):\n\n| path | 1 CPU | every CPU | ratio | checked after the runs |\n| --- | --- | --- | --- | --- |"
    );
    for row in micro["multicore"].as_array().into_iter().flatten() {
        let _ = writeln!(
            r,
            "| {} | {:.2} M | {:.2} M | {:.2} | {} |",
            row["path"].as_str().unwrap_or(""),
            row["one_mpps"].as_f64().unwrap_or(0.0),
            row["all_mpps"].as_f64().unwrap_or(0.0),
            row["ratio"].as_f64().unwrap_or(0.0),
            row["check"].as_str().unwrap_or("")
        );
    }
    let f = |k: &str| micro[k].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        r,
        "\nEvery row runs `BPF_PROG_TEST_RUN` with `repeat` 2,000,000 (1,048,576 for the default table with room), in 11 rounds of (floor, path); the ratio is the median of the per-round ratios, so the machine's drift between rounds cancels. Time is the benchmark thread's CPU time over the run count. `repeat` re-runs the program on the frame it rewrote, and a forwarded frame leaves addressed to a backend, which the balancer does not forward (it forwards only frames for its own MACs). So every forwarded row runs behind `xdp_bench_flows`, a driver that addresses each run to the balancer again and tail-calls it: for one flow and for the ICMP error it keeps the frame's tuple, for new flows (and established flows that must miss the per-CPU flow cache) it gives every run the next client address and port of a sequence. Its own cost in the row's mode (the driver in front of the floor, less the floor, measured in every round) is taken off that round's figure and shown. The counters after each row prove the path: forwarded +runs, new flows +runs for new-flow rows and (next to) +0 for established ones, ICMP errors +runs, inserts refused +runs under the flood guard. The verifier processes {:.0} instructions of `dsrlb`.\n\nThe small table (1,024 flows, 32 KB) stays in cache, so its rows measure the code; `full` means every slot holds an unconfirmed flow (a SYN flood's state), so each new flow takes the dearest way in, replacing the least recently used unconfirmed flow of its eight slots; `all confirmed` means every slot holds a confirmed flow, so a new SYN is refused by the flood guard and forwarded by the ring. In the default table (1M flows, 32 MB) a random flow's buckets are a cache and TLB miss: one dependent load over 32 MB of 4 KB pages costs {:.1} ns on this machine (over 256 KB: {:.1} ns), which is what those rows pay over the small table's.\n",
        f("verified_insns"),
        f("chase_32m_ns"),
        f("chase_256k_ns")
    );
    let _ = writeln!(r, "## Plots\n\n![connection rate](conn_rate.svg)\n![connect latency](latency.svg)\n![balancer CPU](cpu.svg)\n");
    std::fs::write(out.join("report.md"), &r)?;

    let groups = |f: &dyn Fn(&str) -> Vec<f64>| PATHS.iter().map(|p| (*p, f(p))).collect::<Vec<_>>();
    svg_bars(
        &out.join("conn_rate.svg"),
        "MQTT connection rate (CONNECT, CONNACK, DISCONNECT)",
        "connections / s",
        &groups(&|p| vec![med(p, |s| s.rate)]),
        &["conn/s"],
    )?;
    svg_bars(
        &out.join("latency.svg"),
        "Connect latency (TCP + CONNACK)",
        "microseconds",
        &groups(&|p| vec![med(p, |s| s.p50_us), med(p, |s| s.p99_us)]),
        &["p50", "p99"],
    )?;
    svg_bars(
        &out.join("cpu.svg"),
        "Balancer CPU per 10,000 connections",
        "CPU milliseconds",
        &groups(&|p| vec![per10k(p) * 1e3]),
        &["CPU ms / 10k conns"],
    )?;
    print!("{r}");
    Ok(())
}

/// Connection-rate rounds of the routed-brokers part.
const ROUTED_ROUNDS: usize = 5;

/// L3 DSR: connection rates to b1 on the balancer's segment and to b2 (IPIP) and b3 (GUE)
/// behind a router, through one dsrlb, in alternating rounds; then the tunnel alone, without
/// the router hop: b1 reached over IPIP (a listener of its own) against l2, once b1 runs
/// `dsrlb decap`. The markdown section of the report. The balancer's per-backend counters after
/// the runs show which path each rate took.
#[expect(clippy::too_many_lines, reason = "the rounds and their section, written top to bottom")]
fn routed(bin: &Path) -> anyhow::Result<String> {
    use tests::balancer::{Balancer, StatusExt as _};
    let lab = Lab::tunnelled("dsrlbr", 3);
    lab.up()?;
    let result = (|| {
        let mut config =
            String::from("interface = \"eth0\"\nxdp_mode = \"native\"\n[health]\ncheck = \"mqtt\"\ninter = \"2s\"\nfall = 3\nrise = 2\n");
        let paths = [("l2", lab::VIP, "b1"), ("ipip", lab::VIP_IPIP, "b2"), ("gue", lab::VIP_GUE, "b3")];
        // b1 again, over IPIP ("b1t", at a second address of b1's, as no two backends may share
        // one; on a VIP b1 holds that no other listener uses): up only once b1 unwraps tunnel
        // frames (its probe goes through the tunnel too).
        let segment = ("ipip-segment", lab::VIP_INTERNAL, "b1t");
        let b1t = std::net::Ipv4Addr::new(192, 0, 2, 31);
        let added = std::process::Command::new("ip")
            .args(["-n", &lab.broker_ns(0), "addr", "add", &format!("{b1t}/32"), "dev", "eth0"])
            .status()
            .context("ip addr add")?;
        if !added.success() {
            bail!("adding {b1t} to b1: {added}");
        }
        for (name, vip, backend) in paths.iter().chain([&segment]) {
            let _ = writeln!(config, "[[listener]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 1883\nbackends = [\"{backend}\"]");
        }
        for (i, forward) in ["l2", "ipip", "gue"].iter().enumerate() {
            let _ = writeln!(config, "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\nforward = \"{forward}\"", i + 1, lab.broker_ip(i));
        }
        let _ = writeln!(config, "[[backend]]\nname = \"b1t\"\naddress = \"{b1t}\"\nforward = \"ipip\"");
        let lb = Balancer::start(&lab, &config);
        for (name, _, backend) in paths {
            wait::until(format!("{name}/{backend} up"), Duration::from_secs(20), || lb.state(name, backend) == "up");
        }
        let client = lab.ns("client");
        let from = Ctx::client_addrs();
        let loadgen = |target: &str, secs: &str| -> anyhow::Result<Value> {
            let out = nsenter(&client, bin.join("loadgen"))
                .args(["rate", "--target", target, "--from", &from, "--workers", "64", "--secs", secs])
                .output()
                .context("starting loadgen")?;
            if !out.status.success() {
                bail!("loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut connections: BTreeMap<&str, f64> = BTreeMap::new();
        // Beside the three, each topology without the balancer: b1 at its own address on the
        // segment, and b2 at its own address through the router (both ways, as the tunnelled
        // paths' replies go).
        let all = [
            ("direct-l2", lab.broker_ip(0)),
            ("l2", lab::VIP),
            ("ipip", lab::VIP_IPIP),
            ("gue", lab::VIP_GUE),
            ("direct-routed", lab.broker_ip(1)),
        ];
        for round in 0..ROUTED_ROUNDS {
            let order: Vec<_> = if round % 2 == 0 { all.to_vec() } else { all.iter().rev().copied().collect() };
            for (name, vip) in order {
                let target = format!("{vip}:1883");
                loadgen(&target, "1")?;
                let r = loadgen(&target, "5")?;
                let rate = r["rate"].as_f64().unwrap_or(0.0);
                eprintln!("[bench] routed round {} of {ROUTED_ROUNDS}, {name}: {rate:.0} conn/s", round + 1);
                rates.entry(name).or_default().push(rate);
                *connections.entry(name).or_default() += r["connections"].as_f64().unwrap_or(0.0);
            }
        }
        let status = lb.status();
        // The tunnel alone: b1 unwraps (as a tunnelled broker does), and the rounds alternate l2
        // and IPIP to it. Its decap program passes the l2 frames, so both pay for it.
        lab.setup_tunnelled_broker(0, &[])?;
        wait::until("ipip-segment/b1t up", Duration::from_secs(30), || lb.state(segment.0, segment.2) == "up");
        let both = [("l2, b1 unwrapping", lab::VIP), (segment.0, segment.1)];
        let mut seg_rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 0..ROUTED_ROUNDS {
            let order: Vec<_> = if round % 2 == 0 { both.to_vec() } else { both.iter().rev().copied().collect() };
            for (name, vip) in order {
                let target = format!("{vip}:1883");
                loadgen(&target, "1")?;
                let rate = loadgen(&target, "5")?["rate"].as_f64().unwrap_or(0.0);
                eprintln!("[bench] segment round {} of {ROUTED_ROUNDS}, {name}: {rate:.0} conn/s", round + 1);
                seg_rates.entry(name).or_default().push(rate);
            }
        }
        let seg_packets = lb.status().backend(segment.0, segment.2).map_or(0, |b| b.packets);
        let seg_ratio = median(seg_rates[segment.0].iter().zip(&seg_rates[both[0].0]).map(|(x, y)| x / y).collect());
        let per_round_of = |a: &str, b: &str| -> Vec<f64> { rates[a].iter().zip(&rates[b]).map(|(x, y)| x / y).collect() };
        let per_round = |a: &str| per_round_of(a, "l2");
        let mut r = String::new();
        let _ = writeln!(
            r,
            "## Routed brokers: L3 direct server return over IPIP and GUE
"
        );
        let _ = writeln!(
            r,
            "The tunnelled lab: dsrlb in front of b1 on its own segment (`l2`: the MAC rewrite) and b2, b3 in another subnet behind a router namespace, reached over IPIP and GUE and unwrapping with `dsrlb decap`; each listener on its own VIP over one broker. {ROUTED_ROUNDS} rounds of the three paths and the two direct ones (below) in alternating order, each warmed up for 1 s and measured for 5 s; the ratio is the median of the per-round ratios. The tunnelled paths cross one router hop more than `l2` (a forwarding namespace on the same 2 CPUs), in both directions, which the ratio includes.\n"
        );
        let _ = writeln!(
            r,
            "| path | conn/s (median) | / l2 (median of per-round ratios) | per round | balancer packets to its broker | connections |"
        );
        let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- |");
        for (name, _, backend) in paths {
            let ratio = if name == "l2" { 1.0 } else { median(per_round(name)) };
            let rounds = rates[name].iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            let packets = status.backend(name, backend).map_or(0, |b| b.packets);
            let _ = writeln!(
                r,
                "| {name} | {:.0} | {ratio:.2} | {rounds} | {packets} | {:.0} |",
                median(rates[name].clone()),
                connections[name]
            );
        }
        let (ipip, gue) = (median(per_round("ipip")), median(per_round("gue")));
        let _ = writeln!(
            r,
            "\nTarget: tunnelled connection rate >= 0.9 x l2: IPIP {ipip:.2} ({}), GUE {gue:.2} ({}). The packets column is the balancer's own count for each listener's broker (each connection is at least 4 client segments), so each rate went the way its row says.\n",
            if ipip >= 0.9 { "met" } else { "not met" },
            if gue >= 0.9 { "met" } else { "not met" }
        );
        let (d_l2, d_routed) = (median(rates["direct-l2"].clone()), median(rates["direct-routed"].clone()));
        let _ = writeln!(
            r,
            "Each topology without the balancer (clients to the broker's own address, the same rounds): b1 on the segment {d_l2:.0} conn/s, b2 through the router {d_routed:.0} conn/s. Against its own topology, through the balancer: l2 {:.2}, IPIP {:.2}, GUE {:.2} (medians of per-round ratios to direct-l2, direct-routed, direct-routed): the router hop, not the tunnel, is most of the gap between the tunnelled and the l2 rates here.\n",
            median(per_round_of("l2", "direct-l2")),
            median(per_round_of("ipip", "direct-routed")),
            median(per_round_of("gue", "direct-routed"))
        );
        let _ = writeln!(
            r,
            "The tunnel alone, without the router hop: b1 on the segment reached over IPIP (`ipip-segment`, a listener of its own), once b1 runs `dsrlb decap` (which then also passes the l2 frames), in {ROUTED_ROUNDS} more rounds alternating with l2 to b1: {:.0} conn/s against {:.0}, **{seg_ratio:.2}** x l2 (median of per-round ratios; {}). The balancer sent {seg_packets} packets to b1 over the tunnel.\n",
            median(seg_rates[segment.0].clone()),
            median(seg_rates[both[0].0].clone()),
            if seg_ratio >= 0.9 { "the 0.9 target met" } else { "the 0.9 target not met" }
        );
        drop(lb);
        Ok(r)
    })();
    let _ = lab.down();
    result
}

/// `bench held`: the held-sessions rounds of haproxy and dsrlb alone, and the memory section.
fn held(bin: &Path) -> anyhow::Result<String> {
    let out = std::env::temp_dir().join("dsrlb-bench-held");
    std::fs::create_dir_all(&out)?;
    let ctx = Ctx { lab: Lab::new("dsrlbb", 1), bin: bin.to_path_buf(), out };
    ctx.lab.up()?;
    let result = (|| {
        let mut loads: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        for round in 0..LOAD_ROUNDS {
            for path in ["haproxy", "dsrlb"] {
                eprintln!("[bench] held round {} of {LOAD_ROUNDS}, {path}", round + 1);
                let s = measure_load(&ctx, path)?;
                eprintln!(
                    "[bench]   held {:.0}, RSS {:.0} B, sockets {:.2}, slab {:.0} B per session",
                    s.held, s.rss_b_per_session, s.sockets_per_session, s.slab_b_per_session
                );
                loads.entry(path).or_default().push(s);
            }
        }
        Ok(memory_section(&loads))
    })();
    let _ = ctx.lab.down();
    result
}

/// Takes down every lab a part of the bench brings up (after a failure, one may be left up). The
/// soak takes its own down (its lab's name is an option: another soak may be running).
fn labs_down() {
    let _ = Lab::new("dsrlbb", 1).down();
    let _ = Lab::tunnelled("dsrlbr", 3).down();
    let _ = Lab::new("dsrlbs", 2).down();
    let _ = Lab::routed("dsrlbc", 2, 2, tests::lab::Routing::Bgp).down();
}

/// `bench soak [--sessions N] [--minutes M] [--processes P] [--ping-secs MIN-MAX]
/// [--sample-secs S] [--reload-minutes R] [--churn-per-sec C] [--vanish N] [--lab NAME]
/// [--nodes 1|2] [--out DIR]`: writes `DIR/soak.md` (with its verdict, also when it failed) and
/// `DIR/soak.svg` when `--out` is given (`soak-1node.*` for one node).
fn soak_part(bin: &Path) -> anyhow::Result<String> {
    let mut o = soak::Options::full();
    let mut out = None;
    let args: Vec<String> = std::env::args().skip(2).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<f64>().ok().filter(|x| x.is_finite() && *x > 0.0).with_context(|| format!("{flag}: {v} is not a positive number"))
        };
        match flag.as_str() {
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a positive count")]
            "--sessions" => o.sessions = num(v)? as usize,
            "--minutes" => o.duration = Duration::from_secs_f64(num(v)? * 60.0),
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a positive count")]
            "--processes" => o.processes = num(v)? as usize,
            "--ping-secs" => {
                let (a, b) = v.split_once('-').with_context(|| format!("--ping-secs: {v} is not MIN-MAX"))?;
                o.ping = (Duration::from_secs_f64(num(a)?), Duration::from_secs_f64(num(b)?));
            }
            "--sample-secs" => o.sample_every = Duration::from_secs_f64(num(v)?),
            "--reload-minutes" => o.reload_every = Duration::from_secs_f64(num(v)? * 60.0),
            "--churn-per-sec" => o.churn_per_sec = num(v)?,
            // 0 is allowed: no client vanishes.
            "--vanish" => o.vanish = v.parse().ok().with_context(|| format!("{flag}: {v} is not a count"))?,
            "--lab" => o.lab.clone_from(v),
            "--nodes" => {
                o.nodes = v.parse().ok().filter(|n| (1..=2).contains(n)).with_context(|| format!("{flag}: {v} is not 1 or 2"))?;
            }
            "--out" => out = Some(PathBuf::from(v)),
            _ => bail!("bench soak: unknown flag {flag}"),
        }
    }
    // Made (or found wanting) before the hour, not after it.
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: creating {}", dir.display()))?;
    }
    let outcome = soak::soak(bin, &o, out.as_deref())?;
    // The report is written whatever the verdict (it is in it); if it cannot be, it is printed.
    if let Some(dir) = &out {
        let path = dir.join(if o.nodes == 1 { "soak-1node.md" } else { "soak.md" });
        if let Err(e) = std::fs::write(&path, &outcome.report) {
            eprint!("{}", outcome.report);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
    }
    if !outcome.failures.is_empty() {
        eprint!("{}", outcome.report);
        bail!("the soak did not hold: {}", outcome.failures.join("; "));
    }
    Ok(outcome.report)
}

fn main() {
    let bin = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)).unwrap_or_default();
    // `bench scale`, `bench held`, `bench routed`: one part alone, its section printed.
    let part = std::env::args().nth(1);
    let section = match part.as_deref() {
        Some("scale") => Some(scale::scale().and_then(|a| Ok(a + &scale::cluster()?))),
        Some("held") => Some(held(&bin)),
        Some("routed") => Some(routed(&bin)),
        Some("soak") => Some(soak_part(&bin)),
        _ => None,
    };
    let result = match section {
        Some(section) => section.map(|s| print!("{s}")),
        None => run(),
    };
    if let Err(e) = result {
        eprintln!("bench {}: {e:#}", part.as_deref().unwrap_or(""));
        labs_down();
        std::process::exit(1);
    }
}
