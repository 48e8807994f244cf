//! `dsrlb trace`'s reading of an [`Event`]: the frame's headers decoded ([`decode`]), the
//! CLI's filters ([`Filters`]), and one line per frame like tcpdump's ([`line`]).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use lb_common::reason;

use super::event::Event;

/// What a frame's headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Headers {
    Tcp {
        src: SocketAddr,
        dst: SocketAddr,
        flags: u8,
    },
    /// An ICMP "too big" (or ICMPv6 packet too big) from `from`, about the segment `about`
    /// (as the broker sent it: VIP to client).
    TooBig {
        from: IpAddr,
        about: (SocketAddr, SocketAddr),
    },
    /// Any other IP packet: the protocol number.
    Ip {
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
    },
    /// Not IP: the EtherType.
    Other {
        ethertype: u16,
    },
    Truncated,
}

impl Headers {
    /// The client's address, as `--client` matches it.
    #[must_use]
    pub fn client(&self) -> Option<IpAddr> {
        match self {
            Self::Tcp { src, .. } => Some(src.ip()),
            Self::TooBig { about, .. } => Some(about.1.ip()),
            Self::Ip { src, .. } => Some(*src),
            Self::Other { .. } | Self::Truncated => None,
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn v4(b: &[u8], at: usize) -> Option<IpAddr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(IpAddr::from(o))
}

fn v6(b: &[u8], at: usize) -> Option<IpAddr> {
    let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(IpAddr::from(o))
}

/// The network header: its source, destination, protocol and where its payload starts.
fn network(b: &[u8], at: usize, ethertype: u16) -> Option<(IpAddr, IpAddr, u8, usize)> {
    match ethertype {
        0x0800 => {
            let ihl = usize::from(b.get(at)? & 0x0f) * 4;
            Some((v4(b, at + 12)?, v4(b, at + 16)?, *b.get(at + 9)?, at + ihl))
        }
        0x86dd => {
            let (src, dst) = (v6(b, at + 8)?, v6(b, at + 24)?);
            let (mut next, mut off) = (*b.get(at + 6)?, at + 40);
            // Hop-by-hop, routing, fragment and destination options, as the program follows them.
            for _ in 0..5 {
                match next {
                    0 | 43 | 60 => {
                        let len = (usize::from(*b.get(off + 1)?) + 1) * 8;
                        next = *b.get(off)?;
                        off += len;
                    }
                    44 => {
                        next = *b.get(off)?;
                        off += 8;
                    }
                    _ => break,
                }
            }
            Some((src, dst, next, off))
        }
        _ => None,
    }
}

/// Decodes an Ethernet frame's headers (one VLAN tag at most, as the program does).
#[must_use]
pub fn decode(b: &[u8]) -> Headers {
    let Some(mut ethertype) = be16(b, 12) else { return Headers::Truncated };
    let mut at = 14;
    if matches!(ethertype, 0x8100 | 0x88a8) {
        let Some(inner) = be16(b, 16) else { return Headers::Truncated };
        ethertype = inner;
        at = 18;
    }
    if !matches!(ethertype, 0x0800 | 0x86dd) {
        return Headers::Other { ethertype };
    }
    let Some((src, dst, proto, l4)) = network(b, at, ethertype) else { return Headers::Truncated };
    let ports = |at: usize| Some((be16(b, at)?, be16(b, at + 2)?));
    match proto {
        6 => match (ports(l4), b.get(l4 + 13)) {
            (Some((sp, dp)), Some(&flags)) => Headers::Tcp { src: SocketAddr::new(src, sp), dst: SocketAddr::new(dst, dp), flags },
            _ => Headers::Truncated,
        },
        // ICMP fragmentation needed (type 3 code 4), ICMPv6 packet too big (type 2).
        1 | 58 if matches!((proto, b.get(l4), b.get(l4 + 1)), (1, Some(3), Some(4)) | (58, Some(2), Some(_))) => {
            let inner = network(b, l4 + 8, ethertype).and_then(|(is, id, _, il4)| {
                let (sp, dp) = ports(il4)?;
                Some((SocketAddr::new(is, sp), SocketAddr::new(id, dp)))
            });
            inner.map_or(Headers::Truncated, |about| Headers::TooBig { from: src, about })
        }
        _ => Headers::Ip { src, dst, proto },
    }
}

/// TCP flags as tcpdump writes them: `S`, `F`, `R`, `P`, `U`, `E`, `W`, and `.` for ACK.
#[must_use]
pub fn tcp_flags(flags: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x20, 'U'), (0x40, 'E'), (0x80, 'W'), (0x10, '.')] {
        if flags & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() { "none".to_owned() } else { s }
}

/// Listener and real ids to names, as the controller gave them when the trace started.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub listeners: std::collections::BTreeMap<u32, String>,
    pub backends: std::collections::BTreeMap<u32, String>,
}

