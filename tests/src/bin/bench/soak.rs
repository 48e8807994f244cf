//! `bench soak` (issue 25, part 6): many MQTT sessions held through the VIP for a long time,
//! while the operator's and the fleet's events happen, sampled every few seconds.
//!
//! - The lab: dsrlb in front of six mosquitto brokers (a seventh is added during the run), MQTT
//!   health checks every 2 s. With `nodes = 2` (the default), two dsrlb nodes with `[cluster]`
//!   behind a router that spreads the flows over them by ECMP (BIRD, BGP with BFD: the routed
//!   lab); with `nodes = 1`, one balancer on the clients' segment. Sessions come from several
//!   `loadgen soak` processes in the client's namespace (no process may hold 20,000 files
//!   here), over the client's 16 addresses. Each session pings at its own random interval (30 to 120 s by default); a lost
//!   one says how it ended and reconnects after 1 to 5 s, as an MQTT client would. A background
//!   of short sessions (connect, CONNECT, DISCONNECT) runs in every process.
//! - The events, at fixed fractions of the run: b7 added (a reload), b2 drained, b3 stopped
//!   (SIGTERM, SIGKILL after 3 s) and started again 15 s later, the controller restarted
//!   (SIGTERM), 10,000 sessions (from a client namespace of their own) vanishing without a FIN,
//!   the controller killed (`kill -9`) and started again, and a reload every `reload_every`.
//!   These happen to node 1's controller; the reloads, b7 and the drain to every node. With
//!   two nodes, node 2 then fails (its link down, its controller killed and its program gone
//!   with its pins, BIRD stopped: the router moves its flows to node 1) and comes back with an
//!   empty table (drained as node 1 is before BIRD announces it, as an operator would).
//! - Every sample: sessions alive, lost (by how) and reconnected, live flows in the table (two
//!   nodes: the distinct flows of both nodes' tables, closing ones left out, read from their
//!   pins), expired flows (the controllers' count since they started), each node's controller's
//!   RSS and CPU, the frames each node's program sent (its `tx` counters, summed over CPUs).
//! - What must hold:
//!   - no session lost to the balancer: no loss before b3's stop, none after its sessions had
//!     their next ping (`ping_max` and 20 s after), and no more in between than b3 held (its
//!     established MQTT connections when it stopped, counted on b3); none to node 2's failure;
//!   - every session answers a last ping at the end;
//!   - no short session failing outside the 30 s after b3's stop;
//!   - live flows within 1% of the sessions the clients hold (outside events, and outside the
//!     windows in which the flows of b3's and the vanished clients' sessions wait out
//!     `flow_idle_timeout`, and until node 2's flows have had their next ping through node 1);
//!   - the vanished clients' flows kept until `flow_idle_timeout`, gone one sweep after it;
//!   - each node's last controller's RSS flat after a warm-up (within 10%);
//!   - the programs' frame counters never going back (per node, over the life of its pins).
//!
//! Flow ages are 16 bits of 1.07 s units, so they wrap after about 19.5 hours: an hour cannot
//! show that.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_common::FlowKey;
use lb_userspace::{dataplane::testing::pinned_flow_table, flow_table::FlowTable};
use serde_json::Value;
use tests::{
    balancer::Balancer,
    lab::{self, Lab, Routing},
    netns::nsenter,
    wait,
};

/// Brokers in the lab; the last is added to the config during the run.
const BROKERS: usize = 7;

/// How a soak runs. `cargo xtask soak` takes the defaults (100,000 sessions, 60 minutes); the
/// smoke run in `cargo xtask test` is the same code, small and short.
#[derive(Clone, Debug)]
pub struct Options {
    pub sessions: usize,
    pub duration: Duration,
    /// Client processes (each holds sessions / processes).
    pub processes: usize,
    pub ping: (Duration, Duration),
    pub sample_every: Duration,
    pub reload_every: Duration,
    /// Short sessions per second in each client process.
    pub churn_per_sec: f64,
    /// Sessions (of `sessions`) from a client namespace of their own that vanishes during the
    /// run: its link goes down, then its process is killed, so no FIN or RST reaches the
    /// balancer. Their flows must stay until `flow_idle_timeout`, then go.
    pub vanish: usize,
    /// The lab's name (its namespaces are `LAB-*`).
    pub lab: String,
    /// Balancer nodes: 1 (the single-balancer lab) or 2 (the routed lab, ECMP over BGP, with
    /// `[cluster]`, and node 2's failure among the events).
    pub nodes: usize,
}

impl Options {
    #[must_use]
    pub fn full() -> Self {
        Self {
            sessions: 100_000,
            duration: Duration::from_hours(1),
            processes: 7,
            ping: (Duration::from_secs(30), Duration::from_mins(2)),
            sample_every: Duration::from_secs(10),
            reload_every: Duration::from_mins(10),
            churn_per_sec: 2.0,
            vanish: 10_000,
            lab: "dsrlbk".to_owned(),
            nodes: 2,
        }
    }
}

/// The vanishing clients' address: on the lab's segment, or (routed lab) on a network of its
/// own behind the router, as a second site of clients.
fn gone_addr(lab: &Lab) -> std::net::Ipv4Addr {
    if lab.routed.is_some() { std::net::Ipv4Addr::new(198, 51, 101, 90) } else { std::net::Ipv4Addr::new(192, 0, 2, 90) }
}

/// The vanishing clients' namespace, on the lab's bridge like the client's (or behind the
/// routed lab's router, on its own link), removed on drop.
struct Gone {
    ns: String,
    addr: std::net::Ipv4Addr,
}

impl Gone {
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        let gone = Self { ns: lab.ns("gone"), addr: gone_addr(lab) };
        let _ = lab::sh("ip", &["netns", "del", &gone.ns]);
        lab::sh("ip", &["netns", "add", &gone.ns])?;
        let cidr = format!("{}/24", gone.addr);
        lab::sh("ip", &["-n", &gone.ns, "link", "set", "lo", "up"])?;
        if lab.routed.is_some() {
            // The router's third port: 198.51.101.1, the clients' default gateway.
            let router = lab.ns("router");
            lab::sh("ip", &["link", "add", "eth0", "netns", &gone.ns, "type", "veth", "peer", "name", "eth2", "netns", &router])?;
            lab::sh("ip", &["-n", &router, "addr", "add", "198.51.101.1/24", "dev", "eth2"])?;
            lab::sh("ip", &["-n", &router, "link", "set", "eth2", "up"])?;
            lab::sh("ip", &["-n", &gone.ns, "addr", "add", &cidr, "dev", "eth0"])?;
            lab::sh("ip", &["-n", &gone.ns, "link", "set", "eth0", "up"])?;
            lab::sh("ip", &["-n", &gone.ns, "route", "add", "default", "via", "198.51.101.1"])?;
            // No GRO where the router takes the clients' frames: merged segments would be too
            // big to bounce.
            lab.exec(&router, "ethtool", &["-K", "eth2", "gro", "off"])?;
        } else {
            let sw = lab.ns("sw");
            lab::sh("ip", &["link", "add", "eth0", "netns", &gone.ns, "type", "veth", "peer", "name", "p-gone", "netns", &sw])?;
            lab::sh("ip", &["-n", &sw, "link", "set", "p-gone", "master", "br0"])?;
            lab::sh("ip", &["-n", &sw, "link", "set", "p-gone", "up"])?;
            lab::sh("ip", &["-n", &gone.ns, "addr", "add", &cidr, "dev", "eth0"])?;
            lab::sh("ip", &["-n", &gone.ns, "link", "set", "eth0", "up"])?;
            lab::sh("ip", &["-n", &gone.ns, "route", "add", &format!("{}/32", lab::VIP), "via", &lab::LB_ADDR.to_string()])?;
            // As for the lab's client: no GRO on its port.
            lab.exec(&sw, "ethtool", &["-K", "p-gone", "gro", "off"])?;
        }
        // As for the lab's client: no partial checksums in bounced frames.
        lab.exec(&gone.ns, "ethtool", &["-K", "eth0", "tx", "off"])?;
        Ok(gone)
    }
}

