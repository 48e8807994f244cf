//! `dsrlb`: the XDP direct-server-return balancer for MQTT brokers.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use lb_userspace::{
    config,
    control::{self, FlowAnswer, Pong, Request, status::Status},
    controller::{self, RunOptions},
    dataplane,
};
use serde_json::Value;

mod cli;

#[derive(Parser)]
#[command(name = "dsrlb", version, about = "XDP direct-server-return load balancer for MQTT brokers")]
struct Cli {
    /// The controller's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// bpffs directory where the maps and the XDP link are pinned.
    #[arg(long, global = true, value_name = "DIR", default_value = "/sys/fs/bpf/dsrlb")]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the balancer, fill its maps from the config, run health checks, and
    /// serve until SIGINT/SIGTERM (SIGHUP reloads the config).
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Print per-backend new flows and packets at this interval (e.g. 1s).
        #[arg(long, value_parser = config::parse_duration)]
        stats_interval: Option<Duration>,
        /// Prometheus endpoint address (`off` for none). Loopback unless you say otherwise.
        #[arg(long, default_value = "127.0.0.1:9877")]
        metrics: String,
        /// A group whose members may use the control socket too (it is root's, mode 0600,
        /// otherwise; with a group, mode 0660).
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<String>,
    },
    /// Validate a config without touching the kernel.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Listeners and backends: health, weight, flows, packets/s, new flows/s.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop new flows to a backend; its existing flows stay.
    Drain { backend: String },
    /// Undo `drain`.
    Undrain { backend: String },
    /// Set a backend's weight until the next reload.
    Weight { backend: String, weight: u32 },
    /// Re-read the config and apply the difference (an invalid config changes nothing).
    Reload,
    /// Which backend a flow is pinned to, or would get: `dsrlb flow 192.0.2.1:40000 192.0.2.100:1883`
    /// (IPv6: `dsrlb flow [2001:db8::1]:40000 [2001:db8::100]:1883`).
    Flow {
        client: String,
        vip: String,
        #[arg(long)]
        json: bool,
    },
    /// Detach the balancer and remove its pins (the only command that stops forwarding).
    Stop,
    /// Exit 0 when a controller serves, its program is attached and (with `[cluster]`) it has
    /// joined; cheap enough for keepalived's `vrrp_script` (it reads no flow table).
    Ping,
    /// Per-backend counters; `--watch` refreshes every second.
    Stats {
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show, per frame, what the data plane decides: client > VIP, TCP flags, listener, backend,
    /// how it was chosen (cache, table, ring, repick_down, reopened, icmp_table, icmp_ring) and the
    /// verdict with its reason. Tracing is on only while this runs.
    Trace {
        /// Only frames matched to this listener (filtered in the data plane).
        #[arg(long)]
        listener: Option<String>,
        /// Only frames from clients in this prefix (192.0.2.0/24, 2001:db8::/64 or an address).
        #[arg(long, value_name = "CIDR")]
        client: Option<lb_userspace::trace::Cidr>,
        /// Only frames forwarded to this backend.
        #[arg(long)]
        backend: Option<String>,
        /// Only this verdict (tx, pass, drop) or reason (no_listener, no_backend, not_our_mac, ...).
        #[arg(long)]
        verdict: Option<String>,
        /// Trace one frame in N, at random (filtered in the data plane): `--sample 1/100`.
        #[arg(long, value_name = "1/N", value_parser = lb_userspace::trace::parse_sample, default_value = "1")]
        sample: u32,
        /// Stop after this many frames.
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Also write the frames' first 128 bytes to FILE as pcapng, each with its decision as
        /// the packet comment (`tcpdump -r FILE`, Wireshark).
        #[arg(long, short = 'w', visible_alias = "write", value_name = "FILE")]
        pcap: Option<PathBuf>,
        /// One JSON object per frame.
        #[arg(long)]
        json: bool,
        /// Keep MQTT CONNECT usernames, passwords and wills in the frames (root only). By
        /// default the controller zeroes everything after a CONNECT's client id, and the whole
        /// payload of a CONNECT it cannot read with confidence, before the frames leave it.
        #[arg(long)]
        raw: bool,
    },
    /// On a broker host: the program that unwraps tunnelled frames (IPIP, IPv6 in IPv6, GUE)
    /// from balancers for the VIPs this host holds.
    Decap {
        #[command(subcommand)]
        command: cli::decap::Command,
    },
    /// Print the shell completion script for SHELL (the package installs bash, zsh and fish's).
    Completions { shell: clap_complete::Shell },
    /// Print the man page; with `--dir`, write `dsrlb.1` and a page per subcommand there.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The man pages, from the clap definitions.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    match dir {
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()).context("writing the man page"),
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            clap_mangen::generate_to(Cli::command(), d).with_context(|| format!("writing the man pages to {}", d.display()))
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // netlink-packet-route warns about every attribute a newer kernel adds; not ours to act on.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into())
                .add_directive("netlink_packet_route=error".parse().expect("a valid directive")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A CLI whose reader went away (`dsrlb status --json | head`) ends quietly, as Unix tools
        // do, instead of panicking on the broken pipe. The controller keeps ignoring SIGPIPE.
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let socket = control::socket_path(cli.socket.as_ref());
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "dsrlb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Decap { command } => cli::decap::run(command),
        Command::Run { config, stats_interval, metrics, socket_group } => {
            match (config::load(&config), parse_metrics(&metrics), group_id(socket_group.as_deref())) {
                (Err(e), _, _) => Err(anyhow::Error::new(e).context("invalid config; nothing was attached")),
                (_, Err(e), _) | (_, _, Err(e)) => Err(e),
                (Ok(cfg), Ok(metrics), Ok(group)) => {
                    let access = control::Access { group, read_only: false };
                    let opts = RunOptions {
                        config_path: config,
                        socket,
                        pin_dir: cli.pin_dir.clone(),
                        stats_every: stats_interval,
                        metrics,
                        access,
                    };
                    tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(controller::run(opts, cfg)))
                }
            }
        }
        Command::Status { json } => status(&socket).map(|s| {
            if json {
                println!("{}", serde_json::to_value(&s).and_then(|v| serde_json::to_string_pretty(&v)).unwrap_or_default());
            } else {
                print!("{}", cli::status::table(&s));
            }
        }),
        Command::Drain { backend } => message(&socket, &Request::Drain { backend }),
        Command::Undrain { backend } => message(&socket, &Request::Undrain { backend }),
        Command::Weight { backend, weight } => message(&socket, &Request::Weight { backend, weight }),
        Command::Reload => message(&socket, &Request::Reload),
        Command::Flow { client, vip, json } => answer::<FlowAnswer>(&socket, &Request::Flow { client, vip }).map(|a| {
            if json {
                println!("{}", serde_json::to_value(&a).unwrap_or_default());
            } else {
                println!("{}", cli::flow(&a));
            }
        }),
        Command::Stats { watch, json } => stats(&socket, watch, json),
        Command::Trace { listener, client, backend, verdict, sample, count, pcap, json, raw } => {
            let opts = cli::trace::Options { listener, backend, client, verdict, sample, count, pcap, json, raw };
            cli::trace::run(&socket, &opts, &mut std::io::stdout().lock()).map(|s| {
                eprintln!(
                    "dsrlb trace: {} frames shown, {} received{}",
                    s.shown,
                    s.received,
                    if s.lost > 0 { format!(", {} lost to a full trace buffer", s.lost) } else { String::new() }
                );
            })
        }
        Command::Stop => stop(&socket, &cli.pin_dir),
        Command::Ping => answer::<Pong>(&socket, &Request::Ping).map(|p| println!("ok: serving, program {}", p.program)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsrlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn request(socket: &std::path::Path, req: &Request) -> anyhow::Result<Value> {
    let resp = control::call(socket, req)?;
    if resp.ok { Ok(resp.data) } else { anyhow::bail!("{}", resp.error.unwrap_or_else(|| "failed".into())) }
}

fn message(socket: &std::path::Path, req: &Request) -> anyhow::Result<()> {
    let v = request(socket, req)?;
    println!("{}", v.as_str().unwrap_or(&v.to_string()));
    Ok(())
}

/// The controller's answer to `req`, as the type that request answers with.
fn answer<T: serde::de::DeserializeOwned>(socket: &std::path::Path, req: &Request) -> anyhow::Result<T> {
    serde_json::from_value(request(socket, req)?).with_context(|| format!("the controller's answer to dsrlb {}", req.name()))
}

/// The controller's status.
fn status(socket: &std::path::Path) -> anyhow::Result<Status> {
    answer(socket, &Request::Status)
}

fn stats(socket: &std::path::Path, watch: bool, json: bool) -> anyhow::Result<()> {
    // Bounded even with --watch: a day of refreshes at most.
    for i in 0..86_400u32 {
        let s = status(socket)?;
        if json {
            println!("{}", serde_json::json!({ "listeners": s.listeners, "verdicts": s.verdicts }));
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", cli::status::table(&s));
            let line: Vec<String> = s.verdicts.iter().filter(|(_, n)| **n != 0).map(|(k, n)| format!("{k} {n}")).collect();
            println!("verdicts: {}", line.join("  "));
        }
        if !watch {
            break;
        }
        if i > 0 || watch {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

/// The id of `--socket-group` `name` (a number is taken as an id).
fn group_id(name: Option<&str>) -> anyhow::Result<Option<u32>> {
    name.map(|n| config::group_id(n).map_err(|e| anyhow::anyhow!("--socket-group: {e}"))).transpose()
}

fn parse_metrics(s: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| anyhow::anyhow!("--metrics {s:?}: expected ADDRESS:PORT (e.g. 127.0.0.1:9877) or off"))
}

/// Asks a running controller to withdraw its VIPs, detach and unpin; with none running,
/// withdraws and removes the pins itself.
fn stop(socket: &std::path::Path, pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let link = pin_dir.join(dataplane::LINK_PIN);
    match control::call(socket, &Request::Stop) {
        Ok(resp) if resp.ok => {
            println!("{}", resp.data.as_str().unwrap_or("stopping"));
            // Wait for it to finish: it withdraws the VIPs and waits for the traffic to go (at
            // most `withdraw_wait`, 5 minutes at the most), then removes the pins, the link last.
            let deadline = std::time::Instant::now() + Duration::from_secs(330);
            let mut gone_since = None;
            while link.exists() && std::time::Instant::now() < deadline {
                // The controller removes its socket just before the pins; a socket gone for long
                // with the link still pinned means it died on the way.
                if socket.exists() {
                    gone_since = None;
                } else if gone_since.get_or_insert_with(std::time::Instant::now).elapsed() > Duration::from_secs(2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(resp) => anyhow::bail!("{}", resp.error.unwrap_or_default()),
        Err(e) if e.to_string().starts_with("no controller is running") => {
            let withdrawn = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(controller::withdraw_without_controller()))?;
            if withdrawn > 0 && link.exists() {
                // As the controller would: detach once the routers have moved the traffic away
                // (no frame forwarded for a second), or after the default withdraw_wait.
                println!("withdrew {withdrawn} VIP route(s); detaching once the traffic stops");
                let started = std::time::Instant::now();
                match dataplane::pinned_forwarded(pin_dir) {
                    Ok(first) => {
                        let (mut last, mut since) = (first, std::time::Instant::now());
                        while started.elapsed() < config::DEFAULT_WITHDRAW_WAIT && since.elapsed() < Duration::from_secs(1) {
                            std::thread::sleep(Duration::from_millis(100));
                            // A read that fails now counts as traffic: wait on, not detach early.
                            let now = dataplane::pinned_forwarded(pin_dir).unwrap_or(u64::MAX);
                            if now != last || now == u64::MAX {
                                (last, since) = (now, std::time::Instant::now());
                            }
                        }
                        let stopped = since.elapsed() >= Duration::from_secs(1);
                        println!(
                            "traffic {} after {:.1} s",
                            if stopped { "stopped" } else { "still came" },
                            started.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => {
                        println!(
                            "cannot read the pinned counters ({e:#}): waiting {} s for the routers instead",
                            config::DEFAULT_WITHDRAW_WAIT.as_secs()
                        );
                        std::thread::sleep(config::DEFAULT_WITHDRAW_WAIT);
                    }
                }
            }
            dataplane::unpin_all(pin_dir)?;
            println!("no controller was running; removed the pins in {}", pin_dir.display());
        }
        Err(e) => return Err(e),
    }
    anyhow::ensure!(!pin_dir.join(dataplane::LINK_PIN).exists(), "{} is still pinned", pin_dir.join(dataplane::LINK_PIN).display());
    println!("detached; nothing pinned in {}", pin_dir.display());
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(path)?;
    println!("{}: valid", path.display());
    if let Some(seed) = &cfg.ring_seed {
        // The digest, never the seed: the same on every node that holds the same seed.
        println!("ring seeded (ring_seed_file), seed digest {:016x}", seed.digest());
    }
    for l in &cfg.listeners {
        println!("listener {} {} hash={:?} backends {:?}", l.name, std::net::SocketAddr::new(l.vip, l.port), l.hash, l.backends);
    }
    for b in &cfg.backends {
        let mac = b.mac.map_or_else(|| "(from neighbour table)".to_owned(), config::format_mac);
        println!("backend {} {} {} weight {}", b.name, b.addresses(), mac, b.weight);
    }
    Ok(())
}
