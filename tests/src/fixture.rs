//! The packet-fixture harness: a balancer loaded from a config through the controller's own
//! planning code (`config` → `plan` → `Dataplane::apply`), frames pushed through it with
//! `BPF_PROG_TEST_RUN`, and the controller's view of where a tuple should go.
#![allow(clippy::must_use_candidate, clippy::missing_panics_doc, reason = "test helpers")]

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{flow_hash, ring_slot, source_hash};
use lb_userspace::{
    config::{self, Config},
    dataplane::{Dataplane, Desired, LoadOptions, Object, testing::TestPrograms},
    plan::{self, BackendRuntime, DownSet, Ids, Out},
};

use crate::{
    frame::{Ipv4Frame, LB_MAC, TCP_ACK, TCP_SYN},
    wait,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const RING: u32 = 65_537;

/// The MAC the fixtures give a tunnelled backend's next hop (the controller resolves it from the
/// route).
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

pub fn mac_of(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}

/// A balancer loaded with a config and its planning state, to change and re-apply.
pub struct Lb {
    pub dp: Dataplane,
    pub config: Config,
    pub ids: Ids,
    pub runtime: BTreeMap<String, BackendRuntime>,
    pub down: DownSet,
    pub desired: Desired,
    /// The balancer's own MAC: the source of forwarded frames, the destination it accepts.
    pub src_mac: [u8; 6],
    /// The test object: the benchmark driver runs the balancer on a tuple per run.
    pub test: TestPrograms,
}

impl Lb {
    /// `backends`: (name, last MAC byte, weight). One listener VIP:1883 over all of them, plus
    /// VIP:8883 with `hash = "source"`.
    pub fn new(backends: &[(&str, u8, u32)]) -> Self {
        Self::with_config(Self::config(backends))
    }

    pub fn with_config(config: Config) -> Self {
        Self::with_table(config, 65_536)
    }

    pub fn with_table(config: Config, flow_table_size: u32) -> Self {
        // The object the controller loads on this CPU (the ordered one on arm64); with
        // `DSRLB_TEST_OBJECT=ordered`, the object for weakly ordered CPUs on x86-64 too
        // (`cargo xtask test` runs the fixtures both ways).
        let object = if std::env::var("DSRLB_TEST_OBJECT").as_deref() == Ok("ordered") { Object::Ordered } else { Object::native() };
        let dp = Dataplane::load(&LoadOptions { object, ..LoadOptions::new(RING, flow_table_size) }).expect("loading the XDP object");
        let test = TestPrograms::load(mac_of(0x11)).expect("loading the test object");
        let mut lb = Self {
            dp,
            config,
            ids: Ids::default(),
            runtime: BTreeMap::new(),
            down: DownSet::new(),
            desired: Desired::default(),
            src_mac: LB_MAC,
            test,
        };
        lb.apply();
        lb
    }

    pub fn config(backends: &[(&str, u8, u32)]) -> Config {
        Self::parse(&Self::config_text(backends))
    }

    /// The text of [`Self::config`], for tests that add settings to it.
    pub fn config_text(backends: &[(&str, u8, u32)]) -> String {
        let mut text = format!(
            "interface = \"veth0\"\nring_size = {RING}\n\
             [[listener]]\nname = \"mqtt\"\nvip = \"{VIP}\"\nport = 1883\n\
             [[listener]]\nname = \"mqtts\"\nvip = \"{VIP}\"\nport = 8883\nhash = \"source\"\n"
        );
        for (name, n, w) in backends {
            let _ = write!(
                text,
                "[[backend]]\nname = \"{name}\"\naddress = \"192.0.2.{n}\"\nmac = \"{}\"\nweight = {w}\n",
                config::format_mac(mac_of(*n))
            );
        }
        text
    }

    pub fn parse(text: &str) -> Config {
        config::parse(text, "fixture.toml").expect("fixture config is valid")
    }

    /// Points the benchmark driver at the balancer, from the first tuple of its sequence, which
    /// starts again after `wrap` runs (0: never).
    pub fn bench_flows(&mut self, wrap: u32) {
        self.test.drive(&self.dp, false, 0, wrap, false).expect("setting up the driver");
    }

    /// Backend `name`'s MAC.
    pub fn mac(&self, name: &str) -> [u8; 6] {
        self.runtime[name].mac.expect("fixture MACs are set")
    }

    /// The name of the backend with id `id`.
    pub fn backend_name(&self, id: u32) -> String {
        self.ids.backends.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone()).expect("a known backend id")
    }

    /// Re-plans from `self.config`, `self.runtime` and `self.down` and applies.
    pub fn apply(&mut self) {
        self.ids.update(&self.config).expect("ids");
        for b in &self.config.backends {
            self.runtime.entry(b.name.clone()).or_insert(BackendRuntime {
                mac: Some(b.mac.unwrap_or(NEXT_HOP_MAC)),
                mac6: Some(NEXT_HOP_MAC),
                drained: false,
            });
        }
        self.runtime.retain(|name, _| self.config.backend(name).is_some());
        self.desired = plan::desired(&self.config, &self.ids, &self.runtime, &self.down, self.src_mac).expect("plan");
        self.dp.apply(&self.desired).expect("apply");
    }

    pub fn set_backends(&mut self, backends: &[(&str, u8, u32)]) {
        self.config = Self::config(backends);
        self.apply();
    }

    /// Marks `name` down (or up) on every listener, as failed checks would, its flows re-picked
    /// (`on_down = "reset"` after its grace).
    pub fn set_down(&mut self, name: &str, down: bool) {
        for l in &self.config.listeners {
            let pair = (l.name.clone(), name.to_owned());
            if down {
                self.down.insert(pair, Out { reset: true });
            } else {
                self.down.remove(&pair);
            }
        }
        self.apply();
    }

    /// Runs one frame; returns the action and the output frame.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() };
        let r = self.dp.balancer().test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Waits until the flow table's clock reads another unit than `age` (one unit is 1.07 s);
    /// the new reading.
    pub fn wait_clock_past(&self, age: u32) -> u32 {
        let now_age = || self.dp.now_age().expect("clock");
        wait::until_every("the flow table's clock to move on", Duration::from_secs(5), Duration::from_millis(1), || {
            Some(now_age()).filter(|&now| now != age)
        })
    }

    /// Waits for the flow table's clock to start a new unit: what follows runs well within one.
    pub fn fresh_clock_unit(&self) {
        self.wait_clock_past(self.dp.now_age().expect("clock"));
    }

    /// Lets `units` of the flow table's clock pass for every flow it holds (their ages move
    /// back): what a session's next segment needs to confirm its flow
    /// (`lb_common::FLOW_CONFIRM_UNITS`), or a close to be old.
    pub fn pass_time(&self, units: u32) {
        self.dp.flow_table().rewind(units, |_| true);
    }

    /// Lets `units` pass for the one flow `src:sport -> VIP:dport`.
    pub fn pass_time_for(&self, src: Ipv4Addr, sport: u16, dport: u16, units: u32) {
        let (key, _) = self.dp.flow_key(src, sport, VIP, dport);
        assert_eq!(self.dp.flow_table().rewind(units, |f| f.key == key), 1, "{src}:{sport} -> {VIP}:{dport} is not in the table");
    }

    /// A session as a client makes one: SYN, the handshake's ACK, and a segment a keepalive
    /// later, which confirms its flow (only this flow's clock moves). The last frame's action
    /// and output.
    pub fn session(&self, src: Ipv4Addr, sport: u16, dport: u16) -> (u32, Vec<u8>) {
        let frame = |flags| Ipv4Frame::tcp(src, sport, VIP, dport, flags).build();
        let (action, out) = self.run(&frame(TCP_SYN));
        if action != XDP_TX {
            return (action, out);
        }
        self.run(&frame(TCP_ACK));
        if self.dp.flow(src, sport, VIP, dport).is_some() {
            self.pass_time_for(src, sport, dport, lb_common::FLOW_CONFIRM_UNITS);
        }
        self.run(&frame(TCP_ACK))
    }

    /// The backend name whose MAC a forwarded frame carries.
    pub fn backend_of(&self, out: &[u8]) -> String {
        let dst: [u8; 6] = out[..6].try_into().expect("6 bytes");
        self.runtime.iter().find(|(_, rt)| rt.mac == Some(dst)).map_or_else(|| panic!("unknown dst MAC {dst:02x?}"), |(n, _)| n.clone())
    }

    /// What the ring of listener `index` says for this tuple (the controller's own view).
    pub fn ring_choice(&self, index: usize, src: Ipv4Addr, sport: u16, dport: u16) -> String {
        let l = &self.desired.listeners[index];
        let h = if l.hash_source {
            source_hash(u32::from_ne_bytes(src.octets()))
        } else {
            // Wire values as the program loads them into native integers.
            let wire16 = |v: u16| u16::from_ne_bytes(v.to_be_bytes());
            flow_hash(u32::from_ne_bytes(src.octets()), u32::from_ne_bytes(VIP.octets()), wire16(sport), wire16(dport))
        };
        let id = l.ring[ring_slot(h, RING) as usize];
        self.ids.backends.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone()).expect("ring names a known backend")
    }
}

