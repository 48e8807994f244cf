//! Data-plane micro-benchmark: ns per packet from `BPF_PROG_TEST_RUN` with a large `repeat`
//! for the balancer's paths, each measured in rounds next to the floor program (one bounds
//! check, a MAC swap, `XDP_TX`).
//!
//! `repeat` re-runs a program on the frame it rewrote. A forwarded frame leaves addressed to a
//! backend, and the balancer forwards only frames addressed to itself, so every forwarded row
//! runs behind the driver `xdp_bench_flows`, which addresses each run to the balancer again and
//! tail-calls it: for one flow or one ICMP error it keeps the frame's tuple, for new flows (and
//! established flows that miss the per-CPU flow cache) it gives every run the next client
//! address and port of a sequence. The driver's own cost, in the mode a row uses, is measured
//! in each round by pointing it at the floor, and taken off. After every measurement the counters
//! say which path ran: the forwarded count grew by the run count, and new flows by the run
//! count (new flow rows) or by (next to) nothing (established rows).
//!
//! Timing: this thread's CPU time for the call over `repeat` (sub-nanosecond resolution; the
//! kernel's own figure is whole nanoseconds; wall time would count the 4 ms the vCPU is
//! sometimes away). Each row is 11 rounds of (floor, path); the ratio is taken within each
//! round, so the machine's drift between rounds cancels, and the medians are reported.
//!
//! Two flow tables: the default size (1M flows: 2M slots, 32 MB) and one of 1,024 flows
//! (32 KB). In the small one every table access is a cache hit, so its rows measure the code;
//! in the large one an access to a random flow's buckets is a cache and TLB miss, so its rows
//! measure this machine's memory, which a pointer chase over as much memory measures alone.
//!
//! Run by `cargo xtask bench`; prints a table (and `--json` for the report).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::programs::Xdp;
use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{DEFAULT_FLOW_TABLE_SIZE, FLOW_CONFIRM_UNITS, flow_table_buckets, reason, table_event};
use lb_userspace::{
    config,
    dataplane::{
        Dataplane, LoadOptions, Object, Stats,
        testing::{Restore, TestPrograms},
    },
    plan::{self, BackendRuntime, DownSet, Ids},
};

/// A balancer and the test object whose driver and floor measure it.
struct Bench {
    dp: Dataplane,
    test: TestPrograms,
    /// What the driver undoes before each run of the measured path (the tunnel rows).
    restore: RowRestore,
    /// The driver's target for the measured path instead of the balancer (the decap row).
    decap: Option<lb_userspace::decap::Loaded>,
}

/// [`Restore`] with an owned header.
#[derive(Clone, Default)]
enum RowRestore {
    #[default]
    None,
    Unwrap(u32),
    Rewrap(Vec<u8>),
}

impl Bench {
    /// `dsrlb` (the balancer), or one of the test object's programs.
    fn program(&self, name: &str) -> &Xdp {
        if name == "dsrlb" { self.dp.balancer() } else { self.test.program(name) }
    }

    /// The driver in front of the balancer: see `TestPrograms::drive`.
    fn drive(&mut self, start: u32, wrap: u32, keep: bool) {
        self.test.drive(&self.dp, false, start, wrap, keep).expect("setting up the driver");
        self.aim();
    }

    /// Points the driver at the measured path (the balancer, or the decap program) with its
    /// restore, as a first run.
    fn aim(&mut self) {
        match &self.decap {
            Some(d) => self.test.target_program(d.program()).expect("driver"),
            None => self.test.target(&self.dp, false).expect("driver"),
        }
        let how = match &self.restore {
            RowRestore::None => Restore::None,
            RowRestore::Unwrap(n) => Restore::Unwrap(*n),
            RowRestore::Rewrap(h) => Restore::Rewrap(h),
        };
        self.test.restore(how).expect("driver restore");
    }
}
use tests::frame::{Ipv4Frame, Ipv6Frame, LB_MAC, TCP_ACK, TCP_SYN};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const REPEAT: u32 = 2_000_000;
const ROUNDS: usize = 11;
/// Flows of the small table: 512 buckets of 64 bytes.
const SMALL_TABLE: u32 = 1024;
const TX: u32 = 3;
const PASS: u32 = 2;

fn setup(flow_table_size: u32) -> Bench {
    setup_family(flow_table_size, false)
}

/// The balancer with one listener on 1883 over eight backends: on the IPv4 VIP, or (`ipv6`) on
/// the IPv6 one.
fn setup_family(flow_table_size: u32, ipv6: bool) -> Bench {
    setup_with(flow_table_size, ipv6, None)
}

/// As [`setup_family`] with the backends forwarded by `forward` (`ipip` or `gue`) in another
/// subnet; the next hop's MAC as resolved.
fn setup_tunnel(forward: &str, ipv6: bool) -> Bench {
    setup_with(SMALL_TABLE, ipv6, Some(forward))
}

