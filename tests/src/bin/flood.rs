//! A spoofed-source TCP flood for the lab: `count` frames to VIP:port through an `AF_PACKET`
//! socket, from random addresses of a source network and random ports, with correct checksums
//! (the brokers' kernels check them). Bounded in frames and in time. Run it inside a lab
//! namespace; the source network must exist nowhere (the lab uses 198.18.0.0/15 and a /64 of
//! 2001:db8:f::/48), or be the namespace's own addresses, so no answer can leave the lab.
//!
//! `flood IFACE DST_MAC VIP PORT SRC_NET/LEN KIND COUNT SECONDS [PPS]` prints one JSON line:
//! frames sent, seconds, frames per second. VIP and SRC_NET are both IPv4 or both IPv6; PPS,
//! when given, is the most frames a second it sends. KIND:
//! - `syn`, `ack`: one frame per made-up tuple (a SYN, or an ACK of a made-up flow);
//! - `syn-ack`, `ack-ack`: two frames per made-up tuple, back to back (a SYN then an ACK, or
//!   two ACKs): what a flood sends to make its flows look like ones whose handshake completed;
//! - `ack-ack-spaced`: an ACK to each of COUNT/2 made-up tuples, then, 3.3 s later (more than
//!   the flow table's two age units), an ACK to each again: flows that confirm mid-flow.

use std::{net::IpAddr, time::Instant};

use lb_userspace::config::parse_mac;
use tests::{
    XorShift as Rng,
    frame::{Ipv4Frame, Ipv6Frame, TCP_ACK, TCP_SYN, checksum},
};

/// Frames per `sendmmsg`.
const BATCH: usize = 64;

fn usage() -> ! {
    eprintln!("usage: flood IFACE DST_MAC VIP PORT SRC_NET/LEN syn|ack|syn-ack|ack-ack COUNT SECONDS [PPS]");
    std::process::exit(2)
}

/// Where a frame's fields are, by family.
struct Layout {
    /// The source address (4 or 16 bytes).
    src: std::ops::Range<usize>,
    /// The TCP header's start.
    tcp: usize,
    /// The IPv4 header (its checksum is at 10..12), or none.
    ip4: Option<std::ops::Range<usize>>,
    /// The pseudo-header's addresses (source and destination).
    addrs: std::ops::Range<usize>,
}

const V4: Layout = Layout { src: 26..30, tcp: 34, ip4: Some(14..34), addrs: 26..34 };
const V6: Layout = Layout { src: 22..38, tcp: 54, ip4: None, addrs: 22..54 };

/// A source network: the address's bits, and how many of them are fixed.
struct Net {
    addr: u128,
    len: u32,
    bits: u32,
}

impl Net {
    /// A random address of the network.
    fn pick(&self, rng: &mut Rng) -> u128 {
        let host = self.bits - self.len;
        let mask = if host == 128 { u128::MAX } else { (1u128 << host) - 1 };
        let r = u128::from(rng.next()) << 64 | u128::from(rng.next());
        (self.addr & !mask) | (r & mask)
    }
}

