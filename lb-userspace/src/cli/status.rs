//! `dsrlb status` and `dsrlb stats` as a table, from the controller's [`Status`].

use std::{fmt::Write as _, net::SocketAddr};

use lb_userspace::control::status::{AnnounceStatus, BackendStatus, ClusterStatus, ListenerStatus, Status};

/// The whole status: each listener with its backends, the flow table, then `[announce]` and
/// `[cluster]`.
pub fn table(s: &Status) -> String {
    let mut out = String::new();
    for l in &s.listeners {
        listener(l, &mut out);
    }
    let _ = write!(out, "flow table entries (live): {}", s.flow_table_entries);
    let took = |what: &str, ms: Option<u64>| ms.map(|ms| format!("{what} {ms} ms")).unwrap_or_default();
    let walks: Vec<String> =
        [took("walk", s.flow_walk_ms), took("expiry sweep", s.flow_sweep_ms)].into_iter().filter(|t| !t.is_empty()).collect();
    if walks.is_empty() {
        let _ = writeln!(out);
    } else {
        let _ = writeln!(out, " (last {})", walks.join(", "));
    }
    if let Some(n) = &s.next_program {
        let _ = writeln!(out, "next program: {} ({}) at {}: every frame the balancer passes", n.id, n.name, n.path.display());
    }
    let line: Vec<String> = s.flow_table.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "flow table events: {}", line.join("  "));
    if let Some(n) = s.verdicts.get("pass/not_our_mac").filter(|n| **n > 0) {
        let _ = writeln!(out, "frames for another MAC passed: {n}");
    }
    if let Some(a) = &s.announce {
        announce(a, &mut out);
    }
    if let Some(c) = &s.cluster {
        cluster(c, &mut out);
    }
    out
}

/// A listener's lines: its counters and settings, then a row per backend.
fn listener(l: &ListenerStatus, out: &mut String) {
    let _ = writeln!(
        out,
        "listener {} {} hash={}  packets {}  new flows {}  idle timeout {}",
        l.name,
        SocketAddr::new(l.vip, l.port),
        l.hash.as_str(),
        l.packets,
        l.new_flows,
        l.flow_idle_timeout
    );
    if l.fail_open {
        let _ = writeln!(out, "  FAILING OPEN: every backend is marked down; new flows go to all of them (all_down = \"forward\")");
    }
    if let Some(rate) = l.max_conn_rate {
        let burst = l.max_conn_burst.map_or_else(|| "null".to_owned(), |b| b.to_string());
        let _ = writeln!(out, "  max_conn_rate {rate}/s (burst {burst}): {} SYNs dropped", l.conn_rate_dropped);
    }
    if l.icmp_too_big > 0 {
        let _ = writeln!(out, "  ICMP frag-needed forwarded: {}", l.icmp_too_big);
    }
    // The address each backend has for this listener's family.
    let v6 = l.vip.is_ipv6();
    let width = l.backends.iter().map(|b| address(b, v6).len()).max().unwrap_or(0).max(15);
    let _ = writeln!(
        out,
        "  {:<12} {:<width$} {:<18} {:>6} {:>8} {:>8} {:>10} {:>10}  last check",
        "backend", "address", "state", "weight", "flows", "pkts/s", "new/s", "packets"
    );
    for b in &l.backends {
        backend(b, &address(b, v6), width, out);
    }
}

/// The backend's address for a listener of that family (`address6` for an IPv6 VIP), and how
/// it is reached when that is a tunnel.
fn address(b: &BackendStatus, v6: bool) -> String {
    let a = if v6 { b.address6.map(|a| a.to_string()) } else { b.address.map(|a| a.to_string()) }.unwrap_or_default();
    match b.forward {
        crate::config::Forward::L2 => a,
        f => format!("{a} ({})", f.name()),
    }
}

fn backend(b: &BackendStatus, address: &str, width: usize, out: &mut String) {
    let mut state = b.state.clone();
    if b.drained {
        state += ",drained";
    }
    if b.resetting_flows {
        state += ",reset";
    }
    if b.unchecked.is_some() {
        state += ",unchecked";
    }
    let _ = writeln!(
        out,
        "  {:<12} {address:<width$} {:<18} {:>6} {:>8} {:>8.0} {:>10.1} {:>10}  {}",
        b.name, state, b.weight, b.flows, b.packets_per_sec, b.new_flows_per_sec, b.packets, b.last_check
    );
    if let Some(why) = &b.unchecked {
        let _ =
            writeln!(out, "    UNCHECKED: {why} (this host's fault, not the broker's: its state is kept; {} such rounds)", b.local_errors);
    }
}

/// The announcement line of `dsrlb status`.
fn announce(a: &AnnounceStatus, out: &mut String) {
    let vips: Vec<String> =
        a.vips.iter().map(|v| format!("{} {} ({})", v.vip, if v.announced { "announced" } else { "withdrawn" }, v.why)).collect();
    let _ = writeln!(out, "announce (table {}): {}", a.table, vips.join("; "));
    if let Some(e) = &a.error {
        let _ = writeln!(out, "  ANNOUNCE FAILED: {e}");
    }
}

