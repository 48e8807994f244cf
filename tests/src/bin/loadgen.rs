//! MQTT load generator for `cargo xtask bench` (tokio, all cores). It spreads connections over
//! several source addresses so ports never run out, and prints one JSON line of results.
//!
//! ```text
//! loadgen rate   --target IP:PORT [--from A,B,..] [--workers 64] [--secs 4]   (IPv6: [IP]:PORT)
//! loadgen pubsub --target IP:PORT [--from ..] [--pubs 4] [--subs 4] [--secs 4] [--payload 64]
//! loadgen hold   --target IP:PORT [--from ..] --count N [--parallel 256] [--timeout-ms 5000]
//!     prints "opened N", then on the line "ping" on stdin pings every session and prints JSON;
//!     exits on "exit" or end of input
//! loadgen soak   --target IP:PORT [--from ..] --count N [--parallel 256] [--ping-min-ms 30000]
//!                [--ping-max-ms 120000] [--report-ms 10000] [--churn-per-sec 2]
//!     holds N sessions, each pinging at its own random interval in [min, max] and reconnecting
//!     when lost; while a background of short sessions (connect, CONNECT, DISCONNECT) runs,
//!     prints a JSON line of counts every report interval: sessions alive, lost by how (reset,
//!     eof: the broker closed, timeout: no PINGRESP in 10 s), reconnects, pings, churn. On
//!     "exit" or end of input every session pings once more, and a last line (`"last":true`)
//!     says how many answered (`final_ok`).
//! ```

