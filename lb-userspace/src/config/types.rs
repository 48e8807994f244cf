//! The config as the controller uses it, validated, with its bounds and defaults.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

/// Largest accepted `ring_size`; the rings map holds two copies per listener.
pub const MAX_RING_SIZE: u32 = 1 << 20;
/// Ring slots per backend a listener's ring must have at least: Maglev's paper finds shares
/// within about 1% of the weights at 100 slots per backend.
pub const MIN_RING_SLOTS_PER_BACKEND: u32 = 100;
/// `flow_table_size` bounds.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;
pub const MAX_FLOW_TABLE_SIZE: u32 = 1 << 27;
/// Largest backend weight (HAProxy allows 0..=256; we allow finer steps).
pub const MAX_WEIGHT: u32 = 10_000;
/// `flow_idle_timeout` by default: above 1.5 times the longest keepalive MQTT clients commonly
/// use (20 minutes, as AWS IoT's maximum; most use 60 s to 5 min), so a healthy idle session
/// always sends a PINGREQ before its flow expires.
pub const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_mins(30);
/// The shortest `flow_idle_timeout`: a few units of the flow table's clock (1.07 s).
pub const MIN_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// `max_conn_rate` bounds (new connections per second).
pub const MAX_CONN_RATE: u32 = 10_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeCfg {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    #[serde(rename = "4tuple")]
    FourTuple,
    Source,
}

/// How frames reach a backend (`forward`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// The broker is on the balancer's segment: the destination MAC is rewritten.
    #[default]
    L2,
    /// IP in IP of the client's family (protocol 4 or 41), to the broker's address through the
    /// next hop.
    Ipip,
    /// GUE (the client's IP packet in UDP to `gue_port`), likewise.
    Gue,
}

impl Forward {
    /// The data plane's `RealTunnel::mode`.
    #[must_use]
    pub const fn mode(self) -> u8 {
        match self {
            Self::L2 => lb_common::TUNNEL_L2,
            Self::Ipip => lb_common::TUNNEL_IPIP,
            Self::Gue => lb_common::TUNNEL_GUE,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::L2 => "l2",
            Self::Ipip => "ipip",
            Self::Gue => "gue",
        }
    }
}

/// The tunnels' settings (top level: `tunnel_source`, `tunnel_source6`, `tunnel_mtu`,
/// `gue_port`). Unset sources and MTU are the interface's, filled in by the controller when it
/// starts or reloads ([`Tunnel::resolve`](crate::controller)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The outer source of IPv4 tunnels.
    pub source: Option<Ipv4Addr>,
    /// The outer source of IPv6 tunnels.
    pub source6: Option<Ipv6Addr>,
    /// The path MTU towards the brokers: outer packets are at most this long.
    pub mtu: Option<u32>,
    /// GUE's destination port.
    pub gue_port: u16,
}

impl Default for Tunnel {
    fn default() -> Self {
        Self { source: None, source6: None, mtu: None, gue_port: lb_common::DECAP_GUE_PORT }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    None,
    Tcp,
    Mqtt,
    MqttTls,
    /// An MQTT 5 CONNECT: a broker's CONNACK reason codes say more (server busy, use another
    /// server, ...).
    Mqtt5,
    Mqtt5Tls,
    /// An HTTP GET of `http_path` on the broker's API port (`http_port`), as HAProxy checks
    /// EMQX's availability check or HiveMQ's readiness.
    Http,
    Https,
}

impl CheckKind {
    /// Whether the check runs over TLS (and so needs `tls_ca`).
    #[must_use]
    pub const fn tls(self) -> bool {
        matches!(self, Self::MqttTls | Self::Mqtt5Tls | Self::Https)
    }

