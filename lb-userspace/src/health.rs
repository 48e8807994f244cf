//! Health checks: one probe task per (listener, backend), HAProxy's `inter`/`timeout`/`fall`/
//! `rise` with a little jitter, and the state machine that turns probe results into states.
//!
//! A round probes the backend's real address first; when that passes and `vip_check` is on, it
//! probes VIP:port along the DSR path (a socket mark that policy routing sends to this one
//! backend's MAC, see [`crate::probe_route`]). A broker that answers on its address but not on
//! the VIP is `vip-misconfigured`, not `down`.

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
        Self { state, ok_streak: 0, fail_streak: 0, last, failures_total: 0, checks_total: 0, out_since, last_took: None }
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

    /// Applies one outcome; returns the new state when it changed.
    pub fn observe(&mut self, outcome: &Outcome, fall: u32, rise: u32) -> Option<State> {
        let before = self.state;
        self.checks_total += 1;
        match outcome {
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

/// One round: the real address, then the VIP.
pub async fn round(t: &Target) -> Outcome {
    let real = match probe(t, t.real, None, "r").await {
        Ok(detail) => detail,
        Err(Failure::Refusing(detail)) => return Outcome::Refusing(format!("{}: {detail}", t.real)),
        Err(Failure::Broken(e)) => return Outcome::Down(format!("{}: {e}", t.real)),
    };
    if !t.health.vip_check {
        return Outcome::Pass(real);
    }
    match probe(t, t.vip, Some(t.mark), "v").await {
        Ok(_) => Outcome::Pass(format!("{real}; VIP ok")),
        Err(Failure::Refusing(detail)) => Outcome::Refusing(format!("{} via DSR: {detail}", t.vip)),
        Err(Failure::Broken(e)) => Outcome::VipMisconfigured(format!("{} answers, {} via DSR does not: {e}", t.real, t.vip)),
    }
}

/// Why a probe did not pass.
enum Failure {
    /// No (usable) answer.
    Broken(String),
    /// An MQTT broker that answered CONNACK 3: alive, refusing clients.
    Refusing(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Self::Broken(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Self::Broken(s.to_owned())
    }
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

async fn connect(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    sock.connect(addr).await
}

async fn probe(t: &Target, addr: SocketAddr, mark: Option<u32>, suffix: &str) -> Result<String, Failure> {
    let h = &t.health;
    let work = async {
        let stream = connect(addr, mark).await.map_err(|e| format!("connect: {e}"))?;
        let client_id = format!("{}-{suffix}", t.client_id);
        match h.check {
            CheckKind::None | CheckKind::Tcp => Ok("TCP connect".to_owned()),
            CheckKind::Mqtt => mqtt_exchange(stream, &client_id, h).await,
            CheckKind::MqttTls => {
                let config = t.tls.clone().ok_or("no TLS config")?;
                let name = match &h.tls_server_name {
                    Some(n) => rustls_pki_types::ServerName::try_from(n.clone()).map_err(|e| format!("tls_server_name: {e}"))?,
                    None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let tls =
                    tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
                mqtt_exchange(tls, &client_id, h).await.map(|d| format!("TLS, {d}"))
            }
        }
    };
    match tokio::time::timeout(h.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Broken(format!("no answer within {:?}", h.timeout))),
    }
}

/// CONNECT, CONNACK, DISCONNECT. CONNACK 0 passes; 3 ("server unavailable") is a broker that
/// refuses clients; 4 and 5 mean the check's own credentials are refused, so the broker is
/// alive and passes, with a warning in its detail; 1 and 2 (a protocol version or client id it
/// does not take) pass as alive.
async fn mqtt_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, client_id: &str, h: &Health) -> Result<String, Failure> {
    let connect = mqtt::connect(client_id, 10, h.username.as_deref(), h.password.as_deref());
    s.write_all(&connect).await.map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.map_err(|e| format!("reading CONNACK: {e}"))?;
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

/// Whether a passing probe's detail carries a warning for the operator (refused credentials).
#[must_use]
pub fn warns(detail: &str) -> bool {
    detail.contains("credentials are refused")
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
    fn alpha_starts_down() {
        let mut p = PairHealth::new(&h(true));
        assert_eq!(p.state, State::Down);
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 3, 2), None);
        assert_eq!(p.observe(&Outcome::Pass("ok".into()), 3, 2), Some(State::Up));
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
