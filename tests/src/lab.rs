//! The DSR lab: a bridge, a client, a balancer and mosquitto brokers, each in a network
//! namespace this code creates. Nothing is added to the root namespace.
//!
//! ```text
//!            dsrlb-sw (bridge br0)
//!    ┌──────────┬───────────┬───────────┐
//! client      balancer    broker b1   broker b2 ...
//! 192.0.2.1   192.0.2.2   192.0.2.11  192.0.2.12
//!   │ SYN/ACK to VIP ─▶ lb0 (XDP: MAC rewrite, XDP_TX)
//!   │                     └──────────▶ b1 (VIP on lo)
//!   ◀──────────────────────────────────── reply straight from b1 (DSR)
//! ```
//!
//! The brokers bridge all topics to b1, so they behave as one cluster for clients.
//!
//! This lab is dual-stack: the same hosts also hold 2001:db8::1 (client), ::2 (balancer),
//! ::11.. (brokers) on the segment, and the brokers hold the IPv6 VIP 2001:db8::100 on `lo`
//! (documentation prefixes, inside the namespaces only). The routed lab is IPv4 only.
//!
//! A routed lab ([`Lab::routed`]) puts two or three balancer nodes on the segment and the
//! client behind a router, as an edge would have them:
//!
//! ```text
//! client 198.51.100.2 ── router 198.51.100.1 | 192.0.2.1 ── dsrlb-sw (bridge br0)
//!                        (BIRD: ECMP over the      ├── node lb1 192.0.2.2  (dsrlb, BIRD or keepalived)
//!                         nodes' BGP routes; or    ├── node lb2 192.0.2.3
//!                         VIP via the VRRP         ├── (node lb3 192.0.2.4)
//!                         next hop 192.0.2.9)      └── brokers 192.0.2.11 .. (default route via 192.0.2.1)
//! ```
//!
//! Everything the lab starts is recorded in its state directory (pids, pinned links), so `down`
//! removes it by PID even after the process that made it crashed.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use lb_userspace::dataplane::testing::TestPrograms;

use crate::wait;

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The VIP of the external listeners (1883, 8883).
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// A second VIP with an internal listener, as EMQ's internal listener.
pub const VIP_INTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 101);
pub const INTERNAL_PORT: u16 = 11883;
/// The lab's IPv6 addresses: the client's, the balancer's, the IPv6 VIP (listeners on 1883 and
/// 8883 in [`Lab::config_dual`]).
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

/// Broker `i`'s (0-based) IPv6 address.
#[must_use]
pub fn broker_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11 + u16::try_from(i).expect("few brokers"))
}

/// Extra client addresses (192.0.2.50 ..) for tests and load that need several sources.
pub const CLIENT_EXTRA_BASE: u8 = 50;
pub const CLIENT_EXTRA_COUNT: u8 = 16;
/// The name in the lab's server certificate (besides the VIPs' addresses).
pub const TLS_NAME: &str = "mqtt.dsrlb.lab";

/// Routed lab: the router's address on the segment and on the client's network, the client's.
pub const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Routed lab, VRRP: the next hop the router sends the VIPs to, which keepalived moves.
pub const VRRP_NEXT_HOP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
/// Routed lab: the port of the nodes' cluster sync.
pub const SYNC_PORT: u16 = 9878;
/// BGP: the router's AS and the nodes' (one AS for all nodes).
pub const ROUTER_AS: u32 = 65000;
pub const NODES_AS: u32 = 65001;

/// Routed lab: node `i`'s (0-based) address.
#[must_use]
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 2 + u8::try_from(i).expect("few nodes"))
}

/// How the routed lab's router reaches the balancer nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// BGP with BFD (BIRD on the router and on every node), ECMP over the nodes.
    Bgp,
    /// A static route via the VRRP next hop, which keepalived moves between the nodes.
    Vrrp,
}

/// Broker `i` (0-based) address.
#[must_use]
pub fn broker_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 11 + u8::try_from(i).expect("few brokers"))
}

/// Names and paths of one lab instance. `prefix` keeps a test lab apart from a demo lab.
#[derive(Clone, Debug)]
pub struct Lab {
    pub prefix: String,
    pub brokers: usize,
    pub state: PathBuf,
    /// Balancer nodes behind a router (see the module's doc); `None`: the single-balancer lab.
    pub routed: Option<(usize, Routing)>,
}