fn setup_with(flow_table_size: u32, ipv6: bool, forward: Option<&str>) -> Bench {
    let vip = if ipv6 { VIP6.to_string() } else { VIP.to_string() };
    let tunnel =
        if forward.is_some() { "tunnel_source = \"203.0.113.2\"\ntunnel_source6 = \"2001:db8:f::2\"\ntunnel_mtu = 1500\n" } else { "" };
    let mut text = format!(
        "interface = \"bench0\"\nflow_table_size = {flow_table_size}\n{tunnel}[[listener]]\nname = \"mqtt\"\nvip = \"{vip}\"\nport = 1883\n"
    );
    for i in 1..=8 {
        let how = match forward {
            None => {
                format!("address = \"192.0.2.{}\"\naddress6 = \"2001:db8::{}\"\nmac = \"02:00:00:00:00:{:02x}\"", 10 + i, 10 + i, 0x10 + i)
            }
            Some(f) => format!("address = \"198.18.1.{}\"\naddress6 = \"2001:db8:b::{}\"\nforward = \"{f}\"", 10 + i, 10 + i),
        };
        let _ = write!(text, "[[backend]]\nname = \"b{i}\"\n{how}\n");
    }
    let cfg = config::parse(&text, "bench.toml").expect("bench config");
    // `--ordered`: the object for weakly ordered CPUs (on x86-64 its load-acquires and
    // store-releases are plain moves once JIT-compiled).
    let object = if std::env::args().any(|a| a == "--ordered") { Object::Ordered } else { Object::Plain };
    let mut dp = Dataplane::load(&LoadOptions { object, ..LoadOptions::new(cfg.ring_size, cfg.flow_table_size) })
        .expect("loading the XDP object (run as root)");
    let programs = TestPrograms::load([0x02, 0, 0, 0, 0, 0x11]).expect("loading the test object");
    let mut ids = Ids::default();
    ids.update(&cfg).expect("ids");
    let next_hop = Some([0x02, 0, 0, 0, 0, 0xfe]);
    let rt: BTreeMap<_, _> = cfg
        .backends
        .iter()
        .map(|b| {
            let rt = if forward.is_some() {
                BackendRuntime { mac: next_hop, mac6: next_hop, drained: false }
            } else {
                BackendRuntime { mac: b.mac, ..BackendRuntime::default() }
            };
            (b.name.clone(), rt)
        })
        .collect();
    dp.apply(&plan::desired(&cfg, &ids, &rt, &DownSet::new(), LB_MAC).expect("plan")).expect("apply");
    Bench { dp, test: programs, restore: RowRestore::None, decap: None }
}

/// Runs `prog` on `frame` `repeat` times: the action and this thread's CPU ns per run.
fn run(b: &Bench, prog: &str, frame: &[u8], repeat: u32) -> (u32, f64) {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..TestRunOptions::default() };
    let cpu0 = thread_cpu_ns();
    let r = b.program(prog).test_run(opts).expect("BPF_PROG_TEST_RUN");
    let cpu = thread_cpu_ns() - cpu0;
    (r.return_value, cpu as f64 / f64::from(repeat))
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What the counters moved by over a measurement.
#[derive(Default)]
struct Moved {
    tx: u64,
    new_flows: u64,
    pass: u64,
    icmp: u64,
    refused: u64,
}

fn moved(before: &Stats, after: &Stats) -> Moved {
    Moved {
        tx: after.verdict(reason::TX) - before.verdict(reason::TX),
        new_flows: after.total().new_flows - before.total().new_flows,
        pass: after.verdict(reason::PASS_NO_LISTENER) - before.verdict(reason::PASS_NO_LISTENER),
        icmp: after.verdict(reason::TX_ICMP_TOO_BIG) - before.verdict(reason::TX_ICMP_TOO_BIG),
        refused: after.table_event(table_event::REFUSED) - before.table_event(table_event::REFUSED),
    }
}

/// A measured path: median ns per packet, the floor measured next to it, the median of the
/// per-round ratios, the driver's cost taken off (0 without it), and what the counters moved by.
struct Measured {
    ns: f64,
    floor: f64,
    ratio: f64,
    driver: f64,
    moved: Moved,
}

/// `ROUNDS` rounds of: the floor, `repeat` runs of the floor on the established frame, then
/// (`driven`: the program is the driver) the driver in front of the floor, then `prog` on
/// `frame` `repeat` times (after `before`), each checked for `want`. Ratios are taken within a
/// round, so the machine's drift between rounds cancels out; the driver's cost in the round
/// (the driver in front of the floor, less the floor) is taken off the path's figure.
fn measure(b: &mut Bench, prog: &str, frame: &[u8], repeat: u32, want: u32, driven: bool, before: impl FnMut(&mut Bench)) -> Measured {
    measure_with(b, prog, frame, repeat, want, driven, false, before).0
}

/// A tunnel or decap row's figure net of the driver's undo of the last run (its unwrap or
/// rewrap), per round: medians of ns, of the ratio to the floor, and of the undo itself.
struct Net {
    ns: f64,
    ratio: f64,
    undo: f64,
}