impl Names {
    #[must_use]
    pub fn listener(&self, id: Option<u32>) -> Option<String> {
        id.map(|id| self.listeners.get(&id).cloned().unwrap_or_else(|| format!("#{id}")))
    }

    /// The backend of real `id` (`lb_common::real_backend`).
    #[must_use]
    pub fn backend(&self, real: Option<u32>) -> Option<String> {
        real.map(|r| {
            let b = lb_common::real_backend(r);
            self.backends.get(&b).cloned().unwrap_or_else(|| format!("#{b}"))
        })
    }
}

/// An address prefix (`--client 192.0.2.0/24`, `2001:db8::/64`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a.parse().with_context(|| format!("--client {s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => bail!("--client {s:?}: prefix length {l:?} is not 0..={max}"),
            },
        };
        Ok(Self { addr, len })
    }
}

impl Cidr {
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let len = u32::from(self.len);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                a.to_bits() & mask == net.to_bits() & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                a.to_bits() & mask == net.to_bits() & mask
            }
            _ => false,
        }
    }
}

/// `--sample 1/N` (or `N`).
///
/// # Errors
/// When it is neither.
pub fn parse_sample(s: &str) -> anyhow::Result<u32> {
    let n = s.strip_prefix("1/").unwrap_or(s);
    match n.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => bail!("--sample {s:?}: give 1/N with N a whole number from 1 (every frame) up"),
    }
}

/// The filters the CLI applies (the program applies `--listener` and `--sample`).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub client: Option<Cidr>,
    pub backend: Option<String>,
    /// A verdict (`tx`, `pass`, `drop`) or a reason (`no_backend`, `not_our_mac`, ...).
    pub verdict: Option<String>,
}

/// Verdicts and reasons `--verdict` takes.
#[must_use]
pub fn verdict_words() -> Vec<&'static str> {
    let mut w = vec!["tx", "pass", "drop"];
    w.extend(reason::LABELS.iter().map(|(_, r)| *r));
    w
}

impl Filters {
    #[must_use]
    pub fn keep(&self, ev: &Event, headers: &Headers, names: &Names) -> bool {
        self.client.is_none_or(|c| headers.client().is_some_and(|ip| c.contains(ip)))
            && self.backend.as_ref().is_none_or(|b| names.backend(ev.real).as_ref() == Some(b))
            && self.verdict.as_ref().is_none_or(|v| *v == ev.verdict || *v == ev.reason)
    }
}

/// The decision in words: `mqtt -> b1 (ring) tx`, `mqtt drop no_backend`, `pass no_listener`.
#[must_use]
pub fn decision(ev: &Event, names: &Names) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(l) = names.listener(ev.listener) {
        s.push_str(&l);
        s.push(' ');
    }
    if let Some(b) = names.backend(ev.real) {
        let _ = write!(s, "-> {b} ({}) ", ev.how);
    }
    s.push_str(&ev.verdict);
    if ev.reason != "forwarded" {
        s.push(' ');
        s.push_str(&ev.reason);
    }
    s
}

/// What the controller masked, for the end of a line or comment: `; payload masked`.
pub(super) fn masked_note(ev: &Event) -> String {
    ev.masked.map_or_else(String::new, |m| format!("; {}", m.words()))
}