/// What a fixture row's output frame must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Passed or dropped: the frame comes back as it went in.
    Unchanged,
    /// Forwarded: the input with its two MACs rewritten (a backend's, the balancer's as the
    /// source), to whichever backend the balancer picked.
    Dsr,
    /// Forwarded to this backend, with the DSR rewrite.
    DsrTo(String),
    /// Exactly these bytes, as Katran's fixtures carry the expected frame.
    Frame(Vec<u8>),
}

/// A fixture row, as Katran's are: what goes in, the verdict (the action, and the reason whose
/// counter must move, once), and what must come out. Rows are data; [`Lb::check_table`] runs
/// them.
#[derive(Clone, Debug)]
pub struct Case {
    pub what: String,
    pub input: Vec<u8>,
    pub action: u32,
    pub reason: u32,
    pub out: Expect,
    /// Built broken on purpose (a wrong version, no checksum): not checked to be what a wire
    /// would carry ([`crate::frame::check_wire`]) before it is run.
    pub malformed: bool,
}

impl Case {
    /// A row with `action` and `reason`; its output the DSR rewrite when forwarded, the input
    /// unchanged otherwise.
    pub fn new(what: impl Into<String>, input: Vec<u8>, action: u32, reason: u32) -> Self {
        let out = if action == XDP_TX { Expect::Dsr } else { Expect::Unchanged };
        Self { what: what.into(), input, action, reason, out, malformed: false }
    }