/// [`measure`], and with `undo` (a driven row whose driver undoes the last run's change of
/// length) also, in each round, the driver in front of `xdp_bench_redo` (which redoes that
/// change with one `bpf_xdp_adjust_head` and nothing else) and the floor with a round trip of
/// the frame's start (what one `bpf_xdp_adjust_head` costs: less the floor, halved). The path
/// net of the undo is then, within the round, the path less the driver in front of the redo,
/// plus the floor and one `bpf_xdp_adjust_head`: the driver's own cost drops out, and pairing
/// the runs in a round keeps the machine's drift out of the difference.
#[expect(clippy::too_many_arguments, reason = "measure's, and the undo switch")]
fn measure_with(
    b: &mut Bench,
    prog: &str,
    frame: &[u8],
    repeat: u32,
    want: u32,
    driven: bool,
    undo: bool,
    mut before: impl FnMut(&mut Bench),
) -> (Measured, Option<Net>) {
    // The floor bounces a frame of the row's family (it reads nothing past the MACs).
    let floor_frame = if frame[12..14] == [0x86, 0xdd] {
        Ipv6Frame::tcp(CLIENT6, 40000, VIP6, 1883, TCP_ACK).build()
    } else {
        Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_ACK).build()
    };
    let (mut floors, mut nss, mut ratios, mut drivers) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut net_nss, mut net_ratios, mut undos) = (Vec::new(), Vec::new(), Vec::new());
    let mut moved_total = Moved::default();
    for _ in 0..ROUNDS {
        let (action, floor) = run(b, "xdp_floor", &floor_frame, REPEAT);
        assert_eq!(action, TX, "xdp_floor");
        let less = if driven {
            b.test.target(&b.dp, true).expect("driver");
            b.test.restore(Restore::None).expect("driver");
            let (action, d) = run(b, "xdp_bench_flows", &floor_frame, REPEAT);
            assert_eq!(action, TX, "the driver in front of the floor");
            b.aim();
            d - floor
        } else {
            0.0
        };
        // (Undone runs: the driver in front of the redo, and one adjust_head.)
        let undone = (driven && undo).then(|| {
            let (action, fa) = run(b, "xdp_floor_adjust", &floor_frame, REPEAT);
            assert_eq!(action, TX, "xdp_floor_adjust");
            b.test.target_redo().expect("driver");
            let (action, redo) = run(b, "xdp_bench_flows", frame, REPEAT);
            assert_eq!(action, TX, "the driver in front of the redo");
            b.aim();
            (redo, (fa - floor) / 2.0)
        });
        before(b);
        let s0 = b.dp.stats().expect("stats");
        let (action, ns) = run(b, prog, frame, repeat);
        assert_eq!(action, want, "{prog}: unexpected action");
        let m = moved(&s0, &b.dp.stats().expect("stats"));
        moved_total.tx += m.tx;
        moved_total.new_flows += m.new_flows;
        moved_total.pass += m.pass;
        moved_total.icmp += m.icmp;
        moved_total.refused += m.refused;
        if let Some((redo, adjust)) = undone {
            let net = ns - redo + floor + adjust;
            net_nss.push(net);
            net_ratios.push(net / floor);
            undos.push(ns - less - net);
        }
        floors.push(floor);
        drivers.push(less);
        nss.push(ns - less);
        ratios.push((ns - less) / floor);
    }
    let net = (!net_nss.is_empty()).then(|| Net { ns: median(net_nss), ratio: median(net_ratios), undo: median(undos) });
    (Measured { ns: median(nss), floor: median(floors), ratio: median(ratios), driver: median(drivers), moved: moved_total }, net)
}

fn runs(repeat: u32) -> u64 {
    u64::from(repeat) * ROUNDS as u64
}

/// The driver's frames: SYNs (new flows) or ACKs (established ones).
fn driver_frame(flags: u8) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, 40_000, VIP, 1883, flags).build()
}

/// As [`driver_frame`], IPv6.
fn driver_frame6(flags: u8) -> Vec<u8> {
    Ipv6Frame::tcp(CLIENT6, 40_000, VIP6, 1883, flags).build()
}

/// New flows through the driver; `empty` first empties the table before every call.
fn new_flows(b: &mut Bench, repeat: u32, empty: bool) -> (Measured, String) {
    new_flows_of(b, &driver_frame(TCP_SYN), repeat, empty)
}

fn new_flows_of(b: &mut Bench, syn: &[u8], repeat: u32, empty: bool) -> (Measured, String) {
    b.drive(0, 0, false);
    let m = measure(b, "xdp_bench_flows", syn, repeat, TX, true, |b| {
        if empty {
            b.dp.clear_flows();
        }
    });
    assert_eq!((m.moved.tx, m.moved.new_flows), (runs(repeat), runs(repeat)), "every run a forwarded new flow");
    let check = format!("tx +runs, new_flows +runs ({})", runs(repeat));
    (m, check)
}

/// ICMP "fragmentation needed" quoting the busy flow's broker-to-client segment: found in the
/// table (the cache serves only segments), forwarded, nothing written.
fn icmp_row(dp: &mut Bench) -> Row {
    let mut answer = Ipv4Frame::tcp(VIP, 1883, CLIENT, 40000, TCP_ACK);
    answer.payload = vec![0; 1400];
    let too_big = Ipv4Frame::frag_needed(Ipv4Addr::new(198, 51, 100, 254), &answer, 1280, 8).build();
    dp.drive(0, 0, true);
    let m = measure(dp, "xdp_bench_flows", &too_big, REPEAT, TX, true, |_| {});
    assert_eq!((m.moved.icmp, m.moved.tx, m.moved.new_flows), (runs(REPEAT), 0, 0), "every run an ICMP error forwarded by its flow");
    Row { path: "ICMP frag-needed, flow in the table".into(), m, check: "tx/icmp_too_big +runs, tx +0, new_flows +0".into() }
}

/// A flow-cache hit through each tunnel (IPIP and GUE, both families): the balancer wraps the
/// frame; the driver strips the last run's outer headers before each run (a helper call that
/// the figure includes: an upper bound of the wrap's cost).
fn tunnel_rows(rows: &mut Vec<Row>) {
    for (forward, ipv6, over, name) in
        [("ipip", false, 20, "IPIP"), ("gue", false, 28, "GUE"), ("ipip", true, 40, "IPv6 in IPv6"), ("gue", true, 48, "GUE over IPv6")]
    {
        let mut b = setup_tunnel(forward, ipv6);
        let (syn, ack) =
            if ipv6 { (driver_frame6(TCP_SYN), driver_frame6(TCP_ACK)) } else { (driver_frame(TCP_SYN), driver_frame(TCP_ACK)) };
        let once = |b: &Bench, frame: &[u8]| {
            let mut out = vec![0u8; frame.len() + 256];
            let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..TestRunOptions::default() };
            let r = b.dp.balancer().test_run(opts).expect("BPF_PROG_TEST_RUN");
            (r.return_value, r.data_size_out as usize)
        };
        assert_eq!(once(&b, &syn), (TX, syn.len() + over as usize), "{name}: the SYN comes out wrapped");
        b.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
        assert_eq!(once(&b, &ack), (TX, ack.len() + over as usize), "{name}: the ACK comes out wrapped");
        b.restore = RowRestore::Unwrap(over);
        b.drive(0, 0, true);
        let (m, net) = measure_with(&mut b, "xdp_bench_flows", &ack, REPEAT, TX, true, true, Bench::aim);
        assert_eq!((m.moved.tx, m.moved.new_flows), (runs(REPEAT), 0), "{name}: every run an established flow, wrapped");
        let cached = if ipv6 {
            b.dp.cached_flow_within(CLIENT6, 40000, VIP6, 1883, 1)
        } else {
            b.dp.cached_flow_within(CLIENT, 40000, VIP, 1883, 1)
        };
        assert!(!cached.expect("flow cache").is_empty(), "{name}: the runs left no flow-cache entry");
        rows.push(Row {
            path: format!("{name} established, flow cache hit (one flow)"),
            check: format!("tx +runs, new_flows +0; includes the driver's unwrap, {}", net_of_undo(net)),
            m,
        });
    }
}

