//! Flow-state sharing between the balancer nodes of a cluster (`[cluster]`).
//!
//! Every node builds the same Maglev rings from the same config, so a flow that follows its
//! ring reaches the same broker through any node: when the routers move it (a node fails or
//! joins), nothing is lost. The flows that do not follow the current ring are the
//! *exceptions*: sessions opened before a ring change (a broker added, drained, back from a
//! failure) whose slot now names another broker. Only the node that saw them knows where they
//! go. Each node walks its flow table after every ring change and every `sync_interval`, and
//! sends its exceptions to every other node, which takes them into its own table
//! (`FlowTable::merge`). The data plane pays nothing: a synced flow is an ordinary entry.
//!
//! Design (IPVS's sync daemon, loxilb and vc5 share connection state too; GLB and Unimog use
//! second-chance forwarding, which needs the backends' cooperation that unmodified MQTT brokers
//! cannot give): one TCP connection from each node to each other node carries the sender's
//! exceptions one way. Flows are named by listener (VIP:port) and backend *name*, never by id
//! (ids depend on each node's reload history). A sender sends what the peer has not had yet
//! (new, changed backend, newly closing) and, every `refresh`, again what is still live, with
//! its idle time, so the peer's copy ages as the original does and expires when it does. After
//! each round it sends a `SYNCED` mark, which also serves as a heartbeat. On a new connection
//! the peer gets everything again: a restarted node catches up at once.
//!
//! Frames (big-endian): `u32 length` of what follows, `u8 kind`, body.
//! - `HELLO` (1): `"DSRLBSYN"`, `u8 version`, `u64 config fingerprint`, `u32 node address`;
//!   with `cluster.key_file`, then `u64 unix time` and the HMAC-SHA256 of all that and the
//!   receiver's address (good for one receiver, within two minutes).
//! - `FLOWS` (2): `u32 VIP`, `u16 port`, `u8 length`, backend name, `u32 count`, then per flow
//!   `u32 client address`, `u16 client port`, `u16 idle units`, `u8 flags` (1: closing).
//! - `SYNCED` (3): empty.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// One exception: a client's flow, its idle time in flow-clock units, whether it is closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Of the family of its group's listener.
    pub client: SocketAddr,
    pub idle: u16,
    pub closing: bool,
}

/// A listener's (VIP:port) exceptions pinned to one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    pub listener: Option<SocketAddr>,
    pub backend: String,
    pub entries: Vec<Entry>,
}

/// The exceptions of one walk of the flow table.
#[derive(Clone, Debug, Default)]
pub struct Exceptions {
    pub groups: Vec<Group>,
    /// Made by a walk (the value before the first walk is not, and is never sent).
    pub complete: bool,
}

impl Exceptions {
    #[must_use]
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.entries.len()).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the other nodes tell this one.
#[derive(Debug)]
pub enum Event {
    /// Flows another node holds, to take in.
    Flows { from: Ipv4Addr, group: Group },
    /// That node has sent everything it holds (after each of its rounds).
    Synced { from: Ipv4Addr },
    /// That node greeted this one: its config is the same as this one's in what the rings
    /// are built from, or not.
    Greeted { from: Ipv4Addr, same: bool },
}

/// The cluster as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This node's sync address (one of `nodes`).
    pub me: SocketAddrV4,
    /// Every node, this one included.
    pub nodes: Vec<SocketAddrV4>,
    /// A digest of what must be the same on every node (see `controller::fingerprint`).
    pub fingerprint: u64,
    pub sync_interval: Duration,
    /// Live flows are sent again when last sent this long ago (well inside the idle timeout).
    pub refresh: Duration,
    /// The shared secret a peer's HELLO must prove it holds (`cluster.key_file`).
    pub key: Option<crate::config::SyncKey>,
}

/// One other node, as this one sees it (for status and metrics).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerStatus {
    pub node: String,
    /// Our connection to it (our exceptions go this way).
    pub out_connected: bool,
    pub out_error: Option<String>,
    /// Its connection to us (its exceptions come this way).
    pub in_connected: bool,
    /// It has sent a whole round since it connected.
    pub synced: bool,
    /// `same`, `differs` (its config's ring-relevant part is not ours) or `unknown`.
    pub config: &'static str,
    pub flows_sent: u64,
    pub flows_received: u64,
    pub in_error: Option<String>,
    /// The newest incoming connection: an older one that ends does not mark the peer gone.
    #[serde(skip)]
    pub in_generation: u64,
}

type Peers = Arc<Mutex<BTreeMap<Ipv4Addr, PeerStatus>>>;
/// Per other node: wakes our connector when that node connects to us (it is up: no need to
/// wait out the backoff).
type Wakers = Arc<BTreeMap<Ipv4Addr, Arc<tokio::sync::Notify>>>;

