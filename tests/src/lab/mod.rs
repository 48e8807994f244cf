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
//! A tunnelled lab ([`Lab::tunnelled`]) keeps the single balancer and moves the brokers but
//! the first into another subnet behind a router, as brokers in another rack or zone are: the
//! balancer reaches them only through the router, over IPIP (b2) or GUE (b3), and they answer
//! the clients directly through the router. Each runs `dsrlb decap` (set up by
//! `deploy/backend-setup.sh --decap`).
//!
//! ```text
//! client 192.0.2.1 ─┬─ dsrlb-sw br0 ─┬─ balancer 192.0.2.2 (tunnels to b2, b3)
//!                   │                ├─ b1 192.0.2.11 (l2)
//!                   │                └─ router dc 192.0.2.254 | 198.18.1.1 ── br1 ─┬─ b2 198.18.1.12 (ipip)
//!                   ◀──────── replies from b2, b3 through the router ─────────────└─ b3 198.18.1.13 (gue)
//! ```
//!
//! Everything the lab starts is recorded in its state directory (pids, pinned links), so `down`
//! removes it by PID even after the process that made it crashed.
//!
//! The code is in four parts: `topology` builds and removes the namespaces and links,
//! `brokers` runs mosquitto, `routing` runs the routed lab's router, BIRD and keepalived,
//! and `observe` reads what the lab saw. This module holds the lab's names, addresses and
//! paths, the configs it gives dsrlb, and the guard that takes it down.

mod brokers;
mod observe;
mod routing;
mod topology;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

pub use self::{
    observe::{Session, WireCount},
    routing::deploy_dir,
};
use crate::wait;

/// What a DSR backend whose VIPs are on `lo` sets on its `eth0`: it answers ARP only for its own
/// addresses (never for a VIP), and accepts frames whose source it would not route back the
/// same way (loose reverse-path filter).
pub const DSR_BACKEND_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
    ("net.ipv4.conf.eth0.arp_ignore", "1"),
    ("net.ipv4.conf.eth0.arp_announce", "2"),
    ("net.ipv4.conf.all.rp_filter", "2"),
    ("net.ipv4.conf.eth0.rp_filter", "2"),
];
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

/// Tunnelled lab: the brokers' router, on the segment and on the brokers' network; the
/// brokers' network.
pub const DC_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
pub const DC_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
pub const DC_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const DC_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
/// Tunnelled lab: VIPs served by one tunnelled broker each (b2 over IPIP, b3 over GUE), both
/// families, listeners on 1883 and 8883.
pub const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 102);
pub const VIP_GUE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 103);
pub const VIP6_IPIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x102);
pub const VIP6_GUE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x103);

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
    /// The brokers but the first behind a router, reached over tunnels (single balancer).
    pub tunnelled: bool,
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
        Self { prefix: prefix.to_owned(), brokers, state: PathBuf::from(format!("/run/{prefix}-lab")), routed: None, tunnelled: false }
    }

    /// The single-balancer lab with broker b2 and after behind a router (see the module's doc).
    #[must_use]
    pub fn tunnelled(prefix: &str, brokers: usize) -> Self {
        Self { tunnelled: true, ..Self::new(prefix, brokers) }
    }

    /// Whether broker `i` sits behind the tunnelled lab's router.
    #[must_use]
    pub const fn behind_router(&self, i: usize) -> bool {
        self.tunnelled && i > 0
    }

    /// Broker `i`'s own address in this lab.
    #[must_use]
    pub fn broker_ip(&self, i: usize) -> Ipv4Addr {
        if self.behind_router(i) { Ipv4Addr::new(198, 18, 1, 11 + u8::try_from(i).expect("few brokers")) } else { broker_addr(i) }
    }

    /// Broker `i`'s own IPv6 address in this lab.
    #[must_use]
    pub fn broker_ip6(&self, i: usize) -> Ipv6Addr {
        if self.behind_router(i) {
            Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0x11 + u16::try_from(i).expect("few brokers"))
        } else {
            broker_addr6(i)
        }
    }

    /// Where broker `i`'s decap program is pinned (tunnelled lab).
    #[must_use]
    pub fn decap_pin_root(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-decap-b{}", self.prefix, i + 1))
    }

    /// The VIPs every broker holds on `lo`.
    #[must_use]
    pub fn vips(&self) -> Vec<std::net::IpAddr> {
        let mut v: Vec<std::net::IpAddr> = vec![VIP.into(), VIP_INTERNAL.into()];
        if self.routed.is_none() {
            v.push(VIP6.into());
        }
        if self.tunnelled {
            v.extend::<[std::net::IpAddr; 4]>([VIP_IPIP.into(), VIP_GUE.into(), VIP6_IPIP.into(), VIP6_GUE.into()]);
        }
        v
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
        if self.tunnelled {
            v.push(self.ns("dc"));
        }
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

    /// The tunnelled lab's config: b1 on the segment, b2 over IPIP and b3 over GUE (both
    /// families); `mqtt`/`mqtts` (VIP:1883, 8883; `mqtt6`, VIP6:1883) over all three, and one
    /// VIP per tunnel mode with listeners on 1883 and 8883 (TLS, checked by `mqtt-tls`) in both
    /// families over its broker alone.
    #[must_use]
    pub fn config_tunnelled(&self, health: &str) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "interface = \"eth0\"\nxdp_mode = \"native\"\n\n[health]\n{health}\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtt\"\nvip = \"{VIP}\"\nport = 1883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtts\"\nvip = \"{VIP}\"\nport = 8883\n");
        let _ = writeln!(c, "[[listener]]\nname = \"mqtt6\"\nvip = \"{VIP6}\"\nport = 1883\n");
        for (mode, backend, vip, vip6) in [("ipip", "b2", VIP_IPIP, VIP6_IPIP), ("gue", "b3", VIP_GUE, VIP6_GUE)] {
            for (suffix, port) in [("", 1883), ("-tls", 8883)] {
                let _ =
                    writeln!(c, "[[listener]]\nname = \"{mode}{suffix}\"\nvip = \"{vip}\"\nport = {port}\nbackends = [\"{backend}\"]\n");
                let _ =
                    writeln!(c, "[[listener]]\nname = \"{mode}6{suffix}\"\nvip = \"{vip6}\"\nport = {port}\nbackends = [\"{backend}\"]\n");
            }
        }
        for i in 0..self.brokers {
            let forward = match i {
                0 => "l2",
                1 => "ipip",
                _ => "gue",
            };
            let _ = writeln!(
                c,
                "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\naddress6 = \"{}\"\nforward = \"{forward}\"\n",
                i + 1,
                self.broker_ip(i),
                self.broker_ip6(i)
            );
        }
        self.tls_checked(&c)
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
        c.push_str(&self.cluster_config());
        c
    }

    /// A routed lab's `[announce]` (BGP) and `[cluster]` sections: the nodes' sync addresses and
    /// the shared key (written to the state directory, owner-only); empty for the other labs.
    #[must_use]
    pub fn cluster_config(&self) -> String {
        let mut c = String::new();
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

    /// The tunnelled lab (see [`Lab::tunnelled`]).
    ///
    /// # Panics
    /// When the lab cannot be brought up.
    #[must_use]
    pub fn tunnelled(brokers: usize) -> Self {
        Self::up_lab(Lab::tunnelled("dsrlbt", brokers))
    }

    fn up_lab(lab: Lab) -> Self {
        // A lab of another size or kind may be left over from an aborted run.
        let _ = Lab::tunnelled("dsrlbt", 4).down();
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
