//! `dsrlb`: the XDP direct-server-return balancer for MQTT brokers.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{config, controller};

#[derive(Parser)]
#[command(name = "dsrlb", version, about = "XDP direct-server-return load balancer for MQTT brokers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the balancer, fill its maps from the config, and serve until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Print per-backend new flows and packets at this interval (e.g. 1s).
        #[arg(long, value_parser = parse_interval)]
        stats_interval: Option<std::time::Duration>,
    },
    /// Validate a config and print what it would serve (MACs not resolved are shown as such).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, stats_interval } => match config::load(&config) {
            Err(e) => Err(anyhow::Error::new(e).context("invalid config; nothing was attached")),
            Ok(cfg) => tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(controller::run(cfg, stats_interval))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsrlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s)
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(path)?;
    println!("{}: valid", path.display());
    for l in &cfg.listeners {
        println!("listener {} {}:{} hash={:?} backends {:?}", l.name, l.vip, l.port, l.hash, l.backends);
    }
    for b in &cfg.backends {
        let mac = b.mac.map_or_else(|| "(from neighbour table)".to_owned(), config::format_mac);
        println!("backend {} {} {} weight {}", b.name, b.address, mac, b.weight);
    }
    Ok(())
}
