//! Health checks and backend changes in the lab, with real brokers and held MQTT sessions:
//! failure, recovery, drain, reload, a broker without the VIP, fast failover, a rejected
//! reload, and a TLS listener failing on its own.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use lb_userspace::control::status::{BackendStatus, Status};
use tests::{
    balancer::{Balancer, ListenerExt as _, StatusExt as _},
    client::{MqttConn, hold_sessions},
    lab::{self, LabGuard},
    require_root, wait,
};

const INTER: Duration = Duration::from_millis(500);
const FALL: u32 = 2;
const RISE: u32 = 2;

/// `fall × inter + inter`, with the ±10% jitter of each interval.
fn failover_window() -> Duration {
    (INTER * FALL + INTER).mul_f64(1.1)
}

fn health() -> String {
    format!("check = \"mqtt\"\ninter = \"{}ms\"\ntimeout = \"300ms\"\nfall = {FALL}\nrise = {RISE}", INTER.as_millis())
}

/// Client id to broker index, from the brokers' logs (waits until all `ids` are logged).
fn placement(lab: &LabGuard, ids: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let ids: Vec<String> = ids.collect();
    let found = || {
        let mut at = BTreeMap::new();
        for b in 0..lab.brokers {
            for s in lab.sessions(b) {
                at.insert(s.client_id, b);
            }
        }
        ids.iter().filter_map(|id| at.get(id).map(|b| (id.clone(), *b))).collect::<BTreeMap<String, usize>>()
    };
    wait::within(Duration::from_secs(5), Duration::from_millis(100), || Some(found()).filter(|f| f.len() == ids.len()))
        .unwrap_or_else(found)
}

/// Opens and closes `n` new sessions; returns how many landed on each broker. Every one must
/// succeed.
fn fresh(lab: &LabGuard, prefix: &str, n: usize) -> Vec<usize> {
    for (_, c) in hold_sessions(lab, prefix, n) {
        c.disconnect();
    }
    let at = placement(lab, (0..n).map(|i| format!("{prefix}-{i}")));
    assert_eq!(at.len(), n, "not every new session was logged by a broker");
    let mut counts = vec![0; lab.brokers];
    for b in at.values() {
        counts[*b] += 1;
    }
    counts
}

/// Pings every held session on one of `brokers`; panics naming the first dead one.
fn assert_alive(held: &mut [(String, MqttConn)], at: &BTreeMap<String, usize>, brokers: &[usize]) -> usize {
    let mut n = 0;
    for (id, c) in held.iter_mut().filter(|(id, _)| brokers.contains(&at[id])) {
        c.ping().unwrap_or_else(|e| panic!("held session {id} on b{} died: {e}", at[id] + 1));
        n += 1;
    }
    n
}

/// Waits until `listener`/`backend` is in state `want`; how long that took.
fn wait_state(lb: &Balancer, listener: &str, backend: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    wait::until_every(format!("{listener}/{backend} {want}"), within, Duration::from_millis(50), || {
        let got = lb.state(listener, backend);
        if got == want { Ok(()) } else { Err(format!("{listener}/{backend} is {got}")) }
    });
    start.elapsed()
}

fn flows_of(lb: &Balancer, backend: &str) -> u64 {
    lb.status().flows_per_backend.get(backend).copied().expect("flows_per_backend") as u64
}

#[test]
fn broker_failure_moves_new_flows_and_keeps_every_other_session_then_recovers() {
    require_root!();
    let lab = LabGuard::up(3);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let mut held = hold_sessions(&lab, "held", 500);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    assert_eq!(at.len(), 500);
    let others = assert_alive(&mut held, &at, &[1, 2]);
    assert!(others > 250, "only {others} of 500 sessions on b2 and b3");

    lab.stop_broker(0).expect("stopping b1");
    let stopped = Instant::now();
    wait_state(&lb, "mqtt", "b1", "down", failover_window() + Duration::from_secs(1));
    let counts = fresh(&lab, "after-fail", 100);
    assert_eq!(counts[0], 0, "{:?} after b1 stopped: new sessions still reached it", stopped.elapsed());
    assert_eq!(lb.state("mqtt", "b1"), "down");
    let alive = assert_alive(&mut held, &at, &[1, 2]);
    assert_eq!(alive, others, "every session on the healthy brokers is alive");

    lab.start_broker(0).expect("restarting b1");
    let took = wait_state(&lb, "mqtt", "b1", "up", (INTER * (RISE + 1)).mul_f64(1.1) + Duration::from_millis(500));
    eprintln!("b1 back up {took:?} after restart");
    let counts = fresh(&lab, "after-recovery", 60);
    assert!(counts[0] > 0, "b1 gets no new sessions after recovering: {counts:?}");
    assert_eq!(assert_alive(&mut held, &at, &[1, 2]), others);
}

