//! `dsrlb trace` in the lab: 100 MQTT connections through the VIP are traced, every SYN's event
//! names the broker that logged the connection (found by the client's port), every later
//! segment of the connection names the same broker, and the pcapng file it wrote reads back with
//! `tcpdump -r` and carries each frame's decision as its comment.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tests::{
    client::{Balancer, MqttConn},
    lab::{LabGuard, VIP},
    netns::in_netns,
    require_root,
};

const CONNECTIONS: usize = 100;

fn wait_for(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `TRACE_CONF`'s lease (`until_ns`) in every loaded program's map of that name, by bpftool.
fn trace_leases(ns: &str) -> Vec<u64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["bpftool", "-j", "map", "dump", "name", "TRACE_CONF"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    // One map: a list of entries; several: a list of lists.
    let entries: Vec<&serde_json::Value> = match v.as_array() {
        Some(a) if a.first().is_some_and(serde_json::Value::is_array) => a.iter().filter_map(|m| m.as_array()).flatten().collect(),
        Some(a) => a.iter().collect(),
        None => Vec::new(),
    };
    entries.iter().filter_map(|e| e["formatted"]["value"]["until_ns"].as_u64()).collect()
}

/// A traced frame as the test reads `dsrlb trace --json`.
#[derive(Debug)]
struct Seen {
    src: SocketAddr,
    flags: u8,
    backend: Option<String>,
    how: String,
    verdict: String,
}

#[test]
fn a_trace_of_100_connections_names_the_brokers_that_took_them_and_writes_a_pcap() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let pcap = lab.state.join("trace.pcapng");
    let mut trace = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("lb")))
        .arg(tests::dsrlb_bin())
        .arg("--socket")
        .arg(&lb.socket)
        .args(["trace", "--listener", "mqtt", "--client", "192.0.2.0/24", "--verdict", "tx", "--json", "-w"])
        .arg(&pcap)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dsrlb trace");
    // Tracing is on once the CLI says so (the controller switches it on before answering).
    let mut stderr = BufReader::new(trace.stderr.take().expect("stderr"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("the trace's first words");
    assert!(first.contains("tracing"), "dsrlb trace did not start: {first:?}");
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = trace.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
            }
        })
    };

    let locals: Vec<SocketAddr> = in_netns(&lab.ns("client"), || {
        (0..CONNECTIONS)
            .map(|i| {
                let c = MqttConn::connect(None, SocketAddrV4::new(VIP, 1883), &format!("trace-{i}"), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("trace-{i}: {e}"));
                let local = c.local;
                c.disconnect();
                local
            })
            .collect()
    })
    .expect("client namespace");

    let seen = |lines: &[serde_json::Value]| -> Vec<Seen> {
        lines
            .iter()
            .filter_map(|v| {
                let bytes = lb_userspace::trace::Event::bytes(&serde_json::from_value(v.clone()).ok()?);
                match lb_userspace::trace::decode(&bytes) {
                    lb_userspace::trace::Headers::Tcp { src, flags, .. } => Some(Seen {
                        src,
                        flags,
                        backend: v["backend"].as_str().map(str::to_owned),
                        how: v["how"].as_str()?.to_owned(),
                        verdict: v["verdict"].as_str()?.to_owned(),
                    }),
                    _ => None,
                }
            })
            .collect()
    };
    let syns = |lines: &[serde_json::Value]| seen(lines).iter().filter(|s| s.flags & 0x02 != 0).count();
    wait_for("a traced SYN per connection", Duration::from_secs(10), || syns(&lines.lock().expect("lines")) >= CONNECTIONS);
    // SIGINT ends the trace as Ctrl-C does: the pcap is complete and the summary printed.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(i32::try_from(trace.id()).expect("pid"), libc::SIGINT) };
    let status = trace.wait().expect("dsrlb trace exits");
    reader.join().expect("reader");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert!(status.success(), "dsrlb trace: {status}: {rest}");
    assert!(rest.contains("frames shown"), "{rest}");

    let events = seen(&lines.lock().expect("lines"));
    assert!(events.iter().all(|e| e.verdict == "tx"), "--verdict tx");
    // Which broker logged each connection, by the client's address and port.
    let mut accepted: BTreeMap<SocketAddr, String> = BTreeMap::new();
    wait_for("every connection in a broker's log", Duration::from_secs(5), || {
        (0..2).flat_map(|b| lab.sessions(b)).filter(|s| s.client_id.starts_with("trace-")).count() >= CONNECTIONS
    });
    for b in 0..2 {
        for s in lab.sessions(b) {
            accepted.insert(s.from, format!("b{}", b + 1));
        }
    }
    let mut per_broker = BTreeMap::<String, usize>::new();
    for local in &locals {
        let broker = accepted.get(local).unwrap_or_else(|| panic!("no broker logged {local}"));
        let of_flow: Vec<&Seen> = events.iter().filter(|e| e.src == *local).collect();
        let syn = of_flow.iter().find(|e| e.flags & 0x12 == 0x02).unwrap_or_else(|| panic!("no SYN traced for {local}"));
        assert_eq!(syn.backend.as_ref(), Some(broker), "{local}: the trace says {:?}, {broker} took it", syn.backend);
        assert_eq!(syn.how, "ring", "{local}: a new connection's SYN is picked from the ring");
        assert!(of_flow.len() >= 3, "{local}: SYN, ACK and CONNECT at least: {of_flow:?}");
        for e in &of_flow {
            assert_eq!(e.backend.as_ref(), Some(broker), "{local}: every segment to the broker that took it: {e:?}");
            assert!(["ring", "table", "cache"].contains(&e.how.as_str()), "{e:?}");
        }
        *per_broker.entry(broker.clone()).or_default() += 1;
    }
    assert_eq!(per_broker.len(), 2, "both brokers took connections: {per_broker:?}");

    check_pcap(&pcap, lines.lock().expect("lines").len());

    // The trace is over: the controller switched tracing off in the program, and a second
    // trace may start.
    wait_for("tracing switched off", Duration::from_secs(5), || trace_leases(&lab.ns("lb")) == vec![0]);
    let (ok, _, err) = lb.cli(&["trace", "--count", "0"]);
    assert!(ok, "a second trace after the first ended: {err}");
}

/// The pcap: tcpdump reads it, a line per traced frame (`shown` of them) with the client's SYNs
/// to the VIP among them, and each frame carries its decision as the pcapng comment.
fn check_pcap(pcap: &std::path::Path, shown: usize) {
    // The pcap: tcpdump reads it, one line per traced frame, the client's SYNs to the VIP.
    let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(pcap).output().expect("tcpdump");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tcpdump -r: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().count(), shown, "a pcap frame per shown event");
    let syns_read = text.lines().filter(|l| l.contains("> 192.0.2.100.1883: Flags [S]")).count();
    assert!(syns_read >= CONNECTIONS, "{syns_read} SYNs to the VIP in tcpdump's reading");
    // Each frame carries its decision as the pcapng comment.
    let file = std::fs::File::open(pcap).expect("pcap");
    let mut reader = pcap_file::pcapng::PcapNgReader::new(file).expect("a pcapng file");
    let mut comments = 0;
    while let Some(block) = reader.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.expect("a block") {
            let comment = p.options.iter().find_map(|o| match o {
                pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                _ => None,
            });
            let comment = comment.expect("a comment on every frame");
            assert!(comment.starts_with("dsrlb: cpu") && comment.contains("mqtt -> b") && comment.ends_with(" tx"), "{comment}");
            comments += 1;
        }
    }
    assert_eq!(comments, shown);
}
