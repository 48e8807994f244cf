//! `dsrlb trace` in the data plane: with the switch off nothing is sent; on, each frame sends
//! one event naming its verdict, reason, listener, real and how the real was chosen (cache,
//! table, ring, re-pick of a down real, a reopened tuple, ICMP by its inner tuple), with the
//! frame's first bytes as they left; `--listener` and `--sample` are applied in the program, and
//! a full buffer counts what it lost. Through `BPF_PROG_TEST_RUN`.

use std::net::Ipv4Addr;

use lb_common::{TRACE_NONE, TRACE_SNAP, TraceConf, TraceEvent, real_backend, reason, trace_how};
use lb_userspace::{
    dataplane::trace::Tracer,
    trace::{self, monotonic_ns},
};
use tests::{
    fixture::{CLIENT, Lb, VIP, XDP_DROP, XDP_PASS, XDP_TX, syn},
    frame::{Ipv4Frame, TCP_ACK, TCP_FIN, TCP_SYN},
    require_root, wait,
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);

/// Tracing on, with a lease of a minute.
fn on(tracer: &mut Tracer, sample: u32, listener: u32) {
    tracer.set(TraceConf { until_ns: monotonic_ns() + 60_000_000_000, sample, listener }).expect("switching tracing on");
}

fn drained(tracer: &mut Tracer) -> Vec<TraceEvent> {
    let mut v = Vec::new();
    tracer.drain(&mut v, usize::MAX);
    v
}

fn seg(sport: u16, flags: u8) -> Vec<u8> {
    Ipv4Frame::tcp(CLIENT, sport, VIP, 1883, flags).build()
}

/// Sends `frame` and returns its one event.
fn traced(lb: &Lb, tracer: &mut Tracer, frame: &[u8]) -> (u32, Vec<u8>, TraceEvent) {
    let (action, out) = lb.run(frame);
    let mut events = drained(tracer);
    assert_eq!(events.len(), 1, "one event per frame");
    (action, out, events.remove(0))
}

#[test]
fn each_decision_is_traced_with_how_the_real_was_chosen() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)]).replace("port = 1883\n", "port = 1883\nall_down = \"drop\"\n");
    let mut lb = Lb::with_config(Lb::parse(&text));
    let mut tracer = lb.dp.take_tracer().expect("the tracer");
    let mqtt = lb.ids.listeners["mqtt"];

    // Off: frames send nothing.
    assert_eq!(lb.run(&syn(30000)).0, XDP_TX);
    assert!(drained(&mut tracer).is_empty(), "tracing is off until switched on");

    on(&mut tracer, 1, TRACE_NONE);
    let port = 30002;
    let (action, out, ev) = traced(&lb, &mut tracer, &seg(port, TCP_SYN));
    assert_eq!((action, ev.action, ev.reason, ev.how), (XDP_TX, XDP_TX, reason::TX, trace_how::RING));
    assert_eq!(ev.listener, mqtt);
    let backend = lb.backend_name(real_backend(ev.real));
    assert_eq!(backend, lb.backend_of(&out), "the traced real is the one the frame went to");
    assert_eq!(ev.len as usize, out.len());
    assert_eq!(ev.caplen as usize, out.len().min(TRACE_SNAP));
    assert_eq!(&ev.frame[..ev.caplen as usize], &out[..ev.caplen as usize], "the frame as it left, new MACs and all");
    // The handshake's ACK goes by the table; a segment a keepalive later confirms the flow
    // there; the next comes from this CPU's cache.
    let (_, _, ev) = traced(&lb, &mut tracer, &seg(port, TCP_ACK));
    assert_eq!((ev.how, lb.backend_name(real_backend(ev.real))), (trace_how::TABLE, backend.clone()));
    lb.pass_time_for(CLIENT, port, 1883, lb_common::FLOW_CONFIRM_UNITS);
    let (_, _, ev) = traced(&lb, &mut tracer, &seg(port, TCP_ACK));
    assert_eq!((ev.how, lb.backend_name(real_backend(ev.real))), (trace_how::TABLE, backend.clone()));
    let (_, _, ev) = traced(&lb, &mut tracer, &seg(port, TCP_ACK));
    assert_eq!((ev.how, lb.backend_name(real_backend(ev.real))), (trace_how::CACHE, backend.clone()));

    // An ICMP error about the flow goes by its inner tuple, to the flow's real.
    let mut answer = Ipv4Frame::tcp(VIP, 1883, CLIENT, port, TCP_ACK);
    answer.payload = vec![0x30; 1400];
    let (action, _, ev) = traced(&lb, &mut tracer, &Ipv4Frame::frag_needed(ROUTER, &answer, 1280, 8).build());
    assert_eq!((action, ev.reason, ev.how), (XDP_TX, reason::TX_ICMP_TOO_BIG, trace_how::ICMP_TABLE));
    assert_eq!(lb.backend_name(real_backend(ev.real)), backend);

    // Its real goes down: re-picked from the ring.
    lb.set_down(&backend, true);
    let (_, out, ev) = traced(&lb, &mut tracer, &seg(port, TCP_ACK));
    assert_eq!(ev.how, trace_how::REPICK);
    assert_ne!(lb.backend_of(&out), backend);
    lb.set_down(&backend, false);

    // A closed flow's tuple reused by a new SYN, a TIME_WAIT after the close.
    let fin_port = 30010;
    for flags in [TCP_SYN, TCP_ACK, TCP_ACK | TCP_FIN] {
        assert_eq!(traced(&lb, &mut tracer, &seg(fin_port, flags)).0, XDP_TX);
    }
    lb.pass_time_for(CLIENT, fin_port, 1883, lb_common::FLOW_REOPEN_UNITS);
    assert_eq!(traced(&lb, &mut tracer, &seg(fin_port, TCP_SYN)).2.how, trace_how::REOPENED);

    // Passed: no listener on the port, nothing chosen.
    let (action, _, ev) = traced(&lb, &mut tracer, &Ipv4Frame::tcp(CLIENT, 30020, VIP, 9999, TCP_SYN).build());
    assert_eq!((action, ev.action, ev.reason), (XDP_PASS, XDP_PASS, reason::PASS_NO_LISTENER));
    assert_eq!((ev.listener, ev.real, ev.how), (TRACE_NONE, TRACE_NONE, trace_how::NONE));

    // Dropped: every backend down; the listener is named.
    lb.set_down("b1", true);
    lb.set_down("b2", true);
    let (action, _, ev) = traced(&lb, &mut tracer, &seg(30030, TCP_SYN));
    assert_eq!((action, ev.reason, ev.listener, ev.real), (XDP_DROP, reason::DROP_NO_BACKEND, mqtt, TRACE_NONE));

    // The CLI's reading of the event: the tuple, the flags, the words.
    let names = trace::Names {
        listeners: lb.ids.listeners.iter().map(|(n, id)| (*id, n.clone())).collect(),
        backends: lb.ids.backends.iter().map(|(n, id)| (*id, n.clone())).collect(),
    };
    let e = trace::Event::from_raw(&ev, &trace::Clock::now());
    let headers = trace::decode(&e.bytes());
    assert_eq!(
        headers,
        trace::Headers::Tcp { src: (CLIENT, 30030).into(), dst: (VIP, 1883).into(), flags: TCP_SYN },
        "decoded from the traced bytes"
    );
    assert_eq!(trace::decision(&e, &names), "mqtt drop no_backend");

    // Off again: nothing more.
    tracer.set(TraceConf::OFF).expect("off");
    let _ = lb.run(&seg(30040, TCP_SYN));
    assert!(drained(&mut tracer).is_empty());

    // A lease nobody renews (its controller died) ends by itself.
    let until = monotonic_ns() + 200_000_000;
    tracer.set(TraceConf { until_ns: until, sample: 1, listener: TRACE_NONE }).expect("a short lease");
    let _ = lb.run(&seg(30042, TCP_SYN));
    assert_eq!(drained(&mut tracer).len(), 1, "traced within the lease");
    wait::until_every("the lease to run out", std::time::Duration::from_secs(1), std::time::Duration::from_millis(10), || {
        monotonic_ns() > until
    });
    let _ = lb.run(&seg(30044, TCP_SYN));
    assert!(drained(&mut tracer).is_empty(), "nothing traced once the lease ran out");
}