#[test]
fn drain_keeps_sessions_stops_new_ones_and_counts_down_to_zero() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let mut held = hold_sessions(&lab, "dr", 100);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    let on_b1 = at.values().filter(|b| **b == 0).count();
    assert!(on_b1 > 20);

    let (ok, out, err) = lb.cli(&["drain", "b1"]);
    assert!(ok, "drain failed: {err}");
    assert!(out.contains("drained"), "{out}");
    // Sessions on the drained broker keep working, with application messages too.
    for (i, (id, c)) in held.iter_mut().enumerate() {
        c.ping().unwrap_or_else(|e| panic!("{id} died after drain: {e}"));
        c.publish_qos1("drain/test", u16::try_from(i + 1).expect("fits"), b"still here").unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let counts = fresh(&lab, "dr-new", 60);
    assert_eq!(counts[0], 0, "a drained broker got new sessions: {counts:?}");
    // The fresh sessions above closed; the remaining flows on b1 are exactly the held ones.
    assert_eq!(flows_of(&lb, "b1"), on_b1 as u64);

    // Its clients leave: the count falls to zero.
    let mut rest = Vec::new();
    for (id, c) in held {
        if at[&id] == 0 {
            c.disconnect();
        } else {
            rest.push((id, c));
        }
    }
    wait::until_every("b1 without flows after its clients left", Duration::from_secs(5), Duration::from_millis(100), || {
        match flows_of(&lb, "b1") {
            0 => Ok(()),
            n => Err(format!("b1 still has {n} flows")),
        }
    });
    assert_eq!(assert_alive(&mut rest, &at, &[1]), 100 - on_b1);
    let (ok, _, err) = lb.cli(&["undrain", "b1"]);
    assert!(ok, "{err}");
    assert!(fresh(&lab, "dr-back", 60)[0] > 0, "undrained b1 gets no new sessions");
}

#[test]
fn adding_a_broker_by_reload_breaks_no_session() {
    require_root!();
    let lab = LabGuard::up(3);
    let full = lab.config(&health());
    let without_b3 = full.split("[[backend]]\nname = \"b3\"").next().expect("config").to_owned();
    let lb = Balancer::start(&lab, &without_b3);
    let mut held = hold_sessions(&lab, "rl", 300);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    assert!(at.values().all(|b| *b < 2));

    std::fs::write(&lb.config, &full).expect("writing the new config");
    let (ok, out, err) = lb.cli(&["reload"]);
    assert!(ok, "reload failed: {err}");
    assert!(out.contains("added [\"b3\"]"), "{out}");
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 300, "sessions broke on reload");
    // Its MAC is resolved and its checks pass without blocking the controller.
    wait_state(&lb, "mqtt", "b3", "up", Duration::from_secs(10));
    let counts = fresh(&lab, "rl-new", 90);
    assert!(counts[2] > 10, "the added broker gets few new sessions: {counts:?}");
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 300);
}

#[test]
fn broker_without_the_vip_is_vip_misconfigured_and_gets_no_sessions() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    lab.set_broker_vip(0, false).expect("removing the VIP from b1");
    let took = wait_state(&lb, "mqtt", "b1", "vip-misconfigured", failover_window() + Duration::from_millis(400));
    eprintln!("vip-misconfigured after {took:?}");
    let s = lb.status();
    let b1 = &s.listeners[0].backends[0];
    assert!(b1.last_check.contains("answers"), "the state says the real address answers: {b1:?}");
    let counts = fresh(&lab, "novip", 60);
    assert_eq!(counts, vec![0, 60]);
    lab.set_broker_vip(0, true).expect("restoring the VIP");
    wait_state(&lb, "mqtt", "b1", "up", (INTER * (RISE + 1)).mul_f64(1.1) + Duration::from_millis(400));
}

#[test]
fn clients_of_a_hung_broker_get_a_reset_instead_of_waiting() {
    require_root!();
    let lab = LabGuard::up(2);
    // Reset at once (no grace): the operator prefers a fast failover to riding out false alarms.
    let lb = Balancer::start(&lab, &lab.config(&health()).replace("xdp_mode", "on_down_grace = \"0s\"\nxdp_mode"));
    let mut held = hold_sessions(&lab, "hang", 40);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    // A hung broker: its process stops answering, its kernel keeps the connections open.
    let pid: i32 = std::fs::read_to_string(lab.state.join("b1/mosquitto.pid")).expect("pid").trim().parse().expect("pid");
    // SAFETY: signals to the lab's own broker process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let hung = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_state(&lb, "mqtt", "b1", "down", failover_window() + Duration::from_secs(1));
        for (id, c) in held.iter_mut().filter(|(id, _)| at[id] == 0) {
            c.stream.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let t = Instant::now();
            let err = c.ping().expect_err("a session on a hung broker cannot get PINGRESP");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{id}: {err} after {:?} (since hang {:?})",
                t.elapsed(),
                hung.elapsed()
            );
        }
        assert_eq!(lb.state("mqtt", "b1"), "down");
    }));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    result.expect("fast failover");
    assert_eq!(assert_alive(&mut held, &at, &[1]), at.values().filter(|b| **b == 1).count());
}

/// What a reload may change, as status shows it: listeners, their backends, states and weights.
fn served(lb: &Balancer) -> Vec<String> {
    let s = lb.status();
    s.listeners
        .iter()
        .flat_map(|l| {
            let head = format!("{} {}:{}", l.name, l.vip, l.port);
            l.backends.iter().map(move |b| format!("{head} {} {} {}", b.name, b.weight, b.state))
        })
        .collect()
}

