//! Facts about the balancer's interface, from the kernel: its MAC, its IPv4 addresses; and the
//! config's XDP mode as aya's.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, ensure};
use aya::programs::XdpMode;

/// `xdp_mode` in the config to aya's mode.
#[must_use]
pub const fn xdp_mode(mode: crate::config::XdpModeCfg) -> XdpMode {
    match mode {
        crate::config::XdpModeCfg::Auto => XdpMode::Default,
        crate::config::XdpModeCfg::Native => XdpMode::Driver,
        crate::config::XdpModeCfg::Generic => XdpMode::Skb,
    }
}

/// An `ifreq` naming `interface`, and a socket to ask about it.
fn ifreq(interface: &str) -> anyhow::Result<(std::os::fd::OwnedFd, libc::ifreq)> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    ensure!(!interface.is_empty() && interface.len() < libc::IFNAMSIZ, "bad interface name {interface:?}");
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok((sock, req))
}

/// Whether `interface` is up and has its carrier (`IFF_UP` and `IFF_RUNNING`, from
/// `SIOCGIFFLAGS`), in the calling thread's network namespace.
///
/// # Errors
/// When the interface does not exist.
pub fn interface_running(interface: &str) -> anyhow::Result<bool> {
    use std::os::fd::AsRawFd as _;
    let (sock, mut req) = ifreq(interface)?;
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked length, zeroed rest).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) };
    if rc != 0 {
        bail!("no interface {interface}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok(flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0)
}

/// Reads an interface's MAC with `SIOCGIFHWADDR`, in the calling thread's network namespace
/// (sysfs would show the namespace it was mounted in, which `nsenter --net` does not change).
///
/// # Errors
/// When the interface does not exist or has no Ethernet address.
pub fn interface_mac(interface: &str) -> anyhow::Result<[u8; 6]> {
    use std::os::fd::AsRawFd as _;
    let (sock, mut req) = ifreq(interface)?;
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked length, zeroed rest).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc != 0 {
        bail!("no interface {interface}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    ensure!(hw.sa_family == libc::ARPHRD_ETHER, "interface {interface} is not Ethernet (hardware type {})", hw.sa_family);
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = src.to_ne_bytes()[0];
    }
    Ok(mac)
}

/// The IPv4 and IPv6 addresses of `interface` (`getifaddrs`), in the calling thread's network namespace.
///
/// # Errors
/// When the kernel's address list cannot be read.
pub fn interface_ips(interface: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    ensure!(unsafe { libc::getifaddrs(&raw mut head) } == 0, "getifaddrs: {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs made; its name is a C string, its address (when
        // not null) a sockaddr of the family it says, here AF_INET.
        unsafe {
            let ifa = &*at;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name);
            let family = if ifa.ifa_addr.is_null() { -1 } else { i32::from((*ifa.ifa_addr).sa_family) };
            if name.to_bytes() == interface.as_bytes() && family == libc::AF_INET {
                let sin = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>());
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if name.to_bytes() == interface.as_bytes() && family == libc::AF_INET6 {
                let sin6 = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in6>());
                out.push(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
