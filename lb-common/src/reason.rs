//! Indices of `VERDICT_STATS` (per CPU, `u64` packets): every packet the program sees is
//! counted exactly once, under the reason for its verdict, or (forwarded) in `REAL_STATS`.

/// Forwarded to a backend (`XDP_TX`). The program leaves this slot at zero: it counts a
/// forwarded frame once, in `REAL_STATS`, and the controller reports the sum here.
pub const TX: u32 = 0;
/// Neither IPv4 nor IPv6 (ARP, anything else), passed.
pub const PASS_NOT_IP: u32 = 1;
/// IP but not TCP (ICMP and ICMPv6 other than "too big" about a listener's flow,
/// neighbour discovery, UDP, an IPv6 extension header chain too long to follow), passed.
pub const PASS_NOT_TCP: u32 = 2;
/// TCP to an address and port that is no listener, passed.
pub const PASS_NO_LISTENER: u32 = 3;
/// Too short or inconsistent headers, passed for the kernel to judge.
pub const PASS_MALFORMED: u32 = 4;
/// A fragment to a VIP (IPv4, or IPv6 with a fragment header), dropped.
pub const DROP_FRAGMENT: u32 = 5;
/// A listener hit whose ring has no usable backend, dropped.
pub const DROP_NO_BACKEND: u32 = 6;
/// A map lookup that cannot fail did (a ring index outside the map), dropped.
pub const DROP_INTERNAL: u32 = 7;
/// More than one VLAN tag, passed.
pub const PASS_VLAN_STACKED: u32 = 8;
/// For a listener (or an ICMP error about one), but the destination MAC is not this
/// node's (`NodeInfo::macs`): flooded unknown unicast, broadcast, multicast, promiscuous
/// capture, another node's frame. Passed untouched (the kernel drops what is not its own).
pub const PASS_NOT_OUR_MAC: u32 = 9;
/// ICMP "fragmentation needed" about a listener's flow, forwarded to the broker of the
/// flow its inner header names (not counted in `REAL_STATS`).
pub const TX_ICMP_TOO_BIG: u32 = 10;
/// A new connection's SYN above the listener's `max_conn_rate`, dropped.
pub const DROP_CONN_RATE: u32 = 11;
/// For a tunnelled real but larger than the tunnel's path takes (`RealTunnel::max_inner`):
/// answered with ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big" to the
/// client, from the VIP, with the MTU that fits (`XDP_TX` of the answer).
pub const TX_TOO_BIG_ANSWERED: u32 = 12;
/// For a tunnelled real, too large for its path and IPv4 without DF (which the balancer cannot
/// fragment), dropped.
pub const DROP_TOO_BIG: u32 = 13;
pub const COUNT: u32 = 14;

/// `(verdict, reason)` labels, indexed like the map.
pub const LABELS: [(&str, &str); COUNT as usize] = [
    ("tx", "forwarded"),
    ("pass", "not_ip"),
    ("pass", "not_tcp"),
    ("pass", "no_listener"),
    ("pass", "malformed"),
    ("drop", "fragment"),
    ("drop", "no_backend"),
    ("drop", "internal"),
    ("pass", "vlan_stacked"),
    ("pass", "not_our_mac"),
    ("tx", "icmp_too_big"),
    ("drop", "conn_rate"),
    ("tx", "too_big_answered"),
    ("drop", "too_big"),
];