/// A tunnel or decap row's figure net of the driver's undo ([`measure_with`]): ns and ratio
/// to the floor.
fn net_of_undo(net: Option<Net>) -> String {
    let net = net.expect("measured with the undo");
    format!("net of it ({:.1} ns): {:.1} ns, {:.2}x", net.undo, net.ns, net.ratio)
}

/// The flow-cache hit with `dsrlb trace` on (issue 25, part 3): every frame traced (`sample`
/// 1), or one in 1,000, while one client (a thread on the other CPU) reads the events as
/// `dsrlb trace` does. The events read and lost are checked after the runs.
fn trace_rows(rows: &mut Vec<Row>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut b = setup(SMALL_TABLE);
    let established = Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_ACK).build();
    run(&b, "dsrlb", &Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_SYN).build(), 1);
    b.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    run(&b, "dsrlb", &established, 1);
    b.drive(0, 0, true);
    let mut tracer = b.dp.take_tracer().expect("the tracer");
    for sample in [1u32, 1000] {
        let hour = 3_600_000_000_000;
        tracer
            .set(lb_common::TraceConf {
                until_ns: lb_userspace::dataplane::clock::monotonic_ns() + hour,
                sample,
                listener: lb_common::TRACE_NONE,
            })
            .expect("switching tracing on");
        let lost0 = tracer.lost();
        let (stop, read) = (AtomicBool::new(false), AtomicU64::new(0));
        let (stop, read) = (&stop, &read);
        let (m, back) = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                pin_to_cpu(0);
                let mut events = Vec::with_capacity(4096);
                // A bounded loop: the measurement lasts seconds; this ends within 10 minutes
                // whatever happens.
                let deadline = std::time::Instant::now() + std::time::Duration::from_mins(10);
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    events.clear();
                    tracer.drain(&mut events, 4096);
                    read.fetch_add(events.len() as u64, Ordering::Relaxed);
                    if events.is_empty() {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
                tracer
            });
            let m = measure(&mut b, "xdp_bench_flows", &established, REPEAT, TX, true, |_| {});
            stop.store(true, Ordering::Relaxed);
            (m, reader.join().expect("the trace reader"))
        });
        tracer = back;
        let (read, lost) = (read.load(Ordering::Relaxed), tracer.lost() - lost0);
        assert_eq!((m.moved.tx, m.moved.new_flows), (runs(REPEAT), 0), "every run an established flow");
        assert!(read > 0, "the client read no event");
        rows.push(Row {
            path: format!("established, flow cache hit, tracing (sample {sample}), one client reading"),
            m,
            check: format!("tx +runs; events read {read}, lost to a full buffer {lost}"),
        });
        tracer.set(lb_common::TraceConf::OFF).expect("switching tracing off");
    }
}

/// The brokers' decap program on an IPIP frame for a VIP it holds: the driver puts the outer
/// header back before each run (included in the figure: an upper bound).
fn decap_row(rows: &mut Vec<Row>) {
    use lb_userspace::decap::{Loaded, Settings};
    let mut d = Loaded::load().expect("loading dsrlb-decap");
    // As `dsrlb decap attach` sets it up by default: the VIP, and the balancer as the one source
    // allowed (both checked for every frame).
    let settings = Settings {
        vips: [std::net::IpAddr::V4(VIP)].into(),
        sources: Some([std::net::IpAddr::V4(tests::tunnel::LB)].into()),
        gue_port: lb_common::DECAP_GUE_PORT,
    };
    d.maps.write(&settings).expect("decap settings");
    let inner = Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_ACK).datagram();
    let mut frame = tests::tunnel::eth(LB_MAC, [0x02, 0, 0, 0, 0, 0xfe], 0x0800);
    frame.extend(tests::tunnel::ipv4(tests::tunnel::LB, tests::tunnel::BROKER, 4, 0x4000, &inner));
    let mut b = setup(SMALL_TABLE);
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), repeat: 1, ..TestRunOptions::default() };
    let action = d.program().test_run(opts).expect("BPF_PROG_TEST_RUN").return_value;
    assert_eq!(action, PASS, "decap passes the unwrapped frame");
    b.restore = RowRestore::Rewrap(frame[..34].to_vec());
    b.decap = Some(d);
    b.drive(0, 0, true);
    let before = b.decap.as_ref().expect("decap").maps.counters().expect("decap counters")["decapsulated"];
    let (m, net) = measure_with(&mut b, "xdp_bench_flows", &frame, REPEAT, PASS, true, true, Bench::aim);
    let after = b.decap.as_ref().expect("decap").maps.counters().expect("decap counters")["decapsulated"];
    assert_eq!(after - before, runs(REPEAT), "every run decapsulated");
    rows.push(Row {
        path: "decap (broker), IPIP frame for a held VIP".into(),
        check: format!("decapsulated +runs; includes the driver's rewrap, {}", net_of_undo(net)),
        m,
    });
}

/// Established flows through the driver, cycling over `flows` of them (recorded first).
fn established_flows(b: &mut Bench, flows: u32) -> (Measured, String) {
    established_flows_of(b, &driver_frame(TCP_SYN), &driver_frame(TCP_ACK), flows)
}

