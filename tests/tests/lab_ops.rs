//! Operability in the lab: forwarding that outlives the controller (kill -9, program upgrade),
//! the CLI and its errors, bpftool-readable maps, the Prometheus endpoint.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    process::Command,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use tests::{
    balancer::Balancer,
    client::{MqttConn, hold_sessions},
    lab::{LabGuard, VIP, broker_addr},
    load::churn,
    netns::in_netns,
    require_root, wait,
};

const HEALTH: &str = "check = \"mqtt\"\ninter = \"500ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2";

fn hold(lab: &LabGuard, prefix: &str, n: usize) -> Vec<MqttConn> {
    hold_sessions(lab, prefix, n).into_iter().map(|(_, c)| c).collect()
}

fn ping_all<'a>(held: impl IntoIterator<Item = &'a mut MqttConn>) {
    for (i, c) in held.into_iter().enumerate() {
        c.ping().unwrap_or_else(|e| panic!("held session {i} ({}) died: {e}", c.local));
    }
}

/// What a controller logs when it adopts pinned maps without a usable saved state.
const RECOVERED: &str = "ids recovered from the maps (listeners by VIP and port, backends by MAC)";

/// Waits until the churn has made `n` connections (at most a minute).
fn wait_made(made: &AtomicUsize, n: usize) {
    wait::until(format!("the churn making {n} connections"), Duration::from_mins(1), || match made.load(Ordering::SeqCst) {
        m if m >= n => Ok(()),
        m => Err(format!("only {m}")),
    });
}

/// `dsrlb flow --json` for a held session.
fn flow_of(lb: &Balancer, c: &MqttConn) -> serde_json::Value {
    let (ok, out, err) = lb.cli(&["flow", &c.local.to_string(), &format!("{VIP}:1883"), "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("flow JSON")
}

fn link_prog_id(lb: &Balancer) -> u64 {
    let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(lb.pin_dir.join("link")).output().expect("bpftool");
    assert!(out.status.success(), "bpftool link show: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["prog_id"].as_u64().expect("prog_id")
}

/// Holds 2000 sessions, replaces the controller with `replace`, and proves every session and
/// every new connection made meanwhile survived, and that the new controller knows each held
/// flow's broker by the name its config gives it; returns the link's program ids before/after.
fn sessions_survive(replace: impl FnOnce(&mut Balancer, &LabGuard, &AtomicUsize)) -> (u64, u64) {
    let lab = LabGuard::up(2);
    let mut lb = Balancer::start(&lab, &lab.config(HEALTH));
    let mut held = hold_sessions(&lab, "keep", 2000);
    let flows_before = lb.status().flow_table_entries;
    assert!(flows_before >= 2000);
    let prog_before = link_prog_id(&lb);
    let (stop, made, failed) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| churn(&lab, &stop, &made, &failed, Duration::from_mins(2), Duration::from_secs(3)));
        // New connections before, during and after the replacement.
        wait_made(&made, 20);
        replace(&mut lb, &lab, &made);
        let after = made.load(Ordering::SeqCst);
        wait_made(&made, after + 20);
        stop.store(true, Ordering::SeqCst);
    });
    assert_eq!(failed.load(Ordering::SeqCst), 0, "new connections failed while the controller was replaced");
    assert!(made.load(Ordering::SeqCst) > 20, "too few new connections to prove anything");
    // Before any held session sends again: the adopted flow table still has every held flow
    // (a fresh one would hold only the churn's), so nothing was re-hashed.
    let s = lb.status();
    assert!(s.flow_table_entries >= 2000, "{s:?}");
    // And it is still read with the seed it was filled with: a held flow is found in it.
    let f = flow_of(&lb, &held[0].1);
    assert_eq!(f["source"], "flow table", "{f}");
    // The new controller's ids are the ones the held flows were recorded with: the backend it
    // names for a flow (by its config's names, found by address) is the broker that logged the
    // session.
    let names: BTreeMap<String, String> =
        s.listeners[0].backends.iter().map(|b| (b.address.expect("address").to_string(), b.name.clone())).collect();
    for (id, c) in held.iter().step_by(40) {
        let broker = lab.broker_of(id).unwrap_or_else(|| panic!("no broker logged {id}"));
        let f = flow_of(&lb, c);
        assert_eq!(f["backend"].as_str(), Some(names[&broker_addr(broker).to_string()].as_str()), "{id}, on b{}: {f}", broker + 1);
    }
    ping_all(held.iter_mut().map(|(_, c)| c));
    let prog_after = link_prog_id(&lb);
    (prog_before, prog_after)
}

