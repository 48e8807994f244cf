//! Builds Ethernet frames for packet fixtures: IPv4 with TCP, UDP or ICMP (echo, and errors that
//! quote a datagram), VLAN tags, IP options, fragments, ARP, and IPv6 with TCP, UDP or ICMPv6
//! (echo, neighbour discovery, "packet too big" quoting a packet), extension headers and fragment
//! headers. Checksums are real, so frames are what a wire would carry.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The L4 part of an IPv4 frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    IcmpEcho,
    /// An ICMP error (`kind`, `code`; `mtu` in the second half of the rest-of-header word) that
    /// quotes `quoted`: the start of the offending datagram, from its IP header on.
    IcmpError {
        kind: u8,
        code: u8,
        mtu: u16,
        quoted: Vec<u8>,
    },
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Ipv4Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, TCI) of one VLAN tag.
    pub vlan: Option<(u16, u16)>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Raw options, padded by the builder to a multiple of 4 bytes.
    pub ip_options: Vec<u8>,
    /// The flags/fragment-offset field (host order): 0x2000 = more fragments.
    pub frag: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ipv4Frame {
    /// A TCP segment from `src:sport` to `dst:dport`, sent to the balancer's MAC.
    #[must_use]
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            ip_options: Vec::new(),
            frag: 0x4000, // don't fragment
            l4: L4::Tcp { sport, dport, flags },
            payload: Vec::new(),
        }
    }

    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut f = ethernet(self.dst_mac, self.src_mac, self.vlan, 0x0800);

        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // end of options list
        }
        let l4 = self.l4_bytes();
        let ihl = 5 + opts.len() / 4;
        let total = ihl * 4 + l4.len();
        let proto = match self.l4 {
            L4::Tcp { .. } => 6u8,
            L4::Udp { .. } => 17,
            L4::IcmpEcho | L4::IcmpError { .. } => 1,
        };
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | u8::try_from(ihl).expect("ihl fits");
        ip[2..4].copy_from_slice(&u16::try_from(total).expect("frame fits").to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&opts);
        let csum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut seg = match self.l4 {
            L4::Tcp { sport, dport, flags } => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&sport.to_be_bytes());
                t[2..4].copy_from_slice(&dport.to_be_bytes());
                t[4..8].copy_from_slice(&1000u32.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t
            }
            L4::Udp { sport, dport } => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&sport.to_be_bytes());
                u[2..4].copy_from_slice(&dport.to_be_bytes());
                u[4..6].copy_from_slice(&u16::try_from(8 + self.payload.len()).expect("fits").to_be_bytes());
                u
            }
            L4::IcmpEcho => vec![8, 0, 0, 0, 0, 1, 0, 1],
            L4::IcmpError { kind, code, mtu, ref quoted } => {
                let mut m = vec![kind, code, 0, 0, 0, 0];
                m.extend_from_slice(&mtu.to_be_bytes());
                m.extend_from_slice(quoted);
                m
            }
        };
        seg.extend_from_slice(&self.payload);
        let (proto, csum_at) = match self.l4 {
            L4::Tcp { .. } => (6u8, 16),
            L4::Udp { .. } => (17, 6),
            L4::IcmpEcho | L4::IcmpError { .. } => (1, 2),
        };
        let csum = if proto == 1 {
            checksum(&seg, 0)
        } else {
            let mut pseudo = 0u32;
            for w in self.src.octets().chunks(2).chain(self.dst.octets().chunks(2)) {
                pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
            pseudo += u32::from(proto) + u32::try_from(seg.len()).expect("fits");
            checksum(&seg, pseudo)
        };
        seg[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        seg
    }
}

impl Ipv4Frame {
    /// The IP datagram of this frame (no Ethernet header or VLAN tag).
    #[must_use]
    pub fn datagram(&self) -> Vec<u8> {
        let f = self.build();
        f[14 + if self.vlan.is_some() { 4 } else { 0 }..].to_vec()
    }

    /// ICMP "fragmentation needed" (next-hop MTU `mtu`) from `router` to the source of
    /// `offending`, quoting its IP header and the first `quote` bytes after it, sent to the
    /// balancer's MAC.
    #[must_use]
    pub fn frag_needed(router: Ipv4Addr, offending: &Self, mtu: u16, quote: usize) -> Self {
        let datagram = offending.datagram();
        let ihl = usize::from(datagram[0] & 0x0f) * 4;
        let quoted = datagram[..(ihl + quote).min(datagram.len())].to_vec();
        let mut f = Self::tcp(router, 0, offending.src, 0, 0);
        f.l4 = L4::IcmpError { kind: ICMP_DEST_UNREACH, code: ICMP_FRAG_NEEDED, mtu, quoted };
        f
    }
}