fn established_flows_of(b: &mut Bench, syn: &[u8], ack: &[u8], flows: u32) -> (Measured, String) {
    b.drive(0, 0, false);
    let (action, _) = run(b, "xdp_bench_flows", syn, flows);
    assert_eq!(action, TX);
    // Each flow's segment a keepalive later confirms it (what a held session's flow is).
    b.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    b.drive(0, flows, false);
    let (action, _) = run(b, "xdp_bench_flows", ack, flows);
    assert_eq!(action, TX);
    let m = measure(b, "xdp_bench_flows", ack, REPEAT, TX, true, |_| {});
    assert_eq!(m.moved.tx, runs(REPEAT), "every run forwarded");
    // The table keeps all but about two in a million flows at this load; a lost one is
    // recorded again, once, as a new flow.
    assert!(m.moved.new_flows <= u64::from(flows) / 10_000, "{} of {} runs missed the table", m.moved.new_flows, runs(REPEAT));
    let check = format!("tx +runs, new_flows +{} of {}", m.moved.new_flows, runs(REPEAT));
    (m, check)
}

/// ns per dependent load over `bytes` of memory in 4 KB pages (as the kernel's map memory is),
/// one cache line per step in a random cycle.
fn pointer_chase(bytes: usize) -> f64 {
    const LINE: usize = 64;
    let lines = bytes / LINE;
    let words = LINE / 8;
    let mut mem: Vec<usize> = vec![0; lines * words];
    // SAFETY: advice on memory this function owns.
    unsafe { libc::madvise(mem.as_mut_ptr().cast(), mem.len() * 8, libc::MADV_NOHUGEPAGE) };
    // A random cyclic order of the lines (Sattolo's shuffle with a fixed xorshift).
    let mut order: Vec<usize> = (0..lines).collect();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        #[expect(clippy::cast_possible_truncation, reason = "an index below `i`")]
        let j = (x % i as u64) as usize;
        order.swap(i, j);
    }
    for w in order.windows(2) {
        mem[w[0] * words] = w[1] * words;
    }
    mem[order[lines - 1] * words] = order[0] * words;
    let steps = 4_000_000;
    let mut at = 0;
    let cpu0 = thread_cpu_ns();
    for _ in 0..steps {
        at = mem[at];
    }
    let ns = (thread_cpu_ns() - cpu0) as f64 / f64::from(steps);
    std::hint::black_box(at);
    ns
}

struct Row {
    path: String,
    m: Measured,
    check: String,
}

/// Keeps this thread on one CPU: `BPF_PROG_TEST_RUN` runs on the caller's CPU, and a move
/// between calls would start a call with another CPU's cold caches.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set), 0, "pinning to CPU {cpu}");
    }
}

/// Runs the driver over `dsrlb` `runs` times on `frame`, from tuple `start` of the sequence.
fn drive(b: &mut Bench, frame: &[u8], start: u32, wrap: u32, runs: u32) {
    b.drive(start, wrap, false);
    let (action, _) = run(b, "xdp_bench_flows", frame, runs);
    assert_eq!(action, TX, "driving {runs} runs");
}

/// The IPv6 rows: one busy flow served by the flow cache, and new flows in a full table in
/// cache, on a listener at the IPv6 VIP.
fn ipv6_rows(rows: &mut Vec<Row>, small_kb: u32) {
    let mut six = setup_family(SMALL_TABLE, true);
    let established6 = driver_frame6(TCP_ACK);
    run(&six, "dsrlb", &driver_frame6(TCP_SYN), 1);
    six.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    run(&six, "dsrlb", &established6, 1);
    six.drive(0, 0, true);
    let m = measure(&mut six, "xdp_bench_flows", &established6, REPEAT, TX, true, |_| {});
    assert_eq!((m.moved.tx, m.moved.new_flows), (runs(REPEAT), 0), "every run an established IPv6 flow");
    assert!(!six.dp.cached_flow_within(CLIENT6, 40000, VIP6, 1883, 1).expect("flow cache").is_empty(), "the runs left no flow-cache entry");
    rows.push(Row { path: "IPv6 established, flow cache hit (one flow)".into(), m, check: "tx +runs, new_flows +0, flow cached".into() });
    let (m, check) = new_flows_of(&mut setup_family(SMALL_TABLE, true), &driver_frame6(TCP_SYN), REPEAT, false);
    rows.push(Row { path: format!("IPv6 new flow, table in cache, full ({SMALL_TABLE} flows, {small_kb} KB)"), m, check });
}

/// Rounds of (one CPU, every CPU) for a multi-core row.
const MC_ROUNDS: usize = 5;

/// A multi-core row: packets per second on one CPU and on every CPU at once (each CPU its own
/// thread pinned to it, its own `BPF_PROG_TEST_RUN` loop), medians over the rounds, and the
/// median of the per-round ratios.
struct McRow {
    path: String,
    one_mpps: f64,
    all_mpps: f64,
    ratio: f64,
    check: String,
}

