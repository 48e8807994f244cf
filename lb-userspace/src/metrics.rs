//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format, built with
//! `prometheus-client`. Names follow HAProxy's so dashboards carry over
//! (`dsrlb_backend_status{listener,backend}`, `..._check_failures_total`, ...).
//!
//! The endpoint serves that one path, to a few clients at once, each within deadlines (see
//! [`Limits`]): a client that sends nothing, sends too much or never reads its answer is cut
//! and holds nothing after.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    cluster::{PeerConfig, PeerStatus},
    control::{
        Call, Request,
        status::{BackendStatus, ListenerStatus, Status},
    },
};

/// One scrape: the status the controller built, as the registry's collector.
#[derive(Debug)]
struct Scrape(Status);

type Labels = Vec<(&'static str, String)>;
/// (name, help, value getter) of a counter family.
type PairCounter = (&'static str, &'static str, fn(&BackendStatus) -> u64);
type ListenerCounter = (&'static str, &'static str, fn(&ListenerStatus) -> u64);
type PeerCounter = (&'static str, &'static str, fn(&PeerStatus) -> u64);

impl Scrape {
    /// Every (listener, backend) pair with its labels.
    fn pairs(&self) -> impl Iterator<Item = (Labels, &BackendStatus)> {
        self.0
            .listeners
            .iter()
            .flat_map(|l| l.backends.iter().map(move |b| (vec![("listener", l.name.clone()), ("backend", b.name.clone())], b)))
    }

    /// Per (listener, backend): up or not, the state, the last check round's time.
    fn encode_pair_gauges(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_status",
                "1 when the backend is up for the listener, 0 when down or vip-misconfigured",
                None,
                MetricType::Gauge,
            )?;
            for (labels, p) in self.pairs() {
                ConstGauge::new(i64::from(p.up())).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_check_duration_seconds",
                "How long the pair's last health-check round took (the real address, then the VIP along the DSR path)",
                None,
                MetricType::Gauge,
            )?;
            for (labels, p) in self.pairs() {
                if let Some(s) = p.check_seconds {
                    ConstGauge::new(s).encode(m.encode_family(&labels)?)?;
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
            for (mut labels, p) in self.pairs() {
                labels.push(("state", p.state.clone()));
                ConstGauge::new(1).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        self.encode_pair_gauges(&mut e)?;
        let counters: [PairCounter; 5] = [
            ("dsrlb_backend_check_failures", "Failed health checks", |p| p.check_failures),
            (
                "dsrlb_health_local_errors",
                "Health probes that could not be made on the balancer's side (descriptors, buffers, routes, a probe task that ended): the pair keeps its state",
                |p| p.local_errors,
            ),
            ("dsrlb_backend_new_flows", "New flows steered to the backend", |p| p.new_flows),
            ("dsrlb_backend_packets", "Packets forwarded to the backend", |p| p.packets),
            ("dsrlb_backend_bytes", "Bytes forwarded to the backend", |p| p.bytes),
        ];
        for (name, help, get) in counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, p) in self.pairs() {
                ConstCounter::new(get(p)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_backend_flows",
                "Live (not closing) flow-table entries of the backend",
                None,
                MetricType::Gauge,
            )?;
            for (labels, p) in self.pairs() {
                ConstGauge::new(i64::try_from(p.flows).unwrap_or(i64::MAX)).encode(m.encode_family(&labels)?)?;
            }
        }
        let listener: [ListenerCounter; 5] = [
            ("dsrlb_listener_packets", "Packets forwarded for the listener", |l| l.packets),
            ("dsrlb_listener_bytes", "Bytes forwarded for the listener", |l| l.bytes),
            ("dsrlb_listener_new_flows", "New flows of the listener", |l| l.new_flows),
            ("dsrlb_listener_conn_rate_dropped", "SYNs of new connections dropped by the listener's max_conn_rate", |l| {
                l.conn_rate_dropped
            }),
            ("dsrlb_listener_icmp_too_big", "ICMP fragmentation-needed forwarded to the broker of the flow they quote", |l| l.icmp_too_big),
        ];
        let (traffic, guards) = listener.split_at(3);
        for (name, help, get) in traffic {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &s.listeners {
                ConstCounter::new(get(l)).encode(m.encode_family(&vec![("listener", l.name.clone())])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dsrlb_xdp_verdicts",
                "Packets seen by the XDP program, by verdict and reason",
                None,
                MetricType::Counter,
            )?;
            for (label, n) in &s.verdicts {
                let (verdict, reason) = label.split_once('/').unwrap_or((label, ""));
                ConstCounter::new(*n).encode(m.encode_family(&vec![("verdict", verdict.to_owned()), ("reason", reason.to_owned())])?)?;
            }
        }
        for (name, help, get) in guards {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &s.listeners {
                ConstCounter::new(get(l)).encode(m.encode_family(&vec![("listener", l.name.clone())])?)?;
            }
        }
        {
            let help = "Flow table inserts by outcome (refused: the flood guard kept every confirmed flow), and flows expired for idleness";
            let mut m = e.encode_descriptor("dsrlb_flow_table_events", help, None, MetricType::Counter)?;
            for (event, n) in &s.flow_table {
                ConstCounter::new(*n).encode(m.encode_family(&vec![("event", event.clone())])?)?;
            }
        }
        {
            let help = "1 when every backend of the listener is marked down and new flows go to all of them (all_down = \"forward\")";
            let mut m = e.encode_descriptor("dsrlb_listener_fail_open", help, None, MetricType::Gauge)?;
            for l in &s.listeners {
                ConstGauge::new(i64::from(l.fail_open)).encode(m.encode_family(&vec![("listener", l.name.clone())])?)?;
            }
        }
        let m = e.encode_descriptor("dsrlb_flow_table_entries", "Live entries in the flow table", None, MetricType::Gauge)?;
        ConstGauge::new(i64::try_from(s.flow_table_entries).unwrap_or(i64::MAX)).encode(m)?;
        for (name, help, ms) in [
            ("dsrlb_flow_table_walk_seconds", "How long the last walk of the flow table for live flows took", s.flow_walk_ms),
            ("dsrlb_flow_table_sweep_seconds", "How long the last expiry sweep of the flow table took", s.flow_sweep_ms),
        ] {
            if let Some(ms) = ms {
                let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
                #[expect(clippy::cast_precision_loss, reason = "milliseconds of a walk")]
                ConstGauge::new(ms as f64 / 1000.0).encode(m)?;
            }
        }
        self.encode_announce(&mut e)?;
        self.encode_cluster(&mut e)
    }
}

impl Scrape {
    fn encode_announce(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(a) = &self.0.announce else { return Ok(()) };
        if !a.vips.is_empty() {
            let help = "1 while this node announces the VIP to the routers ([announce])";
            let mut m = e.encode_descriptor("dsrlb_vip_announced", help, None, MetricType::Gauge)?;
            for v in &a.vips {
                ConstGauge::new(i64::from(v.announced)).encode(m.encode_family(&vec![("vip", v.vip.to_string())])?)?;
            }
        }
        Ok(())
    }

    fn encode_cluster(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cluster = self.0.cluster.as_ref();
        if let Some(c) = cluster {
            let m = e.encode_descriptor(
                "dsrlb_cluster_joined",
                "1 once this node has the other nodes' exceptions (or join_wait passed)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(c.joined)).encode(m)?;
        }
        {
            // Always exported (0 without [cluster]), so the alert on it has a series to read.
            let insecure = cluster.is_some_and(|c| c.insecure);
            let m = e.encode_descriptor(
                "dsrlb_cluster_insecure",
                "1 when the cluster sync runs without a key (insecure = true): any process that reaches it from a node's address is trusted; 0 with a key, or without [cluster]",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(insecure)).encode(m)?;
        }
        let Some(c) = cluster else { return Ok(()) };
        if !c.peers.is_empty() {
            let mut m = e.encode_descriptor(
                "dsrlb_cluster_peer_up",
                "1 while the connection to (out) or from (in) the node is up",
                None,
                MetricType::Gauge,
            )?;
            for p in &c.peers {
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
            for p in &c.peers {
                ConstGauge::new(i64::from(p.config == PeerConfig::Same)).encode(m.encode_family(&vec![("peer", p.node.clone())])?)?;
            }
            let counters: [PeerCounter; 2] = [
                ("dsrlb_cluster_flows_sent", "Exception flows sent to the node", |p| p.flows_sent),
                ("dsrlb_cluster_flows_received", "Exception flows received from the node", |p| p.flows_received),
            ];
            for (name, help, get) in counters {
                let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                for p in &c.peers {
                    ConstCounter::new(get(p)).encode(m.encode_family(&vec![("peer", p.node.clone())])?)?;
                }
            }
        }
        if let Some(w) = c.last_walk {
            let m = e.encode_descriptor(
                "dsrlb_cluster_exceptions",
                "Live flows pinned elsewhere than the current ring picks, at the last walk",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(w.exceptions).unwrap_or(i64::MAX)).encode(m)?;
        }
        let mut m = e.encode_descriptor(
            "dsrlb_cluster_merges",
            "Flows received from other nodes, by what the flow table did with them",
            None,
            MetricType::Counter,
        )?;
        let n = c.merged;
        for (result, n) in [
            ("inserted", n.inserted),
            ("refreshed", n.refreshed),
            ("kept", n.kept),
            ("full", n.full),
            ("unknown", n.unknown),
            ("capped", n.capped),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&vec![("result", result.to_owned())])?)?;
        }
        Ok(())
    }
}

/// The OpenMetrics text of a status.
///
/// # Errors
/// Only if formatting fails.
pub fn render(status: Status) -> anyhow::Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(status)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

/// How the endpoint bounds what a client may take: a scrape is one small request and one
/// response, and Prometheus reads it at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Exchanges served at once; a connection beyond them is answered 503 and closed.
    pub concurrent: usize,
    /// The longest request head (request line and headers) read: 414 or 431 beyond it.
    pub head_bytes: usize,
    /// To receive the request head.
    pub read: Duration,
    /// To write the whole response.
    pub write: Duration,
    /// For the whole exchange, the controller's answer included.
    pub exchange: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            concurrent: 8,
            head_bytes: 8192,
            read: Duration::from_secs(5),
            write: Duration::from_secs(10),
            exchange: Duration::from_secs(30),
        }
    }
}

