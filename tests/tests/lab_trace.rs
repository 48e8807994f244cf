//! `dsrlb trace` in the lab: 100 MQTT connections through the VIP are traced, every SYN's event
//! names the broker that logged the connection (found by the client's port), every later
//! segment of the connection names the same broker, and the pcapng file it wrote reads back with
//! `tcpdump -r` and carries each frame's decision as its comment. CONNECTs with credentials
//! (MQTT 3.1.1 and 5) come out of the controller with their username, password and user
//! property zeroed and their client id kept, in the lines and the pcap alike, unless `--raw`.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    process::{Child, ChildStderr, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use tests::{
    balancer::Balancer,
    client::MqttConn,
    lab::{Lab, LabGuard, VIP},
    netns::{in_netns, nsenter},
    require_root, wait,
};

const CONNECTIONS: usize = 100;

/// `TRACE_CONF`'s lease (`until_ns`) in every loaded program's map of that name, by bpftool.
fn trace_leases(ns: &str) -> Vec<u64> {
    let out = nsenter(ns, "bpftool").args(["-j", "map", "dump", "name", "TRACE_CONF"]).output().expect("bpftool");
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

/// `dsrlb trace --json ARGS` in the balancer's namespace, its lines collected as they come.
struct Trace {
    child: Child,
    stderr: BufReader<ChildStderr>,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    reader: JoinHandle<()>,
}

impl Trace {
    /// Starts it and returns once tracing is on (the controller switches it on before it
    /// answers, and the CLI says so).
    fn start(lab: &Lab, lb: &Balancer, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = nsenter(&lab.ns("lb"), tests::dsrlb_bin())
            .arg("--socket")
            .arg(&lb.socket)
            .args(["trace", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dsrlb trace");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        stderr.read_line(&mut first).expect("the trace's first words");
        assert!(first.contains("tracing"), "dsrlb trace did not start: {first:?}");
        let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
        let reader = {
            let lines = lines.clone();
            let stdout = child.stdout.take().expect("stdout");
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
                }
            })
        };
        Self { child, stderr, lines, reader }
    }

    fn until(&self, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
        wait::until(what, Duration::from_secs(10), || done(&self.lines.lock().expect("lines")));
    }

    /// SIGINT, as Ctrl-C: the pcap is complete and the summary printed. Returns every line.
    fn stop(mut self) -> Vec<serde_json::Value> {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGINT) };
        let status = self.child.wait().expect("dsrlb trace exits");
        self.reader.join().expect("reader");
        let mut rest = String::new();
        let _ = self.stderr.read_to_string(&mut rest);
        assert!(status.success(), "dsrlb trace: {status}: {rest}");
        assert!(rest.contains("frames shown"), "{rest}");
        std::mem::take(&mut *self.lines.lock().expect("lines"))
    }
}

#[test]
fn a_trace_of_100_connections_names_the_brokers_that_took_them_and_writes_a_pcap() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let pcap = lab.state.join("trace.pcapng");
    let args = ["--listener", "mqtt", "--client", "192.0.2.0/24", "--verdict", "tx", "-w"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(pcap.as_os_str());
    let trace = Trace::start(&lab, &lb, &args);

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
    trace.until("a traced SYN per connection", |lines| syns(lines) >= CONNECTIONS);
    let lines = trace.stop();

    let events = seen(&lines);
    assert!(events.iter().all(|e| e.verdict == "tx"), "--verdict tx");
    // Which broker logged each connection, by the client's address and port.
    let mut accepted: BTreeMap<SocketAddr, String> = BTreeMap::new();
    wait::until("every connection in a broker's log", Duration::from_secs(5), || {
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

    check_pcap(&pcap, lines.len());

    // The trace is over: the controller switched tracing off in the program, and a second
    // trace may start.
    wait::until("tracing switched off", Duration::from_secs(5), || trace_leases(&lab.ns("lb")) == vec![0]);
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
            // These CONNECTs carry nothing after their client id: nothing is masked.
            comments += 1;
        }
    }
    assert_eq!(comments, shown);
}

const PASSWORD: &[u8] = b"hunter2-the-password";
const USER_PROPERTY: &[u8] = b"tenant-token-4711";

/// An MQTT 5 CONNECT with a user property whose value is a secret, a username and a password.
fn connect5(client_id: &str) -> Vec<u8> {
    let string = |s: &[u8]| [&u16::try_from(s.len()).expect("short").to_be_bytes()[..], s].concat();
    let props = [&[0x11, 0, 0, 0, 60, 0x26][..], &string(b"tenant"), &string(USER_PROPERTY)].concat();
    let mut body = string(b"MQTT");
    body.extend([5, 0xc2, 0, 60, u8::try_from(props.len()).expect("short")]);
    body.extend(props);
    body.extend(string(client_id.as_bytes()));
    body.extend(string(b"alice"));
    body.extend(string(PASSWORD));
    [&[0x10, u8::try_from(body.len()).expect("short")][..], &body].concat()
}