/// An Ethernet header, with one VLAN tag (TPID, TCI) if given.
#[must_use]
pub fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<(u16, u16)>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some((tpid, tci)) = vlan {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// The Internet checksum of `data`, starting from a partial sum.
#[must_use]
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// An ARP request for `target` from `sender`.
#[must_use]
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// ICMPv6 types the fixtures use.
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;

/// IPv6 extension header kinds (next header values) the builder can write.
pub const IPV6_HOPOPTS: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DSTOPTS: u8 = 60;

/// The L4 part of an IPv6 frame.
#[derive(Clone, Debug)]
pub enum L4v6 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// An ICMPv6 message: type, code, the 32-bit word after the checksum (the MTU of "packet too
    /// big", identifier and sequence of an echo, the flags of a neighbour advertisement), and
    /// the message body after it.
    Icmp {
        kind: u8,
        code: u8,
        mtu_or_rest: u32,
        body: Vec<u8>,
    },
}

/// One IPv6 extension header: its kind (hop-by-hop 0, routing 43 or destination options 60) and
/// its length in 8-byte units not counting the first 8 (the header's own length field).
#[derive(Clone, Copy, Debug)]
pub struct ExtHeader {
    pub kind: u8,
    pub len: u8,
}

/// An IPv6 fragment header: the offset in 8-byte units and the "more fragments" flag.
#[derive(Clone, Copy, Debug)]
pub struct Fragment6 {
    pub offset: u16,
    pub more: bool,
}

#[derive(Clone, Debug)]
pub struct Ipv6Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, TCI) of one VLAN tag.
    pub vlan: Option<(u16, u16)>,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Extension headers in order, before the fragment header (if any) and the L4 header.
    pub ext: Vec<ExtHeader>,
    pub frag: Option<Fragment6>,
    pub l4: L4v6,
    pub payload: Vec<u8>,
}

