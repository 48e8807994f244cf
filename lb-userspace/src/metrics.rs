//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format, built with
//! `prometheus-client`. Names follow HAProxy's so dashboards carry over
//! (`dsrlb_backend_status{listener,backend}`, `..._check_failures_total`, ...).

use std::net::SocketAddr;

use anyhow::Context as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::control::{Call, Request};

/// One (listener, backend) pair's numbers.
#[derive(Clone, Debug, Default)]
pub struct PairSample {
    pub listener: String,
    pub backend: String,
    pub up: bool,
    /// As `dsrlb status` shows it: up, down, vip-misconfigured, refusing, no-mac.
    pub state: &'static str,
    /// How long its last health-check round took, in seconds (none before the first).
    pub check_seconds: Option<f64>,
    pub check_failures: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub flows: u64,
}

/// Everything one scrape shows, taken by the controller.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pairs: Vec<PairSample>,
    /// (listener, packets, bytes, new flows).
    pub listeners: Vec<(String, u64, u64, u64)>,
    /// (verdict, reason, packets).
    pub verdicts: Vec<(String, String, u64)>,
    /// (listener, SYNs dropped by `max_conn_rate`, ICMP too-big forwarded).
    pub guards: Vec<(String, u64, u64)>,
    /// (event, count): flow table inserts by outcome, and flows expired.
    pub table_events: Vec<(String, u64)>,
    /// (listener, every backend down and the listener failing open).
    pub fail_open: Vec<(String, bool)>,
    pub flow_table_entries: u64,
    /// `[announce]`: (VIP, announced).
    pub announced: Vec<(String, bool)>,
    /// `[cluster]`: the other nodes, the exceptions of the last walk, merges, joined.
    pub peers: Vec<crate::cluster::PeerStatus>,
    pub exceptions: Option<u64>,
    pub merges: Option<crate::exceptions::MergeCounts>,
    pub joined: Option<bool>,
    /// `[cluster]` with `insecure = true`: the sync authenticates no peer.
    pub cluster_insecure: Option<bool>,
}

