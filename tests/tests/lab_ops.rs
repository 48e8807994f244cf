//! Operability in the lab: forwarding that outlives the controller (kill -9, program upgrade),
//! the CLI and its errors, bpftool-readable maps, the Prometheus endpoint.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::Command,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use tests::{
    client::{Balancer, MqttConn, hold_sessions},
    lab::{LabGuard, VIP},
    netns::in_netns,
    require_root,
};

const HEALTH: &str = "check = \"mqtt\"\ninter = \"500ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2";

fn hold(lab: &LabGuard, prefix: &str, n: usize) -> Vec<MqttConn> {
    hold_sessions(lab, prefix, n).into_iter().map(|(_, c)| c).collect()
}

fn ping_all(held: &mut [MqttConn]) {
    for (i, c) in held.iter_mut().enumerate() {
        c.ping().unwrap_or_else(|e| panic!("held session {i} ({}) died: {e}", c.local));
    }
}

/// New sessions, one every 10 ms, while `stop` is false: (made, failed).
fn churn(lab: &LabGuard, stop: &AtomicBool, made: &AtomicUsize, failed: &AtomicUsize) {
    in_netns(&lab.ns("client"), || {
        let deadline = Instant::now() + Duration::from_mins(2);
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match MqttConn::connect(None, SocketAddrV4::new(VIP, 1883), &format!("churn-{i}"), Duration::from_secs(3)) {
                Ok(c) => {
                    c.disconnect();
                    made.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("churn-{i}: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .expect("client namespace");
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
/// every new connection made meanwhile survived; returns the link's program ids before/after.
fn sessions_survive(replace: impl FnOnce(&mut Balancer, &LabGuard)) -> (u64, u64) {
    let lab = LabGuard::up(2);
    let mut lb = Balancer::start(&lab, &lab.config(HEALTH));
    let mut held = hold(&lab, "keep", 2000);
    let flows_before = lb.status()["flow_table_entries"].as_u64().expect("flows");
    assert!(flows_before >= 2000);
    let prog_before = link_prog_id(&lb);
    let (stop, made, failed) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| churn(&lab, &stop, &made, &failed));
        std::thread::sleep(Duration::from_millis(500));
        replace(&mut lb, &lab);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
    });
    assert_eq!(failed.load(Ordering::SeqCst), 0, "new connections failed while the controller was replaced");
    assert!(made.load(Ordering::SeqCst) > 20, "too few new connections to prove anything");
    // Before any held session sends again: the adopted flow table still has every held flow
    // (a fresh one would hold only the churn's), so nothing was re-hashed.
    let s = lb.status();
    assert!(s["flow_table_entries"].as_u64().expect("flows") >= 2000, "{s}");
    // And it is still read with the seed it was filled with: a held flow is found in it.
    let f = flow_of(&lb, &held[0]);
    assert_eq!(f["source"], "flow table", "{f}");
    ping_all(&mut held);
    let prog_after = link_prog_id(&lb);
    (prog_before, prog_after)
}

#[test]
fn kill_9_of_the_controller_drops_no_session() {
    require_root!();
    sessions_survive(|lb, lab| {
        lb.kill9();
        // No controller at all for a while: forwarding goes on from the pins.
        assert!(lb.attached(), "the program went with the controller");
        std::thread::sleep(Duration::from_secs(1));
        lb.restart(lab);
    });
}

#[test]
fn a_lost_controller_state_is_recovered_from_the_maps_and_drops_no_session() {
    require_root!();
    sessions_survive(|lb, lab| {
        lb.kill9();
        // The pinned controller state is gone (removed by hand, say): the next controller
        // recognises listeners by VIP and port and backends by MAC, and adopts the rest.
        std::fs::remove_file(lb.pin_dir.join("CONTROL")).expect("removing the CONTROL pin");
        lb.restart(lab);
    });
}

#[test]
fn a_program_upgrade_replaces_it_atomically_and_drops_no_session() {
    require_root!();
    let (before, after) = sessions_survive(|lb, lab| {
        // A new controller loads its own program and swaps it into the pinned link.
        let _ = lb.stop();
        lb.restart(lab);
    });
    assert_ne!(before, after, "the link still runs the old program");
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
    assert_eq!(v["flows_per_backend"]["b1"].as_u64().unwrap_or(0) + v["flows_per_backend"]["b2"].as_u64().unwrap_or(0), 20);
    // `dsrlb flow` names the broker that really holds the session.
    let f = flow_of(&lb, &held[0]);
    let b = lab.broker_of("cli-0").expect("logged");
    assert_eq!(f["backend"], format!("b{}", b + 1), "{f}");
    assert_eq!(f["source"], "flow table");
    let (ok, out, _) = lb.cli(&["flow", "198.51.100.7:4242", &format!("{VIP}:1883")]);
    assert!(ok && out.contains("ring"), "a flow not in the table is answered from the ring: {out}");
    let (ok, _, err) = lb.cli(&["drain", "nope"]);
    assert!(!ok && err.contains("no backend named \"nope\""), "{err}");

    // The socket is 0600 and root's; another owner is refused with a clear message.
    let meta = std::fs::metadata(&lb.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    std::os::unix::fs::chown(&lb.socket, Some(65534), None).expect("chown");
    let (ok, _, err) = lb.cli(&["status"]);
    assert!(!ok && err.contains("belongs to uid 65534"), "{err}");
    std::os::unix::fs::chown(&lb.socket, Some(0), None).expect("chown back");

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

fn scrape(lab: &LabGuard) -> String {
    in_netns(&lab.ns("lb"), || {
        let mut s = TcpStream::connect("127.0.0.1:9877").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    })
    .expect("lb namespace")
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
    std::thread::sleep(Duration::from_millis(1200));
    let before = scrape(&lab);
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let mut held = hold(&lab, "prom", 50);
    ping_all(&mut held);
    std::thread::sleep(Duration::from_millis(1200)); // the controller samples counters every second
    let after = scrape(&lab);
    for name in ["dsrlb_listener_packets_total{listener=\"mqtt\"}", "dsrlb_xdp_verdicts_total{verdict=\"tx\",reason=\"forwarded\"}"] {
        assert!(metric(&after, name) > metric(&before, name), "{name} did not move");
    }
    let new_flows: u64 =
        ["b1", "b2"].iter().map(|b| metric(&after, &format!("dsrlb_backend_new_flows_total{{listener=\"mqtt\",backend=\"{b}\"}}"))).sum();
    assert!(new_flows >= 50, "{new_flows}");
    assert!(metric(&after, "dsrlb_flow_table_entries") >= 50);
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
