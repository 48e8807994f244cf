//! `lab up|down|status|demo`: the DSR lab for people (`cargo xtask lab`, `cargo xtask run`).

use std::{
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use tests::lab::{self, Lab};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn demo(lab: &Lab, dsrlb: &str) -> anyhow::Result<()> {
    lab.up()?;
    let config = lab.state.join("dsrlb.toml");
    std::fs::write(&config, lab.config_tls_checked("check = \"mqtt\""))?;
    println!("lab up: {} brokers; config {}", lab.brokers, config.display());
    let client = lab.ns("client");
    println!("\nTry, in another terminal:");
    println!("  ip netns exec {client} mosquitto_sub -h {} -t 'demo/#' -v", lab::VIP);
    println!("  ip netns exec {client} mosquitto_pub -h {} -t demo/hello -m 'hi via DSR'", lab::VIP);
    println!(
        "  ip netns exec {client} mosquitto_pub -h {} -p 8883 --cafile {} -t demo/tls -m 'over TLS'",
        lab::VIP,
        lab.ca_pem().display()
    );
    println!(
        "  ip netns exec {client} mosquitto_pub -h {} -p {} -t demo/internal -m 'internal listener'",
        lab::VIP_INTERNAL,
        lab::INTERNAL_PORT
    );
    println!("Ctrl-C stops the balancer and tears the lab down.\n");

    // SAFETY: installing a handler that only stores to an atomic. The child resets it on exec
    // and gets the terminal's SIGINT itself.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("lb")))
        .args([dsrlb, "run", "--stats-interval", "1s", "--config"])
        .arg(&config)
        .spawn()
        .context("starting dsrlb")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    println!("\ndsrlb exited ({status}); detaching (dsrlb stop) and tearing the lab down");
    let _ = Command::new(dsrlb).args(["stop"]).status();
    lab.down()?;
    if !INTERRUPTED.load(Ordering::SeqCst) && !status.success() {
        anyhow::bail!("dsrlb failed ({status})");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lab = Lab::new("dsrlb", 2);
    let result = match args.first().map(String::as_str) {
        Some("up") => lab.up().map(|()| print!("{}", lab.status())),
        Some("down") => lab.down().map(|()| println!("lab down")),
        Some("status") => {
            print!("{}", lab.status());
            Ok(())
        }
        Some("demo") => match args.iter().position(|a| a == "--dsrlb").and_then(|i| args.get(i + 1)) {
            Some(bin) => demo(&lab, bin),
            None => Err(anyhow::anyhow!("demo needs --dsrlb PATH")),
        },
        _ => Err(anyhow::anyhow!("usage: lab up|down|status|demo --dsrlb PATH")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
