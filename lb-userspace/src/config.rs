//! The TOML config: parsing, and validation whose errors name the file, line and field.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_FLOW_IDLE_TIMEOUT_S, MAX_LISTENERS, MAX_NODE_MACS};
use serde::Deserialize;
use toml::Spanned;

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

/// A config error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

/// Reading the file failed, or its content is not a valid config.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Syntax, type, missing or unknown field: toml's own message carries line and column.
    #[error("{file}: {message}")]
    Toml { file: String, message: String },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    None,
    Tcp,
    Mqtt,
    MqttTls,
}

/// How one (listener, backend) pair is checked: `[health]`, overridden by the listener's
/// `health` table, then by the backend's.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// The shortest `key_file` taken: 128 bits.
pub const MIN_SYNC_KEY_BYTES: usize = 16;
/// The largest `key_file` read: a key is tens of bytes, and nothing larger is read into memory.
pub const MAX_SYNC_KEY_FILE_BYTES: u64 = 4096;

/// Reads a cluster key file: a regular file (not a symbolic link) of at most
/// [`MAX_SYNC_KEY_FILE_BYTES`], owned by this process's user and readable by it alone, holding
/// at least [`MIN_SYNC_KEY_BYTES`] bytes (surrounding whitespace ignored). Read through one
/// descriptor: what is checked is what is read, even if the path is changed meanwhile.
///
/// # Errors
/// When it cannot be opened, is a link or not a regular file, is too long or too short, or
/// others may read it.
pub fn read_sync_key(path: &Path) -> anyhow::Result<SyncKey> {
    use std::{
        io::Read as _,
        os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    };
    // O_NONBLOCK: a FIFO is refused below rather than waited on for a writer.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(
            |e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    anyhow::anyhow!("{} is a symbolic link, which is not followed: name the key file itself", path.display())
                } else {
                    anyhow::anyhow!("reading {}: {e}", path.display())
                }
            },
        )?;
    let meta = file.metadata().map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        anyhow::bail!("{} is {what}: a key file must be a regular file", path.display());
    }
    anyhow::ensure!(
        meta.len() <= MAX_SYNC_KEY_FILE_BYTES,
        "{} holds {} bytes: a key file holds at most {MAX_SYNC_KEY_FILE_BYTES} (a key of 32 bytes is plenty)",
        path.display(),
        meta.len()
    );
    // SAFETY: geteuid has no failure mode.
    let me = unsafe { libc::geteuid() };
    anyhow::ensure!(meta.uid() == me, "{} belongs to uid {}, not to this process's ({me}): chown it", path.display(), meta.uid());
    let others = meta.permissions().mode() & 0o077;
    anyhow::ensure!(others == 0, "{} may be read by others (mode {:o}): chmod 600 it", path.display(), meta.permissions().mode() & 0o777);
    let mut bytes = Vec::new();
    file.take(MAX_SYNC_KEY_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_SYNC_KEY_FILE_BYTES,
        "{} grew past {MAX_SYNC_KEY_FILE_BYTES} bytes while it was read",
        path.display()
    );
    let key = bytes.trim_ascii();
    anyhow::ensure!(
        key.len() >= MIN_SYNC_KEY_BYTES,
        "{} holds {} bytes: a key needs at least {MIN_SYNC_KEY_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        path.display(),
        key.len()
    );
    Ok(SyncKey(std::sync::Arc::from(key)))
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

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Spanned<String>,
    #[serde(default = "default_mode")]
    xdp_mode: XdpModeCfg,
    next_program: Option<Spanned<String>>,
    ring_size: Option<Spanned<u32>>,
    ring_seed_file: Option<Spanned<String>>,
    flow_table_size: Option<Spanned<u32>>,
    accept_macs: Option<Spanned<Vec<Spanned<String>>>>,
    flow_idle_timeout: Option<Spanned<String>>,
    on_down: Option<OnDown>,
    on_down_grace: Option<Spanned<String>>,
    all_down: Option<AllDown>,
    #[serde(default)]
    health: Option<Spanned<RawHealth>>,
    #[serde(default, rename = "listener")]
    listeners: Vec<Spanned<RawListener>>,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
    announce: Option<Spanned<RawAnnounce>>,
    cluster: Option<Spanned<RawCluster>>,
    read_only_group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    table: Option<Spanned<u32>>,
    withdraw_wait: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    nodes: Spanned<Vec<Spanned<String>>>,
    sync_interval: Option<Spanned<String>>,
    join_wait: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    insecure: Option<Spanned<bool>>,
}

const fn default_mode() -> XdpModeCfg {
    XdpModeCfg::Auto
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<CheckKind>,
    inter: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    fall: Option<Spanned<u32>>,
    rise: Option<Spanned<u32>>,
    alpha: Option<bool>,
    vip_check: Option<bool>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
    tls_server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    vip: Spanned<String>,
    port: Spanned<u16>,
    #[serde(default = "default_hash")]
    hash: HashMode,
    source_prefix: Option<Spanned<u8>>,
    backends: Option<Spanned<Vec<Spanned<String>>>>,
    health: Option<Spanned<RawHealth>>,
    flow_idle_timeout: Option<Spanned<String>>,
    max_conn_rate: Option<Spanned<u32>>,
    max_conn_burst: Option<Spanned<u32>>,
    on_down: Option<OnDown>,
    on_down_grace: Option<Spanned<String>>,
    all_down: Option<AllDown>,
}

const fn default_hash() -> HashMode {
    HashMode::FourTuple
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    address: Spanned<String>,
    address6: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
    health: Option<Spanned<RawHealth>>,
}

/// Reads and validates `path`.
///
/// # Errors
/// When the file cannot be read or is not a valid config; the error names line and field.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates config text; `file` is only used in messages.
///
/// # Errors
/// When the text is not a valid config; the error names line and field.
pub fn parse(text: &str, file: &str) -> Result<Config, LoadError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| LoadError::Toml { file: file.to_owned(), message: e.to_string() })?;
    Ok(Validator { text, file }.config(raw)?)
}

