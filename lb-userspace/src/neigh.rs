//! Backend MAC resolution from the kernel's IPv4 neighbour table (`/proc/net/arp`).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const ARP_TABLE: &str = "/proc/thread-self/net/arp";

/// ATF_COM: the entry is complete (resolved).
const ATF_COM: u32 = 0x2;

/// The complete entry for `addr` on `interface`, if the table has one.
///
/// # Errors
/// When the table cannot be read.
pub fn lookup(addr: Ipv4Addr, interface: &str) -> anyhow::Result<Option<[u8; 6]>> {
    let text = std::fs::read_to_string(ARP_TABLE).context(ARP_TABLE)?;
    Ok(parse_table(&text, addr, interface))
}

fn parse_table(text: &str, addr: Ipv4Addr, interface: &str) -> Option<[u8; 6]> {
    // "IP address  HW type  Flags  HW address  Mask  Device"
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != interface || f[0].parse::<Ipv4Addr>().ok()? != addr {
            return None;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        if flags & ATF_COM == 0 {
            return None;
        }
        crate::config::parse_mac(f[3]).ok()
    })
}

/// Resolves `addr` on `interface`: the table first; on a miss, a UDP datagram to the discard
/// port makes the kernel send an ARP request, and the table is polled until `wait` runs out.
///
/// # Errors
/// When the address does not resolve in time; the message says what to check.
pub fn resolve(addr: Ipv4Addr, interface: &str, wait: Duration) -> anyhow::Result<[u8; 6]> {
    if let Some(mac) = lookup(addr, interface)? {
        return Ok(mac);
    }
    let deadline = Instant::now() + wait;
    let sock = UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket to trigger ARP")?;
    let mut attempt = 0u32;
    while Instant::now() < deadline {
        if attempt.is_multiple_of(10) {
            // Errors here (no route, say) show up as the timeout below, with the hint.
            let _ = sock.send_to(&[0], SocketAddrV4::new(addr, 9));
        }
        attempt += 1;
        std::thread::sleep(Duration::from_millis(50));
        if let Some(mac) = lookup(addr, interface)? {
            return Ok(mac);
        }
    }
    bail!(
        "no MAC for {addr} on {interface} after {wait:?}: is {addr} on the same segment as {interface}? \
         Set `mac = \"..\"` for the backend, or add a neighbour entry (ip neigh replace {addr} lladdr MAC dev {interface})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_complete_entries_of_the_interface_only() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 192.0.2.11       0x1         0x2         02:00:00:00:00:11     *        eth0\n\
                 192.0.2.12       0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                 192.0.2.13       0x1         0x2         02:00:00:00:00:13     *        eth1\n";
        assert_eq!(parse_table(t, "192.0.2.11".parse().unwrap(), "eth0"), Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(parse_table(t, "192.0.2.12".parse().unwrap(), "eth0"), None);
        assert_eq!(parse_table(t, "192.0.2.13".parse().unwrap(), "eth0"), None);
    }
}