pub struct Cluster {
    settings: Settings,
    exceptions: watch::Sender<Arc<Exceptions>>,
    peers: Peers,
    tasks: Vec<JoinHandle<()>>,
    /// Kept across [`Cluster::reconfigure`]: a new task takes the same socket over.
    listener: Arc<TcpListener>,
    events: mpsc::Sender<Event>,
}

const MAGIC: &[u8; 8] = b"DSRLBSYN";
const VERSION: u8 = 1;
const HELLO: u8 = 1;
const FLOWS: u8 = 2;
const SYNCED: u8 = 3;
/// `FLOWS` of an IPv6 listener: 16-byte addresses. A node that predates it closes the
/// connection on one, so upgrade every node before adding IPv6 listeners.
const FLOWS6: u8 = 4;
/// Flows per `FLOWS` frame, and the largest frame read.
const FLOWS_PER_FRAME: usize = 65_536;
const MAX_FRAME: usize = 1 + 16 + 2 + 1 + 255 + 4 + FLOWS_PER_FRAME * ENTRY6_BYTES;
const ENTRY_BYTES: usize = 4 + 2 + 2 + 1;
const ENTRY6_BYTES: usize = 16 + 2 + 2 + 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection's first frame, HELLO: its size at most (with a key's timestamp and MAC), and
/// how soon it must come.
const HELLO_MAX: usize = 1 + HELLO_BYTES + HELLO_AUTH_BYTES;
const HELLO_BYTES: usize = 8 + 1 + 8 + 4;
const HELLO_AUTH_BYTES: usize = 8 + 32;
/// How far a keyed HELLO's timestamp may be from this node's clock.
const HELLO_SKEW: u64 = 120;
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Unacknowledged data older than this closes the connection (a peer that died silently).
const USER_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Cluster {
    /// Binds this node's sync address and starts talking to the others.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(settings: Settings, events: mpsc::Sender<Event>) -> anyhow::Result<Self> {
        let listener = Arc::new(bind(settings.me).with_context(|| format!("listening for cluster sync on {}", settings.me))?);
        let (exceptions, _) = watch::channel(Arc::new(Exceptions::default()));
        let mut c = Self { settings, exceptions, peers: Arc::default(), tasks: Vec::new(), listener, events };
        c.spawn();
        tracing::info!(me = %c.settings.me, nodes = c.settings.nodes.len(), "cluster sync started");
        Ok(c)
    }

    /// The tasks for the current settings: one accepting, one connector per other node.
    fn spawn(&mut self) {
        let s = &self.settings;
        let old = self.peers.lock().map(|p| p.clone()).unwrap_or_default();
        let peers: Peers = Arc::new(Mutex::new(
            s.nodes
                .iter()
                .filter(|n| **n != s.me)
                .map(|n| {
                    // Counters carry over a reconfiguration; connection states start afresh.
                    let was = old.get(n.ip());
                    let status = PeerStatus {
                        node: n.to_string(),
                        config: "unknown",
                        flows_sent: was.map_or(0, |p| p.flows_sent),
                        flows_received: was.map_or(0, |p| p.flows_received),
                        ..PeerStatus::default()
                    };
                    (*n.ip(), status)
                })
                .collect(),
        ));
        let wakers: Wakers =
            Arc::new(s.nodes.iter().filter(|n| **n != s.me).map(|n| (*n.ip(), Arc::new(tokio::sync::Notify::new()))).collect());
        let accepting = accept(Arc::clone(&self.listener), s.clone(), Arc::clone(&peers), self.events.clone(), Arc::clone(&wakers));
        let mut tasks = vec![tokio::spawn(accepting)];
        for peer in s.nodes.iter().filter(|n| **n != s.me) {
            let wake = Arc::clone(&wakers[peer.ip()]);
            tasks.push(tokio::spawn(send_to(*peer, s.clone(), self.exceptions.subscribe(), Arc::clone(&peers), wake)));
        }
        for t in std::mem::replace(&mut self.tasks, tasks) {
            t.abort();
        }
        self.peers = peers;
    }

    /// New settings (a reload): the connections start again with them (every peer gets
    /// everything again), on the same listening socket when this node's address is the same.
    ///
    /// # Errors
    /// When a new address cannot be bound; the old settings stay then.
    pub fn reconfigure(&mut self, settings: Settings) -> anyhow::Result<()> {
        if settings == self.settings {
            return Ok(());
        }
        if settings.me != self.settings.me {
            self.listener = Arc::new(bind(settings.me).with_context(|| format!("listening for cluster sync on {}", settings.me))?);
        }
        self.settings = settings;
        self.spawn();
        tracing::info!(me = %self.settings.me, nodes = self.settings.nodes.len(), "cluster sync reconfigured");
        Ok(())
    }

    #[must_use]
    pub const fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The exceptions of the latest walk: every peer gets what it lacks.
    pub fn publish(&self, exceptions: Exceptions) {
        self.exceptions.send_replace(Arc::new(exceptions));
    }

    /// Every other node, as seen now.
    #[must_use]
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers.lock().map(|p| p.values().cloned().collect()).unwrap_or_default()
    }
}

