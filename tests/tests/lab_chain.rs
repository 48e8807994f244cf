//! Living beside another XDP program: xdp-filter (xdp-tools) is loaded on the balancer's
//! interface first, with a rule that drops TCP to port 2222; dsrlb, given xdp-filter's pinned
//! program as `next_program`, takes the interface over and hands it every frame it passes. VIP
//! traffic is balanced, what the filter blocks among the rest is blocked, what it allows
//! arrives, and all of it holds across a controller restart and a `kill -9` and restart.

use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use tests::{
    balancer::Balancer,
    client::MqttConn,
    lab::{LB_ADDR, LabGuard, VIP},
    netns::{in_netns, nsenter},
    require_root, wait,
};

const BLOCKED: u16 = 2222;
const ALLOWED: u16 = 2223;
const FILTER_PINS: &str = "/sys/fs/bpf/xdp-filter";

/// `xdp-filter ARGS` in the balancer's namespace, with the host's bpffs (where it pins).
fn xdp_filter(ns: &str, args: &[&str]) -> Output {
    nsenter(ns, "xdp-filter").args(args).output().expect("xdp-filter runs (cargo xtask setup installs xdp-tools)")
}

/// libxdp's lock directory, made by xdp-filter's first run.
const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

/// Unloads xdp-filter and removes its pins (and libxdp's directory when the test made it),
/// however the test ends.
struct FilterGuard {
    ns: String,
    made_libxdp_dir: bool,
}

impl Drop for FilterGuard {
    fn drop(&mut self) {
        let _ = xdp_filter(&self.ns, &["unload", "eth0"]);
        let _ = std::fs::remove_dir_all(FILTER_PINS);
        if self.made_libxdp_dir {
            let _ = std::fs::remove_dir(LIBXDP_DIR);
        }
    }
}

/// The one program xdp-filter pinned for `eth0`.
fn filter_program() -> PathBuf {
    let dir = Path::new(FILTER_PINS).join("programs/eth0");
    let pins: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("xdpfilt")))
        .collect();
    assert_eq!(pins.len(), 1, "xdp-filter's program pins: {pins:?}");
    pins[0].clone()
}

/// The id of the XDP program on the balancer's `eth0`.
fn attached_id(ns: &str) -> u32 {
    in_netns(ns, || lb_userspace::dataplane::chain::attached("eth0")).expect("lb namespace").expect("netlink").map_or(0, |a| a.prog_id)
}

/// Whether TCP from the client reaches the balancer host's own `port`.
fn reaches(lab: &LabGuard, port: u16) -> bool {
    in_netns(&lab.ns("client"), || TcpStream::connect_timeout(&SocketAddr::from((LB_ADDR, port)), Duration::from_millis(700)).is_ok())
        .expect("client namespace")
}