#[test]
fn an_invalid_reload_is_rejected_and_changes_nothing() {
    require_root!();
    let lab = LabGuard::up(2);
    let good = lab.config_tls_checked(&health());
    let lb = Balancer::start(&lab, &good);
    let mut held = hold_sessions(&lab, "inv", 100);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    for l in ["mqtt", "mqtts", "internal"] {
        for b in ["b1", "b2"] {
            wait_state(&lb, l, b, "up", Duration::from_secs(5));
        }
    }
    let before = served(&lb);
    let not_a_cert = lab.state.join("not-a-cert.pem");
    std::fs::write(&not_a_cert, "not a certificate\n").expect("write");
    let tls = good.replace(&lab.ca_pem().display().to_string(), &not_a_cert.display().to_string());
    // Each kind of bad input, and what the error must say.
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("a value of the wrong kind", good.replace("port = 1883", "port = 1883\nhash = \"round-robin\""), vec!["round-robin".into()]),
        ("an unknown field", good.replace("port = 1883", "port = 1883\nwieght = 3"), vec!["wieght".into()]),
        ("no backends", good.replace("port = 1883", "port = 1883\nbackends = []"), vec!["listener[0].backends".into()]),
        (
            "a VIP that is a backend's address",
            good.replacen("vip = \"192.0.2.100\"", "vip = \"192.0.2.11\"", 1),
            vec!["listener[0].vip".into()],
        ),
        (
            "a VIP that is the balancer's own address",
            good.replacen("vip = \"192.0.2.100\"", "vip = \"192.0.2.2\"", 1),
            vec!["VIP 192.0.2.2 is an address of eth0".into()],
        ),
        ("a tls_ca that is no certificate", tls, vec!["tls_ca".into(), "no certificate".into()]),
        ("a changed ring_size", good.replace("xdp_mode", "ring_size = 65521\nxdp_mode"), vec!["ring_size cannot change on reload".into()]),
    ];
    for (what, text, says) in &cases {
        std::fs::write(&lb.config, text).expect("write");
        let (ok, _, err) = lb.cli(&["reload"]);
        assert!(!ok, "{what}: accepted");
        for s in says {
            assert!(err.contains(s.as_str()), "{what}: the error does not say {s:?}: {err}");
        }
        assert!(err.contains("unchanged"), "{what}: {err}");
        assert_eq!(served(&lb), before, "{what}: the running state changed");
    }
    let rejected = lb.status().reloads.rejected;
    assert_eq!(rejected, cases.len() as u64);
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 100);
    let counts = fresh(&lab, "inv-new", 40);
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    // SIGHUP with a bad file: rejected too (the rejection is counted), still serving.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(lb.child.id()).expect("pid"), libc::SIGHUP) };
    wait::until("SIGHUP to reload (and the rejection counted)", Duration::from_secs(5), || lb.status().reloads.rejected == rejected + 1);
    assert!(lb.status().reloads.last_error.is_some_and(|e| e.contains("ring_size")), "the last error is not shown");
    assert_eq!(served(&lb), before, "SIGHUP with a bad file changed the running state");
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 100);
    // A good reload that adds a TLS-checked listener: the pairs it adds are probed at once.
    let added = format!(
        "{good}\n[[listener]]\nname = \"mqtts-internal\"\nvip = \"{}\"\nport = 8883\n\
         health = {{ check = \"mqtt-tls\", tls_ca = \"{}\", tls_server_name = \"{}\" }}\n",
        tests::lab::VIP_INTERNAL,
        lab.ca_pem().display(),
        tests::lab::TLS_NAME
    );
    std::fs::write(&lb.config, added).expect("write");
    let (ok, _, err) = lb.cli(&["reload"]);
    assert!(ok, "{err}");
    wait::until_every("the TLS pairs the reload added probed", Duration::from_secs(5), Duration::from_millis(50), || {
        let s = lb.status();
        let b = s.listener("mqtts-internal").and_then(|l| l.backends.first());
        let last = b.map_or("", |b| b.last_check.as_str()).to_owned();
        if last.starts_with("TLS, CONNACK 0") { Ok(()) } else { Err(last) }
    });
}

#[test]
fn tls_listener_checked_with_mqtt_tls_fails_alone() {
    require_root!();
    let lab = LabGuard::up(2);
    let config = lab.config_tls_checked(&health());
    let lb = Balancer::start(&lab, &config);
    // The first TLS probe passes (its result names the TLS handshake).
    wait::until_every("a passing TLS probe", Duration::from_secs(3), Duration::from_millis(50), || {
        let s = lb.status();
        let b = s.listeners.get(1).and_then(|l| l.backends.first());
        let last = b.map_or("", |b| b.last_check.as_str()).to_owned();
        if last.starts_with("TLS, CONNACK 0") { Ok(()) } else { Err(last) }
    });
    // b1 comes back without its TLS listener: 8883 fails, 1883 does not.
    lab.start_broker_with(0, false).expect("b1 without TLS");
    wait_state(&lb, "mqtts", "b1", "down", failover_window() + Duration::from_millis(400));
    // Two more rounds of the plain listener's checks, and it is still up.
    let checks = |lb: &Balancer| lb.status().listeners[0].backends[0].checks;
    let at = checks(&lb);
    wait::until_every("two more rounds of the plain listener's checks", INTER * 4, Duration::from_millis(50), || checks(&lb) >= at + 2);
    assert_eq!(lb.state("mqtt", "b1"), "up", "the plain listener must stay up");
    assert_eq!(lb.state("mqtts", "b2"), "up");
}

