//! The lab's namespaces, links and addresses: built in one go, checked, and torn down by what
//! the state directory recorded.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_userspace::dataplane::testing::TestPrograms;

use super::{
    CLIENT_ADDR, CLIENT6, DC_GATEWAY, DC_GATEWAY6, DC_ROUTER, DC_ROUTER6, LB_ADDR, LB6, Lab, ROUTER_LAN, Routing, VIP, VIP_GUE,
    VIP_INTERNAL, VIP_IPIP, VIP6, VIP6_GUE, VIP6_IPIP, alive, kill_and_wait, node_addr, sh, walk,
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
        for br in if self.tunnelled { &["br0", "br1"][..] } else { &["br0"][..] } {
            Self::ip(&sw, &["link", "add", br, "type", "bridge"])?;
            Self::ip(&sw, &["link", "set", br, "up"])?;
        }
        // Each host on the segment: veth `eth0` in its namespace, `p-ROLE` on the bridge.
        let front: Vec<(String, String, Ipv4Addr)> = if self.routed.is_some() {
            std::iter::once(("router".to_owned(), self.ns("router"), ROUTER_LAN))
                .chain((0..self.nodes()).map(|i| (format!("lb{}", i + 1), self.node_ns(i), node_addr(i))))
                .collect()
        } else {
            vec![("client".to_owned(), self.ns("client"), CLIENT_ADDR), ("lb".to_owned(), self.ns("lb"), LB_ADDR)]
        };
        let hosts: Vec<(String, String, Ipv4Addr)> =
            front.into_iter().chain((0..self.brokers).map(|i| (format!("b{}", i + 1), self.broker_ns(i), self.broker_ip(i)))).collect();
        let broker_of = |role: &str| role.strip_prefix('b').and_then(|n| n.parse::<usize>().ok()).map(|n| n - 1);
        let addr6 = |role: &str| match role {
            "client" => Some(CLIENT6),
            "lb" => Some(LB6),
            _ => broker_of(role).map(|i| self.broker_ip6(i)),
        };
        for (role, ns, addr) in &hosts {
            let port = format!("p-{role}");
            let bridge = if broker_of(role).is_some_and(|i| self.behind_router(i)) { "br1" } else { "br0" };
            sh("ip", &["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &sw])?;
            Self::ip(&sw, &["link", "set", &port, "master", bridge])?;
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

        if self.tunnelled {
            self.wire_dc_router()?;
        }

        self.configure_brokers()?;

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
            if self.behind_router(i) {
                self.setup_tunnelled_broker(i, &[])?;
            }
        }
        if let Some((nodes, Routing::Bgp)) = self.routed {
            self.start_bird_router()?;
            for i in 0..nodes {
                self.start_bird_node(i)?;
            }
        }
        Ok(())
    }

    /// The brokers' VIPs on `lo`, ARP kept to their own addresses, loose reverse-path filter.
    fn configure_brokers(&self) -> anyhow::Result<()> {
        for i in 0..self.brokers {
            let ns = self.broker_ns(i);
            for vip in self.vips() {
                match vip {
                    IpAddr::V4(v) => Self::ip(&ns, &["addr", "add", &format!("{v}/32"), "dev", "lo"])?,
                    IpAddr::V6(v) => Self::ip(&ns, &["-6", "addr", "add", &format!("{v}/128"), "dev", "lo", "nodad"])?,
                };
            }
            if self.routed.is_none() {
                // Linux answers a neighbour solicitation only for an address of the interface
                // it came in on (or with proxy_ndp), so the VIP on lo stays silent on eth0.
                self.sysctl(&ns, "net.ipv6.conf.all.proxy_ndp", "0")?;
                self.sysctl(&ns, "net.ipv6.conf.eth0.proxy_ndp", "0")?;
            }
            for (k, v) in super::DSR_BACKEND_SYSCTLS {
                self.sysctl(&ns, k, v)?;
            }
        }

        Ok(())
    }

    /// The tunnelled lab's router: `eth0` on the segment, `eth1` on the brokers' network,
    /// forwarding both families; the balancer and the client reach the brokers through it, the
    /// brokers everything else.
    fn wire_dc_router(&self) -> anyhow::Result<()> {
        let (sw, dc) = (self.ns("sw"), self.ns("dc"));
        for (dev, port, bridge, a4, a6) in
            [("eth0", "p-dc", "br0", DC_ROUTER, DC_ROUTER6), ("eth1", "p-dcnet", "br1", DC_GATEWAY, DC_GATEWAY6)]
        {
            sh("ip", &["link", "add", dev, "netns", &dc, "type", "veth", "peer", "name", port, "netns", &sw])?;
            Self::ip(&sw, &["link", "set", port, "master", bridge])?;
            Self::ip(&sw, &["link", "set", port, "up"])?;
            Self::ip(&dc, &["addr", "add", &format!("{a4}/24"), "dev", dev])?;
            Self::ip(&dc, &["-6", "addr", "add", &format!("{a6}/64"), "dev", dev, "nodad"])?;
            Self::ip(&dc, &["link", "set", dev, "up"])?;
        }
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // Replies from the VIPs arrive on eth1, though the VIPs' subnet is on eth0.
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
            ("net.ipv4.conf.eth1.rp_filter", "0"),
        ] {
            self.sysctl(&dc, k, v)?;
        }
        let client = self.ns("client");
        for vip in [VIP_IPIP, VIP_GUE] {
            Self::ip(&client, &["route", "add", &format!("{vip}/32"), "via", &LB_ADDR.to_string()])?;
        }
        for vip in [VIP6_IPIP, VIP6_GUE] {
            Self::ip(&client, &["-6", "route", "add", &format!("{vip}/128"), "via", &LB6.to_string()])?;
        }
        for ns in [self.ns("lb"), self.ns("client")] {
            Self::ip(&ns, &["route", "add", "198.18.1.0/24", "via", &DC_ROUTER.to_string()])?;
            Self::ip(&ns, &["-6", "route", "add", "2001:db8:b::/64", "via", &DC_ROUTER6.to_string()])?;
        }
        for i in (0..self.brokers).filter(|&i| self.behind_router(i)) {
            let ns = self.broker_ns(i);
            Self::ip(&ns, &["route", "add", "default", "via", &DC_GATEWAY.to_string()])?;
            Self::ip(&ns, &["-6", "route", "add", "default", "via", &DC_GATEWAY6.to_string()])?;
        }
        Ok(())
    }

    /// `deploy/backend-setup.sh apply --decap` on tunnelled broker `i`: the VIPs on `lo`, the
    /// sysctls, and `dsrlb decap` taking tunnel frames from the balancer's addresses, with
    /// `extra` options (`--advmss 1432`).
    ///
    /// # Errors
    /// When the script fails.
    pub fn setup_tunnelled_broker(&self, i: usize, extra: &[&str]) -> anyhow::Result<String> {
        let script = super::routing::deploy_dir().join("backend-setup.sh");
        let bin = crate::dsrlb_bin();
        let root = self.decap_pin_root(i);
        let mut args: Vec<String> = vec![
            format!("DSRLB={}", bin.display()),
            format!("DSRLB_DECAP_PIN_ROOT={}", root.display()),
            "bash".into(),
            script.display().to_string(),
            "apply".into(),
            "--dev".into(),
            "eth0".into(),
            "--decap".into(),
            "--source".into(),
            LB_ADDR.to_string(),
            "--source".into(),
            LB6.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend(self.vips().iter().map(ToString::to_string));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exec(&self.broker_ns(i), "env", &refs).with_context(|| format!("backend-setup.sh on b{}", i + 1))
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
        // The brokers' decap programs (removing a link's pin detaches it).
        for i in 0..self.brokers.max(4) {
            let _ = std::fs::remove_dir_all(self.decap_pin_root(i));
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
