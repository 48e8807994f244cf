//! `bench scale` (issue 25, part 4): the controller with a full flow table. The lab's balancer
//! runs with the default table (1M flows, 32 MB); the bench fills it through the controller's
//! own merge path (`FlowTable::merge`, as a cluster peer's flows come in, on the pinned maps)
//! with a million confirmed flows, then times what an operator does with it: status, one flow,
//! metrics, a restart that adopts the pins, and the controller's walks and sweeps (its own
//! figures, from `dsrlb status`). `dsrlb ping` answers while a walk runs: the walk has a
//! thread of its own.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::ensure;
use tests::{
    balancer::{Balancer, StatusExt as _},
    fill,
    lab::{self, Lab},
    netns::in_netns,
    wait,
};

/// Flows put in the table: the default table's size.
const FLOWS: u32 = 1_000_000;
/// Times each figure is taken; the report gives the median and the largest.
const TIMES: usize = 5;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (median, largest) of `v`, in ms.
fn spread(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v.get(v.len() / 2).copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0))
}

/// `f` run [`TIMES`] times: its times in ms.
fn timed<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Vec<f64>> {
    (0..TIMES)
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(ms(t.elapsed()))
        })
        .collect()
}

fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `GET /metrics` from the balancer's namespace: the body.
fn metrics(lab: &Lab) -> anyhow::Result<String> {
    in_netns(&lab.ns("lb"), || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&(std::net::Ipv4Addr::LOCALHOST, 9877).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        ensure!(body.starts_with("HTTP/1.1 200"), "metrics answered {:?}", body.lines().next());
        Ok(body)
    })?
}

pub fn scale() -> anyhow::Result<String> {
    let lab = Lab::new("dsrlbs", 2);
    lab.up()?;
    let result = run(&lab);
    let _ = lab.down();
    result
}

