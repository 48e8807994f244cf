//! Masks MQTT CONNECT credentials in traced frames before they leave the controller: what
//! follows the client id (the will, the username, the password) and the values of an MQTT 5
//! CONNECT's user properties and authentication data are zeroed. A CONNECT that cannot be read
//! with confidence, and the later segments of one that does not fit its first, lose their whole
//! TCP payload instead.
//!
//! Only a CONNECT's first segment can be recognised (fixed header 0x10, the remaining length,
//! protocol name `MQTT` or `MQIsdp`, level, flags, keep alive, MQTT 5 properties, client id);
//! the segments that carry the rest of a longer one are recognised by their sequence numbers,
//! when the trace has seen that first segment (not when sampling or a full buffer left it out,
//! or the trace started after it).

use std::{collections::VecDeque, net::IpAddr, ops::Range};

use serde::{Deserialize, Serialize};

/// What was masked in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Masked {
    /// An MQTT CONNECT read up to its client id: everything after the client id, and the values
    /// of MQTT 5 user properties and authentication data, are zeroed.
    Connect,
    /// The whole TCP payload (or everything after the IP header of a fragment): something that
    /// starts like a CONNECT but cannot be read with confidence, the rest of a CONNECT that
    /// began in an earlier segment, or an IP fragment.
    Payload,
}

impl Masked {
    /// As the trace's lines and pcap comments say it.
    #[must_use]
    pub const fn words(self) -> &'static str {
        match self {
            Self::Connect => "MQTT CONNECT masked after the client id",
            Self::Payload => "payload masked",
        }
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// A TCP connection, one direction: source address and port, destination address and port.
type Flow = (IpAddr, u16, IpAddr, u16);

/// A TCP segment found in a frame.
struct Segment {
    flow: Flow,
    seq: u32,
    flags: u8,
    /// Where the payload starts in the frame and where its captured part ends.
    payload: Range<usize>,
    /// The first fragment of a fragmented segment: its payload's extent is unknown.
    fragment: bool,
}

/// What a frame holds, as far as masking goes.
enum Frame {
    /// Nothing a CONNECT could be in: not IP, not TCP, or no TCP payload captured.
    Other,
    /// From this offset on, bytes that cannot be told apart: a later IP fragment, or a header
    /// that does not read as one.
    Opaque(usize),
    Tcp(Segment),
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn be32(f: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?))
}

/// Finds the TCP segment of an Ethernet frame (VLAN tags, IPv4 with options, IPv6 with
/// extension headers).
fn read_frame(f: &[u8]) -> Frame {
    let Some(mut ethertype) = be16(f, 12) else { return Frame::Other };
    let mut at = 14;
    // More tags than the program reads, so that nothing behind a stack of them is missed.
    for _ in 0..4 {
        if !matches!(ethertype, 0x8100 | 0x88a8) {
            break;
        }
        let Some(inner) = be16(f, at + 2) else { return Frame::Other };
        ethertype = inner;
        at += 4;
    }
    match ethertype {
        0x0800 => ipv4(f, at),
        0x86dd => ipv6(f, at),
        _ => Frame::Other,
    }
}

fn ipv4(f: &[u8], at: usize) -> Frame {
    let (Some(&first), Some(total), Some(frag), Some(&proto)) = (f.get(at), be16(f, at + 2), be16(f, at + 6), f.get(at + 9)) else {
        return Frame::Other;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || usize::from(total) < ihl {
        return Frame::Opaque(at + 20);
    }
    if proto != 6 {
        return Frame::Other;
    }
    if frag & 0x1fff != 0 {
        return Frame::Opaque(at + ihl);
    }
    let (Some(src), Some(dst)) = (f.get(at + 12..at + 16), f.get(at + 16..at + 20)) else { return Frame::Other };
    let addr = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).expect("four bytes"));
    tcp(f, at + ihl, at + usize::from(total), frag & 0x2000 != 0, (addr(src), addr(dst)))
}