use std::{
    io::BufRead as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::mqtt;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

struct Args {
    target: SocketAddr,
    from: Vec<IpAddr>,
    workers: usize,
    secs: f64,
    pubs: usize,
    subs: usize,
    payload: usize,
    count: usize,
    parallel: usize,
    timeout: Duration,
    ping_min: Duration,
    ping_max: Duration,
    report: Duration,
    churn_per_sec: f64,
}

fn parse_args(raw: &[String]) -> Result<Args, String> {
    let mut a = Args {
        target: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1883),
        from: Vec::new(),
        workers: 64,
        secs: 4.0,
        pubs: 4,
        subs: 4,
        payload: 64,
        count: 0,
        parallel: 256,
        timeout: Duration::from_secs(5),
        ping_min: Duration::from_secs(30),
        ping_max: Duration::from_mins(2),
        report: Duration::from_secs(10),
        churn_per_sec: 2.0,
    };
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{flag}: {v} is not a number"));
        match flag.as_str() {
            "--target" => a.target = v.parse().map_err(|_| format!("--target: {v} is not IP:PORT"))?,
            "--from" => {
                a.from = v.split(',').map(|s| s.parse().map_err(|_| format!("--from: {s} is not an address"))).collect::<Result<_, _>>()?;
            }
            "--workers" => a.workers = num(v)?,
            "--secs" => a.secs = v.parse().map_err(|_| format!("--secs: {v}"))?,
            "--pubs" => a.pubs = num(v)?,
            "--subs" => a.subs = num(v)?,
            "--payload" => a.payload = num(v)?,
            "--count" => a.count = num(v)?,
            "--parallel" => a.parallel = num(v)?,
            "--timeout-ms" => a.timeout = Duration::from_millis(u64::try_from(num(v)?).unwrap_or(u64::MAX)),
            "--ping-min-ms" => a.ping_min = Duration::from_millis(u64::try_from(num(v)?).unwrap_or(u64::MAX)),
            "--ping-max-ms" => a.ping_max = Duration::from_millis(u64::try_from(num(v)?).unwrap_or(u64::MAX)),
            "--report-ms" => a.report = Duration::from_millis(u64::try_from(num(v)?).unwrap_or(u64::MAX).max(100)),
            "--churn-per-sec" => a.churn_per_sec = v.parse().map_err(|_| format!("--churn-per-sec: {v}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.ping_min > a.ping_max || a.ping_min.is_zero() {
        return Err(format!("--ping-min-ms {:?} must be above zero and not above --ping-max-ms {:?}", a.ping_min, a.ping_max));
    }
    Ok(a)
}

async fn connect(a: &Args, i: usize) -> std::io::Result<TcpStream> {
    let sock = if a.target.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    if !a.from.is_empty() {
        sock.bind(SocketAddr::new(a.from[i % a.from.len()], 0))?;
    }
    sock.set_nodelay(true)?;
    tokio::time::timeout(a.timeout, sock.connect(a.target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// TCP connect, CONNECT, CONNACK 0.
async fn session(a: &Args, i: usize, id: &str) -> std::io::Result<TcpStream> {
    let mut s = connect(a, i).await?;
    s.write_all(&mqtt::connect(id, 600, None, None).map_err(std::io::Error::other)?).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(a.timeout, s.read_exact(&mut ack))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNACK"))??;
    match mqtt::connack_code(ack) {
        Ok(0) => Ok(s),
        Ok(c) => Err(std::io::Error::other(format!("CONNACK {c}"))),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short vector"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn rate(a: Arc<Args>) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..a.workers {
        let (a, errors) = (a.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                match session(&a, w + n * a.workers, &format!("rate-{w}-{n}")).await {
                    Ok(mut s) => {
                        lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                        let _ = s.write_all(&mqtt::DISCONNECT).await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    lat.sort_unstable();
    let n = lat.len();
    format!(
        "{{\"connections\":{n},\"errors\":{},\"secs\":{},\"rate\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        errors.load(Ordering::Relaxed),
        a.secs,
        n as f64 / a.secs,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    )
}

/// Counts PUBLISH packets in an MQTT byte stream.
async fn count_publishes(mut s: TcpStream, count: Arc<AtomicU64>, until: Instant) {
    let mut buf = vec![0u8; 1 << 16];
    let mut pending: Vec<u8> = Vec::new();
    while Instant::now() < until {
        let Ok(Ok(n)) = tokio::time::timeout_at(until.into(), s.read(&mut buf)).await else { break };
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        loop {
            // Fixed header: type, then a variable-length remaining length.
            let (mut len, mut mult, mut i) = (0usize, 1usize, at + 1);
            let complete = loop {
                let Some(&b) = pending.get(i) else { break false };
                len += usize::from(b & 0x7f) * mult;
                mult *= 128;
                i += 1;
                if b & 0x80 == 0 {
                    break true;
                }
            };
            if !complete || pending.len() < i + len {
                break;
            }
            if pending[at] >> 4 == 3 {
                count.fetch_add(1, Ordering::Relaxed);
            }
            at = i + len;
        }
        pending.drain(..at);
    }
}

async fn pubsub(a: Arc<Args>) -> Result<String, String> {
    let topic = b"bench/t";
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for i in 0..a.subs {
        let mut s = session(&a, i, &format!("sub-{i}")).await.map_err(|e| format!("subscriber {i}: {e}"))?;
        // SUBSCRIBE id 1, "bench/t" QoS 0.
        let mut p = vec![0x82, u8::try_from(2 + 2 + topic.len() + 1).expect("short"), 0, 1, 0, u8::try_from(topic.len()).expect("short")];
        p.extend_from_slice(topic);
        p.push(0);
        s.write_all(&p).await.map_err(|e| e.to_string())?;
        let mut ack = [0u8; 5];
        s.read_exact(&mut ack).await.map_err(|e| format!("SUBACK: {e}"))?;
        subs.push(s);
    }
    let end = Instant::now() + Duration::from_secs_f64(a.secs);
    let drain_until = end + Duration::from_secs(1);
    let counters: Vec<_> = subs.into_iter().map(|s| tokio::spawn(count_publishes(s, delivered.clone(), drain_until))).collect();
    let sent = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for i in 0..a.pubs {
        let mut s = session(&a, a.subs + i, &format!("pub-{i}")).await.map_err(|e| format!("publisher {i}: {e}"))?;
        let (sent, payload) = (sent.clone(), a.payload);
        pubs.push(tokio::spawn(async move {
            // QoS 0 PUBLISH, written 64 at a time.
            let mut one =
                vec![0x30, u8::try_from(2 + topic.len() + payload).expect("short payload"), 0, u8::try_from(topic.len()).expect("short")];
            one.extend_from_slice(topic);
            one.extend(std::iter::repeat_n(b'x', payload));
            let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 64).collect();
            while Instant::now() < end {
                if s.write_all(&batch).await.is_err() {
                    break;
                }
                sent.fetch_add(64, Ordering::Relaxed);
            }
            let _ = s.write_all(&mqtt::DISCONNECT).await;
        }));
    }
    for p in pubs {
        let _ = p.await;
    }
    for c in counters {
        let _ = c.await;
    }
    let (sent, delivered) = (sent.load(Ordering::Relaxed), delivered.load(Ordering::Relaxed));
    let expected = sent * a.subs as u64;
    Ok(format!(
        "{{\"sent\":{sent},\"delivered\":{delivered},\"ratio\":{:.4},\"rate\":{:.1},\"secs\":{}}}",
        if expected == 0 { 0.0 } else { delivered as f64 / expected as f64 },
        delivered as f64 / a.secs,
        a.secs
    ))
}

async fn hold(a: Arc<Args>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let mut tasks = Vec::with_capacity(a.count);
    let tag = std::process::id();
    for i in 0..a.count {
        let (a, sem) = (a.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.ok()?;
            session(&a, i, &format!("hold-{tag}-{i}")).await.ok()
        }));
    }
    let mut held = Vec::with_capacity(a.count);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            held.push(s);
        }
    }
    println!("opened {}", held.len());
    let stdin = tokio::task::spawn_blocking(|| {
        let mut lines = Vec::new();
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            let done = l == "exit";
            lines.push(l);
            if done || lines.iter().any(|l| l == "ping") {
                break;
            }
        }
        lines
    })
    .await
    .unwrap_or_default();
    if !stdin.iter().any(|l| l == "ping") {
        return;
    }
    let n = held.len();
    let mut tasks = Vec::with_capacity(n);
    for mut s in held {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.ok()?;
            s.write_all(&mqtt::PINGREQ).await.ok()?;
            let mut r = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut r)).await.ok()?.ok()?;
            (r == mqtt::PINGRESP).then_some(s)
        }));
    }
    let mut alive = Vec::new();
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            alive.push(s);
        }
    }
    println!("{{\"held\":{n},\"alive\":{}}}", alive.len());
    // Keep them until told to exit.
    let _ = tokio::task::spawn_blocking(|| {
        for line in std::io::stdin().lock().lines() {
            if line.map_or(true, |l| l == "exit") {
                break;
            }
        }
    })
    .await;
    // Closed with a reset: no TIME_WAIT left behind to skew the next run's memory figures.
    for s in &alive {
        let _ = s.set_zero_linger();
    }
    drop(alive);
}