#[expect(clippy::too_many_lines, reason = "one measurement after another, in the order the report gives them")]
fn run(lab: &Lab) -> anyhow::Result<String> {
    // A 5-minute timeout on the listener the flows are for: a sweep every 37.5 s, and merged
    // flows (a minute idle as they come in) live for four minutes, long enough to measure.
    let config = lab.config("check = \"mqtt\"\ninter = \"2s\"\nfall = 3\nrise = 2").replacen(
        "port = 1883\n",
        "port = 1883\nflow_idle_timeout = \"5m\"\n",
        1,
    );
    let mut lb = Balancer::start(lab, &config);
    for b in ["b1", "b2"] {
        wait::until(format!("mqtt/{b} up"), Duration::from_secs(20), || lb.state("mqtt", b) == "up");
    }
    // One real session through the VIP: its flow gives a real and the flow clock's age now.
    let session = in_netns(&lab.ns("client"), || TcpStream::connect_timeout(&(lab::VIP, 1883).into(), Duration::from_secs(5)))??;
    let table = lb_userspace::dataplane::testing::pinned_flow_table(&lb.pin_dir)?;
    let vip_be = u32::from_ne_bytes(lab::VIP.octets());
    let live = fill::live_flow(&table, |f| f.key.dst_be == vip_be && f.key.dport_be == 1883u16.to_be());
    let expire = lb_userspace::plan::expire_units(Duration::from_mins(5));
    let t = Instant::now();
    let filled = fill::fill(&table, FLOWS, lab::VIP.into(), 1883, live.real(), live.age(), expire);
    let fill_time = t.elapsed();
    ensure!(filled.inserted == FLOWS as usize, "the fill inserted {} of {FLOWS} flows ({} otherwise)", filled.inserted, filled.other);

    // The walk and the sweep's read of the table, in this process with the controller's code.
    let walk = spread(timed(|| {
        let mut n = 0usize;
        table.walk(|_| n += 1);
        ensure!(n > FLOWS as usize, "the walk found {n} flows");
        Ok(())
    })?);
    let sweep_none = spread(timed(|| Ok(table.remove_where(|_| false)))?);

    // What an operator runs. The CLI's own cost: `dsrlb ping` (reads no table).
    let ping = spread(timed(|| {
        let (ok, _, err) = lb.cli(&["ping"]);
        ensure!(ok, "dsrlb ping: {err}");
        Ok(())
    })?);
    let mut walk_ms = Vec::new();
    let status = spread(timed(|| {
        let s = lb.status();
        ensure!(s.flow_table_entries > FLOWS as usize, "status counts {} live flows", s.flow_table_entries);
        walk_ms.extend(s.flow_walk_ms);
        Ok(())
    })?);
    #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
    let controller_walk = spread(walk_ms.iter().map(|&m| m as f64).collect());
    let (client, sport) = fill::client(FLOWS / 2);
    let flow = spread(timed(|| {
        let (ok, out, err) = lb.cli(&["flow", &format!("{client}:{sport}"), &format!("{}:1883", lab::VIP)]);
        ensure!(ok && out.contains("flow table"), "dsrlb flow: {out}{err}");
        Ok(())
    })?);
    let entries = format!("dsrlb_flow_table_entries {}", FLOWS + 1);
    let metrics_fresh = spread(timed(|| {
        let body = metrics(lab)?;
        ensure!(body.contains(&entries), "metrics lack {entries:?}");
        Ok(())
    })?);
    // A walk more than 2 s old: /metrics walks again.
    let mut metrics_walk = Vec::new();
    for _ in 0..TIMES {
        std::thread::sleep(Duration::from_millis(2100));
        let t = Instant::now();
        metrics(lab)?;
        metrics_walk.push(ms(t.elapsed()));
    }
    let metrics_walk = spread(metrics_walk);

    // Pings while a status walks the table: the loop keeps serving.
    let mut during = Vec::new();
    for _ in 0..TIMES {
        std::thread::scope(|s| {
            let walking = s.spawn(|| lb.status());
            while !walking.is_finished() {
                let t = Instant::now();
                let (ok, _, _) = lb.cli(&["ping"]);
                if ok {
                    during.push(ms(t.elapsed()));
                }
            }
        });
    }
    let pings_during = during.len();
    let during = spread(during);
    let pid = lb.child.id();
    let (rss, anon, file) = (proc_kb(pid, "VmRSS:"), proc_kb(pid, "RssAnon:"), proc_kb(pid, "RssFile:"));

    // Restarts that adopt the pins, until the new controller serves: program attached and a
    // status answered (which walks the whole table).
    let t = Instant::now();
    lb.stop();
    let stop_time = t.elapsed();
    let t = Instant::now();
    lb.restart(lab);
    let restart_time = t.elapsed();
    let after_restart = lb.status().flow_table_entries;
    lb.kill9();
    let t = Instant::now();
    lb.restart(lab);
    let kill_restart_time = t.elapsed();
    let after_kill = lb.status().flow_table_entries;
    ensure!(after_restart > FLOWS as usize && after_kill > FLOWS as usize, "flows after restarts: {after_restart}, {after_kill}");

    // The controller's own sweep removing a million flows: every flow aged past the timeout.
    let before = lb.status().flow_table.get("expired").copied().unwrap_or(0);
    let aged = table.rewind(expire + 2, |_| true);
    let swept = wait::until("the sweep to expire the aged flows", Duration::from_mins(1), || {
        let s = lb.status();
        (s.flow_table.get("expired").copied().unwrap_or(0) >= before + u64::from(FLOWS)).then_some(s)
    });
    drop(session);
    let sweep_all = swept.flow_sweep_ms.unwrap_or(0);
    let backend_flows = swept.backend("mqtt", "b1").map_or(0, |b| b.flows) + swept.backend("mqtt", "b2").map_or(0, |b| b.flows);

    let mut r = String::new();
    let _ = writeln!(r, "## The controller with a full flow table\n");
    let _ = writeln!(
        r,
        "`target/release/bench scale`: dsrlb with its default table (1,048,576 flows, 32 MB) in front of two brokers, filled by the controller's own merge path (`FlowTable::merge` on the pinned maps, the way a cluster peer's flows come in) with {FLOWS} confirmed flows; then each figure taken {TIMES} times (median, largest). CLI figures are wall time of the `dsrlb` command, process start included (`dsrlb ping`, which reads no table, is that cost alone).\n"
    );
    let _ = writeln!(r, "| what | median ms | largest ms | bound | |");
    let _ = writeln!(r, "| --- | --- | --- | --- | --- |");
    let row = |r: &mut String, what: &str, (m, x): (f64, f64), bound: Option<f64>| {
        let verdict = bound.map_or(String::new(), |b| if x <= b { format!("{b:.0} ms: met") } else { format!("{b:.0} ms: not met") });
        let _ = writeln!(r, "| {what} | {m:.1} | {x:.1} | {verdict} | |");
    };
    let fill_rate = f64::from(FLOWS) / fill_time.as_secs_f64();
    let _ = writeln!(r, "| fill: {FLOWS} merges | {:.0} | | | {fill_rate:.0} flows/s |", ms(fill_time));
    row(&mut r, "one walk of the table (bench process, the controller's `FlowTable::walk`)", walk, None);
    row(&mut r, "the controller's own walk for status (`flow_walk_ms`)", controller_walk, None);
    row(&mut r, "one expiry sweep that removes nothing (bench process, `FlowTable::remove_where`)", sweep_none, None);
    row(&mut r, "`dsrlb ping` (CLI cost, no table)", ping, None);
    row(&mut r, "`dsrlb status` (walks the table every time)", status, Some(100.0));
    row(&mut r, "`dsrlb flow` for one flow", flow, None);
    row(&mut r, "`/metrics`, walk under 2 s old reused", metrics_fresh, Some(100.0));
    row(&mut r, "`/metrics` with a walk", metrics_walk, Some(100.0));
    row(&mut r, &format!("`dsrlb ping` while a status walks ({pings_during} pings over {TIMES} walks)"), during, None);
    let _ = writeln!(r, "| SIGTERM until the controller exits | {:.0} | | | |", ms(stop_time));
    let _ = writeln!(
        r,
        "| restart after SIGTERM, adopting the pins, until attached and a status answered | {:.0} | | 2000 ms: {} | {after_restart} live flows after |",
        ms(restart_time),
        if restart_time <= Duration::from_secs(2) { "met" } else { "not met" }
    );
    let _ = writeln!(
        r,
        "| restart after `kill -9`, the same | {:.0} | | 2000 ms: {} | {after_kill} live flows after |",
        ms(kill_restart_time),
        if kill_restart_time <= Duration::from_secs(2) { "met" } else { "not met" }
    );
    let _ = writeln!(
        r,
        "| the controller's expiry sweep removing {aged} aged flows (`flow_sweep_ms`) | {sweep_all} | | | {backend_flows} live flows on b1 and b2 after |"
    );
    let _ = writeln!(
        r,
        "\nController memory with the table full: VmRSS {rss} kB, of which {anon} kB its own heap and stacks (RssAnon) and {file} kB file-backed (RssFile): its binary and the mapped maps, `FLOWS` (32 MB) and `FLOW_ADDRS6` (64 MB), which are the kernel's pages, allocated once at load.\n"
    );
    Ok(r)
}

