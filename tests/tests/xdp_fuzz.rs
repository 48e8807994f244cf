//! A property test of the XDP program through `BPF_PROG_TEST_RUN`: thousands of generated and
//! mutated frames (every kind the fixtures use, then bits flipped, bytes set, header fields set
//! to edge values, cut short, lengthened). Whatever comes in: the verdict is never ABORTED; a
//! frame that is not forwarded leaves byte for byte as it came; a forwarded one differs only in
//! its MACs (a backend's, then the balancer's); and every frame is counted exactly once.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::reason;
use tests::{
    XorShift as Rng,
    fixture::{CLIENT, Lb, VIP, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, mac_of},
    frame::{self, Ipv4Frame, L4, LB_MAC, TCP_ACK, TCP_SYN},
    require_root,
};

/// Frames generated per run (and mutated from the seeds below).
const FRAMES: usize = 6000;

/// The frames mutations start from: every kind the balancer tells apart.
fn seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for flags in [TCP_SYN, TCP_ACK, TCP_ACK | 0x01, 0x04, TCP_SYN | TCP_ACK] {
        v.push(Ipv4Frame::tcp(CLIENT, 40000, VIP, 1883, flags).build());
    }
    let mut tagged = Ipv4Frame::tcp(CLIENT, 40002, VIP, 1883, TCP_SYN);
    tagged.vlan = Some((0x8100, 7));
    tagged.ip_options = vec![0x01; 8];
    v.push(tagged.build());
    let mut frag = Ipv4Frame::tcp(CLIENT, 40004, VIP, 1883, TCP_SYN);
    frag.frag = 0x2000;
    v.push(frag.build());
    let mut udp = Ipv4Frame::tcp(CLIENT, 40006, VIP, 1883, 0);
    udp.l4 = L4::Udp { sport: 40006, dport: 1883 };
    v.push(udp.build());
    let mut echo = Ipv4Frame::tcp(CLIENT, 0, VIP, 0, 0);
    echo.l4 = L4::IcmpEcho;
    v.push(echo.build());
    let mut answer = Ipv4Frame::tcp(VIP, 1883, CLIENT, 40000, TCP_ACK);
    answer.payload = vec![0; 600];
    v.push(Ipv4Frame::frag_needed(Ipv4Addr::new(198, 51, 100, 254), &answer, 1280, 8).build());
    v.push(Ipv4Frame::frag_needed(Ipv4Addr::new(198, 51, 100, 254), &answer, 1280, 548).build());
    v.push(frame::arp_request(CLIENT, VIP));
    v.push(frame::Ipv6Frame::tcp("2001:db8::1".parse().expect("v6"), 40000, "2001:db8::100".parse().expect("v6"), 1883, TCP_SYN).build());
    let mut foreign = Ipv4Frame::tcp(CLIENT, 40008, VIP, 1883, TCP_SYN);
    foreign.dst_mac = mac_of(0x99);
    v.push(foreign.build());
    v
}

/// One mutation of `f`, in place.
fn mutate(f: &mut Vec<u8>, rng: &mut Rng) {
    // Offsets of the fields parsers trip over, in an untagged frame.
    const FIELDS: [usize; 12] = [12, 13, 14, 20, 21, 23, 34, 35, 36, 37, 46, 47];
    match rng.below(6) {
        0 => {
            let i = rng.below(f.len());
            f[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(f.len());
            f[i] = rng.byte();
        }
        2 => {
            let i = FIELDS[rng.below(FIELDS.len())];
            if i < f.len() {
                f[i] = [0x00, 0x01, 0x06, 0x11, 0x40, 0x45, 0x4f, 0x81, 0x86, 0xff][rng.below(10)];
            }
        }
        3 => f.truncate(14 + rng.below(f.len().saturating_sub(13).max(1))),
        4 => {
            let n = rng.below(64);
            f.extend((0..n).map(|_| rng.byte()));
        }
        _ => {
            // The destination MAC: ours, a backend's, broadcast.
            let mac = [LB_MAC, mac_of(11), [0xff; 6]][rng.below(3)];
            f[..6].copy_from_slice(&mac);
        }
    }
}

#[test]
fn any_frame_is_forwarded_intact_or_left_alone_and_counted_once() {
    require_root!();
    let lb = Lb::new(&[("b1", 11, 100), ("b2", 12, 100)]);
    let backends = [lb.mac("b1"), lb.mac("b2")];
    let seeds = seeds();
    // A flow for the ICMP seeds and the established ones to find.
    assert_eq!(lb.run(&seeds[0]).0, XDP_TX);
    let counted = |lb: &Lb| {
        let s = lb.dp.stats().expect("stats");
        let verdicts: u64 = (0..reason::COUNT).filter(|&r| r != reason::TX).map(|r| s.verdict(r)).sum();
        verdicts + s.total().packets
    };
    let before = counted(&lb);
    let seed = 0x5eed_d5b1_u64;
    let mut rng = Rng(seed);
    let (mut tx, mut pass, mut drop) = (0, 0, 0);
    let mut out = vec![0u8; 4096];
    for n in 0..FRAMES {
        let mut f = seeds[rng.below(seeds.len())].clone();
        for _ in 0..=rng.below(4) {
            mutate(&mut f, &mut rng);
        }
        let opts = TestRunOptions { data_in: Some(&f), data_out: Some(&mut out), ..TestRunOptions::default() };
        let r = lb.dp.balancer().test_run(opts).unwrap_or_else(|e| panic!("frame {n} (seed {seed:#x}): test_run: {e}: {f:02x?}"));
        let got = &out[..r.data_size_out as usize];
        match r.return_value {
            XDP_TX => {
                tx += 1;
                assert_eq!(got.len(), f.len(), "frame {n}: forwarded with another length: {f:02x?}");
                assert!(backends.iter().any(|m| got[..6] == *m), "frame {n}: forwarded to no backend's MAC: {got:02x?}");
                assert_eq!(got[6..12], LB_MAC, "frame {n}: forwarded without the balancer's MAC as source");
                assert_eq!(got[12..], f[12..], "frame {n}: forwarded with more than its MACs changed: {f:02x?}");
            }
            XDP_PASS | XDP_DROP => {
                if r.return_value == XDP_PASS {
                    pass += 1;
                } else {
                    drop += 1;
                }
                assert_eq!(got, &f[..], "frame {n}: passed or dropped, but changed");
            }
            XDP_ABORTED => panic!("frame {n} (seed {seed:#x}): ABORTED: {f:02x?}"),
            other => panic!("frame {n}: action {other}"),
        }
    }
    assert_eq!(counted(&lb) - before, FRAMES as u64, "frames were counted more or less than once");
    eprintln!("{FRAMES} frames: {tx} forwarded, {pass} passed, {drop} dropped");
    assert!(tx > 500 && pass > 500 && drop > 10, "the mutations did not reach every verdict: {tx} tx, {pass} pass, {drop} drop");
}