/// Sends `connect` to the VIP from the client's namespace and waits for the CONNACK; returns
/// the client's address.
fn send_connect(lab: &Lab, connect: &[u8]) -> SocketAddr {
    in_netns(&lab.ns("client"), || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(VIP, 1883)), Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(connect).expect("CONNECT");
        let mut ack = [0u8; 2];
        s.read_exact(&mut ack).expect("CONNACK");
        assert_eq!(ack[0], 0x20, "a CONNACK");
        s.local_addr().expect("local address")
    })
    .expect("client namespace")
}

fn has(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The frame bytes of a trace's JSON line.
fn frame_of(v: &serde_json::Value) -> Vec<u8> {
    serde_json::from_value::<lb_userspace::trace::Event>(v.clone()).expect("an event").bytes()
}

#[test]
fn a_trace_masks_connect_credentials_unless_raw_is_asked() {
    require_root!();
    let lab = LabGuard::up(2);
    let lb = Balancer::start(&lab, &lab.config("check = \"none\""));
    let pcap = lab.state.join("masked.pcapng");
    let trace = Trace::start(&lab, &lb, &["--listener".as_ref(), "mqtt".as_ref(), "-w".as_ref(), pcap.as_os_str()]);
    send_connect(
        &lab,
        &lb_userspace::mqtt::connect("masked-v311", 60, Some("alice"), Some(std::str::from_utf8(PASSWORD).expect("text")))
            .expect("a CONNECT"),
    );
    send_connect(&lab, &connect5("masked-v5"));
    let connects = |lines: &[serde_json::Value]| lines.iter().filter(|v| v["masked"] == "connect").count();
    trace.until("both CONNECTs traced", |lines| connects(lines) >= 2);
    let lines = trace.stop();
    for v in &lines {
        let frame = frame_of(v);
        for secret in [PASSWORD, USER_PROPERTY, b"alice"] {
            assert!(!has(&frame, secret), "{:?} left the controller: {v}", String::from_utf8_lossy(secret));
        }
    }
    let connect_frames: Vec<Vec<u8>> = lines.iter().filter(|v| v["masked"] == "connect").map(frame_of).collect();
    for id in [&b"masked-v311"[..], b"masked-v5"] {
        assert!(connect_frames.iter().any(|f| has(f, id)), "the client id {:?} was masked", String::from_utf8_lossy(id));
    }
    // The pcap holds the same bytes, each CONNECT with a comment that says it was masked.
    let file = std::fs::File::open(&pcap).expect("pcap");
    let mut reader = pcap_file::pcapng::PcapNgReader::new(file).expect("a pcapng file");
    let mut masked_comments = 0;
    while let Some(block) = reader.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.expect("a block") {
            for secret in [PASSWORD, USER_PROPERTY, b"alice"] {
                assert!(!has(&p.data, secret), "{:?} in the pcap", String::from_utf8_lossy(secret));
            }
            let comment = p.options.iter().find_map(|o| match o {
                pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                _ => None,
            });
            if comment.is_some_and(|c| c.ends_with("; MQTT CONNECT masked after the client id")) {
                assert!(has(&p.data, b"masked-v"), "a masked CONNECT without its client id in the pcap");
                masked_comments += 1;
            }
        }
    }
    assert_eq!(masked_comments, 2, "each CONNECT's comment says it was masked");

    // --raw (root may): the credentials as they were sent, as far as the 128 bytes reach (the
    // whole 3.1.1 CONNECT, the 5 one's user property and username).
    let trace = Trace::start(&lab, &lb, &["--listener".as_ref(), "mqtt".as_ref(), "--raw".as_ref()]);
    send_connect(
        &lab,
        &lb_userspace::mqtt::connect("raw-v311", 60, Some("alice"), Some(std::str::from_utf8(PASSWORD).expect("text"))).expect("a CONNECT"),
    );
    send_connect(&lab, &connect5("raw-v5"));
    let traced = |lines: &[serde_json::Value], id: &[u8]| lines.iter().find(|v| has(&frame_of(v), id)).cloned();
    trace.until("the raw CONNECTs traced", |lines| traced(lines, b"raw-v311").is_some() && traced(lines, b"raw-v5").is_some());
    let lines = trace.stop();
    let (v311, v5) = (traced(&lines, b"raw-v311").expect("traced"), traced(&lines, b"raw-v5").expect("traced"));
    assert!(has(&frame_of(&v311), PASSWORD) && has(&frame_of(&v311), b"alice"), "--raw masked: {v311}");
    assert!(has(&frame_of(&v5), USER_PROPERTY) && has(&frame_of(&v5), b"alice"), "--raw masked: {v5}");
    assert!(v311.get("masked").is_none() && v5.get("masked").is_none(), "{v311} {v5}");
}
