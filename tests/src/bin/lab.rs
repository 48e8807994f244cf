//! `lab up|down|status|demo [--nodes N] [--vrrp] [--routed]`: the DSR lab for people (`cargo
//! xtask lab`, `cargo xtask run`). With `--nodes 2` (or 3) the balancers are nodes behind a
//! router: BGP and ECMP (BIRD), or with `--vrrp` keepalived moving the VIPs' next hop. With
//! `--routed` the brokers but the first sit behind a router, reached over IPIP and GUE.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use tests::{
    lab::{self, Lab, Routing},
    netns::nsenter,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// `dsrlb run` in namespace `ns`, its output prefixed with `tag` when it has one.
fn spawn_dsrlb(dsrlb: &str, ns: &str, args: &[String], tag: Option<String>) -> anyhow::Result<Child> {
    let mut cmd = nsenter(ns, dsrlb);
    cmd.args(args);
    if tag.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().context("starting dsrlb")?;
    if let Some(tag) = tag {
        for stream in
            [child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as _)]
                .into_iter()
                .flatten()
        {
            let tag = tag.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("[{tag}] {line}");
                }
            });
        }
    }
    Ok(child)
}

/// What to try in the lab.
fn print_tips(lab: &Lab, dsrlb: &str) {
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
    if lab.routed.is_none() {
        println!("  ip netns exec {client} mosquitto_pub -h {} -t demo/hello -m 'hi over IPv6'", lab::VIP6);
        println!("Look at the balancer (the dsrlb this demo runs; as root):");
        println!("  {dsrlb} status                       # listeners, brokers, their state and flows");
        println!("  {dsrlb} stats --watch                # the counters, live");
        println!("  {dsrlb} flow {}:40000 {}:1883   # the broker a flow is pinned to, or would get", lab::CLIENT_ADDR, lab::VIP);
        println!("  {dsrlb} trace --listener mqtt -c 20  # what the data plane decides, frame by frame");
    }
    if lab.tunnelled {
        println!("Brokers b2 (IPIP) and b3 (GUE) sit behind the router {} (198.18.1.0/24):", lab::DC_ROUTER);
        println!("  ip netns exec {client} mosquitto_pub -h {} -t demo/ipip -m 'through IPIP to b2'", lab::VIP_IPIP);
        println!("  ip netns exec {client} mosquitto_pub -h {} -t demo/gue -m 'through GUE to b3'", lab::VIP_GUE);
        println!("  ip netns exec {client} mosquitto_pub -h {} -t demo/gue6 -m 'GUE over IPv6'", lab::VIP6_GUE);
        println!("  bpftool map dump pinned {}/REAL_TUNNELS   # each tunnelled real: broker, mode, MTU", lab.pin_dir().display());
        for i in 1..lab.brokers {
            println!(
                "  nsenter --net=/run/netns/{} {dsrlb} decap status --pin-root {}   # b{}'s decap counters",
                lab.broker_ns(i),
                lab.decap_pin_root(i).display(),
                i + 1
            );
        }
        println!("  ip netns exec {} tcpdump -ni eth1 'ip proto 4 or udp port 6080'   # the tunnels on the router", lab.ns("dc"));
    }
    if let Some((nodes, routing)) = lab.routed {
        println!("  ip -n {} route show {}          # the router's path(s) to the VIP", lab.ns("router"), lab::VIP);
        for i in 0..nodes {
            println!("  {dsrlb} --socket {} status", lab.node_dir(i).join("control.sock").display());
        }
        if routing == Routing::Bgp {
            println!("  birdc -s {} show protocols", lab.state.join("router/bird.ctl").display());
        }
    }
}

