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
//! its idle time as it is when sent, so the peer's copy ages as the original does; the peer
//! keeps it the refresh lag longer, for the frames since (`crate::flow_table`'s doc). After
//! each round it sends a `SYNCED` mark, which also serves as a heartbeat. On a new connection
//! the peer gets everything again: a restarted node catches up at once.
//!
//! Who may take part: connections are made from and accepted for the listed node addresses
//! only, and each opens with a handshake in which both ends prove they hold the cluster key
//! (`cluster.key_file`) for this connection (see [`auth`]); every frame after it carries a MAC
//! over its place in the stream. Until its handshake is done a connection is *pending*: at most
//! [`PENDING_PER_SOURCE`] per node address and [`PENDING_TOTAL`] in all, for at most
//! [`HANDSHAKE_WAIT`], and it replaces no connection.
//!
//! Frames (big-endian): `u32 length` of what follows, `u8 kind`, body; after the handshake
//! (`HELLO` 1, `REPLY` 5, `PROOF` 6, in [`auth`]), the body ends with the frame's MAC.
//! - `FLOWS` (2): `u32 VIP`, `u16 port`, `u8 length`, backend name, `u32 count`, then per flow
//!   `u32 client address`, `u16 client port`, `u16 idle units`, `u8 flags` (1: closing, 2: opened
//!   and not yet confirmed, 4: relayed, the sender's copy of another node's word; a node before
//!   this flag ignores it, and keeps such a copy a lag less).
//! - `FLOWS6` (4): the same for an IPv6 listener, with 16-byte addresses.
//! - `SYNCED` (3): empty.

mod auth;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use auth::{Body, Frames, HELLO, HELLO_READ_MAX, Incoming, Outgoing, PROOF, PROOF_BYTES, REPLY, REPLY_BYTES, TAG_BYTES};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// One exception: a client's flow, its idle time in flow-clock units, whether it is closing,
/// and whether it is a connection just opened (recorded by an admitted SYN, not yet confirmed
/// by its first keepalive): its copy stays unconfirmed, and confirms on the receiver by its
/// own next segment there, or when the sender says it confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Of the family of its group's listener.
    pub client: SocketAddr,
    pub idle: u16,
    pub closing: bool,
    pub opened: bool,
    /// The sender holds it as another node's copy, and `idle` is that node's word: the flow
    /// may have had frames a refresh lag more recent there (`FlowTable`'s `Idle::shared`).
    pub relayed: bool,
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
    /// When the walk read the clock its idle times count from: a flow is sent as idle as it is
    /// when it is sent (an idle time from an older walk would make the peer's copy younger than
    /// the flow, and copies passed back and forth would keep each other alive).
    pub walked: Option<Instant>,
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
    /// The shared secret both ends of a connection prove they hold (`cluster.key_file`); none
    /// with `insecure = true` (the same handshake with a key everyone knows).
    pub key: Option<crate::config::SyncKey>,
}

/// One other node, as this one sees it (for status and metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub node: String,
    /// Our connection to it (our exceptions go this way).
    pub out_connected: bool,
    pub out_error: Option<String>,
    /// Its connection to us (its exceptions come this way).
    pub in_connected: bool,
    /// It has sent a whole round since it connected.
    pub synced: bool,
    pub config: PeerConfig,
    pub flows_sent: u64,
    pub flows_received: u64,
    pub in_error: Option<String>,
    /// The newest incoming connection: an older one that ends does not mark the peer gone.
    #[serde(skip)]
    pub in_generation: u64,
}

/// Whether another node builds its rings from the same config as this one (by their
/// fingerprints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerConfig {
    Same,
    /// Its config's ring-relevant part is not ours.
    Differs,
    /// Not heard from yet.
    #[default]
    Unknown,
}

impl PeerConfig {
    /// As status and its JSON name it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Same => "same",
            Self::Differs => "differs",
            Self::Unknown => "unknown",
        }
    }
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

const FLOWS: u8 = 2;
const SYNCED: u8 = 3;
/// `FLOWS` of an IPv6 listener: 16-byte addresses. A node that predates it closes the
/// connection on one, so upgrade every node before adding IPv6 listeners.
const FLOWS6: u8 = 4;
/// Flows per `FLOWS` frame, and the largest frame read.
const FLOWS_PER_FRAME: usize = 65_536;
const MAX_FRAME: usize = 1 + 16 + 2 + 1 + 255 + 4 + FLOWS_PER_FRAME * ENTRY6_BYTES + TAG_BYTES;
const ENTRY_BYTES: usize = 4 + 2 + 2 + 1;
const ENTRY6_BYTES: usize = 16 + 2 + 2 + 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection's handshake must be done this soon, on either end.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
/// Accepted connections whose handshake is not done yet, from one node address and in all:
/// more are closed at once. A node makes one at a time.
const PENDING_PER_SOURCE: usize = 4;
const PENDING_TOTAL: usize = 32;
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
        warn_if_insecure(&c.settings);
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
                        config: PeerConfig::Unknown,
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
        warn_if_insecure(&self.settings);
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

