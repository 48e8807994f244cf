//! Backend MAC resolution from the kernel's IPv4 neighbour table (`/proc/net/arp`).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::Context as _;

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

/// Makes the kernel resolve `addr` (send an ARP request, if it has no entry): a UDP datagram to
/// the discard port. Does not wait; errors (no route, say) show up as the address staying
/// unresolved.
pub fn solicit(addr: Ipv4Addr) {
    if let Ok(sock) = UdpSocket::bind("0.0.0.0:0") {
        let _ = sock.set_nonblocking(true);
        let _ = sock.send_to(&[0], SocketAddrV4::new(addr, 9));
    }
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