/// A stand-in for a broker's API (EMQX's availability check) in its namespace, on 18083: it
/// answers every request with the status the test sets, until dropped.
struct Api {
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Api {
    fn start(lab: &LabGuard, broker: usize) -> Self {
        use std::{
            io::{Read as _, Write as _},
            sync::{
                Arc,
                atomic::{AtomicBool, AtomicU16, Ordering},
            },
        };
        // On the broker's own address only: a VIP probe sent to the API port would find nothing.
        let at = std::net::SocketAddr::from((lab::broker_addr(broker), 18083));
        let listener = tests::netns::in_netns(&lab.broker_ns(broker), || std::net::TcpListener::bind(at))
            .expect("the broker's namespace")
            .expect("listening on 18083");
        listener.set_nonblocking(true).expect("nonblocking");
        let (status, stop) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicBool::new(false)));
        let (st, sp) = (Arc::clone(&status), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            // A cap far beyond any test's length: the stand-in serves until the test drops it.
            wait::repeat(Duration::from_hours(1), &sp, || match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut req = [0u8; 1024];
                    let _ = s.read(&mut req);
                    let _ = write!(s, "HTTP/1.1 {} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", st.load(Ordering::SeqCst));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            });
        });
        Self { status, stop, thread: Some(thread) }
    }

    fn set(&self, status: u16) {
        self.status.store(status, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `check = "http"` against a stand-in of EMQX's availability check: a broker whose check turns
/// 503 (an evacuation starting) is `refusing` within `fall` rounds, gets no new session while its
/// own sessions keep working, and comes back on 200. The VIP probe still runs on the MQTT port.
#[test]
fn an_http_check_takes_a_refusing_broker_out_of_the_ring_and_keeps_its_sessions() {
    require_root!();
    let lab = LabGuard::up(2);
    let apis = [Api::start(&lab, 0), Api::start(&lab, 1)];
    let http = health()
        .replace("check = \"mqtt\"", "check = \"http\"\nhttp_port = 18083\nhttp_path = \"/api/v5/load_rebalance/availability_check\"");
    let lb = Balancer::start(&lab, &lab.config(&http));
    for b in ["b1", "b2"] {
        wait::until_every(format!("{b} up on HTTP 200"), Duration::from_secs(5), Duration::from_millis(50), || {
            let s = lb.status();
            let be = s.backend("mqtt", b);
            let (state, last) = be.map_or((String::new(), String::new()), |be| (be.state.clone(), be.last_check.clone()));
            if state == "up" && last == "HTTP 200; VIP ok" { Ok(()) } else { Err(format!("{state}: {last}")) }
        });
    }
    let mut held = hold_sessions(&lab, "http", 60);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    assert!(at.values().any(|b| *b == 0), "no held session on b1: {at:?}");

    // b1's node starts an evacuation: its availability check answers 503.
    let turned = Instant::now();
    apis[0].set(503);
    wait_state(&lb, "mqtt", "b1", "refusing", failover_window() + INTER);
    let took = turned.elapsed();
    let last = lb.status().backend("mqtt", "b1").map(|b| b.last_check.clone()).unwrap_or_default();
    assert!(last.contains("HTTP 503: the broker takes no new clients"), "{last}");
    eprintln!("b1 refusing {took:?} after its check turned 503 (fall {FALL} x inter {INTER:?})");
    let counts = fresh(&lab, "http-new", 40);
    assert_eq!(counts[0], 0, "a refusing broker got new sessions: {counts:?}");
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 60, "a held session died");

    // The evacuation ends: 200 again, and b1 takes new sessions.
    apis[0].set(200);
    wait_state(&lb, "mqtt", "b1", "up", INTER * (RISE + 2));
    assert!(fresh(&lab, "http-back", 40)[0] > 0, "b1 back up gets no new sessions");
}

/// `check = "https"`: the API over TLS, verified against the lab's CA (a stand-in: `openssl
/// s_server -www`, which answers every GET with 200, in each broker's namespace with the lab's
/// certificate); the pairs come up on `TLS, HTTP 200`. Without `tls_server_name` the probed
/// address is verified, which the certificate does not name: down.
#[test]
fn an_https_check_verifies_the_api_and_reads_its_status() {
    require_root!();
    let lab = LabGuard::up(2);
    let state = lab.ca_pem().parent().expect("the lab's state directory").to_path_buf();
    // Each server is the guard's as soon as it runs: killed when the test ends, however.
    let mut servers = Children(Vec::new());
    for i in 0..2 {
        servers.0.push(
            tests::netns::nsenter(&lab.broker_ns(i), "openssl")
                .args(["s_server", "-quiet", "-www", "-accept", "18443", "-cert"])
                .arg(state.join("server.pem"))
                .arg("-key")
                .arg(state.join("server.key"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("openssl s_server"),
        );
    }
    let https = |name: &str| {
        health()
            .replace("check = \"mqtt\"", &format!("check = \"https\"\nhttp_port = 18443\ntls_ca = \"{}\"{name}", lab.ca_pem().display()))
    };
    let lb = Balancer::start(&lab, &lab.config(&https(&format!("\ntls_server_name = \"{}\"", lab::TLS_NAME))));
    for b in ["b1", "b2"] {
        wait::until_every(format!("{b} up on an HTTPS 200"), Duration::from_secs(10), Duration::from_millis(50), || {
            let s = lb.status();
            let be = s.backend("mqtt", b);
            let (state, last) = be.map_or((String::new(), String::new()), |be| (be.state.clone(), be.last_check.clone()));
            if state == "up" && last == "TLS, HTTP 200; VIP ok" { Ok(()) } else { Err(format!("{state}: {last}")) }
        });
    }
    // The same without the name: the broker's address is not in its certificate.
    std::fs::write(&lb.config, lab.config(&https(""))).expect("config");
    let (ok, _, err) = lb.cli(&["reload"]);
    assert!(ok, "{err}");
    wait_state(&lb, "mqtt", "b1", "down", failover_window() + INTER);
    let last = lb.status().backend("mqtt", "b1").map(|b| b.last_check.clone()).unwrap_or_default();
    assert!(last.contains("TLS handshake"), "{last}");
}

/// Processes a test started, killed when it ends (also when it fails).
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Evacuation as EMQX does it, end to end, with a stand-in for its availability check beside
/// each of three mosquittos: 2,000 sessions held; one broker's check turns 503; once the
/// balancer has it `refusing`, that broker's client connections are closed at 200/s (RSTs, as
/// `ss -K` sends them) and their clients reconnect at once. Every one reconnects on its first
/// try, none lands on the evacuating broker, and no session of the other brokers drops. Then
/// the broker returns: 200, `rise` passes, and new connections reach it again.
#[test]
fn an_evacuation_moves_every_client_on_its_first_reconnect() {
    require_root!();
    const SESSIONS: usize = 2000;
    let lab = LabGuard::up(3);
    let apis = [Api::start(&lab, 0), Api::start(&lab, 1), Api::start(&lab, 2)];
    let http = health()
        .replace("check = \"mqtt\"", "check = \"http\"\nhttp_port = 18083\nhttp_path = \"/api/v5/load_rebalance/availability_check\"");
    let lb = Balancer::start(&lab, &lab.config(&http));
    for b in ["b1", "b2", "b3"] {
        wait_state(&lb, "mqtt", b, "up", Duration::from_secs(5));
    }
    let start = Instant::now();
    let mut held = hold_sessions(&lab, "ev", SESSIONS);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    assert_eq!(at.len(), SESSIONS, "not every held session was logged by a broker");
    let on_b1: Vec<usize> = (0..SESSIONS).filter(|i| at[&held[*i].0] == 0).collect();
    eprintln!("{:>6.1?} {SESSIONS} sessions held, {} on b1", start.elapsed(), on_b1.len());
    assert!(on_b1.len() > 300, "too few sessions on b1 to evacuate: {}", on_b1.len());

    // 1. b1's availability check turns 503; the balancer must mark it refusing within fall
    //    rounds and one more.
    let turned = Instant::now();
    apis[0].set(503);
    wait_state(&lb, "mqtt", "b1", "refusing", failover_window() + INTER);
    eprintln!("{:>6.1?} b1 refusing, {:?} after its check turned 503", start.elapsed(), turned.elapsed());

    // 2. The evacuation: b1 closes its clients' connections at 200/s.
    let b1 = lab.broker_ns(0);
    let out = lab.exec(&b1, "ss", &["-Htn", "state", "established", "( sport = :1883 )"]).expect("ss on b1");
    let ports: Vec<String> =
        out.lines().filter_map(|l| l.split_whitespace().nth(3).and_then(|peer| peer.rsplit(':').next()).map(str::to_owned)).collect();
    assert!(ports.len() >= on_b1.len(), "b1 holds {} connections, {} sessions were placed on it", ports.len(), on_b1.len());
    // The closes run at 200/s (four every 20 ms) while the clients reconnect as they notice.
    let kills = Instant::now();
    let mut reconnected = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for (k, batch) in ports.chunks(4).enumerate() {
                let when = Duration::from_millis(20) * u32::try_from(k).expect("few batches");
                if let Some(wait) = when.checked_sub(kills.elapsed()) {
                    std::thread::sleep(wait);
                }
                let peers: Vec<String> = batch.iter().map(|p| format!("dport = :{p}")).collect();
                let filter = format!("( sport = :1883 and ( {} ) )", peers.join(" or "));
                lab.exec(&b1, "ss", &["-K", "-t", "state", "established", &filter]).expect("ss -K on b1");
            }
            eprintln!("{:>6.1?} {} connections on b1 closed in {:?}", start.elapsed(), ports.len(), kills.elapsed());
        });
        // 3. Each client reconnects as soon as its connection is gone: on its first try, not to b1.
        for &i in &on_b1 {
            let (id, c) = &mut held[i];
            wait::until(format!("{id} on b1 closed by the evacuation"), Duration::from_secs(30), || c.ping().is_err());
            let again = format!("{id}-again");
            let c = tests::netns::in_netns(&lab.ns("client"), || {
                MqttConn::connect(None, std::net::SocketAddrV4::new(lab::VIP, 1883), &again, Duration::from_secs(5))
            })
            .expect("client namespace")
            .unwrap_or_else(|e| panic!("{again}: the first reconnect failed: {e}"));
            reconnected.push((again, c));
        }
    });
    let moved = placement(&lab, reconnected.iter().map(|(id, _)| id.clone()));
    assert_eq!(moved.len(), on_b1.len(), "not every reconnect was logged by a broker");
    let back_on_b1 = moved.values().filter(|b| **b == 0).count();
    assert_eq!(back_on_b1, 0, "{back_on_b1} reconnects landed on the evacuating broker");
    eprintln!("{:>6.1?} {} clients reconnected on their first try, none to b1", start.elapsed(), moved.len());
    // The other brokers' sessions never dropped.
    assert_eq!(assert_alive(&mut held, &at, &[1, 2]), SESSIONS - on_b1.len());

    // 4. b1 returns: 200, `rise` passes, new connections reach it.
    apis[0].set(200);
    wait_state(&lb, "mqtt", "b1", "up", INTER * (RISE + 2));
    assert!(fresh(&lab, "ev-back", 60)[0] > 0, "b1 back gets no new sessions");
    eprintln!("{:>6.1?} b1 up and taking new sessions again", start.elapsed());
}

