//! A spoofed-source TCP flood for the lab: `count` frames (SYNs, or ACKs of made-up flows) to
//! VIP:port through an `AF_PACKET` socket, each from a random address of a source network and
//! a random port, with correct checksums (the brokers' kernels check them). Bounded in frames
//! and in time. Run it inside a lab namespace; the source network must exist nowhere (the
//! lab uses 198.18.0.0/15), so no answer can leave the lab.
//!
//! `flood IFACE DST_MAC VIP PORT SRC_NET/LEN syn|ack COUNT SECONDS` prints one JSON line:
//! frames sent, seconds, frames per second.

use std::{net::Ipv4Addr, time::Instant};

use lb_userspace::config::parse_mac;
use tests::frame::{Ipv4Frame, TCP_ACK, TCP_SYN, checksum};

/// Frames per `sendmmsg`.
const BATCH: usize = 64;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn usage() -> ! {
    eprintln!("usage: flood IFACE DST_MAC VIP PORT SRC_NET/LEN syn|ack COUNT SECONDS");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 8 {
        usage();
    }
    let iface = &args[0];
    let dst_mac = parse_mac(&args[1]).unwrap_or_else(|e| panic!("DST_MAC: {e}"));
    let vip: Ipv4Addr = args[2].parse().expect("VIP");
    let port: u16 = args[3].parse().expect("PORT");
    let (net, len) = args[4].split_once('/').unwrap_or_else(|| usage());
    let net = u32::from(net.parse::<Ipv4Addr>().expect("SRC_NET"));
    let len: u32 = len.parse().expect("SRC_NET length");
    assert!((8..=30).contains(&len), "SRC_NET length between 8 and 30");
    let flags = match args[5].as_str() {
        "syn" => TCP_SYN,
        "ack" => TCP_ACK,
        _ => usage(),
    };
    let count: u64 = args[6].parse().expect("COUNT");
    let seconds: f64 = args[7].parse().expect("SECONDS");

    // SAFETY: plain socket(2); the fd is closed at exit.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(iface.as_str()).expect("interface name");
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {iface}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are filled below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("small");
    addr.sll_ifindex = i32::try_from(ifindex).expect("index");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);

    let mut template = Ipv4Frame::tcp(Ipv4Addr::from(net), 40000, vip, port, flags);
    template.dst_mac = dst_mac;
    let template = template.build();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let host_mask = (1u32 << (32 - len)) - 1;
    let mut frames = vec![template.clone(); BATCH];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count && started.elapsed().as_secs_f64() < seconds {
        let n = usize::try_from((count - sent).min(BATCH as u64)).expect("small");
        for f in &mut frames[..n] {
            let r = rng.next();
            #[expect(clippy::cast_possible_truncation, reason = "random bits")]
            let src = (net & !host_mask) | (r as u32 & host_mask);
            f[26..30].copy_from_slice(&src.to_be_bytes());
            #[expect(clippy::cast_possible_truncation, reason = "random bits")]
            let sport = 1024 + ((r >> 32) as u16 % 60000);
            f[34..36].copy_from_slice(&sport.to_be_bytes());
            #[expect(clippy::cast_possible_truncation, reason = "random bits")]
            let seq = (r >> 16) as u32;
            f[38..42].copy_from_slice(&seq.to_be_bytes());
            if flags == TCP_ACK {
                f[42..46].copy_from_slice(&seq.rotate_left(7).to_be_bytes());
            }
            f[24..26].copy_from_slice(&[0, 0]);
            let ip_sum = checksum(&f[14..34], 0);
            f[24..26].copy_from_slice(&ip_sum.to_be_bytes());
            f[50..52].copy_from_slice(&[0, 0]);
            let mut pseudo = 0u32;
            for w in f[26..34].chunks(2) {
                pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
            pseudo += 6 + u32::try_from(f.len() - 34).expect("short");
            let tcp_sum = checksum(&f[34..], pseudo);
            f[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
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
    let secs = started.elapsed().as_secs_f64();
    println!("{{\"sent\":{sent},\"seconds\":{secs:.3},\"pps\":{:.0}}}", sent as f64 / secs);
}