type Labels = Vec<(&'static str, String)>;
/// (name, help, value getter) of a counter family.
type PairCounter = (&'static str, &'static str, fn(&PairSample) -> u64);
type ListenerCounter = (&'static str, &'static str, fn(&(String, u64, u64, u64)) -> u64);
type GuardCounter = (&'static str, &'static str, fn(&(String, u64, u64)) -> u64);
type PeerCounter = (&'static str, &'static str, fn(&crate::cluster::PeerStatus) -> u64);

fn pair_labels(p: &PairSample) -> Labels {
    vec![("listener", p.listener.clone()), ("backend", p.backend.clone())]
}

impl Snapshot {
    /// Per (listener, backend): up or not, the state, the last check round's time.
    fn encode_pair_gauges(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_status",
                "1 when the backend is up for the listener, 0 when down or vip-misconfigured",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.pairs {
                ConstGauge::new(i64::from(p.up)).encode(m.encode_family(&pair_labels(p))?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_check_duration_seconds",
                "How long the pair's last health-check round took (the real address, then the VIP along the DSR path)",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.pairs {
                if let Some(s) = p.check_seconds {
                    ConstGauge::new(s).encode(m.encode_family(&pair_labels(p))?)?;
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_state",
                "1 for the pair's state as dsrlb status shows it (up, down, vip-misconfigured, refusing, no-mac)",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.pairs {
                let mut labels = pair_labels(p);
                labels.push(("state", p.state.to_owned()));
                ConstGauge::new(1).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_pair_gauges(&mut e)?;
        let counters: [PairCounter; 4] = [
            ("dsrlb_backend_check_failures", "Failed health checks", |p| p.check_failures),
            ("dsrlb_backend_new_flows", "New flows steered to the backend", |p| p.new_flows),
            ("dsrlb_backend_packets", "Packets forwarded to the backend", |p| p.packets),
            ("dsrlb_backend_bytes", "Bytes forwarded to the backend", |p| p.bytes),
        ];
        for (name, help, get) in counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.pairs {
                ConstCounter::new(get(p)).encode(m.encode_family(&pair_labels(p))?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_flows",
                "Live (not closing) flow-table entries of the backend",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.pairs {
                ConstGauge::new(i64::try_from(p.flows).unwrap_or(i64::MAX)).encode(m.encode_family(&pair_labels(p))?)?;
            }
        }
        let listener: [ListenerCounter; 3] = [
            ("dsrlb_listener_packets", "Packets forwarded for the listener", |l| l.1),
            ("dsrlb_listener_bytes", "Bytes forwarded for the listener", |l| l.2),
            ("dsrlb_listener_new_flows", "New flows of the listener", |l| l.3),
        ];
        for (name, help, get) in listener {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &self.listeners {
                ConstCounter::new(get(l)).encode(m.encode_family(&vec![("listener", l.0.clone())])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_xdp_verdicts",
                "Packets seen by the XDP program, by verdict and reason",
                None,
                MetricType::Counter,
            )?;
            for (verdict, reason, n) in &self.verdicts {
                ConstCounter::new(*n).encode(m.encode_family(&vec![("verdict", verdict.clone()), ("reason", reason.clone())])?)?;
            }
        }
        let guards: [GuardCounter; 2] = [
            ("dsrlb_listener_conn_rate_dropped", "SYNs of new connections dropped by the listener's max_conn_rate", |g| g.1),
            ("dsrlb_listener_icmp_too_big", "ICMP fragmentation-needed forwarded to the broker of the flow they quote", |g| g.2),
        ];
        for (name, help, get) in guards {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for g in &self.guards {
                ConstCounter::new(get(g)).encode(m.encode_family(&vec![("listener", g.0.clone())])?)?;
            }
        }
        {
            let help = "Flow table inserts by outcome (refused: the flood guard kept every confirmed flow), and flows expired for idleness";
            let mut m = e.encode_descriptor("dsrlb_flow_table_events", help, None, MetricType::Counter)?;
            for (event, n) in &self.table_events {
                ConstCounter::new(*n).encode(m.encode_family(&vec![("event", event.clone())])?)?;
            }
        }
        {
            let help = "1 when every backend of the listener is marked down and new flows go to all of them (all_down = \"forward\")";
            let mut m = e.encode_descriptor("dsrlb_listener_fail_open", help, None, MetricType::Gauge)?;
            for (l, open) in &self.fail_open {
                ConstGauge::new(i64::from(*open)).encode(m.encode_family(&vec![("listener", l.clone())])?)?;
            }
        }
        let m = e.encode_descriptor("dsrlb_flow_table_entries", "Live entries in the flow table", None, MetricType::Gauge)?;
        ConstGauge::new(i64::try_from(self.flow_table_entries).unwrap_or(i64::MAX)).encode(m)?;
        self.encode_ha(&mut e)
    }
}

impl Snapshot {
    fn encode_ha(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.announced.is_empty() {
            let help = "1 while this node announces the VIP to the routers ([announce])";
            let mut m = e.encode_descriptor("dsrlb_vip_announced", help, None, MetricType::Gauge)?;
            for (vip, on) in &self.announced {
                ConstGauge::new(i64::from(*on)).encode(m.encode_family(&vec![("vip", vip.clone())])?)?;
            }
        }
        if let Some(joined) = self.joined {
            let m = e.encode_descriptor(
                "dsrlb_cluster_joined",
                "1 once this node has the other nodes' exceptions (or join_wait passed)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(joined)).encode(m)?;
        }
        if let Some(insecure) = self.cluster_insecure {
            let m = e.encode_descriptor(
                "dsrlb_cluster_insecure",
                "1 when the cluster sync runs without a key (insecure = true): any process that reaches it from a node's address is trusted",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(insecure)).encode(m)?;
        }
        if !self.peers.is_empty() {
            let mut m = e.encode_descriptor(
                "dsrlb_cluster_peer_up",
                "1 while the connection to (out) or from (in) the node is up",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.peers {
                for (dir, up) in [("out", p.out_connected), ("in", p.in_connected)] {
                    ConstGauge::new(i64::from(up))
                        .encode(m.encode_family(&vec![("peer", p.node.clone()), ("direction", dir.to_owned())])?)?;
                }
            }
            let mut m = e.encode_descriptor(
                "dsrlb_cluster_peer_config_match",
                "1 when the node builds its rings from the same listeners, backends, weights and ring_size",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.peers {
                ConstGauge::new(i64::from(p.config == "same")).encode(m.encode_family(&vec![("peer", p.node.clone())])?)?;
            }
            let counters: [PeerCounter; 2] = [
                ("dsrlb_cluster_flows_sent", "Exception flows sent to the node", |p| p.flows_sent),
                ("dsrlb_cluster_flows_received", "Exception flows received from the node", |p| p.flows_received),
            ];
            for (name, help, get) in counters {
                let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                for p in &self.peers {
                    ConstCounter::new(get(p)).encode(m.encode_family(&vec![("peer", p.node.clone())])?)?;
                }
            }
        }
        if let Some(n) = self.exceptions {
            let m = e.encode_descriptor(
                "dsrlb_cluster_exceptions",
                "Live flows pinned elsewhere than the current ring picks, at the last walk",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(m)?;
        }
        if let Some(c) = self.merges {
            let mut m = e.encode_descriptor(
                "dsrlb_cluster_merges",
                "Flows received from other nodes, by what the flow table did with them",
                None,
                MetricType::Counter,
            )?;
            for (result, n) in
                [("inserted", c.inserted), ("refreshed", c.refreshed), ("kept", c.kept), ("full", c.full), ("unknown", c.unknown)]
            {
                ConstCounter::new(n).encode(m.encode_family(&vec![("result", result.to_owned())])?)?;
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text of a snapshot.
///
/// # Errors
/// Only if formatting fails.
pub fn render(s: Snapshot) -> anyhow::Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(s));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

/// Serves `GET /metrics` on `addr`, asking the controller for each scrape.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, calls: mpsc::Sender<Call>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint {addr}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await else { return };
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, ctype, body) = if head.starts_with("GET /metrics") {
                    let (tx, rx) = oneshot::channel();
                    let body = if calls.send((Request::Metrics, tx)).await.is_ok() {
                        rx.await.ok().and_then(|r| r.data.as_str().map(str::to_owned)).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_haproxy_like_names() {
        let s = Snapshot {
            pairs: vec![PairSample {
                listener: "mqtt".into(),
                backend: "b1".into(),
                up: true,
                state: "up",
                check_seconds: Some(0.25),
                packets: 7,
                ..PairSample::default()
            }],
            listeners: vec![("mqtt".into(), 7, 700, 1)],
            verdicts: vec![("tx".into(), "forwarded".into(), 7)],
            guards: vec![("mqtt".into(), 3, 2)],
            table_events: vec![("refused".into(), 5)],
            fail_open: vec![("mqtt".into(), true)],
            flow_table_entries: 1,
            announced: vec![("192.0.2.100".into(), true)],
            peers: vec![crate::cluster::PeerStatus {
                node: "192.0.2.3:9878".into(),
                out_connected: true,
                config: "same",
                flows_sent: 4,
                ..crate::cluster::PeerStatus::default()
            }],
            exceptions: Some(9),
            merges: Some(crate::exceptions::MergeCounts { inserted: 6, ..crate::exceptions::MergeCounts::default() }),
            joined: Some(true),
            cluster_insecure: Some(true),
        };
        let text = render(s).expect("render");
        for want in [
            "dsrlb_backend_status{listener=\"mqtt\",backend=\"b1\"} 1",
            "dsrlb_backend_state{listener=\"mqtt\",backend=\"b1\",state=\"up\"} 1",
            "dsrlb_backend_check_duration_seconds{listener=\"mqtt\",backend=\"b1\"} 0.25",
            "dsrlb_backend_packets_total{listener=\"mqtt\",backend=\"b1\"} 7",
            "dsrlb_backend_check_failures_total{listener=\"mqtt\",backend=\"b1\"} 0",
            "dsrlb_listener_packets_total{listener=\"mqtt\"} 7",
            "dsrlb_xdp_verdicts_total{verdict=\"tx\",reason=\"forwarded\"} 7",
            "dsrlb_flow_table_entries 1",
            "dsrlb_listener_conn_rate_dropped_total{listener=\"mqtt\"} 3",
            "dsrlb_listener_icmp_too_big_total{listener=\"mqtt\"} 2",
            "dsrlb_flow_table_events_total{event=\"refused\"} 5",
            "dsrlb_listener_fail_open{listener=\"mqtt\"} 1",
            "dsrlb_vip_announced{vip=\"192.0.2.100\"} 1",
            "dsrlb_cluster_joined 1",
            "dsrlb_cluster_insecure 1",
            "dsrlb_cluster_peer_up{peer=\"192.0.2.3:9878\",direction=\"out\"} 1",
            "dsrlb_cluster_peer_up{peer=\"192.0.2.3:9878\",direction=\"in\"} 0",
            "dsrlb_cluster_peer_config_match{peer=\"192.0.2.3:9878\"} 1",
            "dsrlb_cluster_flows_sent_total{peer=\"192.0.2.3:9878\"} 4",
            "dsrlb_cluster_exceptions 9",
            "dsrlb_cluster_merges_total{result=\"inserted\"} 6",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
