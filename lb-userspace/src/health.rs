//! Health checks: one probe task per (listener, backend), HAProxy's `inter`/`timeout`/`fall`/
//! `rise` with a little jitter, and the state machine that turns probe results into states.
//!
//! A round probes the backend's real address first; when that passes and `vip_check` is on, it
//! probes VIP:port along the DSR path (a socket mark that policy routing sends to this one
//! backend's MAC, see [`crate::probe_route`]). A broker that answers on its address but not on
//! the VIP is `vip-misconfigured`, not `down`.
//!
//! A probe that cannot be made for a reason of this host's (no descriptor or buffer for a
//! socket, no route, a CONNECT the config cannot encode, a probe task that ended) is [`Outcome::Local`]: the broker gave no answer either way, so it counts neither
//! toward `fall` nor toward `rise`, and the pair keeps its state, shown as unchecked.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::rustls;

use crate::{
    config::{CheckKind, Health},
    mqtt,
};

/// A (listener, backend) pair's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Up,
    Down,
    /// Answers on its real address, not through the VIP: no traffic.
    VipMisconfigured,
    /// Answers MQTT with CONNACK 3 ("server unavailable"): alive, serving the sessions it has,
    /// refusing new ones. No new flows; its flows stay.
    Refusing,
}

impl State {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::VipMisconfigured => "vip-misconfigured",
            Self::Refusing => "refusing",
        }
    }
}

/// One round's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed; the text says how (e.g. "CONNACK 0").
    Pass(String),
    /// The real address failed.
    Down(String),
    /// The real address passed, the VIP did not.
    VipMisconfigured(String),
    /// The broker answered CONNACK 3: it refuses clients.
    Refusing(String),
    /// The round could not be made, for a reason of this host's: the state is kept.
    Local(String),
}

/// The state machine of one pair (HAProxy's: `fall` consecutive failures take an up server
/// down, `rise` consecutive passes bring a down server up).
#[derive(Clone, Debug)]
pub struct PairHealth {
    pub state: State,
    ok_streak: u32,
    fail_streak: u32,
    /// The last probe's result, for status.
    pub last: String,
    pub failures_total: u64,
    /// Probe rounds reported, passed or not.
    pub checks_total: u64,
    /// When the pair last left `Up` (for `on_down_grace`); `None` while up.
    pub out_since: Option<std::time::Instant>,
    /// How long the last probe round took (both probes, or up to the failure).
    pub last_took: Option<Duration>,
    /// Rounds that could not be made on this host's side ([`Outcome::Local`]).
    pub local_errors_total: u64,
    /// Why the last round could not be made, while the state is not refreshed by the broker.
    pub unchecked: Option<String>,
}

impl PairHealth {
    #[must_use]
    pub fn new(health: &Health) -> Self {
        let (state, last) = if health.check == CheckKind::None {
            (State::Up, "not checked".to_owned())
        } else if health.alpha {
            (State::Down, "waiting for rise probes (alpha)".to_owned())
        } else {
            (State::Up, "not probed yet".to_owned())
        };
        let out_since = (state != State::Up).then(std::time::Instant::now);
        Self {
            state,
            ok_streak: 0,
            fail_streak: 0,
            last,
            failures_total: 0,
            checks_total: 0,
            out_since,
            last_took: None,
            local_errors_total: 0,
            unchecked: None,
        }
    }

    /// Restores a state saved by a previous controller: out-of-service pairs need `rise`
    /// passes again.
    pub fn restore(&mut self, state: State) {
        if state != State::Up {
            self.state = state;
            self.ok_streak = 0;
            self.out_since = Some(std::time::Instant::now());
            "restored from the previous controller".clone_into(&mut self.last);
        }
    }

    /// Applies one outcome; returns the new state when it changed. A local error changes no
    /// state and no streak: the pair is unchecked until a round reaches the broker again.
    pub fn observe(&mut self, outcome: &Outcome, fall: u32, rise: u32) -> Option<State> {
        let before = self.state;
        match outcome {
            Outcome::Local(why) => {
                self.local_errors_total += 1;
                self.unchecked = Some(why.clone());
                return None;
            }
            Outcome::Pass(detail) => {
                self.last.clone_from(detail);
                self.fail_streak = 0;
                self.ok_streak = self.ok_streak.saturating_add(1);
                if self.state != State::Up && self.ok_streak >= rise {
                    self.state = State::Up;
                }
            }
            Outcome::Down(why) | Outcome::VipMisconfigured(why) | Outcome::Refusing(why) => {
                self.last.clone_from(why);
                self.failures_total += 1;
                self.ok_streak = 0;
                self.fail_streak = self.fail_streak.saturating_add(1);
                let failed = match outcome {
                    Outcome::Down(_) => State::Down,
                    Outcome::VipMisconfigured(_) => State::VipMisconfigured,
                    _ => State::Refusing,
                };
                // Already out of service: only the kind of failure may change.
                if self.state != State::Up || self.fail_streak >= fall {
                    self.state = failed;
                }
            }
        }
        self.checks_total += 1;
        self.unchecked = None;
        if self.state == State::Up {
            self.out_since = None;
        } else if before == State::Up {
            self.out_since = Some(std::time::Instant::now());
        }
        (self.state != before).then_some(self.state)
    }
}