/// MQTT 5 checks against mosquitto (which speaks MQTT 5): the plain and the TLS listener's
/// pairs come up on CONNACK 0x00, read through the DSR path too.
#[test]
fn mqtt5_checks_read_mosquittos_mqtt5_connack() {
    require_root!();
    let lab = LabGuard::up(2);
    let config =
        lab.config_tls_checked(&health().replace("check = \"mqtt\"", "check = \"mqtt5\"")).replace("\"mqtt-tls\"", "\"mqtt5-tls\"");
    assert!(config.contains("check = \"mqtt5\"") && config.contains("check = \"mqtt5-tls\""), "{config}");
    let lb = Balancer::start(&lab, &config);
    for (listener, want) in [("mqtt", "CONNACK 0x00 (success, MQTT 5); VIP ok"), ("mqtts", "TLS, CONNACK 0x00 (success, MQTT 5); VIP ok")] {
        for b in ["b1", "b2"] {
            wait::until_every(format!("{listener}/{b} up on an MQTT 5 CONNACK"), Duration::from_secs(5), Duration::from_millis(50), || {
                let s = lb.status();
                let be = s.backend(listener, b);
                let (state, last) = be.map_or((String::new(), String::new()), |be| (be.state.clone(), be.last_check.clone()));
                if state == "up" && last == want { Ok(()) } else { Err(format!("{state}: {last}")) }
            });
        }
    }
}