/// VIP traffic is balanced over both brokers; TCP to the balancer's own address reaches it on
/// the port the filter allows and not on the one it blocks.
fn check(lab: &LabGuard, round: &str) {
    let prefix = format!("chain-{round}");
    in_netns(&lab.ns("client"), || {
        for i in 0..40 {
            MqttConn::connect(None, SocketAddrV4::new(VIP, 1883), &format!("{prefix}-{i}"), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{round}: {prefix}-{i} through the VIP: {e}"))
                .disconnect();
        }
        let to = |port: u16| TcpStream::connect_timeout(&SocketAddr::from((LB_ADDR, port)), Duration::from_millis(700));
        assert!(to(ALLOWED).is_ok(), "{round}: TCP to the balancer's port {ALLOWED} (passed by dsrlb, allowed by the filter)");
        let blocked = to(BLOCKED);
        assert!(
            blocked.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
            "{round}: TCP to port {BLOCKED} must be dropped by the filter (no answer): {blocked:?}"
        );
    })
    .expect("client namespace");
    let landed = lab.landed(&prefix, 40);
    assert_eq!(landed.iter().sum::<usize>(), 40, "{round}: {landed:?}");
    assert!(landed.iter().all(|&n| n > 0), "{round}: both brokers take VIP connections: {landed:?}");
}

#[test]
fn xdp_filter_runs_after_the_balancer_on_one_interface_and_both_survive_restarts() {
    require_root!();
    let lab = LabGuard::up(2);
    let ns = lab.ns("lb");
    assert!(!Path::new(FILTER_PINS).exists(), "{FILTER_PINS} exists: another xdp-filter runs on this host");
    let _filter = FilterGuard { ns: ns.clone(), made_libxdp_dir: !Path::new(LIBXDP_DIR).exists() };
    let out = xdp_filter(&ns, &["load", "-m", "native", "eth0"]);
    assert!(out.status.success(), "xdp-filter load: {}", String::from_utf8_lossy(&out.stderr));
    let out = xdp_filter(&ns, &["port", "-m", "dst", "-p", "tcp", &BLOCKED.to_string()]);
    assert!(out.status.success(), "xdp-filter port: {}", String::from_utf8_lossy(&out.stderr));
    let pin = filter_program();
    let filter_id = attached_id(&ns);
    assert_ne!(filter_id, 0, "xdp-filter is attached to eth0");
    // Services on the balancer host itself: what dsrlb passes and the filter judges.
    let _listeners: Vec<TcpListener> = in_netns(&ns, || {
        [BLOCKED, ALLOWED].iter().map(|&p| TcpListener::bind((LB_ADDR, p)).expect("a listener on the balancer")).collect()
    })
    .expect("lb namespace");

    // Without next_program the balancer refuses the interface, naming what runs there.
    let plain = lab.config("check = \"none\"");
    let path = lab.state.join("chain-refused.toml");
    std::fs::write(&path, &plain).expect("config");
    let refused = nsenter(&ns, "timeout")
        .arg("20")
        .arg(tests::dsrlb_bin())
        .args(["--socket"])
        .arg(lab.state.join("refused.sock"))
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .args(["run", "--metrics", "off", "--config"])
        .arg(&path)
        .output()
        .expect("dsrlb run");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains(&format!("eth0 already runs XDP program {filter_id}")), "{err}");
    assert_eq!(attached_id(&ns), filter_id, "the refused start left the filter in place");

    let config = plain.replacen("xdp_mode = \"native\"\n", &format!("xdp_mode = \"native\"\nnext_program = \"{}\"\n", pin.display()), 1);
    let mut lb = Balancer::start(&lab, &config);
    let status = lb.status();
    assert_eq!(status.next_program.as_ref().map(|p| p.id), Some(filter_id), "{status:?}");
    assert_ne!(attached_id(&ns), filter_id, "dsrlb runs on eth0 now");
    check(&lab, "first");

    // A restart: the new controller's program takes over the pinned link with its own NEXT.
    let before = attached_id(&ns);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(i32::try_from(lb.child.id()).expect("pid"), libc::SIGTERM) };
    let _ = lb.child.wait();
    // No controller: forwarding goes on from the pins, and so does the chain.
    check(&lab, "no-controller");
    lb.restart(&lab);
    wait::until("the restarted controller's program", Duration::from_secs(10), || attached_id(&ns) != before);
    check(&lab, "restarted");

    lb.kill9();
    lb.restart(&lab);
    check(&lab, "kill9");
    assert_eq!(lb.status().next_program.map(|p| p.id), Some(filter_id));

    // A reload without next_program: passed frames go to the kernel, the filter sees none.
    let reload = |text: &str| {
        std::fs::write(&lb.config, text).expect("config");
        lb.cli(&["reload"])
    };
    let (ok, _, err) = reload(&plain);
    assert!(ok, "reload: {err}");
    assert!(lb.status().next_program.is_none());
    assert!(reaches(&lab, BLOCKED), "without next_program the filter is not consulted");
    // A pin that is not there: refused by name, nothing changes.
    let (ok, out, err) = reload(&config.replace(&pin.display().to_string(), "/sys/fs/bpf/no-such-program"));
    assert!(!ok && err.contains("next_program: no BPF program pinned at /sys/fs/bpf/no-such-program"), "{out}{err}");
    assert!(lb.status().next_program.is_none());
    assert!(reaches(&lab, BLOCKED), "the refused reload left the last good state");
    // Back: the filter judges again.
    let (ok, _, err) = reload(&config);
    assert!(ok, "reload: {err}");
    check(&lab, "reloaded");
    // `dsrlb stop` gives the interface back to the filter.
    lb.stop_for_good();
    wait::until("the filter back on eth0", Duration::from_secs(5), || attached_id(&ns) == filter_id);
    assert!(reaches(&lab, ALLOWED) && !reaches(&lab, BLOCKED), "the filter judges the host's traffic again");
}
