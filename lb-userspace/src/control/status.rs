//! What `dsrlb status` answers: one [`Status`], built once by the controller and read by the
//! CLI's table, `--json`, the Prometheus endpoint and the tests. It serializes to the JSON the
//! status has always had (field names and values); a renamed field fails to build.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::{
    cluster::PeerStatus,
    config::{AllDown, CheckKind, OnDown},
    exceptions::MergeCounts,
};

/// Everything `dsrlb status` shows. A field the controller does not send reads as empty: a CLI
/// can show what a controller of another version answers (and a stand-in's answer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The balancer's interface.
    pub interface: String,
    /// The MACs it forwards frames for: its own first, then `accept_macs`.
    pub macs: Vec<String>,
    /// Nanoseconds per kernel jiffy, as the program's flow clock counts.
    pub clock_tick_ns: u32,
    pub listeners: Vec<ListenerStatus>,
    /// Live flows per backend, over all its listeners.
    pub flows_per_backend: BTreeMap<String, usize>,
    /// Live flows in the table.
    pub flow_table_entries: usize,
    /// The XDP program frames the balancer passes go on to (`next_program`).
    pub next_program: Option<NextProgram>,
    /// Flow table inserts by outcome, and `expired`: flows removed for idleness.
    pub flow_table: BTreeMap<String, u64>,
    /// How long the last walk of the flow table for live flows took, in milliseconds (the walk
    /// behind `flow_table_entries`; `None` before the first).
    pub flow_walk_ms: Option<u64>,
    /// How long the last expiry sweep of the flow table took, in milliseconds.
    pub flow_sweep_ms: Option<u64>,
    /// Frames by `verdict/reason`.
    pub verdicts: BTreeMap<String, u64>,
    pub reloads: Reloads,
    /// `[announce]`: what this node announces to the routers, and why.
    pub announce: Option<AnnounceStatus>,
    /// `[cluster]`: this node, its join, its walks and its peers.
    pub cluster: Option<ClusterStatus>,
}

/// One listener and its backends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub hash: Hash,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// As the config writes durations (`5m`).
    pub flow_idle_timeout: String,
    pub max_conn_rate: Option<u32>,
    pub max_conn_burst: Option<u32>,
    /// SYNs dropped by `max_conn_rate`.
    pub conn_rate_dropped: u64,
    /// ICMP fragmentation-needed forwarded to the broker of the flow they quote.
    pub icmp_too_big: u64,
    pub on_down: OnDown,
    pub on_down_grace: String,
    pub all_down: AllDown,
    /// Every backend is marked down and new flows go to all of them (`all_down = "forward"`).
    pub fail_open: bool,
    pub backends: Vec<BackendStatus>,
}

/// How a listener hashes, as status names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hash {
    #[serde(rename = "4tuple")]
    FourTuple,
    #[serde(rename = "source")]
    Source,
}

impl Hash {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FourTuple => "4tuple",
            Self::Source => "source",
        }
    }
}

/// One backend of a listener: its health for that listener, weight, flows and counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    /// Its MAC (a tunnelled backend's: its next hop's), or `unresolved`.
    pub mac: String,
    /// `l2`, `ipip` or `gue` (absent from an older controller's answer: `l2`).
    #[serde(default)]
    pub forward: crate::config::Forward,
    pub weight: u32,
    /// Drained, or of weight 0: no new flows.
    pub drained: bool,
    /// `up`, `down`, `vip-misconfigured`, `refusing`, or `no-mac` (no MAC known yet).
    pub state: String,
    /// Marked down with `on_down = "reset"` and its grace over: its flows are re-picked.
    pub resetting_flows: bool,
    pub check: CheckKind,
    /// The last probe's result.
    pub last_check: String,
    pub check_failures: u64,
    pub checks: u64,
    /// Why the last round could not be made on this host's side, while that lasts.
    pub unchecked: Option<String>,
    pub local_errors: u64,
    /// Live flows of this listener on this backend.
    pub flows: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_sec: f64,
    pub new_flows_per_sec: f64,
    /// How long the last probe round took, in seconds (for the metrics; not in the JSON).
    #[serde(skip)]
    pub check_seconds: Option<f64>,
}

impl BackendStatus {
    /// Up for its listener: checked up, with a MAC.
    #[must_use]
    pub fn up(&self) -> bool {
        self.state == "up"
    }
}