/// What a probe task needs.
#[derive(Clone)]
pub struct Target {
    pub listener: String,
    pub backend: String,
    /// The broker's address of the VIP's family.
    pub real: SocketAddr,
    pub vip: SocketAddr,
    /// Socket mark that routes VIP probes to this backend.
    pub mark: u32,
    pub health: Health,
    /// This node's prefix for MQTT client ids.
    pub client_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A probe task's report to the controller.
#[derive(Debug)]
pub struct Report {
    pub listener: String,
    pub backend: String,
    pub outcome: Outcome,
    /// How long the round took.
    pub took: Duration,
}

/// A small xorshift for jitter; seeded per task so probes don't synchronise.
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `d` ± 10%.
    fn around(&mut self, d: Duration) -> Duration {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let spread = (ms / 10).max(1);
        Duration::from_millis(ms - spread + self.next() % (2 * spread + 1))
    }
}

/// Runs probes for `t` every `inter` (± 10%) until the receiver is gone or the task aborted.
pub async fn run(t: Target, tx: mpsc::Sender<Report>) {
    let seed =
        lb_common::mix64(u64::from(t.mark) ^ (ip_word(t.vip.ip()) << 16) ^ u64::from(t.vip.port()) ^ u64::from(std::process::id()) << 40);
    let mut jitter = Jitter(seed | 1);
    // Spread the first probes over one interval.
    let first = Duration::from_millis(jitter.next() % u64::try_from(t.health.inter.as_millis()).unwrap_or(1).max(1));
    let mut next = tokio::time::Instant::now() + first;
    loop {
        // Probes start on a cadence of `inter` (start to start), as HAProxy's do: a probe that
        // runs into its timeout (at most `inter`, enforced by the config) does not push the
        // next one back, so `fall` failures take at most `fall × inter + timeout`.
        tokio::time::sleep_until(next).await;
        next += jitter.around(t.health.inter);
        let started = tokio::time::Instant::now();
        let outcome = round(&t).await;
        let report = Report { listener: t.listener.clone(), backend: t.backend.clone(), outcome, took: started.elapsed() };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

/// A probe task that ran this long has its restarts counted afresh.
const RESTART_RESET: Duration = Duration::from_mins(1);
/// The longest wait before a probe task that ended is started again.
const RESTART_MAX_WAIT: Duration = Duration::from_mins(1);

/// Runs [`run`] for `t`, and starts it again whenever it ends while the controller still
/// listens (a panic, say): the end is logged at error and reported as a local error (the pair
/// keeps its state, shown unchecked), and the task starts again after `inter`, twice as long
/// each time it ends again within a minute, at most a minute. Aborting this task aborts the
/// probe task with it.
pub async fn supervise(t: Target, tx: mpsc::Sender<Report>) {
    supervise_with(t, tx, run).await;
}

async fn supervise_with<F, Fut>(t: Target, tx: mpsc::Sender<Report>, body: F)
where
    F: Fn(Target, mpsc::Sender<Report>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0u32;
    loop {
        // Dropped, with the task in it, when this task is aborted.
        let mut task = tokio::task::JoinSet::new();
        task.spawn(body(t.clone(), tx.clone()));
        let started = tokio::time::Instant::now();
        let why = match task.join_next().await {
            _ if tx.is_closed() => return,
            Some(Ok(())) | None => "ended".to_owned(),
            Some(Err(e)) if e.is_panic() => format!("panicked: {}", panic_text(&*e.into_panic())),
            Some(Err(e)) => format!("stopped: {e}"),
        };
        if started.elapsed() >= RESTART_RESET {
            restarts = 0;
        }
        let wait = t.health.inter.saturating_mul(1 << restarts.min(16)).min(RESTART_MAX_WAIT);
        restarts += 1;
        tracing::error!(listener = %t.listener, backend = %t.backend, restarts, "the probe task {why}; starting it again in {wait:?}");
        let outcome = Outcome::Local(format!("the probe task {why}; started again in {wait:?}"));
        if tx.send(Report { listener: t.listener.clone(), backend: t.backend.clone(), outcome, took: Duration::ZERO }).await.is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// A panic's message.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// At most one log line per `every`, counting the lines held back: for events that can come
/// from every pair at once (a controller out of descriptors fails every probe).
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl LogLimit {
    #[must_use]
    pub const fn new(every: Duration) -> Self {
        Self { every, last: None, held: 0 }
    }

    /// Whether a line may be logged at `now`, with how many were held back since the last.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// One round: the real address, then the VIP.
pub async fn round(t: &Target) -> Outcome {
    let real = match probe(t, t.real, None, "r").await {
        Ok(detail) => detail,
        Err(Failure::Refusing(detail)) => return Outcome::Refusing(format!("{}: {detail}", t.real)),
        Err(Failure::Broken(e)) => return Outcome::Down(format!("{}: {e}", t.real)),
        Err(Failure::Local(e)) => return Outcome::Local(format!("{}: {e}", t.real)),
    };
    if !t.health.vip_check {
        return Outcome::Pass(real);
    }
    match probe(t, t.vip, Some(t.mark), "v").await {
        Ok(_) => Outcome::Pass(format!("{real}; VIP ok")),
        Err(Failure::Refusing(detail)) => Outcome::Refusing(format!("{} via DSR: {detail}", t.vip)),
        Err(Failure::Broken(e)) => Outcome::VipMisconfigured(format!("{} answers, {} via DSR does not: {e}", t.real, t.vip)),
        Err(Failure::Local(e)) => Outcome::Local(format!("{} via DSR: {e}", t.vip)),
    }
}

/// Why a probe did not pass.
#[derive(Debug)]
enum Failure {
    /// No (usable) answer.
    Broken(String),
    /// An MQTT broker that answered CONNACK 3: alive, refusing clients.
    Refusing(String),
    /// The probe could not be made: this host's fault, not the broker's.
    Local(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Self::Broken(s)
    }
}

/// Errors that only this host gives, at any step of a probe: no descriptor, no memory or
/// buffer, a permission this process lacks or a `prohibit` route. (A local firewall that drops
/// the SYN does not show: TCP retries it, and the probe times out as if the broker were gone.)
fn local_errno(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPERM | libc::EACCES))
}

/// An I/O error of the exchange with the broker: its fault, unless only this host gives it.
fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    let text = format!("{what}: {e}");
    if local_errno(e) { Failure::Local(text) } else { Failure::Broken(text) }
}

/// An address folded into 64 bits (for a jitter seed).
fn ip_word(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let n = u128::from(a);
            #[expect(clippy::cast_possible_truncation, reason = "folding the halves")]
            let w = (n ^ (n >> 64)) as u64;
            w
        }
    }
}

