//! The lab's namespaces, links and addresses: built in one go, checked, and torn down by what
//! the state directory recorded.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_userspace::dataplane::testing::TestPrograms;

use super::{
    CLIENT_ADDR, CLIENT6, LB_ADDR, LB6, Lab, ROUTER_LAN, Routing, VIP, VIP_INTERNAL, VIP6, alive, broker_addr, broker_addr6, kill_and_wait,
    node_addr, sh, walk,
};

impl Lab {
    /// Brings the lab up. Idempotent: a healthy lab is left as it is; anything else is torn
    /// down first and built anew.
    ///
    /// # Errors
    /// When a step fails; what was made so far is torn down again.
    pub fn up(&self) -> anyhow::Result<()> {
        if self.healthy() {
            return Ok(());
        }
        self.down()?;
        let result = self.build();
        if result.is_err() {
            let _ = self.down();
        }
        result
    }

    fn build(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.state).with_context(|| format!("creating {}", self.state.display()))?;
        for ns in self.namespaces() {
            sh("ip", &["netns", "add", &ns])?;
            Self::ip(&ns, &["link", "set", "lo", "up"])?;
            // No duplicate address detection on the lab's segment: addresses work at once.
            for k in ["net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"] {
                self.sysctl(&ns, k, "0")?;
            }
        }
        let sw = self.ns("sw");
        Self::ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
        Self::ip(&sw, &["link", "set", "br0", "up"])?;
        // Each host on the segment: veth `eth0` in its namespace, `p-ROLE` on the bridge.
        let front: Vec<(String, String, Ipv4Addr)> = if self.routed.is_some() {
            std::iter::once(("router".to_owned(), self.ns("router"), ROUTER_LAN))
                .chain((0..self.nodes()).map(|i| (format!("lb{}", i + 1), self.node_ns(i), node_addr(i))))
                .collect()
        } else {
            vec![("client".to_owned(), self.ns("client"), CLIENT_ADDR), ("lb".to_owned(), self.ns("lb"), LB_ADDR)]
        };
        let hosts: Vec<(String, String, Ipv4Addr)> =
            front.into_iter().chain((0..self.brokers).map(|i| (format!("b{}", i + 1), self.broker_ns(i), broker_addr(i)))).collect();
        let addr6 = |role: &str| match role {
            "client" => Some(CLIENT6),
            "lb" => Some(LB6),
            _ => role.strip_prefix('b').and_then(|n| n.parse::<usize>().ok()).map(|n| broker_addr6(n - 1)),
        };
        for (role, ns, addr) in &hosts {
            let port = format!("p-{role}");
            sh("ip", &["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &sw])?;
            Self::ip(&sw, &["link", "set", &port, "master", "br0"])?;
            Self::ip(&sw, &["link", "set", &port, "up"])?;
            Self::ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            if self.routed.is_none()
                && let Some(a6) = addr6(role)
            {
                Self::ip(ns, &["-6", "addr", "add", &format!("{a6}/64"), "dev", "eth0", "nodad"])?;
            }
            Self::ip(ns, &["link", "set", "eth0", "up"])?;
        }
        let client = self.ns("client");
        if self.routed.is_some() {
            self.wire_router()?;
        } else {
            for a in self.client_extra_addrs() {
                Self::ip(&client, &["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
            }
            for a in self.client_extra_addrs6() {
                Self::ip(&client, &["-6", "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?;
            }
            // The client reaches the VIPs through the balancer.
            for vip in [VIP, VIP_INTERNAL] {
                Self::ip(&client, &["route", "add", &format!("{vip}/32"), "via", &LB_ADDR.to_string()])?;
            }
            Self::ip(&client, &["-6", "route", "add", &format!("{VIP6}/128"), "via", &LB6.to_string()])?;
            // Bounced SYNs would carry partial checksums the brokers drop; GRO on the client's
            // bridge port would merge segments into frames too big to bounce.
            self.exec(&client, "ethtool", &["-K", "eth0", "tx", "off"])?;
            self.exec(&sw, "ethtool", &["-K", "p-client", "gro", "off"])?;
        }

        // Brokers: VIPs on lo, ARP kept to the real address, loose reverse-path filter.
        for i in 0..self.brokers {
            let ns = self.broker_ns(i);
            for vip in [VIP, VIP_INTERNAL] {
                Self::ip(&ns, &["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            if self.routed.is_none() {
                // Linux answers a neighbour solicitation only for an address of the interface
                // it came in on (or with proxy_ndp), so the VIP on lo stays silent on eth0.
                Self::ip(&ns, &["-6", "addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
                self.sysctl(&ns, "net.ipv6.conf.all.proxy_ndp", "0")?;
                self.sysctl(&ns, "net.ipv6.conf.eth0.proxy_ndp", "0")?;
            }
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.eth0.arp_ignore", "1"),
                ("net.ipv4.conf.eth0.arp_announce", "2"),
                ("net.ipv4.conf.all.rp_filter", "2"),
                ("net.ipv4.conf.eth0.rp_filter", "2"),
            ] {
                self.sysctl(&ns, k, v)?;
            }
        }

        // XDP_TX on a veth reaches the peer only if the peer runs an XDP program itself.
        for port in self.balancer_ports() {
            let mut test = TestPrograms::load([2, 0, 0, 0, 0, 1])?;
            let pin = self.link_pin(&port);
            crate::netns::in_netns(&sw, || test.attach("xdp_pass", &port, XdpMode::Driver, Some(&pin)))
                .with_context(|| format!("attaching xdp_pass to the balancer's bridge port {port}"))??;
        }

        self.write_certs()?;
        for i in 0..self.brokers {
            if self.routed.is_some() {
                // Brokers answer clients straight through the router (DSR).
                Self::ip(&self.broker_ns(i), &["route", "add", "default", "via", &ROUTER_LAN.to_string()])?;
            }
            self.start_broker(i)?;
        }
        if let Some((nodes, Routing::Bgp)) = self.routed {
            self.start_bird_router()?;
            for i in 0..nodes {
                self.start_bird_node(i)?;
            }
        }
        Ok(())
    }

    /// The bridge ports the balancers' frames come back through (each needs an XDP program).
    pub(super) fn balancer_ports(&self) -> Vec<String> {
        if self.routed.is_some() { (0..self.nodes()).map(|i| format!("p-lb{}", i + 1)).collect() } else { vec!["p-lb".to_owned()] }
    }

    /// Tears everything down: processes by PID, pinned links, namespaces, the state directory.
    /// Safe to run on a half-built or crashed lab.
    ///
    /// # Errors
    /// When a namespace cannot be deleted.
    pub fn down(&self) -> anyhow::Result<()> {
        // Every pid file under the state directory: brokers, and whatever else recorded one.
        if let Ok(entries) = walk(&self.state) {
            for f in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "pid")) {
                if let Some(pid) = std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                    kill_and_wait(pid);
                }
            }
        }
        for port in self.balancer_ports() {
            let _ = std::fs::remove_file(self.link_pin(&port));
        }
        // A balancer's pins outlive it by design; the lab's balancers go with the lab.
        let dirs = if self.routed.is_some() { (0..self.nodes()).map(|i| self.node_pin_dir(i)).collect() } else { vec![self.pin_dir()] };
        for dir in dirs {
            let _ = lb_userspace::dataplane::unpin_all(&dir);
            let _ = std::fs::remove_dir(&dir);
        }
        for ns in self.namespaces().into_iter().rev() {
            if Path::new("/run/netns").join(&ns).exists() {
                sh("ip", &["netns", "del", &ns])?;
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
        Ok(())
    }

    /// Whether every namespace exists and every broker answers.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.namespaces().iter().all(|ns| Path::new("/run/netns").join(ns).exists())
            && self.balancer_ports().iter().all(|p| self.link_pin(p).exists())
            && (0..self.brokers).all(|i| self.broker_pid(i).is_some_and(alive))
    }
}