/// What `soak` counts: sessions and how they ended, reconnects, pings, the final check of
/// every session, and the churn of short sessions.
#[derive(Default)]
struct SoakCounts {
    opened: AtomicU64,
    open_failed: AtomicU64,
    lost_reset: AtomicU64,
    lost_eof: AtomicU64,
    lost_timeout: AtomicU64,
    lost_other: AtomicU64,
    reconnected: AtomicU64,
    reconnect_failed: AtomicU64,
    pings: AtomicU64,
    /// Sessions that answered the last ping, sent to every session on "exit".
    final_ok: AtomicU64,
    churn_ok: AtomicU64,
    churn_failed: AtomicU64,
}

impl SoakCounts {
    /// A loss counter's name, as its field is named in the counts' line.
    fn name_of(&self, counter: &AtomicU64) -> &'static str {
        let named = [(&self.lost_reset, "reset"), (&self.lost_eof, "eof"), (&self.lost_timeout, "timeout")];
        named.into_iter().find(|(c, _)| std::ptr::eq(*c, counter)).map_or("other", |(_, n)| n)
    }

    fn json(&self, started: Instant, is_last: bool) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lost = g(&self.lost_reset) + g(&self.lost_eof) + g(&self.lost_timeout) + g(&self.lost_other);
        format!(
            "{{\"t\":{:.1},\"last\":{is_last},\"opened\":{},\"open_failed\":{},\"alive\":{},\"lost_reset\":{},\"lost_eof\":{},\"lost_timeout\":{},\"lost_other\":{},\"reconnected\":{},\"reconnect_failed\":{},\"pings\":{},\"final_ok\":{},\"churn_ok\":{},\"churn_failed\":{}}}",
            started.elapsed().as_secs_f64(),
            g(&self.opened),
            g(&self.open_failed),
            (g(&self.opened) + g(&self.reconnected)).saturating_sub(lost),
            g(&self.lost_reset),
            g(&self.lost_eof),
            g(&self.lost_timeout),
            g(&self.lost_other),
            g(&self.reconnected),
            g(&self.reconnect_failed),
            g(&self.pings),
            g(&self.final_ok),
            g(&self.churn_ok),
            g(&self.churn_failed),
        )
    }
}

/// PINGREQ, and PINGRESP within 10 s; the loss counter an error belongs to.
async fn ping<'a>(c: &'a SoakCounts, s: &mut TcpStream) -> Result<(), &'a AtomicU64> {
    let mut answer = [0u8; 2];
    match s.write_all(&mqtt::PINGREQ).await {
        Ok(()) => match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await {
            Err(_) => Err(&c.lost_timeout),
            Ok(Ok(_)) if answer == mqtt::PINGRESP => Ok(()),
            Ok(Ok(_)) => Err(&c.lost_other),
            Ok(Err(e)) => Err(loss_of(c, &e)),
        },
        Err(e) => Err(loss_of(c, &e)),
    }
}