    /// Forwarded (counted as `reason::TX`) with the DSR rewrite.
    pub fn tx(what: impl Into<String>, input: Vec<u8>) -> Self {
        Self::new(what, input, XDP_TX, lb_common::reason::TX)
    }

    /// Passed to the kernel untouched, counted under `reason`.
    pub fn pass(what: impl Into<String>, input: Vec<u8>, reason: u32) -> Self {
        Self::new(what, input, XDP_PASS, reason)
    }

    /// Dropped, counted under `reason`.
    pub fn drop(what: impl Into<String>, input: Vec<u8>, reason: u32) -> Self {
        Self::new(what, input, XDP_DROP, reason)
    }

    /// Counted under `reason` instead (a forwarded ICMP error, say).
    #[must_use]
    pub fn counted(self, reason: u32) -> Self {
        Self { reason, ..self }
    }

    /// Forwarded to `backend`.
    #[must_use]
    pub fn to(self, backend: &str) -> Self {
        Self { out: Expect::DsrTo(backend.to_owned()), ..self }
    }

    /// Comes out as exactly `frame`.
    #[must_use]
    pub fn frame(self, frame: Vec<u8>) -> Self {
        Self { out: Expect::Frame(frame), ..self }
    }

    /// Built broken on purpose: no wire check.
    #[must_use]
    pub fn malformed(self) -> Self {
        Self { malformed: true, ..self }
    }
}

/// A program fixture rows run against: a frame in, an action and a frame out, and counters by
/// reason that each frame moves once. The balancer ([`Lb`]) and the brokers' decap program are.
pub trait UnderTest {
    /// Runs one frame through `BPF_PROG_TEST_RUN`.
    fn run_frame(&self, input: &[u8]) -> (u32, Vec<u8>);
    /// The counters, indexed by reason.
    fn counters(&self) -> Vec<u64>;
    /// The MAC of `backend`, or of the backend a forwarded frame `out` went to (for
    /// [`Expect::Dsr`] and [`Expect::DsrTo`]; a program without backends has none).
    fn backend_mac(&self, out: &[u8], backend: Option<&str>) -> [u8; 6] {
        let _ = (out, backend);
        panic!("this program forwards to no backend: expect a whole frame instead")
    }
}

impl UnderTest for Lb {
    fn run_frame(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run(input)
    }

    fn counters(&self) -> Vec<u64> {
        self.dp.stats().expect("stats").verdicts
    }

    fn backend_mac(&self, out: &[u8], backend: Option<&str>) -> [u8; 6] {
        self.mac(&backend.map_or_else(|| self.backend_of(out), str::to_owned))
    }
}

impl UnderTest for lb_userspace::decap::Loaded {
    fn run_frame(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() };
        let r = self.program().test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counters(&self) -> Vec<u64> {
        let by_name = self.maps.counters().expect("counters");
        lb_common::decap_reason::NAMES.iter().map(|n| by_name[*n]).collect()
    }
}