/// The interface name of `ifindex` on this host.
#[must_use]
pub fn interface_name(ifindex: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE bytes, as the call wants.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("if{ifindex}");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// One line per event, like tcpdump's: UTC time, CPU, interface, the headers, the decision.
#[must_use]
pub fn line(ev: &Event, headers: &Headers, names: &Names, interface: &str) -> String {
    let secs = ev.ts_ns / 1_000_000_000;
    let micros = ev.ts_ns % 1_000_000_000 / 1000;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let what = match headers {
        Headers::Tcp { src, dst, flags } => format!("{src} > {dst} [{}]", tcp_flags(*flags)),
        Headers::TooBig { from, about } => format!("{from} too big about {} > {}", about.0, about.1),
        Headers::Ip { src, dst, proto } => format!("{src} > {dst} proto {proto}"),
        Headers::Other { ethertype } => format!("ethertype 0x{ethertype:04x}"),
        Headers::Truncated => format!("truncated frame of {} bytes", ev.len),
    };
    format!("{h:02}:{m:02}:{s:02}.{micros:06} cpu{} {interface} {what} {}{}", ev.cpu, decision(ev, names), masked_note(ev))
}

#[cfg(test)]
mod tests {
    use lb_common::{TraceEvent, reason, trace_how};

    use super::*;
    use crate::dataplane::clock::Clock;

    #[test]
    fn cidr_matches_its_prefix_only() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(c.contains("192.0.2.77".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        assert!(!c.contains("2001:db8::1".parse().unwrap()));
        let c: Cidr = "2001:db8::/64".parse().unwrap();
        assert!(c.contains("2001:db8::50".parse().unwrap()));
        assert!(!c.contains("2001:db8:0:1::50".parse().unwrap()));
        let one: Cidr = "192.0.2.1".parse().unwrap();
        assert!(one.contains("192.0.2.1".parse().unwrap()) && !one.contains("192.0.2.2".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("198.51.100.1".parse().unwrap()));
        assert!("192.0.2.0/33".parse::<Cidr>().unwrap_err().to_string().contains("prefix length"));
        assert!("x/8".parse::<Cidr>().unwrap_err().to_string().contains("--client"));
    }

    #[test]
    fn sample_takes_one_in_n() {
        assert_eq!(parse_sample("1/100").unwrap(), 100);
        assert_eq!(parse_sample("7").unwrap(), 7);
        assert!(parse_sample("1/0").is_err() && parse_sample("2/3").is_err());
    }

    /// Ethernet, an 802.1Q tag, IPv4 and TCP: 198.51.100.7:40312 > 192.0.2.100:1883 [S].
    fn tagged_syn() -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x81, 0x00, 0x00, 0x0a, 0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend([198, 51, 100, 7, 192, 0, 2, 100]);
        f.extend(ip);
        let mut tcp = vec![0u8; 20];
        tcp[..2].copy_from_slice(&40312u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&1883u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x02;
        f.extend(tcp);
        f
    }

    #[test]
    fn a_traced_frame_reads_as_a_line() {
        let frame = tagged_syn();
        let headers = decode(&frame);
        assert_eq!(
            headers,
            Headers::Tcp { src: "198.51.100.7:40312".parse().unwrap(), dst: "192.0.2.100:1883".parse().unwrap(), flags: 0x02 }
        );
        assert_eq!(decode(&frame[..frame.len() - 7]), Headers::Truncated, "cut inside the TCP header");
        let mut raw = TraceEvent {
            ts_ns: 0,
            cpu: 1,
            ifindex: 1,
            len: u32::try_from(frame.len()).unwrap(),
            caplen: u32::try_from(frame.len()).unwrap(),
            action: 3,
            reason: reason::TX,
            listener: 0,
            real: lb_common::real_id(0, 1),
            how: trace_how::RING,
            pad: 0,
            frame: [0; lb_common::TRACE_SNAP],
        };
        raw.frame[..frame.len()].copy_from_slice(&frame);
        let mut ev = Event::from_raw(&raw, &Clock::unshifted());
        ev.ts_ns = 45_296_000_123_000; // 12:34:56.000123 on 1 January 1970
        assert_eq!(ev.bytes(), frame);
        let names = Names { listeners: [(0, "mqtt".to_owned())].into(), backends: [(1, "b2".to_owned())].into() };
        assert_eq!(
            line(&ev, &headers, &names, "eth0"),
            "12:34:56.000123 cpu1 eth0 198.51.100.7:40312 > 192.0.2.100:1883 [S] mqtt -> b2 (ring) tx"
        );
        let masked = Event { masked: Some(crate::redact::Masked::Connect), ..ev.clone() };
        assert!(line(&masked, &headers, &names, "eth0").ends_with(" tx; MQTT CONNECT masked after the client id"));
        let filters = |client: &str, backend: &str, verdict: &str| Filters {
            client: Some(client.parse().unwrap()),
            backend: Some(backend.to_owned()),
            verdict: Some(verdict.to_owned()),
        };
        assert!(filters("198.51.100.0/24", "b2", "tx").keep(&ev, &headers, &names));
        assert!(filters("198.51.100.0/24", "b2", "forwarded").keep(&ev, &headers, &names), "a reason matches too");
        assert!(!filters("203.0.113.0/24", "b2", "tx").keep(&ev, &headers, &names));
        assert!(!filters("198.51.100.0/24", "b1", "tx").keep(&ev, &headers, &names));
        assert!(!filters("198.51.100.0/24", "b2", "drop").keep(&ev, &headers, &names));
    }

    #[test]
    fn flags_read_like_tcpdump() {
        assert_eq!(tcp_flags(0x02), "S");
        assert_eq!(tcp_flags(0x12), "S.");
        assert_eq!(tcp_flags(0x18), "P.");
        assert_eq!(tcp_flags(0x11), "F.");
    }
}