/// Runs the driver over `frames[i]` on CPU `i`, every CPU at once, `repeat` runs each; the
/// aggregate million packets per second (runs over the slowest CPU's wall time) and the
/// balancer's counters moved.
fn parallel(b: &Bench, frames: &[Vec<u8>], repeat: u32) -> (f64, Moved) {
    let prog = b.program("xdp_bench_flows");
    let s0 = b.dp.stats().expect("stats");
    let barrier = std::sync::Barrier::new(frames.len());
    let walls: Vec<f64> = std::thread::scope(|s| {
        let threads: Vec<_> = frames
            .iter()
            .enumerate()
            .map(|(cpu, frame)| {
                let barrier = &barrier;
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    barrier.wait();
                    let mut out = vec![0u8; frame.len() + 256];
                    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..TestRunOptions::default() };
                    let t = std::time::Instant::now();
                    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
                    assert_eq!(r.return_value, TX, "CPU {cpu}: the driver's runs must be forwarded");
                    t.elapsed().as_secs_f64()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a benchmark thread")).collect()
    });
    let slowest = walls.iter().copied().fold(0.0, f64::max);
    (frames.len() as f64 * f64::from(repeat) / slowest / 1e6, moved(&s0, &b.dp.stats().expect("stats")))
}

/// One multi-core row: `MC_ROUNDS` rounds of one CPU (`frames[0]` on CPU 0) then every CPU;
/// `before` runs before each measurement (the driver set up again, say); `check` verifies the
/// counters of each and describes them.
fn mc_row(
    b: &mut Bench,
    path: &str,
    frames: &[Vec<u8>],
    mut before: impl FnMut(&mut Bench),
    check: impl Fn(&Moved, u64) -> String,
) -> McRow {
    let (mut ones, mut alls, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut said = String::new();
    for _ in 0..MC_ROUNDS {
        before(b);
        let (one, m1) = parallel(b, &frames[..1], REPEAT);
        said = check(&m1, u64::from(REPEAT));
        before(b);
        let (all, m) = parallel(b, frames, REPEAT);
        said = format!("{said}; all CPUs: {}", check(&m, u64::from(REPEAT) * frames.len() as u64));
        ones.push(one);
        alls.push(all);
        ratios.push(all / one);
    }
    McRow { path: path.into(), one_mpps: median(ones), all_mpps: median(alls), ratio: median(ratios), check: said }
}

/// The multi-core rows: established flows (one per CPU, and one shared by every CPU), new flows
/// into one shared table (a sequence per CPU), and SYNs under the flood guard.
fn multicore_rows() -> Vec<McRow> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).expect("counting CPUs");
    let mut rows = Vec::new();
    // Established: each CPU's flow recorded and confirmed, then run again and again.
    let mut b = setup(SMALL_TABLE);
    let acks: Vec<Vec<u8>> =
        (0..cpus).map(|i| Ipv4Frame::tcp(CLIENT, 40_000 + 2 * u16::try_from(i).expect("few"), VIP, 1883, TCP_ACK).build()).collect();
    for ack in &acks {
        let mut syn = ack.clone();
        syn[47] = TCP_SYN;
        run(&b, "dsrlb", &syn, 1);
    }
    b.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    for ack in &acks {
        assert_eq!(run(&b, "dsrlb", ack, 1).0, TX);
    }
    b.drive(0, 0, true);
    let established = |m: &Moved, runs: u64| {
        assert_eq!((m.tx, m.new_flows), (runs, 0), "every run an established flow");
        format!("tx +{runs}, new_flows +0")
    };
    rows.push(mc_row(&mut b, "established, flow cache hit, a flow per CPU", &acks, |_| {}, established));
    let same = vec![acks[0].clone(); cpus];
    rows.push(mc_row(&mut b, "established, flow cache hit, the same flow on every CPU", &same, |_| {}, established));

    // New flows into one shared table, full of unconfirmed flows after the first runs: CPU i
    // stamps tuples from i × 2^28 on, each measurement 2^22 further (more than its runs), so
    // every run's tuple is new.
    let bases: Vec<u32> = (0..u32::try_from(cpus).expect("few")).map(|i| i << 28).collect();
    let fresh = |bases: &[u32], k: &mut u32| -> Vec<u32> {
        *k += 1;
        bases.iter().map(|b| b + (*k << 22)).collect()
    };
    let mut k = 0;
    let mut b = setup(SMALL_TABLE);
    let syns = vec![driver_frame(TCP_SYN); cpus];
    let new_flows = |m: &Moved, runs: u64| {
        assert_eq!((m.tx, m.new_flows), (runs, runs), "every run a new flow");
        format!("tx +{runs}, new_flows +{runs}")
    };
    rows.push(mc_row(
        &mut b,
        &format!("new flows, one shared table ({SMALL_TABLE} flows, full), a sequence per CPU"),
        &syns,
        |b| b.test.drive_per_cpu(&b.dp, &fresh(&bases, &mut k), 0).expect("per-CPU driver"),
        new_flows,
    ));

    // The same into the default table (1M flows), emptied before each measurement: two CPUs
    // rarely write the same bucket, so what is left is what they share besides the buckets.
    let mut big = setup(DEFAULT_FLOW_TABLE_SIZE);
    let mut k = 0;
    rows.push(mc_row(
        &mut big,
        "new flows, the default table (1M flows, emptied per measurement), a sequence per CPU",
        &syns,
        |b| {
            b.dp.clear_flows();
            b.test.drive_per_cpu(&b.dp, &fresh(&bases, &mut k), 0).expect("per-CPU driver");
        },
        new_flows,
    ));

    // SYNs under the flood guard: every slot a confirmed flow, each SYN refused.
    let (mut guarded, slots, seq) = guarded_table();
    let guard_bases: Vec<u32> = bases.iter().map(|b| b + seq).collect();
    let mut k = 0;
    rows.push(mc_row(
        &mut guarded,
        &format!("new SYNs under the flood guard ({SMALL_TABLE} flows, all confirmed), a sequence per CPU"),
        &syns,
        |b| b.test.drive_per_cpu(&b.dp, &fresh(&guard_bases, &mut k), 0).expect("per-CPU driver"),
        |m, runs| {
            assert_eq!((m.tx, m.refused), (runs, runs), "every run a refused new flow");
            format!("tx +{runs}, refused +{runs}")
        },
    ));
    assert_eq!(guarded.dp.flows().iter().filter(|f| f.confirmed()).count(), slots as usize, "a confirmed flow was displaced");
    rows
}