impl Drop for Cluster {
    /// Stops every task (connections close; the peers' copies age out on their own).
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The node among `nodes` whose address this host holds.
///
/// # Errors
/// When none is, or more than one.
pub fn find_me(nodes: &[SocketAddrV4], host: &[Ipv4Addr]) -> anyhow::Result<SocketAddrV4> {
    let mine: Vec<SocketAddrV4> = nodes.iter().copied().filter(|n| host.contains(n.ip())).collect();
    match mine.as_slice() {
        [me] => Ok(*me),
        [] => bail!(
            "cluster.nodes: none of {} is an address of this host ({}): list this node's own sync address too (the same list goes \
             on every node)",
            nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            host.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
        more => bail!(
            "cluster.nodes: {} are all addresses of this host: each node must appear once",
            more.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Every IPv4 address of this host (network namespace).
///
/// # Errors
/// When the kernel cannot list them.
pub fn host_ipv4s() -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        bail!("listing this host's addresses: {}", std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned; `ifa_addr` may be null.
        let ifa = unsafe { &*p };
        // SAFETY: a non-null `ifa_addr` points at a sockaddr of the family it names.
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: AF_INET: a sockaddr_in, which the kernel aligns for its type (read
            // unaligned all the same).
            let sin = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned() };
            out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn bind(me: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::V4(me))?;
    Ok(socket.listen(64)?)
}

fn update(peers: &Peers, node: Ipv4Addr, f: impl FnOnce(&mut PeerStatus)) {
    if let Ok(mut p) = peers.lock()
        && let Some(s) = p.get_mut(&node)
    {
        f(s);
    }
}

// ---- sending ----

/// A flow as a peer was last told of it.
struct Told {
    backend: Arc<str>,
    closing: bool,
    at: Instant,
    round: u64,
}

/// Our side of the connection to `peer`: connect (again and again), then send every round.
async fn send_to(
    peer: SocketAddrV4,
    s: Settings,
    mut exceptions: watch::Receiver<Arc<Exceptions>>,
    peers: Peers,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match connect(s.me, peer).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(200);
                update(&peers, *peer.ip(), |p| {
                    p.out_connected = true;
                    p.out_error = None;
                });
                tracing::info!(%peer, "cluster: connected");
                let why = serve_peer(&mut stream, peer, &s, &mut exceptions, &peers, &wake).await;
                tracing::warn!(%peer, error = %format!("{why:#}"), "cluster: connection lost");
                update(&peers, *peer.ip(), |p| {
                    p.out_connected = false;
                    p.out_error = Some(format!("{why:#}"));
                });
            }
            Err(e) => update(&peers, *peer.ip(), |p| {
                p.out_connected = false;
                p.out_error = Some(format!("{e:#}"));
            }),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = wake.notified() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(me: SocketAddrV4, peer: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // From our own node address: the peer accepts only the nodes of its list.
    socket.bind(SocketAddr::V4(SocketAddrV4::new(*me.ip(), 0)))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(SocketAddr::V4(peer)))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {peer}: no answer within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to {peer}"))?;
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(&stream);
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    sock.set_keepalive(true)?;
    Ok(stream)
}

/// Sends HELLO, then a round at once and after every change of the exceptions or every
/// `sync_interval`, until a write fails.
async fn serve_peer(
    stream: &mut TcpStream,
    peer: SocketAddrV4,
    s: &Settings,
    exceptions: &mut watch::Receiver<Arc<Exceptions>>,
    peers: &Peers,
    wake: &tokio::sync::Notify,
) -> anyhow::Error {
    let hello = encode_hello(s, *peer.ip(), unix_now());
    if let Err(e) = write_frame(stream, HELLO, &hello).await {
        return e;
    }
    // Nothing before this node's first walk: a SYNCED mark must mean "everything I hold".
    if exceptions.wait_for(|e| e.complete).await.is_err() {
        return anyhow::anyhow!("stopping");
    }
    let mut told: HashMap<(SocketAddr, SocketAddr), Told> = HashMap::new();
    let mut round = 0u64;
    loop {
        round += 1;
        let set = Arc::clone(&exceptions.borrow_and_update());
        match send_round(stream, &set, &mut told, round, s.refresh).await {
            Ok(n) => update(peers, *peer.ip(), |p| p.flows_sent += n),
            Err(e) => return e,
        }
        // The peer never writes on this connection: it becomes readable only when the peer
        // closes it or its kernel resets it (a restarted node has no such connection). And
        // when the peer connects to us, it may have restarted without our noticing (a node
        // that died without a FIN): a round at once makes its kernel answer with a reset, so
        // the restarted node gets everything on a new connection within a round trip, not
        // after our next round.
        tokio::select! {
            changed = exceptions.changed() => if changed.is_err() { return anyhow::anyhow!("stopping"); },
            () = tokio::time::sleep(s.sync_interval) => {}
            () = wake.notified() => {}
            ready = stream.readable() => {
                let mut byte = [0u8; 1];
                match ready.map(|()| stream.try_read(&mut byte)) {
                    Ok(Ok(0)) => return anyhow::anyhow!("the peer closed the connection"),
                    Ok(Ok(_)) => return anyhow::anyhow!("the peer sent data on a connection that carries ours only"),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(Err(e)) | Err(e) => return anyhow::Error::from(e).context("the connection to the peer broke"),
                }
            }
        }
    }
}

/// One round: what the peer lacks or must hear again, then `SYNCED`. Returns the flows sent.
async fn send_round(
    stream: &mut TcpStream,
    set: &Exceptions,
    told: &mut HashMap<(SocketAddr, SocketAddr), Told>,
    round: u64,
    refresh: Duration,
) -> anyhow::Result<u64> {
    let now = Instant::now();
    let mut count = 0u64;
    for g in &set.groups {
        let Some(listener) = g.listener else { continue };
        let backend: Arc<str> = Arc::from(g.backend.as_str());
        let mut due = Vec::new();
        for e in &g.entries {
            let t = told.entry((listener, e.client)).or_insert_with(|| Told {
                backend: Arc::clone(&backend),
                closing: false,
                at: now,
                round: 0,
            });
            let fresh = t.round == 0 || *t.backend != *backend || t.closing != e.closing || now.duration_since(t.at) >= refresh;
            if fresh {
                *t = Told { backend: Arc::clone(&backend), closing: e.closing, at: now, round };
                due.push(*e);
            } else {
                t.round = round;
            }
        }
        for chunk in due.chunks(FLOWS_PER_FRAME) {
            let kind = if listener.is_ipv6() { FLOWS6 } else { FLOWS };
            write_frame(stream, kind, &encode_flows(listener, &g.backend, chunk)).await?;
            count += chunk.len() as u64;
        }
    }
    // Forget what is no longer an exception: if it becomes one again, it is sent again.
    told.retain(|_, t| t.round == round);
    write_frame(stream, SYNCED, &[]).await?;
    Ok(count)
}

/// The body of a `FLOWS` frame (an IPv4 listener's) or a `FLOWS6` one (an IPv6 listener's,
/// 16-byte addresses); entries of the other family are left out.
fn encode_flows(listener: SocketAddr, backend: &str, entries: &[Entry]) -> Vec<u8> {
    let name = &backend.as_bytes()[..backend.len().min(255)];
    let entries: Vec<&Entry> = entries.iter().filter(|e| e.client.is_ipv6() == listener.is_ipv6()).collect();
    let mut b = Vec::with_capacity(16 + 2 + 1 + name.len() + 4 + entries.len() * ENTRY6_BYTES);
    push_ip(&mut b, listener.ip());
    b.extend_from_slice(&listener.port().to_be_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "at most 255")]
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    #[expect(clippy::cast_possible_truncation, reason = "at most FLOWS_PER_FRAME")]
    b.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        push_ip(&mut b, e.client.ip());
        b.extend_from_slice(&e.client.port().to_be_bytes());
        b.extend_from_slice(&e.idle.to_be_bytes());
        b.push(u8::from(e.closing));
    }
    b
}

fn push_ip(b: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
    }
}

async fn write_frame(stream: &mut TcpStream, kind: u8, body: &[u8]) -> anyhow::Result<()> {
    let len = u32::try_from(body.len() + 1).context("frame too long")?;
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(body);
    stream.write_all(&frame).await.context("writing to the peer")
}

// ---- receiving ----

async fn accept(listener: Arc<TcpListener>, s: Settings, peers: Peers, events: mpsc::Sender<Event>, wakers: Wakers) {
    // The readers go with this task: aborting it drops the set, which aborts them.
    let mut readers = tokio::task::JoinSet::new();
    // Every reader by its sequence number, and per node the one that greeted last: a node's
    // connection replaces its older one once its HELLO is good, not before (a connection from
    // the node's address that proves nothing must not push the real one out).
    let mut started: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut current: HashMap<Ipv4Addr, (u64, tokio::task::AbortHandle)> = HashMap::new();
    let (greeted_tx, mut greeted) = mpsc::unbounded_channel::<(Ipv4Addr, u64)>();
    let mut seq = 0u64;
    loop {
        while readers.try_join_next().is_some() {}
        started.retain(|_, h| !h.is_finished());
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some((node, id)) = greeted.recv() => {
                // The node is up (again): our connector need not wait out its backoff.
                if let Some(w) = wakers.get(&node) {
                    w.notify_one();
                }
                if let Some(handle) = started.remove(&id)
                    && let Some((old, previous)) = current.insert(node, (id, handle))
                    && old != id
                {
                    previous.abort();
                }
                continue;
            }
        };
        let (stream, from) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = match from {
            SocketAddr::V4(a) if *a.ip() != *s.me.ip() && s.nodes.iter().any(|n| n.ip() == a.ip()) => *a.ip(),
            other => {
                tracing::warn!(from = %other, "cluster: refused a connection from an address that is not one of cluster.nodes");
                continue;
            }
        };
        seq += 1;
        let id = seq;
        let (s, peers, events, greeted_tx) = (s.clone(), Arc::clone(&peers), events.clone(), greeted_tx.clone());
        let handle = readers.spawn(async move {
            let (why, generation) = receive(stream, node, &s, &peers, &events, || {
                let _ = greeted_tx.send((node, id));
            })
            .await;
            tracing::warn!(peer = %node, error = %format!("{why:#}"), "cluster: incoming connection ended");
            update(&peers, node, |p| {
                if generation.is_some_and(|g| g == p.in_generation) {
                    p.in_connected = false;
                    p.synced = false;
                    p.config = "unknown";
                }
                p.in_error = Some(format!("{why:#}"));
            });
        });
        started.insert(id, handle);
    }
}