fn ipv6(f: &[u8], at: usize) -> Frame {
    let (Some(&first), Some(len), Some(&next)) = (f.get(at), be16(f, at + 4), f.get(at + 6)) else { return Frame::Other };
    if first >> 4 != 6 {
        return Frame::Opaque(at + 40);
    }
    let (Some(src), Some(dst)) = (f.get(at + 8..at + 24), f.get(at + 24..at + 40)) else { return Frame::Other };
    let addr = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
    let addrs = (addr(src), addr(dst));
    let end = at + 40 + usize::from(len);
    let (mut next, mut off, mut fragment) = (next, at + 40, false);
    for _ in 0..8 {
        match next {
            6 => return tcp(f, off, end, fragment, addrs),
            // Hop-by-hop, routing, destination options; the authentication header.
            0 | 43 | 60 | 51 => {
                let (Some(&n), Some(&l)) = (f.get(off), f.get(off + 1)) else { return Frame::Opaque(off) };
                next = n;
                off += if next == 51 { (usize::from(l) + 2) * 4 } else { (usize::from(l) + 1) * 8 };
            }
            44 => {
                let (Some(&n), Some(word)) = (f.get(off), be16(f, off + 2)) else { return Frame::Opaque(off) };
                next = n;
                off += 8;
                if word >> 3 != 0 {
                    return Frame::Opaque(off);
                }
                fragment |= word & 1 != 0;
            }
            // Extension headers not followed here (mobility, HIP, shim6, experiments).
            135 | 139 | 140 | 253 | 254 => return Frame::Opaque(off),
            _ => return Frame::Other,
        }
    }
    Frame::Opaque(off)
}

/// The TCP segment at `l4`, in an IP packet from `src` to `dst` that ends at `ip_end` on the
/// wire.
fn tcp(f: &[u8], l4: usize, ip_end: usize, fragment: bool, (src, dst): (IpAddr, IpAddr)) -> Frame {
    let (Some(sport), Some(dport), Some(seq), Some(&doff), Some(&flags)) =
        (be16(f, l4), be16(f, l4 + 2), be32(f, l4 + 4), f.get(l4 + 12), f.get(l4 + 13))
    else {
        return Frame::Other;
    };
    let start = l4 + usize::from(doff >> 4) * 4;
    if doff >> 4 < 5 || ip_end < start {
        return Frame::Opaque(l4 + 20);
    }
    let payload = start..f.len().min(ip_end).max(start);
    Frame::Tcp(Segment { flow: (src, sport, dst, dport), seq, flags, payload, fragment })
}

/// A CONNECT as far as masking needs it.
#[derive(Debug, PartialEq, Eq)]
enum Connect {
    /// Not a CONNECT (the first byte is not of packet type 1).
    Not,
    /// Starts like one, but does not read as one with confidence: its length when the
    /// remaining length could be read.
    Odd { total: Option<usize> },
    Read {
        /// The payload bytes to keep: up to the end of the client id.
        keep: usize,
        /// Property values to zero before that.
        zero: Vec<Range<usize>>,
        /// The CONNECT's length (fixed header and remaining length).
        total: usize,
    },
}

/// Reads fields of a packet whose known part ends at `end` (what is captured, and what the
/// remaining length says, whichever is less).
struct Cursor<'a> {
    p: &'a [u8],
    at: usize,
    end: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        let r = self.at..self.at.checked_add(n).filter(|&e| e <= self.end)?;
        self.at = r.end;
        Some(r)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|r| self.p[r.start])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|r| usize::from(u16::from_be_bytes([self.p[r.start], self.p[r.start + 1]])))
    }

    /// A length-prefixed string or binary: the range of its bytes.
    fn bytes(&mut self) -> Option<Range<usize>> {
        let n = self.u16()?;
        self.take(n)
    }

    /// A variable byte integer (at most four bytes).
    fn varint(&mut self) -> Option<usize> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.byte()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// Reads a CONNECT from the captured payload `p` (which starts with 0x10). Everything up to the client id's length must