#[test]
fn kill_9_of_the_controller_drops_no_session() {
    require_root!();
    sessions_survive(|lb, lab, made| {
        lb.kill9();
        // No controller at all while 20 new connections are made: forwarding goes on from
        // the pins.
        assert!(lb.attached(), "the program went with the controller");
        wait_made(made, made.load(Ordering::SeqCst) + 20);
        lb.restart(lab);
        assert!(!lb.log().contains(RECOVERED), "the saved controller state was not used:\n{}", lb.log());
    });
}

#[test]
fn a_lost_controller_state_is_recovered_from_the_maps_and_drops_no_session() {
    require_root!();
    sessions_survive(|lb, lab, _| {
        lb.kill9();
        // The pinned controller state is gone (removed by hand, say): the next controller
        // recognises listeners by VIP and port and backends by MAC, and adopts the rest.
        std::fs::remove_file(lb.pin_dir.join("CONTROL")).expect("removing the CONTROL pin");
        // And its config names the brokers anew, so that names order them the other way round:
        // ids given afresh by name (or kept from a saved state) would swap the brokers of every
        // held flow, where ids recovered from the maps by MAC keep them. (sessions_survive then
        // checks each held flow's broker by these names.)
        let config = std::fs::read_to_string(&lb.config).expect("the config");
        let renamed = config.replace("name = \"b1\"", "name = \"z1\"").replace("name = \"b2\"", "name = \"a2\"");
        assert!(renamed.contains("\"z1\"") && renamed.contains("\"a2\""), "{renamed}");
        std::fs::write(&lb.config, renamed).expect("writing the config");
        lb.restart(lab);
        // (Logged before it serves; read from its stderr by a thread of ours.)
        wait::until("the controller saying it recovered the ids from the maps", Duration::from_secs(5), || lb.log().contains(RECOVERED));
        let names: Vec<String> = lb.status().flows_per_backend.into_keys().collect();
        assert_eq!(names, ["a2", "z1"], "the new names are the controller's");
    });
}

/// The program a pinned link runs: (id, tag).
fn link_prog(lb: &Balancer) -> (u64, String) {
    let id = link_prog_id(lb);
    let out = Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    (id, v["tag"].as_str().expect("tag").to_owned())
}

/// Probe frames through the VIP, one every millisecond while `stop` is false (at most a minute),
/// numbered in their TCP sequence field; returns how many were sent.
fn probe_every_ms(lab: &LabGuard, stop: &AtomicBool) -> u32 {
    use tests::frame::{Ipv4Frame, TCP_ACK};
    let lb_mac = {
        let out = Command::new("ip").args(["-j", "-n", &lab.ns("lb"), "link", "show", "eth0"]).output().expect("ip");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        lb_userspace::config::parse_mac(v[0]["address"].as_str().expect("address")).expect("mac")
    };
    in_netns(&lab.ns("client"), || {
        let sock = tests::netns::PacketSocket::open("eth0");
        let mut f = Ipv4Frame::tcp(std::net::Ipv4Addr::new(192, 0, 2, 65), 61000, VIP, 1883, TCP_ACK);
        f.dst_mac = lb_mac;
        let template = f.build();
        let (mut n, start) = (0u32, Instant::now());
        wait::repeat(Duration::from_mins(1), stop, || {
            let mut frame = template.clone();
            frame[38..42].copy_from_slice(&n.to_be_bytes());
            sock.send(&frame);
            n += 1;
            // The next at 1 ms after the start of this one.
            let next = start + Duration::from_millis(u64::from(n));
            if let Some(rest) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(rest);
            }
        });
        n
    })
    .expect("client namespace")
}