/// Reads a peer's frames until the connection ends or breaks the protocol. A peer that sends
/// nothing (not even its `SYNCED` heartbeat) for three rounds is taken for dead. Once its HELLO
/// is good, the peer counts as connected (under a new generation, returned) and `on_greeted`
/// runs.
async fn receive(
    mut stream: TcpStream,
    node: Ipv4Addr,
    s: &Settings,
    peers: &Peers,
    events: &mpsc::Sender<Event>,
    on_greeted: impl FnOnce(),
) -> (anyhow::Error, Option<u64>) {
    let quiet = s.sync_interval * 3 + Duration::from_secs(5);
    let mut greeted = false;
    let mut generation = None;
    let mut on_greeted = Some(on_greeted);
    loop {
        // Until HELLO: a small frame, soon.
        let (wait, max) = if greeted { (quiet, MAX_FRAME) } else { (HELLO_WAIT, HELLO_MAX) };
        let (kind, body) = match tokio::time::timeout(wait, read_frame(&mut stream, max)).await {
            Err(_) => return (anyhow::anyhow!("nothing received for {wait:?}"), generation),
            Ok(Err(e)) => return (e, generation),
            Ok(Ok(f)) => f,
        };
        let result = match (greeted, kind) {
            (false, HELLO) => match decode_hello(&body, s.key.as_ref(), *s.me.ip(), unix_now()) {
                Ok((fingerprint, addr)) if addr == node => {
                    greeted = true;
                    let same = fingerprint == s.fingerprint;
                    if !same {
                        tracing::warn!(
                            peer = %node,
                            "cluster: this node's config differs from ours in what the rings are built from (listeners, backends, \
                             weights, ring_size): after a failover, sessions may move to other brokers"
                        );
                    }
                    update(peers, node, |p| {
                        p.in_generation += 1;
                        generation = Some(p.in_generation);
                        p.in_connected = true;
                        p.synced = false;
                        p.config = if same { "same" } else { "differs" };
                        p.in_error = None;
                    });
                    if let Some(f) = on_greeted.take() {
                        f();
                    }
                    events.send(Event::Greeted { from: node, same }).await.map_err(|_| anyhow::anyhow!("stopping"))
                }
                Ok((_, addr)) => Err(anyhow::anyhow!("HELLO names node {addr}, but the connection comes from {node}")),
                Err(e) => Err(e),
            },
            (false, k) => Err(anyhow::anyhow!("frame kind {k} before HELLO")),
            (true, FLOWS | FLOWS6) => match decode_flows(&body, kind == FLOWS6) {
                Ok(group) => {
                    let n = group.entries.len() as u64;
                    update(peers, node, |p| p.flows_received += n);
                    events.send(Event::Flows { from: node, group }).await.map_err(|_| anyhow::anyhow!("stopping"))
                }
                Err(e) => Err(e),
            },
            (true, SYNCED) => {
                update(peers, node, |p| p.synced = true);
                events.send(Event::Synced { from: node }).await.map_err(|_| anyhow::anyhow!("stopping"))
            }
            (true, k) => Err(anyhow::anyhow!("unknown frame kind {k}")),
        };
        if let Err(e) = result {
            return (e, generation);
        }
    }
}