fn link_tx_bytes(ns: &str) -> u64 {
    let text = tests::lab::sh("ip", &["-n", ns, "-j", "-s", "link", "show", "eth0"]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0)
}

/// `bench scale` part two: a node whose config differs from its peer's joins the cluster, and
/// the peer, with a full table, shares every live flow with it.
pub fn cluster() -> anyhow::Result<String> {
    let lab = Lab::routed("dsrlbc", 2, 2, tests::lab::Routing::Bgp);
    lab.up()?;
    let result = run_cluster(&lab);
    let _ = lab.down();
    result
}

fn run_cluster(lab: &Lab) -> anyhow::Result<String> {
    let config = lab.config("check = \"mqtt\"\ninter = \"2s\"\nfall = 3\nrise = 2").replacen(
        "port = 1883\n",
        "port = 1883\nflow_idle_timeout = \"5m\"\n",
        1,
    );
    // Node 2 gives b2 another weight: its rings differ, so node 1 shares all its live flows.
    let other = config.replacen("name = \"b2\"\n", "name = \"b2\"\nweight = 50\n", 1);
    ensure!(other != config, "the second node's config does not differ");
    let first = Balancer::start_node(lab, 0, &config);
    first.wait_joined(Duration::from_secs(30));
    for b in ["b1", "b2"] {
        wait::until(format!("mqtt/{b} up"), Duration::from_secs(20), || first.state("mqtt", b) == "up");
    }
    let session = in_netns(&lab.ns("client"), || TcpStream::connect_timeout(&(lab::VIP, 1883).into(), Duration::from_secs(5)))??;
    let table = lb_userspace::dataplane::testing::pinned_flow_table(&lab.node_pin_dir(0))?;
    let vip_be = u32::from_ne_bytes(lab::VIP.octets());
    let live = fill::live_flow(&table, |f| f.key.dst_be == vip_be && f.key.dport_be == 1883u16.to_be());
    let expire = lb_userspace::plan::expire_units(Duration::from_mins(5));
    let filled = fill::fill(&table, FLOWS, lab::VIP.into(), 1883, live.real(), live.age(), expire);
    ensure!(filled.inserted == FLOWS as usize, "the fill inserted {} of {FLOWS} flows", filled.inserted);
    let tx0 = link_tx_bytes(&lab.node_ns(0));
    let t = Instant::now();
    let second = Balancer::start_node(lab, 1, &other);
    second.wait_joined(Duration::from_secs(30));
    let joined = t.elapsed();
    // Merged: every flow node 1 sent taken one way or another, and no more coming.
    let merged = wait::until("node 2 to take every flow node 1 shares", Duration::from_mins(2), || {
        let s = second.status();
        let m = s.cluster.as_ref().map(|c| c.merged)?;
        let taken = m.inserted + m.refreshed + m.kept + m.full + m.unknown + m.capped;
        (taken > u64::from(FLOWS)).then_some(m)
    });
    let merged_in = t.elapsed();
    let bytes = link_tx_bytes(&lab.node_ns(0)) - tx0;
    let sent = first.status().cluster.and_then(|c| c.peers.iter().map(|p| p.flows_sent).max()).unwrap_or(0);
    let mut n = 0usize;
    lb_userspace::dataplane::testing::pinned_flow_table(&lab.node_pin_dir(1))?.walk(|_| n += 1);
    let peak = |b: &Balancer| (proc_kb(b.child.id(), "VmHWM:"), proc_kb(b.child.id(), "RssAnon:"));
    let ((hwm1, anon1), (hwm2, anon2)) = (peak(&first), peak(&second));
    drop(session);
    let mut r = String::new();
    let _ = writeln!(r, "### A node that must receive every live flow\n");
    let _ = writeln!(
        r,
        "`target/release/bench scale` (second part): the routed lab with two nodes (BGP, `[cluster]` with a key). Node 1 runs alone, its table filled with {FLOWS} confirmed flows as above; node 2 then starts with a config that differs (another weight for b2), so its rings differ and node 1 shares every live flow with it.\n"
    );
    let _ = writeln!(r, "| what | figure |\n| --- | --- |");
    let _ = writeln!(r, "| node 2 started until joined (`dsrlb ping` answers) | {:.0} ms |", ms(joined));
    let _ = writeln!(r, "| node 2 started until every shared flow was merged | {:.0} ms |", ms(merged_in));
    let _ = writeln!(r, "| flows node 1 sent | {sent} |");
    let _ = writeln!(
        r,
        "| bytes node 1's link sent meanwhile (sync, BGP, checks) | {bytes} ({:.1} B per flow sent) |",
        bytes as f64 / sent.max(1) as f64
    );
    let _ = writeln!(
        r,
        "| node 2's merges | inserted {}, refreshed {}, kept {}, full {}, capped {} |",
        merged.inserted, merged.refreshed, merged.kept, merged.full, merged.capped
    );
    let _ = writeln!(r, "| flows in node 2's table after | {n} |");
    let _ = writeln!(
        r,
        "| peak RSS (VmHWM), node 1 / node 2 | {hwm1} kB / {hwm2} kB (each counts about 110 MB of mapped maps and binary; heap and stacks after, RssAnon: {anon1} kB / {anon2} kB) |"
    );
    let _ = writeln!(r);
    Ok(r)
}