/// Serves `GET /metrics` on `addr`, asking the controller for each scrape, within
/// [`Limits::default`].
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, calls: mpsc::Sender<Call>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint {addr}"))?;
    Ok(tokio::spawn(serve_on(listener, calls, Limits::default())))
}

async fn serve_on(listener: TcpListener, calls: mpsc::Sender<Call>, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.concurrent));
    // The answer to a connection beyond the limit: it fits any socket buffer, so it is written
    // without waiting for the client.
    let busy = response("503 Service Unavailable", "text/plain", "Retry-After: 1\r\n", "too many scrapes at once\n");
    let mut accept_log = crate::health::LogLimit::new(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: the error repeats until one is free, so wait a little
                // instead of spinning on it.
                if let Some(held_back) = accept_log.allow(std::time::Instant::now()) {
                    tracing::warn!(error = %e, held_back, "the metrics endpoint cannot accept a connection");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let _ = stream.try_write(&busy);
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let cut = match tokio::time::timeout(limits.exchange, exchange(&mut stream, &calls, limits)).await {
                Ok(Ok(())) => return,
                Ok(Err(cut)) => cut,
                Err(_) => Cut::Slow,
            };
            tracing::debug!(?cut, "a metrics exchange was cut");
            // A reset, so the kernel drops at once what a client that does not read left
            // queued, rather than keeping it for retransmission.
            let _ = stream.set_zero_linger();
        });
    }
}