/// `insecure = true`, said at every start: the sync then trusts whoever can reach it.
fn warn_if_insecure(s: &Settings) {
    if s.key.is_none() {
        tracing::warn!(
            me = %s.me,
            "cluster sync WITHOUT a key (cluster.insecure = true): any process that can reach a node's sync port from a node's address \
             can send flows that move live sessions to other brokers, and receive this node's exceptions; set cluster.key_file"
        );
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

/// A client's address and port, exact in 18 bytes (an IPv4 address in its IPv6-mapped form;
/// each listener's clients are of its own family): what a peer was told is kept per listener
/// and client, for every live flow while configs differ, so a million of them per peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey([u8; 18]);

impl From<SocketAddr> for ClientKey {
    fn from(a: SocketAddr) -> Self {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut k = [0u8; 18];
        k[..16].copy_from_slice(&ip.octets());
        k[16..].copy_from_slice(&a.port().to_be_bytes());
        Self(k)
    }
}

/// A flow as a peer was last told of it, in 16 bytes: with its 18-byte key an entry of 36 (and
/// a control byte), about 78 bytes per flow at a million with the map's spare capacity, where
/// the `(SocketAddr, SocketAddr)` key made it 112 per entry (`bench scale` measured a full
/// share at 563 MB of peak RSS then, 321 MB now).
#[derive(Clone, Copy)]
struct Told {
    /// Its backend's index in [`Memory::backends`].
    backend: u32,
    /// When it was sent last, in tenths of a second from [`Memory::epoch`] (13 years fit).
    at_ds: u32,
    /// The last round it was an exception in.
    round: u32,
    closing: bool,
    opened: bool,
}

/// What one connection has told its peer: per listener, per client.
struct Memory {
    flows: HashMap<SocketAddr, HashMap<ClientKey, Told>>,
    /// Backend names told, each once.
    backends: Vec<Arc<str>>,
    epoch: Instant,
}

impl Memory {
    fn new() -> Self {
        Self { flows: HashMap::new(), backends: Vec::new(), epoch: Instant::now() }
    }

    fn backend_index(&mut self, name: &str) -> u32 {
        let i = self.backends.iter().position(|b| **b == *name).unwrap_or_else(|| {
            self.backends.push(Arc::from(name));
            self.backends.len() - 1
        });
        u32::try_from(i).unwrap_or(u32::MAX)
    }

    fn tenths(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.epoch).as_millis() / 100).unwrap_or(u32::MAX)
    }
}