    /// Whether the check is an HTTP one (its VIP probe is then a TCP connect to VIP:port).
    #[must_use]
    pub const fn http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

/// How one (listener, backend) pair is checked: `[health]`, overridden by the listener's
/// `health` table, then by the backend's. Its `Debug` hides the secrets (`password`,
/// `http_auth`).
#[derive(Clone, PartialEq, Eq)]
pub struct Health {
    pub check: CheckKind,
    pub inter: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    /// Start as down until `rise` probes pass (keepalived's `alpha`).
    pub alpha: bool,
    /// Also probe through the VIP along the DSR path, to catch a broker without the VIP.
    pub vip_check: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file with the CA(s) that sign the brokers' certificates (`mqtt-tls`).
    pub tls_ca: Option<PathBuf>,
    /// Name to verify the certificate against; the probed address when absent.
    pub tls_server_name: Option<String>,
    /// `http`, `https`: the broker's API port, the path, the Host header (the probed address
    /// when absent), the statuses that mean ready and those that mean alive but taking no new
    /// clients, and `user:password` for basic authentication.
    pub http_port: Option<u16>,
    pub http_path: String,
    pub http_host: Option<String>,
    pub http_expect: Vec<u16>,
    pub http_refusing: Vec<u16>,
    pub http_auth: Option<String>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "(hidden)");
        f.debug_struct("Health")
            .field("check", &self.check)
            .field("inter", &self.inter)
            .field("timeout", &self.timeout)
            .field("fall", &self.fall)
            .field("rise", &self.rise)
            .field("alpha", &self.alpha)
            .field("vip_check", &self.vip_check)
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("tls_ca", &self.tls_ca)
            .field("tls_server_name", &self.tls_server_name)
            .field("http_port", &self.http_port)
            .field("http_path", &self.http_path)
            .field("http_host", &self.http_host)
            .field("http_expect", &self.http_expect)
            .field("http_refusing", &self.http_refusing)
            .field("http_auth", &hidden(&self.http_auth))
            .finish()
    }
}

impl Default for Health {
    /// HAProxy's defaults: `inter 2s`, `fall 3`, `rise 2`; a probe times out after 1s.
    fn default() -> Self {
        Self {
            check: CheckKind::Mqtt,
            inter: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
            alpha: false,
            vip_check: true,
            username: None,
            password: None,
            tls_ca: None,
            tls_server_name: None,
            http_port: None,
            http_path: "/".to_owned(),
            http_host: None,
            http_expect: vec![200],
            http_refusing: vec![503],
            http_auth: None,
        }
    }
}

/// What happens to the established flows of a backend marked down (`on_down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// They stay on it (HAProxy's default): a false alarm under load resets nothing, but the
    /// clients of a dead broker wait for their keepalive.
    Keep,
    /// After `on_down_grace`, they are re-picked from the ring: the new broker answers with an
    /// RST and clients reconnect at once (HAProxy's `on-marked-down shutdown-sessions`).
    Reset,
}

/// What a listener does when every one of its backends is marked down (`all_down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllDown {
    /// Fail open: new flows are spread over all of them, as if none were down (the checks
    /// themselves may be what failed).
    Forward,
    /// New flows are dropped until one comes back.
    Drop,
}

/// The failure policy of a listener: top level, overridable per listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    pub on_down: OnDown,
    pub on_down_grace: Duration,
    pub all_down: AllDown,
}

impl Default for FailurePolicy {
    /// Reset after 20 s, fail open: see the README's "When backends fail".
    fn default() -> Self {
        Self { on_down: OnDown::Reset, on_down_grace: DEFAULT_ON_DOWN_GRACE, all_down: AllDown::Forward }
    }
}

/// `on_down_grace` by default: longer than a health check false alarm lasts (a broker busy for
/// a few seconds comes back after `rise` probes), shorter than a common MQTT keepalive (60 s),
/// so clients of a dead broker reconnect before their keepalive would tell them.
pub const DEFAULT_ON_DOWN_GRACE: Duration = Duration::from_secs(20);

/// Storm control of a listener: new connections per second, and how many may come at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRateLimit {
    pub rate: u32,
    /// Connections admitted at once after a quiet spell (at least 1).
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    /// IPv4 or IPv6: the listener's backends all have an address of its family.
    pub vip: IpAddr,
    pub port: u16,
    pub hash: HashMode,
    /// `source_prefix = 64` (IPv6, `hash = "source"`): the client's first 64 bits pick the
    /// broker, so its privacy addresses (RFC 8981) share one.
    pub source_prefix64: bool,
    /// A flow idle this long is over (its client vanished): not live, replaced first, removed.
    pub flow_idle_timeout: Duration,
    /// `max_conn_rate` (and `max_conn_burst`); no limit when `None`.
    pub conn_rate: Option<ConnRateLimit>,
    /// `on_down`, `on_down_grace`, `all_down`.
    pub failure: FailurePolicy,
    /// Backend names, sorted; all backends when the file names none.
    pub backends: Vec<String>,
    /// Effective health settings per backend name (defaults, then listener, then backend).
    pub health: BTreeMap<String, Health>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// The broker's IPv4 address, if it has one (`address`).
    pub address: Option<Ipv4Addr>,
    /// The broker's IPv6 address, if it has one (`address6`, or an IPv6 `address`). A
    /// dual-stack broker is one backend: one MAC, weight, drain, and health per listener.
    pub address6: Option<Ipv6Addr>,
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
    /// `l2` (the default), `ipip` or `gue`.
    pub forward: Forward,
}