async fn read_frame(stream: &mut TcpStream, max: usize) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.context("reading from the peer")?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > max {
        bail!("a frame of {len} bytes (at most {max} here)");
    }
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame).await.context("reading from the peer")?;
    let body = frame.split_off(1);
    Ok((frame[0], body))
}

/// A bounds-checked reader of a frame body.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn take<const N: usize>(&mut self, what: &str) -> anyhow::Result<[u8; N]> {
        if self.0.len() < N {
            bail!("a frame cut short in {what}");
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("N bytes"))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The MAC of a keyed HELLO: over its fields, its timestamp and the receiver's address (a HELLO
/// is good for one receiver, within [`HELLO_SKEW`] of its time).
fn hello_mac(key: &crate::config::SyncKey, fields: &[u8], to: Ipv4Addr) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(fields);
    ctx.update(&to.octets());
    ctx.sign()
}

/// HELLO from this node to `to`: magic, version, fingerprint, this node's address, and with a
/// key the time and the MAC.
fn encode_hello(s: &Settings, to: Ipv4Addr, now: u64) -> Vec<u8> {
    let mut hello = Vec::with_capacity(HELLO_BYTES + HELLO_AUTH_BYTES);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&s.fingerprint.to_be_bytes());
    hello.extend_from_slice(&s.me.ip().octets());
    if let Some(key) = &s.key {
        hello.extend_from_slice(&now.to_be_bytes());
        let tag = hello_mac(key, &hello, to);
        hello.extend_from_slice(tag.as_ref());
    }
    hello
}