/// Our side of the connection to `peer`: connect and shake hands (again and again), then send
/// every round.
async fn send_to(
    peer: SocketAddrV4,
    s: Settings,
    mut exceptions: watch::Receiver<Arc<Exceptions>>,
    peers: Peers,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let linked = async {
            let mut stream = connect(s.me, peer).await?;
            let frames = tokio::time::timeout(HANDSHAKE_WAIT, handshake_out(&mut stream, *peer.ip(), &s))
                .await
                .map_err(|_| anyhow::anyhow!("{peer} did not answer HELLO within {HANDSHAKE_WAIT:?}"))??;
            anyhow::Ok((stream, frames))
        };
        match linked.await {
            Ok((mut stream, mut frames)) => {
                backoff = Duration::from_millis(200);
                update(&peers, *peer.ip(), |p| {
                    p.out_connected = true;
                    p.out_error = None;
                });
                tracing::info!(%peer, "cluster: connected");
                let why = serve_peer(&mut stream, &mut frames, peer, &s, &mut exceptions, &peers, &wake).await;
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

/// The connector's handshake (see [`auth`]): `HELLO`, the peer's `REPLY` checked, `PROOF`.
/// Nothing else is sent before the peer has proved the key for this connection.
async fn handshake_out(stream: &mut TcpStream, peer: Ipv4Addr, s: &Settings) -> anyhow::Result<Frames> {
    let out = Outgoing::new(s.key.as_ref(), s.fingerprint, *s.me.ip(), peer)?;
    write_raw(stream, HELLO, out.hello()).await?;
    let (kind, reply) = read_frame(stream, 1 + REPLY_BYTES)
        .await
        .context("no answer to HELLO (the node's log says why: another key_file or insecure, another version, another nodes list)")?;
    if kind != REPLY {
        bail!("frame kind {kind} in answer to HELLO: not a dsrlb node of this version");
    }
    let (proof, frames) = out.finish(&reply)?;
    write_raw(stream, PROOF, &proof).await?;
    Ok(frames)
}

/// Sends a round at once and after every change of the exceptions or every `sync_interval`,
/// until a write fails.
async fn serve_peer(
    stream: &mut TcpStream,
    frames: &mut Frames,
    peer: SocketAddrV4,
    s: &Settings,
    exceptions: &mut watch::Receiver<Arc<Exceptions>>,
    peers: &Peers,
    wake: &tokio::sync::Notify,
) -> anyhow::Error {
    // Nothing before this node's first walk: a SYNCED mark must mean "everything I hold".
    if exceptions.wait_for(|e| e.complete).await.is_err() {
        return anyhow::anyhow!("stopping");
    }
    let mut told = Memory::new();
    let mut round = 0u32;
    loop {
        round = round.wrapping_add(1).max(1);
        let set = Arc::clone(&exceptions.borrow_and_update());
        match send_round(stream, frames, &set, &mut told, round, s.refresh).await {
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
    frames: &mut Frames,
    set: &Exceptions,
    told: &mut Memory,
    round: u32,
    refresh: Duration,
) -> anyhow::Result<u64> {
    let now = told.tenths(Instant::now());
    // Units of the flow clock since the walk, rounded up: added to every idle time sent (a
    // copy made a little older than the flow is what the peer's lag is for; one made younger,
    // passed back, would make the original younger).
    let since_walk = set.walked.map_or(0, |w| {
        let units = w.elapsed().as_nanos().div_ceil(1 << lb_common::FLOW_AGE_NS_SHIFT);
        u16::try_from(units).unwrap_or(u16::MAX)
    });
    // Rounded up: a flow is sent again no sooner than `refresh` after it was (at most a tenth
    // of a second sooner, by where the clock's tenths fall).
    let refresh = u32::try_from(refresh.as_millis().div_ceil(100)).unwrap_or(u32::MAX);
    let mut count = 0u64;
    for g in &set.groups {
        let Some(listener) = g.listener else { continue };
        let backend = told.backend_index(&g.backend);
        let flows = told.flows.entry(listener).or_default();
        let mut due = Vec::new();
        for e in &g.entries {
            let t = flows.entry(ClientKey::from(e.client)).or_insert(Told { backend, closing: false, opened: false, at_ds: now, round: 0 });
            let fresh = t.round == 0
                || t.backend != backend
                || t.closing != e.closing
                || t.opened != e.opened
                || now.saturating_sub(t.at_ds) >= refresh;
            if fresh {
                *t = Told { backend, closing: e.closing, opened: e.opened, at_ds: now, round };
                due.push(*e);
            } else {
                t.round = round;
            }
        }
        for chunk in due.chunks(FLOWS_PER_FRAME) {
            let kind = if listener.is_ipv6() { FLOWS6 } else { FLOWS };
            let aged: Vec<Entry> = chunk.iter().map(|e| Entry { idle: e.idle.saturating_add(since_walk), ..*e }).collect();
            write_frame(stream, frames, kind, &encode_flows(listener, &g.backend, &aged)).await?;
            count += chunk.len() as u64;
        }
    }
    // Forget what is no longer an exception: if it becomes one again, it is sent again.
    for flows in told.flows.values_mut() {
        flows.retain(|_, t| t.round == round);
        // Memory back once a share shrinks for good (configs the same again), without a
        // rehash every round for a count that moves around a power of two.
        if flows.capacity() > 4 * flows.len().max(1024) {
            flows.shrink_to_fit();
        }
    }
    told.flows.retain(|_, flows| !flows.is_empty());
    write_frame(stream, frames, SYNCED, &[]).await?;
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
        b.push(u8::from(e.closing) | u8::from(e.opened) << 1 | u8::from(e.relayed) << 2);
    }
    b
}

fn push_ip(b: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
    }
}

/// A frame after the handshake, with its MAC.
async fn write_frame(stream: &mut TcpStream, frames: &mut Frames, kind: u8, body: &[u8]) -> anyhow::Result<()> {
    let frame = frames.seal(kind, body)?;
    stream.write_all(&frame).await.context("writing to the peer")
}

/// A frame of the handshake (no MAC of its own).
async fn write_raw(stream: &mut TcpStream, kind: u8, body: &[u8]) -> anyhow::Result<()> {
    stream.write_all(&raw_frame(kind, body)).await.context("writing to the peer")
}

fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 1).expect("a handshake frame is small");
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(body);
    frame
}

// ---- receiving ----

async fn accept(listener: Arc<TcpListener>, s: Settings, peers: Peers, events: mpsc::Sender<Event>, wakers: Wakers) {
    // The readers go with this task: aborting it drops the set, which aborts them.
    let mut readers = tokio::task::JoinSet::new();
    // The readers whose handshake is not done (pending), by sequence number, and per node the
    // one that shook hands last: a node's connection replaces its older one once its handshake
    // is done, not before (a connection from the node's address that proves nothing, or
    // replays a recorded handshake, must not push the real one out).
    let mut pending: HashMap<u64, (Ipv4Addr, tokio::task::AbortHandle)> = HashMap::new();
    let mut current: HashMap<Ipv4Addr, (u64, tokio::task::AbortHandle)> = HashMap::new();
    let (greeted_tx, mut greeted) = mpsc::unbounded_channel::<(Ipv4Addr, u64)>();
    let mut seq = 0u64;
    loop {
        while readers.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some((node, id)) = greeted.recv() => {
                // The node is up (again): our connector need not wait out its backoff.
                if let Some(w) = wakers.get(&node) {
                    w.notify_one();
                }
                if let Some((_, handle)) = pending.remove(&id)
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
        pending.retain(|_, (_, h)| !h.is_finished());
        let from_node = pending.values().filter(|(n, _)| *n == node).count();
        if from_node >= PENDING_PER_SOURCE || pending.len() >= PENDING_TOTAL {
            tracing::warn!(
                peer = %node,
                from_node,
                pending = pending.len(),
                "cluster: refused a connection: too many without a handshake yet (at most {PENDING_PER_SOURCE} per node, \
                 {PENDING_TOTAL} in all)"
            );
            continue;
        }
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
                    p.config = PeerConfig::Unknown;
                }
                p.in_error = Some(format!("{why:#}"));
            });
        });
        pending.insert(id, (node, handle));
    }
}