impl Backend {
    /// Its address of `vip`'s family (the validator makes sure a listener's backends have one).
    #[must_use]
    pub fn address_for(&self, vip: IpAddr) -> Option<IpAddr> {
        match vip {
            IpAddr::V4(_) => self.address.map(IpAddr::V4),
            IpAddr::V6(_) => self.address6.map(IpAddr::V6),
        }
    }

    /// The address its MAC is resolved by: the IPv4 one when it has both (ARP; one MAC serves
    /// both families on one link).
    #[must_use]
    pub fn primary(&self) -> IpAddr {
        match (self.address, self.address6) {
            (Some(a), _) => IpAddr::V4(a),
            (None, Some(a)) => IpAddr::V6(a),
            (None, None) => unreachable!("the validator requires an address"),
        }
    }

    /// Its addresses as the config writes them: `192.0.2.11`, `2001:db8::11`, or both with a
    /// slash.
    #[must_use]
    pub fn addresses(&self) -> String {
        match (self.address, self.address6) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            (Some(a), None) => a.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// `[announce]`: this node announces its VIPs to routers (BGP, through a speaker such as BIRD)
/// by keeping a route per announced VIP in a kernel routing table that the speaker exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// The kernel routing table the VIP routes go into.
    pub table: u32,
    /// How long `dsrlb stop` waits, after withdrawing, for the routers to stop sending before
    /// it detaches (it detaches sooner once the listeners saw no packet for a second).
    pub withdraw_wait: Duration,
}

/// `table` by default: a table of its own, outside the kernel's (253-255) and the probe
/// routes' (`0xd5b00..`).
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 213;
pub const DEFAULT_WITHDRAW_WAIT: Duration = Duration::from_secs(10);

/// `[cluster]`: the balancer nodes that share their flow-table exceptions (flows pinned to
/// another broker than the current ring picks), so that any node can carry any live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Every node's sync address, this node's own included: the same list on every node.
    pub nodes: Vec<SocketAddrV4>,
    /// How often the flow table is walked for exceptions besides after every ring change.
    pub sync_interval: Duration,
    /// How long a starting node waits for the other nodes' exceptions before it announces its
    /// VIPs and `dsrlb ping` answers (it stops waiting once every other node that runs has sent
    /// them; a node it cannot connect to is taken as down).
    pub join_wait: Duration,
    /// `key_file`'s content: the nodes prove to each other that they hold it, and every frame
    /// of the sync carries a MAC under a key derived from it (see `crate::cluster`). None only
    /// with `insecure = true`: peers are then told apart by address alone.
    pub key: Option<SyncKey>,
}

/// A cluster's shared secret; never shown (`Debug` prints its length only).
#[derive(Clone, PartialEq, Eq)]
pub struct SyncKey(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncKey({} bytes)", self.0.len())
    }
}

pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_JOIN_WAIT: Duration = Duration::from_secs(10);
/// Nodes a cluster may list.
pub const MAX_CLUSTER_NODES: usize = 16;

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpModeCfg,
    /// A pinned XDP program that runs after the balancer on every frame it passes (chaining).
    pub next_program: Option<std::path::PathBuf>,
    pub ring_size: u32,
    /// `ring_seed_file`'s secret, which keys the Maglev permutations; none: the unseeded rings.
    pub ring_seed: Option<crate::maglev::RingSeed>,
    pub flow_table_size: u32,
    /// Destination MACs forwarded besides the interface's own (keepalived's `use_vmac`).
    pub accept_macs: Vec<[u8; 6]>,
    /// The default of every listener's `flow_idle_timeout`.
    pub flow_idle_timeout: Duration,
    /// The default of every listener's failure policy.
    pub failure: FailurePolicy,
    pub health: Health,
    pub listeners: Vec<Listener>,
    /// Sorted by name.
    pub backends: Vec<Backend>,
    pub announce: Option<Announce>,
    pub cluster: Option<Cluster>,
    /// Whose members may read the balancer's state through the read-only control socket.
    pub read_only_group: Option<Group>,
    pub tunnel: Tunnel,
}

/// A group, by the name the config gives and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// The id of group `name` (a number is taken as an id).
///
/// # Errors
/// When no such group exists.
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("{name:?} is not a group name"))?;
    // SAFETY: getgrnam with a valid C string; the result is read before any other call.
    let group = unsafe { libc::getgrnam(c.as_ptr()) };
    if group.is_null() {
        return Err(format!("no group is named {name:?} (give a group of /etc/group, or a gid)"));
    }
    // SAFETY: a non-null result of getgrnam.
    Ok(unsafe { (*group).gr_gid })
}

impl Config {
    #[must_use]
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }
}