/// The next XDP program in the chain, as the controller found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextProgram {
    pub path: PathBuf,
    pub id: u32,
    pub name: String,
}

/// Reloads since start (CLI or SIGHUP).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloads {
    pub applied: u64,
    pub rejected: u64,
    /// Why the last reload was rejected, until one is applied.
    pub last_error: Option<String>,
}

/// `[announce]`: the routing table, each VIP, and the last reconcile's error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    pub table: u32,
    pub vips: Vec<VipStatus>,
    pub error: Option<String>,
}

/// One VIP: announced or not, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: IpAddr,
    pub announced: bool,
    pub why: String,
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's sync address.
    pub me: String,
    /// `insecure = true`: peers are not authenticated (no key_file).
    pub insecure: bool,
    /// Has the other nodes' exceptions (or `join_wait` passed).
    pub joined: bool,
    pub joined_how: Option<String>,
    /// The digest of what the rings are built from, in hex.
    pub fingerprint: String,
    pub last_walk: Option<LastWalk>,
    /// Flows received from the other nodes, by what the flow table did with them.
    pub merged: MergeCounts,
    pub peers: Vec<PeerStatus>,
}

/// The last walk of the flow table for exceptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastWalk {
    pub exceptions: usize,
    pub ago_s: u64,
    pub took_ms: u64,
}

/// A status of every section, for tests of what reads it.
#[cfg(test)]
pub(crate) mod sample {
    use super::*;
    use crate::cluster::PeerConfig;

    pub(crate) fn backend() -> BackendStatus {
        BackendStatus {
            name: "b1".to_owned(),
            address: Some(Ipv4Addr::new(192, 0, 2, 11)),
            address6: None,
            mac: "02:00:00:00:00:0b".to_owned(),
            forward: crate::config::Forward::L2,
            weight: 100,
            drained: false,
            state: "up".to_owned(),
            resetting_flows: false,
            check: CheckKind::Mqtt,
            last_check: "ok in 2 ms".to_owned(),
            check_failures: 1,
            checks: 9,
            unchecked: Some("no route".to_owned()),
            local_errors: 2,
            flows: 3,
            packets: 40,
            bytes: 4000,
            new_flows: 5,
            packets_per_sec: 1.5,
            new_flows_per_sec: 0.25,
            check_seconds: Some(0.002),
        }
    }