#[test]
fn the_listener_filter_and_sampling_are_applied_in_the_program_and_a_full_buffer_counts_its_losses() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let mut tracer = lb.dp.take_tracer().expect("the tracer");
    let tls = lb.ids.listeners["mqtts"];

    // Only listener `mqtts` (VIP:8883): frames to 1883 and unmatched frames are not sent.
    on(&mut tracer, 1, tls);
    for p in (31000..31040).step_by(2) {
        assert_eq!(lb.run(&seg(p, TCP_SYN)).0, XDP_TX);
        assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 8883, TCP_SYN).build()).0, XDP_TX);
        assert_eq!(lb.run(&Ipv4Frame::tcp(CLIENT, p, VIP, 9999, TCP_SYN).build()).0, XDP_PASS);
    }
    let events = drained(&mut tracer);
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| e.listener == tls));

    // One in 8, at random (gaps of 1 to 15 frames per CPU): 800 frames send about 100 (far
    // outside 40..=200 is a bug).
    on(&mut tracer, 8, TRACE_NONE);
    for p in 0..800u16 {
        let _ = lb.run(&Ipv4Frame::tcp(CLIENT, 40000 + p, VIP, 9999, TCP_ACK).build());
    }
    let n = drained(&mut tracer).len();
    assert!((40..=200).contains(&n), "{n} of 800 frames traced at 1/8");

    // Nobody reading: the 1 MiB buffer fills and the rest are counted as lost.
    on(&mut tracer, 1, TRACE_NONE);
    let before = tracer.lost();
    let per = size_of::<TraceEvent>() + 8;
    let fits = (1 << 20) / per;
    for p in 0..(fits + 500) {
        let port = u16::try_from(1024 + p % 60000).expect("a port");
        let _ = lb.run(&Ipv4Frame::tcp(CLIENT, port, VIP, 9999, TCP_ACK).build());
    }
    let lost = tracer.lost() - before;
    let kept = drained(&mut tracer).len();
    assert!(lost >= 400, "{lost} lost, {kept} kept of {} frames", fits + 500);
    assert_eq!(kept as u64 + lost, (fits + 500) as u64, "every frame is either in the buffer or counted lost");
}
