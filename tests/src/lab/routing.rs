//! The routed lab's way to its nodes: the router and the client behind it, BIRD (BGP with BFD,
//! ECMP over the nodes) on the router and the nodes, keepalived (VRRP) on the nodes, and the
//! nodes' links, carriers and announcements.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::{
    Lab, NODES_AS, ROUTED_CLIENT, ROUTER_AS, ROUTER_CLIENT_SIDE, ROUTER_LAN, Routing, VIP, VIP_INTERNAL, VRRP_NEXT_HOP, kill_and_wait,
    node_addr, read_pid, sh,
};

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
    /// The routed lab's client side: the client behind the router, the router forwarding with
    /// ECMP hashing on ports, and (VRRP) its static route to the VIPs via the VRRP next hop.
    pub(super) fn wire_router(&self) -> anyhow::Result<()> {
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

    fn router_dir(&self) -> PathBuf {
        self.state.join("router")
    }

    /// BIRD on the router: eBGP with every node (BFD on), their VIP routes installed as one
    /// ECMP route (`merge paths`).
    pub(super) fn start_bird_router(&self) -> anyhow::Result<()> {
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