/// A peer's HELLO to this node (`me`): its fingerprint and address, once it proved it holds
/// `key` (when this node has one).
fn decode_hello(body: &[u8], key: Option<&crate::config::SyncKey>, me: Ipv4Addr, now: u64) -> anyhow::Result<(u64, Ipv4Addr)> {
    let mut b = Body(body);
    if b.take::<8>("the magic")? != *MAGIC {
        bail!("not a dsrlb cluster peer (bad HELLO)");
    }
    let version = b.take::<1>("the version")?[0];
    if version != VERSION {
        bail!("cluster protocol version {version}, this node speaks {VERSION}: upgrade every node to the same dsrlb");
    }
    let fingerprint = u64::from_be_bytes(b.take("the fingerprint")?);
    let addr = Ipv4Addr::from(b.take::<4>("the node address")?);
    match (key, b.0.len()) {
        (None, 0) => {}
        (None, _) => bail!("the peer proves a cluster key (cluster.key_file) and this node has none: give every node the same key"),
        (Some(_), 0) => bail!("the peer proves no cluster key and this node has one (cluster.key_file): give every node the same key"),
        (Some(key), _) => {
            let at = u64::from_be_bytes(b.take("the time")?);
            let tag = b.take::<32>("the MAC")?;
            if !b.0.is_empty() {
                bail!("a HELLO with {} bytes too many", b.0.len());
            }
            let signed = &body[..HELLO_BYTES + 8];
            ring::hmac::verify(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0), &[signed, &me.octets()].concat(), &tag).map_err(
                |_| anyhow::anyhow!("the peer's HELLO does not prove this node's cluster key: give every node the same key_file"),
            )?;
            if at.abs_diff(now) > HELLO_SKEW {
                bail!(
                    "the peer's HELLO is {} s from this node's clock (at most {HELLO_SKEW}): a replay, or clocks that need NTP",
                    at.abs_diff(now)
                );
            }
        }
    }
    Ok((fingerprint, addr))
}