#[test]
fn a_changed_backend_mac_is_applied_without_a_restart() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let mut held = hold_sessions(&lab, "mac", 30);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    let on_b1 = at.values().filter(|b| **b == 0).count();
    assert!(on_b1 > 0);
    // b1's NIC is replaced: a new MAC, announced the way a gratuitous ARP would update the
    // balancer's neighbour table.
    let new_mac = "02:aa:bb:cc:dd:01";
    let b1 = lab.broker_ns(0);
    assert!(Command::new("ip").args(["-n", &b1, "link", "set", "eth0", "address", new_mac]).status().expect("ip").success());
    assert!(
        Command::new("ip")
            .args([
                "-n",
                &lab.ns("lb"),
                "neigh",
                "replace",
                &lab::broker_addr(0).to_string(),
                "lladdr",
                new_mac,
                "dev",
                "eth0",
                "nud",
                "stale"
            ])
            .status()
            .expect("ip")
            .success()
    );
    wait::until_every("the controller using the new MAC", Duration::from_secs(10), Duration::from_millis(200), || {
        let s = lb.status();
        if s.listeners.first().and_then(|l| l.backends.first()).is_some_and(|b| b.mac == new_mac) { Ok(()) } else { Err(format!("{s:?}")) }
    });
    assert_eq!(lb.state("mqtt", "b1"), "up");
    // Sessions on b1 reach it at its new MAC.
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 30);
}

#[test]
fn a_false_alarm_shorter_than_the_grace_resets_no_session() {
    require_root!();
    let lab = LabGuard::up(2);
    // The defaults: on_down = "reset" after on_down_grace = 20 s.
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let mut held = hold_sessions(&lab, "alarm", 60);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    let on_b1 = at.values().filter(|b| **b == 0).count();
    assert!(on_b1 > 5, "only {on_b1} sessions on b1");
    // b1 stops answering for a few seconds (a GC pause, a CPU starved under load): its checks
    // fail, it is marked down, and it comes back before the grace runs out.
    let pid: i32 = std::fs::read_to_string(lab.state.join("b1/mosquitto.pid")).expect("pid").trim().parse().expect("pid");
    // SAFETY: signals to the lab's own broker process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let marked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_state(&lb, "mqtt", "b1", "down", failover_window() + Duration::from_secs(1));
        let s = lb.status();
        let b1 = &s.listeners[0].backends[0];
        assert!(!b1.resetting_flows, "flows reset inside the grace: {b1:?}");
    }));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    marked.expect("b1 marked down without resetting its flows");
    wait_state(&lb, "mqtt", "b1", "up", (INTER * (RISE + 1)).mul_f64(1.1) + Duration::from_secs(1));
    // Every session of the paused broker is alive: nothing reset them.
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 60, "sessions were reset by a false alarm");
}