/// Backend name to where it is in the file: its index among the backends, and the offset of
/// its name.
type Places = BTreeMap<String, (usize, usize)>;

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn line(&self, at: usize) -> usize {
        self.text[..at.min(self.text.len())].matches('\n').count() + 1
    }

    fn err(&self, span: &std::ops::Range<usize>, field: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
        ConfigError { file: self.file.to_owned(), line, column, field: field.to_string(), message: message.to_string() }
    }

    fn interface(&self, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let interface = raw.get_ref().trim().to_owned();
        if interface.is_empty() || interface.len() >= 16 || interface.contains(['/', ' ']) {
            return Err(self.err(&raw.span(), "interface", "must be a network interface name (1 to 15 characters, no '/' or space)"));
        }
        Ok(interface)
    }

    /// `next_program`: an absolute path (the pin is opened when the balancer starts).
    fn next_program(&self, p: &Spanned<String>) -> Result<std::path::PathBuf, ConfigError> {
        if p.get_ref().starts_with('/') && !p.get_ref().contains('\n') {
            Ok(std::path::PathBuf::from(p.get_ref()))
        } else {
            Err(self.err(
                &p.span(),
                "next_program",
                "must be the absolute path of a pinned XDP program on a BPF filesystem (e.g. /sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all)",
            ))
        }
    }

    /// A group of this host, by name or gid.
    fn group(&self, g: &Spanned<String>, field: &str) -> Result<Group, ConfigError> {
        group_id(g.get_ref()).map(|gid| Group { name: g.get_ref().clone(), gid }).map_err(|m| self.err(&g.span(), field, m))
    }

    /// `ring_seed_file`: read at load (and reload) with the cluster key's rules (owner-only, long
    /// enough).
    fn ring_seed(&self, f: &Spanned<String>) -> Result<crate::maglev::RingSeed, ConfigError> {
        read_sync_key(Path::new(f.get_ref()))
            .map(|k| crate::maglev::RingSeed::new(&k.0))
            .map_err(|e| self.err(&f.span(), "ring_seed_file", format!("{e:#}")))
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = self.interface(&raw.interface)?;
        let ring_size = match &raw.ring_size {
            None => DEFAULT_RING_SIZE,
            Some(s) => {
                let n = *s.get_ref();
                if !(3..=MAX_RING_SIZE).contains(&n) || !is_prime(n) {
                    return Err(self.err(
                        &s.span(),
                        "ring_size",
                        format!("{n} is not a prime between 3 and {MAX_RING_SIZE} (65537 is a good choice)"),
                    ));
                }
                n
            }
        };
        let ring_seed = raw.ring_seed_file.as_ref().map(|f| self.ring_seed(f)).transpose()?;
        let flow_table_size = match &raw.flow_table_size {
            None => DEFAULT_FLOW_TABLE_SIZE,
            Some(s) => {
                let n = *s.get_ref();
                if !(MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(&n) {
                    return Err(self.err(
                        &s.span(),
                        "flow_table_size",
                        format!("{n} is outside {MIN_FLOW_TABLE_SIZE}..={MAX_FLOW_TABLE_SIZE}"),
                    ));
                }
                n
            }
        };
        let health = match &raw.health {
            None => Health::default(),
            Some(h) => self.health(&Health::default(), h, "health")?,
        };
        let mut accept_macs = Vec::new();
        if let Some(list) = &raw.accept_macs {
            if list.get_ref().len() >= MAX_NODE_MACS {
                return Err(self.err(
                    &list.span(),
                    "accept_macs",
                    format!("at most {} MACs besides the interface's own", MAX_NODE_MACS - 1),
                ));
            }
            for (i, m) in list.get_ref().iter().enumerate() {
                let mac = parse_mac(m.get_ref()).map_err(|msg| self.err(&m.span(), format!("accept_macs[{i}]"), msg))?;
                if accept_macs.contains(&mac) {
                    return Err(self.err(&m.span(), format!("accept_macs[{i}]"), format!("{} is listed twice", m.get_ref())));
                }
                accept_macs.push(mac);
            }
        }
        let flow_idle_timeout = match &raw.flow_idle_timeout {
            None => DEFAULT_FLOW_IDLE_TIMEOUT,
            Some(s) => self.idle_timeout(s, "flow_idle_timeout")?,
        };
        let failure = self.failure(&FailurePolicy::default(), raw.on_down, raw.on_down_grace.as_ref(), raw.all_down, "")?;

        let backend_health: BTreeMap<String, Spanned<RawHealth>> =
            raw.backends.iter().filter_map(|b| Some((b.get_ref().name.get_ref().clone(), b.get_ref().health.clone()?))).collect();
        let (backends, places) = self.backends(raw.backends)?;
        let listeners = self.listeners(raw.listeners, (&backends, &places), &health, &backend_health, flow_idle_timeout, failure)?;
        if let Some(l) = listeners.iter().max_by_key(|l| l.backends.len()) {
            let need = MIN_RING_SLOTS_PER_BACKEND * u32::try_from(l.backends.len()).unwrap_or(u32::MAX);
            if ring_size < need {
                let span = raw.ring_size.as_ref().map_or(0..0, Spanned::span);
                let prime = (need..=need.saturating_mul(2)).find(|&n| is_prime(n)).unwrap_or(DEFAULT_RING_SIZE);
                return Err(self.err(
                    &span,
                    "ring_size",
                    format!(
                        "{ring_size} is too small for listener {:?}'s {} backends: Maglev keeps their shares within about 1% only \
                         with at least {MIN_RING_SLOTS_PER_BACKEND} slots per backend; use a prime of at least {need}, e.g. {prime}",
                        l.name,
                        l.backends.len()
                    ),
                ));
            }
        }
        let announce = raw.announce.as_ref().map(|a| self.announce(a.get_ref())).transpose()?;
        let shortest_idle = listeners.iter().map(|l| l.flow_idle_timeout).min().unwrap_or(flow_idle_timeout);
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c, shortest_idle)).transpose()?;
        let next_program = raw.next_program.as_ref().map(|p| self.next_program(p)).transpose()?;
        let read_only_group = raw.read_only_group.as_ref().map(|g| self.group(g, "read_only_group")).transpose()?;
        Ok(Config {
            interface,
            xdp_mode: raw.xdp_mode,
            next_program,
            ring_size,
            ring_seed,
            flow_table_size,
            accept_macs,
            flow_idle_timeout,
            failure,
            health,
            listeners,
            backends,
            announce,
            cluster,
            read_only_group,
        })
    }

    fn announce(&self, raw: &RawAnnounce) -> Result<Announce, ConfigError> {
        let table = match &raw.table {
            None => DEFAULT_ANNOUNCE_TABLE,
            Some(t) => {
                let n = *t.get_ref();
                if n == 0 || (253..=255).contains(&n) || (0xd_5b00..=0xd_5bff).contains(&n) {
                    return Err(self.err(
                        &t.span(),
                        "announce.table",
                        format!(
                            "{n} is not a table of its own: 0 and 253-255 are the kernel's (default, main, local), 0xd5b00-0xd5bff \
                             dsrlb's probe routes'"
                        ),
                    ));
                }
                n
            }
        };
        let withdraw_wait = match &raw.withdraw_wait {
            None => DEFAULT_WITHDRAW_WAIT,
            Some(w) => parse_duration_within(w.get_ref(), Duration::ZERO, Duration::from_mins(5))
                .map_err(|m| self.err(&w.span(), "announce.withdraw_wait", m))?,
        };
        Ok(Announce { table, withdraw_wait })
    }

    fn cluster(&self, section: &Spanned<RawCluster>, shortest_idle: Duration) -> Result<Cluster, ConfigError> {
        let raw = section.get_ref();
        let list = raw.nodes.get_ref();
        if !(2..=MAX_CLUSTER_NODES).contains(&list.len()) {
            return Err(self.err(
                &raw.nodes.span(),
                "cluster.nodes",
                format!("list every node's sync address, this one's included: 2 to {MAX_CLUSTER_NODES}, not {}", list.len()),
            ));
        }
        let mut nodes = Vec::with_capacity(list.len());
        for (i, n) in list.iter().enumerate() {
            let addr: SocketAddrV4 = n
                .get_ref()
                .parse()
                .map_err(|_| self.err(&n.span(), format!("cluster.nodes[{i}]"), format!("{:?} is not IPv4:PORT", n.get_ref())))?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_loopback() || addr.ip().is_multicast() {
                return Err(self.err(
                    &n.span(),
                    format!("cluster.nodes[{i}]"),
                    format!("{addr}: a node's address on the balancer network and a port other than 0"),
                ));
            }
            if nodes.iter().any(|a: &SocketAddrV4| a.ip() == addr.ip()) {
                return Err(self.err(&n.span(), format!("cluster.nodes[{i}]"), format!("{} is listed twice", addr.ip())));
            }
            nodes.push(addr);
        }
        let sync_interval = match &raw.sync_interval {
            None => DEFAULT_SYNC_INTERVAL,
            Some(w) => parse_duration_within(w.get_ref(), Duration::from_secs(1), Duration::from_mins(10))
                .map_err(|m| self.err(&w.span(), "cluster.sync_interval", m))?,
        };
        // A live flow is sent again at least every max(idle/4, sync_interval): twice per idle
        // timeout at least, so the other nodes' copies never expire while it lives.
        if sync_interval > shortest_idle / 2 {
            let span = raw.sync_interval.as_ref().map_or_else(|| section.span(), Spanned::span);
            return Err(self.err(
                &span,
                "cluster.sync_interval",
                format!(
                    "{} is more than half the shortest flow_idle_timeout ({}): the other nodes' copies of a live flow would expire \
                     before it is sent again; use at most {}",
                    show_duration(sync_interval),
                    show_duration(shortest_idle),
                    show_duration(shortest_idle / 2)
                ),
            ));
        }
        let join_wait = match &raw.join_wait {
            None => DEFAULT_JOIN_WAIT,
            Some(w) => parse_duration_within(w.get_ref(), Duration::ZERO, Duration::from_mins(5))
                .map_err(|m| self.err(&w.span(), "cluster.join_wait", m))?,
        };
        let insecure = raw.insecure.as_ref().filter(|i| *i.get_ref());
        let key = match (&raw.key_file, insecure) {
            (Some(_), Some(i)) => {
                return Err(self.err(
                    &i.span(),
                    "cluster.insecure",
                    "true beside a key_file: with a key the sync is authenticated; remove insecure (or the key_file)",
                ));
            }
            (Some(k), None) => {
                Some(read_sync_key(Path::new(k.get_ref())).map_err(|e| self.err(&k.span(), "cluster.key_file", format!("{e:#}")))?)
            }
            (None, Some(_)) => None,
            (None, None) => {
                return Err(self.err(
                    &section.span(),
                    "cluster.key_file",
                    "missing: without a key, anything that can reach a node's sync port (another user on a node, a host that takes \
                     over a node's address) can send flows that move live sessions to other brokers, and can receive this node's \
                     exceptions (which client goes to which broker). Give every node the same key_file (`head -c 32 /dev/urandom | \
                     base64 > /etc/dsrlb/cluster.key; chmod 600`), or, where only the balancers can reach the sync port, set \
                     cluster.insecure = true",
                ));
            }
        };
        Ok(Cluster { nodes, sync_interval, join_wait, key })
    }

    fn failure(
        &self,
        base: &FailurePolicy,
        on_down: Option<OnDown>,
        grace: Option<&Spanned<String>>,
        all_down: Option<AllDown>,
        prefix: &str,
    ) -> Result<FailurePolicy, ConfigError> {
        let mut p = *base;
        if let Some(o) = on_down {
            p.on_down = o;
        }
        if let Some(a) = all_down {
            p.all_down = a;
        }
        if let Some(g) = grace {
            p.on_down_grace = parse_duration_within(g.get_ref(), Duration::ZERO, Duration::from_hours(1))
                .map_err(|m| self.err(&g.span(), format!("{prefix}on_down_grace"), m))?;
        }
        Ok(p)
    }

    fn idle_timeout(&self, s: &Spanned<String>, field: &str) -> Result<Duration, ConfigError> {
        parse_duration_within(s.get_ref(), MIN_FLOW_IDLE_TIMEOUT, Duration::from_secs(MAX_FLOW_IDLE_TIMEOUT_S))
            .map_err(|m| self.err(&s.span(), field, m))
    }

    fn conn_rate(
        &self,
        rate: Option<&Spanned<u32>>,
        burst: Option<&Spanned<u32>>,
        f: &dyn Fn(&str) -> String,
    ) -> Result<Option<ConnRateLimit>, ConfigError> {
        let Some(rate) = rate else {
            return match burst {
                Some(b) => Err(self.err(&b.span(), f("max_conn_burst"), "needs max_conn_rate")),
                None => Ok(None),
            };
        };
        let r = *rate.get_ref();
        if !(1..=MAX_CONN_RATE).contains(&r) {
            return Err(self.err(
                &rate.span(),
                f("max_conn_rate"),
                format!("must be between 1 and {MAX_CONN_RATE} new connections per second"),
            ));
        }
        let b = match burst {
            None => (r / 10).max(1),
            Some(b) if (1..=r.max(1)).contains(b.get_ref()) => *b.get_ref(),
            Some(b) => return Err(self.err(&b.span(), f("max_conn_burst"), format!("must be between 1 and max_conn_rate ({r})"))),
        };
        Ok(Some(ConnRateLimit { rate: r, burst: b }))
    }

    fn health(&self, base: &Health, raw: &Spanned<RawHealth>, field: &str) -> Result<Health, ConfigError> {
        let span = raw.span();
        let raw = raw.get_ref();
        let mut h = base.clone();
        if let Some(c) = raw.check {
            h.check = c;
        }
        if let Some(a) = raw.alpha {
            h.alpha = a;
        }
        if let Some(v) = raw.vip_check {
            h.vip_check = v;
        }
        // The probe's CONNECT carries them as MQTT strings: a 16-bit length, and no U+0000 in
        // a user name (MQTT 3.1.1, 1.5.3: a broker closes the connection), else every probe
        // would fail on the balancer's own config.
        for (value, name, target) in [(&raw.username, "username", &mut h.username), (&raw.password, "password", &mut h.password)] {
            if let Some(s) = value {
                let len = s.get_ref().len();
                if len > crate::mqtt::MAX_STRING {
                    let message = format!("{len} bytes; an MQTT CONNECT carries at most {}", crate::mqtt::MAX_STRING);
                    return Err(self.err(&s.span(), format!("{field}.{name}"), message));
                }
                if name == "username" && s.get_ref().contains('\0') {
                    return Err(self.err(&s.span(), format!("{field}.{name}"), "holds U+0000, which MQTT 3.1.1 refuses in a string"));
                }
                *target = Some(s.get_ref().clone());
            }
        }
        if let Some(s) = &raw.tls_server_name {
            if let Err(e) = rustls_pki_types::ServerName::try_from(s.get_ref().as_str()) {
                return Err(self.err(&s.span(), format!("{field}.tls_server_name"), format!("{:?}: {e}", s.get_ref())));
            }
            h.tls_server_name = Some(s.get_ref().clone());
        }
        if let Some(ca) = &raw.tls_ca {
            let path = PathBuf::from(ca.get_ref());
            if let Err(e) = crate::tls::client_config(&path) {
                return Err(self.err(&ca.span(), format!("{field}.tls_ca"), format!("{e:#}")));
            }
            h.tls_ca = Some(path);
        }
        if h.check == CheckKind::MqttTls && h.tls_ca.is_none() {
            return Err(self.err(
                &span,
                format!("{field}.tls_ca"),
                "check = \"mqtt-tls\" needs tls_ca, the CA that signs the brokers' certificates",
            ));
        }
        if let Some(s) = &raw.inter {
            h.inter = parse_duration(s.get_ref()).map_err(|m| self.err(&s.span(), format!("{field}.inter"), m))?;
        }
        if let Some(s) = &raw.timeout {
            h.timeout = parse_duration(s.get_ref()).map_err(|m| self.err(&s.span(), format!("{field}.timeout"), m))?;
        }
        for (value, name, target) in [(&raw.fall, "fall", &mut h.fall), (&raw.rise, "rise", &mut h.rise)] {
            if let Some(s) = value {
                if !(1..=1000).contains(s.get_ref()) {
                    return Err(self.err(&s.span(), format!("{field}.{name}"), "must be between 1 and 1000"));
                }
                *target = *s.get_ref();
            }
        }
        if h.timeout > h.inter {
            let span = raw.timeout.as_ref().map_or(span, Spanned::span);
            return Err(self.err(&span, format!("{field}.timeout"), format!("{:?} is longer than inter ({:?})", h.timeout, h.inter)));
        }
        Ok(h)
    }

    /// The backends, sorted by name, and where each is in the file: its index there and the
    /// offset of its name.
    fn backends(&self, raw: Vec<Spanned<RawBackend>>) -> Result<(Vec<Backend>, Places), ConfigError> {
        let mut places = BTreeMap::new();
        if raw.len() > MAX_BACKENDS as usize {
            let span = raw[MAX_BACKENDS as usize].span();
            return Err(self.err(&span, "backend", format!("at most {MAX_BACKENDS} backends")));
        }
        let mut out: BTreeMap<String, Backend> = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        for (i, b) in raw.into_iter().enumerate() {
            let b = b.into_inner();
            let f = |name: &str| format!("backend[{i}].{name}");
            let name = self.name(&b.name, &f("name"))?;
            if out.contains_key(&name) {
                return Err(self.err(&b.name.span(), f("name"), format!("duplicate backend name {name:?}")));
            }
            let first: IpAddr = b.address.get_ref().parse().map_err(|_| {
                self.err(&b.address.span(), f("address"), format!("{:?} is not an IPv4 or IPv6 address", b.address.get_ref()))
            })?;
            let mut given = vec![(first, b.address.span(), "address")];
            if let Some(a6) = &b.address6 {
                let second: Ipv6Addr = a6
                    .get_ref()
                    .parse()
                    .map_err(|_| self.err(&a6.span(), f("address6"), format!("{:?} is not an IPv6 address", a6.get_ref())))?;
                if first.is_ipv6() {
                    return Err(self.err(
                        &a6.span(),
                        f("address6"),
                        "address is already IPv6: give the IPv4 address as address and the IPv6 one as address6",
                    ));
                }
                given.push((IpAddr::V6(second), a6.span(), "address6"));
            }
            let (mut address, mut address6) = (None, None);
            for (a, span, field) in given {
                if !host_address(a) {
                    return Err(self.err(&span, f(field), format!("{a} cannot be a backend address")));
                }
                if let Some(other) = addresses.insert(a, name.clone()) {
                    return Err(self.err(&span, f(field), format!("{a} is already backend {other:?}'s address")));
                }
                match a {
                    IpAddr::V4(v4) => address = Some(v4),
                    IpAddr::V6(v6) => address6 = Some(v6),
                }
            }
            let mac = match &b.mac {
                None => None,
                Some(m) => Some(parse_mac(m.get_ref()).map_err(|msg| self.err(&m.span(), f("mac"), msg))?),
            };
            let weight = match &b.weight {
                None => 100,
                Some(w) if *w.get_ref() > MAX_WEIGHT => {
                    return Err(self.err(&w.span(), f("weight"), format!("must be between 0 and {MAX_WEIGHT}")));
                }
                Some(w) => *w.get_ref(),
            };
            places.insert(name.clone(), (i, b.name.span().start));
            out.insert(name.clone(), Backend { name, address, address6, mac, weight });
        }
        Ok((out.into_values().collect(), places))
    }

    fn listeners(
        &self,
        raw: Vec<Spanned<RawListener>>,
        (backends, places): (&[Backend], &Places),
        defaults: &Health,
        backend_health: &BTreeMap<String, Spanned<RawHealth>>,
        flow_idle_timeout: Duration,
        failure: FailurePolicy,
    ) -> Result<Vec<Listener>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err(&(0..0), "listener", "at least one [[listener]] is needed"));
        }
        if raw.len() > MAX_LISTENERS as usize {
            return Err(self.err(&raw[MAX_LISTENERS as usize].span(), "listener", format!("at most {MAX_LISTENERS} listeners")));
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut names = BTreeSet::new();
        let mut endpoints = BTreeMap::new();
        for (i, l) in raw.into_iter().enumerate() {
            let l = l.into_inner();
            let f = |name: &str| format!("listener[{i}].{name}");
            let name = self.name(&l.name, &f("name"))?;
            if !names.insert(name.clone()) {
                return Err(self.err(&l.name.span(), f("name"), format!("duplicate listener name {name:?}")));
            }
            let vip = self.vip(&l.vip, &f("vip"))?;
            let source_prefix64 = self.source_prefix(&l, i, vip)?;
            let port = *l.port.get_ref();
            if port == 0 {
                return Err(self.err(&l.port.span(), f("port"), "must be between 1 and 65535"));
            }
            if let Some(other) = endpoints.insert((vip, port), name.clone()) {
                let at = std::net::SocketAddr::new(vip, port);
                return Err(self.err(&l.port.span(), f("port"), format!("{at} is already listener {other:?}")));
            }
            let members: Vec<String> = match &l.backends {
                None => backends.iter().map(|b| b.name.clone()).collect(),
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for (j, b) in list.get_ref().iter().enumerate() {
                        if !backends.iter().any(|x| &x.name == b.get_ref()) {
                            return Err(self.err(
                                &b.span(),
                                format!("listener[{i}].backends[{j}]"),
                                format!("no [[backend]] is named {:?}", b.get_ref()),
                            ));
                        }
                        if !set.insert(b.get_ref().clone()) {
                            return Err(self.err(
                                &b.span(),
                                format!("listener[{i}].backends[{j}]"),
                                format!("{:?} is listed twice", b.get_ref()),
                            ));
                        }
                    }
                    set.into_iter().collect()
                }
            };
            if members.is_empty() {
                let span = l.backends.as_ref().map_or_else(|| l.name.span(), Spanned::span);
                return Err(self.err(&span, f("backends"), "a listener needs at least one backend (a [[backend]] to name)"));
            }
            self.families(&l, i, vip, &members, (backends, places))?;
            if let Some(b) = backends.iter().find(|b| b.address.map(IpAddr::V4) == Some(vip) || b.address6.map(IpAddr::V6) == Some(vip)) {
                return Err(self.err(
                    &l.vip.span(),
                    f("vip"),
                    format!("{vip} is backend {:?}'s own address: a VIP is an address the brokers hold on lo, not a real one", b.name),
                ));
            }
            let base = match &l.health {
                None => defaults.clone(),
                Some(h) => self.health(defaults, h, &f("health"))?,
            };
            let mut health = BTreeMap::new();
            for m in &members {
                let h = match backend_health.get(m.as_str()) {
                    None => base.clone(),
                    Some(h) => {
                        let index = places.get(m.as_str()).map(|p| p.0).expect("member is a backend");
                        self.health(&base, h, &format!("backend[{index}].health (for listener {name})"))?
                    }
                };
                health.insert(m.clone(), h);
            }
            let flow_idle_timeout = match &l.flow_idle_timeout {
                None => flow_idle_timeout,
                Some(s) => self.idle_timeout(s, &f("flow_idle_timeout"))?,
            };
            let conn_rate = self.conn_rate(l.max_conn_rate.as_ref(), l.max_conn_burst.as_ref(), &f)?;
            let failure = self.failure(&failure, l.on_down, l.on_down_grace.as_ref(), l.all_down, &format!("listener[{i}]."))?;
            out.push(Listener {
                name,
                vip,
                port,
                hash: l.hash,
                source_prefix64,
                flow_idle_timeout,
                conn_rate,
                failure,
                backends: members,
                health,
            });
        }
        Ok(out)
    }

    /// A listener's `vip`: an address of either family that can be one.
    fn vip(&self, raw: &Spanned<String>, field: &str) -> Result<IpAddr, ConfigError> {
        let vip: IpAddr = raw
            .get_ref()
            .parse()
            .map_err(|_| self.err(&raw.span(), field, format!("{:?} is not an IPv4 or IPv6 address", raw.get_ref())))?;
        if !host_address(vip) {
            return Err(self.err(&raw.span(), field, format!("{vip} cannot be a VIP")));
        }
        Ok(vip)
    }

    /// `source_prefix`: 64 (true) or 128, only for an IPv6 VIP with `hash = "source"`.
    fn source_prefix(&self, listener: &RawListener, index: usize, vip: IpAddr) -> Result<bool, ConfigError> {
        let f = |name: &str| format!("listener[{index}].{name}");
        Ok(match &listener.source_prefix {
            None => false,
            Some(p) if !vip.is_ipv6() || listener.hash != HashMode::Source => {
                return Err(self.err(&p.span(), f("source_prefix"), "only for an IPv6 VIP with hash = \"source\""));
            }
            Some(p) => match *p.get_ref() {
                64 => true,
                128 => false,
                n => return Err(self.err(&p.span(), f("source_prefix"), format!("{n}: must be 64 or 128"))),
            },
        })
    }

    /// Every member of listener `i` has an address of its VIP's family.
    fn families(
        &self,
        l: &RawListener,
        i: usize,
        vip: IpAddr,
        members: &[String],
        (backends, places): (&[Backend], &Places),
    ) -> Result<(), ConfigError> {
        let f = |name: &str| format!("listener[{i}].{name}");
        for (j, m) in members.iter().enumerate() {
            let b = backends.iter().find(|b| &b.name == m).expect("member is a backend");
            if b.address_for(vip).is_none() {
                let span = l.backends.as_ref().map_or_else(|| l.vip.span(), |list| list.get_ref()[j].span());
                let (family, field) = if vip.is_ipv6() { ("IPv6", "address6") } else { ("IPv4", "address") };
                let (index, at) = places[&b.name];
                return Err(self.err(
                    &span,
                    f("backends"),
                    format!(
                        "backend {:?} has no {family} address for VIP {vip}: give it one (backend[{index}].{field}, line {}), or \
                         list this listener's backends without it",
                        b.name,
                        self.line(at)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn name(&self, s: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        let n = s.get_ref();
        let ok = !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok { Ok(n.clone()) } else { Err(self.err(&s.span(), field, format!("{n:?}: names are 1 to 64 of [A-Za-z0-9._-]"))) }
    }
}

/// Whether `a` can be a VIP or a broker's address: a unicast address outside loopback, IPv4's
/// 240.0.0.0/4 (reserved; the flow table marks IPv6 flows with it, see `lb_common::flow_key6`),
/// IPv6 link-local and IPv4-mapped addresses.
fn host_address(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_loopback() || v4.octets()[0] >= 240),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback() || v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some())
        }
    }
}

/// `"2s"`, `"500ms"`, `"1m"`; a bare number is milliseconds, as in HAProxy. Between 1 ms and
/// an hour (health check intervals and timeouts).
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_within(s, Duration::from_millis(1), Duration::from_hours(1))
}