/// The small table with every slot a confirmed flow (SYNs of a sequence of `seq` tuples, then
/// an ACK of each flow the table kept, a keepalive later); its slots and `seq`.
fn guarded_table() -> (Bench, u32, u32) {
    let mut guarded = setup(SMALL_TABLE);
    let slots = flow_table_buckets(SMALL_TABLE) * 4;
    let seq = 4 * slots;
    drive(&mut guarded, &driver_frame(TCP_SYN), 0, seq, seq);
    guarded.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    for f in guarded.dp.flows() {
        let (src, sport) = (Ipv4Addr::from(u32::from_be(f.key.src_be)), u16::from_be(f.key.sport_be));
        assert_eq!(run(&guarded, "dsrlb", &Ipv4Frame::tcp(src, sport, VIP, 1883, TCP_ACK).build(), 1).0, TX);
    }
    let confirmed = guarded.dp.flows().iter().filter(|f| f.confirmed()).count();
    assert_eq!(confirmed, slots as usize, "the table is not full of confirmed flows");
    (guarded, slots, seq)
}

fn print_mc_rows(rows: &[McRow]) {
    println!("{:<82} {:>9} {:>9} {:>6}  checked after the runs", "every CPU at once", "1 CPU", "all", "ratio");
    for r in rows {
        println!("{:<82} {:>7.2}M {:>7.2}M {:>5.2}x  {}", r.path, r.one_mpps, r.all_mpps, r.ratio, r.check);
    }
}

fn print_rows(rows: &[Row]) {
    for r in rows {
        println!("{:<58} {:>8.1} {:>7.1} {:>6.2}x {:>6.1}  {}", r.path, r.m.ns, r.m.floor, r.m.ratio, r.m.driver, r.check);
    }
}

/// The flags `main` knows; anything else is refused rather than starting a full run.
const FLAGS: [&str; 7] = ["--json", "--quick", "--ordered", "--trace", "--multicore", "--tunnels", "--large"];

fn main() {
    if let Some(bad) = std::env::args().skip(1).find(|a| !FLAGS.contains(&a.as_str())) {
        eprintln!("xdp_bench: unknown argument {bad}; it takes {}", FLAGS.join(", "));
        std::process::exit(2);
    }
    let json = std::env::args().any(|a| a == "--json");
    // Every row but the tables of many flows (the new-flow row in a small table excepted) and
    // the flood guard: for quick comparisons.
    let quick = std::env::args().any(|a| a == "--quick");
    pin_to_cpu(1);
    let mut dp = setup(SMALL_TABLE);
    let established = Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_ACK).build();
    let pass = Ipv4Frame::tcp(CLIENT, 40000, VIP, 80, TCP_SYN).build();
    let mut rows = Vec::new();

    // One busy flow: recorded and confirmed (by a segment a keepalive after its SYN), then
    // served by this CPU's flow cache run after run (the driver only addresses each run to the
    // balancer again).
    run(&dp, "dsrlb", &Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, TCP_SYN).build(), 1);
    dp.dp.flow_table().rewind(FLOW_CONFIRM_UNITS, |_| true);
    run(&dp, "dsrlb", &established, 1);
    assert!(dp.dp.flow(CLIENT, 40000, VIP, 1883).is_some_and(|f| f.confirmed()), "the busy flow is not confirmed");
    dp.drive(0, 0, true);
    let m = measure(&mut dp, "xdp_bench_flows", &established, REPEAT, TX, true, |_| {});
    assert_eq!((m.moved.tx, m.moved.new_flows), (runs(REPEAT), 0), "every run an established flow");
    assert!(!dp.dp.cached_flow_within(CLIENT, 40000, VIP, 1883, 1).expect("flow cache").is_empty(), "the runs left no flow-cache entry");
    rows.push(Row { path: "established, flow cache hit (one flow)".into(), m, check: "tx +runs, new_flows +0, flow cached".into() });
    let m = measure(&mut dp, "dsrlb", &pass, REPEAT, PASS, false, |_| {});
    assert_eq!(m.moved.pass, runs(REPEAT), "every run passed, no listener");
    rows.push(Row { path: "pass, no listener on the port".into(), m, check: "pass/no_listener +runs".into() });
    rows.push(icmp_row(&mut dp));

    let small_kb = flow_table_buckets(SMALL_TABLE) * 64 / 1024;
    if std::env::args().any(|a| a == "--trace") {
        // Only the tracing rows, beside the plain flow-cache hit.
        trace_rows(&mut rows);
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--multicore") {
        // Only the multi-core rows.
        print_mc_rows(&multicore_rows());
        return;
    }
    if std::env::args().any(|a| a == "--tunnels") {
        // Only the tunnel and decap rows (for profiling them).
        let adjust = adjust_cost(&mut dp, &established);
        tunnel_rows(&mut rows);
        decap_row(&mut rows);
        println!("one bpf_xdp_adjust_head: {adjust:.1} ns");
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--large") {
        // Only the default table's rows, beside one cold access (issue 25, part 2).
        large_rows(&mut rows);
        let (l2, dram) = (pointer_chase(256 << 10), pointer_chase(32 << 20));
        print_rows(&rows);
        println!("memory, one dependent load per step in 4 KB pages: 256 KB {l2:.1} ns, 32 MB {dram:.1} ns");
        return;
    }
    ipv6_rows(&mut rows, small_kb);
    let adjust = adjust_cost(&mut dp, &established);
    tunnel_rows(&mut rows);
    decap_row(&mut rows);
    trace_rows(&mut rows);
    if quick {
        let (m, check) = new_flows(&mut setup(SMALL_TABLE), REPEAT, false);
        rows.push(Row { path: format!("new flow, table in cache, full ({SMALL_TABLE} flows, {small_kb} KB)"), m, check });
        print_rows(&rows);
        return;
    }
    let (m, check) = established_flows(&mut dp, SMALL_TABLE);
    rows.push(Row { path: format!("established, flow table hit ({SMALL_TABLE} flows, {small_kb} KB)"), m, check });
    let (m, check) =
        established_flows_of(&mut setup_family(SMALL_TABLE, true), &driver_frame6(TCP_SYN), &driver_frame6(TCP_ACK), SMALL_TABLE);
    rows.push(Row { path: format!("IPv6 established, flow table hit ({SMALL_TABLE} flows, {small_kb} KB)"), m, check });
    // Every slot holds an unconfirmed flow after the first few thousand runs (a SYN flood's
    // state): each new flow replaces the least recently used of its eight, the dearest way in.
    let (m, check) = new_flows(&mut setup(SMALL_TABLE), REPEAT, false);
    rows.push(Row { path: format!("new flow, table in cache, full ({SMALL_TABLE} flows, {small_kb} KB)"), m, check });
    // Every slot holds a confirmed flow (SYN, then ACKs until each slot's flow confirmed): a
    // flood's SYNs are refused by the flood guard and forwarded by the ring, recording nothing.
    let (mut guarded, slots, seq) = guarded_table();
    guarded.drive(seq, 0, false);
    let m = measure(&mut guarded, "xdp_bench_flows", &driver_frame(TCP_SYN), REPEAT, TX, true, |_| {});
    assert_eq!(
        (m.moved.tx, m.moved.new_flows, m.moved.refused),
        (runs(REPEAT), runs(REPEAT), runs(REPEAT)),
        "every run a refused new flow"
    );
    assert_eq!(guarded.dp.flows().iter().filter(|f| f.confirmed()).count(), slots as usize, "a confirmed flow was displaced");
    rows.push(Row {
        path: format!("new SYN under the flood guard ({SMALL_TABLE} flows, all confirmed)"),
        m,
        check: "tx +runs, new_flows +runs, refused +runs, table unchanged".into(),
    });
    large_rows(&mut rows);
    let verified = dp.program("dsrlb").info().ok().and_then(|i| i.verified_instruction_count()).unwrap_or(0);
    let (l2, dram) = (pointer_chase(256 << 10), pointer_chase(32 << 20));

    let mc = multicore_rows();
    report(&rows, &mc, json, verified, (l2, dram), adjust);
}