/// The probe numbers the brokers' ports saw while `stop` is false (`count` follows them).
fn probes_seen(lab: &LabGuard, ready: &AtomicBool, count: &AtomicUsize, stop: &AtomicBool) -> Vec<u32> {
    in_netns(&lab.ns("sw"), || {
        let socks: Vec<_> = (1..=lab.brokers).map(|i| tests::netns::PacketSocket::open(&format!("p-b{i}"))).collect();
        ready.store(true, Ordering::SeqCst);
        let probe = std::net::Ipv4Addr::new(192, 0, 2, 65).octets();
        let mut seen = Vec::new();
        // Both ports in turn, without blocking on the idle one.
        for s in &socks {
            s.set_nonblocking();
        }
        wait::repeat(Duration::from_mins(1), stop, || {
            let mut any = false;
            for s in &socks {
                while let Some(f) = s.recv() {
                    any = true;
                    if f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[26..30] == probe && f[36..38] == 1883u16.to_be_bytes() {
                        seen.push(u32::from_be_bytes([f[38], f[39], f[40], f[41]]));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            if !any {
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        seen
    })
    .expect("switch namespace")
}

#[test]
fn a_program_upgrade_replaces_it_atomically_and_drops_no_session() {
    require_root!();
    let upgrade = tests::built_bin("dsrlb-upgrade");
    let sent_count = std::cell::Cell::new(None);
    let mut tags = (String::new(), String::new());
    let mut gap = (0u32, 0u32);
    let (before, after) = sessions_survive(|lb, lab, _| {
        tags.0 = link_prog(lb).1;
        // While probes cross the balancer every millisecond, a new controller of another build
        // adopts the pins and swaps its own program into the link.
        let (ready, stop, count) = (AtomicBool::new(false), AtomicBool::new(false), AtomicUsize::new(0));
        let seen_at_least = |n: usize| {
            wait::until_every(format!("{n} probes to arrive"), Duration::from_secs(10), Duration::from_millis(5), || {
                match count.load(Ordering::SeqCst) {
                    c if c >= n => Ok(()),
                    c => Err(format!("only {c}")),
                }
            });
        };
        let (sent, seen) = std::thread::scope(|s| {
            let seen = s.spawn(|| probes_seen(lab, &ready, &count, &stop));
            wait::until_every("the capture on the brokers' ports", Duration::from_secs(10), Duration::from_millis(5), || {
                ready.load(Ordering::SeqCst)
            });
            let sent = s.spawn(|| probe_every_ms(lab, &stop));
            // Probes arrive before, during and after the swap.
            seen_at_least(200);
            let _ = lb.stop();
            lb.restart_with(lab, &upgrade);
            seen_at_least(count.load(Ordering::SeqCst) + 200);
            stop.store(true, Ordering::SeqCst);
            (sent.join().expect("prober"), seen.join().expect("capture"))
        });
        // The longest run of probes missing between the first and the last seen.
        let mut got: Vec<u32> = seen;
        got.sort_unstable();
        got.dedup();
        let longest = got.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(u32::MAX);
        gap = (longest, sent - u32::try_from(got.len()).expect("small"));
        tags.1 = link_prog(lb).1;
        sent_count.set(Some(sent));
    });
    let sent = sent_count.get().expect("probes sent");
    eprintln!("upgrade: {sent} probes at 1 ms; longest run lost {} (a gap of {} ms), {} lost in all", gap.0, gap.0, gap.1);
    assert_ne!(before, after, "the link still runs the old program");
    assert_ne!(tags.0, tags.1, "the upgraded program is the same build: the test proves nothing");
    assert!(gap.0 <= 2, "forwarding stopped for {} ms during the upgrade", gap.0);
}

#[test]
fn cli_status_flow_and_its_errors() {
    require_root!();
    let lab = LabGuard::up(2);
    let mut lb = Balancer::start(&lab, &lab.config(HEALTH));
    let mut held = hold(&lab, "cli", 20);
    // Human table and JSON.
    let (ok, table, err) = lb.cli(&["status"]);
    assert!(ok, "{err}");
    for col in ["backend", "state", "weight", "flows", "pkts/s", "new/s", "listener mqtt 192.0.2.100:1883"] {
        assert!(table.contains(col), "status table lacks {col}:\n{table}");
    }
    let v = lb.status();
    assert_eq!(v.flows_per_backend.get("b1").copied().unwrap_or(0) + v.flows_per_backend.get("b2").copied().unwrap_or(0), 20);
    // `dsrlb flow` names the broker that really holds the session.
    let f = flow_of(&lb, &held[0]);
    let b = lab.broker_of("cli-0").expect("logged");
    assert_eq!(f["backend"], format!("b{}", b + 1), "{f}");
    assert_eq!(f["source"], "flow table");
    let (ok, out, _) = lb.cli(&["flow", "198.51.100.7:4242", &format!("{VIP}:1883")]);
    assert!(ok && out.contains("ring"), "a flow not in the table is answered from the ring: {out}");
    let (ok, _, err) = lb.cli(&["drain", "nope"]);
    assert!(!ok && err.contains("no backend named \"nope\""), "{err}");

    // The socket is 0600 and root's (tests/tests/control_socket.rs tries other users).
    let meta = std::fs::metadata(&lb.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let (ok, out, _) = lb.cli(&["ping"]);
    assert!(ok && out.starts_with("ok"), "{out}");

    // No controller: a clear error, and forwarding is unaffected.
    let _ = lb.stop();
    let (ok, _, err) = lb.cli(&["status"]);
    assert!(!ok && err.contains("no controller is running"), "{err}");
    ping_all(&mut held);
    lb.restart(&lab);
}

#[test]
fn bpftool_dumps_maps_with_field_names() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let held = hold(&lab, "bt", 4);
    let bpftool = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().expect("bpftool");
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (map, fields) in [
        ("LISTENERS", &["vip_be", "port_be", "flags", "ring_copy"][..]),
        ("LISTEN_PORTS", &["tag", "listeners"][..]),
        ("REALS", &["dst_mac", "src_mac", "flags"][..]),
        ("REAL_STATS", &["packets", "bytes", "new_flows"][..]),
        ("VIPS", &["listeners"][..]),
    ] {
        let text = bpftool(&["map", "dump", "pinned", lab.pin_dir().join(map).to_str().expect("UTF-8")]);
        for f in fields {
            assert!(text.contains(&format!("\"{f}\"")), "{map}: no field {f} in\n{text}");
        }
    }
    // The flow table is half a million buckets: look up the two a held flow may live in, as
    // `dsrlb flow` names them, and find the flow's client port in one.
    let f = flow_of(&lb, &held[0]);
    let port_be = held[0].local.port().to_be();
    let flows = lab.pin_dir().join("FLOWS");
    let found = f["buckets"].as_array().expect("buckets").iter().any(|b| {
        let key: Vec<String> = b.as_u64().expect("bucket").to_le_bytes()[..4].iter().map(u8::to_string).collect();
        let mut args = vec!["map", "lookup", "pinned", flows.to_str().expect("UTF-8"), "key"];
        args.extend(key.iter().map(String::as_str));
        let text = bpftool(&args);
        for field in ["slots", "src_be", "dst_be", "sport_be", "dport_be", "state"] {
            assert!(text.contains(&format!("\"{field}\"")), "FLOWS: no field {field} in\n{text}");
        }
        text.contains(&format!("\"sport_be\": {port_be}"))
    });
    assert!(found, "the held flow is in neither of its buckets: {f}");
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[test]
fn prometheus_counters_move_with_traffic() {
    require_root!();
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config(HEALTH));
    let before = lab.scrape_metrics();
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let mut held = hold(&lab, "prom", 50);
    ping_all(&mut held);
    // A keepalive later (more than FLOW_CONFIRM_UNITS of the flow clock), each flow confirms.
    std::thread::sleep(Duration::from_nanos(u64::from(lb_common::FLOW_CONFIRM_UNITS + 1) << lb_common::FLOW_AGE_NS_SHIFT));
    ping_all(&mut held);
    // Counters are read at each scrape.
    let after = lab.scrape_metrics();
    for name in ["dsrlb_listener_packets_total{listener=\"mqtt\"}", "dsrlb_xdp_verdicts_total{verdict=\"tx\",reason=\"forwarded\"}"] {
        assert!(metric(&after, name) > metric(&before, name), "{name} did not move");
    }
    let new_flows: u64 =
        ["b1", "b2"].iter().map(|b| metric(&after, &format!("dsrlb_backend_new_flows_total{{listener=\"mqtt\",backend=\"{b}\"}}"))).sum();
    assert!(new_flows >= 50, "{new_flows}");
    // Live flows come from a walk of the table that scrapes reuse for up to 2 s.
    wait::until_every("the held flows in dsrlb_flow_table_entries", Duration::from_secs(5), Duration::from_millis(100), || {
        metric(&lab.scrape_metrics(), "dsrlb_flow_table_entries") >= 50
    });
    assert_eq!(metric(&after, "dsrlb_backend_status{listener=\"mqtt\",backend=\"b1\"}"), 1);
    assert!(after.contains("dsrlb_backend_check_failures_total{listener=\"mqtt\",backend=\"b1\"}"));
    assert!(after.contains("dsrlb_backend_bytes_total{"));
    // The edge's counters: every held session confirmed its flow; the guards are there at 0.
    assert!(metric(&after, "dsrlb_flow_table_events_total{event=\"confirmed\"}") >= 50);
    for name in [
        "dsrlb_listener_conn_rate_dropped_total{listener=\"mqtt\"}",
        "dsrlb_listener_icmp_too_big_total{listener=\"mqtt\"}",
        "dsrlb_xdp_verdicts_total{verdict=\"pass\",reason=\"not_our_mac\"}",
        "dsrlb_xdp_verdicts_total{verdict=\"drop\",reason=\"conn_rate\"}",
        "dsrlb_flow_table_events_total{event=\"refused\"}",
        "dsrlb_flow_table_events_total{event=\"expired\"}",
    ] {
        assert_eq!(metric(&after, name), 0, "{name}");
    }
}

/// A full table (issue 25): a million confirmed flows, put in through the controller's merge
/// path, are what status and `/metrics` count and what `dsrlb flow` finds; they survive a
/// restart that adopts the pins and a `kill -9`; aged past their timeout, one sweep expires
/// them all, and a held session goes on. Status reports how long its walk and the sweep took.
#[test]
fn a_million_flows_are_counted_kept_over_restarts_and_expired_together() {
    require_root!();
    const FLOWS: u32 = 1_000_000;
    let lab = LabGuard::up(2);
    // Merged flows count as a minute idle: a 3-minute timeout leaves them two minutes to live,
    // and sweeps run every 22.5 s.
    let config = lab.config(HEALTH).replacen("port = 1883\n", "port = 1883\nflow_idle_timeout = \"3m\"\n", 1);
    let mut lb = Balancer::start(&lab, &config);
    for b in ["b1", "b2"] {
        wait::until(format!("mqtt/{b} up"), Duration::from_secs(20), || lb.state("mqtt", b) == "up");
    }
    let mut held = hold(&lab, "full", 1);
    let table = lb_userspace::dataplane::testing::pinned_flow_table(&lb.pin_dir).expect("the pinned table");
    let vip_be = u32::from_ne_bytes(VIP.octets());
    let live = tests::fill::live_flow(&table, |f| f.key.dst_be == vip_be && f.key.dport_be == 1883u16.to_be());
    let expire = lb_userspace::plan::expire_units(Duration::from_mins(3));
    let filled = tests::fill::fill(&table, FLOWS, VIP.into(), 1883, live.real(), live.age(), expire);
    // At 95% of the table's slots a new flow may, rarely, find no free slot among those its key
    // may take: the table refuses it (`Merged::Full`), as it must (one in a million was, in one
    // CI run). Everything below counts what went in.
    assert!(filled.inserted + filled.other == FLOWS as usize && filled.other <= 16, "{filled:?}");

    let all = filled.inserted + 1;
    let s = lb.status();
    assert_eq!(s.flow_table_entries, all);
    assert!(s.flow_walk_ms.is_some(), "status does not say how long its walk took");
    assert_eq!(metric(&lab.scrape_metrics(), "dsrlb_flow_table_entries"), all as u64);
    let (client, sport) = tests::fill::client(FLOWS - 1);
    let (ok, out, err) = lb.cli(&["flow", &format!("{client}:{sport}"), &format!("{VIP}:1883"), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("flow JSON")["source"], "flow table", "{out}");

    lb.stop();
    lb.restart(&lab);
    assert_eq!(lb.status().flow_table_entries, all, "after a restart");
    lb.kill9();
    lb.restart(&lab);
    assert_eq!(lb.status().flow_table_entries, all, "after kill -9 and a restart");

    let expired_before = lb.status().flow_table.get("expired").copied().unwrap_or(0);
    assert_eq!(table.rewind(expire + 2, |_| true), all);
    let s = wait::until("one sweep to expire every aged flow", Duration::from_mins(1), || {
        let s = lb.status();
        let expired = s.flow_table.get("expired").copied().unwrap_or(0) - expired_before;
        if expired >= all as u64 { Ok(s) } else { Err(format!("{expired} expired")) }
    });
    assert_eq!(s.flow_table_entries, 0);
    assert!(s.flow_sweep_ms.is_some(), "status does not say how long the sweep took");
    // The held session's flow went with them; its next segment is forwarded as before.
    ping_all(&mut held);
}