fn demo(lab: &Lab, dsrlb: &str) -> anyhow::Result<()> {
    lab.up()?;
    let config = lab.state.join("dsrlb.toml");
    // The single-balancer lab is dual-stack: IPv4 and IPv6 listeners, dual-stack brokers.
    // (The tunnelled lab's config checks its TLS listeners already.)
    let text = if lab.tunnelled {
        lab.config_tunnelled("check = \"mqtt\"")
    } else if lab.routed.is_some() {
        lab.tls_checked(&lab.config("check = \"mqtt\""))
    } else {
        lab.tls_checked(&lab.config_dual("check = \"mqtt\""))
    };
    std::fs::write(&config, text)?;
    println!("lab up: {} brokers; config {}", lab.brokers, config.display());
    print_tips(lab, dsrlb);
    println!("Ctrl-C stops the balancers and tears the lab down.\n");

    // SAFETY: installing a handler that only stores to an atomic. The children reset it on
    // exec and get the terminal's SIGINT themselves.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut children: Vec<(Child, Vec<String>)> = Vec::new();
    if lab.routed.is_some() {
        for i in 0..lab.nodes() {
            let dir = lab.node_dir(i);
            std::fs::create_dir_all(&dir)?;
            let socket = dir.join("control.sock");
            let common = vec![
                "--socket".to_owned(),
                socket.display().to_string(),
                "--pin-dir".to_owned(),
                lab.node_pin_dir(i).display().to_string(),
            ];
            let mut args = common.clone();
            args.extend(["run", "--stats-interval", "1s", "--config"].map(str::to_owned));
            args.push(config.display().to_string());
            children.push((spawn_dsrlb(dsrlb, &lab.node_ns(i), &args, Some(format!("lb{}", i + 1)))?, common));
            if let Some((_, Routing::Vrrp)) = lab.routed {
                lab.start_keepalived(i, std::path::Path::new(dsrlb), &socket)?;
            }
        }
    } else {
        let args: Vec<String> =
            ["run", "--stats-interval", "1s", "--config"].map(str::to_owned).into_iter().chain([config.display().to_string()]).collect();
        children.push((spawn_dsrlb(dsrlb, &lab.ns("lb"), &args, None)?, Vec::new()));
    }
    let mut failed = None;
    while children.iter_mut().any(|(c, _)| c.try_wait().ok().flatten().is_none()) {
        if let Some((i, status)) = children.iter_mut().enumerate().find_map(|(i, (c, _))| c.try_wait().ok().flatten().map(|s| (i, s)))
            && !INTERRUPTED.load(Ordering::SeqCst)
            && failed.is_none()
        {
            failed = Some(format!("dsrlb {} exited ({status})", i + 1));
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            for (c, _) in &children {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(i32::try_from(c.id()).expect("pid"), libc::SIGTERM) };
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("\ndsrlb exited; detaching (dsrlb stop) and tearing the lab down");
    for (i, (_, common)) in children.iter().enumerate() {
        let ns = if lab.routed.is_some() { lab.node_ns(i) } else { lab.ns("lb") };
        let _ = nsenter(&ns, dsrlb).args(common).arg("stop").status();
    }
    lab.down()?;
    if let Some(why) = failed {
        anyhow::bail!(why);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nodes = args.iter().position(|a| a == "--nodes").and_then(|i| args.get(i + 1)).map(|n| n.parse::<usize>());
    let routing = if args.iter().any(|a| a == "--vrrp") { Routing::Vrrp } else { Routing::Bgp };
    let lab = match nodes {
        _ if args.iter().any(|a| a == "--routed") => Lab::tunnelled("dsrlb", 3),
        None | Some(Ok(1)) => Lab::new("dsrlb", 2),
        Some(Ok(n @ 2..=3)) => Lab::routed("dsrlb", 2, n, routing),
        Some(_) => {
            eprintln!("lab: --nodes takes 1, 2 or 3");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("up") => lab.up().map(|()| print!("{}", lab.status())),
        Some("down") => {
            // Whatever kind of lab is up.
            let _ = Lab::routed("dsrlb", 2, 3, Routing::Bgp).down();
            let _ = Lab::tunnelled("dsrlb", 3).down();
            Lab::new("dsrlb", 2).down().map(|()| println!("lab down"))
        }
        Some("status") => {
            print!("{}", lab.status());
            Ok(())
        }
        Some("demo") => match args.iter().position(|a| a == "--dsrlb").and_then(|i| args.get(i + 1)) {
            Some(bin) => demo(&lab, bin),
            None => Err(anyhow::anyhow!("demo needs --dsrlb PATH")),
        },
        _ => Err(anyhow::anyhow!("usage: lab up|down|status|demo --dsrlb PATH [--nodes 2|3] [--vrrp] [--routed]")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