/// Why an exchange ended without its response written.
#[derive(Debug)]
enum Cut {
    /// The client closed, or its socket failed.
    Gone,
    /// A deadline ran out.
    Slow,
}

/// One request, one response, each within its deadline.
async fn exchange(stream: &mut TcpStream, calls: &mpsc::Sender<Call>, limits: Limits) -> Result<(), Cut> {
    let head = tokio::time::timeout(limits.read, read_head(stream, limits.head_bytes)).await.map_err(|_| Cut::Slow)??;
    let response = match head {
        Head::Request { method, path } => respond(&method, &path, calls).await,
        Head::Refused(status, why) => plain(status, why),
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(limits.write, write).await.map_err(|_| Cut::Slow)?.map_err(|_| Cut::Gone)
}

/// A request head, read.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    Request {
        method: String,
        path: String,
    },
    /// A status and why: answered, not served.
    Refused(&'static str, &'static str),
}

/// Reads up to the blank line that ends a request head, at most `max` bytes.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Head, Cut> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            return Ok(parse_head(&buf[..end]));
        }
        if buf.len() >= max {
            return Ok(if buf.contains(&b'\n') {
                Head::Refused("431 Request Header Fields Too Large", "the request head is too long\n")
            } else {
                Head::Refused("414 URI Too Long", "the request line is too long\n")
            });
        }
        let room = (max - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(Cut::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Where the head ends: at its first empty line (CRLF, or LF alone from a hand-typed request).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").or_else(|| buf.windows(3).position(|w| w == b"\n\r\n"))
}

/// The request line: `METHOD TARGET HTTP/1.x`; the target's path, its query left out.
fn parse_head(head: &[u8]) -> Head {
    const BAD: Head = Head::Refused("400 Bad Request", "not an HTTP/1 request\n");
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)) else { return BAD };
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next()) else {
        return BAD;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return BAD;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Head::Request { method: method.to_owned(), path: path.to_owned() }
}