fn decode_flows(body: &[u8], ipv6: bool) -> anyhow::Result<Group> {
    let mut b = Body(body);
    let vip = if ipv6 { IpAddr::V6(Ipv6Addr::from(b.take::<16>("the VIP")?)) } else { IpAddr::V4(Ipv4Addr::from(b.take::<4>("the VIP")?)) };
    let port = u16::from_be_bytes(b.take("the port")?);
    let name_len = usize::from(b.take::<1>("the backend name")?[0]);
    if b.0.len() < name_len {
        bail!("a frame cut short in the backend name");
    }
    let (name, rest) = b.0.split_at(name_len);
    b.0 = rest;
    let backend = std::str::from_utf8(name).context("a backend name that is not UTF-8")?.to_owned();
    let count = u32::from_be_bytes(b.take("the count")?) as usize;
    let (size, addr) = if ipv6 { (ENTRY6_BYTES, 16) } else { (ENTRY_BYTES, 4) };
    if count > FLOWS_PER_FRAME || b.0.len() != count * size {
        bail!("{count} flows announced, {} bytes follow", b.0.len());
    }
    let entries =
        b.0.chunks_exact(size)
            .map(|e| {
                let ip = if ipv6 {
                    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&e[..16]).expect("16 bytes")))
                } else {
                    IpAddr::V4(Ipv4Addr::new(e[0], e[1], e[2], e[3]))
                };
                Entry {
                    client: SocketAddr::new(ip, u16::from_be_bytes([e[addr], e[addr + 1]])),
                    idle: u16::from_be_bytes([e[addr + 2], e[addr + 3]]),
                    closing: e[addr + 4] & 1 != 0,
                }
            })
            .collect();
    Ok(Group { listener: Some(SocketAddr::new(vip, port)), backend, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `f` holds for the one peer.
    async fn peer_until(c: &Cluster, what: &str, f: impl Fn(&PeerStatus) -> bool) -> PeerStatus {
        for _ in 0..500 {
            if let Some(p) = c.peers().into_iter().find(|p| f(p)) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: {:?}", c.peers());
    }

    /// A connection to `to` from `from` (a loopback address of its own).
    async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from((from, 0))).expect("bind");
        socket.connect(to).await.expect("connect")
    }

    /// Whether the other end closed (or reset) the connection within a second.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }

    fn hello(fingerprint: u64, node: Ipv4Addr) -> Vec<u8> {
        let mut body = MAGIC.to_vec();
        body.push(VERSION);
        body.extend_from_slice(&fingerprint.to_be_bytes());
        body.extend_from_slice(&node.octets());
        let mut frame = u32::try_from(body.len() + 1).expect("len").to_be_bytes().to_vec();
        frame.push(HELLO);
        frame.extend_from_slice(&body);
        frame
    }

    /// What another node (or anything else) can make of this node's sync port: strangers are
    /// refused, a first frame larger than a HELLO ends the connection before anything is
    /// allocated for it, a HELLO tells the configs apart, and a node's new connection replaces
    /// its old one.
    #[tokio::test]
    async fn the_sync_port_bounds_what_a_peer_can_do() {
        let (me, peer) = (Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2));
        let settings = Settings {
            me: SocketAddrV4::new(me, 0),
            // The peer's own port refuses connections: only its connections to us matter here.
            nodes: vec![SocketAddrV4::new(me, 0), SocketAddrV4::new(peer, 1)],
            fingerprint: 7,
            sync_interval: Duration::from_secs(1),
            refresh: Duration::from_secs(10),
            key: None,
        };
        let (events, _rx) = mpsc::channel(64);
        let c = Cluster::start(settings, events).expect("start");
        let at = c.listener.local_addr().expect("bound");

        let mut stranger = connect_from(Ipv4Addr::new(127, 0, 0, 3), at).await;
        assert!(closed(&mut stranger).await, "a connection from outside cluster.nodes was kept");

        let mut big = connect_from(peer, at).await;
        big.write_all(&1_000_000u32.to_be_bytes()).await.expect("write");
        assert!(closed(&mut big).await, "a first frame of a megabyte was waited for");
        peer_until(&c, "the refusal", |p| p.in_error.as_deref().is_some_and(|e| e.contains("at most 62"))).await;

        let mut first = connect_from(peer, at).await;
        first.write_all(&hello(8, peer)).await.expect("write");
        peer_until(&c, "a HELLO of another config", |p| p.in_connected && p.config == "differs").await;
        let mut second = connect_from(peer, at).await;
        second.write_all(&hello(7, peer)).await.expect("write");
        peer_until(&c, "a HELLO of the same config", |p| p.in_connected && p.config == "same").await;
        assert!(closed(&mut first).await, "the node's older connection was kept beside its new one");
        // A connection from the node's address that proves nothing does not push it out.
        let mut intruder = connect_from(peer, at).await;
        intruder.write_all(&[0, 0, 0, 3, HELLO, 0, 0]).await.expect("write");
        assert!(closed(&mut intruder).await, "a bad HELLO was taken");
        assert!(!closed(&mut second).await, "the node's good connection was closed");
        let p = peer_until(&c, "the node still connected", |p| p.in_connected).await;
        assert_eq!(p.config, "same");
    }

    #[test]
    fn flows_frames_round_trip_and_bad_ones_are_refused() {
        let entries = vec![
            Entry { client: "198.51.100.7:40000".parse().expect("addr"), idle: 3, closing: false },
            Entry { client: "198.51.100.8:40001".parse().expect("addr"), idle: 65535, closing: true },
        ];
        let listener: SocketAddr = "192.0.2.100:1883".parse().expect("addr");
        let entries6 = vec![
            Entry { client: "[2001:db8::7]:40000".parse().expect("addr"), idle: 3, closing: false },
            Entry { client: "[2001:db8:1::8]:40001".parse().expect("addr"), idle: 65535, closing: true },
        ];
        let listener6: SocketAddr = "[2001:db8::100]:1883".parse().expect("addr");
        for (listener, entries, ipv6) in [(listener, entries, false), (listener6, entries6, true)] {
            let body = encode_flows(listener, "b3", &entries);
            let g = decode_flows(&body, ipv6).expect("decodes");
            assert_eq!(g, Group { listener: Some(listener), backend: "b3".to_owned(), entries });
            for cut in 0..body.len() {
                assert!(decode_flows(&body[..cut], ipv6).is_err(), "a frame cut at {cut} was accepted");
            }
            let mut long = body.clone();
            long.push(0);
            assert!(decode_flows(&long, ipv6).is_err(), "a frame with a trailing byte was accepted");
            assert!(decode_flows(&body, !ipv6).is_err(), "a frame read as the other family was accepted");
        }
        let mut hello = MAGIC.to_vec();
        hello.push(VERSION);
        hello.extend_from_slice(&7u64.to_be_bytes());
        hello.extend_from_slice(&[192, 0, 2, 3]);
        let me = Ipv4Addr::new(192, 0, 2, 2);
        assert_eq!(decode_hello(&hello, None, me, 0).expect("hello"), (7, Ipv4Addr::new(192, 0, 2, 3)));
        hello[8] = VERSION + 1;
        assert!(decode_hello(&hello, None, me, 0).expect_err("another version").to_string().contains("upgrade every node"));
        assert!(decode_hello(b"HTTP/1.1 200 OK\r\n\r\n", None, me, 0).is_err());
    }

    /// With `cluster.key_file`, a HELLO proves the key, for this receiver, near this time.
    #[test]
    fn a_keyed_hello_proves_the_key_to_its_receiver_only() {
        let key = |k: &[u8]| Some(crate::config::SyncKey(Arc::from(k)));
        let (a, b, c) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3), Ipv4Addr::new(192, 0, 2, 4));
        let settings = |k| Settings {
            me: SocketAddrV4::new(a, 9878),
            nodes: vec![SocketAddrV4::new(a, 9878), SocketAddrV4::new(b, 9878)],
            fingerprint: 7,
            sync_interval: Duration::from_secs(10),
            refresh: Duration::from_secs(10),
            key: k,
        };
        let secret = key(b"0123456789abcdef0123");
        let now = 1_800_000_000;
        let hello = encode_hello(&settings(secret.clone()), b, now);
        assert_eq!(hello.len() + 1, HELLO_MAX);
        assert_eq!(decode_hello(&hello, secret.as_ref(), b, now + 5).expect("the right key"), (7, a));
        let err = |r: anyhow::Result<(u64, Ipv4Addr)>| r.expect_err("must be refused").to_string();
        assert!(err(decode_hello(&hello, key(b"another key of 16+ bytes").as_ref(), b, now)).contains("does not prove"));
        assert!(err(decode_hello(&hello, secret.as_ref(), c, now)).contains("does not prove"), "a HELLO for b taken by c");
        assert!(err(decode_hello(&hello, secret.as_ref(), b, now + 600)).contains("s from this node's clock"));
        assert!(err(decode_hello(&hello, None, b, now)).contains("this node has none"));
        let plain = encode_hello(&settings(None), b, now);
        assert!(err(decode_hello(&plain, secret.as_ref(), b, now)).contains("proves no cluster key"));
        let mut flipped = hello.clone();
        flipped[12] ^= 1;
        assert!(err(decode_hello(&flipped, secret.as_ref(), b, now)).contains("does not prove"), "a changed fingerprint");
        for cut in HELLO_BYTES + 1..hello.len() {
            assert!(decode_hello(&hello[..cut], secret.as_ref(), b, now).is_err(), "a HELLO cut at {cut} was accepted");
        }
    }

    #[test]
    fn this_node_is_the_one_whose_address_the_host_holds() {
        let nodes: Vec<SocketAddrV4> = ["192.0.2.2:9878", "192.0.2.3:9878"].iter().map(|a| a.parse().expect("addr")).collect();
        assert_eq!(find_me(&nodes, &[Ipv4Addr::new(192, 0, 2, 3), Ipv4Addr::LOCALHOST]).expect("found"), nodes[1]);
        let e = find_me(&nodes, &[Ipv4Addr::new(192, 0, 2, 9)]).expect_err("none");
        assert!(e.to_string().contains("none of 192.0.2.2:9878, 192.0.2.3:9878 is an address of this host"), "{e}");
        assert!(find_me(&nodes, &[Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]).is_err());
    }
}