/// What one `bpf_xdp_adjust_head` costs: the floor with a round trip of the frame's start, less
/// the floor, halved.
fn adjust_cost(b: &mut Bench, frame: &[u8]) -> f64 {
    let m = measure(b, "xdp_floor_adjust", frame, REPEAT, TX, false, |_| {});
    ((m.ns - m.floor) / 2.0).max(0.0)
}

/// The default table's rows: new flows into it, and established flows that miss the flow cache.
fn large_rows(rows: &mut Vec<Row>) {
    // Emptied before each call of 1M new flows: as full as it is sized for at the end, with
    // room throughout.
    let mut big = setup(DEFAULT_FLOW_TABLE_SIZE);
    let (m, check) = new_flows(&mut big, DEFAULT_FLOW_TABLE_SIZE, true);
    rows.push(Row {
        path: "new flow, default table with room (1M flows, 32 MB)".into(),
        m,
        check: format!("{check}, table emptied per call"),
    });
    big.dp.clear_flows();
    let (m, check) = established_flows(&mut big, DEFAULT_FLOW_TABLE_SIZE);
    rows.push(Row { path: "established, flow table hit (1M flows, 32 MB)".into(), m, check });
}

/// Prints the rows and the figures beside them, as text or (`json`) one JSON object.
fn report(rows: &[Row], mc: &[McRow], json: bool, verified: u32, (l2, dram): (f64, f64), adjust: f64) {
    if json {
        let mc_items: Vec<String> = mc
            .iter()
            .map(|r| {
                format!(
                    "{{\"path\":\"{}\",\"one_mpps\":{:.2},\"all_mpps\":{:.2},\"ratio\":{:.2},\"check\":\"{}\"}}",
                    r.path, r.one_mpps, r.all_mpps, r.ratio, r.check
                )
            })
            .collect();
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"path\":\"{}\",\"ns\":{:.1},\"floor_ns\":{:.1},\"ratio\":{:.2},\"driver_ns\":{:.1},\"check\":\"{}\"}}",
                    r.path, r.m.ns, r.m.floor, r.m.ratio, r.m.driver, r.check
                )
            })
            .collect();
        println!(
            "{{\"rows\":[{}],\"multicore\":[{}],\"verified_insns\":{verified},\"chase_256k_ns\":{l2:.1},\"chase_32m_ns\":{dram:.1},\"adjust_head_ns\":{adjust:.1}}}",
            items.join(","),
            mc_items.join(",")
        );
        return;
    }
    println!("XDP data plane, BPF_PROG_TEST_RUN with repeat: {ROUNDS} rounds of (floor, path); medians; thread CPU time");
    println!("{:<58} {:>8} {:>7} {:>7} {:>6}  checked after the runs", "path", "ns/pkt", "floor", "ratio", "driver");
    print_rows(rows);
    println!("driver: xdp_bench_flows in front of the floor, less the floor, in each round, taken off that round's figure");
    println!("verifier: {verified} instructions processed for dsrlb");
    println!("one bpf_xdp_adjust_head: {adjust:.1} ns; the tunnel and decap rows include the driver's undo of the last run,");
    println!("         and say what they cost net of it: in each round, less the driver in front of xdp_bench_redo, plus the floor");
    println!("         and one adjust_head (both measured in that round)");
    println!("memory, one dependent load per step in 4 KB pages: 256 KB {l2:.1} ns, 32 MB {dram:.1} ns");
    println!("targets: established <= 2x floor (flow cache hit), new flow <= 4x floor (table in cache); IPv6 <= 2.5x and <= 4.5x");
    println!("         IPIP and GUE established <= 2.5x floor; decap <= 1.5x floor (each row gives both figures)");
    println!("         tracing: <= 3x floor with sample 1; within noise of the plain flow-cache hit with sample 1000");
    println!();
    print_mc_rows(mc);
    println!("multi-core: the driver's runs, wall time of the slowest CPU; targets >= 1.9x one CPU established, >= 1.8x new flows");
}
