//! Load for failover tests: held MQTT sessions that PING and PUBLISH (QoS 1) throughout, and a
//! new connection every 10 ms, all from the lab's client namespace. A held session that ever
//! fails (a reset, a timeout) is lost and counted; every new connection is recorded with when
//! it started, how long it took and whether it succeeded, so a test can tell what a routing gap
//! cost.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    client::MqttConn,
    lab::{Lab, VIP},
    wait,
};

/// How long a held session waits for an answer: longer than any failover the tests cause
/// (a VRRP takeover needs about 3.6 s, then TCP's retransmission backoff).
const HELD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads that drive the held sessions.
const WORKERS: usize = 4;

/// One new connection: when it started (since the load began), how long it took, its error.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub took: Duration,
    pub error: Option<String>,
}

#[derive(Default)]
struct Shared {
    started: Option<Instant>,
    stop: AtomicBool,
    /// Full passes over every held session, summed over the workers (a pass is one PING and one
    /// PUBLISH per session of the worker's share).
    passes: AtomicU64,
    pings: AtomicU64,
    publishes: AtomicU64,
    lost: Mutex<Vec<(String, String)>>,
    attempts: Mutex<Vec<Attempt>>,
    in_flight: AtomicUsize,
}

/// Held sessions and churn, running until [`Load::finish`].
pub struct Load {
    shared: Arc<Shared>,
    started: Instant,
    held: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the load saw.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub held: usize,
    pub lost: Vec<(String, String)>,
    pub pings: u64,
    pub publishes: u64,
    pub attempts: Vec<Attempt>,
}

impl LoadReport {
    /// New connections that failed.
    #[must_use]
    pub fn failed(&self) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.error.is_some()).collect()
    }

    /// New connections that succeeded.
    #[must_use]
    pub fn made(&self) -> usize {
        self.attempts.len() - self.failed().len()
    }

    /// Attempts started in `[from, to)` (since the load began).
    #[must_use]
    pub fn between(&self, from: Duration, to: Duration) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.at >= from && a.at < to).collect()
    }

    /// The longest stretch of `[from, to)` in which no connection started that succeeded
    /// promptly (within a second, i.e. without a retransmitted SYN): the routing gap, when
    /// every new connection goes the broken way (VRRP), or a part of it.
    #[must_use]
    pub fn longest_outage(&self, from: Duration, to: Duration) -> Duration {
        let mut starts: Vec<Duration> = self
            .attempts
            .iter()
            .filter(|a| a.at >= from && a.at < to && a.error.is_none() && a.took < Duration::from_secs(1))
            .map(|a| a.at)
            .collect();
        starts.sort();
        let mut prev = from;
        let mut longest = Duration::ZERO;
        for s in starts.into_iter().chain(std::iter::once(to)) {
            longest = longest.max(s.saturating_sub(prev));
            prev = s;
        }
        longest
    }

    /// Connections started in `[from, to)` that succeeded but took longer than a second (their
    /// first SYN was lost in a routing gap and retransmitted).
    #[must_use]
    pub fn delayed(&self, from: Duration, to: Duration) -> usize {
        self.between(from, to).iter().filter(|a| a.error.is_none() && a.took >= Duration::from_secs(1)).count()
    }
}

impl Load {
    /// Starts driving `sessions` and, with `churn`, a new connection to VIP:1883 every 10 ms.
    ///
    /// # Panics
    /// When a thread cannot start.
    #[must_use]
    pub fn start(lab: &Lab, sessions: Vec<(String, MqttConn)>, churn: bool) -> Self {
        let started = Instant::now();
        let shared = Arc::new(Shared { started: Some(started), ..Shared::default() });
        let held = sessions.len();
        let mut parts: Vec<Vec<(String, MqttConn)>> = (0..WORKERS).map(|_| Vec::new()).collect();
        for (i, s) in sessions.into_iter().enumerate() {
            parts[i % WORKERS].push(s);
        }
        let mut threads = Vec::new();
        for (w, share) in parts.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            threads.push(std::thread::Builder::new().name(format!("held-{w}")).spawn(move || drive(&shared, share)).expect("thread"));
        }
        if churn {
            let (shared, ns) = (Arc::clone(&shared), lab.ns("client"));
            threads.push(
                std::thread::Builder::new()
                    .name("churn".to_owned())
                    .spawn(move || {
                        crate::netns::in_netns(&ns, || churn_loop(&shared, started)).expect("client namespace");
                    })
                    .expect("thread"),
            );
        }
        Self { shared, started, held, threads }
    }

    /// Time since the load started (for [`LoadReport::between`]).
    #[must_use]
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sessions lost so far.
    #[must_use]
    pub fn lost(&self) -> usize {
        self.shared.lost.lock().map_or(0, |l| l.len())
    }

    /// Waits until every held session still alive has made `n` more full passes (each a PING
    /// and a PUBLISH answered) than when called: proof they all work now. At most `within`.
    ///
    /// # Panics
    /// When they do not.
    pub fn wait_passes(&self, n: u64, within: Duration) {
        let target = self.shared.passes.load(Ordering::SeqCst) + n * WORKERS as u64;
        wait::until_every(format!("held sessions completing {n} passes"), within, Duration::from_millis(50), || {
            self.shared.passes.load(Ordering::SeqCst) >= target
        });
    }

    /// Waits until at least `n` new connections succeeded after `from`, at most `within`.
    ///
    /// # Panics
    /// When they do not.
    pub fn wait_made_after(&self, from: Duration, n: usize, within: Duration) {
        wait::until_every(format!("{n} new connections made after {from:?}"), within, Duration::from_millis(50), || {
            let made = self.shared.attempts.lock().map_or(0, |a| a.iter().filter(|x| x.at >= from && x.error.is_none()).count());
            if made >= n { Ok(()) } else { Err(format!("only {made} succeeded")) }
        });
    }

    /// Stops everything (held sessions are closed) and reports.
    ///
    /// # Panics
    /// When a thread panicked.
    #[must_use]
    pub fn finish(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("load thread");
        }
        let mut attempts = self.shared.attempts.lock().expect("attempts").clone();
        attempts.sort_by_key(|a| a.at);
        LoadReport {
            held: self.held,
            lost: self.shared.lost.lock().expect("lost").clone(),
            pings: self.shared.pings.load(Ordering::SeqCst),
            publishes: self.shared.publishes.load(Ordering::SeqCst),
            attempts,
        }
    }
}

