//! What the lab shows: a status report, the balancer's metrics, the sessions the brokers
//! logged, and frames counted on the balancer's bridge port.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use super::{INTERNAL_PORT, LB_ADDR, Lab, VIP, VIP_INTERNAL, alive, node_addr};
use crate::wait;

impl Lab {
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
            let how = if self.behind_router(i) { if i == 1 { " (ipip)" } else { " (gue)" } } else { "" };
            let _ = writeln!(out, "broker b{} {:<12}{how} {state}", i + 1, self.broker_ip(i));
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
