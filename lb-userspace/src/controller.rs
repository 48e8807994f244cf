//! `dsrlb run`: from a validated config to an attached balancer, and back off on a signal.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use lb_common::{NO_BACKEND, reason};

use crate::{
    config::{Config, format_mac},
    dataplane::{self, Dataplane, Desired, LoadOptions, Stats},
    neigh,
    plan::{self, BackendRuntime, Ids},
};

/// How long `run` waits for a backend's MAC to resolve.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

/// Everything `run` needs before it touches the kernel: resolved MACs and the planned maps.
pub struct Prepared {
    pub ids: Ids,
    pub runtime: BTreeMap<String, BackendRuntime>,
    pub src_mac: [u8; 6],
    pub desired: Desired,
}

/// Resolves MACs and plans the maps. Touches nothing, so a failure leaves the system as it was.
///
/// # Errors
/// When the interface or a backend MAC cannot be found.
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let src_mac = dataplane::interface_mac(&config.interface)?;
    let mut runtime = BTreeMap::new();
    for b in &config.backends {
        let mac = match b.mac {
            Some(mac) => mac,
            None => neigh::resolve(b.address, &config.interface, RESOLVE_WAIT)
                .with_context(|| format!("backend {}", b.name))?,
        };
        runtime.insert(b.name.clone(), BackendRuntime { mac, down: false, drained: false });
    }
    let mut ids = Ids::default();
    ids.update(config)?;
    let desired = plan::desired(config, &ids, &runtime, src_mac)?;
    Ok(Prepared { ids, runtime, src_mac, desired })
}

/// A human summary of what is being served.
#[must_use]
pub fn describe(config: &Config, p: &Prepared) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "interface {} ({}), xdp_mode {:?}, ring_size {}, flow_table_size {}",
        config.interface, format_mac(p.src_mac), config.xdp_mode, config.ring_size, config.flow_table_size);
    for (l, d) in config.listeners.iter().zip(&p.desired.listeners) {
        let _ = writeln!(out, "listener {} {}:{} hash={:?}", l.name, l.vip, l.port, l.hash);
        let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
        for &s in &d.ring {
            *slots.entry(s).or_default() += 1;
        }
        if slots.contains_key(&NO_BACKEND) {
            let _ = writeln!(out, "  (no backend with weight > 0: new connections are dropped)");
        }
        for name in &l.backends {
            let b = config.backend(name).expect("validated");
            let id = p.ids.backends[name];
            let share = slots.get(&id).copied().unwrap_or(0) as f64 * 100.0 / d.ring.len() as f64;
            let _ = writeln!(out, "  backend {:<12} {:<15} {}  weight {:>5}  ring share {share:5.1}%",
                b.name, b.address, format_mac(p.runtime[name].mac), b.weight);
        }
    }
    out
}

/// One stats line: per backend, new flows and packets (totals and per second since `prev`).
#[must_use]
pub fn stats_line(ids: &Ids, now: &Stats, prev: &Stats, secs: f64) -> String {
    let mut line = String::new();
    for (name, id) in &ids.backends {
        let c = now.backends.get(id).copied().unwrap_or_default();
        let p = prev.backends.get(id).copied().unwrap_or_default();
        let _ = write!(
            line,
            "{name}: {} new ({:.0}/s) {} pkts ({:.0}/s) | ",
            c.new_flows,
            (c.new_flows - p.new_flows) as f64 / secs,
            c.packets,
            (c.packets - p.packets) as f64 / secs
        );
    }
    let sum = |s: &Stats, verdict: &str| -> u64 {
        reason::LABELS.iter().zip(&s.verdicts).filter(|((v, _), _)| *v == verdict).map(|(_, n)| n).sum()
    };
    let _ = write!(line, "pass {} drop {}", sum(now, "pass"), sum(now, "drop"));
    line
}

/// `dsrlb run`: loads, fills the maps, attaches, and waits for SIGINT or SIGTERM; dropping the
/// data plane on the way out detaches the program. With `stats_every`, prints a stats line at
/// that interval (in place on a terminal).
///
/// # Errors
/// When any step before the wait fails; nothing stays attached then.
pub async fn run(config: Config, stats_every: Option<Duration>) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while loading must still mean "detach and exit".
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let prepared = prepare(&config)?;
    let mut dp = Dataplane::load(&LoadOptions {
        ring_size: config.ring_size,
        flow_table_size: config.flow_table_size,
        floor_dst_mac: prepared.runtime.values().next().map_or([0; 6], |r| r.mac),
    })?;
    dp.apply(&prepared.desired).context("filling the maps")?;
    dp.attach(&config.interface, dataplane::xdp_mode(config.xdp_mode))?;
    print!("{}", describe(&config, &prepared));
    tracing::info!(interface = %config.interface, "serving");

    let mut tick = tokio::time::interval(stats_every.unwrap_or(Duration::from_secs(3600)));
    let tty = std::io::stdout().is_terminal();
    let mut prev = dp.stats()?;
    let mut prev_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = int.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = tick.tick(), if stats_every.is_some() => {
                let now = dp.stats()?;
                let secs = prev_at.elapsed().as_secs_f64().max(1e-3);
                let line = stats_line(&prepared.ids, &now, &prev, secs);
                if tty {
                    print!("\r\x1b[K{line}");
                    let _ = std::io::stdout().flush();
                } else {
                    println!("{line}");
                }
                prev = now;
                prev_at = std::time::Instant::now();
            }
        }
    }
    if tty && stats_every.is_some() {
        println!();
    }
    drop(dp);
    Ok(())
}