/// A duration as [`parse_duration`] reads it (also `"2h"`), between `min` and `max`.
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"2s\" or \"500ms\""))?;
    let scale: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    let bounds = || format!("{s:?} must be between {} and {}", show_duration(min), show_duration(max));
    let d = n.checked_mul(scale).map(Duration::from_millis).ok_or_else(bounds)?;
    if d < min || d > max {
        return Err(bounds());
    }
    Ok(d)
}

/// A duration as the config writes it: the largest unit that shows it whole.
#[must_use]
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms >= 3_600_000 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms >= 60_000 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms >= 1000 && ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// `"02:00:00:00:00:11"`.
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(|| format!("{s:?} is not a MAC address like 02:00:00:00:00:11"))?;
        if p.len() != 2 {
            return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:11"));
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address like 02:00:00:00:00:11"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:11"));
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("{s:?} is a multicast or zero address, not a host's"));
    }
    Ok(mac)
}

#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "eth0"
ring_size = 65537

[health]
check = "tcp"
inter = "2s"

[[listener]]
name = "mqtt"
vip = "192.0.2.100"
port = 1883
backends = ["b2", "b1"]

[[backend]]
name = "b2"
address = "192.0.2.12"

[[backend]]
name = "b1"
address = "192.0.2.11"
mac = "02:00:00:00:00:11"
weight = 50
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
        assert_eq!(c.health.check, CheckKind::Tcp);
        assert_eq!(c.health.fall, 3);
        assert_eq!(c.listeners[0].backends, vec!["b1", "b2"]);
        assert_eq!(c.backends[0].name, "b1");
        assert_eq!(c.backends[0].mac, Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(c.backends[1].weight, 100);
        assert_eq!(c.listeners[0].health["b1"].check, CheckKind::Tcp);
    }

    #[test]
    fn health_overrides_merge_defaults_listener_backend() {
        let text = GOOD.replace(
            "backends = [\"b2\", \"b1\"]",
            "backends = [\"b2\", \"b1\"]\nhealth = { inter = \"500ms\", fall = 2, timeout = \"200ms\" }",
        ) + "health = { rise = 5, check = \"mqtt\" }\n";
        let c = parse(&text, "t.toml").expect("valid");
        let h1 = &c.listeners[0].health["b1"];
        assert_eq!((h1.check, h1.inter, h1.fall, h1.rise), (CheckKind::Mqtt, Duration::from_millis(500), 2, 5));
        let h2 = &c.listeners[0].health["b2"];
        assert_eq!((h2.check, h2.fall, h2.rise), (CheckKind::Tcp, 2, 2));
        let e = error_of(&GOOD.replace("check = \"tcp\"", "check = \"mqtt-tls\""));
        assert!(e.contains("health.tls_ca"), "{e}");
    }

    #[test]
    fn probe_credentials_and_the_tls_name_must_fit_the_probe() {
        let with = |extra: &str| GOOD.replacen("inter = \"2s\"\n", &format!("inter = \"2s\"\n{extra}\n"), 1);
        let max = "u".repeat(crate::mqtt::MAX_STRING);
        let c = parse(&with(&format!("username = \"{max}\"\npassword = \"{max}\"")), "t.toml").expect("65535 bytes fit");
        let h = &c.listeners[0].health["b1"];
        assert_eq!((h.username.as_ref().map(String::len), h.password.as_ref().map(String::len)), (Some(65_535), Some(65_535)));
        let over = "p".repeat(crate::mqtt::MAX_STRING + 1);
        let e = error_of(&with(&format!("password = \"{over}\"")));
        assert_eq!(e, "t.toml:8:12: health.password: 65536 bytes; an MQTT CONNECT carries at most 65535");
        let e = error_of(&with(&format!("username = \"u{max}\"")));
        assert_eq!(e, "t.toml:8:12: health.username: 65536 bytes; an MQTT CONNECT carries at most 65535");
        let e = error_of(&format!("{GOOD}health = {{ password = \"{over}\" }}\n"));
        assert_eq!(e, "t.toml:24:23: backend[1].health (for listener mqtt).password: 65536 bytes; an MQTT CONNECT carries at most 65535");
        let e = error_of(&with("username = \"hc\\u0000\""));
        assert_eq!(e, "t.toml:8:12: health.username: holds U+0000, which MQTT 3.1.1 refuses in a string");
        assert!(parse(&with("password = \"p\\u0000\""), "t.toml").is_ok(), "a password is binary data");
        let e = error_of(&with("tls_server_name = \"not a name!\""));
        assert!(e.starts_with("t.toml:8:19: health.tls_server_name: \"not a name!\": "), "{e}");
        let c = parse(&with("tls_server_name = \"mqtt.example\""), "t.toml").expect("a DNS name");
        assert_eq!(c.health.tls_server_name.as_deref(), Some("mqtt.example"));
    }

    fn error_of(text: &str) -> String {
        parse(text, "t.toml").expect_err("must be rejected").to_string()
    }

    #[test]
    fn next_program_is_an_absolute_pin_path() {
        assert_eq!(parse(GOOD, "t.toml").expect("valid").next_program, None);
        let with = |v: &str| GOOD.replacen("interface = \"eth0\"\n", &format!("interface = \"eth0\"\nnext_program = {v}\n"), 1);
        let c = parse(&with("\"/sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all\""), "t.toml").expect("valid");
        assert_eq!(c.next_program, Some(std::path::PathBuf::from("/sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all")));
        let e = error_of(&with("\"xdpfilt_alw_all\""));
        assert!(e.starts_with("t.toml:3:16: next_program: must be the absolute path of a pinned XDP program"), "{e}");
    }

    #[test]
    fn announce_and_cluster_sections() {
        let c = parse(GOOD, "t.toml").expect("valid");
        assert_eq!((c.announce, c.cluster), (None, None), "neither without its section");
        let text = format!("{GOOD}\n[announce]\n\n[cluster]\nnodes = [\"192.0.2.2:9878\", \"192.0.2.3:9878\"]\ninsecure = true\n");
        let c = parse(&text, "t.toml").expect("valid");
        assert_eq!(c.announce, Some(Announce { table: DEFAULT_ANNOUNCE_TABLE, withdraw_wait: DEFAULT_WITHDRAW_WAIT }));
        let cluster = c.cluster.expect("cluster");
        assert_eq!(cluster.nodes, vec!["192.0.2.2:9878".parse().expect("addr"), "192.0.2.3:9878".parse().expect("addr")]);
        assert_eq!((cluster.sync_interval, cluster.join_wait, cluster.key), (DEFAULT_SYNC_INTERVAL, DEFAULT_JOIN_WAIT, None));
        let e = error_of(&format!("{GOOD}\n[announce]\ntable = 254\n"));
        assert!(e.starts_with("t.toml:26:9: announce.table: 254 is not a table of its own"), "{e}");
        let e = error_of(&format!("{GOOD}\n[announce]\nwithdraw_wait = \"1h\"\n"));
        assert!(e.starts_with("t.toml:26:17: announce.withdraw_wait: "), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:9878\"]\n"));
        assert!(e.starts_with("t.toml:26:9: cluster.nodes: list every node's sync address, this one's included: 2 to 16, not 1"), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:9878\", \"192.0.2.2:9879\"]\n"));
        assert!(e.starts_with("t.toml:26:28: cluster.nodes[1]: 192.0.2.2 is listed twice"), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2\", \"192.0.2.3:9878\"]\n"));
        assert!(e.starts_with("t.toml:26:10: cluster.nodes[0]: \"192.0.2.2\" is not IPv4:PORT"), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"127.0.0.1:9878\", \"192.0.2.3:9878\"]\n"));
        assert!(e.contains("cluster.nodes[0]: 127.0.0.1:9878: a node's address"), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"0s\"\n"));
        assert!(e.starts_with("t.toml:27:17: cluster.sync_interval: "), "{e}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"20m\"\n"));
        assert!(e.starts_with("t.toml:27:17: cluster.sync_interval: "), "{e}");
        let short = GOOD.replacen("port = 1883", "port = 1883\nflow_idle_timeout = \"10s\"", 1);
        let e = error_of(&format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"6s\"\n"));
        assert!(e.contains("cluster.sync_interval: 6s is more than half the shortest flow_idle_timeout (10s)"), "{e}");
        assert!(e.contains("use at most 5s"), "{e}");
        let e = error_of(&format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\n"));
        assert!(e.contains("cluster.sync_interval: 10s is more than half"), "the default too: {e}");
        let ok = parse(
            &format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"5s\"\ninsecure = true\n"),
            "t.toml",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\npeers = []\n"));
        assert!(e.contains("unknown field `peers`"), "{e}");
    }

    /// A cluster whose sync anyone on the network could feed is not started by accident: no
    /// key_file is an error that says why, unless the config says `insecure = true`.
    #[test]
    fn a_cluster_without_a_key_is_refused_unless_it_says_insecure() {
        let cluster = |extra: &str| format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\n{extra}");
        for extra in ["", "insecure = false\n"] {
            let e = error_of(&cluster(extra));
            assert!(e.starts_with("t.toml:25:1: cluster.key_file: missing: without a key"), "{e}");
            assert!(e.contains("move live sessions to other brokers") && e.contains("cluster.insecure = true"), "{e}");
        }
        let c = parse(&cluster("insecure = true\n"), "t.toml").expect("insecure, as said");
        assert_eq!(c.cluster.expect("cluster").key, None);
        let e = error_of(&cluster("insecure = true\nkey_file = \"/etc/dsrlb/cluster.key\"\n"));
        assert!(e.starts_with("t.toml:27:12: cluster.insecure: true beside a key_file"), "{e}");
        let e = error_of(&cluster("insecure = \"yes\"\n"));
        assert!(e.contains("insecure"), "{e}");
    }

    /// key_file: read at load (and reload) through one descriptor: a regular file, not a link,
    /// at most 4 KiB, owner-only, long enough; never shown.
    #[test]
    fn the_key_file_is_one_small_regular_file_of_its_owner() {
        let dir = std::env::temp_dir().join(format!("dsrlb-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let keyed =
            |path: &std::path::Path| format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nkey_file = {path:?}\n");
        let write = |name: &str, content: &[u8], mode: u32| {
            use std::os::unix::fs::PermissionsExt as _;
            let p = dir.join(name);
            std::fs::write(&p, content).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        };
        let good = write("good", b"  0123456789abcdef0123456789abcdef\n", 0o600);
        let c = parse(&keyed(&good), "t.toml").expect("valid");
        let key = c.cluster.expect("cluster").key.expect("key");
        assert_eq!(&*key.0, b"0123456789abcdef0123456789abcdef");
        assert_eq!(format!("{key:?}"), "SyncKey(32 bytes)", "the key itself is never shown");
        let e = error_of(&keyed(&write("open", b"0123456789abcdef", 0o644)));
        assert!(e.contains("cluster.key_file: ") && e.contains("may be read by others (mode 644)"), "{e}");
        let e = error_of(&keyed(&write("short", b"0123456789", 0o600)));
        assert!(e.contains("cluster.key_file: ") && e.contains("holds 10 bytes"), "{e}");
        let e = error_of(&keyed(&dir.join("missing")));
        assert!(e.contains("cluster.key_file: reading "), "{e}");
        // A link to a good key is not followed (it could be swapped for one to any file).
        let link = dir.join("link");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        let e = error_of(&keyed(&link));
        assert!(e.contains("cluster.key_file: ") && e.contains("is a symbolic link, which is not followed"), "{e}");
        // Only a regular file: a directory, and a FIFO (refused at once, not waited on).
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).expect("dir");
        std::fs::set_permissions(&sub, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
        let e = error_of(&keyed(&sub));
        assert!(e.contains("cluster.key_file: ") && e.contains("is a directory: a key file must be a regular file"), "{e}");
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let e = error_of(&keyed(&fifo));
        assert!(e.contains("cluster.key_file: ") && e.contains("is a FIFO: a key file must be a regular file"), "{e}");
        // At most 4 KiB, checked before anything is read.
        let big = write("big", &[b'k'; 4097], 0o600);
        let e = error_of(&keyed(&big));
        assert!(e.contains("cluster.key_file: ") && e.contains("holds 4097 bytes: a key file holds at most 4096"), "{e}");
        assert!(parse(&keyed(&write("max", &[b'k'; 4096], 0o600)), "t.toml").is_ok(), "4096 bytes are taken");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `ring_seed_file`: read at load (and reload) with the cluster key's rules, never shown;
    /// absent, the rings are unseeded.
    #[test]
    fn ring_seed_file_is_a_secret_read_at_load() {
        assert_eq!(parse(GOOD, "t.toml").expect("valid").ring_seed, None);
        let dir = std::env::temp_dir().join(format!("dsrlb-ring-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let seeded =
            |path: &std::path::Path| GOOD.replacen("ring_size = 65537\n", &format!("ring_size = 65537\nring_seed_file = {path:?}\n"), 1);
        let write = |name: &str, content: &[u8], mode: u32| {
            use std::os::unix::fs::PermissionsExt as _;
            let p = dir.join(name);
            std::fs::write(&p, content).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        };
        let good = write("good", b"0123456789abcdef0123456789abcdef\n", 0o600);
        let seed = parse(&seeded(&good), "t.toml").expect("valid").ring_seed.expect("a seed");
        assert_eq!(seed, crate::maglev::RingSeed::new(b"0123456789abcdef0123456789abcdef"), "surrounding whitespace ignored");
        assert_eq!(format!("{seed:?}"), "RingSeed(32 bytes)", "the seed itself is never shown");
        let e = error_of(&seeded(&write("open", b"0123456789abcdef", 0o640)));
        assert!(e.starts_with("t.toml:4:18: ring_seed_file: ") && e.contains("may be read by others (mode 640)"), "{e}");
        let e = error_of(&seeded(&write("short", b"0123456789", 0o600)));
        assert!(e.contains("ring_seed_file: ") && e.contains("holds 10 bytes"), "{e}");
        let e = error_of(&seeded(&dir.join("missing")));
        assert!(e.contains("ring_seed_file: reading "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn read_only_group_is_a_group_of_this_host() {
        assert_eq!(parse(GOOD, "t.toml").expect("valid").read_only_group, None);
        let with = |g: &str| GOOD.replacen("ring_size = 65537\n", &format!("ring_size = 65537\nread_only_group = {g:?}\n"), 1);
        let c = parse(&with("root"), "t.toml").expect("valid");
        assert_eq!(c.read_only_group, Some(Group { name: "root".to_owned(), gid: 0 }));
        assert_eq!(parse(&with("60123"), "t.toml").expect("valid").read_only_group.map(|g| g.gid), Some(60123), "a gid");
        let e = error_of(&with("no-such-group-here"));
        assert!(e.starts_with("t.toml:4:19: read_only_group: no group is named \"no-such-group-here\""), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = error_of(&GOOD.replace("192.0.2.100", "192.0.2.300"));
        assert!(e.starts_with("t.toml:11:7: listener[0].vip:"), "{e}");
        let e = error_of(&GOOD.replace("ring_size = 65537", "ring_size = 65536"));
        assert!(e.starts_with("t.toml:3:13: ring_size:"), "{e}");
        let e = error_of(&GOOD.replace("[\"b2\", \"b1\"]", "[\"b2\", \"b9\"]"));
        assert!(e.contains("t.toml:13:19: listener[0].backends[1]: no [[backend]] is named \"b9\""), "{e}");
        let e = error_of(&GOOD.replace("02:00:00:00:00:11", "02:00:00:00:11"));
        assert!(e.contains(":22:7: backend[1].mac:"), "{e}");
        let e = error_of(&GOOD.replace("weight = 50", "weight = 50\nwieght = 3"));
        assert!(e.contains("line 24") && e.contains("wieght"), "{e}");
        let e = error_of(&GOOD.replace("\"2s\"", "\"2 parsecs\""));
        assert!(e.contains("health.inter"), "{e}");
        let e = error_of(&GOOD.replace("name = \"b1\"", "name = \"b2\""));
        assert!(e.contains("backend[1].name: duplicate"), "{e}");
        let e = error_of(&GOOD.replace("port = 1883", "port = 70000"));
        assert!(e.contains("line 12") && e.contains("port"), "{e}");
    }

    #[test]
    fn edge_settings_parse_and_are_checked() {
        let c = parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.flow_idle_timeout, DEFAULT_FLOW_IDLE_TIMEOUT);
        assert_eq!((c.listeners[0].flow_idle_timeout, c.listeners[0].conn_rate), (DEFAULT_FLOW_IDLE_TIMEOUT, None));
        let text = GOOD
            .replace("ring_size = 65537", "ring_size = 65537\naccept_macs = [\"00:00:5e:00:01:33\"]\nflow_idle_timeout = \"2h\"")
            .replace("port = 1883", "port = 1883\nflow_idle_timeout = \"90s\"\nmax_conn_rate = 500\nmax_conn_burst = 50");
        let c = parse(&text, "t.toml").expect("valid");
        assert_eq!(c.accept_macs, vec![[0, 0, 0x5e, 0, 1, 0x33]]);
        assert_eq!(c.flow_idle_timeout, Duration::from_hours(2));
        assert_eq!(c.listeners[0].flow_idle_timeout, Duration::from_secs(90));
        assert_eq!(c.listeners[0].conn_rate, Some(ConnRateLimit { rate: 500, burst: 50 }));
        let defaulted = parse(&GOOD.replace("port = 1883", "port = 1883\nmax_conn_rate = 500"), "t.toml").expect("valid");
        assert_eq!(defaulted.listeners[0].conn_rate, Some(ConnRateLimit { rate: 500, burst: 50 }));
        for (bad, field) in [
            ("accept_macs = [\"ff:ff:ff:ff:ff:ff\"]", "accept_macs[0]"),
            ("accept_macs = [\"02:00:00:00:00:01\", \"02:00:00:00:00:01\"]", "accept_macs[1]"),
            ("flow_idle_timeout = \"1s\"", "flow_idle_timeout"),
            ("flow_idle_timeout = \"13h\"", "flow_idle_timeout"),
            ("flow_idle_timeout = \"307445734561825861m\"", "flow_idle_timeout"),
        ] {
            let e = error_of(&GOOD.replace("ring_size = 65537", &format!("ring_size = 65537\n{bad}")));
            assert!(e.starts_with("t.toml:4:") && e.contains(&format!(" {field}: ")), "{bad}: {e}");
        }
        for (bad, field) in [
            ("max_conn_rate = 0", "listener[0].max_conn_rate"),
            ("max_conn_rate = 10\nmax_conn_burst = 11", "listener[0].max_conn_burst"),
            ("max_conn_burst = 5", "listener[0].max_conn_burst"),
            ("flow_idle_timeout = \"soon\"", "listener[0].flow_idle_timeout"),
        ] {
            let e = error_of(&GOOD.replace("port = 1883", &format!("port = 1883\n{bad}")));
            assert!(e.contains(&format!(" {field}: ")), "{bad}: {e}");
        }
    }

    #[test]
    fn listeners_and_rings_that_cannot_work_are_refused() {
        let e = error_of(&GOOD.replace("backends = [\"b2\", \"b1\"]", "backends = []"));
        assert!(e.starts_with("t.toml:13:12: listener[0].backends: a listener needs at least one backend"), "{e}");
        let e = error_of(&GOOD.replace("vip = \"192.0.2.100\"", "vip = \"192.0.2.12\""));
        assert!(e.starts_with("t.toml:11:7: listener[0].vip: 192.0.2.12 is backend \"b2\"'s own address"), "{e}");
        let e = error_of(&GOOD.replace("ring_size = 65537", "ring_size = 101"));
        assert!(e.starts_with("t.toml:3:13: ring_size: 101 is too small for listener \"mqtt\"'s 2 backends"), "{e}");
        assert!(e.contains("at least 200, e.g. 211"), "{e}");
        assert!(parse(&GOOD.replace("ring_size = 65537", "ring_size = 211"), "t.toml").is_ok());
        let dir = std::env::temp_dir().join(format!("dsrlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let not_a_cert = dir.join("ca.pem");
        std::fs::write(&not_a_cert, "this is not a certificate\n").expect("write");
        let text = GOOD.replace("check = \"tcp\"", &format!("check = \"mqtt-tls\"\ntls_ca = \"{}\"", not_a_cert.display()));
        let e = error_of(&text);
        assert!(e.starts_with("t.toml:7:10: health.tls_ca: ") && e.contains("holds no certificate"), "{e}");
        let garbled = dir.join("garbled.pem");
        std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        let e = error_of(&text.replace("ca.pem", "garbled.pem"));
        assert!(e.contains("health.tls_ca") && e.contains("does not parse"), "{e}");
        let e = error_of(&text.replace("ca.pem", "missing.pem"));
        assert!(e.contains("health.tls_ca") && e.contains("reading"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// Lines a config is made of, valid or nearly so: fields the parser knows with values of
        /// every kind, and some it does not.
        fn line() -> impl Strategy<Value = String> {
            let key = prop::sample::select(vec![
                "interface",
                "xdp_mode",
                "ring_size",
                "flow_table_size",
                "flow_idle_timeout",
                "accept_macs",
                "on_down",
                "on_down_grace",
                "all_down",
                "name",
                "vip",
                "port",
                "hash",
                "backends",
                "address",
                "mac",
                "weight",
                "check",
                "inter",
                "timeout",
                "fall",
                "rise",
                "tls_ca",
                "max_conn_rate",
                "max_conn_burst",
                "table",
                "withdraw_wait",
                "nodes",
                "sync_interval",
                "join_wait",
                "key_file",
                "nonsense",
            ]);
            let value = prop::sample::select(vec![
                "\"eth0\"",
                "\"\"",
                "0",
                "1",
                "-1",
                "65537",
                "4294967296",
                "\"192.0.2.100\"",
                "\"192.0.2.300\"",
                "\"2s\"",
                "\"307445734561825861m\"",
                "\"0s\"",
                "[]",
                "[\"b1\"]",
                "[\"02:00:00:00:00:11\"]",
                "[\"192.0.2.2:9878\", \"192.0.2.3:9878\"]",
                "[\"192.0.2.2:9878\", \"192.0.2.2:9878\"]",
                "\"reset\"",
                "\"forward\"",
                "true",
                "{}",
                "{ check = \"tcp\" }",
                "\"mqtt-tls\"",
                "\"/nonexistent\"",
                "1e9",
                "\"ä\"",
            ]);
            let header = prop::sample::select(vec![
                "[health]",
                "[[listener]]",
                "[[backend]]",
                "[listener]",
                "[announce]",
                "[cluster]",
                "[[nonsense]]",
            ]);
            prop_oneof![
                3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
                1 => header.prop_map(str::to_owned),
                1 => "[ -~]{0,40}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any text: parsed or refused with the file named, never a panic.
            #[test]
            fn any_config_text_is_parsed_or_refused_by_name(lines in prop::collection::vec(line(), 0..30)) {
                let text = lines.join("\n");
                if let Err(e) = parse(&text, "fuzz.toml") {
                    prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
                }
            }

            /// A valid config with one line replaced: parsed, or refused naming the file.
            #[test]
            fn a_valid_config_with_one_line_changed_is_parsed_or_refused_by_name(at in 0usize..22, new in line()) {
                let mut lines: Vec<String> = GOOD.lines().map(str::to_owned).collect();
                let at = at % lines.len();
                lines[at] = new;
                if let Err(e) = parse(&lines.join("\n"), "fuzz.toml") {
                    prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
                }
            }
        }
    }

    #[test]
    fn durations_and_macs() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err(), "health durations stay within an hour");
        let overflow = parse_duration("307445734561825861m").expect_err("an overflowing duration is refused");
        assert!(overflow.contains("between 1ms and 1h"), "{overflow}");
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert_eq!(format_mac([2, 0, 0, 0, 0, 0x11]), "02:00:00:00:00:11");
    }
}