impl Drop for Load {
    /// A test that fails midway stops its load before the lab goes down (else every held
    /// session would be reported lost to the teardown).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

/// One worker: PING and PUBLISH every session of its share, pass after pass, until stopped.
fn drive(shared: &Shared, mut share: Vec<(String, MqttConn)>) {
    for (_, c) in &share {
        let _ = c.stream.set_read_timeout(Some(HELD_TIMEOUT));
        let _ = c.stream.set_write_timeout(Some(HELD_TIMEOUT));
    }
    let mut packet_id = 0u16;
    // Bounded: a pass takes at least a few milliseconds, and tests run for minutes.
    for _ in 0..1_000_000 {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let pass_started = Instant::now();
        let mut alive = Vec::with_capacity(share.len());
        for (id, mut c) in share {
            if shared.stop.load(Ordering::SeqCst) {
                alive.push((id, c));
                continue;
            }
            packet_id = packet_id.wrapping_add(1).max(1);
            let r = c.ping().map(|()| shared.pings.fetch_add(1, Ordering::Relaxed)).and_then(|_| {
                c.publish_qos1(&format!("ha/{id}"), packet_id, b"x").map(|()| shared.publishes.fetch_add(1, Ordering::Relaxed))
            });
            match r {
                Ok(_) => alive.push((id, c)),
                Err(e) => {
                    eprintln!("held session {id} lost at {:?}: {e}", shared.started.map(|t| t.elapsed()).unwrap_or_default());
                    if let Ok(mut l) = shared.lost.lock() {
                        l.push((id, e.to_string()));
                    }
                }
            }
        }
        share = alive;
        shared.passes.fetch_add(1, Ordering::SeqCst);
        // At most a pass every 200 ms: steady traffic without saturating the two cores.
        if let Some(rest) = Duration::from_millis(200).checked_sub(pass_started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    for (_, c) in share {
        c.disconnect();
    }
}

/// A new connection every 10 ms, each in a thread of its own so a slow one does not hold up
/// the next (at most 600 at once).
fn churn_loop(shared: &Arc<Shared>, started: Instant) {
    let mut i = 0u64;
    let mut handles = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) && i < 100_000 {
        if shared.in_flight.load(Ordering::SeqCst) < 600 {
            let shared = Arc::clone(shared);
            let id = format!("churn-{i}");
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            // Threads started here inherit the client namespace.
            handles.push(std::thread::spawn(move || {
                let at = started.elapsed();
                let t = Instant::now();
                let r = MqttConn::connect(None, SocketAddrV4::new(VIP, 1883), &id, CONNECT_TIMEOUT);
                let took = t.elapsed();
                let error = match r {
                    Ok(c) => {
                        c.disconnect();
                        None
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Ok(mut a) = shared.attempts.lock() {
                    a.push(Attempt { at, took, error });
                }
                shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
        handles.retain(|h| !h.is_finished());
    }
    for h in handles {
        let _ = h.join();
    }
}

/// New sessions through the VIP from the client namespace, one every 10 ms, each connected
/// (within `timeout`) and closed again, while `stop` is false and for at most `cap`: counts
/// those `made` and those that `failed` (each failure is printed on stderr).
///
/// # Panics
/// When the client namespace cannot be entered.
pub fn churn(lab: &Lab, stop: &AtomicBool, made: &AtomicUsize, failed: &AtomicUsize, cap: Duration, timeout: Duration) {
    crate::netns::in_netns(&lab.ns("client"), || {
        let mut i = 0;
        wait::repeat(cap, stop, || {
            match MqttConn::connect(None, SocketAddrV4::new(VIP, 1883), &format!("churn-{i}"), timeout) {
                Ok(c) => {
                    c.disconnect();
                    made.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("churn-{i}: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        });
    })
    .expect("client namespace");
}
