//! Tunnel frames as a balancer in front of routed brokers sends them (IPIP, IPv6 in IPv6, GUE),
//! built by hand for the decap tests, and the addresses those tests use.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frame::checksum;

pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
/// The balancer's tunnel source.
pub const LB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 2);
/// The broker's own address: the outer destination.
pub const BROKER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const BROKER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 11);
/// A source that is no balancer.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

/// The MACs and EtherType of a frame.
#[must_use]
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    crate::frame::ethernet(dst, src, None, ethertype)
}

/// An IPv4 header from `src` to the broker (TTL 64, `frag` as the flags and offset field,
/// its checksum) before `payload` of `protocol`.
///
/// # Panics
/// When the payload is over 64 KB.
#[must_use]
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&u16::try_from(20 + payload.len()).expect("small").to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header (hop limit 64) before `payload` of `next`.
///
/// # Panics
/// When the payload is over 64 KB.
#[must_use]
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&u16::try_from(payload.len()).expect("small").to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A UDP header to `dport` (checksum zero, as tunnels send it) before `payload`.
///
/// # Panics
/// When the payload is over 64 KB.
#[must_use]
pub fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = 51_234u16.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&u16::try_from(8 + payload.len()).expect("small").to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// GUE version 0: a data message (or a control one) of `protocol` with `options` (a multiple
/// of 4 bytes), before `payload`.
///
/// # Panics
/// When the options are over 124 bytes.
#[must_use]
pub fn gue0(protocol: u8, options: &[u8], control: bool, payload: &[u8]) -> Vec<u8> {
    let hlen = u8::try_from(options.len() / 4).expect("small");
    let mut g = vec![if control { 0x20 } else { 0 } | hlen, protocol, 0, 0];
    g.extend_from_slice(options);
    g.extend_from_slice(payload);
    g
}