/// A TCP connection to `addr`. Everything before the SYN leaves is this host's: the socket and
/// its options, and what `connect` refuses at once (no route, an `unreachable`, `prohibit` or
/// `blackhole` one, no source address or port left, no buffer). A refusal is the broker's, even
/// at once (loopback answers within the call), and so is whatever comes back later: no
/// answer, a reset, an ICMP unreachable from the path, a neighbour that does not resolve.
async fn connect(addr: SocketAddr, mark: Option<u32>) -> Result<TcpStream, Failure> {
    let local = |what: &'static str| move |e: std::io::Error| Failure::Local(format!("{what}: {e}"));
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(local("socket"))?;
    if let Some(m) = mark {
        sock.set_mark(m).map_err(local("SO_MARK"))?;
    }
    sock.set_nonblocking(true).map_err(local("O_NONBLOCK"))?;
    sock.set_nodelay(true).map_err(local("TCP_NODELAY"))?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Err(Failure::Broken(format!("connect: {e}"))),
        Err(e) => return Err(Failure::Local(format!("connect: {e}"))),
    }
    let stream = TcpStream::from_std(sock.into()).map_err(local("registering the socket"))?;
    // Writable once the handshake ended, either way; the socket's error says which.
    stream.writable().await.map_err(|e| io_failure("connect", &e))?;
    match stream.take_error().map_err(local("SO_ERROR"))? {
        Some(e) => Err(io_failure("connect", &e)),
        None => Ok(stream),
    }
}

async fn probe(t: &Target, addr: SocketAddr, mark: Option<u32>, suffix: &str) -> Result<String, Failure> {
    let h = &t.health;
    // An HTTP check asks the broker's API port at its own address; its VIP probe (`mark`: along
    // the DSR path) is a TCP connect to VIP:port, which is what shows a missing VIP.
    let mqtt_port = addr;
    let (addr, check) = match (h.check, mark, h.http_port) {
        (CheckKind::Http | CheckKind::Https, Some(_), _) => (addr, CheckKind::Tcp),
        (CheckKind::Http | CheckKind::Https, None, Some(port)) => (SocketAddr::new(addr.ip(), port), h.check),
        (CheckKind::Http | CheckKind::Https, None, None) => return Err(Failure::Local("an HTTP check without http_port".to_owned())),
        (kind, ..) => (addr, kind),
    };
    let work = async {
        let stream = connect(addr, mark).await?;
        let client_id = format!("{}-{suffix}", t.client_id);
        match check {
            CheckKind::None | CheckKind::Tcp => Ok("TCP connect".to_owned()),
            CheckKind::Mqtt => mqtt_exchange(stream, &client_id, h).await,
            CheckKind::Mqtt5 => mqtt5_exchange(stream, &client_id, h).await,
            CheckKind::Http => http_exchange(stream, addr, h).await,
            CheckKind::MqttTls | CheckKind::Mqtt5Tls | CheckKind::Https => {
                let config = t.tls.clone().ok_or_else(|| Failure::Local("no TLS client config".to_owned()))?;
                let name = match &h.tls_server_name {
                    Some(n) => {
                        rustls_pki_types::ServerName::try_from(n.clone()).map_err(|e| Failure::Local(format!("tls_server_name: {e}")))?
                    }
                    None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let tls =
                    tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| io_failure("TLS handshake", &e))?;
                let done = match check {
                    CheckKind::MqttTls => mqtt_exchange(tls, &client_id, h).await,
                    CheckKind::Mqtt5Tls => mqtt5_exchange(tls, &client_id, h).await,
                    _ => http_exchange(tls, addr, h).await,
                };
                done.map(|d| format!("TLS, {d}"))
            }
        }
    };
    // An API that answers says nothing of the MQTT listener: its port at the broker's own
    // address must take a connection too.
    let work = async {
        let detail = work.await?;
        if check.http() {
            drop(connect(mqtt_port, None).await.map_err(|f| match f {
                Failure::Broken(e) => Failure::Broken(format!("the API answers, the MQTT port {mqtt_port} does not: {e}")),
                other => other,
            })?);
        }
        Ok(detail)
    };
    match tokio::time::timeout(h.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Broken(format!("no answer within {:?}", h.timeout))),
    }
}