/// The cluster lines of `dsrlb status`: this node, then a line per peer.
fn cluster(c: &ClusterStatus, out: &mut String) {
    let joined = if c.joined {
        format!("joined ({})", c.joined_how.as_deref().unwrap_or("without waiting"))
    } else {
        "JOINING (not announcing, ping fails)".to_owned()
    };
    let walk = c
        .last_walk
        .map_or_else(|| "no walk yet".to_owned(), |w| format!("{} exceptions at the last walk ({} s ago)", w.exceptions, w.ago_s));
    let m = &c.merged;
    let auth = if c.insecure { "INSECURE (no key_file: peers are not authenticated)" } else { "authenticated (key_file)" };
    let _ = writeln!(
        out,
        "cluster: node {} {auth} {joined}; {walk}; received flows inserted {} refreshed {} kept {} full {} unknown {}",
        c.me, m.inserted, m.refreshed, m.kept, m.full, m.unknown
    );
    for p in &c.peers {
        let dir = |up: bool, err: &Option<String>| match (up, err) {
            (true, _) => "up".to_owned(),
            (false, Some(e)) => format!("down ({e})"),
            (false, None) => "down".to_owned(),
        };
        let _ = writeln!(
            out,
            "  peer {:<21} out {}  in {}{}  config {}  flows sent {} received {}",
            p.node,
            dir(p.out_connected, &p.out_error),
            dir(p.in_connected, &p.in_error),
            if p.synced { " synced" } else { "" },
            p.config.as_str(),
            p.flows_sent,
            p.flows_received
        );
    }
}

#[cfg(test)]
mod tests {
    use lb_userspace::{control::status::ClusterStatus, exceptions::MergeCounts};

    use super::*;

    /// `dsrlb status` says whether the cluster sync authenticates its peers.
    #[test]
    fn the_status_says_when_the_cluster_sync_is_insecure() {
        let status = |insecure: bool| {
            let c = ClusterStatus {
                me: "192.0.2.2:9878".to_owned(),
                insecure,
                joined: true,
                joined_how: Some("with every running node's exceptions".to_owned()),
                fingerprint: String::new(),
                last_walk: None,
                merged: MergeCounts::default(),
                peers: Vec::new(),
            };
            let mut out = String::new();
            cluster(&c, &mut out);
            out
        };
        let out = status(true);
        assert!(out.starts_with("cluster: node 192.0.2.2:9878 INSECURE (no key_file: peers are not authenticated) joined"), "{out}");
        let out = status(false);
        assert!(out.starts_with("cluster: node 192.0.2.2:9878 authenticated (key_file) joined"), "{out}");
    }

    /// A listener's backends show the address of its family: an IPv6 listener's, `address6`.
    #[test]
    fn each_listener_shows_the_backends_address_of_its_family() {
        use lb_userspace::{
            config::{AllDown, CheckKind, OnDown},
            control::status::Hash,
        };
        let b1 = BackendStatus {
            name: "b1".to_owned(),
            address: Some("192.0.2.11".parse().expect("v4")),
            address6: Some("2001:db8::11".parse().expect("v6")),
            mac: "02:00:00:00:00:0b".to_owned(),
            forward: lb_userspace::config::Forward::Gue,
            weight: 100,
            drained: false,
            state: "up".to_owned(),
            resetting_flows: false,
            check: CheckKind::Mqtt,
            last_check: String::new(),
            check_failures: 0,
            checks: 0,
            unchecked: None,
            local_errors: 0,
            flows: 0,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            packets_per_sec: 0.0,
            new_flows_per_sec: 0.0,
            check_seconds: None,
        };
        let listener = |name: &str, vip: &str| ListenerStatus {
            name: name.to_owned(),
            vip: vip.parse().expect("VIP"),
            port: 1883,
            hash: Hash::FourTuple,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            flow_idle_timeout: "30m".to_owned(),
            max_conn_rate: None,
            max_conn_burst: None,
            conn_rate_dropped: 0,
            icmp_too_big: 0,
            on_down: OnDown::Keep,
            on_down_grace: "20s".to_owned(),
            all_down: AllDown::Forward,
            fail_open: false,
            backends: vec![b1.clone()],
        };
        let s = Status { listeners: vec![listener("mqtt", "192.0.2.100"), listener("mqtt6", "2001:db8::100")], ..Status::default() };
        let text = table(&s);
        let line = |name: &str| {
            let from = text.find(&format!("listener {name} ")).unwrap_or_else(|| panic!("{name} in {text}"));
            text[from..].lines().find(|l| l.trim_start().starts_with("b1 ")).expect("the b1 line").to_owned()
        };
        assert!(line("mqtt").contains("192.0.2.11") && !line("mqtt").contains("2001:db8::11"), "{text}");
        assert!(line("mqtt6").contains("2001:db8::11") && !line("mqtt6").contains("192.0.2.11"), "{text}");
        assert!(line("mqtt").contains("192.0.2.11 (gue)"), "a tunnelled backend shows how it is reached: {text}");
    }
}