/// The response to a request: `GET /metrics` asks the controller; `HEAD /metrics` answers the
/// headers alone without asking it; other methods get 405, other paths 404.
async fn respond(method: &str, path: &str, calls: &mpsc::Sender<Call>) -> Vec<u8> {
    const METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    if path != "/metrics" {
        return plain("404 Not Found", "try /metrics\n");
    }
    match method {
        "GET" => {
            let (tx, rx) = oneshot::channel();
            let answer = if calls.send((Request::Metrics, tx)).await.is_ok() { rx.await.ok() } else { None };
            match answer {
                Some(r) if r.ok => match r.data.as_str() {
                    Some(body) => response("200 OK", METRICS, "", body),
                    None => plain("500 Internal Server Error", "the controller's answer holds no metrics\n"),
                },
                Some(r) => plain("500 Internal Server Error", &format!("{}\n", r.error.unwrap_or_default())),
                None => plain("503 Service Unavailable", "the controller is not answering\n"),
            }
        }
        "HEAD" => format!("HTTP/1.1 200 OK\r\nContent-Type: {METRICS}\r\nConnection: close\r\n\r\n").into_bytes(),
        _ => response("405 Method Not Allowed", "text/plain", "Allow: GET, HEAD\r\n", "only GET and HEAD\n"),
    }
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    response(status, "text/plain", "", body)
}