/// One held session: pings at its own random interval; when it is lost, says how and
/// reconnects after 1 to 5 s (as an MQTT client would), every 5 s until it is back. On "exit"
/// (`last` turns true) it pings once more and says whether that answered.
async fn soak_session(a: Arc<Args>, counts: Arc<SoakCounts>, mut s: TcpStream, i: usize, mut last: tokio::sync::watch::Receiver<bool>) {
    let c = &counts;
    let tag = std::process::id();
    let mut rng = tests::XorShift(((u64::from(tag) << 32) ^ u64::try_from(i).unwrap_or(0)) | 1);
    let span = u64::try_from(a.ping_max.saturating_sub(a.ping_min).as_millis()).unwrap_or(u64::MAX).max(1);
    let mut reconnects = 0usize;
    loop {
        let wait = a.ping_min + Duration::from_millis(rng.next() % span);
        let ending = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            _ = last.wait_for(|l| *l) => true,
        };
        let outcome = ping(c, &mut s).await;
        if ending {
            if outcome.is_ok() {
                c.final_ok.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        match outcome {
            Ok(()) => {
                c.pings.fetch_add(1, Ordering::Relaxed);
            }
            Err(counter) => {
                counter.fetch_add(1, Ordering::Relaxed);
                // Which session, and how: the soak looks its flow up in the balancers' tables.
                if let Ok(me) = s.local_addr() {
                    println!("{{\"lost\":\"{me}\",\"how\":\"{}\"}}", c.name_of(counter));
                }
                tokio::time::sleep(Duration::from_millis(1000 + rng.next() % 4000)).await;
                loop {
                    if *last.borrow() {
                        return;
                    }
                    reconnects += 1;
                    if let Ok(fresh) = session(&a, i + reconnects, &format!("soak-{tag}-{i}-r{reconnects}")).await {
                        c.reconnected.fetch_add(1, Ordering::Relaxed);
                        s = fresh;
                        break;
                    }
                    c.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}

/// Which loss counter an I/O error belongs to: a reset (a broker that does not know the
/// connection answers with RST), the broker's close (EOF), or anything else.
fn loss_of<'a>(c: &'a SoakCounts, e: &std::io::Error) -> &'a AtomicU64 {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionAborted => &c.lost_reset,
        std::io::ErrorKind::UnexpectedEof => &c.lost_eof,
        std::io::ErrorKind::TimedOut => &c.lost_timeout,
        _ => &c.lost_other,
    }
}

async fn soak(a: Arc<Args>) {
    let started = Instant::now();
    let c = Arc::new(SoakCounts::default());
    let tag = std::process::id();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (last_tx, last_rx) = tokio::sync::watch::channel(false);
    // The reporter.
    let reporter = {
        let (a, c) = (a.clone(), c.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(a.report);
            loop {
                tick.tick().await;
                println!("{}", c.json(started, false));
            }
        })
    };
    // The sessions, opened `parallel` at a time.
    let sem = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let mut held = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let (a, c, sem, last) = (a.clone(), c.clone(), sem.clone(), last_rx.clone());
        let permit = sem.acquire_owned().await.expect("semaphore");
        held.push(tokio::spawn(async move {
            let opened = session(&a, i, &format!("soak-{tag}-{i}")).await;
            drop(permit);
            match opened {
                Ok(s) => {
                    c.opened.fetch_add(1, Ordering::Relaxed);
                    soak_session(a, c, s, i, last).await;
                }
                Err(_) => {
                    c.open_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // The churn: short sessions, one after another at the given rate, from the same addresses.
    if a.churn_per_sec > 0.0 {
        let (a, c, stop) = (a.clone(), c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.churn_per_sec));
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                match session(&a, n, &format!("churn-{tag}-{n}")).await {
                    Ok(mut s) => {
                        let ok = s.write_all(&mqtt::DISCONNECT).await.is_ok();
                        (if ok { &c.churn_ok } else { &c.churn_failed }).fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        c.churn_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let _ = tokio::task::spawn_blocking(|| {
        for line in std::io::stdin().lock().lines() {
            if line.map_or(true, |l| l == "exit") {
                break;
            }
        }
    })
    .await;
    // The end: the churn stops, every session pings once more (at most 30 s for all), then the
    // last line.
    stop.store(true, Ordering::Relaxed);
    let _ = last_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for h in held {
            let _ = h.await;
        }
    })
    .await;
    reporter.abort();
    println!("{}", c.json(started, true));
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = argv.split_first() else {
        eprintln!("usage: loadgen rate|pubsub|hold|soak --target IP:PORT [...]");
        std::process::exit(2);
    };
    let opts = match parse_args(rest) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        match mode.as_str() {
            "rate" => println!("{}", rate(opts).await),
            "pubsub" => match pubsub(opts).await {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    std::process::exit(1);
                }
            },
            "hold" => hold(opts).await,
            "soak" => soak(opts).await,
            _ => {
                eprintln!("loadgen: unknown mode {mode}");
                std::process::exit(2);
            }
        }
    });
}
