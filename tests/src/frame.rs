//! Builds Ethernet frames for packet fixtures: IPv4 with TCP, UDP or ICMP (echo, and errors that
//! quote a datagram), VLAN tags, IP options, fragments, ARP and IPv6. Checksums are real, so
//! frames are what a wire would carry.

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
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some((tpid, tci)) = self.vlan {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());

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

/// An IPv6 TCP SYN (the balancer passes IPv6 for now).
#[must_use]
pub fn ipv6_tcp(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_SYN;
    f.extend_from_slice(&t);
    f
}