/// A response with `body`; `extra` holds more header lines, each ending in CRLF.
fn response(status: &str, ctype: &str, extra: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}", body.len())
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller that answers every metrics call with `body`.
    fn controller(body: String) -> mpsc::Sender<Call> {
        let (tx, mut rx) = mpsc::channel::<Call>(8);
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(crate::control::Response::ok(serde_json::Value::from(body.clone())));
            }
        });
        tx
    }

    /// An endpoint on a port of its own, serving `body`.
    async fn endpoint(limits: Limits, body: String) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(serve_on(listener, controller(body), limits));
        addr
    }

    /// Sends `request` (while reading, so a server that stops reading cannot block it) and
    /// reads the response until the server closes.
    async fn ask(addr: SocketAddr, request: Vec<u8>) -> String {
        let (mut r, mut w) = TcpStream::connect(addr).await.expect("connect").into_split();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&request).await;
            w
        });
        let mut out = Vec::new();
        // A server that refuses a request it did not read whole resets the connection after
        // its answer: what came before the reset is the answer.
        let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut out)).await.expect("an answer within 5 s");
        drop(writer.await);
        String::from_utf8_lossy(&out).into_owned()
    }

    const BODY: &str = "# HELP dsrlb_flow_table_entries Live entries in the flow table\n";

    #[tokio::test]
    async fn only_get_and_head_of_the_exact_path_are_served() {
        let addr = endpoint(Limits::default(), BODY.to_owned()).await;
        for (request, status) in [
            ("GET /metrics HTTP/1.1\r\nHost: lb1\r\nAccept: */*\r\n\r\n", "200 OK"),
            ("GET /metrics?job=dsrlb HTTP/1.0\r\n\r\n", "200 OK"),
            ("GET /metrics HTTP/1.1\n\n", "200 OK"),
            ("GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
            ("GET /metrics/ HTTP/1.1\r\n\r\n", "404 Not Found"),
            ("GET /metrics/../metrics HTTP/1.1\r\n\r\n", "404 Not Found"),
            ("GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
            ("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
            ("GET /metrics\r\n\r\n", "400 Bad Request"),
            ("GET  /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
            ("GET /metrics HTTP/2.0\r\n\r\n", "400 Bad Request"),
        ] {
            let answer = ask(addr, request.as_bytes().to_vec()).await;
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{request:?}: {answer}");
            assert_eq!(answer.contains(BODY), status == "200 OK", "{request:?}: {answer}");
        }
        let answer = ask(addr, b"PUT /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.contains("\r\nAllow: GET, HEAD\r\n"), "{answer}");
        let answer = ask(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "HEAD answers the headers alone: {answer}");
    }

    #[tokio::test]
    async fn a_request_head_longer_than_the_limit_is_refused() {
        let addr = endpoint(Limits::default(), BODY.to_owned()).await;
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000));
        let answer = ask(addr, long_line.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{answer}");
        let many_headers = format!("GET /metrics HTTP/1.1\r\n{}\r\n", "X-Filler: aaaaaaaaaaaaaaaa\r\n".repeat(1000));
        let answer = ask(addr, many_headers.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{answer}");
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "still serving: {answer}");
    }

    /// Waits until a scrape is served (200), asking every 20 ms; how long that took.
    async fn served_within(addr: SocketAddr, limit: Duration) -> Duration {
        let start = std::time::Instant::now();
        loop {
            let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
            if answer.starts_with("HTTP/1.1 200 OK\r\n") {
                return start.elapsed();
            }
            assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
            assert!(start.elapsed() < limit, "no scrape served within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_cut_at_the_write_deadline() {
        let limits = Limits { concurrent: 1, write: Duration::from_millis(300), exchange: Duration::from_secs(30), ..Limits::default() };
        // More than the kernel's buffers on both sides hold, so the write has to wait for it.
        let addr = endpoint(limits, "x".repeat(32 << 20)).await;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        sock.connect(&addr.into()).expect("connect");
        let mut idle = std::net::TcpStream::from(sock);
        std::io::Write::write_all(&mut idle, b"GET /metrics HTTP/1.1\r\n\r\n").expect("request");
        let asked = std::time::Instant::now();
        // It holds the one exchange, then loses it at the write deadline.
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        let took = served_within(addr, Duration::from_secs(3)).await;
        assert!(asked.elapsed() >= Duration::from_millis(300), "served before the deadline: {took:?}");
        // Its connection was reset, not finished: what it gets is a part of the response.
        let mut got = Vec::new();
        let end = tokio::task::spawn_blocking(move || std::io::Read::read_to_end(&mut idle, &mut got).map(|_| got.len()))
            .await
            .expect("the reader");
        assert!(matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{end:?}");
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_are_refused_at_once_and_silent_ones_cut_at_the_read_deadline() {
        let limits = Limits { concurrent: 3, read: Duration::from_millis(500), ..Limits::default() };
        let addr = endpoint(limits, BODY.to_owned()).await;
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let start = std::time::Instant::now();
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
        assert!(start.elapsed() < Duration::from_millis(400), "refused at once, not after a deadline: {:?}", start.elapsed());
        // Each silent client is cut at the read deadline.
        for s in &mut silent {
            let mut buf = [0u8; 64];
            let end = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("cut within 3 s");
            assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        }
        assert!(start.elapsed() >= Duration::from_millis(450), "cut before the deadline: {:?}", start.elapsed());
        served_within(addr, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_scrape_the_controller_does_not_answer_is_cut_at_the_exchange_deadline() {
        let limits = Limits { concurrent: 1, exchange: Duration::from_millis(300), ..Limits::default() };
        // A controller that takes calls and never answers them.
        let (calls, mut taken) = mpsc::channel::<Call>(8);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(call) = taken.recv().await {
                held.push(call);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(serve_on(listener, calls, limits));
        let start = std::time::Instant::now();
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert_eq!(answer, "", "cut without an answer");
        assert!((Duration::from_millis(300)..Duration::from_secs(3)).contains(&start.elapsed()), "{:?}", start.elapsed());
        let answer = ask(addr, b"GET /nothing HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "the exchange is free again: {answer}");
    }

    #[test]
    fn renders_haproxy_like_names() {
        use crate::control::status::{LastWalk, sample};
        let mut s = sample::status();
        let (l, c) = (&mut s.listeners[0], s.cluster.as_mut().expect("a cluster"));
        (l.packets, l.bytes, l.new_flows, l.conn_rate_dropped, l.icmp_too_big, l.fail_open) = (7, 700, 1, 3, 2, true);
        l.backends[0] = BackendStatus {
            state: "up".into(),
            check_seconds: Some(0.25),
            check_failures: 0,
            local_errors: 2,
            packets: 7,
            ..sample::backend()
        };
        s.verdicts = [("tx/forwarded".to_owned(), 7)].into();
        s.flow_table = [("refused".to_owned(), 5)].into();
        s.flow_table_entries = 1;
        s.flow_walk_ms = Some(250);
        (c.insecure, c.joined, c.last_walk) = (true, true, Some(LastWalk { exceptions: 9, ago_s: 0, took_ms: 0 }));
        let text = render(s).expect("render");
        for want in [
            "dsrlb_backend_status{listener=\"mqtt\",backend=\"b1\"} 1",
            "dsrlb_backend_state{listener=\"mqtt\",backend=\"b1\",state=\"up\"} 1",
            "dsrlb_backend_check_duration_seconds{listener=\"mqtt\",backend=\"b1\"} 0.25",
            "dsrlb_backend_packets_total{listener=\"mqtt\",backend=\"b1\"} 7",
            "dsrlb_backend_check_failures_total{listener=\"mqtt\",backend=\"b1\"} 0",
            "dsrlb_health_local_errors_total{listener=\"mqtt\",backend=\"b1\"} 2",
            "dsrlb_listener_packets_total{listener=\"mqtt\"} 7",
            "dsrlb_xdp_verdicts_total{verdict=\"tx\",reason=\"forwarded\"} 7",
            "dsrlb_flow_table_entries 1",
            "dsrlb_flow_table_walk_seconds 0.25",
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