/// Runs a command; its stdout, or an error with its stderr.
///
/// # Errors
/// When the command cannot start or fails.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    output(Command::new(cmd).args(args))
}

/// Runs a command; its stdout, or an error with its stderr.
///
/// # Errors
/// When the command cannot start or fails.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {}", cmd.get_program().display()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lab {
    #[must_use]
    pub fn new(prefix: &str, brokers: usize) -> Self {
        Self { prefix: prefix.to_owned(), brokers, state: PathBuf::from(format!("/run/{prefix}-lab")), routed: None }
    }

    /// A lab of `nodes` balancer nodes (2 or 3) behind a router.
    #[must_use]
    pub fn routed(prefix: &str, brokers: usize, nodes: usize, routing: Routing) -> Self {
        assert!((2..=3).contains(&nodes), "2 or 3 nodes");
        Self { routed: Some((nodes, routing)), ..Self::new(prefix, brokers) }
    }

    /// Balancer nodes of a routed lab (0 for the single-balancer lab).
    #[must_use]
    pub fn nodes(&self) -> usize {
        self.routed.map_or(0, |(n, _)| n)
    }

    /// Node `i`'s namespace (routed lab).
    #[must_use]
    pub fn node_ns(&self, i: usize) -> String {
        self.ns(&format!("lb{}", i + 1))
    }

    /// The client's addresses besides its first: where held sessions come from.
    #[must_use]
    pub fn client_extra_addrs(&self) -> Vec<Ipv4Addr> {
        let net = if self.routed.is_some() { [198, 51, 100] } else { [192, 0, 2] };
        (0..CLIENT_EXTRA_COUNT).map(|k| Ipv4Addr::new(net[0], net[1], net[2], CLIENT_EXTRA_BASE + k)).collect()
    }

    /// The client's IPv6 addresses besides its first (2001:db8::50 ..; single-balancer lab).
    #[must_use]
    pub fn client_extra_addrs6(&self) -> Vec<Ipv6Addr> {
        (0..CLIENT_EXTRA_COUNT).map(|k| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50 + u16::from(k))).collect()
    }

    /// Node `i`'s state directory (its configs, sockets, logs, pids).
    #[must_use]
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.state.join(format!("lb{}", i + 1))
    }

    #[must_use]
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    #[must_use]
    pub fn broker_ns(&self, i: usize) -> String {
        self.ns(&format!("b{}", i + 1))
    }

    fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.ns("sw"), self.ns("client")];
        if self.routed.is_some() {
            v.push(self.ns("router"));
            v.extend((0..self.nodes()).map(|i| self.node_ns(i)));
        } else {
            v.push(self.ns("lb"));
        }
        v.extend((0..self.brokers).map(|i| self.broker_ns(i)));
        v
    }

    /// `CMD ARGS` in namespace `ns` ([`crate::netns::nsenter`]: network namespace only, so
    /// bpffs pins stay visible); its stdout.
    ///
    /// # Errors
    /// When the command fails.
    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        output(crate::netns::nsenter(ns, cmd).args(args))
    }

    fn ip(ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
    }

    fn link_pin(&self, ifname: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-lab-{ifname}", self.prefix))
    }

    /// Where a balancer in this lab pins its maps and link.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.prefix))
    }

    /// Where node `i` of a routed lab pins its maps and link.
    #[must_use]
    pub fn node_pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-lb{}", self.prefix, i + 1))
    }

    #[must_use]
    pub fn ca_pem(&self) -> PathBuf {
        self.state.join("ca.pem")
    }

    /// [`Self::config`] with the TLS listener (8883) checked by `mqtt-tls` against the lab CA,
    /// as a deployment with a TLS port would be: a plain MQTT probe of a TLS port fails.
    #[must_use]
    pub fn config_tls_checked(&self, health: &str) -> String {
        self.tls_checked(&self.config(health))
    }

    /// `config` with every TLS listener (8883) checked by `mqtt-tls` against the lab CA.
    #[must_use]
    pub fn tls_checked(&self, config: &str) -> String {
        let tls =
            format!("health = {{ check = \"mqtt-tls\", tls_ca = \"{}\", tls_server_name = \"{TLS_NAME}\" }}\n", self.ca_pem().display());
        config.replace("port = 8883\n", &format!("port = 8883\n{tls}"))
    }

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
    fn balancer_ports(&self) -> Vec<String> {
        if self.routed.is_some() { (0..self.nodes()).map(|i| format!("p-lb{}", i + 1)).collect() } else { vec!["p-lb".to_owned()] }
    }

    /// The routed lab's client side: the client behind the router, the router forwarding with
    /// ECMP hashing on ports, and (VRRP) its static route to the VIPs via the VRRP next hop.
    fn wire_router(&self) -> anyhow::Result<()> {
        let (client, router, sw) = (self.ns("client"), self.ns("router"), self.ns("sw"));
        sh("ip", &["link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "eth1", "netns", &router])?;
        Self::ip(&router, &["addr", "add", &format!("{ROUTER_CLIENT_SIDE}/24"), "dev", "eth1"])?;
        Self::ip(&router, &["link", "set", "eth1", "up"])?;
        Self::ip(&client, &["addr", "add", &format!("{ROUTED_CLIENT}/24"), "dev", "eth0"])?;
        for a in self.client_extra_addrs() {
            Self::ip(&client, &["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        Self::ip(&client, &["link", "set", "eth0", "up"])?;
        Self::ip(&client, &["route", "add", "default", "via", &ROUTER_CLIENT_SIDE.to_string()])?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            // ECMP by the 4-tuple, so one client's connections spread over the nodes.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "2"),
            ("net.ipv4.conf.eth0.rp_filter", "2"),
            ("net.ipv4.conf.eth1.rp_filter", "2"),
        ] {
            self.sysctl(&router, k, v)?;
        }
        // As in the single-balancer lab: full checksums from the client, and no GRO on the way to
        // the balancers (merged segments would be too big to bounce).
        self.exec(&client, "ethtool", &["-K", "eth0", "tx", "off"])?;
        for dev in ["eth0", "eth1"] {
            self.exec(&router, "ethtool", &["-K", dev, "gro", "off"])?;
        }
        self.exec(&sw, "ethtool", &["-K", "p-router", "gro", "off"])?;
        if let Some((_, Routing::Vrrp)) = self.routed {
            for vip in [VIP, VIP_INTERNAL] {
                Self::ip(&router, &["route", "add", &format!("{vip}/32"), "via", &VRRP_NEXT_HOP.to_string()])?;
            }
        }
        Ok(())
    }

    fn write_certs(&self) -> anyhow::Result<()> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca.distinguished_name.push(DnType::CommonName, "dsrlb lab CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
        let key = KeyPair::generate().context("server key")?;
        let mut params = CertificateParams::new(vec![TLS_NAME.to_owned()]).context("server params")?;
        params.distinguished_name.push(DnType::CommonName, TLS_NAME);
        for vip in [VIP, VIP_INTERNAL] {
            params.subject_alt_names.push(SanType::IpAddress(vip.into()));
        }
        params.subject_alt_names.push(SanType::IpAddress(VIP6.into()));
        let cert = params.signed_by(&key, &ca_cert, &ca_key).context("signing the server certificate")?;
        std::fs::write(self.ca_pem(), ca_cert.pem())?;
        std::fs::write(self.state.join("server.pem"), cert.pem())?;
        std::fs::write(self.state.join("server.key"), key.serialize_pem())?;
        Ok(())
    }

    fn broker_dir(&self, i: usize) -> PathBuf {
        self.state.join(format!("b{}", i + 1))
    }

    #[must_use]
    pub fn broker_log(&self, i: usize) -> PathBuf {
        self.broker_dir(i).join("mosquitto.log")
    }

    /// Starts (or restarts) mosquitto in broker `i`, with listeners on 1883, 8883 (TLS) and
    /// the internal port, and waits until it accepts connections on its real address.
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub fn start_broker(&self, i: usize) -> anyhow::Result<()> {
        self.start_broker_with(i, true)
    }

    /// As [`Self::start_broker`], optionally without the TLS listener (a "broken" 8883).
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub fn start_broker_with(&self, i: usize, tls: bool) -> anyhow::Result<()> {
        self.stop_broker(i)?;
        let dir = self.broker_dir(i);
        std::fs::create_dir_all(&dir)?;
        let pid = dir.join("mosquitto.pid");
        let _ = std::fs::remove_file(&pid);
        let mut conf = String::new();
        let _ = writeln!(conf, "pid_file {}\nuser root\npersistence false", pid.display());
        let _ = writeln!(conf, "log_dest file {}\nlog_type all\nconnection_messages true", self.broker_log(i).display());
        let _ = writeln!(conf, "allow_anonymous true\nmax_keepalive 3600");
        let _ = writeln!(conf, "listener 1883\nlistener {INTERNAL_PORT}");
        if tls {
            let _ = writeln!(
                conf,
                "listener 8883\ncertfile {}\nkeyfile {}",
                self.state.join("server.pem").display(),
                self.state.join("server.key").display()
            );
        }
        if i > 0 {
            // The brokers form one cluster, as EMQX nodes would: each bridges every topic to b1
            // (a star; mosquitto does not echo a message back over the bridge it came from), so
            // a subscriber and a publisher that land on different brokers still meet.
            let _ = writeln!(conf, "connection cluster-b{}\naddress {}:1883\ntopic # both 0", i + 1, broker_addr(0));
            let _ = writeln!(conf, "try_private true\nnotifications false\ncleansession true\nrestart_timeout 1 5");
        }
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let ns = self.broker_ns(i);
        self.exec(&ns, "mosquitto", &["-d", "-c", &conf_path.display().to_string()])
            .with_context(|| format!("starting mosquitto in {ns}"))?;
        let up = || {
            pid.exists()
                && crate::netns::in_netns(&self.ns("client"), || {
                    TcpStream::connect_timeout(&SocketAddr::from((broker_addr(i), 1883)), Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
        };
        if wait::within(Duration::from_secs(10), Duration::from_millis(50), up).is_none() {
            bail!("mosquitto in {ns} did not come up within 10 s; see {}", self.broker_log(i).display());
        }
        Ok(())
    }

    fn broker_pid(&self, i: usize) -> Option<i32> {
        std::fs::read_to_string(self.broker_dir(i).join("mosquitto.pid")).ok()?.trim().parse().ok()
    }

    /// Stops mosquitto in broker `i` (SIGTERM, then SIGKILL), by the PID it recorded.
    ///
    /// # Errors
    /// Never in practice; kept fallible for symmetry with start.
    pub fn stop_broker(&self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.broker_pid(i) {
            kill_and_wait(pid);
            let _ = std::fs::remove_file(self.broker_dir(i).join("mosquitto.pid"));
        }
        Ok(())
    }

    /// Removes the VIP from broker `i`'s `lo` (a misconfigured broker), or puts it back.
    ///
    /// # Errors
    /// When `ip addr` fails.
    pub fn set_broker_vip(&self, i: usize, present: bool) -> anyhow::Result<()> {
        let verb = if present { "add" } else { "del" };
        Self::ip(&self.broker_ns(i), &["addr", verb, &format!("{VIP}/32"), "dev", "lo"]).map(drop)
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

    /// A human status report.
    #[must_use]
    pub fn status(&self) -> String {
        let mut out = String::new();
        for ns in self.namespaces() {
            let exists = Path::new("/run/netns").join(&ns).exists();
            let _ = writeln!(out, "namespace {ns:<16} {}", if exists { "up" } else { "missing" });
        }
        for i in 0..self.brokers {
            let state = match self.broker_pid(i) {
                Some(pid) if alive(pid) => format!("mosquitto pid {pid}"),
                Some(pid) => format!("mosquitto pid {pid} (dead)"),
                None => "no mosquitto".to_owned(),
            };
            let _ = writeln!(out, "broker b{} {:<12} {state}", i + 1, broker_addr(i));
        }
        let balancers: Vec<(String, Ipv4Addr)> = if self.routed.is_some() {
            (0..self.nodes()).map(|i| (self.node_ns(i), node_addr(i))).collect()
        } else {
            vec![(self.ns("lb"), LB_ADDR)]
        };
        for (ns, addr) in balancers {
            let xdp = Self::ip(&ns, &["-d", "link", "show", "eth0"]).is_ok_and(|s| s.contains("prog/xdp"));
            let _ = writeln!(out, "balancer {ns} {addr} eth0: {}", if xdp { "XDP attached" } else { "no XDP program" });
        }
        if let Some((_, routing)) = self.routed {
            let routes = Self::ip(&self.ns("router"), &["route", "show", &format!("{VIP}/32")]).unwrap_or_default();
            let _ = writeln!(out, "router ({routing:?}): {VIP} {}", routes.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        let _ = writeln!(out, "VIPs {VIP} (1883, 8883 TLS), {VIP_INTERNAL} ({INTERNAL_PORT}); lab CA {}", self.ca_pem().display());
        out
    }

    /// [`Self::config`] with the brokers dual-stack (`address6`) and two IPv6 listeners,
    /// `mqtt6` on VIP6:1883 and `mqtts6` on VIP6:8883.
    #[must_use]
    pub fn config_dual(&self, health: &str) -> String {
        let mut c = self.config(health);
        for i in 0..self.brokers {
            let line = format!("address = \"{}\"\n", broker_addr(i));
            c = c.replacen(&line, &format!("{line}address6 = \"{}\"\n", broker_addr6(i)), 1);
        }
        let _ = writeln!(c, "[[listener]]\nname = \"mqtt6\"\nvip = \"{VIP6}\"\nport = 1883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtts6\"\nvip = \"{VIP6}\"\nport = 8883\n");
        c
    }

    /// IPv6 only: the brokers by their IPv6 addresses alone (MACs from NDP), the two IPv6
    /// listeners of [`Self::config_dual`].
    #[must_use]
    pub fn config_v6_only(&self, health: &str) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "interface = \"eth0\"\nxdp_mode = \"native\"\n\n[health]\n{health}\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtt6\"\nvip = \"{VIP6}\"\nport = 1883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtts6\"\nvip = \"{VIP6}\"\nport = 8883\n");
        for i in 0..self.brokers {
            let _ = writeln!(c, "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n", i + 1, broker_addr6(i));
        }
        c
    }

    /// A `dsrlb` config for this lab: interface `eth0` of the balancer namespace, MACs from the
    /// neighbour table, three listeners; `health` is the `[health]` table's body.
    #[must_use]
    pub fn config(&self, health: &str) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "interface = \"eth0\"\nxdp_mode = \"native\"\n\n[health]\n{health}\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtt\"\nvip = \"{VIP}\"\nport = 1883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtts\"\nvip = \"{VIP}\"\nport = 8883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"internal\"\nvip = \"{VIP_INTERNAL}\"\nport = {INTERNAL_PORT}\n");
        for i in 0..self.brokers {
            let _ = writeln!(c, "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n", i + 1, broker_addr(i));
        }
        if let Some((nodes, routing)) = self.routed {
            if routing == Routing::Bgp {
                let _ = writeln!(c, "[announce]\nwithdraw_wait = \"5s\"\n");
            }
            let list: Vec<String> = (0..nodes).map(|i| format!("\"{}:{SYNC_PORT}\"", node_addr(i))).collect();
            // A sync_interval longer than join_wait: a restarted node must get the others'
            // exceptions at once, not at their next round (after join_wait gave up on them).
            // The nodes prove a shared key to each other (owner-only, as dsrlb requires).
            let key = self.state.join("cluster.key");
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&key)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"dsrlb lab cluster key, not a secret\n"));
            }
            let _ = writeln!(
                c,
                "[cluster]\nnodes = [{}]\nsync_interval = \"30s\"\njoin_wait = \"10s\"\nkey_file = \"{}\"\n",
                list.join(", "),
                key.display()
            );
        }
        c
    }
}

/// The repository's `deploy/` directory (configs the routed lab runs as shipped).
#[must_use]
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `text` with each (from, to) replaced exactly `count` times, or an error naming what was
/// not found: the lab runs the shipped configs, changing only what differs per node.
fn substitute(text: &str, what: &str, edits: &[(&str, &str, usize)]) -> anyhow::Result<String> {
    let mut out = text.to_owned();
    for (from, to, count) in edits {
        let n = out.matches(from).count();
        anyhow::ensure!(n == *count, "{what}: {from:?} appears {n} times, the lab expects {count}");
        out = out.replace(from, to);
    }
    Ok(out)
}

impl Lab {
    fn router_dir(&self) -> PathBuf {
        self.state.join("router")
    }

    /// BIRD on the router: eBGP with every node (BFD on), their VIP routes installed as one
    /// ECMP route (`merge paths`).
    fn start_bird_router(&self) -> anyhow::Result<()> {
        let dir = self.router_dir();
        std::fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "router id {ROUTER_LAN};\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol bfd {{ interface \"eth0\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}\n\
             template bgp nodes {{ local {ROUTER_LAN} as {ROUTER_AS}; hold time 3; bfd on; error wait time 1, 10; connect delay time 1; \
             connect retry time 5; ipv4 {{ import all; export none; }}; }}\n"
        );
        for i in 0..self.nodes() {
            let _ = writeln!(conf, "protocol bgp lb{} from nodes {{ neighbor {} as {NODES_AS}; }}", i + 1, node_addr(i));
        }
        self.start_bird(&self.ns("router"), &dir, &conf)
    }

    /// BIRD on node `i`: `deploy/bird.conf` as shipped, with this node's address.
    ///
    /// # Errors
    /// When the shipped config no longer has what the lab changes, or BIRD does not start.
    pub fn start_bird_node(&self, i: usize) -> anyhow::Result<()> {
        let shipped = std::fs::read_to_string(deploy_dir().join("bird.conf")).context("reading deploy/bird.conf")?;
        let addr = node_addr(i).to_string();
        let conf = substitute(&shipped, "deploy/bird.conf", &[("192.0.2.2", &addr, 2)])?;
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        self.start_bird(&self.node_ns(i), &dir, &conf)
    }

    fn start_bird(&self, ns: &str, dir: &Path, conf: &str) -> anyhow::Result<()> {
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf)?;
        let (ctl, pid) = (dir.join("bird.ctl"), dir.join("bird.pid"));
        let _ = std::fs::remove_file(&pid);
        self.exec(ns, "bird", &["-c", &path.display().to_string(), "-s", &ctl.display().to_string(), "-P", &pid.display().to_string()])
            .with_context(|| format!("starting BIRD in {ns}"))?;
        Ok(())
    }

    /// Stops BIRD on node `i` (its BGP session goes down).
    pub fn stop_bird_node(&self, i: usize) {
        if let Some(pid) = read_pid(&self.node_dir(i).join("bird.pid")) {
            kill_and_wait(pid);
        }
    }

    /// `birdc show ...` on node `i` (`None`: the router).
    ///
    /// # Errors
    /// When birdc fails.
    pub fn birdc(&self, node: Option<usize>, args: &[&str]) -> anyhow::Result<String> {
        let dir = node.map_or_else(|| self.router_dir(), |i| self.node_dir(i));
        let mut full = vec!["-s".to_owned(), dir.join("bird.ctl").display().to_string()];
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        sh("birdc", &refs)
    }

    /// The next hops the router's kernel has for `vip` (one per node it routes the VIP to).
    #[must_use]
    pub fn router_next_hops(&self, vip: Ipv4Addr) -> Vec<Ipv4Addr> {
        let text = Self::ip(&self.ns("router"), &["route", "show", &format!("{vip}/32")]).unwrap_or_default();
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut hops: Vec<Ipv4Addr> = words.windows(2).filter(|w| w[0] == "via").filter_map(|w| w[1].parse().ok()).collect();
        hops.sort();
        hops
    }

    /// keepalived on node `i`: `deploy/keepalived.conf` as shipped, with this node's router id
    /// and priority, and the lab's `dsrlb` binary and socket in its check script. Its log goes
    /// to the node's directory.
    ///
    /// # Errors
    /// When the shipped config no longer has what the lab changes, or keepalived does not start.
    pub fn start_keepalived(&self, i: usize, dsrlb: &Path, socket: &Path) -> anyhow::Result<()> {
        let shipped = std::fs::read_to_string(deploy_dir().join("keepalived.conf")).context("reading deploy/keepalived.conf")?;
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        // keepalived runs only scripts no one but root can change: a copy in the lab's own
        // directory (the build tree may sit under a world-writable /tmp).
        let bin = self.state.join("dsrlb-keepalived");
        if !bin.exists() {
            std::fs::copy(dsrlb, &bin).context("copying dsrlb for keepalived's check script")?;
        }
        let script = format!("script \"{} --socket {} ping\"", bin.display(), socket.display());
        let router_id = format!("router_id dsrlb_{}", char::from(b'a' + u8::try_from(i).expect("few nodes")));
        let priority = format!("priority {}", 150 - 50 * i);
        let conf = substitute(
            &shipped,
            "deploy/keepalived.conf",
            &[("script \"/usr/bin/dsrlb ping\"", &script, 1), ("router_id dsrlb_a", &router_id, 1), ("priority 150", &priority, 1)],
        )?;
        let path = dir.join("keepalived.conf");
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join("keepalived.log"))?;
        let child = crate::netns::nsenter(&self.node_ns(i), "keepalived")
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp", "-f"])
            .arg(&path)
            .arg("-p")
            .arg(dir.join("keepalived-main.pid"))
            .arg("-r")
            .arg(dir.join("keepalived-vrrp.pid"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting keepalived")?;
        std::fs::write(dir.join("keepalived.pid"), child.id().to_string())?;
        Ok(())
    }

    /// Stops keepalived on node `i`.
    pub fn stop_keepalived(&self, i: usize) {
        for f in ["keepalived.pid", "keepalived-vrrp.pid", "keepalived-main.pid"] {
            if let Some(pid) = read_pid(&self.node_dir(i).join(f)) {
                kill_and_wait(pid);
            }
        }
    }

    /// Whether node `i` holds the VRRP next hop (it is the master).
    #[must_use]
    pub fn holds_next_hop(&self, i: usize) -> bool {
        Self::ip(&self.node_ns(i), &["-4", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(&format!("{VRRP_NEXT_HOP}/")))
    }

    /// Takes node `i`'s carrier away (its switch port down) or gives it back; its own
    /// interface stays administratively up.
    ///
    /// # Errors
    /// When `ip link` fails.
    pub fn set_node_carrier(&self, i: usize, up: bool) -> anyhow::Result<()> {
        Self::ip(&self.ns("sw"), &["link", "set", &format!("p-lb{}", i + 1), if up { "up" } else { "down" }]).map(drop)
    }

    /// The VIP routes dsrlb keeps for node `i`'s BGP speaker (table 213, protocol 213).
    #[must_use]
    pub fn node_announced(&self, i: usize) -> Vec<String> {
        Self::ip(&self.node_ns(i), &["-4", "route", "show", "table", "213", "proto", "213"])
            .map(|out| out.lines().filter_map(|l| l.split_whitespace().find(|w| *w != "blackhole").map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// Cuts node `i` off the segment (its link goes down, as a failed host's would), or
    /// connects it again.
    ///
    /// # Errors
    /// When `ip link` fails.
    pub fn set_node_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        Self::ip(&self.ns("sw"), &["link", "set", &format!("p-lb{}", i + 1), state])?;
        Self::ip(&self.node_ns(i), &["link", "set", "eth0", state]).map(drop)
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A lab for one test: up on creation, down on drop (also when the test panics).
pub struct LabGuard(pub Lab);

impl LabGuard {
    /// # Panics
    /// When the lab cannot be brought up.
    #[must_use]
    pub fn up(brokers: usize) -> Self {
        Self::up_lab(Lab::new("dsrlbt", brokers))
    }

    /// A routed lab of `nodes` balancer nodes.
    ///
    /// # Panics
    /// When the lab cannot be brought up.
    #[must_use]
    pub fn routed(brokers: usize, nodes: usize, routing: Routing) -> Self {
        Self::up_lab(Lab::routed("dsrlbt", brokers, nodes, routing))
    }

    fn up_lab(lab: Lab) -> Self {
        // A lab of another size or kind may be left over from an aborted run.
        let _ = Lab::new("dsrlbt", 4).down();
        let _ = Lab::routed("dsrlbt", 4, 3, Routing::Bgp).down();
        lab.up().expect("bringing the test lab up");
        Self(lab)
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("lab down failed: {e:#}");
        }
    }
}

/// One "New client connected" line of a mosquitto log: client address and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub from: SocketAddr,
    pub client_id: String,
}

/// `192.0.2.1:40000` or `2001:db8::1:40000` (mosquitto writes IPv6 without brackets).
fn parse_peer(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.rsplit_once(':')?;
    Some(SocketAddr::new(ip.trim_matches(['[', ']']).parse().ok()?, port.parse().ok()?))
}

impl Lab {
    /// `GET /metrics` from the balancer's controller (`127.0.0.1:9877` in its namespace): the
    /// whole HTTP response.
    ///
    /// # Panics
    /// When the endpoint does not answer.
    #[must_use]
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        crate::netns::in_netns(&self.ns("lb"), || {
            let mut s = TcpStream::connect("127.0.0.1:9877").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            out
        })
        .expect("lb namespace")
    }

    /// Sessions broker `i` has logged, oldest first.
    #[must_use]
    pub fn sessions(&self, i: usize) -> Vec<Session> {
        let log = std::fs::read_to_string(self.broker_log(i)).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let rest = line.split_once("New client connected from ")?.1;
                let (from, rest) = rest.split_once(" as ")?;
                let id = rest.split_whitespace().next()?;
                Some(Session { from: parse_peer(from)?, client_id: id.to_owned() })
            })
            .collect()
    }

    /// How many of the client ids `{prefix}-0..n` each broker logged; waits up to 5 s for the
    /// logs to catch up.
    #[must_use]
    pub fn landed(&self, prefix: &str, n: usize) -> Vec<usize> {
        let counts = || {
            let mut counts = vec![0usize; self.brokers];
            for (b, count) in counts.iter_mut().enumerate() {
                let ids: std::collections::BTreeSet<String> = self.sessions(b).into_iter().map(|s| s.client_id).collect();
                *count = (0..n).filter(|i| ids.contains(&format!("{prefix}-{i}"))).count();
            }
            counts
        };
        wait::within(Duration::from_secs(5), Duration::from_millis(100), || Some(counts()).filter(|c| c.iter().sum::<usize>() >= n))
            .unwrap_or_else(counts)
    }

    /// Which broker (index) logged client id `id`, if one did.
    #[must_use]
    pub fn broker_of(&self, id: &str) -> Option<usize> {
        (0..self.brokers).find(|&i| self.sessions(i).iter().any(|s| s.client_id == id))
    }
}

fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// Whether `pid` runs: it exists and is not a zombie waiting for a parent to reap it.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM, up to 3 s, then SIGKILL.
pub fn kill_and_wait(pid: i32) {
    if pid <= 1 || !alive(pid) {
        return;
    }
    // SAFETY: kill(2) on a recorded pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let gone = wait::within(Duration::from_secs(3), wait::EVERY, || {
        // Reap it if it is our child (a zombie still answers signal 0).
        // SAFETY: non-blocking waitpid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        !alive(pid)
    });
    if gone.is_none() {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}

/// Frames seen on the balancer's bridge port (`p-lb` in the switch namespace), where every
/// frame to or from the balancer crosses, those it bounces with `XDP_TX` included: to the VIP,
/// and from the VIP (as a test's classifier says).
#[derive(Default)]
pub struct WireCount {
    pub ready: std::sync::atomic::AtomicBool,
    pub to_vip: std::sync::atomic::AtomicUsize,
    pub from_vip: std::sync::atomic::AtomicUsize,
}

impl WireCount {
    /// Counts frames until `stop` (at most a minute); `classify` says of a frame whether it goes
    /// to the VIP and whether it comes from it.
    ///
    /// # Panics
    /// When the switch namespace cannot be entered.
    pub fn count(&self, lab: &Lab, stop: &std::sync::atomic::AtomicBool, classify: impl Fn(&[u8]) -> (bool, bool) + Send + Sync) {
        use std::sync::atomic::Ordering::SeqCst;
        crate::netns::in_netns(&lab.ns("sw"), || {
            let sock = crate::netns::PacketSocket::open("p-lb");
            self.ready.store(true, SeqCst);
            wait::repeat(Duration::from_mins(1), stop, || {
                if let Some(f) = sock.recv() {
                    let (to, from) = classify(&f);
                    self.to_vip.fetch_add(usize::from(to), SeqCst);
                    self.from_vip.fetch_add(usize::from(from), SeqCst);
                }
            });
        })
        .expect("switch namespace");
    }
}