/// The acceptor's handshake (see [`auth`]): `HELLO` checked, `REPLY`, the peer's `PROOF`
/// checked. Returns the peer's config fingerprint and the key of its frames.
async fn handshake_in(stream: &mut TcpStream, node: Ipv4Addr, s: &Settings) -> anyhow::Result<(u64, Frames)> {
    let (kind, hello) = read_frame(stream, HELLO_READ_MAX).await?;
    if kind != HELLO {
        bail!("frame kind {kind} before HELLO");
    }
    let incoming = Incoming::new(&hello, s.key.as_ref(), node, *s.me.ip())?;
    write_raw(stream, REPLY, incoming.reply()).await?;
    let (kind, proof) = read_frame(stream, 1 + PROOF_BYTES).await?;
    if kind != PROOF {
        bail!("frame kind {kind} in answer to REPLY");
    }
    Ok((incoming.fingerprint, incoming.finish(&proof)?))
}

/// Shakes hands, then reads a peer's frames until the connection ends or breaks the protocol.
/// A peer that sends nothing (not even its `SYNCED` heartbeat) for three rounds is taken for
/// dead. Once the handshake is done, the peer counts as connected (under a new generation,
/// returned) and `on_greeted` runs.
async fn receive(
    mut stream: TcpStream,
    node: Ipv4Addr,
    s: &Settings,
    peers: &Peers,
    events: &mpsc::Sender<Event>,
    on_greeted: impl FnOnce(),
) -> (anyhow::Error, Option<u64>) {
    let (fingerprint, mut frames) = match tokio::time::timeout(HANDSHAKE_WAIT, handshake_in(&mut stream, node, s)).await {
        Err(_) => return (anyhow::anyhow!("no handshake within {HANDSHAKE_WAIT:?}"), None),
        Ok(Err(e)) => return (e, None),
        Ok(Ok(h)) => h,
    };
    let same = fingerprint == s.fingerprint;
    if !same {
        tracing::warn!(
            peer = %node,
            "cluster: this node's config differs from ours in what the rings are built from (listeners, backends, weights, \
             ring_size): after a failover, sessions may move to other brokers"
        );
    }
    let mut generation = None;
    update(peers, node, |p| {
        p.in_generation += 1;
        generation = Some(p.in_generation);
        p.in_connected = true;
        p.synced = false;
        p.config = if same { PeerConfig::Same } else { PeerConfig::Differs };
        p.in_error = None;
    });
    on_greeted();
    if events.send(Event::Greeted { from: node, same }).await.is_err() {
        return (anyhow::anyhow!("stopping"), generation);
    }
    let quiet = s.sync_interval * 3 + Duration::from_secs(5);
    loop {
        let (kind, rest) = match tokio::time::timeout(quiet, read_frame(&mut stream, MAX_FRAME)).await {
            Err(_) => return (anyhow::anyhow!("nothing received for {quiet:?}"), generation),
            Ok(Err(e)) => return (e, generation),
            Ok(Ok(f)) => f,
        };
        let body = match frames.open(kind, &rest) {
            Ok(body) => body,
            Err(e) => return (e, generation),
        };
        let result = match kind {
            FLOWS | FLOWS6 => match decode_flows(body, kind == FLOWS6) {
                Ok(group) => {
                    let n = group.entries.len() as u64;
                    update(peers, node, |p| p.flows_received += n);
                    events.send(Event::Flows { from: node, group }).await.map_err(|_| anyhow::anyhow!("stopping"))
                }
                Err(e) => Err(e),
            },
            SYNCED if body.is_empty() => {
                update(peers, node, |p| p.synced = true);
                events.send(Event::Synced { from: node }).await.map_err(|_| anyhow::anyhow!("stopping"))
            }
            k => Err(anyhow::anyhow!("unexpected frame kind {k} of {} bytes", body.len())),
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
                    opened: e[addr + 4] & 2 != 0,
                    relayed: e[addr + 4] & 4 != 0,
                }
            })
            .collect();
    Ok(Group { listener: Some(SocketAddr::new(vip, port)), backend, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncKey;

    const KEY: &[u8] = b"0123456789abcdef0123";
    const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

    fn key(k: &[u8]) -> SyncKey {
        SyncKey(Arc::from(k))
    }

    /// This node on 127.0.0.1 (a port the kernel picks) with fingerprint 7, and `others` on
    /// loopback addresses of their own whose sync ports refuse connections: only their
    /// connections to us matter.
    fn settings(key: Option<SyncKey>, others: &[Ipv4Addr]) -> Settings {
        let me = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        Settings {
            me,
            nodes: std::iter::once(me).chain(others.iter().map(|o| SocketAddrV4::new(*o, 1))).collect(),
            fingerprint: 7,
            sync_interval: Duration::from_secs(1),
            refresh: Duration::from_secs(10),
            key,
        }
    }

    /// A cluster node as `settings` say, and where it listens.
    fn start(settings: Settings) -> (Cluster, SocketAddr, mpsc::Receiver<Event>) {
        let (events, rx) = mpsc::channel(64);
        let c = Cluster::start(settings, events).expect("start");
        let at = c.listener.local_addr().expect("bound");
        (c, at, rx)
    }

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

    /// Whether the other end closed (or reset) the connection within a second; what it sent
    /// before (a `REPLY`) is skipped.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 256];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Whether the connection is open as far as this end knows now (nothing to read, no FIN).
    fn open_now(s: &TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    async fn next_event(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an event within 5 s").expect("the channel open")
    }

    /// A node's side of the sync, by hand: its connection after the handshake, the key of its
    /// frames, and the handshake's frames as it sent them (to replay).
    struct Shaken {
        stream: TcpStream,
        frames: Frames,
        hello: Vec<u8>,
        proof: Vec<u8>,
    }

    impl Shaken {
        /// Sends a frame with its MAC, as the node would.
        async fn send(&mut self, kind: u8, body: &[u8]) {
            let frame = self.frames.seal(kind, body).expect("seal");
            self.stream.write_all(&frame).await.expect("write");
        }
    }

    /// Connects from `from` to the node at `at` and shakes hands as a node with `key` and
    /// `fingerprint` would.
    async fn shake_hands(key: Option<&SyncKey>, fingerprint: u64, from: Ipv4Addr, at: SocketAddr) -> anyhow::Result<Shaken> {
        let mut stream = connect_from(from, at).await;
        let SocketAddr::V4(to) = at else { unreachable!("an IPv4 node") };
        let out = Outgoing::new(key, fingerprint, from, *to.ip())?;
        let hello = raw_frame(HELLO, out.hello());
        stream.write_all(&hello).await?;
        let (kind, reply) = read_frame(&mut stream, 1 + REPLY_BYTES).await?;
        anyhow::ensure!(kind == REPLY, "kind {kind}");
        let (proof, frames) = out.finish(&reply)?;
        let proof = raw_frame(PROOF, &proof);
        stream.write_all(&proof).await?;
        Ok(Shaken { stream, frames, hello, proof })
    }

    fn flows_body() -> Vec<u8> {
        let entry = Entry { client: "198.51.100.7:40000".parse().expect("addr"), idle: 3, closing: false, opened: false, relayed: false };
        encode_flows("192.0.2.100:1883".parse().expect("addr"), "b3", &[entry])
    }

    /// What another node (or anything else) can make of this node's sync port: strangers are
    /// refused, a first frame larger than a HELLO ends the connection before anything is
    /// allocated for it, a handshake tells the configs apart, and a node's new connection
    /// replaces its old one once it has shaken hands, not before.
    /// What a peer was told is keyed exactly, in 18 bytes: address and port, either family.
    #[test]
    fn client_keys_are_exact() {
        let a = |s: &str| ClientKey::from(s.parse::<SocketAddr>().unwrap());
        assert!(a("192.0.2.1:40000") == a("192.0.2.1:40000"));
        assert!(a("192.0.2.1:40000") != a("192.0.2.1:40001"));
        assert!(a("192.0.2.1:40000") != a("192.0.2.2:40000"));
        assert!(a("[2001:db8::1]:40000") != a("[2001:db8::2]:40000"));
        assert_eq!(std::mem::size_of::<ClientKey>() + std::mem::size_of::<Told>(), 18 + 16);
    }

    #[tokio::test]
    async fn the_sync_port_bounds_what_a_peer_can_do() {
        let (c, at, mut rx) = start(settings(Some(key(KEY)), &[PEER]));
        let mut stranger = connect_from(Ipv4Addr::new(127, 0, 0, 3), at).await;
        assert!(closed(&mut stranger).await, "a connection from outside cluster.nodes was kept");

        let mut big = connect_from(PEER, at).await;
        big.write_all(&1_000_000u32.to_be_bytes()).await.expect("write");
        assert!(closed(&mut big).await, "a first frame of a megabyte was waited for");
        peer_until(&c, "the refusal", |p| p.in_error.as_deref().is_some_and(|e| e.contains("at most 64"))).await;

        let mut first = shake_hands(Some(&key(KEY)), 8, PEER, at).await.expect("a handshake");
        peer_until(&c, "a node of another config", |p| p.in_connected && p.config == PeerConfig::Differs).await;
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, same: false }));
        let mut second = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        peer_until(&c, "a node of the same config", |p| p.in_connected && p.config == PeerConfig::Same).await;
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, same: true }));
        assert!(closed(&mut first.stream).await, "the node's older connection was kept beside its new one");
        // A connection from the node's address that proves nothing does not push it out.
        let mut intruder = connect_from(PEER, at).await;
        intruder.write_all(&[0, 0, 0, 3, HELLO, 0, 0]).await.expect("write");
        assert!(closed(&mut intruder).await, "a bad HELLO was taken");
        assert!(!closed(&mut second.stream).await, "the node's good connection was closed");
        let p = peer_until(&c, "the node still connected", |p| p.in_connected).await;
        assert_eq!(p.config, PeerConfig::Same);
        second.send(SYNCED, &[]).await;
        assert!(matches!(next_event(&mut rx).await, Event::Synced { from: PEER }), "the good connection still carries");
    }

    /// A handshake recorded on the wire and played again, from the node's address: this node
    /// answers with a fresh nonce, the recorded PROOF does not cover it, and the live
    /// connection stays.
    #[tokio::test]
    async fn a_replayed_handshake_is_refused_and_does_not_push_the_live_connection_out() {
        let (c, at, mut rx) = start(settings(Some(key(KEY)), &[PEER]));
        let mut live = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, same: true }));
        let synced = live.frames.seal(SYNCED, &[]).expect("seal");
        live.stream.write_all(&synced).await.expect("write");
        assert!(matches!(next_event(&mut rx).await, Event::Synced { from: PEER }));

        let mut replay = connect_from(PEER, at).await;
        replay.write_all(&live.hello).await.expect("write");
        let (kind, _) = read_frame(&mut replay, 1 + REPLY_BYTES).await.expect("a REPLY (to anyone who sends a good HELLO)");
        assert_eq!(kind, REPLY);
        // The recorded PROOF, and the frame the recorded stream carried next.
        replay.write_all(&live.proof).await.expect("write");
        replay.write_all(&synced).await.expect("write");
        assert!(closed(&mut replay).await, "a replayed handshake was taken");
        peer_until(&c, "the refusal", |p| p.in_error.as_deref().is_some_and(|e| e.contains("does not prove the cluster key"))).await;
        assert!(rx.try_recv().is_err(), "a replayed handshake made an event");

        assert!(open_now(&live.stream), "the live connection was pushed out by a replay");
        live.send(FLOWS, &flows_body()).await;
        assert!(matches!(next_event(&mut rx).await, Event::Flows { from: PEER, .. }), "the live connection no longer carries");
        assert!(peer_until(&c, "connected", |p| p.in_connected).await.in_connected);
    }

    /// Frames written into a node's stream by someone else after its handshake (on the path,
    /// or a process that can forge its segments): without the frame key their MAC fails; a
    /// frame of the node's own played again is out of its place; a frame of another
    /// connection is under another key. Each closes the connection and makes no event.
    #[tokio::test]
    async fn a_frame_injected_after_the_handshake_is_refused_and_makes_no_event() {
        let (c, at, mut rx) = start(settings(Some(key(KEY)), &[PEER]));
        let mut node = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, .. }));
        node.send(FLOWS, &flows_body()).await;
        assert!(matches!(next_event(&mut rx).await, Event::Flows { from: PEER, .. }), "a node's own frame is taken");
        // A FLOWS frame as version 1 sent it, without a MAC.
        node.stream.write_all(&raw_frame(FLOWS, &flows_body())).await.expect("write");
        assert!(closed(&mut node.stream).await, "a frame without a MAC was taken");
        peer_until(&c, "the refusal", |p| p.in_error.as_deref().is_some_and(|e| e.contains("MAC"))).await;
        assert!(rx.try_recv().is_err(), "a frame without a MAC made an event");

        // The node's own FLOWS frame, played again later in its stream.
        let mut node = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, .. }));
        let flows = node.frames.seal(FLOWS, &flows_body()).expect("seal");
        node.stream.write_all(&flows).await.expect("write");
        assert!(matches!(next_event(&mut rx).await, Event::Flows { from: PEER, .. }));
        node.stream.write_all(&flows).await.expect("write");
        assert!(closed(&mut node.stream).await, "a replayed frame was taken");
        assert!(rx.try_recv().is_err(), "a replayed frame made an event");

        // A frame recorded on another connection of the node, at the same place in its stream.
        let mut other = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, .. }));
        let mut node = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, .. }));
        let elsewhere = other.frames.seal(FLOWS, &flows_body()).expect("seal");
        node.stream.write_all(&elsewhere).await.expect("write");
        assert!(closed(&mut node.stream).await, "a frame of another connection was taken");
        assert!(rx.try_recv().is_err(), "a frame of another connection made an event");
        assert!(closed(&mut other.stream).await, "the older connection was replaced");
    }

    /// A joining node waits for a SYNCED from each peer; one forged into the stream (any tag
    /// but the frame key's) must not end the join.
    #[tokio::test]
    async fn a_forged_synced_makes_no_event_and_ends_no_join() {
        let (c, at, mut rx) = start(settings(Some(key(KEY)), &[PEER]));
        let mut node = shake_hands(Some(&key(KEY)), 7, PEER, at).await.expect("a handshake");
        assert!(matches!(next_event(&mut rx).await, Event::Greeted { from: PEER, .. }));
        // SYNCED with a MAC under the cluster key itself (what a node that does not hold the
        // handshake's frame key could best make) instead of the frame key.
        let forged = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 33, SYNCED]);
        node.stream.write_all(&raw_frame(SYNCED, forged.as_ref())).await.expect("write");
        assert!(closed(&mut node.stream).await, "a forged SYNCED was taken");
        assert!(rx.try_recv().is_err(), "a forged SYNCED made an event");
        let p = peer_until(&c, "the refusal", |p| p.in_error.as_deref().is_some_and(|e| e.contains("fails its MAC"))).await;
        assert!(!p.synced, "a forged SYNCED marked the peer synced");
    }

    /// This node connects to an impostor on a peer's address and port (a host that took the
    /// address, a local process that bound the port first): it does not hold the key, or it
    /// plays back an answer the real node gave before. Nothing after the HELLO reaches it: no
    /// PROOF, no exception.
    #[tokio::test]
    async fn a_connector_that_reaches_an_impostor_sends_it_nothing() {
        let impostor = TcpListener::bind((PEER, 0)).await.expect("bind");
        let SocketAddr::V4(peer) = impostor.local_addr().expect("bound") else { unreachable!("IPv4") };
        let mut s = settings(Some(key(KEY)), &[]);
        s.nodes.push(peer);
        let (events, _rx) = mpsc::channel(64);
        let c = Cluster::start(s, events).expect("start");
        let entry = Entry { client: "198.51.100.7:40000".parse().expect("addr"), idle: 3, closing: false, opened: false, relayed: false };
        let group = Group { listener: Some("192.0.2.100:1883".parse().expect("addr")), backend: "b3".to_owned(), entries: vec![entry] };
        c.publish(Exceptions { groups: vec![group], complete: true, walked: None });

        // Answers with another key; then with the real node's answer to an earlier HELLO.
        let mut earlier = None;
        for (answer_key, why) in [(b"not the cluster key, 16+".as_slice(), "another key"), (KEY, "a replayed answer")] {
            let (mut conn, _) = impostor.accept().await.expect("the node connects");
            let (kind, hello) = read_frame(&mut conn, HELLO_READ_MAX).await.expect("HELLO");
            assert_eq!(kind, HELLO);
            let answered = earlier.get_or_insert_with(|| hello.clone());
            let reply = Incoming::new(answered, Some(&key(answer_key)), Ipv4Addr::LOCALHOST, PEER).expect("a HELLO to answer");
            conn.write_all(&raw_frame(REPLY, reply.reply())).await.expect("write");
            let mut after = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut after)).await.expect("closed").expect("read");
            assert!(after.is_empty(), "{why}: the impostor received {} bytes after its REPLY", after.len());
            peer_until(&c, why, |p| {
                !p.out_connected && p.out_error.as_deref().is_some_and(|e| e.contains("does not prove the cluster key"))
            })
            .await;
        }
        assert_eq!(c.peers()[0].flows_sent, 0);
    }

    /// Connections that have not shaken hands yet are few: at most 4 from a node's address and
    /// 32 in all; more are closed at once (not after the 5 s deadline), and the ones held stay.
    #[tokio::test]
    async fn pending_connections_are_capped_per_node_and_in_total() {
        let nodes: Vec<Ipv4Addr> = (2..=10).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
        let (c, at, _rx) = start(settings(Some(key(KEY)), &nodes));
        let mut held = Vec::new();
        for _ in 0..PENDING_PER_SOURCE {
            held.push(connect_from(nodes[0], at).await);
        }
        let mut one_more = connect_from(nodes[0], at).await;
        assert!(closed(&mut one_more).await, "a fifth pending connection from one node was kept");
        assert!(held.iter().all(open_now), "a pending connection within the cap was closed");
        for n in &nodes[1..8] {
            for _ in 0..PENDING_PER_SOURCE {
                held.push(connect_from(*n, at).await);
            }
        }
        assert_eq!(held.len(), PENDING_TOTAL);
        let mut one_more = connect_from(nodes[8], at).await;
        assert!(closed(&mut one_more).await, "a pending connection beyond the total was kept");
        assert!(held.iter().all(open_now), "a pending connection within the cap was closed");
        // Once they are gone, a node shakes hands again.
        drop(held);
        let mut shaken = None;
        for _ in 0..100 {
            if let Ok(s) = shake_hands(Some(&key(KEY)), 7, nodes[8], at).await {
                shaken = Some(s);
                break;
            }
        }
        assert!(shaken.is_some(), "no handshake once the pending connections were gone");
        peer_until(&c, "connected", |p| p.node.starts_with("127.0.0.10:") && p.in_connected).await;
    }

    /// Two nodes that run the whole protocol, with a key and with `insecure = true`: each
    /// connects to the other, and the exceptions of one arrive at the other as `Flows`, then
    /// `Synced`. A node with a key and one without do not talk, and say why.
    #[tokio::test]
    async fn two_nodes_share_their_exceptions_over_the_handshake() {
        for (key_a, key_b) in [(Some(key(KEY)), Some(key(KEY))), (None, None), (Some(key(KEY)), None)] {
            let agree = key_a == key_b;
            // Free ports, known before either node starts (each lists the other's).
            let free = |ip: Ipv4Addr| {
                let l = std::net::TcpListener::bind((ip, 0)).expect("bind");
                SocketAddrV4::new(ip, l.local_addr().expect("bound").port())
            };
            let (a, b) = (free(Ipv4Addr::LOCALHOST), free(PEER));
            let node = |me: SocketAddrV4, key: Option<SyncKey>| Settings { me, nodes: vec![a, b], ..settings(key, &[]) };
            let (tx_a, _rx_a) = mpsc::channel(64);
            let (tx_b, mut rx_b) = mpsc::channel(64);
            let node_a = Cluster::start(node(a, key_a), tx_a).expect("start a");
            let node_b = Cluster::start(node(b, key_b), tx_b).expect("start b");
            let entry =
                Entry { client: "198.51.100.7:40000".parse().expect("addr"), idle: 3, closing: false, opened: false, relayed: false };
            let group = Group { listener: Some("192.0.2.100:1883".parse().expect("addr")), backend: "b3".to_owned(), entries: vec![entry] };
            node_a.publish(Exceptions { groups: vec![group.clone()], complete: true, walked: None });
            if agree {
                assert!(matches!(next_event(&mut rx_b).await, Event::Greeted { from, same: true } if from == *a.ip()));
                assert!(matches!(next_event(&mut rx_b).await, Event::Flows { from, group: g } if from == *a.ip() && g == group));
                assert!(matches!(next_event(&mut rx_b).await, Event::Synced { from } if from == *a.ip()));
                peer_until(&node_b, "b's connection to a", |p| p.out_connected && p.in_connected).await;
                peer_until(&node_a, "a's connection to b", |p| p.out_connected && p.in_connected && p.flows_sent == 1).await;
            } else {
                // Each refuses the other's HELLO and says why; the connector is pointed there.
                peer_until(&node_a, "a refused", |p| p.in_error.as_deref().is_some_and(|e| e.contains("runs without a cluster key"))).await;
                peer_until(&node_b, "b refused", |p| p.in_error.as_deref().is_some_and(|e| e.contains("this node has none"))).await;
                peer_until(&node_b, "b told", |p| p.out_error.as_deref().is_some_and(|e| e.contains("the node's log says why"))).await;
                assert!(rx_b.try_recv().is_err(), "a node with a key and one without talked");
            }
        }
    }

    #[test]
    fn flows_frames_round_trip_and_bad_ones_are_refused() {
        let entries = vec![
            Entry { client: "198.51.100.7:40000".parse().expect("addr"), idle: 3, closing: false, opened: false, relayed: false },
            Entry { client: "198.51.100.8:40001".parse().expect("addr"), idle: 65535, closing: true, opened: true, relayed: true },
        ];
        let listener: SocketAddr = "192.0.2.100:1883".parse().expect("addr");
        let entries6 = vec![
            Entry { client: "[2001:db8::7]:40000".parse().expect("addr"), idle: 3, closing: false, opened: false, relayed: false },
            Entry { client: "[2001:db8:1::8]:40001".parse().expect("addr"), idle: 65535, closing: true, opened: false, relayed: true },
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