/// Runs one row against `p` and checks it: the input is what a wire would carry (unless the
/// row is malformed on purpose), the action, exactly the row's reason counter moving and by
/// one, and the output frame. Returns the output frame.
pub fn check_case(p: &impl UnderTest, case: &Case) -> Vec<u8> {
    let what = case.what.as_str();
    if !case.malformed {
        crate::frame::check_wire(&case.input, what);
    }
    let before = p.counters();
    let (action, out) = p.run_frame(&case.input);
    assert_eq!(action, case.action, "{what}: action");
    let after = p.counters();
    let moved: Vec<usize> = (0..after.len()).filter(|&i| after[i] != before[i]).collect();
    let why = case.reason as usize;
    assert_eq!(moved, vec![why], "{what}: exactly its reason counter moves ({before:?} -> {after:?})");
    assert_eq!(after[why] - before[why], 1, "{what}: counted once");
    match &case.out {
        Expect::Unchanged => assert_eq!(out, case.input, "{what}: passed or dropped frames are untouched"),
        Expect::Dsr => assert_dsr_rewrite(&case.input, &out, p.backend_mac(&out, None), what),
        Expect::DsrTo(backend) => assert_dsr_rewrite(&case.input, &out, p.backend_mac(&out, Some(backend)), what),
        Expect::Frame(want) => assert_frame_eq(&out, want, what),
    }
    out
}

/// Runs the rows in order ([`check_case`]), then checks that the counters moved by exactly the
/// table. Returns the output frames.
pub fn check_table(p: &impl UnderTest, cases: &[Case]) -> Vec<Vec<u8>> {
    let mut expected = p.counters();
    let outs = cases
        .iter()
        .map(|case| {
            expected[case.reason as usize] += 1;
            check_case(p, case)
        })
        .collect();
    assert_eq!(p.counters(), expected, "the counters add up to the table");
    outs
}

impl Lb {
    /// [`check_case`] against this balancer.
    pub fn check_case(&self, case: &Case) -> Vec<u8> {
        check_case(self, case)
    }

    /// [`check_table`] against this balancer.
    pub fn check_table(&self, cases: &[Case]) -> Vec<Vec<u8>> {
        check_table(self, cases)
    }

    /// Index of listener `name` in `self.desired.listeners` (for [`Self::ring_choice`]).
    pub fn listener_index(&self, name: &str) -> usize {
        let id = self.ids.listeners[name];
        self.desired.listeners.iter().position(|l| l.id == id).expect("the listener is planned")
    }

    /// The whole frame the balancer must send for a new TCP flow `f` to listener `listener`:
    /// `f` addressed to the backend the listener's ring names for it, from the balancer's MAC,
    /// nothing else changed.
    pub fn forwarded(&self, f: &Ipv4Frame, listener: &str) -> Vec<u8> {
        let crate::frame::L4::Tcp { sport, dport, .. } = f.l4 else { panic!("not a TCP frame: {f:?}") };
        let backend = self.ring_choice(self.listener_index(listener), f.src, sport, dport);
        Ipv4Frame { dst_mac: self.mac(&backend), src_mac: self.src_mac, ..f.clone() }.build()
    }
}

/// `got` must be `want`, byte for byte; the message says where they part.
pub fn assert_frame_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: the output frame differs from the expected one at byte {at} (lengths {} and {}):\n got  {got:02x?}\n want {want:02x?}",
            got.len(),
            want.len()
        );
    }
}

/// Live flows in the table, as `dsrlb status` counts them (no timeout can pass in a test).
pub fn live_flows(lb: &Lb) -> usize {
    lb.dp.flows_per_real(lb.dp.now_age().expect("clock"), |_| u32::MAX).values().sum()
}

/// Pins the calling thread to `cpu`: `BPF_PROG_TEST_RUN` runs the program on the caller's CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set), 0, "pinning to CPU {cpu}");
    }
}

/// The client tuple of run `n` of `xdp_bench_flows`.
pub fn bench_tuple(n: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(0x0b00_0000 + (n >> 14)), u16::try_from(1024 + 2 * (n & 0x3fff)).expect("below 2^15"))
}

/// Runs `xdp_bench_flows` over `dsrlb` `runs` times on one SYN: `runs` new flows
/// (`bench_tuple`; the driver's sequence goes on from where the last call left it).
pub fn new_flows(lb: &Lb, runs: u32) -> u32 {
    driver_runs(lb, TCP_SYN, runs)
}

/// Runs `xdp_bench_flows` over `dsrlb` `runs` times on a segment with TCP `flags`, each run
/// from the next tuple of the driver's sequence; the last run's action.
pub fn driver_runs(lb: &Lb, flags: u8, runs: u32) -> u32 {
    let frame = Ipv4Frame::tcp(CLIENT, 50000, VIP, 1883, flags).build();
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), repeat: runs, ..TestRunOptions::default() };
    lb.test.program("xdp_bench_flows").test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

pub fn syn(sport: u16) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, TCP_SYN).build()
}

/// The forwarded frame must equal the input but for the two MACs.
pub fn assert_dsr_rewrite(input: &[u8], out: &[u8], backend_mac: [u8; 6], what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length changed");
    assert_eq!(out[..6], backend_mac, "{what}: destination MAC");
    assert_eq!(out[6..12], LB_MAC, "{what}: source MAC must be the balancer's");
    assert_eq!(out[12..], input[12..], "{what}: bytes past the MACs changed");
}