impl Ipv6Frame {
    /// A TCP segment from `[src]:sport` to `[dst]:dport`, sent to the balancer's MAC.
    #[must_use]
    pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            hop_limit: 64,
            ext: Vec::new(),
            frag: None,
            l4: L4v6::Tcp { sport, dport, flags },
            payload: Vec::new(),
        }
    }

    /// A UDP datagram, sent to the balancer's MAC.
    #[must_use]
    pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self { l4: L4v6::Udp { sport, dport }, ..Self::tcp(src, sport, dst, dport, 0) }
    }

    /// An ICMPv6 message, sent to the balancer's MAC.
    #[must_use]
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, mtu_or_rest: u32, body: Vec<u8>) -> Self {
        Self { l4: L4v6::Icmp { kind, code, mtu_or_rest, body }, ..Self::tcp(src, 0, dst, 0, 0) }
    }

    /// An echo request (identifier 1, sequence 1).
    #[must_use]
    pub fn echo_request(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::icmp(src, dst, ICMPV6_ECHO_REQUEST, 0, 0x0001_0001, b"ping".to_vec())
    }

    /// A neighbour solicitation from `src` for `target`, to the target's solicited-node multicast
    /// address and its multicast MAC (33:33:ff:xx:xx:xx), with a source link-layer option.
    #[must_use]
    pub fn neighbor_solicit(src: Ipv6Addr, target: Ipv6Addr) -> Self {
        let t = target.octets();
        let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
        let mut body = t.to_vec();
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&CLIENT_MAC);
        let mut f = Self::icmp(src, group, ICMPV6_NEIGHBOR_SOLICIT, 0, 0, body);
        f.dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
        f.hop_limit = 255;
        f
    }

    /// A solicited neighbour advertisement from `src` (for its own address) to `dst`, with a
    /// target link-layer option.
    #[must_use]
    pub fn neighbor_advert(src: Ipv6Addr, dst: Ipv6Addr, mac: [u8; 6]) -> Self {
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&[2, 1]);
        body.extend_from_slice(&mac);
        let mut f = Self::icmp(src, dst, ICMPV6_NEIGHBOR_ADVERT, 0, 0x6000_0000, body); // solicited, override
        f.hop_limit = 255;
        f
    }

    /// ICMPv6 "packet too big" (MTU `mtu`) from `router` to the source of `offending`, quoting
    /// its IPv6 header and the first `quote_bytes` after it, sent to the balancer's MAC.
    #[must_use]
    pub fn packet_too_big(router: Ipv6Addr, offending: &Self, mtu: u32, quote_bytes: usize) -> Self {
        let packet = offending.datagram();
        let quoted = packet[..(40 + quote_bytes).min(packet.len())].to_vec();
        Self::icmp(router, offending.src, ICMPV6_PACKET_TOO_BIG, 0, mtu, quoted)
    }

    /// The IPv6 packet of this frame (no Ethernet header or VLAN tag).
    #[must_use]
    pub fn datagram(&self) -> Vec<u8> {
        let f = self.build();
        f[14 + if self.vlan.is_some() { 4 } else { 0 }..].to_vec()
    }

    /// The next header value of the L4 part.
    const fn l4_proto(&self) -> u8 {
        match self.l4 {
            L4v6::Tcp { .. } => 6,
            L4v6::Udp { .. } => 17,
            L4v6::Icmp { .. } => 58,
        }
    }

    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut f = ethernet(self.dst_mac, self.src_mac, self.vlan, 0x86dd);

        // The chain: each header names the one after it.
        let mut kinds: Vec<u8> = self.ext.iter().map(|e| e.kind).collect();
        if self.frag.is_some() {
            kinds.push(IPV6_FRAGMENT);
        }
        kinds.push(self.l4_proto());
        let mut headers = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            headers.extend_from_slice(&self.ext_bytes(*e, kinds[i + 1]));
        }
        if let Some(frag) = self.frag {
            let next = kinds[kinds.len() - 1];
            let word = (frag.offset << 3) | u16::from(frag.more);
            headers.extend_from_slice(&[next, 0]);
            headers.extend_from_slice(&word.to_be_bytes());
            headers.extend_from_slice(&0x0bad_cafe_u32.to_be_bytes());
        }
        let l4 = self.l4_bytes();
        let payload_len = u16::try_from(headers.len() + l4.len()).expect("packet fits");

        f.extend_from_slice(&0x6000_0000_u32.to_be_bytes());
        f.extend_from_slice(&payload_len.to_be_bytes());
        f.push(kinds[0]);
        f.push(self.hop_limit);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&headers);
        f.extend_from_slice(&l4);
        f
    }

    /// One extension header, `(len + 1) * 8` bytes: options headers padded with PadN, a routing
    /// header of type 4 (segment routing) with segments left 0 that lists the destination.
    fn ext_bytes(&self, e: ExtHeader, next: u8) -> Vec<u8> {
        let total = (usize::from(e.len) + 1) * 8;
        let mut h = vec![next, e.len];
        match e.kind {
            IPV6_HOPOPTS | IPV6_DSTOPTS => {
                let mut rest = total - 2;
                while rest > 0 {
                    if rest == 1 {
                        h.push(0); // Pad1
                        rest = 0;
                    } else {
                        let mut n = rest.min(257);
                        if rest - n == 1 {
                            n -= 1;
                        }
                        h.extend_from_slice(&[1, u8::try_from(n - 2).expect("PadN length")]);
                        h.resize(h.len() + n - 2, 0);
                        rest -= n;
                    }
                }
            }
            IPV6_ROUTING => {
                let segments = usize::from(e.len / 2);
                // Type 4, segments left 0, last entry, flags, tag.
                h.extend_from_slice(&[4, 0, u8::try_from(segments.saturating_sub(1)).expect("fits"), 0, 0, 0]);
                for _ in 0..segments {
                    h.extend_from_slice(&self.dst.octets());
                }
                h.resize(total, 0);
            }
            other => panic!("extension header kind {other} is not one the builder writes"),
        }
        assert_eq!(h.len(), total);
        h
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut seg = match &self.l4 {
            L4v6::Tcp { sport, dport, flags } => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&sport.to_be_bytes());
                t[2..4].copy_from_slice(&dport.to_be_bytes());
                t[4..8].copy_from_slice(&1000u32.to_be_bytes());
                if flags & TCP_ACK != 0 {
                    t[8..12].copy_from_slice(&2000u32.to_be_bytes());
                }
                t[12] = 5 << 4;
                t[13] = *flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t
            }
            L4v6::Udp { sport, dport } => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&sport.to_be_bytes());
                u[2..4].copy_from_slice(&dport.to_be_bytes());
                u[4..6].copy_from_slice(&u16::try_from(8 + self.payload.len()).expect("fits").to_be_bytes());
                u
            }
            L4v6::Icmp { kind, code, mtu_or_rest, body } => {
                let mut m = vec![*kind, *code, 0, 0];
                m.extend_from_slice(&mtu_or_rest.to_be_bytes());
                m.extend_from_slice(body);
                m
            }
        };
        seg.extend_from_slice(&self.payload);
        let csum_at = match self.l4 {
            L4v6::Tcp { .. } => 16,
            L4v6::Udp { .. } => 6,
            L4v6::Icmp { .. } => 2,
        };
        // The pseudo-header: source, destination, upper-layer length (32 bits), next header.
        let mut pseudo = 0u32;
        for w in self.src.octets().chunks(2).chain(self.dst.octets().chunks(2)) {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        let len = u32::try_from(seg.len()).expect("fits");
        pseudo += (len >> 16) + (len & 0xffff) + u32::from(self.l4_proto());
        let mut csum = checksum(&seg, pseudo);
        if csum == 0 && matches!(self.l4, L4v6::Udp { .. }) {
            csum = 0xffff; // zero means "no checksum", which IPv6 UDP may not use
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        seg
    }
}