/// be captured and inside the packet; the client id itself may run past the capture (then
/// nothing after it is captured).
fn connect(p: &[u8]) -> Connect {
    // Exactly 0x10: CONNECT's flags are 0, and TLS records (0x14 to 0x17) start like packet
    // type 1 with flags.
    match p.first() {
        Some(0x10) => read_connect(p).unwrap_or_else(|| {
            let mut c = Cursor { p, at: 1, end: p.len() };
            Connect::Odd { total: c.varint().map(|n| c.at + n) }
        }),
        _ => Connect::Not,
    }
}

fn read_connect(p: &[u8]) -> Option<Connect> {
    let mut c = Cursor { p, at: 1, end: p.len() };
    let remaining = c.varint()?;
    let total = c.at + remaining;
    c.end = c.end.min(total);
    let name = c.bytes()?;
    // The bridge bit (0x80) of mosquitto's bridges aside.
    let level = c.byte()? & 0x7f;
    match (&p[name], level) {
        (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
        _ => return None,
    }
    if c.byte()? & 0x01 != 0 {
        return None; // the reserved flag
    }
    c.take(2)?; // keep alive
    let mut zero = Vec::new();
    if level == 5 {
        let len = c.varint()?;
        let end = c.at.checked_add(len).filter(|&e| e <= c.end)?;
        let outer = std::mem::replace(&mut c.end, end);
        while c.at < end {
            // CONNECT's properties, and no other.
            match c.byte()? {
                // Session expiry, maximum packet size.
                0x11 | 0x27 => {
                    c.take(4)?;
                }
                // Receive maximum, topic alias maximum.
                0x21 | 0x22 => {
                    c.take(2)?;
                }
                // Request problem / response information.
                0x17 | 0x19 => {
                    c.take(1)?;
                }
                // Authentication method: a name, kept.
                0x15 => {
                    c.bytes()?;
                }
                // Authentication data.
                0x16 => zero.push(c.bytes()?),
                // User property: a name and a value.
                0x26 => {
                    zero.push(c.bytes()?);
                    zero.push(c.bytes()?);
                }
                _ => return None,
            }
        }
        c.end = outer;
    }
    // The client id: its length must be captured; its bytes may be cut by the capture.
    let id_len = c.u16()?;
    let id_end = c.at + id_len;
    if id_end > total {
        return None;
    }
    Some(Connect::Read { keep: id_end.min(p.len()), zero, total })
}

/// A CONNECT seen: a later segment that starts inside it (the rest of a CONNECT longer than
/// its first segment, or part of one sent again) is masked whole.
struct Pending {
    flow: Flow,
    /// The sequence number of the CONNECT's first byte, and its length.
    start: u32,
    len: u32,
}

/// How many such CONNECTs a trace remembers (the oldest is forgotten first).
const MAX_PENDING: usize = 1024;

/// The longest MQTT packet: what is masked after a CONNECT-like segment too short to say its
/// length.
const MAX_PACKET: usize = 268_435_455 + 5;

/// Masks the frames of one trace, remembering what it needs across them.
#[derive(Default)]
pub struct Redactor {
    pending: VecDeque<Pending>,
}

fn zero(f: &mut [u8], r: Range<usize>) -> bool {
    let r = r.start.min(f.len())..r.end.min(f.len());
    let any = !r.is_empty();
    f[r].fill(0);
    any
}

impl Redactor {
    /// Masks what `frame` (a traced frame's captured bytes) must not show; says what it did
    /// (`None`: nothing, which includes a CONNECT with nothing after its client id captured).
    pub fn mask(&mut self, frame: &mut [u8]) -> Option<Masked> {
        match read_frame(frame) {
            Frame::Other => None,
            Frame::Opaque(from) => zero(frame, from..frame.len()).then_some(Masked::Payload),
            Frame::Tcp(seg) => self.segment(frame, &seg),
        }
    }

    fn segment(&mut self, frame: &mut [u8], seg: &Segment) -> Option<Masked> {
        if let Some(i) = self.pending.iter().position(|p| p.flow == seg.flow) {
            let p = &self.pending[i];
            let into = seg.seq.wrapping_sub(p.start);
            // A segment that starts where the CONNECT does is read again, below.
            let within = into > 0 && into < p.len;
            // Over: the connection closes or starts again, or a segment starts past the CONNECT
            // (one that starts before it, a retransmission, leaves it pending).
            if seg.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || (into >= p.len && into < 1 << 31) {
                self.pending.remove(i);
            }
            if within && zero(frame, seg.payload.clone()) {
                return Some(Masked::Payload);
            }
        }
        if seg.payload.is_empty() {
            return None;
        }
        if seg.fragment {
            zero(frame, seg.payload.clone());
            return Some(Masked::Payload);
        }
        let payload = seg.payload.clone();
        let (masked, total) = match connect(&frame[payload.clone()]) {
            Connect::Not => return None,
            Connect::Odd { total } => {
                zero(frame, payload);
                (Some(Masked::Payload), total.unwrap_or(MAX_PACKET))
            }
            Connect::Read { keep, zero: values, total } => {
                let mut any = zero(frame, payload.start + keep..payload.end);
                for r in values {
                    any |= zero(frame, payload.start + r.start..payload.start + r.end);
                }
                (any.then_some(Masked::Connect), total)
            }
        };
        self.pending.retain(|p| p.flow != seg.flow);
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Pending { flow: seg.flow, start: seg.seq, len: u32::try_from(total).unwrap_or(u32::MAX) });
        masked
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The bytes a trace captures of a frame.
    const SNAP: usize = lb_common::TRACE_SNAP;

    /// Ethernet, IPv4 and TCP (with `opts` bytes of options) from 198.51.100.7:40312 to
    /// 192.0.2.100:1883, sequence number `seq`, carrying `payload`; cut to the trace's snap.
    fn v4(payload: &[u8], seq: u32, opts: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        let total = u16::try_from(20 + 20 + opts + payload.len()).unwrap();
        f.extend([0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 51, 100, 7, 192, 0, 2, 100]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend(tcp(seq, opts));
        f.extend(payload);
        f.truncate(SNAP);
        f
    }

    /// The same over IPv6 with a VLAN tag: 2001:db8::7 to 2001:db8::100.
    fn v6(payload: &[u8], seq: u32, opts: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x81, 0x00, 0x00, 0x0a, 0x86, 0xdd]);
        let len = u16::try_from(20 + opts + payload.len()).unwrap();
        f.extend([0x60, 0, 0, 0]);
        f.extend(len.to_be_bytes());
        f.extend([6, 64]);
        f.extend("2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend("2001:db8::100".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend(tcp(seq, opts));
        f.extend(payload);
        f.truncate(SNAP);
        f
    }

    fn tcp(seq: u32, opts: usize) -> Vec<u8> {
        assert!(opts.is_multiple_of(4) && opts <= 40);
        let mut t = vec![0u8; 20 + opts];
        t[..2].copy_from_slice(&40312u16.to_be_bytes());
        t[2..4].copy_from_slice(&1883u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = u8::try_from((20 + opts) / 4).unwrap() << 4;
        t[13] = 0x18; // PSH ACK
        t
    }

    fn has(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Masks one frame with a fresh redactor.
    fn masked(mut f: Vec<u8>) -> (Vec<u8>, Option<Masked>) {
        let m = Redactor::default().mask(&mut f);
        (f, m)
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
        v.extend(s);
        v
    }

    fn varint(mut n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        loop {
            let b = u8::try_from(n % 128).unwrap();
            n /= 128;
            v.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                return v;
            }
        }
    }

    /// An MQTT 5 CONNECT with properties (session expiry, receive maximum, a user property,
    /// authentication method and data), a will with its properties, username and password.
    fn connect5(client_id: &str) -> Vec<u8> {
        let mut props = vec![0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 20];
        props.push(0x26);
        props.extend(string(b"zone"));
        props.extend(string(b"zone-secret"));
        props.push(0x15);
        props.extend(string(b"SCRAM"));
        props.push(0x16);
        props.extend(string(b"auth-sec"));
        let mut body = string(b"MQTT");
        body.extend([5, 0xc6, 0, 60]); // level 5; username, password, will, clean start
        body.extend(varint(props.len()));
        body.extend(props);
        body.extend(string(client_id.as_bytes()));
        body.extend([0]); // will properties: none
        body.extend(string(b"will/topic-secret"));
        body.extend(string(b"will-payload-secret"));
        body.extend(string(b"user-secret"));
        body.extend(string(b"pass-secret"));
        let mut p = vec![0x10];
        p.extend(varint(body.len()));
        p.extend(body);
        p
    }

    #[test]
    fn a_connect_keeps_its_client_id_and_loses_its_credentials() {
        let c = crate::mqtt::connect("sensor-17", 60, Some("alice"), Some("hunter2-secret")).expect("a CONNECT");
        for frame in [v4(&c, 1000, 12), v6(&c, 1000, 0)] {
            let start = frame.len() - c.len();
            let (out, m) = masked(frame.clone());
            assert_eq!(m, Some(Masked::Connect));
            assert!(!has(&out, b"alice") && !has(&out, b"hunter2"), "credentials left: {out:02x?}");
            let id_end = start + 2 + 10 + 2 + "sensor-17".len();
            assert_eq!(out[..id_end], frame[..id_end], "the headers, the CONNECT's header and its client id are kept");
            assert!(has(&out, b"sensor-17"));
            assert!(out[id_end..].iter().all(|&b| b == 0), "everything after the client id is zeroed");
            assert_eq!(out.len(), frame.len());
        }
        // MQTT 3.1 (MQIsdp, level 3) and a bridge's level (0x84).
        let mut v31 = vec![0x10, 0];
        v31.extend(string(b"MQIsdp"));
        v31.extend([3, 0xc2, 0, 60]);
        v31.extend(string(b"old"));
        v31.extend(string(b"bob"));
        v31.extend(string(b"old-secret"));
        v31[1] = u8::try_from(v31.len() - 2).unwrap();
        let (out, m) = masked(v4(&v31, 1, 0));
        assert_eq!(m, Some(Masked::Connect));
        assert!(has(&out, b"old") && !has(&out, b"bob") && !has(&out, b"old-secret"));
        let mut bridge = c.clone();
        bridge[2 + 6] = 0x84;
        let (out, m) = masked(v4(&bridge, 1, 0));
        assert_eq!(m, Some(Masked::Connect));
        assert!(has(&out, b"sensor-17") && !has(&out, b"hunter2"));
    }

    #[test]
    fn an_mqtt5_connect_keeps_its_properties_but_user_properties_and_authentication_data() {
        let c = connect5("dev-5");
        let (out, m) = masked(v4(&c, 7, 0));
        assert_eq!(m, Some(Masked::Connect));
        for kept in [&b"dev-5"[..], b"SCRAM", &[0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 20]] {
            assert!(has(&out, kept), "{:?} was masked", String::from_utf8_lossy(kept));
        }
        for secret in [&b"zone"[..], b"auth-sec", b"will/topic", b"will-payload", b"user-secret", b"pass-secret"] {
            assert!(!has(&out, secret), "{:?} left", String::from_utf8_lossy(secret));
        }
        // The lengths stay, so a dissector still reads the properties: the user property's name
        // is 4 zero bytes after its length.
        assert!(has(&out, &[0x26, 0, 4, 0, 0, 0, 0, 0, 11]));
    }

    #[test]
    fn an_odd_or_truncated_connect_loses_its_whole_payload() {
        let c = crate::mqtt::connect("sensor-17", 60, Some("alice"), Some("hunter2")).expect("a CONNECT");
        let mut odd: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut name = c.clone();
        name[4..8].copy_from_slice(b"MQTX");
        odd.push(("another protocol name", name));
        let mut level = c.clone();
        level[8] = 3;
        odd.push(("level 3 named MQTT", level));
        let mut reserved = c.clone();
        reserved[9] |= 1;
        odd.push(("the reserved flag", reserved));
        let mut long_id = c.clone();
        long_id[12..14].copy_from_slice(&200u16.to_be_bytes());
        odd.push(("a client id longer than the packet", long_id));
        let mut short = c.clone();
        short[1] = 8;
        odd.push(("a remaining length that ends inside the header", short));
        odd.push(("a remaining length of five bytes", [&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01][..], &c[2..]].concat()));
        let mut v5 = connect5("dev");
        let props = v5.windows(5).position(|w| w == [0x11, 0, 0, 0x0e, 0x10]).unwrap();
        assert_eq!(masked(v4(&v5, 1, 0)).1, Some(Masked::Connect), "the CONNECT as it is reads");
        v5[props] = 0x01; // payload format indicator: a PUBLISH property, not a CONNECT one
        odd.push(("a property CONNECT has not", v5));
        // The capture ends inside the properties: IPv6, 40 bytes of TCP options, 128 bytes.
        odd.push(("properties cut by the capture", connect5("dev")));
        for (what, payload) in odd {
            let frame = if what.starts_with("properties") { v6(&payload, 1, 40) } else { v4(&payload, 1, 0) };
            let start = frame.len() - payload.len().min(frame.len() - if what.starts_with("properties") { 18 + 40 + 60 } else { 54 });
            let (out, m) = masked(frame.clone());
            assert_eq!(m, Some(Masked::Payload), "{what}");
            assert_eq!(out[..start], frame[..start], "{what}: the headers are kept");
            assert!(out[start..].iter().all(|&b| b == 0), "{what}: the payload is not all zeroed: {:02x?}", &out[start..]);
        }
    }

    #[test]
    fn a_client_id_cut_by_the_capture_is_kept_as_far_as_it_goes() {
        let id = "a-long-client-id-".repeat(5);
        let c = crate::mqtt::connect(&id, 60, Some("alice"), Some("hunter2")).expect("a CONNECT");
        let frame = v6(&c, 1, 20);
        let (out, m) = masked(frame.clone());
        assert_eq!((m, out), (None, frame), "nothing but client id was captured");
    }

    #[test]
    fn other_payloads_pass_untouched() {
        let publish = [&[0x30, 0x0d][..], &string(b"a/b"), b"payload"].concat();
        // TLS records: a ClientHello, application data.
        let tls_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        let tls_data = [0x17, 0x03, 0x03, 0x00, 0x20, 0xaa, 0xbb];
        for p in [&publish[..], &tls_hello, &tls_data, &[0xc0, 0x00], &[]] {
            let frame = v4(p, 1, 0);
            assert_eq!(masked(frame.clone()), (frame, None));
        }
        // UDP, ARP.
        let mut udp = v4(b"\x10MQTT", 1, 0);
        udp[23] = 17;
        assert_eq!(masked(udp.clone()), (udp, None));
        let mut arp = v4(&[], 1, 0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(masked(arp.clone()), (arp, None));
    }

    #[test]
    fn fragments_lose_what_follows_their_headers() {
        let c = crate::mqtt::connect("sensor-17", 60, Some("alice"), Some("hunter2")).expect("a CONNECT");
        // A first fragment (more fragments): the TCP header kept, its payload zeroed.
        let mut first = v4(&c, 1, 0);
        first[20] = 0x20;
        let (out, m) = masked(first.clone());
        assert_eq!(m, Some(Masked::Payload));
        assert_eq!(out[..54], first[..54]);
        assert!(out[54..].iter().all(|&b| b == 0));
        // A later fragment: everything after the IP header.
        let mut later = v4(&c, 1, 0);
        later[20..22].copy_from_slice(&0x0005u16.to_be_bytes());
        let (out, m) = masked(later.clone());
        assert_eq!(m, Some(Masked::Payload));
        assert_eq!(out[..34], later[..34]);
        assert!(out[34..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_rest_of_a_long_connect_is_masked_in_the_segments_that_carry_it() {
        // A will of 3,000 bytes: the username and password come two segments later.
        let mut body = string(b"MQTT");
        body.extend([4, 0xc6, 0, 60]);
        body.extend(string(b"big-will"));
        body.extend(string(b"will/topic"));
        body.extend(string(&[b'w'; 3000]));
        body.extend(string(b"alice"));
        body.extend(string(b"hunter2"));
        let mut c = vec![0x10];
        c.extend(varint(body.len()));
        c.extend(body);
        let mut r = Redactor::default();
        let seq = u32::MAX - 100; // the sequence numbers wrap inside the CONNECT
        let mut at = 0;
        let mut outs = Vec::new();
        while at < c.len() {
            let end = (at + 1448).min(c.len());
            let mut f = v4(&c[at..end], seq.wrapping_add(u32::try_from(at).unwrap()), 12);
            let m = r.mask(&mut f);
            outs.push((f, m));
            at = end;
        }
        assert_eq!(outs.len(), 3);
        assert_eq!(outs[0].1, Some(Masked::Connect));
        assert!(has(&outs[0].0, b"big-will"));
        for (f, m) in &outs[1..] {
            assert_eq!(*m, Some(Masked::Payload));
            assert!(f[66..].iter().all(|&b| b == 0));
        }
        // The next packet (a SUBSCRIBE) is the client's to show; a segment of another
        // connection is not touched.
        let next = seq.wrapping_add(u32::try_from(c.len()).unwrap());
        let subscribe = [&[0x82, 0x08, 0, 1][..], &string(b"a/b"), &[0]].concat();
        let frame = v4(&subscribe, next, 12);
        let mut f = frame.clone();
        assert_eq!((r.mask(&mut f), f), (None, frame));
        assert!(r.pending.is_empty(), "the CONNECT is over");
        // The CONNECT sent in two writes, header first: the second is masked too.
        let c = crate::mqtt::connect("split", 60, Some("alice"), Some("hunter2")).expect("a CONNECT");
        let mut r = Redactor::default();
        let mut head = v4(&c[..2], 5, 0);
        assert_eq!(r.mask(&mut head), Some(Masked::Payload));
        let mut rest = v4(&c[2..], 7, 0);
        assert_eq!(r.mask(&mut rest), Some(Masked::Payload));
        assert!(!has(&rest, b"alice") && !has(&rest, b"hunter2"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// CONNECTs of every shape, in one segment or split at any point, over either family
        /// with any TCP options: no password gets through, and a CONNECT whose first segment
        /// holds its client id keeps it.
        #[test]
        fn no_password_gets_through(
            id in "[a-z0-9-]{0,40}",
            user in proptest::option::of("[a-z]{1,12}"),
            password in "[A-Z]{12,30}",
            v6_frame in any::<bool>(),
            opts in 0usize..=10,
            split in proptest::option::of(1usize..200),
        ) {
            let c = crate::mqtt::connect(&id, 60, user.as_deref(), Some(&password)).expect("a CONNECT");
            let build = |p: &[u8], seq: u32| if v6_frame { v6(p, seq, opts * 4) } else { v4(p, seq, opts * 4) };
            let mut r = Redactor::default();
            let cut = split.unwrap_or(c.len()).min(c.len());
            let mut first = build(&c[..cut], 1);
            let original = first.clone();
            let m = r.mask(&mut first);
            prop_assert!(!has(&first, password.as_bytes()));
            // Read to the client id whenever its length is in the segment and the capture.
            let headers = if v6_frame { 18 + 40 } else { 14 + 20 } + 20 + opts * 4;
            if cut >= 14 && headers + 14 <= SNAP {
                prop_assert_ne!(m, Some(Masked::Payload));
                let id_end = original.len().min(headers + 14 + id.len().min(cut - 14));
                prop_assert_eq!(&first[..id_end], &original[..id_end]);
                prop_assert!(first[id_end..].iter().all(|&b| b == 0));
            } else {
                prop_assert_eq!(m, Some(Masked::Payload));
            }
            if cut < c.len() {
                let mut rest = build(&c[cut..], 1 + u32::try_from(cut).unwrap());
                prop_assert_eq!(r.mask(&mut rest), Some(Masked::Payload));
                prop_assert!(!has(&rest, password.as_bytes()));
            }
        }

        /// Any bytes: masked or not, never a panic, never a change of length.
        #[test]
        fn any_frame_is_masked_or_left(bytes in proptest::collection::vec(any::<u8>(), 0..SNAP), tcp_connect in any::<bool>()) {
            let mut f = if tcp_connect { v4(&[&[0x10][..], &bytes].concat(), 1, 0) } else { bytes };
            let len = f.len();
            let _ = Redactor::default().mask(&mut f);
            prop_assert_eq!(f.len(), len);
        }
    }
}