impl Drop for Gone {
    fn drop(&mut self) {
        let _ = lab::sh("ip", &["netns", "del", &self.ns]);
    }
}

/// The lab, taken down when the soak ends, also on a panic.
struct LabDown<'a>(&'a Lab);

impl Drop for LabDown<'_> {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

/// A balancer node of the soak: its controller and its table (mapped from its pins), both
/// `None` while the node is down. `life` counts its starts from empty pins: its program's
/// counters only grow within one life.
struct Node {
    lb: Option<Balancer>,
    table: Option<FlowTable>,
    life: u32,
}

/// What a sample saw of one node.
#[derive(Clone, Debug, Default)]
struct NodeSample {
    up: bool,
    life: u32,
    pid: u32,
    rss_kb: u64,
    cpu_s: f64,
    /// Frames its program sent (`tx/*` verdicts, summed over CPUs).
    tx: u64,
    /// Flows its controller expired since it started.
    expired: u64,
}

/// One sample of the run.
#[derive(Clone, Debug, Default)]
struct Sample {
    t: f64,
    opened: u64,
    open_failed: u64,
    alive: u64,
    lost_reset: u64,
    lost_eof: u64,
    lost_timeout: u64,
    lost_other: u64,
    reconnected: u64,
    reconnect_failed: u64,
    pings: u64,
    churn_ok: u64,
    churn_failed: u64,
    live_flows: u64,
    /// Flows in the table from the vanishing clients' address, closing ones left out.
    gone_flows: u64,
    nodes: Vec<NodeSample>,
    event: String,
}

impl Sample {
    const fn lost(&self) -> u64 {
        self.lost_reset + self.lost_eof + self.lost_timeout + self.lost_other
    }

    fn expired(&self) -> u64 {
        self.nodes.iter().map(|n| n.expired).sum()
    }
}

/// A client process's latest line, and when it came.
type Latest = Arc<Mutex<Vec<(Value, Instant)>>>;

/// The sessions the client processes said they lost (the client's address and port, how), and
/// when the line came, in the order they came.
type Losses = Arc<Mutex<Vec<(String, String, Instant)>>>;

/// The client processes and the latest line each printed; the last process is the vanishing
/// clients' (when there are any), whose counts freeze when they vanish.
struct Clients {
    procs: Vec<Child>,
    readers: Vec<std::thread::JoinHandle<()>>,
    latest: Latest,
    losses: Losses,
    gone: Option<usize>,
    /// The vanishing process's last line before it vanished.
    vanished: Option<Value>,
    report_every: Duration,
}

