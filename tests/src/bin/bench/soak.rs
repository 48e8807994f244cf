//! `bench soak` (issue 25, part 6): many MQTT sessions held through the VIP for a long time,
//! while the operator's and the fleet's events happen, sampled every few seconds.
//!
//! - The lab: dsrlb in front of six mosquitto brokers (a seventh is added during the run), MQTT
//!   health checks every 2 s. Sessions come from several `loadgen soak` processes in the
//!   client's namespace (no process may hold 20,000 files here), over the client's 16
//!   addresses. Each session pings at its own random interval (30 to 120 s by default) and
//!   reports how it ended if it does; a background of short sessions (connect, CONNECT,
//!   DISCONNECT) runs in every process.
//! - The events, at fixed fractions of the run: b7 added (a reload), b2 drained, b3 killed and
//!   started again, the controller restarted (SIGTERM), the controller killed (`kill -9`) and
//!   started again, and a reload every `reload_every`.
//! - Every sample: sessions alive and lost (by how), live flows in the table and per broker,
//!   expired flows, the controller's RSS and CPU, the program's verdict counters.
//! - What must hold: no session lost to the balancer (a reset or a timeout: a broker that stayed
//!   up answers a session's frames only if they reach it), live flows within 1% of the
//!   sessions the clients hold, the controller's RSS flat after warm-up (within 10%).
//!   Sessions on the killed broker end with its close (EOF) and are counted apart.
//!
//! Not here yet: the two-node cluster with a node failure, and clients that vanish without a
//! FIN (the live count falling at `flow_idle_timeout`).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tests::{
    balancer::Balancer,
    lab::{self, Lab},
    netns::nsenter,
    wait,
};

/// Brokers in the lab; the last is added to the config during the run.
const BROKERS: usize = 7;

/// How a soak runs. `cargo xtask soak` takes the defaults (100,000 sessions, 60 minutes); the
/// smoke run in `cargo xtask test` is the same code, small and short.
#[derive(Clone, Debug)]
pub struct Options {
    pub sessions: usize,
    pub duration: Duration,
    /// Client processes (each holds sessions / processes).
    pub processes: usize,
    pub ping: (Duration, Duration),
    pub sample_every: Duration,
    pub reload_every: Duration,
    /// Short sessions per second in each client process.
    pub churn_per_sec: f64,
}

impl Options {
    #[must_use]
    pub fn full() -> Self {
        Self {
            sessions: 100_000,
            duration: Duration::from_hours(1),
            processes: 7,
            ping: (Duration::from_secs(30), Duration::from_mins(2)),
            sample_every: Duration::from_secs(10),
            reload_every: Duration::from_mins(10),
            churn_per_sec: 2.0,
        }
    }
}

/// One sample of the run.
#[derive(Clone, Debug, Default)]
struct Sample {
    t: f64,
    opened: u64,
    open_failed: u64,
    alive: u64,
    lost_reset: u64,
    lost_eof: u64,
    lost_timeout: u64,
    lost_other: u64,
    pings: u64,
    churn_ok: u64,
    churn_failed: u64,
    live_flows: u64,
    expired: u64,
    rss_kb: u64,
    cpu_s: f64,
    tx: u64,
    event: String,
}

/// The client processes and the latest line each printed.
struct Clients {
    procs: Vec<Child>,
    latest: Arc<Mutex<Vec<Value>>>,
}

