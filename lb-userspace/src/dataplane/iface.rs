//! Facts about the balancer's interface, from the kernel over rtnetlink: whether it runs, its
//! MAC, its addresses; and the config's XDP mode as aya's.

use std::net::IpAddr;

use anyhow::{Context as _, ensure};
use aya::programs::XdpMode;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType};

use crate::netlink;

/// `xdp_mode` in the config to aya's mode.
#[must_use]
pub const fn xdp_mode(mode: crate::config::XdpModeCfg) -> XdpMode {
    match mode {
        crate::config::XdpModeCfg::Auto => XdpMode::Default,
        crate::config::XdpModeCfg::Native => XdpMode::Driver,
        crate::config::XdpModeCfg::Generic => XdpMode::Skb,
    }
}

/// Whether `interface` is up and has its carrier (`IFF_UP` and `IFF_RUNNING`), in the calling
/// thread's network namespace.
///
/// # Errors
/// When the interface does not exist.
pub fn interface_running(interface: &str) -> anyhow::Result<bool> {
    let link = netlink::blocking(|h| async move { netlink::link(&h, interface).await })?;
    Ok(link.header.flags.contains(LinkFlags::Up | LinkFlags::Running))
}

/// An interface's MAC, in the calling thread's network namespace (sysfs would show the
/// namespace it was mounted in, which `nsenter --net` does not change).
///
/// # Errors
/// When the interface does not exist or has no Ethernet address.
pub fn interface_mac(interface: &str) -> anyhow::Result<[u8; 6]> {
    let link = netlink::blocking(|h| async move { netlink::link(&h, interface).await })?;
    let kind = link.header.link_layer_type;
    ensure!(kind == LinkLayerType::Ether, "interface {interface} is not Ethernet (hardware type {})", u16::from(kind));
    let address = link.attributes.iter().find_map(|a| if let LinkAttribute::Address(mac) = a { Some(mac.as_slice()) } else { None });
    address.and_then(|mac| <[u8; 6]>::try_from(mac).ok()).with_context(|| format!("interface {interface} has no MAC"))
}

/// The IPv4 and IPv6 addresses of `interface`, in the calling thread's network namespace.
///
/// # Errors
/// When the interface does not exist or its addresses cannot be read.
pub fn interface_ips(interface: &str) -> anyhow::Result<Vec<IpAddr>> {
    netlink::blocking(|h| async move { netlink::addresses(&h, interface).await })
}

#[cfg(test)]
mod tests {
    use super::{interface_ips, interface_mac, interface_running};

    #[test]
    fn the_loopback_interface_as_netlink_reports_it() {
        assert!(interface_running("lo").expect("lo"), "lo is up and running");
        assert!(interface_ips("lo").expect("lo").contains(&"127.0.0.1".parse().expect("an address")), "lo holds 127.0.0.1");
        let not_ethernet = interface_mac("lo").expect_err("lo has no Ethernet address");
        assert!(not_ethernet.to_string().contains("is not Ethernet"), "{not_ethernet:#}");
        let missing = interface_running("nosuchif0").expect_err("no such interface");
        assert_eq!(missing.to_string(), "no interface nosuchif0");
    }

    /// The controller asks from its tokio runtime, where a runtime of netlink's own could not
    /// wait.
    #[tokio::test]
    async fn interface_facts_can_be_read_from_async_code() {
        assert!(interface_running("lo").expect("lo"));
    }
}