/// CONNECT, CONNACK, DISCONNECT. CONNACK 0 passes; 3 ("server unavailable") is a broker that
/// refuses clients; 4 and 5 mean the check's own credentials are refused, so the broker is
/// alive and passes, with a warning in its detail; 1 and 2 (a protocol version or client id it
/// does not take) pass as alive. A CONNECT that cannot be encoded is this host's failure (the
/// config refuses the credentials that would make one).
async fn mqtt_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, client_id: &str, h: &Health) -> Result<String, Failure> {
    let connect = mqtt::connect(client_id, 10, h.username.as_deref(), h.password.as_deref()).map_err(|e| Failure::Local(e.to_string()))?;
    s.write_all(&connect).await.map_err(|e| io_failure("sending CONNECT", &e))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.map_err(|e| io_failure("reading CONNACK", &e))?;
    let code = mqtt::connack_code(ack).map_err(|e| e.to_string())?;
    let _ = s.write_all(&mqtt::DISCONNECT).await;
    let _ = s.shutdown().await;
    connack_verdict(code)
}

/// What a CONNACK code says about the broker (see [`mqtt_exchange`]).
fn connack_verdict(code: u8) -> Result<String, Failure> {
    match code {
        0 => Ok("CONNACK 0 (ready)".to_owned()),
        3 => Err(Failure::Refusing("CONNACK 3 (server unavailable): the broker refuses new clients".to_owned())),
        4 | 5 => Ok(format!(
            "CONNACK {code} ({}): the check's credentials are refused (health username/password); the broker is alive",
            if code == 4 { "bad user name or password" } else { "not authorized" }
        )),
        _ => Ok(format!("CONNACK {code} (alive, refuses this check's CONNECT)")),
    }
}

/// MQTT 5: CONNECT (Session Expiry 0, Receive Maximum 1), CONNACK with its properties (at most
/// [`mqtt::MAX_CONNACK`] bytes), DISCONNECT. See [`connack5_verdict`] for what each reason code
/// says.
async fn mqtt5_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, client_id: &str, h: &Health) -> Result<String, Failure> {
    let connect = mqtt::connect5(client_id, 10, h.username.as_deref(), h.password.as_deref()).map_err(|e| Failure::Local(e.to_string()))?;
    s.write_all(&connect).await.map_err(|e| io_failure("sending CONNECT", &e))?;
    // The fixed header a byte at a time (its length takes one to four), then the rest.
    let mut head = Vec::with_capacity(5);
    let (len, _) = loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| io_failure("reading CONNACK", &e))?;
        head.push(b[0]);
        if let Some(l) = mqtt::connack5_length(&head).map_err(|e| e.to_string())? {
            break l;
        }
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|e| io_failure("reading CONNACK", &e))?;
    let ack = mqtt::connack5(&body).map_err(|e| e.to_string())?;
    let _ = s.write_all(&mqtt::DISCONNECT).await;
    let _ = s.shutdown().await;
    connack5_verdict(&ack)
}

/// The most of an HTTP answer read for its status line.
const MAX_STATUS_LINE: usize = 4096;