/// Checks a frame the way a receiver would: for IPv4, the header checksum and the total length;
/// for IPv6, the payload length and an extension header chain that leads to the L4 header; for
/// either, unless it is a fragment, the L4 checksum (over the pseudo-header for TCP, UDP and
/// ICMPv6). Frames of other kinds (ARP) are not looked into. Up to two VLAN tags.
///
/// # Panics
/// When the frame is not what a wire would carry, naming `what`.
pub fn check_wire(f: &[u8], what: &str) {
    let mut l3 = 14;
    while matches!(f[l3 - 2..l3], [0x81, 0x00] | [0x88, 0xa8]) {
        l3 += 4;
    }
    match f[l3 - 2..l3] {
        [0x08, 0x00] => check_wire4(f, l3, what),
        [0x86, 0xdd] => check_wire6(f, l3, what),
        _ => {}
    }
}

/// The sum of 16-bit words of `bytes` (an even number of them), for a pseudo-header.
fn word_sum(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum()
}

fn check_wire4(f: &[u8], l3: usize, what: &str) {
    assert_eq!(f[l3] >> 4, 4, "{what}: version");
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    assert!(ihl >= 20, "{what}: IHL {ihl}");
    assert_eq!(checksum(&f[l3..l3 + ihl], 0), 0, "{what}: IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]));
    assert_eq!(total, f.len() - l3, "{what}: total length");
    let fragment = u16::from_be_bytes([f[l3 + 6], f[l3 + 7]]) & 0x3fff != 0;
    let (proto, seg) = (f[l3 + 9], &f[l3 + ihl..]);
    if !fragment {
        let pseudo = word_sum(&f[l3 + 12..l3 + 20]) + u32::from(proto) + u32::try_from(seg.len()).expect("fits");
        match proto {
            // A tunnel: the inner datagram is checked in turn.
            4 => check_wire4(f, l3 + ihl, what),
            41 => check_wire6(f, l3 + ihl, what),
            // A zero UDP checksum is none (as tunnels send).
            17 if seg.get(6..8) == Some(&[0, 0]) => {}
            6 | 17 => assert_eq!(checksum(seg, pseudo), 0, "{what}: L4 checksum"),
            1 => assert_eq!(checksum(seg, 0), 0, "{what}: ICMP checksum"),
            _ => {}
        }
    }
}

fn check_wire6(f: &[u8], l3: usize, what: &str) {
    assert_eq!(f[l3] >> 4, 6, "{what}: version");
    let payload = usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]));
    assert_eq!(payload, f.len() - l3 - 40, "{what}: payload length");
    let (mut next, mut off) = (f[l3 + 6], l3 + 40);
    let mut fragment = false;
    while matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DSTOPTS) {
        fragment |= next == IPV6_FRAGMENT;
        let len = if next == IPV6_FRAGMENT { 8 } else { (usize::from(f[off + 1]) + 1) * 8 };
        if next != IPV6_FRAGMENT && next != IPV6_ROUTING {
            // Options: Pad1 and PadN only, filling the header exactly.
            let mut o = off + 2;
            while o < off + len {
                o += if f[o] == 0 { 1 } else { 2 + usize::from(f[o + 1]) };
            }
            assert_eq!(o, off + len, "{what}: options fill the header");
        }
        next = f[off];
        off += len;
        assert!(off <= f.len(), "{what}: extension header past the end");
    }
    if !fragment {
        let seg = &f[off..];
        match next {
            // A tunnel: the inner datagram is checked in turn.
            4 => check_wire4(f, off, what),
            41 => check_wire6(f, off, what),
            // UDP tunnels over IPv6 may send a zero checksum (RFC 6935).
            17 if seg.get(6..8) == Some(&[0, 0]) => {}
            _ => {
                let pseudo = word_sum(&f[l3 + 8..l3 + 40]) + u32::try_from(seg.len()).expect("fits") + u32::from(next);
                assert_eq!(checksum(seg, pseudo), 0, "{what}: L4 checksum");
            }
        }
    }
}
