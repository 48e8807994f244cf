//! The data plane's rare events (aya-log, read into the controller's log with listener names):
//! each is made to happen through `BPF_PROG_TEST_RUN` and found among the logged records, at
//! most once per second for a kind that repeats.

use std::{net::Ipv4Addr, time::Duration};

use tests::{
    fixture::{Lb, VIP, XDP_DROP, XDP_TX, pin_to_cpu, syn},
    frame::{Ipv4Frame, TCP_ACK, TCP_SYN},
    require_root, wait,
};

/// The events logged so far that contain `text`.
fn logged(lb: &mut Lb, text: &str) -> usize {
    lb.dp.flush_events();
    lb.dp.recent_events().iter().filter(|e| e.contains(text)).count()
}

#[test]
fn storm_control_dropping_is_logged_once_a_second_with_the_listener_name() {
    require_root!();
    let text = Lb::config_text(&[("b1", 11, 100), ("b2", 12, 100)])
        .replace("port = 1883\n", "port = 1883\nmax_conn_rate = 1\nmax_conn_burst = 1\n");
    let mut lb = Lb::with_config(Lb::parse(&text));
    let dropped = (44000..44040).step_by(2).filter(|&p| lb.run(&syn(p)).0 == XDP_DROP).count();
    assert!(dropped >= 10, "only {dropped} SYNs dropped");
    let what = "storm control dropping SYNs of listener mqtt above its max_conn_rate";
    assert_eq!(logged(&mut lb, what), 1, "{dropped} drops within a second make one record: {:?}", lb.dp.recent_events());
}

#[test]
fn the_flood_guard_engaging_and_releasing_are_logged() {
    require_root!();
    // The guard's state is per CPU (so is the log's rate limit): stay on one.
    pin_to_cpu(0);
    // Two buckets, eight slots, all confirmed: a new flow is refused.
    let mut lb = Lb::with_table(Lb::config(&[("b1", 11, 100), ("b2", 12, 100)]), 4);
    let send = |lb: &Lb, a: Ipv4Addr, p: u16, flags: u8| lb.run(&Ipv4Frame::tcp(a, p, VIP, 1883, flags).build()).0;
    let held: Vec<Ipv4Addr> = (1..=8).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect();
    for &a in &held {
        assert_eq!(lb.session(a, 40000, 1883).0, XDP_TX);
    }
    assert_eq!(logged(&mut lb, "flood guard"), 0, "nothing refused yet");
    for i in 1..=20 {
        assert_eq!(send(&lb, Ipv4Addr::new(10, 3, 0, i), 40000, TCP_SYN), XDP_TX);
    }
    let engaged = "flood guard engaged: a new flow of listener mqtt found no flow in its buckets it may replace (confirmed flows, connections just opened)";
    assert_eq!(logged(&mut lb, engaged), 1, "twenty refusals, one record: {:?}", lb.dp.recent_events());
    // Sessions close and make room; new flows are recorded again. Released once a second has
    // passed without a refusal (new flows keep coming until then).
    for &a in &held {
        assert_eq!(send(&lb, a, 40000, TCP_ACK | 0x01), XDP_TX);
    }
    lb.pass_time(lb_common::FLOW_REOPEN_UNITS);
    let released = "flood guard released: new flows are recorded again";
    let mut port = 41000;
    wait::until_every("a release logged", Duration::from_secs(5), Duration::from_millis(50), || {
        if logged(&mut lb, released) > 0 {
            return Ok(());
        }
        assert_eq!(send(&lb, Ipv4Addr::new(10, 4, 0, 1), port, TCP_SYN), XDP_TX);
        port += 2;
        Err(format!("{:?}", lb.dp.recent_events()))
    });
    assert_eq!(logged(&mut lb, released), 1);
    assert_eq!(logged(&mut lb, engaged), 1);
}

#[test]
fn an_internal_drop_is_logged() {
    require_root!();
    let mut lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    // Every slot of the listener's ring names a real id outside REALS.
    let id = lb.ids.listeners["mqtt"];
    lb.dp.fill_ring(id, 9000).expect("ring");
    assert_eq!(lb.run(&syn(45000)).0, XDP_DROP);
    assert_eq!(logged(&mut lb, "internal drop: a map lookup that cannot fail did"), 1, "{:?}", lb.dp.recent_events());
}