impl Clients {
    fn start(lab: &Lab, bin: &Path, o: &Options) -> anyhow::Result<Self> {
        let addrs: Vec<String> = lab.client_extra_addrs().iter().map(ToString::to_string).collect();
        let latest = Arc::new(Mutex::new(vec![Value::Null; o.processes]));
        let mut procs = Vec::new();
        for p in 0..o.processes {
            // Each process its own share of the addresses (at least one).
            let mine: Vec<&str> = addrs.iter().skip(p % addrs.len()).step_by(o.processes.min(addrs.len())).map(String::as_str).collect();
            let per = o.sessions / o.processes + usize::from(p < o.sessions % o.processes);
            let mut child = nsenter(&lab.ns("client"), bin.join("loadgen"))
                .args(["soak", "--target", &format!("{}:1883", lab::VIP), "--from", &mine.join(",")])
                .args(["--count", &per.to_string(), "--parallel", "64", "--timeout-ms", "5000"])
                .args(["--ping-min-ms", &o.ping.0.as_millis().to_string(), "--ping-max-ms", &o.ping.1.as_millis().to_string()])
                .args(["--report-ms", &o.sample_every.as_millis().min(5000).to_string(), "--churn-per-sec", &o.churn_per_sec.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting loadgen soak")?;
            let out = child.stdout.take().context("loadgen's stdout")?;
            let latest = Arc::clone(&latest);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && let Ok(mut l) = latest.lock()
                    {
                        l[p] = v;
                    }
                }
            });
            procs.push(child);
        }
        Ok(Self { procs, latest })
    }

    /// A field summed over every process's latest line.
    fn sum(&self, field: &str) -> u64 {
        self.latest.lock().map_or(0, |l| l.iter().map(|v| v[field].as_u64().unwrap_or(0)).sum())
    }

    fn stop(&mut self) {
        for c in &mut self.procs {
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = writeln!(stdin, "exit");
            }
        }
        for c in &mut self.procs {
            if wait::within(Duration::from_secs(20), Duration::from_millis(100), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The controller's RSS (kB) and CPU time (s) from /proc.
fn proc_usage(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 =
        fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    #[expect(clippy::cast_precision_loss, reason = "CPU seconds for a report")]
    (rss, ticks as f64 / hz as f64)
}

fn take(lb: &Balancer, clients: &Clients, started: Instant, event: &str) -> Sample {
    let status = lb.status();
    let (rss_kb, cpu_s) = proc_usage(lb.child.id());
    Sample {
        t: started.elapsed().as_secs_f64(),
        opened: clients.sum("opened"),
        open_failed: clients.sum("open_failed"),
        alive: clients.sum("alive"),
        lost_reset: clients.sum("lost_reset"),
        lost_eof: clients.sum("lost_eof"),
        lost_timeout: clients.sum("lost_timeout"),
        lost_other: clients.sum("lost_other"),
        pings: clients.sum("pings"),
        churn_ok: clients.sum("churn_ok"),
        churn_failed: clients.sum("churn_failed"),
        live_flows: u64::try_from(status.flow_table_entries).unwrap_or(u64::MAX),
        expired: status.flow_table.get("expired").copied().unwrap_or(0),
        rss_kb,
        cpu_s,
        tx: status.verdicts.iter().filter(|(k, _)| k.starts_with("tx/")).map(|(_, v)| *v).sum(),
        event: event.to_owned(),
    }
}

/// The soak's `flow_idle_timeout`: half as long again as the longest ping interval, at least
/// 20 s, in whole seconds.
fn idle_timeout(o: &Options) -> Duration {
    Duration::from_secs((o.ping.1.as_millis() * 3 / 2).div_ceil(1000).max(20).try_into().unwrap_or(u64::MAX))
}

/// The events of a run, at fractions of its length, and the reloads.
fn timeline(o: &Options) -> Vec<(Duration, &'static str)> {
    let at = |f: f64| o.duration.mul_f64(f);
    let mut ev = vec![
        (at(0.10), "add b7"),
        (at(0.20), "drain b2"),
        (at(0.30), "kill b3"),
        (at(0.30) + Duration::from_secs(15), "start b3"),
        (at(0.45), "restart controller (SIGTERM)"),
        (at(0.60), "kill -9 controller"),
    ];
    let mut r = o.reload_every;
    while r < o.duration {
        ev.push((r, "reload"));
        r += o.reload_every;
    }
    ev.sort_by_key(|(t, _)| *t);
    ev
}

/// Runs the soak on a lab of its own; returns its report section (Markdown) and whether what
/// must hold held.
///
/// # Errors
/// When the lab or the balancer cannot start, or a check fails.
pub fn soak(bin: &Path, o: &Options, out_dir: Option<&Path>) -> anyhow::Result<String> {
    let lab = Lab::new("dsrlbk", BROKERS);
    lab.up()?;
    let result = run(&lab, bin, o, out_dir);
    let _ = lab.down();
    result
}

fn run(lab: &Lab, bin: &Path, o: &Options, out_dir: Option<&Path>) -> anyhow::Result<String> {
    // One listener. Flows idle past `idle` expire: longer than the longest ping interval (a
    // session's flow must outlive its silences), short enough that flows whose clients are gone
    // without a FIN through the balancer (a killed broker's) leave within the run.
    let idle = idle_timeout(o);
    let mut full = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\n\n[health]\ncheck = \"mqtt\"\ninter = \"2s\"\n\n\
         [[listener]]\nname = \"mqtt\"\nvip = \"{}\"\nport = 1883\nflow_idle_timeout = \"{}s\"\n\n",
        lab::VIP,
        idle.as_secs()
    );
    for i in 0..BROKERS {
        let _ = writeln!(full, "[[backend]]\nname = \"b{}\"\naddress = \"{}\"\n", i + 1, lab::broker_addr(i));
    }
    let b7 = format!("[[backend]]\nname = \"b7\"\naddress = \"{}\"\n", lab::broker_addr(BROKERS - 1));
    let without_b7 = full.replace(&b7, "");
    let mut lb = Balancer::start(lab, &without_b7);
    wait::until("every broker of the config up", Duration::from_mins(1), || {
        let s = lb.status();
        s.listeners
            .iter()
            .find(|l| l.name == "mqtt")
            .is_some_and(|l| l.backends.len() == BROKERS - 1 && l.backends.iter().all(|b| b.state == "up"))
    });
    let mut clients = Clients::start(lab, bin, o)?;
    let started = Instant::now();
    // Opening: until every session is open (or failed to), at most 10 minutes.
    let opening = Instant::now();
    wait::until_every("every session opened", Duration::from_mins(10), Duration::from_secs(1), || {
        clients.sum("opened") + clients.sum("open_failed") >= u64::try_from(o.sessions).unwrap_or(u64::MAX)
    });
    let opened_in = opening.elapsed();
    let mut samples = vec![take(&lb, &clients, started, "opened")];
    let soak_start = Instant::now();
    let mut events = timeline(o).into_iter().peekable();
    let mut on_b3_at_kill = 0usize;
    let mut next_sample = o.sample_every;
    while soak_start.elapsed() < o.duration {
        let mut label = String::new();
        while let Some((at, what)) = events.peek().copied()
            && at <= soak_start.elapsed()
        {
            events.next();
            match what {
                "add b7" => {
                    std::fs::write(&lb.config, &full)?;
                    let (ok, _, err) = lb.cli(&["reload"]);
                    ensure!(ok, "reload with b7: {err}");
                }
                "drain b2" => {
                    let (ok, _, err) = lb.cli(&["drain", "b2"]);
                    ensure!(ok, "drain b2: {err}");
                }
                "kill b3" => {
                    on_b3_at_kill = lb.status().flows_per_backend.get("b3").copied().unwrap_or(0);
                    lab.stop_broker(2)?;
                }
                "start b3" => lab.start_broker(2)?,
                "restart controller (SIGTERM)" => {
                    let status = lb.stop();
                    ensure!(status.success(), "the controller exited with {status} on SIGTERM");
                    lb.restart(lab);
                }
                "kill -9 controller" => {
                    lb.kill9();
                    lb.restart(lab);
                }
                "reload" => {
                    let (ok, _, err) = lb.cli(&["reload"]);
                    ensure!(ok, "reload: {err}");
                }
                _ => bail!("unknown event {what}"),
            }
            if !label.is_empty() {
                label.push_str("; ");
            }
            label.push_str(what);
        }
        if !label.is_empty() {
            samples.push(take(&lb, &clients, started, &label));
            continue;
        }
        let left = next_sample.saturating_sub(soak_start.elapsed());
        let until_event = events.peek().map_or(left, |(at, _)| at.saturating_sub(soak_start.elapsed()));
        std::thread::sleep(left.min(until_event).min(Duration::from_secs(1)));
        if soak_start.elapsed() >= next_sample {
            samples.push(take(&lb, &clients, started, ""));
            next_sample += o.sample_every;
        }
    }
    let last = take(&lb, &clients, started, "end");
    samples.push(last.clone());
    clients.stop();
    let _ = lb.stop();
    report(o, &samples, opened_in, on_b3_at_kill, out_dir)
}

#[expect(clippy::cast_precision_loss, reason = "ratios for a report")]
fn report(o: &Options, samples: &[Sample], opened_in: Duration, on_b3: usize, out_dir: Option<&Path>) -> anyhow::Result<String> {
    let last = samples.last().context("no samples")?;
    let mut r = String::new();
    let _ = writeln!(
        r,
        "## Soak: {} sessions for {:.0} min\n\nCommand: `cargo xtask soak` (`target/release/bench soak`). {} client processes, pings every {}-{} s, \
         {} short sessions/s per process, a sample every {} s. Opening took {:.0} s.\n",
        o.sessions,
        o.duration.as_secs_f64() / 60.0,
        o.processes,
        o.ping.0.as_secs(),
        o.ping.1.as_secs(),
        o.churn_per_sec,
        o.sample_every.as_secs(),
        opened_in.as_secs_f64()
    );
    let _ = writeln!(
        r,
        "| t (s) | event | alive | lost reset | lost eof | lost timeout | live flows | live/alive | expired | RSS MB | CPU s | pings | frames sent (tx) |"
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for s in samples.iter().filter(|s| !s.event.is_empty() || s.t.rem_euclid(60.0) < o.sample_every.as_secs_f64()) {
        let ratio = if s.alive > 0 { s.live_flows as f64 / s.alive as f64 } else { 0.0 };
        let _ = writeln!(
            r,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {:.1} | {:.1} | {} | {} |",
            s.t,
            s.event,
            s.alive,
            s.lost_reset,
            s.lost_eof,
            s.lost_timeout,
            s.live_flows,
            ratio,
            s.expired,
            s.rss_kb as f64 / 1024.0,
            s.cpu_s,
            s.pings,
            s.tx
        );
    }
    // What must hold.
    let lost_to_balancer = last.lost_reset + last.lost_timeout + last.lost_other;
    // Flows of sessions that ended without a FIN through the balancer (the killed broker's
    // close went straight to the clients) stay until they are idle for `flow_idle_timeout`,
    // then the next sweep removes them: those samples are left out, and said so.
    let kill_at = samples.iter().find(|s| s.event.contains("kill b3")).map_or(f64::MAX, |s| s.t);
    let stale_until = kill_at + idle_timeout(o).as_secs_f64() + 30.0;
    let worst_ratio = samples
        .iter()
        .filter(|s| s.alive > 0 && s.event.is_empty() && !(kill_at..stale_until).contains(&s.t))
        .map(|s| (s.live_flows as f64 / s.alive as f64 - 1.0).abs())
        .fold(0.0_f64, f64::max);
    let warm = samples.iter().filter(|s| s.t > samples[0].t + o.duration.as_secs_f64() * 0.65).map(|s| s.rss_kb).collect::<Vec<_>>();
    let (rss_min, rss_max) = (warm.iter().copied().min().unwrap_or(0), warm.iter().copied().max().unwrap_or(0));
    let rss_spread = if rss_min > 0 { (rss_max - rss_min) as f64 / rss_min as f64 } else { 0.0 };
    let _ = writeln!(
        r,
        "\n- Sessions opened: {} ({} failed to open); alive at the end: {}.\n- Lost to the balancer (reset, timeout, other): **{}**. \
         Ended by their broker's close (EOF): {} (b3 held {} flows when it was killed).\n- Live flows against the clients' count, worst sample \
         outside an event and outside the {:.0} s after b3's kill (its clients' flows are left to expire, `flow_idle_timeout` {} s): {:.2}% off.\n- Controller RSS after the last restart: {:.1}-{:.1} MB ({:.1}% spread). CPU: {:.1} s in all.\n- Short sessions: {} made, {} failed.\n",
        last.opened,
        last.open_failed,
        last.alive,
        lost_to_balancer,
        last.lost_eof,
        on_b3,
        stale_until - kill_at.min(stale_until),
        idle_timeout(o).as_secs(),
        worst_ratio * 100.0,
        rss_min as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        rss_spread * 100.0,
        last.cpu_s,
        last.churn_ok,
        last.churn_failed
    );
    if let Some(dir) = out_dir {
        plot(&dir.join("soak.svg"), samples)?;
        let _ = writeln!(r, "![sessions and live flows](soak.svg)\n");
    }
    let mut failures = Vec::new();
    if lost_to_balancer > 0 {
        failures.push(format!("{lost_to_balancer} sessions lost to the balancer"));
    }
    if last.open_failed > 0 {
        failures.push(format!("{} sessions failed to open", last.open_failed));
    }
    if worst_ratio > 0.01 {
        failures.push(format!("live flows {:.2}% off the clients' count", worst_ratio * 100.0));
    }
    if rss_spread > 0.10 {
        failures.push(format!("controller RSS grew {:.1}% after warm-up", rss_spread * 100.0));
    }
    if failures.is_empty() {
        Ok(r)
    } else {
        eprint!("{r}");
        bail!("the soak did not hold: {}", failures.join("; "))
    }
}

#[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
fn plot(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (820, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let tmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let ymax = samples.iter().map(|s| s.alive.max(s.live_flows)).max().unwrap_or(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Soak: sessions held and live flows", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax.max(1.0))?;
    chart.configure_mesh().x_desc("s").y_desc("sessions / flows").draw()?;
    type Series = (&'static str, RGBColor, fn(&Sample) -> u64);
    let series: [Series; 3] = [
        ("alive (clients)", RGBColor(46, 110, 190), |s| s.alive),
        ("live flows (table)", RGBColor(230, 120, 40), |s| s.live_flows),
        ("lost to the balancer", RGBColor(200, 40, 40), |s| s.lost_reset + s.lost_timeout + s.lost_other),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(samples.iter().map(|s| (s.t, f(s) as f64)), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