#[test]
fn a_powered_off_broker_does_not_keep_the_balancer_from_starting() {
    require_root!();
    let lab = LabGuard::up(2);
    let config = lab.config(&health());
    let mut lb = Balancer::start(&lab, &config);
    let mut held = hold_sessions(&lab, "off", 40);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    // b2 loses power: its link goes down and the balancer forgets its MAC.
    let b2 = lab.broker_ns(1);
    let b2_addr = tests::lab::broker_addr(1).to_string();
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().expect("ip").success(), "ip {args:?}");
    ip(&["-n", &b2, "link", "set", "eth0", "down"]);
    let forget = || {
        let _ = Command::new("ip").args(["-n", &lab.ns("lb"), "neigh", "del", &b2_addr, "dev", "eth0"]).status();
    };
    // The controller restarts (a reboot, an upgrade) while b2 is off: it adopts the pins, with
    // b2's MAC as the maps hold it, and serves.
    lb.kill9();
    forget();
    lb.restart(&lab);
    wait_state(&lb, "mqtt", "b2", "down", failover_window() + Duration::from_secs(2));
    assert_eq!(assert_alive(&mut held, &at, &[0]), at.values().filter(|b| **b == 0).count());
    assert_eq!(fresh(&lab, "off-adopted", 30), vec![30, 0], "new sessions must go to b1");
    // A fresh start (nothing pinned) while b2 is still off: b2 has no MAC at all. It starts as
    // `no-mac`, out of every ring, and b1 serves.
    lb.stop_for_good();
    forget();
    let lb = Balancer::start(&lab, &config);
    assert_eq!(lb.state("mqtt", "b2"), "no-mac");
    assert_eq!(fresh(&lab, "off-fresh", 30), vec![30, 0], "new sessions must go to b1");
    // Power back: b2 answers ARP, joins its rings and takes new sessions.
    ip(&["-n", &b2, "link", "set", "eth0", "up"]);
    wait_state(&lb, "mqtt", "b2", "up", Duration::from_secs(15));
    assert!(fresh(&lab, "off-back", 60)[1] > 10, "b2 takes no new sessions after it came back");
}

#[test]
fn when_the_checks_themselves_break_the_listener_fails_open() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let mut held = hold_sessions(&lab, "open", 60);
    let at = placement(&lab, held.iter().map(|(id, _)| id.clone()));
    // The policy routing the DSR-path VIP probes need disappears (an operator's `ip rule flush`,
    // say): every VIP probe fails and every backend looks vip-misconfigured.
    let lb_ns = lab.ns("lb");
    let rules = Command::new("ip").args(["-n", &lb_ns, "-4", "rule", "show"]).output().expect("ip rule");
    for line in String::from_utf8_lossy(&rules.stdout).lines().filter(|l| l.starts_with("9130:")) {
        let spec: Vec<&str> = line.split_whitespace().skip(1).collect();
        let mut args = vec!["-n", lb_ns.as_str(), "-4", "rule", "del", "pref", "9130"];
        args.extend(spec.iter().skip_while(|w| **w != "fwmark"));
        assert!(Command::new("ip").args(&args).status().expect("ip").success(), "ip {args:?}");
    }
    for b in ["b1", "b2"] {
        wait_state(&lb, "mqtt", b, "vip-misconfigured", failover_window() + Duration::from_secs(2));
    }
    let s = lb.status();
    assert!(s.listeners[0].fail_open, "{s:?}");
    // Failing open: the sessions are not reset, and new ones still reach both brokers.
    assert_eq!(assert_alive(&mut held, &at, &[0, 1]), 60, "sessions were reset while failing open");
    let counts = fresh(&lab, "open-new", 60);
    assert!(counts.iter().all(|&n| n > 10), "new sessions did not reach both brokers while failing open: {counts:?}");
    // A reload puts the probe routes back; the backends come up and the listener closes again.
    let (ok, _, err) = lb.cli(&["reload"]);
    assert!(ok, "{err}");
    for b in ["b1", "b2"] {
        wait_state(&lb, "mqtt", b, "up", (INTER * (RISE + 1)).mul_f64(1.1) + Duration::from_secs(2));
    }
    assert!(!lb.status().listeners[0].fail_open);
}

/// A stand-in for a broker at its limit: accepts MQTT 3.1.1 sessions and answers PINGREQ
/// while `refuse` is false; once it is set, answers every new CONNECT (the health check's
/// too) with CONNACK 3 ("server unavailable") and keeps serving the sessions it has. Listens on
/// every address of broker `i`'s namespace (its own and the VIP on `lo`); returns the client
/// ids it accepted.
fn refusing_broker(
    lab: &LabGuard,
    i: usize,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        sync::{Arc, Mutex, atomic::Ordering},
    };
    let listener = tests::netns::in_netns(&lab.broker_ns(i), || TcpListener::bind("0.0.0.0:1883"))
        .expect("broker namespace")
        .expect("binding 1883 in the broker's namespace");
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&accepted);
    std::thread::spawn(move || {
        // Bounded: the test ends long before, and the lab's teardown ends the process's use.
        for stream in listener.incoming().take(10_000) {
            let Ok(mut s) = stream else { continue };
            let (refuse, seen) = (Arc::clone(&refuse), Arc::clone(&seen));
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_mins(2)));
                // One packet: the fixed header's type, the remaining length, the body.
                let read_packet = |s: &mut std::net::TcpStream| -> Option<(u8, Vec<u8>)> {
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).ok()?;
                    let (mut len, mut shift) = (0usize, 0);
                    loop {
                        let mut l = [0u8; 1];
                        s.read_exact(&mut l).ok()?;
                        len |= usize::from(l[0] & 0x7f) << shift;
                        shift += 7;
                        if l[0] & 0x80 == 0 || shift > 21 {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    s.read_exact(&mut body).ok()?;
                    Some((b[0] >> 4, body))
                };
                let Some((1, connect)) = read_packet(&mut s) else { return };
                if refuse.load(Ordering::SeqCst) {
                    let _ = s.write_all(&[0x20, 0x02, 0x00, 0x03]);
                    return;
                }
                // MQTT 3.1.1 CONNECT: protocol name, level, flags, keepalive, then the client id.
                let name = usize::from(u16::from_be_bytes([connect[0], connect[1]]));
                let at = 2 + name + 4;
                let id_len = usize::from(u16::from_be_bytes([connect[at], connect[at + 1]]));
                let id = String::from_utf8_lossy(&connect[at + 2..at + 2 + id_len]).into_owned();
                if s.write_all(&[0x20, 0x02, 0x00, 0x00]).is_err() {
                    return;
                }
                seen.lock().expect("ids").push(id);
                while let Some((kind, _)) = read_packet(&mut s) {
                    match kind {
                        12 if s.write_all(&[0xd0, 0x00]).is_ok() => {}
                        _ => return,
                    }
                }
            });
        }
    });
    accepted
}