    pub(crate) fn status() -> Status {
        Status {
            interface: "eth0".to_owned(),
            macs: vec!["02:00:00:00:00:01".to_owned()],
            clock_tick_ns: 4_000_000,
            listeners: vec![ListenerStatus {
                name: "mqtt".to_owned(),
                vip: "2001:db8::100".parse().unwrap(),
                port: 1883,
                hash: Hash::FourTuple,
                packets: 40,
                bytes: 4000,
                new_flows: 5,
                flow_idle_timeout: "5m".to_owned(),
                max_conn_rate: Some(100),
                max_conn_burst: Some(20),
                conn_rate_dropped: 6,
                icmp_too_big: 7,
                on_down: OnDown::Reset,
                on_down_grace: "30s".to_owned(),
                all_down: AllDown::Forward,
                fail_open: true,
                backends: vec![backend()],
            }],
            flows_per_backend: [("b1".to_owned(), 3)].into(),
            flow_table_entries: 3,
            next_program: Some(NextProgram { path: "/sys/fs/bpf/xdp-filter".into(), id: 17, name: "xdpfilt".to_owned() }),
            flow_table: [("inserted".to_owned(), 8), ("expired".to_owned(), 1)].into(),
            flow_walk_ms: Some(31),
            flow_sweep_ms: Some(40),
            verdicts: [("tx/forwarded".to_owned(), 40)].into(),
            reloads: Reloads { applied: 1, rejected: 2, last_error: Some("bad".to_owned()) },
            announce: Some(AnnounceStatus {
                table: 254,
                vips: vec![VipStatus {
                    vip: "192.0.2.100".parse().unwrap(),
                    announced: true,
                    why: "a listener has a usable backend".to_owned(),
                }],
                error: None,
            }),
            cluster: Some(ClusterStatus {
                me: "192.0.2.2:9878".to_owned(),
                insecure: false,
                joined: true,
                joined_how: Some("with every running node's exceptions".to_owned()),
                fingerprint: "1157597fca88e77e".to_owned(),
                last_walk: Some(LastWalk { exceptions: 4, ago_s: 2, took_ms: 11 }),
                merged: MergeCounts { inserted: 6, ..MergeCounts::default() },
                peers: vec![PeerStatus {
                    node: "192.0.2.3:9878".to_owned(),
                    out_connected: true,
                    config: PeerConfig::Same,
                    flows_sent: 4,
                    ..PeerStatus::default()
                }],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{sample::status, *};

    /// The JSON `dsrlb status --json` has always printed (built with `json!` before the struct):
    /// every name and value the same, so operators' scripts and the tests read it as before.
    #[test]
    fn the_status_serializes_to_the_json_it_always_had() {
        let backend = json!({
            "name": "b1",
            "address": "192.0.2.11",
            "address6": null,
            "mac": "02:00:00:00:00:0b", "forward": "l2",
            "weight": 100,
            "drained": false,
            "state": "up",
            "resetting_flows": false,
            "check": "mqtt",
            "last_check": "ok in 2 ms",
            "check_failures": 1,
            "checks": 9,
            "unchecked": "no route",
            "local_errors": 2,
            "flows": 3,
            "packets": 40,
            "bytes": 4000,
            "new_flows": 5,
            "packets_per_sec": 1.5,
            "new_flows_per_sec": 0.25,
        });
        let cluster = json!({
            "me": "192.0.2.2:9878",
            "insecure": false,
            "joined": true,
            "joined_how": "with every running node's exceptions",
            "fingerprint": "1157597fca88e77e",
            "last_walk": { "exceptions": 4, "ago_s": 2, "took_ms": 11 },
            "merged": { "inserted": 6, "refreshed": 0, "kept": 0, "full": 0, "unknown": 0, "capped": 0 },
            "peers": [{
                "node": "192.0.2.3:9878", "out_connected": true, "out_error": null, "in_connected": false, "synced": false,
                "config": "same", "flows_sent": 4, "flows_received": 0, "in_error": null,
            }],
        });
        let want = json!({
            "interface": "eth0",
            "macs": ["02:00:00:00:00:01"],
            "clock_tick_ns": 4_000_000,
            "listeners": [{
                "name": "mqtt", "vip": "2001:db8::100", "port": 1883,
                "hash": "4tuple",
                "packets": 40, "bytes": 4000, "new_flows": 5,
                "flow_idle_timeout": "5m",
                "max_conn_rate": 100, "max_conn_burst": 20,
                "conn_rate_dropped": 6,
                "icmp_too_big": 7,
                "on_down": "reset", "on_down_grace": "30s",
                "all_down": "forward",
                "fail_open": true,
                "backends": [backend],
            }],
            "flows_per_backend": { "b1": 3 },
            "flow_table_entries": 3,
            "next_program": { "path": "/sys/fs/bpf/xdp-filter", "id": 17, "name": "xdpfilt" },
            "flow_table": { "inserted": 8, "expired": 1 },
            "flow_walk_ms": 31,
            "flow_sweep_ms": 40,
            "verdicts": { "tx/forwarded": 40 },
            "reloads": { "applied": 1, "rejected": 2, "last_error": "bad" },
            "announce": {
                "table": 254,
                "vips": [{ "vip": "192.0.2.100", "announced": true, "why": "a listener has a usable backend" }],
                "error": null,
            },
            "cluster": cluster,
        });
        let s = status();
        assert_eq!(serde_json::to_value(&s).expect("json"), want);
        let mut back: Status = serde_json::from_value(want).expect("reads back");
        assert_eq!(back.listeners[0].backends[0].check_seconds, None, "not in the JSON");
        back.listeners[0].backends[0].check_seconds = s.listeners[0].backends[0].check_seconds;
        assert_eq!(back, s);
        let bare = Status { announce: None, cluster: None, next_program: None, ..s };
        let v = serde_json::to_value(&bare).expect("json");
        assert!(v["announce"].is_null() && v["cluster"].is_null() && v["next_program"].is_null(), "sections without config are null");
        let other: Status = serde_json::from_value(json!({ "serving": true })).expect("any object reads");
        assert_eq!(other, Status::default(), "with every field empty");
    }
}