impl Clients {
    fn start(lab: &Lab, bin: &Path, o: &Options, gone: Option<&Gone>) -> anyhow::Result<Self> {
        let addrs: Vec<String> = lab.client_extra_addrs().iter().map(ToString::to_string).collect();
        let stay = o.sessions - o.vanish;
        let mut groups: Vec<(String, String, usize, f64)> = (0..o.processes)
            .map(|p| {
                // Each process its own share of the addresses (at least one).
                let mine: Vec<&str> =
                    addrs.iter().skip(p % addrs.len()).step_by(o.processes.min(addrs.len())).map(String::as_str).collect();
                (lab.ns("client"), mine.join(","), stay / o.processes + usize::from(p < stay % o.processes), o.churn_per_sec)
            })
            .collect();
        if let Some(g) = gone {
            // No short sessions from there: its flows are its held sessions'.
            groups.push((g.ns.clone(), g.addr.to_string(), o.vanish, 0.0));
        }
        let report_every = o.sample_every.min(Duration::from_secs(5));
        let latest: Latest = Arc::new(Mutex::new(vec![(Value::Null, Instant::now()); groups.len()]));
        // Built first, so that the processes started before a failure are stopped by its drop.
        let mut clients = Self {
            procs: Vec::new(),
            readers: Vec::new(),
            latest,
            losses: Losses::default(),
            gone: gone.map(|_| o.processes),
            vanished: None,
            report_every,
        };
        for (p, (ns, from, count, churn)) in groups.iter().enumerate() {
            let mut child = nsenter(ns, bin.join("loadgen"))
                .args(["soak", "--target", &format!("{}:1883", lab::VIP), "--from", from])
                .args(["--count", &count.to_string(), "--parallel", "64", "--timeout-ms", "5000"])
                .args(["--ping-min-ms", &o.ping.0.as_millis().to_string(), "--ping-max-ms", &o.ping.1.as_millis().to_string()])
                .args(["--report-ms", &report_every.as_millis().to_string(), "--churn-per-sec", &churn.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting loadgen soak")?;
            let out = child.stdout.take().context("loadgen's stdout")?;
            clients.procs.push(child);
            let (latest, losses) = (Arc::clone(&clients.latest), Arc::clone(&clients.losses));
            clients.readers.push(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                    if let Some(who) = v["lost"].as_str() {
                        if let Ok(mut l) = losses.lock() {
                            l.push((who.to_owned(), v["how"].as_str().unwrap_or("?").to_owned(), Instant::now()));
                        }
                    } else if let Ok(mut l) = latest.lock() {
                        l[p] = (v, Instant::now());
                    }
                }
            }));
        }
        Ok(clients)
    }

    /// A field summed over every process's latest line; the vanished process counts with its
    /// last line before it vanished, and none of its sessions alive.
    fn sum(&self, field: &str) -> u64 {
        self.latest.lock().map_or(0, |l| {
            l.iter()
                .enumerate()
                .map(|(i, (v, _))| match (&self.vanished, Some(i) == self.gone) {
                    (Some(_), true) if field == "alive" => 0,
                    (Some(last), true) => last[field].as_u64().unwrap_or(0),
                    _ => v[field].as_u64().unwrap_or(0),
                })
                .sum()
        })
    }

    /// Every process that should run does, and has reported lately.
    fn check(&mut self) -> anyhow::Result<()> {
        let vanished = self.vanished.is_some();
        for (i, c) in self.procs.iter_mut().enumerate() {
            if vanished && Some(i) == self.gone {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                bail!("client process {i} exited ({status}) during the soak");
            }
        }
        let l = self.latest.lock().map_err(|_| anyhow::anyhow!("a reader panicked"))?;
        for (i, (v, at)) in l.iter().enumerate() {
            if !(vanished && Some(i) == self.gone) && (v.is_null() || at.elapsed() > self.report_every * 3) {
                bail!("client process {i} has not reported for {:.0} s", at.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    /// The vanishing clients' link goes down, then their process is killed: their sockets
    /// close with nothing reaching the balancer. Returns how many sessions they held.
    fn vanish(&mut self, gone: &Gone) -> anyhow::Result<u64> {
        let i = self.gone.context("no vanishing clients")?;
        let last = self.latest.lock().map_err(|_| anyhow::anyhow!("a reader panicked"))?[i].0.clone();
        lab::sh("ip", &["-n", &gone.ns, "link", "set", "eth0", "down"])?;
        let _ = self.procs[i].kill();
        let _ = self.procs[i].wait();
        let alive = last["alive"].as_u64().unwrap_or(0);
        self.vanished = Some(last);
        Ok(alive)
    }

    /// "exit" to every process: each pings every session once more and prints its last line.
    /// Fails when a process that should have said so did not.
    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let vanished = self.vanished.is_some();
        let l = self.latest.lock().map_err(|_| anyhow::anyhow!("a reader panicked"))?;
        for (i, (v, _)) in l.iter().enumerate() {
            if !(vanished && Some(i) == self.gone) && v["last"] != true {
                bail!("client process {i} ended without its last line");
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        for c in &mut self.procs {
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = writeln!(stdin, "exit");
            }
        }
        for c in &mut self.procs {
            if wait::within(Duration::from_mins(1), Duration::from_millis(100), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The controller's RSS (kB) and CPU time (s) from /proc.
fn proc_usage(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 =
        fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    #[expect(clippy::cast_precision_loss, reason = "CPU seconds for a report")]
    (rss, ticks as f64 / hz as f64)
}

/// The distinct flows of the nodes' tables that are not closing (a flow both nodes hold counts
/// once): all of them, and those from the vanishing clients' address.
fn distinct_flows(nodes: &[Node], gone: std::net::Ipv4Addr) -> (u64, u64) {
    let src = u32::from_ne_bytes(gone.octets());
    let mut seen: HashSet<FlowKey> = HashSet::new();
    for table in nodes.iter().filter_map(|n| n.table.as_ref()) {
        table.walk(|f| {
            if !f.closing() {
                seen.insert(f.key);
            }
        });
    }
    let from_gone = seen.iter().filter(|k| k.src_be == src).count();
    (u64::try_from(seen.len()).unwrap_or(u64::MAX), u64::try_from(from_gone).unwrap_or(u64::MAX))
}

/// Every flow of the running nodes' tables (closing ones too), and each table's clock as its
/// freshest flow tells it (within a frame's gap): where the soak looks up a lost session's flow.
#[derive(Default)]
struct Tables {
    /// When it was read (s from the start).
    t: f64,
    /// Per node: the age of its freshest flow, `None` while the node is down.
    now: Vec<Option<u32>>,
    flows: HashMap<FlowKey, Vec<(usize, u32)>>,
}

impl Tables {
    fn read(nodes: &[Node], t: f64) -> Self {
        let mut me = Self { t, now: vec![None; nodes.len()], flows: HashMap::new() };
        for (i, n) in nodes.iter().enumerate() {
            let Some(table) = &n.table else { continue };
            let mut newest: Option<u32> = None;
            table.walk(|f| {
                me.flows.entry(f.key).or_default().push((i, f.state));
                let age = f.age();
                // Newer: ahead of the newest so far by less than half the clock's wrap.
                newest = Some(newest.map_or(age, |m| if age.wrapping_sub(m) & 0xffff < 0x8000 { age } else { m }));
            });
            me.now[i] = newest;
        }
        me
    }

    /// What each node's table held for `key`: its backend id, kind and idle time.
    fn describe(&self, key: &FlowKey) -> String {
        let Some(held) = self.flows.get(key) else { return format!("{:.0} s: in no table", self.t) };
        let each: Vec<String> = held
            .iter()
            .map(|&(i, state)| {
                let f = lb_userspace::flow_table::Flow { key: *key, state, addrs6: None };
                let idle = self.now[i].map_or(0, |now| f.idle(now));
                #[expect(clippy::cast_precision_loss, reason = "seconds for a report")]
                let secs = f64::from(idle) * (1u64 << lb_common::FLOW_AGE_NS_SHIFT) as f64 / 1e9;
                format!("node {} backend id {} {} idle {secs:.0} s", i + 1, lb_common::real_backend(f.real()), kind_name(f.kind()))
            })
            .collect();
        format!("{:.0} s: {}", self.t, each.join(", "))
    }
}

/// The sessions the clients lost outside b3's window (b3's own end with it), each looked up in
/// the tables: the sample's before the loss, just before node 2 failed, and the sample's after.
#[derive(Default)]
struct LossLog {
    /// Client lines taken so far.
    taken: usize,
    prev: Tables,
    at_fail: Option<Tables>,
    b3_window: Option<(Instant, Instant)>,
    lines: Vec<String>,
}

impl LossLog {
    /// At most this many losses looked up (each is a line of the report).
    const MAX: usize = 40;

    fn update(&mut self, nodes: &[Node], clients: &Clients, started: Instant) {
        let after = Tables::read(nodes, started.elapsed().as_secs_f64());
        let new: Vec<(String, String, Instant)> =
            clients.losses.lock().map(|l| l.iter().skip(self.taken).cloned().collect()).unwrap_or_default();
        self.taken += new.len();
        for (who, how, at) in new {
            if self.b3_window.is_some_and(|(a, b)| (a..b).contains(&at)) || self.lines.len() >= Self::MAX {
                continue;
            }
            let Some(key) = session_key(&who) else { continue };
            let line = format!(
                "{:.0} s, {who}, {how}. Before: {}.{} After: {}.",
                at.duration_since(started).as_secs_f64(),
                self.prev.describe(&key),
                self.at_fail.as_ref().map_or_else(String::new, |t| format!(" Before node 2 failed: {}.", t.describe(&key))),
                after.describe(&key)
            );
            eprintln!("soak: lost {line}");
            self.lines.push(line);
        }
        self.prev = after;
    }
}

/// Diagnostics (`SOAK_CLUSTER_LOG`): flows node 1 holds idle over 150 s while node 2 saw them
/// within a minute, and what each node's `dsrlb flow` says of a few.
fn old_copies(t: &Tables, nodes: &[Node]) {
    let secs = |i: usize, state: u32| {
        let f = lb_userspace::flow_table::Flow { key: FlowKey::default(), state, addrs6: None };
        #[expect(clippy::cast_precision_loss, reason = "seconds for a log")]
        let s = f64::from(t.now[i].map_or(0, |now| f.idle(now))) * (1u64 << lb_common::FLOW_AGE_NS_SHIFT) as f64 / 1e9;
        s
    };
    let old: Vec<&FlowKey> = t
        .flows
        .iter()
        .filter(|(_, held)| {
            held.iter().any(|&(i, st)| i == 0 && secs(0, st) > 150.0) && held.iter().any(|&(i, st)| i == 1 && secs(1, st) < 60.0)
        })
        .map(|(k, _)| k)
        .collect();
    eprintln!("soak: {} flows node 1 holds idle over 150 s that node 2 saw within 60 s", old.len());
    for k in old.iter().take(6) {
        let client = format!("{}:{}", std::net::Ipv4Addr::from(k.src_be.to_ne_bytes()), u16::from_be_bytes(k.sport_be.to_ne_bytes()));
        for (i, n) in nodes.iter().enumerate() {
            if let Some(lb) = &n.lb {
                let (_, out, err) = lb.cli(&["flow", &client, &format!("{}:1883", lab::VIP)]);
                eprintln!("soak: node {} flow {client}: {} {}", i + 1, out.trim().replace('\n', " | "), err.trim());
            }
        }
    }
}

/// A flow kind's name (`lb_common::FLOW_K_*`).
const fn kind_name(kind: u32) -> &'static str {
    match kind {
        lb_common::FLOW_K_MIDFLOW_CONFIRMED => "midflow-confirmed",
        lb_common::FLOW_K_MIDFLOW => "midflow",
        lb_common::FLOW_K_UNCONFIRMED_CLOSING => "unconfirmed-closing",
        lb_common::FLOW_K_OPENED => "opened",
        lb_common::FLOW_K_MIDFLOW_CONFIRMED_CLOSING => "midflow-closing",
        lb_common::FLOW_K_CONFIRMED => "confirmed",
        lb_common::FLOW_K_CONFIRMED_CLOSING => "confirmed-closing",
        _ => "?",
    }
}

/// The flow key of a client's session to the VIP's port 1883, from the client's "IP:PORT".
fn session_key(client: &str) -> Option<FlowKey> {
    let a: std::net::SocketAddrV4 = client.parse().ok()?;
    let vip = lab::VIP;
    Some(FlowKey {
        src_be: u32::from_ne_bytes(a.ip().octets()),
        dst_be: u32::from_ne_bytes(vip.octets()),
        sport_be: u16::from_ne_bytes(a.port().to_be_bytes()),
        dport_be: u16::from_ne_bytes(1883u16.to_be_bytes()),
    })
}

/// A sample: the clients' latest counts, and each node's status, usage and table. With one
/// node, live flows are its status's count (what an operator reads); with two, the distinct
/// flows of both tables.
fn take(lab: &Lab, nodes: &[Node], clients: &Clients, started: Instant, event: &str) -> Sample {
    let mut node_samples = Vec::new();
    let mut entries = 0u64;
    for n in nodes {
        let Some(lb) = &n.lb else {
            node_samples.push(NodeSample { life: n.life, ..NodeSample::default() });
            continue;
        };
        let status = lb.status();
        if std::env::var_os("SOAK_CLUSTER_LOG").is_some()
            && let Some(c) = &status.cluster
        {
            let peers: Vec<String> = c
                .peers
                .iter()
                .map(|p| {
                    format!(
                        "{} sent {} received {} out {} in {} synced {}",
                        p.node, p.flows_sent, p.flows_received, p.out_connected, p.in_connected, p.synced
                    )
                })
                .collect();
            eprintln!("soak: {} cluster: walk {:?}; merged {:?}; {}", lb.ns(), c.last_walk, c.merged, peers.join("; "));
        }
        let pid = lb.child.id();
        let (rss_kb, cpu_s) = proc_usage(pid);
        entries += u64::try_from(status.flow_table_entries).unwrap_or(u64::MAX);
        node_samples.push(NodeSample {
            up: true,
            life: n.life,
            pid,
            rss_kb,
            cpu_s,
            tx: status.verdicts.iter().filter(|(k, _)| k.starts_with("tx/")).map(|(_, v)| *v).sum(),
            expired: status.flow_table.get("expired").copied().unwrap_or(0),
        });
    }
    let (distinct, gone_flows) = distinct_flows(nodes, gone_addr(lab));
    Sample {
        t: started.elapsed().as_secs_f64(),
        opened: clients.sum("opened"),
        open_failed: clients.sum("open_failed"),
        alive: clients.sum("alive"),
        lost_reset: clients.sum("lost_reset"),
        lost_eof: clients.sum("lost_eof"),
        lost_timeout: clients.sum("lost_timeout"),
        lost_other: clients.sum("lost_other"),
        reconnected: clients.sum("reconnected"),
        reconnect_failed: clients.sum("reconnect_failed"),
        pings: clients.sum("pings"),
        churn_ok: clients.sum("churn_ok"),
        churn_failed: clients.sum("churn_failed"),
        live_flows: if nodes.len() == 1 { entries } else { distinct },
        gone_flows,
        nodes: node_samples,
        event: event.to_owned(),
    }
}

/// The soak's `flow_idle_timeout`: half as long again as the longest ping interval, at least
/// 20 s, in whole seconds.
fn idle_timeout(o: &Options) -> Duration {
    Duration::from_secs((o.ping.1.as_millis() * 3 / 2).div_ceil(1000).max(20).try_into().unwrap_or(u64::MAX))
}

/// The cluster's `sync_interval` (two nodes): a quarter of the flows' timeout, at most the lab's
/// 30 s.
fn sync_interval(o: &Options) -> Duration {
    Duration::from_secs((idle_timeout(o).as_secs() / 4).clamp(1, 30))
}

/// How much longer than the original a peer's copy of a flow may stay (two nodes): the flow
/// told back to its own node lives the peer's refresh lag past its frame there (`refresh`, a
/// quarter of the timeout or `sync_interval`, and two rounds, plus a unit of the flow clock),
/// and that node tells it until then; the other node's copy counts from that last word until
/// a round of that node's a lag later (within one more `sync_interval`) leaves it out.
fn copy_lag(o: &Options) -> f64 {
    if o.nodes < 2 {
        return 0.0;
    }
    let sync = sync_interval(o).as_secs_f64();
    2.0 * ((idle_timeout(o).as_secs_f64() / 4.0).max(sync) + 2.0 * sync + 2.2) + sync
}

/// How long after they vanished the vanished clients' flows may stay (`vanished_flows`' bound).
fn vanished_wait(o: &Options) -> Duration {
    let idle = idle_timeout(o).as_secs_f64();
    Duration::from_secs_f64(idle + copy_lag(o) + idle / 8.0 + o.sample_every.as_secs_f64() + 5.0)
}

/// The events of node 2's failure and return (two nodes).
const NODE_FAILS: &str = "node 2 fails";
const NODE_BACK: &str = "node 2 back";
/// The event of the vanishing clients' going.
const VANISH: &str = "clients vanish";

/// The events of a run, at fractions of its length, and the reloads.
fn timeline(o: &Options) -> Vec<(Duration, &'static str)> {
    let at = |f: f64| o.duration.mul_f64(f);
    let mut ev = vec![
        (at(0.10), "add b7"),
        (at(0.20), "drain b2"),
        (at(0.30), "stop b3"),
        (at(0.30) + Duration::from_secs(15), "start b3"),
        (at(0.45), "restart controller (SIGTERM)"),
        (at(0.60), "kill -9 controller"),
    ];
    if o.nodes > 1 {
        // Early enough for node 2's new controller to show its memory over the rest of the run.
        ev.extend([(at(0.65), NODE_FAILS), (at(0.70), NODE_BACK)]);
    }
    if o.vanish > 0 {
        // After the restarts and node 2's return: until a restarted node (controller or node)
        // ends a round on its new connection, its peer keeps the copies it last told on the
        // old one a lag and a timeout past that word, vanished clients' too (`docs/ha.md`); the
        // hour's first run, whose clients vanished 360 s before a `kill -9`, saw their last
        // flows go 490 s after, not within `vanished_wait`. The run waits for them. With two
        // nodes it also waits for a ping of each session after node 2's failure (see `run`).
        ev.push((at(0.72), VANISH));
    }
    let mut r = o.reload_every;
    while r < o.duration {
        ev.push((r, "reload"));
        r += o.reload_every;
    }
    ev.sort_by_key(|(t, _)| *t);
    ev
}

/// What a soak gives: its report (Markdown) and what did not hold (empty when all held).
pub struct Outcome {
    pub report: String,
    pub failures: Vec<String>,
}

/// Runs the soak on a lab of its own.
///
/// # Errors
/// When the lab, the balancer or a client cannot start, or an event fails.
pub fn soak(bin: &Path, o: &Options, out_dir: Option<&Path>) -> anyhow::Result<Outcome> {
    ensure!(o.vanish < o.sessions, "--vanish {} must be below --sessions {}", o.vanish, o.sessions);
    ensure!(o.processes > 0 && o.sessions >= o.processes, "--processes {} for --sessions {}", o.processes, o.sessions);
    ensure!((1..=2).contains(&o.nodes), "--nodes {}: 1 or 2", o.nodes);
    let lab = if o.nodes == 1 { Lab::new(&o.lab, BROKERS) } else { Lab::routed(&o.lab, BROKERS, o.nodes, Routing::Bgp) };
    let _down = LabDown(&lab);
    lab.up()?;
    run(&lab, bin, o, out_dir)
}

/// What happened during the run, for the report.
struct Run {
    samples: Vec<Sample>,
    opened_in: Duration,
    on_b3: u64,
    vanished: u64,
    /// The sessions lost outside b3's window, with what the tables held for them.
    losses: Vec<String>,
}

fn config(o: &Options, lab: &Lab) -> String {
    // One listener. Flows idle past `idle` expire: longer than the longest ping interval (a
    // session's flow must outlive its silences), short enough that flows whose clients are gone
    // without a FIN through the balancer (b3's, the vanished ones) leave within the run.
    let mut full = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\n\n[health]\ncheck = \"mqtt\"\ninter = \"2s\"\n\n\
         [[listener]]\nname = \"mqtt\"\nvip = \"{}\"\nport = 1883\nflow_idle_timeout = \"{}s\"\n\n",
        lab::VIP,
        idle_timeout(o).as_secs()
    );
    for i in 0..BROKERS {
        let _ = writeln!(full, "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n", i + 1, lab::broker_addr(i));
    }
    // Two nodes: `[announce]` for BIRD and `[cluster]` (shared key), its rounds longer than
    // its join wait.
    let sync = sync_interval(o).as_secs();
    let cluster = lab.cluster_config();
    let tuned = cluster
        .replace("sync_interval = \"30s\"", &format!("sync_interval = \"{sync}s\""))
        .replace("join_wait = \"10s\"", &format!("join_wait = \"{}s\"", (sync / 2).min(10)));
    assert!(
        cluster.is_empty() || (cluster.contains("sync_interval = \"30s\"") && cluster.contains("join_wait = \"10s\"")),
        "the lab's [cluster] no longer sets sync_interval and join_wait as the soak expects"
    );
    full.push_str(&tuned);
    full
}

/// MQTT connections broker `i` holds (established, to its port 1883), counted on the broker.
fn sessions_on(lab: &Lab, i: usize) -> anyhow::Result<u64> {
    let out = lab.exec(&lab.broker_ns(i), "ss", &["-Htn", "state", "established", "sport", "=", ":1883"])?;
    Ok(u64::try_from(out.lines().filter(|l| !l.trim().is_empty()).count()).unwrap_or(u64::MAX))
}

/// Waits until the routed lab's router sends the VIP over `n` nodes, at most `within`.
fn wait_next_hops(lab: &Lab, n: usize, within: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    wait::within(within, Duration::from_millis(20), || lab.router_next_hops(lab::VIP).len() == n)
        .with_context(|| format!("the router did not route {} over {n} nodes within {within:?}", lab::VIP))?;
    Ok(t.elapsed())
}

/// Starts the controllers: one balancer, or every node of the routed lab (joined, and routed to
/// by the router).
fn start_nodes(lab: &Lab, config: &str) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    if lab.routed.is_none() {
        nodes.push(Node { lb: Some(Balancer::start(lab, config)), table: None, life: 0 });
    } else {
        for i in 0..lab.nodes() {
            nodes.push(Node { lb: Some(Balancer::start_node(lab, i, config)), table: None, life: 0 });
        }
        for n in nodes.iter().filter_map(|n| n.lb.as_ref()) {
            n.wait_joined(Duration::from_secs(30));
        }
        wait_next_hops(lab, lab.nodes(), Duration::from_secs(30))?;
    }
    for n in &mut nodes {
        // The table the node's controllers share (its pins outlive them), mapped here.
        let pins = n.lb.as_ref().map(|lb| lb.pin_dir.clone()).context("a node just started")?;
        n.table = Some(pinned_flow_table(&pins)?);
    }
    Ok(nodes)
}

/// The running controllers.
fn up(nodes: &mut [Node]) -> impl Iterator<Item = &mut Balancer> {
    nodes.iter_mut().filter_map(|n| n.lb.as_mut())
}

/// Node 2 dies as a host does: its link goes down, its controller is killed and its program
/// goes with its pins (its table too), BIRD stops. Returns when the router no longer routes to
/// it, and how long that took.
fn fail_node(lab: &Lab, node: &mut Node, i: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    node.table = None;
    lab.set_node_link(i, false)?;
    if let Some(mut lb) = node.lb.take() {
        lb.kill_node();
    }
    lab.stop_bird_node(i);
    wait_next_hops(lab, lab.nodes() - 1, Duration::from_secs(20))?;
    Ok(t.elapsed())
}

/// Node 2 comes back with empty pins: link up, a new controller on the current config, joined
/// (it takes the other node's exceptions), `drains` applied, then BIRD, so that the router
/// sends it flows only once it forwards as the other node does. Returns when the router routes
/// to it again, and how long that took.
fn revive_node(lab: &Lab, node: &mut Node, i: usize, config: &str, drains: &[&str]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    lab.set_node_link(i, true)?;
    let lb = Balancer::start_node(lab, i, config);
    lb.wait_joined(Duration::from_secs(30));
    for b in drains {
        let (ok, _, err) = lb.cli(&["drain", b]);
        ensure!(ok, "drain {b} on node {}: {err}", i + 1);
    }
    node.table = Some(pinned_flow_table(&lb.pin_dir)?);
    node.life += 1;
    node.lb = Some(lb);
    lab.start_bird_node(i)?;
    wait_next_hops(lab, lab.nodes(), Duration::from_secs(30))?;
    Ok(t.elapsed())
}

/// An operator's command on every running node.
fn on_every_node(nodes: &mut [Node], args: &[&str]) -> anyhow::Result<()> {
    for lb in up(nodes) {
        let (ok, _, err) = lb.cli(args);
        ensure!(ok, "dsrlb {} on {}: {err}", args.join(" "), lb.ns());
    }
    Ok(())
}

#[expect(clippy::too_many_lines, reason = "the run's events, one after another")]
fn run(lab: &Lab, bin: &Path, o: &Options, out_dir: Option<&Path>) -> anyhow::Result<Outcome> {
    let full = config(o, lab);
    let b7 = format!("[[backend]]\nname = \"b7\"\naddress = \"{}\"\n", lab::broker_addr(BROKERS - 1));
    let without_b7 = full.replace(&b7, "");
    let mut current = without_b7.clone();
    let mut nodes = start_nodes(lab, &without_b7)?;
    wait::until("every broker of the config up on every node", Duration::from_mins(1), || {
        nodes.iter().filter_map(|n| n.lb.as_ref()).all(|lb| {
            lb.status()
                .listeners
                .iter()
                .find(|l| l.name == "mqtt")
                .is_some_and(|l| l.backends.len() == BROKERS - 1 && l.backends.iter().all(|b| b.state == "up"))
        })
    });
    let gone = if o.vanish > 0 { Some(Gone::new(lab)?) } else { None };
    let mut clients = Clients::start(lab, bin, o, gone.as_ref())?;
    let started = Instant::now();
    // Opening: until every session is open (or failed to), at most 10 minutes.
    wait::until_every("every session opened", Duration::from_mins(10), Duration::from_secs(1), || {
        clients.sum("opened") + clients.sum("open_failed") >= u64::try_from(o.sessions).unwrap_or(u64::MAX)
    });
    let opened_in = started.elapsed();
    let mut samples = vec![take(lab, &nodes, &clients, started, "opened")];
    let mut losses = LossLog { prev: Tables::read(&nodes, started.elapsed().as_secs_f64()), ..LossLog::default() };
    let soak_start = Instant::now();
    let mut events = timeline(o);
    // The clients vanish a longest ping interval (and a margin) after node 2's failure at the
    // earliest. The flows of node 2's sessions went with its table (only flows that are
    // exceptions, or all while the nodes' configs differ, have copies on node 1, and those go
    // a lag past node 2's last word); each comes back into a table at its session's next ping.
    // A session gone before that ping has no flow left to wait out its timeout, which the run
    // checks of every vanished session's flow. (The two-minute smoke's events come close
    // enough together to meet this; the hour's are minutes apart.)
    let mut vanish_from = Duration::ZERO;
    let when = |at: Duration, what: &str, vanish_from: Duration| if what == VANISH { at.max(vanish_from) } else { at };
    let (mut on_b3, mut vanished) = (0u64, 0u64);
    let mut drains: Vec<&str> = Vec::new();
    let mut next_sample = o.sample_every;
    // The run lasts until the vanished clients' flows have had their time to go.
    let mut end = o.duration;
    // (A vanish held past the run's length still comes, and the run then waits for its flows.)
    while soak_start.elapsed() < end || events.iter().any(|&(_, what)| what == VANISH) {
        let mut label = String::new();
        while let Some(i) = events.iter().position(|&(at, what)| when(at, what, vanish_from) <= soak_start.elapsed()) {
            let (_, what) = events.remove(i);
            let mut what = what.to_owned();
            match what.as_str() {
                "add b7" => {
                    current.clone_from(&full);
                    for lb in up(&mut nodes) {
                        std::fs::write(&lb.config, &full)?;
                    }
                    on_every_node(&mut nodes, &["reload"])?;
                }
                "drain b2" => {
                    on_every_node(&mut nodes, &["drain", "b2"])?;
                    drains.push("b2");
                }
                "stop b3" => {
                    let now = Instant::now();
                    losses.b3_window = Some((now, now + o.ping.1 + Duration::from_secs(20)));
                    on_b3 = sessions_on(lab, 2)?;
                    lab.stop_broker(2)?;
                }
                "start b3" => lab.start_broker(2)?,
                "restart controller (SIGTERM)" => {
                    let lb = nodes[0].lb.as_mut().context("node 1 runs")?;
                    let status = lb.stop();
                    ensure!(status.success(), "the controller exited with {status} on SIGTERM");
                    lb.restart(lab);
                }
                VANISH => {
                    vanished = clients.vanish(gone.as_ref().context("no vanishing clients")?)?;
                    end = end.max(soak_start.elapsed() + vanished_wait(o));
                }
                "kill -9 controller" => {
                    let lb = nodes[0].lb.as_mut().context("node 1 runs")?;
                    lb.kill9();
                    lb.restart(lab);
                }
                "reload" => on_every_node(&mut nodes, &["reload"])?,
                NODE_FAILS => {
                    let before = Tables::read(&nodes, started.elapsed().as_secs_f64());
                    if std::env::var_os("SOAK_CLUSTER_LOG").is_some() {
                        old_copies(&before, &nodes);
                    }
                    losses.at_fail = Some(before);
                    let took = fail_node(lab, &mut nodes[1], 1)?;
                    vanish_from = soak_start.elapsed() + o.ping.1 + Duration::from_secs(3);
                    what = format!("{NODE_FAILS} (router on 1 node after {:.1} s)", took.as_secs_f64());
                }
                NODE_BACK => {
                    let took = revive_node(lab, &mut nodes[1], 1, &current, &drains)?;
                    what = format!("{NODE_BACK} (routed to after {:.1} s)", took.as_secs_f64());
                }
                _ => bail!("unknown event {what}"),
            }
            if !label.is_empty() {
                label.push_str("; ");
            }
            label.push_str(&what);
        }
        if !label.is_empty() {
            clients.check()?;
            samples.push(take(lab, &nodes, &clients, started, &label));
            losses.update(&nodes, &clients, started);
            continue;
        }
        let left = next_sample.saturating_sub(soak_start.elapsed());
        let next_event = events.iter().map(|&(at, what)| when(at, what, vanish_from)).min();
        let until_event = next_event.map_or(left, |at| at.saturating_sub(soak_start.elapsed()));
        std::thread::sleep(left.min(until_event).min(Duration::from_secs(1)));
        if soak_start.elapsed() >= next_sample {
            clients.check()?;
            samples.push(take(lab, &nodes, &clients, started, ""));
            losses.update(&nodes, &clients, started);
            // After a slow event, on from now: no samples taken back to back to catch up.
            next_sample = (next_sample + o.sample_every).max(soak_start.elapsed());
        }
    }
    // The end: every session pings once more; the last lines count it.
    let live_before = take(lab, &nodes, &clients, started, "").live_flows;
    clients.finish()?;
    let mut last = take(lab, &nodes, &clients, started, "end (every session pinged)");
    last.live_flows = live_before;
    let final_ok = clients.sum("final_ok");
    samples.push(last);
    losses.update(&nodes, &clients, started);
    for lb in up(&mut nodes) {
        let _ = lb.stop();
    }
    drop(nodes);
    let ran = Run { samples, opened_in, on_b3, vanished, losses: losses.lines };
    let (report, mut failures) = report(o, &ran, final_ok)?;
    let mut report = report;
    if let Some(dir) = out_dir {
        let svg = if o.nodes == 1 { "soak-1node.svg" } else { "soak.svg" };
        plot(&dir.join(svg), &ran.samples)?;
        let _ = writeln!(report, "![sessions and live flows]({svg})\n");
    }
    failures.retain(|f| !f.is_empty());
    let verdict = if failures.is_empty() { "everything held".to_owned() } else { format!("did not hold: {}", failures.join("; ")) };
    let _ = writeln!(report, "**Verdict: {verdict}.**");
    Ok(Outcome { report, failures })
}

/// The samples of every minute and of every event, as a Markdown table.
#[expect(clippy::cast_precision_loss, reason = "ratios for a report")]
fn table(o: &Options, samples: &[Sample]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "| t (s) | event | alive | lost: reset | eof | timeout | reconnected | live flows | live/alive | vanished clients' flows | expired | RSS MB{} | frames sent (tx){} |",
        if o.nodes > 1 { " (node 1 / 2)" } else { "" },
        if o.nodes > 1 { " (node 1 / 2)" } else { "" },
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let per_node = |s: &Sample, f: &dyn Fn(&NodeSample) -> String| {
        s.nodes.iter().map(|n| if n.up { f(n) } else { "down".to_owned() }).collect::<Vec<_>>().join(" / ")
    };
    for s in samples.iter().filter(|s| !s.event.is_empty() || s.t.rem_euclid(60.0) < o.sample_every.as_secs_f64()) {
        let ratio = if s.alive > 0 { s.live_flows as f64 / s.alive as f64 } else { 0.0 };
        let _ = writeln!(
            r,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {} |",
            s.t,
            s.event,
            s.alive,
            s.lost_reset,
            s.lost_eof,
            s.lost_timeout + s.lost_other,
            s.reconnected,
            s.live_flows,
            ratio,
            s.gone_flows,
            s.expired(),
            per_node(s, &|n| format!("{:.1}", n.rss_kb as f64 / 1024.0)),
            per_node(s, &|n| n.tx.to_string()),
        );
    }
    r
}

/// The value of `f` at the last sample before `t` (or the first sample).
fn at(samples: &[Sample], t: f64, f: impl Fn(&Sample) -> u64) -> u64 {
    samples.iter().rev().find(|s| s.t <= t).or_else(|| samples.first()).map_or(0, f)
}

/// The report and what did not hold.
#[expect(clippy::cast_precision_loss, reason = "ratios for a report")]
fn report(o: &Options, ran: &Run, final_ok: u64) -> anyhow::Result<(String, Vec<String>)> {
    let samples = &ran.samples;
    let last = samples.last().context("no samples")?;
    let mut r = String::new();
    let mut failures = Vec::new();
    let _ = writeln!(
        r,
        "## Soak: {} sessions for {:.0} min, {}\n\nCommand: `cargo xtask soak{}` (`target/release/bench soak`). {} client processes and \
         one that vanishes ({} sessions), pings every {}-{} s, {} short sessions/s per process, a sample every {} s. Opening took \
         {:.0} s.\n",
        o.sessions,
        o.duration.as_secs_f64() / 60.0,
        if o.nodes == 1 { "one balancer".to_owned() } else { format!("{} nodes with `[cluster]` (ECMP over BGP)", o.nodes) },
        if o.nodes == 1 { " -- --nodes 1" } else { "" },
        o.processes,
        o.vanish,
        o.ping.0.as_secs(),
        o.ping.1.as_secs(),
        o.churn_per_sec,
        o.sample_every.as_secs(),
        ran.opened_in.as_secs_f64()
    );
    r.push_str(&table(o, samples));

    // Losses: b3's sessions end between its stop and their next ping (`ping_max` later, plus
    // the 10 s a ping may wait); any other loss is the balancer's.
    let idle = idle_timeout(o).as_secs_f64();
    let stop_at = samples.iter().find(|s| s.event.contains("stop b3")).map_or(f64::MAX, |s| s.t);
    let b3_until = stop_at + o.ping.1.as_secs_f64() + 20.0;
    let before = at(samples, stop_at - 0.5, Sample::lost);
    let during = at(samples, b3_until, Sample::lost).saturating_sub(before);
    let after = last.lost().saturating_sub(before + during);
    let on_b3 = ran.on_b3;
    let to_balancer = before + after + during.saturating_sub(on_b3);
    let unanswered = last.alive.saturating_sub(final_ok);
    let churn_outside =
        last.churn_failed
            .saturating_sub(at(samples, stop_at + 30.0, |s| s.churn_failed).saturating_sub(at(samples, stop_at - 0.5, |s| s.churn_failed)));
    let _ = writeln!(
        r,
        "\n- Sessions opened: {} ({} failed to open); alive at the end: {}, of which {final_ok} answered the last ping. Fewest held \
         after b3's sessions reconnected: {}.\n- Lost to the balancer: **{to_balancer}** ({before} before b3's stop, {after} after its \
         sessions' next ping, {} beyond the {on_b3} sessions b3 held, in between). b3's: {during} (reset {}, EOF {}, timeout {}), all \
         reconnected: {} reconnects in all, {} attempts refused while b3 was stopped and not yet marked down.\n- Short sessions: {} \
         made, {} failed ({churn_outside} outside the 30 s after b3's stop).",
        last.opened,
        last.open_failed,
        last.alive,
        samples.iter().filter(|s| s.t > b3_until && s.event.is_empty()).map(|s| s.alive).min().unwrap_or(0),
        during.saturating_sub(on_b3),
        last.lost_reset,
        last.lost_eof,
        last.lost_timeout + last.lost_other,
        last.reconnected,
        last.reconnect_failed,
        last.churn_ok,
        last.churn_failed,
    );
    lost_sessions(&mut r, &ran.losses);
    if to_balancer > 0 {
        failures.push(format!("{to_balancer} sessions lost to the balancer"));
    }
    if unanswered > 0 {
        failures.push(format!("{unanswered} sessions did not answer the last ping"));
    }
    failures.extend((last.open_failed > 0).then(|| format!("{} sessions failed to open", last.open_failed)));
    if churn_outside > 0 {
        failures.push(format!("{churn_outside} short sessions failed outside b3's stop"));
    }

    // Live flows against the clients' count, outside events and the windows in which gone
    // sessions' flows wait out their timeout.
    let sweep = (idle / 8.0).max(1.0);
    let vanish_at = samples.iter().find(|s| s.event.contains(VANISH)).map(|s| s.t);
    // Node 2's flows are gone with its table; node 1 takes each in at its next frame.
    let failed_at = samples.iter().find(|s| s.event.contains(NODE_FAILS)).map(|s| s.t);
    let never = (f64::MAX, f64::MAX);
    // b3's reset sessions send no FIN through the balancer: their flows wait as the vanished ones'.
    let waits = [
        (stop_at, b3_until + idle + copy_lag(o) + sweep + 5.0),
        vanish_at.map_or(never, |t| (t, t + idle + copy_lag(o) + sweep + 5.0)),
        failed_at.map_or(never, |t| (t, t + o.ping.1.as_secs_f64() + 20.0)),
    ];
    let worst = samples
        .iter()
        .filter(|s| s.alive > 0 && s.event.is_empty() && !waits.iter().any(|(a, b)| (*a..*b).contains(&s.t)))
        .map(|s| (s.live_flows as f64 / s.alive as f64 - 1.0).abs())
        .fold(0.0_f64, f64::max);
    let _ = writeln!(
        r,
        "- Live flows against the clients' count, worst sample outside events and the waits for flows of gone sessions to time out \
         (`flow_idle_timeout` {idle:.0} s, a sweep every {sweep:.0} s){}: {:.2}% off.",
        if failed_at.is_some() { ", and until node 2's flows had their next ping through node 1" } else { "" },
        worst * 100.0
    );
    if worst > 0.01 {
        failures.push(format!("live flows {:.2}% off the clients' count", worst * 100.0));
    }
    if let Some(t) = vanish_at {
        failures.extend(vanished_flows(&mut r, o, samples, t, ran.vanished));
    }

    failures.extend(node_failure(&mut r, samples));
    for i in 0..o.nodes {
        failures.extend(controllers(&mut r, o, samples, last, i));
    }
    failures.extend(counters_went_back(samples));
    r.push('\n');
    Ok((r, failures))
}

/// The sessions lost outside b3's window, with what the tables held for them, as a list.
fn lost_sessions(r: &mut String, losses: &[String]) {
    if losses.is_empty() {
        return;
    }
    let _ = writeln!(
        r,
        "- Sessions lost outside b3's window (at most {}), each with what the tables held for its flow (backend id, kind, idle) in \
         the sample before, just before node 2 failed, and in the sample after:",
        LossLog::MAX
    );
    for l in losses {
        let _ = writeln!(r, "  - {l}");
    }
}

/// Whether a counter went back: the programs' are pinned and outlive the controllers, so they
/// only ever grow over the life of a node's pins; the clients' pings only grow.
fn counters_went_back(samples: &[Sample]) -> Option<String> {
    let went_back = |a: &Sample, b: &Sample| {
        b.pings < a.pings || a.nodes.iter().zip(&b.nodes).any(|(x, y)| x.up && y.up && x.life == y.life && y.tx < x.tx)
    };
    let w = samples.windows(2).find(|w| went_back(&w[0], &w[1]))?;
    Some(format!("a counter went back between {:.0} s and {:.0} s (frames sent or pings)", w[0].t, w[1].t))
}

/// Node 2's failure and return, when the run had them. Writes them to `r`; returns what did
/// not hold (sessions lost to it count with the balancer's).
fn node_failure(r: &mut String, samples: &[Sample]) -> Option<String> {
    let s = samples.iter().find(|s| s.event.contains(NODE_FAILS))?;
    let back = samples.iter().find(|s| s.event.contains(NODE_BACK));
    let _ = writeln!(
        r,
        "- Node 2's failure at {:.0} s: {}; back at {}. Sessions lost to it: counted with the balancer's above.",
        s.t,
        s.event,
        back.map_or_else(|| "never, within the run".to_owned(), |b| format!("{:.0} s ({})", b.t, b.event))
    );
    back.is_none().then(|| "node 2 did not come back".to_owned())
}

/// Node `i`'s last controller's memory after its warm-up, and the CPU of all its controllers.
/// Writes them to `r`; returns what did not hold.
#[expect(clippy::cast_precision_loss, reason = "ratios for a report")]
fn controllers(r: &mut String, o: &Options, samples: &[Sample], last: &Sample, i: usize) -> Option<String> {
    let node = |s: &Sample| s.nodes.get(i).cloned().unwrap_or_default();
    let Some(pid) = last.nodes.get(i).filter(|n| n.up).map(|n| n.pid) else {
        return Some(format!("node {} was not running at the end", i + 1));
    };
    let last_start = samples.iter().rev().find(|s| node(s).pid != pid).map_or(0.0, |s| s.t);
    let warm = (o.duration.as_secs_f64() * 0.05).min(120.0);
    let rss: Vec<u64> =
        samples.iter().filter(|s| node(s).pid == pid && s.t > last_start + warm && s.event.is_empty()).map(|s| node(s).rss_kb).collect();
    let (lo, hi) = (rss.iter().copied().min().unwrap_or(0), rss.iter().copied().max().unwrap_or(0));
    let mut pids: Vec<u32> = samples.iter().map(|s| node(s).pid).filter(|p| *p != 0).collect();
    pids.dedup();
    let cpu: f64 = pids.iter().map(|p| samples.iter().filter(|s| node(s).pid == *p).map(|s| node(s).cpu_s).fold(0.0, f64::max)).sum();
    let spread = if lo > 0 { (hi - lo) as f64 / lo as f64 } else { f64::INFINITY };
    let whose = if o.nodes == 1 { "The".to_owned() } else { format!("Node {}'s", i + 1) };
    let _ = writeln!(
        r,
        "- {whose} last controller's RSS, {} samples from {warm:.0} s after its start: {:.1}-{:.1} MB ({:.1}% spread). CPU of \
         the {} controllers: {cpu:.1} s in all. Expired flows: {} by the last controller.",
        rss.len(),
        lo as f64 / 1024.0,
        hi as f64 / 1024.0,
        spread * 100.0,
        pids.len(),
        node(last).expired
    );
    if rss.len() < 3 || lo == 0 {
        return Some(format!("{whose} last controller: {} RSS samples (a zero among them: {})", rss.len(), lo == 0));
    } else if spread > 0.10 {
        return Some(format!("{whose} last controller's RSS grew {:.1}% after warm-up", spread * 100.0));
    }
    None
}

/// The vanished clients' flows (counted in the table by their address). Each goes
/// `flow_idle_timeout` after its session's last ping, which came at most `ping_max` before
/// they vanished: all must still be there until `idle - ping_max` after, and gone one sweep
/// after `idle`. Writes what happened to `r`; returns what did not hold.
fn vanished_flows(r: &mut String, o: &Options, samples: &[Sample], at: f64, vanished: u64) -> Option<String> {
    let idle = idle_timeout(o).as_secs_f64();
    let earliest = idle - o.ping.1.as_secs_f64();
    let held = samples.iter().filter(|s| s.t > at + 2.0 && s.t < at + earliest - 2.0).map(|s| s.gone_flows).min();
    let fell = samples.iter().find(|s| s.t > at && s.gone_flows <= vanished / 100).map(|s| s.t - at);
    let half = samples.iter().find(|s| s.t > at && s.gone_flows <= vanished / 2).map(|s| s.t - at);
    // With two nodes, the other node's copies of those that were exceptions stay up to the
    // peers' refresh lag longer.
    let lag = copy_lag(o);
    let _ = writeln!(
        r,
        "- Vanished clients: {vanished} sessions dropped without a FIN at {at:.0} s. Their flows in the table until {earliest:.0} s \
         after (`flow_idle_timeout` {idle:.0} s after the earliest last ping): at least {} (before: {}); half gone after {}, all \
         after {}{}.",
        held.map_or_else(|| "no sample".to_owned(), |h| h.to_string()),
        samples.iter().rev().find(|s| s.t < at).map_or(0, |s| s.gone_flows),
        half.map_or_else(|| "never".to_owned(), |f| format!("{f:.0} s")),
        fell.map_or_else(|| "never, within the run".to_owned(), |f| format!("{f:.0} s")),
        if lag > 0.0 {
            format!(" (a copy may stay {lag:.0} s longer than the original: two of the peers' refresh lags and a round)")
        } else {
            String::new()
        },
    );
    match (held, fell) {
        (Some(h), _) if h < vanished - vanished / 100 => Some(format!("the vanished clients' flows went early ({h} of {vanished} left)")),
        (_, None) => Some("the vanished clients' flows never expired".to_owned()),
        (_, Some(f)) if f < earliest - 2.0 || f > vanished_wait(o).as_secs_f64() => {
            Some(format!("the vanished clients' flows went after {f:.0} s, not at the {idle:.0} s timeout"))
        }
        _ => None,
    }
}

#[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
fn plot(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    type Series = (&'static str, RGBColor, fn(&Sample) -> u64);
    let root = SVGBackend::new(path, (820, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let tmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let ymax = samples.iter().map(|s| s.alive.max(s.live_flows)).max().unwrap_or(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Soak: sessions held and live flows", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax.max(1.0))?;
    chart.configure_mesh().x_desc("s").y_desc("sessions / flows").draw()?;
    let series: [Series; 3] = [
        ("alive (clients)", RGBColor(46, 110, 190), |s| s.alive),
        ("live flows (table)", RGBColor(230, 120, 40), |s| s.live_flows),
        ("lost, all causes", RGBColor(200, 40, 40), Sample::lost),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(samples.iter().map(|s| (s.t, f(s) as f64)), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