#[test]
fn a_broker_answering_connack_3_gets_no_new_sessions_and_keeps_its_own() {
    require_root!();
    let lab = LabGuard::up(3);
    // b2 is a broker that will reach its limit.
    lab.stop_broker(1).expect("stopping b2's mosquitto");
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_b2 = refusing_broker(&lab, 1, std::sync::Arc::clone(&refuse));
    let lb = Balancer::start(&lab, &lab.config(&health()));
    wait_state(&lb, "mqtt", "b2", "up", Duration::from_secs(15));
    let mut held = hold_sessions(&lab, "limit", 90);
    let kept: Vec<String> = on_b2.lock().expect("ids").clone();
    assert!(kept.len() > 10, "only {} of 90 sessions reached b2", kept.len());

    // b2 reaches its limit: CONNACK 3 to every new client and to the check.
    refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_state(&lb, "mqtt", "b2", "refusing", failover_window() + Duration::from_secs(1));
    let b2 = lb.status().listeners[0].backend("b2").cloned();
    let last = b2.map(|b| b.last_check).unwrap_or_default();
    assert!(last.contains("CONNACK 3"), "status does not say why b2 is out: {last}");
    // New sessions go to b1 and b3 only: one that reached b2 would get CONNACK 3 and fail.
    let counts = fresh(&lab, "while-full", 60);
    assert_eq!(counts[1], 0, "{counts:?}");
    assert_eq!(counts[0] + counts[2], 60);
    // The sessions b2 has keep working: its flows stay where they are.
    for (id, c) in held.iter_mut().filter(|(id, _)| kept.contains(id)) {
        c.ping().unwrap_or_else(|e| panic!("session {id} on the refusing b2 died: {e}"));
    }
    assert_eq!(lb.state("mqtt", "b2"), "refusing");
    eprintln!("CONNACK 3: b2 refusing; {} of its sessions kept, 60 new sessions on b1/b3 {counts:?}", kept.len());
}

#[test]
fn a_probe_the_balancer_cannot_make_leaves_the_broker_up_and_says_why() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config(&health()));
    let b1 = |s: &Status| {
        let l = s.listener("mqtt").expect("listener mqtt");
        l.backend("b1").cloned().expect("backend b1")
    };
    let wait = |what: &str, ok: &dyn Fn(&BackendStatus) -> bool| {
        wait::until_every(what, failover_window() * 3, Duration::from_millis(50), || {
            let b = b1(&lb.status());
            if ok(&b) { Ok(b) } else { Err(format!("{b:?}")) }
        })
    };
    wait("b1 checked", &|b| b.checks > 0 && b.state == "up");
    // The balancer's own routing table says b1 cannot be reached: its probes fail before a SYN
    // leaves (EHOSTUNREACH from connect itself). Client traffic, forwarded by XDP, is not routed.
    let route = ["-n", &lab.ns("lb"), "route", "add", "unreachable", &format!("{}/32", lab::broker_addr(0))];
    assert!(Command::new("ip").args(route).status().expect("ip").success());
    let b = wait("b1 unchecked for more than fall rounds", &|b| b.unchecked.is_some() && b.local_errors > u64::from(FALL) + 1);
    assert_eq!(b.state, "up", "a local error takes no broker down: {b:?}");
    assert!(b.unchecked.as_deref().unwrap_or("").contains("No route to host"), "{b:?}");
    assert_eq!(fresh(&lab, "local-error", 40).iter().filter(|n| **n > 0).count(), 2, "both brokers take new sessions");
    let (ok, text, err) = lb.cli(&["status"]);
    assert!(ok, "{err}");
    assert!(text.contains("up,unchecked") && text.contains("UNCHECKED: 192.0.2.11:1883: connect: No route to host"), "{text}");
    let metrics = lab.scrape_metrics();
    let line = metrics.lines().find(|l| l.starts_with("dsrlb_health_local_errors_total{listener=\"mqtt\",backend=\"b1\"}"));
    assert!(line.is_some_and(|l| !l.ends_with(" 0")), "{metrics}");
    // The route goes: the probes reach b1 again.
    let route = ["-n", &lab.ns("lb"), "route", "del", "unreachable", &format!("{}/32", lab::broker_addr(0))];
    assert!(Command::new("ip").args(route).status().expect("ip").success());
    let b = wait("b1 checked again", &|b| b.unchecked.is_none());
    assert_eq!(b.state, "up", "{b:?}");
}