/// Writes the frame's tuple (source address, port, sequence numbers) and both checksums.
fn stamp(f: &mut [u8], l: &Layout, src: u128, bytes: usize, sport: u16, seq: u32, flags: u8) {
    f[l.src.clone()].copy_from_slice(&src.to_be_bytes()[16 - bytes..]);
    let t = l.tcp;
    f[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    let ack = if flags & TCP_ACK != 0 { seq.rotate_left(7) } else { 0 };
    f[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    f[t + 13] = flags;
    if let Some(ip) = &l.ip4 {
        f[ip.start + 10..ip.start + 12].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[ip.clone()], 0);
        f[ip.start + 10..ip.start + 12].copy_from_slice(&sum.to_be_bytes());
    }
    f[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let mut pseudo = 0u32;
    for w in f[l.addrs.clone()].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + u32::try_from(f.len() - t).expect("short");
    let sum = checksum(&f[t..], pseudo);
    f[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
}

/// An `AF_PACKET` socket and the address that sends its frames out of `iface` to `dst_mac`.
fn packet_socket(iface: &str, dst_mac: [u8; 6]) -> (i32, libc::sockaddr_ll) {
    // SAFETY: plain socket(2); the fd is closed at exit.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {iface}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are filled below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("small");
    addr.sll_ifindex = i32::try_from(ifindex).expect("index");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    (fd, addr)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 8 && args.len() != 9 {
        usage();
    }
    let iface = &args[0];
    let dst_mac = parse_mac(&args[1]).unwrap_or_else(|e| panic!("DST_MAC: {e}"));
    let vip: IpAddr = args[2].parse().expect("VIP");
    let port: u16 = args[3].parse().expect("PORT");
    let (net, len) = args[4].split_once('/').unwrap_or_else(|| usage());
    let net: IpAddr = net.parse().expect("SRC_NET");
    let len: u32 = len.parse().expect("SRC_NET length");
    let (flags, passes): (&[u8], u64) = match args[5].as_str() {
        "syn" => (&[TCP_SYN], 1),
        "ack" => (&[TCP_ACK], 1),
        "syn-ack" => (&[TCP_SYN, TCP_ACK], 1),
        "ack-ack" => (&[TCP_ACK, TCP_ACK], 1),
        "ack-ack-spaced" => (&[TCP_ACK], 2),
        _ => usage(),
    };
    let count: u64 = args[6].parse().expect("COUNT");
    let seconds: f64 = args[7].parse().expect("SECONDS");
    let pps: Option<f64> = args.get(8).map(|a| a.parse().expect("PPS"));

    let (template, layout, net, bytes) = match (vip, net) {
        (IpAddr::V4(vip), IpAddr::V4(net)) => {
            assert!((8..=30).contains(&len), "an IPv4 SRC_NET length between 8 and 30");
            let mut t = Ipv4Frame::tcp(net, 40000, vip, port, flags[0]);
            t.dst_mac = dst_mac;
            (t.build(), V4, Net { addr: u128::from(u32::from(net)), len, bits: 32 }, 4)
        }
        (IpAddr::V6(vip), IpAddr::V6(net)) => {
            assert!((48..=126).contains(&len), "an IPv6 SRC_NET length between 48 and 126");
            let mut t = Ipv6Frame::tcp(net, 40000, vip, port, flags[0]);
            t.dst_mac = dst_mac;
            (t.build(), V6, Net { addr: u128::from(net), len, bits: 128 }, 16)
        }
        _ => panic!("VIP and SRC_NET must be of one family"),
    };

    let (fd, mut addr) = packet_socket(iface, dst_mac);

    let seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut frames = vec![template; BATCH];
    let started = Instant::now();
    let mut sent = 0u64;
    for pass in 0..passes {
        if pass > 0 {
            std::thread::sleep(std::time::Duration::from_millis(3300));
        }
        // Every pass goes over the same tuples (a second pass's frames follow the first's in
        // sequence space).
        let mut rng = Rng(seed);
        let count = count * (pass + 1) / passes;
        let seq_step = u32::try_from(pass).expect("few");
        let (pass_started, pass_base) = (Instant::now(), sent);
        // The tuple of the frame being written, and which of its frames it is.
        let (mut src, mut sport, mut seq, mut nth) = (0u128, 0u16, 0u32, flags.len());
        while sent < count && started.elapsed().as_secs_f64() < seconds {
            if let Some(pps) = pps {
                // Ahead of the rate: wait until the frames sent are due.
                let due = std::time::Duration::from_secs_f64((sent - pass_base) as f64 / pps);
                if let Some(wait) = due.checked_sub(pass_started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let n = usize::try_from((count - sent).min(BATCH as u64)).expect("small");
            for f in &mut frames[..n] {
                if nth == flags.len() {
                    src = net.pick(&mut rng);
                    let r = rng.next();
                    #[expect(clippy::cast_possible_truncation, reason = "random bits")]
                    let (p, s) = (1024 + ((r >> 32) as u16 % 60000), (r >> 16) as u32);
                    (sport, seq, nth) = (p, s, 0);
                }
                // A second frame follows the first in sequence space, as a handshake's ACK does.
                stamp(f, &layout, src, bytes, sport, seq.wrapping_add(u32::from(nth > 0) + seq_step), flags[nth]);
                nth += 1;
            }
            let mut iov: Vec<libc::iovec> =
                frames[..n].iter_mut().map(|f| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: f.len() }).collect();
            // SAFETY: zeroed mmsghdrs pointing at live iovecs and `addr`, for the call below.
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = (&raw mut addr).cast();
                    m.msg_hdr.msg_namelen = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("small");
                    m.msg_hdr.msg_iov = v;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: `msgs` holds `n` valid headers.
            let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), u32::try_from(n).expect("small"), 0) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS) {
                    std::thread::yield_now();
                    continue;
                }
                panic!("sendmmsg: {e}");
            }
            sent += u64::try_from(rc).expect("non-negative");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{{\"sent\":{sent},\"seconds\":{secs:.3},\"pps\":{:.0}}}", sent as f64 / secs);
}