/// `GET http_path` with the Host header (`http_host`, else the probed address), basic
/// authentication if configured and `Connection: close`; the status line read (bounded to
/// [`MAX_STATUS_LINE`] bytes) and judged by [`http_verdict`].
async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, addr: SocketAddr, h: &Health) -> Result<String, Failure> {
    let host = h.http_host.clone().unwrap_or_else(|| addr.to_string());
    // Credentials only inside TLS: never in cleartext, whatever the config let through.
    let auth = h.http_auth.as_deref().filter(|_| h.check == CheckKind::Https).map_or_else(String::new, |a| {
        use base64::Engine as _;
        format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(a))
    });
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dsrlb-health\r\nAccept: */*\r\n{auth}Connection: close\r\n\r\n",
        h.http_path
    );
    s.write_all(request.as_bytes()).await.map_err(|e| io_failure("sending the HTTP request", &e))?;
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    // Where the status line starts: past any interim (1xx) responses, which end with a blank line.
    let mut start = 0;
    let line = loop {
        if let Some(end) = got[start..].windows(2).position(|w| w == b"\r\n") {
            let line = &got[start..start + end];
            if !matches!(status_code(line), Some(100..=199)) {
                break line.to_vec();
            }
            if let Some(blank) = got[start..].windows(4).position(|w| w == b"\r\n\r\n") {
                start += blank + 4;
                continue;
            }
        }
        if got.len() >= MAX_STATUS_LINE {
            return Err(Failure::Broken(format!("no HTTP status line in the first {MAX_STATUS_LINE} bytes")));
        }
        let n = s.read(&mut buf).await.map_err(|e| io_failure("reading the HTTP answer", &e))?;
        if n == 0 {
            return Err(Failure::Broken("the connection closed before an HTTP status line".to_owned()));
        }
        got.extend_from_slice(&buf[..n]);
    };
    let _ = s.shutdown().await;
    let code = status_code(&line)
        .ok_or_else(|| Failure::Broken(format!("not an HTTP status line: {:?}", shown(&String::from_utf8_lossy(&line)))))?;
    http_verdict(code, h)
}

/// The status of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn status_code(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.1 ").or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An HTTP status: one of `http_expect` is ready; one of `http_refusing` is a broker alive but
/// taking no new clients (EMQX's availability check during an evacuation); any other is a failed
/// check.
fn http_verdict(code: u16, h: &Health) -> Result<String, Failure> {
    if h.http_expect.contains(&code) {
        Ok(format!("HTTP {code}"))
    } else if h.http_refusing.contains(&code) {
        Err(Failure::Refusing(format!("HTTP {code}: the broker takes no new clients")))
    } else {
        Err(Failure::Broken(format!("HTTP {code}")))
    }
}

/// An MQTT 5 CONNACK reason code's name.
const fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x01 => "unacceptable protocol version (an MQTT 3.1.1 broker)",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8a => "banned",
        0x8c => "bad authentication method",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x9c => "use another server",
        0x9d => "server moved",
        0x9f => "connection rate exceeded",
        _ => "another reason",
    }
}

/// A broker's text for the status line: at most 120 characters, printable ASCII only (others,
/// control and format characters included, become `?`).
fn shown(text: &str) -> String {
    text.chars().take(120).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}

/// What an MQTT 5 CONNACK says about the broker: 0x00 is up; server unavailable (0x88), busy
/// (0x89), use another server (0x9C), server moved (0x9D) and connection rate exceeded (0x9F)
/// are a broker that refuses new clients, with its server reference and reason shown; bad user
/// name or password (0x86) and not authorized (0x87) refuse the check's credentials, so the
/// broker is alive and passes with a warning; any other code is alive, the code shown.
fn connack5_verdict(a: &mqtt::Connack5) -> Result<String, Failure> {
    let code = a.reason;
    let reference = a.server_reference.as_deref().map(|r| format!(", server reference {:?}", shown(r)));
    let reason = a.reason_string.as_deref().map(|r| format!(", reason {:?}", shown(r)));
    let said = format!("{}{}", reference.unwrap_or_default(), reason.unwrap_or_default());
    if a.v311 {
        // A 3.1.1 broker's answer: its codes are 3.1.1's, and it will never say more.
        return connack_verdict(code).map(|d| format!("{d}; {ONLY_311}"));
    }
    let name = reason_name(code);
    match code {
        0x00 => Ok(format!("CONNACK 0x00 (success, MQTT 5){said}")),
        0x88 | 0x89 | 0x9c | 0x9d | 0x9f => {
            Err(Failure::Refusing(format!("CONNACK 0x{code:02x} ({name}){said}: the broker refuses new clients")))
        }
        0x86 | 0x87 => Ok(format!(
            "CONNACK 0x{code:02x} ({name}){said}: the check's credentials are refused (health username/password); the broker is alive"
        )),
        _ => Ok(format!("CONNACK 0x{code:02x} ({name}){said} (alive, refuses this check's CONNECT)")),
    }
}

/// What a passing `mqtt5` probe of an MQTT 3.1.1-only broker adds to its detail.
const ONLY_311: &str = "the broker speaks MQTT 3.1.1 only: use check = \"mqtt\"";

/// Whether a passing probe's detail carries a warning for the operator (refused credentials, or
/// an `mqtt5` check of a broker that cannot answer it).
#[must_use]
pub fn warns(detail: &str) -> bool {
    detail.contains("credentials are refused") || detail.contains(ONLY_311)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(alpha: bool) -> Health {
        Health { alpha, ..Health::default() }
    }

    #[test]
    fn fall_and_rise_count_consecutive_results() {
        let mut p = PairHealth::new(&h(false));
        let fail = Outcome::Down("x".into());
        let pass = Outcome::Pass("ok".into());
        assert_eq!(p.observe(&fail, 3, 2), None);
        assert_eq!(p.observe(&fail, 3, 2), None);
        assert_eq!(p.observe(&pass, 3, 2), None, "a pass resets the failure streak");
        assert_eq!(p.observe(&fail, 3, 2), None);
        assert_eq!(p.observe(&fail, 3, 2), None);
        assert_eq!(p.observe(&fail, 3, 2), Some(State::Down));
        assert_eq!(p.observe(&pass, 3, 2), None);
        assert_eq!(p.observe(&pass, 3, 2), Some(State::Up));
        assert_eq!(p.failures_total, 5);
    }

    #[test]
    fn vip_failures_are_their_own_state() {
        let mut p = PairHealth::new(&h(false));
        let vip = Outcome::VipMisconfigured("no VIP".into());
        assert_eq!(p.observe(&vip, 2, 2), None);
        assert_eq!(p.observe(&vip, 2, 2), Some(State::VipMisconfigured));
        assert_eq!(p.observe(&Outcome::Down("gone".into()), 2, 2), Some(State::Down));
    }

    #[test]
    fn connack_codes_say_what_the_broker_does() {
        assert!(matches!(connack_verdict(0), Ok(d) if d == "CONNACK 0 (ready)"));
        assert!(matches!(connack_verdict(3), Err(Failure::Refusing(_))), "code 3: refusing clients, no new flows");
        for code in [4, 5] {
            let d = connack_verdict(code).unwrap_or_else(|_| panic!("code {code} passes: the broker is alive"));
            assert!(warns(&d), "code {code} warns: {d}");
        }
        assert!(matches!(connack_verdict(2), Ok(d) if !warns(&d)));
        let mut p = PairHealth::new(&h(false));
        let refusing = Outcome::Refusing("CONNACK 3".into());
        assert_eq!(p.observe(&refusing, 2, 2), None);
        assert_eq!(p.observe(&refusing, 2, 2), Some(State::Refusing));
        assert!(p.out_since.is_some());
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 2, 2), None);
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 2, 2), Some(State::Up));
        assert!(p.out_since.is_none());
    }

    #[test]
    fn mqtt5_reason_codes_say_what_the_broker_does() {
        let ack = |reason: u8| mqtt::Connack5 { reason, ..mqtt::Connack5::default() };
        assert!(matches!(connack5_verdict(&ack(0)), Ok(d) if d == "CONNACK 0x00 (success, MQTT 5)"));
        for code in [0x88, 0x89, 0x9c, 0x9d, 0x9f] {
            assert!(matches!(connack5_verdict(&ack(code)), Err(Failure::Refusing(_))), "0x{code:02x}: refusing clients");
        }
        for code in [0x86, 0x87] {
            let d = connack5_verdict(&ack(code)).unwrap_or_else(|_| panic!("0x{code:02x} passes: the broker is alive"));
            assert!(warns(&d), "0x{code:02x} warns: {d}");
        }
        for code in [0x01, 0x80, 0x85, 0x8a, 0x97] {
            let d = connack5_verdict(&ack(code)).unwrap_or_else(|_| panic!("0x{code:02x}: alive"));
            assert!(!warns(&d) && d.contains(&format!("0x{code:02x}")), "{d}");
        }
        // The server reference and reason are shown, without control characters, bounded.
        let moved = mqtt::Connack5 {
            reason: 0x9d,
            server_reference: Some("b2.example:1883\n\u{1b}[31m".into()),
            reason_string: Some("x".repeat(500)),
            v311: false,
        };
        let Err(Failure::Refusing(d)) = connack5_verdict(&moved) else { panic!("0x9d refuses") };
        assert!(d.contains("(server moved), server reference \"b2.example:1883??[31m\"") && !d.contains('\u{1b}'), "{d}");
        // Format characters (a right-to-left override) cannot dress up the text either.
        let spoof = mqtt::Connack5 { reason: 0x9c, server_reference: Some("good\u{202e}dab".into()), ..mqtt::Connack5::default() };
        let Err(Failure::Refusing(d)) = connack5_verdict(&spoof) else { panic!("0x9c refuses") };
        assert!(d.contains("\"good?dab\""), "{d}");
        // A 3.1.1 broker's two-byte answers, as 3.1.1 reads them, with a warning to use mqtt.
        let v311 = |reason: u8| mqtt::Connack5 { reason, v311: true, ..mqtt::Connack5::default() };
        assert!(matches!(connack5_verdict(&v311(1)), Ok(d) if warns(&d) && d.contains("speaks MQTT 3.1.1 only")));
        assert!(matches!(connack5_verdict(&v311(3)), Err(Failure::Refusing(_))));
        assert!(d.len() < 300, "an unbounded reason string: {} bytes", d.len());
    }

    /// A stand-in MQTT 5 broker that answers every CONNECT with `connack`, for `round`.
    async fn stand_in(connack: Vec<u8>) -> SocketAddr {
        let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = broker.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = broker.accept().await {
                let mut connect = [0u8; 64];
                let _ = s.read(&mut connect).await;
                let _ = s.write_all(&connack).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_mqtt5_probe_reads_the_brokers_connack() {
        let health = Health { check: CheckKind::Mqtt5, vip_check: false, ..Health::default() };
        // Use another server, with its reference: refusing, and where it sends its clients.
        let mut body = vec![0, 0x9c, 12, 0x1c, 0, 9];
        body.extend_from_slice(b"b2.lan:18");
        let mut busy = vec![0x20, u8::try_from(body.len()).expect("small")];
        busy.extend_from_slice(&body);
        let t = target(stand_in(busy).await, health.clone());
        match round(&t).await {
            Outcome::Refusing(d) => assert!(d.contains("CONNACK 0x9c (use another server), server reference \"b2.lan:18\""), "{d}"),
            other => panic!("0x9c: {other:?}"),
        }
        // Success with properties.
        let t = target(stand_in(vec![0x20, 6, 0, 0, 3, 0x21, 0, 5]).await, health.clone());
        assert!(matches!(round(&t).await, Outcome::Pass(d) if d.starts_with("CONNACK 0x00")));
        // An MQTT 3.1.1 broker's answer: alive, and a warning that mqtt5 cannot say more of it.
        let t = target(stand_in(vec![0x20, 2, 0, 1]).await, health.clone());
        assert!(matches!(round(&t).await, Outcome::Pass(d) if d.contains("CONNACK 1") && warns(&d)));
        // Not a CONNACK, and a length past the bound: the broker is broken.
        let t = target(stand_in(vec![0x30, 2, 0, 0]).await, health.clone());
        assert!(matches!(round(&t).await, Outcome::Down(d) if d.contains("expected CONNACK")));
        let t = target(stand_in(vec![0x20, 0xff, 0xff, 0x7f]).await, health);
        assert!(matches!(round(&t).await, Outcome::Down(d) if d.contains("over 4096 bytes")));
    }

    #[test]
    fn http_status_lines_and_what_each_status_says() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503"), Some(503));
        for bad in [&b"HTTP/2 200"[..], b"HTTP/1.1 20", b"HTTP/1.1 2000 OK", b"http/1.1 200 OK", b"SSH-2.0-OpenSSH", b""] {
            assert_eq!(status_code(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let h = Health { check: CheckKind::Http, http_port: Some(18083), ..Health::default() };
        assert!(matches!(http_verdict(200, &h), Ok(d) if d == "HTTP 200"));
        assert!(matches!(http_verdict(503, &h), Err(Failure::Refusing(d)) if d.contains("takes no new clients")));
        assert!(matches!(http_verdict(404, &h), Err(Failure::Broken(d)) if d == "HTTP 404"));
    }

    /// A stand-in broker API: answers every request with `answer`, and hands the requests it
    /// read to the test.
    async fn http_stand_in(answer: Vec<u8>) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = api.local_addr().expect("its address");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = api.accept().await {
                let mut req = vec![0u8; 2048];
                let n = s.read(&mut req).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&req[..n]).into_owned());
                let _ = s.write_all(&answer).await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn an_http_probe_asks_the_api_port_and_reads_the_status() {
        let health = |port: u16| Health {
            check: CheckKind::Http,
            vip_check: false,
            http_port: Some(port),
            http_path: "/api/v5/load_rebalance/availability_check".to_owned(),
            http_auth: Some("dsrlb:secret".to_owned()),
            ..Health::default()
        };
        // The target's address names the MQTT port (listening: the probe checks it takes a
        // connection); the HTTP request goes to http_port.
        let mqtt = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let mqtt_at = mqtt.local_addr().expect("its address");
        let mqtt_port = |_api: SocketAddr| mqtt_at;
        let (api, mut requests) = http_stand_in(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        let t = target(mqtt_port(api), health(api.port()));
        assert!(matches!(round(&t).await, Outcome::Pass(d) if d == "HTTP 200"));
        let req = requests.recv().await.expect("a request");
        assert!(req.starts_with("GET /api/v5/load_rebalance/availability_check HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {}\r\n", mqtt_port(api))) || req.contains(&format!("Host: {api}\r\n")), "{req}");
        // Plain HTTP never carries the credentials, even were they configured.
        assert!(!req.contains("Authorization") && req.ends_with("\r\n\r\n"), "{req}");
        // An evacuating EMQX: 503, refusing.
        let (api, _r) = http_stand_in(b"HTTP/1.1 503 Service Unavailable\r\n\r\n".to_vec()).await;
        let t = target(mqtt_port(api), health(api.port()));
        assert!(matches!(round(&t).await, Outcome::Refusing(d) if d.contains("HTTP 503")));
        // Interim responses are read past.
        let (api, _r) = http_stand_in(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".to_vec()).await;
        let t = target(mqtt_port(api), health(api.port()));
        assert!(matches!(round(&t).await, Outcome::Pass(d) if d == "HTTP 200"));
        // The API answers but the MQTT port takes no connection: down, saying so.
        let (api, _r) = http_stand_in(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()).await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
            l.local_addr().expect("its address")
        };
        let t = target(closed, health(api.port()));
        assert!(matches!(round(&t).await, Outcome::Down(d) if d.contains("the API answers, the MQTT port")));
        // Another status, no status line, an endless line: down.
        for (answer, want) in [
            (b"HTTP/1.1 404 Not Found\r\n\r\n".to_vec(), "HTTP 404"),
            (b"SSH-2.0-OpenSSH_9\r\n".to_vec(), "not an HTTP status line"),
            (vec![b'H'; 5000], "no HTTP status line in the first 4096 bytes"),
        ] {
            let (api, _r) = http_stand_in(answer).await;
            let t = target(mqtt_port(api), health(api.port()));
            assert!(matches!(round(&t).await, Outcome::Down(ref d) if d.contains(want)), "{want}");
        }
    }

    #[test]
    fn alpha_starts_down() {
        let mut p = PairHealth::new(&h(true));
        assert_eq!(p.state, State::Down);
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 3, 2), None);
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 3, 2), Some(State::Up));
    }

    #[test]
    fn a_local_error_counts_neither_toward_fall_nor_rise() {
        let mut p = PairHealth::new(&h(false));
        let local = Outcome::Local("socket: Too many open files (os error 24)".into());
        let fail = Outcome::Down("connect: Connection refused".into());
        let pass = Outcome::Pass("ok".into());
        for _ in 0..10 {
            assert_eq!(p.observe(&local, 3, 2), None, "a local error takes no pair down");
        }
        assert_eq!((p.state, p.failures_total, p.checks_total, p.local_errors_total), (State::Up, 0, 0, 10));
        assert_eq!(p.unchecked.as_deref(), Some("socket: Too many open files (os error 24)"));
        assert_eq!(p.observe(&fail, 3, 2), None);
        assert!(p.unchecked.is_none(), "a round that reached the broker checks the pair again");
        assert_eq!(p.observe(&local, 3, 2), None);
        assert_eq!(p.observe(&fail, 3, 2), None, "nor does it break the broker's streak of failures");
        assert_eq!(p.observe(&fail, 3, 2), Some(State::Down));
        assert_eq!(p.observe(&pass, 3, 2), None);
        for _ in 0..10 {
            assert_eq!(p.observe(&local, 3, 2), None, "a local error brings no pair up");
        }
        assert_eq!(p.observe(&pass, 3, 2), Some(State::Up));
        assert_eq!((p.failures_total, p.local_errors_total), (3, 21));
    }

    fn target(real: SocketAddr, health: Health) -> Target {
        Target {
            listener: "mqtt".into(),
            backend: "b1".into(),
            real,
            vip: real,
            mark: 0,
            health,
            client_id: "dsrlb-hc-test".into(),
            tls: None,
        }
    }

    /// Set in the process [`a_probe_without_descriptors_is_a_local_error_and_a_refusal_is_the_brokers`]
    /// starts for itself.
    const NO_DESCRIPTORS: &str = "DSRLB_TEST_NO_DESCRIPTORS";

    #[test]
    fn a_probe_without_descriptors_is_a_local_error_and_a_refusal_is_the_brokers() {
        if std::env::var_os(NO_DESCRIPTORS).is_some() {
            probe_without_descriptors();
            return;
        }
        // In a process of its own: the descriptor limit is the process's, and the tests beside
        // this one need descriptors.
        let name = "health::tests::a_probe_without_descriptors_is_a_local_error_and_a_refusal_is_the_brokers";
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(NO_DESCRIPTORS, "1")
            .output()
            .expect("running the test binary");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    /// The lowest free descriptor becomes the limit, so none can be opened; returns the old one.
    fn exhaust_descriptors() -> libc::rlimit {
        let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `old` is a valid rlimit to write to.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut old) }, 0);
        // SAFETY: dup and close of descriptors this process owns.
        let lowest = unsafe { libc::dup(2) };
        assert!(lowest > 2, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: `lowest` was just opened here.
        unsafe { libc::close(lowest) };
        let none_left = libc::rlimit { rlim_cur: libc::rlim_t::try_from(lowest).expect("positive"), rlim_max: old.rlim_max };
        // SAFETY: a valid rlimit, no higher than the hard limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const none_left) }, 0);
        old
    }

    fn probe_without_descriptors() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
            let health = Health { check: CheckKind::Tcp, vip_check: false, ..Health::default() };
            let t = target(broker.local_addr().expect("its address"), health);
            let (fall, rise) = (t.health.fall, t.health.rise);
            let mut p = PairHealth::new(&t.health);
            assert!(matches!(round(&t).await, Outcome::Pass(_)), "the broker answers");
            let limit = exhaust_descriptors();
            for _ in 0..fall + 2 {
                let outcome = round(&t).await;
                assert!(matches!(&outcome, Outcome::Local(e) if e.contains("socket: Too many open files")), "{outcome:?}");
                assert_eq!(p.observe(&outcome, fall, rise), None);
            }
            assert_eq!((p.state, p.failures_total, p.local_errors_total), (State::Up, 0, u64::from(fall) + 2));
            assert!(p.unchecked.is_some());
            // SAFETY: the limit read before.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) }, 0);
            // The broker's own failure: its port refuses. That takes the pair down as before.
            drop(broker);
            let mut changed = None;
            for _ in 0..fall {
                let outcome = round(&t).await;
                assert!(matches!(&outcome, Outcome::Down(e) if e.contains("Connection refused")), "{outcome:?}");
                changed = p.observe(&outcome, fall, rise);
            }
            assert_eq!(changed, Some(State::Down));
            assert!(p.unchecked.is_none());
        });
    }

    #[tokio::test]
    async fn a_probe_task_that_panics_is_reported_and_started_again() {
        let health = Health { inter: Duration::from_millis(20), timeout: Duration::from_millis(10), fall: 2, ..Health::default() };
        let t = target("127.0.0.1:1".parse().expect("addr"), health);
        let (tx, mut rx) = mpsc::channel(16);
        let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = starts.clone();
        // The first run panics, the ones after report the broker down every `inter`.
        let body = move |t: Target, tx: mpsc::Sender<Report>| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                assert!(n > 0, "a bug in the probe");
                loop {
                    let outcome = Outcome::Down("connect: Connection refused".into());
                    let report = Report { listener: t.listener.clone(), backend: t.backend.clone(), outcome, took: Duration::ZERO };
                    if tx.send(report).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(t.health.inter).await;
                }
            }
        };
        let supervisor = tokio::spawn(supervise_with(t.clone(), tx, body));
        let mut p = PairHealth::new(&t.health);
        let next = async |rx: &mut mpsc::Receiver<Report>| {
            tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a report within 5 s").expect("the channel is open")
        };
        let first = next(&mut rx).await;
        assert!(
            matches!(&first.outcome, Outcome::Local(e) if e.starts_with("the probe task panicked: a bug in the probe")),
            "{:?}",
            first.outcome
        );
        assert_eq!(p.observe(&first.outcome, 2, 2), None);
        assert!(p.unchecked.is_some(), "the pair shows it is not checked");
        let started_again = std::time::Instant::now();
        let mut changed = None;
        while changed.is_none() {
            let r = next(&mut rx).await;
            changed = p.observe(&r.outcome, 2, 2);
        }
        assert_eq!(changed, Some(State::Down), "the restarted task's reports move the pair");
        assert!(p.unchecked.is_none());
        assert!(started_again.elapsed() < Duration::from_secs(5));
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Aborting the supervisor stops the probe task it runs: every sender is gone.
        supervisor.abort();
        let closed = async { while rx.recv().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(5), closed).await.expect("the probe task outlived its supervisor");
    }

    #[test]
    fn log_limit_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut l = LogLimit::new(Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut j = Jitter(42);
        for _ in 0..1000 {
            let d = j.around(Duration::from_secs(2)).as_millis();
            assert!((1800..=2200).contains(&d), "{d}");
        }
    }
}
