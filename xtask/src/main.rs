//! `cargo xtask`: set-up, run, lab, test and bench. It orchestrates cargo and the lab; it does
//! not depend on the crates it builds, so `setup` works before bpf-linker exists.

mod arm64;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build, bring up the demo lab, and run the balancer in it; or, with `-- --config FILE`,
    /// run the controller on this host as a deployment would.
    Run {
        /// Balancer nodes in the demo lab: 1, or 2-3 behind a router (BGP and ECMP with BIRD).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
        /// With --nodes 2: active/standby with keepalived (VRRP) instead of BGP.
        #[arg(long)]
        vrrp: bool,
        /// Brokers in another subnet behind a router: b1 on the balancer's segment, b2 over
        /// IPIP and b3 over GUE, each with `dsrlb decap` (L3 direct server return).
        #[arg(long, conflicts_with_all = ["nodes", "vrrp"])]
        routed: bool,
        /// Arguments for `dsrlb run` (e.g. `-- --config /etc/dsrlb.toml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The demo lab: network namespaces, a bridge, mosquitto brokers (and with --nodes, a
    /// router and balancer nodes).
    Lab {
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
        #[arg(long)]
        vrrp: bool,
        /// The brokers but the first behind a router, over IPIP and GUE (see `run --routed`).
        #[arg(long, conflicts_with_all = ["nodes", "vrrp"])]
        routed: bool,
    },
    /// Everything: unit tests, packet fixtures, netns and lab tests (root).
    Test {
        /// Extra arguments for `cargo test` (a test name filter, `--test NAME`), then after
        /// another `--` for the test harness (`--nocapture`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The packet fixtures, the flow table's tests, the controller's unit tests and a small netns
    /// lab on an arm64 kernel (Debian unstable's) in qemu-system-aarch64, with two vCPUs (root;
    /// `cargo xtask test` runs it).
    TestArm64,
    /// The soak: 100,000 MQTT sessions held for 60 minutes through two dsrlb nodes with
    /// `[cluster]` (ECMP over BGP) while a broker is added, one drained, one stopped and started
    /// again, 10,000 clients vanish without a FIN, a controller is restarted, killed and
    /// reloaded, and node 2 fails and comes back; writes bench/soak.md and bench/soak.svg
    /// (`--nodes 1`: one balancer, bench/soak-1node.*; root; not part of `test`, which runs
    /// 2-minute smokes of it).
    Soak {
        /// Arguments for `bench soak` (`--sessions N --minutes M --processes P --ping-secs A-B
        /// --sample-secs S --reload-minutes R --churn-per-sec C --vanish N --lab NAME
        /// --nodes 1|2`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks: dsrlb, HAProxy, direct and the XDP floor in the lab, and the XDP data plane
    /// against the floor program; writes bench/report.md and plots.
    Bench,
    /// The Debian package, target/debian/dsrlb_VERSION_amd64.deb (cargo-deb), checked by lintian;
    /// with `--arch arm64`, target/debian-arm64/dsrlb_VERSION_arm64.deb, cross-built.
    Package {
        #[arg(long, default_value = "amd64", value_parser = ["amd64", "arm64"])]
        arch: String,
    },
    /// `test`'s release builds (both packages, the arm64 test binaries), run by `test` itself at
    /// the lowest CPU priority beside the x86 tests.
    #[command(hide = true)]
    ReleaseBuilds,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn exec(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let status = Command::new(bin).args(args).current_dir(root()).status().with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("{} {} failed ({status})", bin.display(), args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF, network namespaces): run it with sudo or as root");
    }
    Ok(())
}

/// The lab binary's arguments for a lab of `nodes` (and VRRP), or the routed brokers' lab.
fn lab_kind(nodes: u8, vrrp: bool, routed: bool) -> Vec<String> {
    let mut v = vec!["--nodes".to_owned(), nodes.to_string()];
    if vrrp {
        v.push("--vrrp".to_owned());
    }
    if routed {
        v.push("--routed".to_owned());
    }
    v
}

fn run(nodes: u8, vrrp: bool, routed: bool, args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    require_root("cargo xtask run")?;
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "tests", "--bins"])?;
    let target = root().join("target/release");
    if args.is_empty() {
        // The demo: the lab binary brings the lab up, runs dsrlb in it, and tears down on Ctrl-C.
        let mut full = vec!["demo".to_owned(), "--dsrlb".to_owned(), target.join("dsrlb").display().to_string()];
        full.extend(lab_kind(nodes, vrrp, routed));
        exec(&target.join("lab"), &full)
    } else {
        let mut full = vec!["run".to_owned()];
        full.extend_from_slice(args);
        exec(&target.join("dsrlb"), &full)
    }
}

fn lab(action: &str, nodes: u8, vrrp: bool, routed: bool) -> anyhow::Result<()> {
    setup::setup()?;
    require_root("cargo xtask lab")?;
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "tests", "--bins"])?;
    let mut full = vec![action.to_owned()];
    full.extend(lab_kind(nodes, vrrp, routed));
    exec(&root().join("target/release/lab"), &full)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    // The packet, netns and lab tests need root (BPF, namespaces): without it they could only
    // be skipped, and a skipped test that reports "ok" would lie.
    require_root("cargo xtask test")?;
    setup::setup()?;
    // Formatting is a tool's job, checked like any test.
    cargo(&["fmt", "--all", "--", "--check"]).context("the tree is not formatted: run `cargo fmt --all`")?;
    // The upgrade test swaps in a second, different build of the program: `dsrlb-upgrade`.
    cargo(&["build", "-p", "lb-userspace", "--features", "upgrade-test", "--bin", "dsrlb"])?;
    let debug = root().join("target/debug");
    std::fs::copy(debug.join("dsrlb"), debug.join("dsrlb-upgrade")).context("keeping the upgrade-test build as dsrlb-upgrade")?;
    // Integration tests start the real binaries, from the same (debug) profile as themselves.
    cargo(&["build", "-p", "lb-userspace", "-p", "tests", "--bins"])?;
    if !args.is_empty() {
        // `cargo xtask test -- CARGO_ARGS -- HARNESS_ARGS`, e.g. `-- --test lab_ha -- --nocapture`.
        // The package tests unpack the .deb and run what is in it.
        package_arm64()?;
        let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
        let mut full: Vec<&str> = vec!["test", "--workspace", "--exclude", "lb-ebpf", "--no-fail-fast"];
        full.extend(args[..split].iter().map(String::as_str));
        // Netns and lab tests share names and the machine: one at a time.
        full.extend(["--", "--test-threads=1"]);
        full.extend(args.get(split + 1..).unwrap_or_default().iter().map(String::as_str));
        return cargo(&full);
    }
    // The release builds (both packages and the arm64 test binaries, 13 minutes of compiling
    // on two CPUs) run beside the x86 tests, which mostly wait on namespaces, daemons and
    // timers; at the idle priority they take only the CPU the tests leave.
    let release = ReleaseBuilds::start()?;
    // lb-ebpf builds for the BPF target only, through lb-userspace's build script.
    let units = cargo(&["test", "--workspace", "--exclude", "lb-ebpf", "--exclude", "tests", "--no-fail-fast", "--", "--test-threads=1"]);
    // The tests crate's tests but the package's, which need the packages.
    let mut tests: Vec<String> = ["test", "-p", "tests", "--lib", "--bins", "--no-fail-fast"].map(String::from).to_vec();
    for t in test_targets()?.into_iter().filter(|t| t != "package") {
        tests.extend(["--test".to_owned(), t]);
    }
    // Netns and lab tests share names and the machine: one at a time.
    tests.extend(["--".to_owned(), "--test-threads=1".to_owned()]);
    let lab = cargo(&tests.iter().map(String::as_str).collect::<Vec<_>>());
    let doc = cargo(&["test", "-p", "tests", "--doc", "--", "--test-threads=1"]);
    // The packet fixtures once more, against the object for weakly ordered CPUs (BPF ISA v4,
    // load-acquire and store-release): it verifies and behaves alike on this kernel.
    let ordered = ordered_fixtures();
    let built = release.wait();
    // The package tests unpack the .debs and run what is in them; then, on an arm64 kernel,
    // emulated, the tests cross-built above.
    let packaged = built.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|()| cargo(&["test", "-p", "tests", "--test", "package"]));
    let arm64 = built.and_then(|()| arm64::test_arm64());
    units.and(lab).and(doc).and(ordered).and(packaged).and(arm64)
}

/// The tests crate's integration tests, by name, as cargo sees them (`cargo metadata`).
fn test_targets() -> anyhow::Result<Vec<String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading cargo metadata")?;
    let tests = meta["packages"].as_array().into_iter().flatten().find(|p| p["name"] == "tests").context("no package `tests`")?;
    let mut names: Vec<String> = tests["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")))
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    ensure!(names.iter().any(|n| n == "package"), "the tests crate has no `package` test: {names:?}");
    Ok(names)
}

/// The release builds' process group, while they run: `test`'s signal handler stops it.
static RELEASE_GROUP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// On SIGINT, SIGTERM or SIGHUP: stops the release builds' group ([`RELEASE_GROUP`], when one
/// runs), then ends the process as the signal would have (the handler is reset as it runs).
extern "C" fn stop_release_group(signal: libc::c_int) {
    let group = RELEASE_GROUP.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: kill and raise are async-signal-safe.
    unsafe {
        // Never `kill(0, ..)` or `kill(-1, ..)`: only a group of our own making.
        if group > 1 {
            libc::kill(-group, libc::SIGTERM);
        }
        libc::raise(signal);
    }
}

/// Installs [`stop_release_group`] for SIGINT, SIGTERM and SIGHUP, once each.
fn on_termination_stop_release_group() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = stop_release_group as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND;
            // The others wait while one is handled: the process ends by the first.
            libc::sigemptyset(&raw mut action.sa_mask);
            for other in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&raw mut action.sa_mask, other);
            }
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}

/// `cargo xtask release-builds`, started by `test` in a process group of its own at the idle
/// CPU priority, its output in `target/release-builds.log`. It stops with `test`: on a signal
/// to `test` (its handler stops the group), when `test` dies (the child's parent-death signal,
/// which it passes on to its group), and when dropped before `wait`.
struct ReleaseBuilds {
    child: Option<std::process::Child>,
    log: PathBuf,
    started: std::time::Instant,
}

impl ReleaseBuilds {
    fn start() -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let log = root().join("target/release-builds.log");
        std::fs::create_dir_all(root().join("target"))?;
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(std::env::current_exe().context("this xtask's own path")?);
        cmd.arg("release-builds").current_dir(root()).stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: setpgid, setpriority, sched_setscheduler, prctl and getppid are
        // async-signal-safe and touch only the new process.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0
                    || libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // A parent gone before the death signal was set would never send it.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("xtask test ended while starting the release builds"));
                }
                // Only the CPU no other task wants; nice 19 alone, should the kernel refuse.
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param);
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the release builds")?;
        RELEASE_GROUP.store(i32::try_from(child.id()).unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
        on_termination_stop_release_group();
        eprintln!("xtask: the release builds run beside the tests at the idle priority (pid {}; log {})", child.id(), log.display());
        Ok(Self { child: Some(child), log, started: std::time::Instant::now() })
    }

    fn wait(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("waited once");
        // Ended but not reaped (its group id is still ours): the handler stops signalling it
        // before the id can be reused.
        // SAFETY: a zeroed siginfo is valid for waitid to fill.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, child.id(), &raw mut info, libc::WEXITED | libc::WNOWAIT);
        }
        RELEASE_GROUP.store(0, std::sync::atomic::Ordering::SeqCst);
        let status = child.wait().context("waiting for the release builds")?;
        let secs = self.started.elapsed().as_secs();
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            bail!("the release builds failed after {secs} s ({status}); their log is {}", self.log.display());
        }
        // What lintian said of the packages, and where they are.
        for line in
            text.lines().filter(|l| l.starts_with("xtask: ") || l.get(..3).is_some_and(|t| matches!(t, "E: " | "W: " | "I: " | "N: ")))
        {
            eprintln!("{line}");
        }
        eprintln!("xtask: the release builds finished in {secs} s; their log is {}", self.log.display());
        Ok(())
    }
}

impl Drop for ReleaseBuilds {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            RELEASE_GROUP.store(0, std::sync::atomic::Ordering::SeqCst);
            // The child leads its own group: cargo and rustc go with it.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(-pid, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
    }
}

/// What `ReleaseBuilds` runs: the packages, then the arm64 test binaries. A termination signal
/// (also `test`'s death, through the parent-death signal) stops its whole group.
fn release_builds() -> anyhow::Result<()> {
    // The group is this process's own: `test` made it lead one.
    // SAFETY: getpid and getpgrp have no preconditions.
    let (pid, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    if pid == group {
        RELEASE_GROUP.store(group, std::sync::atomic::Ordering::SeqCst);
        on_termination_stop_release_group();
    }
    package_arm64()?;
    arm64::cross_build().map(drop)
}

/// The packet fixtures with `DSRLB_TEST_OBJECT=ordered` (see `tests/src/fixture.rs`).
fn ordered_fixtures() -> anyhow::Result<()> {
    let mut args = vec!["test", "-p", "tests"];
    for t in ["xdp_fixtures", "xdp_ipv6", "xdp_edge", "xdp_fuzz", "xdp_cluster", "xdp_tunnel", "xdp_events", "xdp_trace", "xdp_ring_seed"] {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--test-threads=1"]);
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .env("DSRLB_TEST_OBJECT", "ordered")
        .current_dir(root())
        .status()
        .context("starting cargo test for the ordered object")?;
    if !status.success() {
        bail!("the packet fixtures against the ordered object failed ({status})");
    }
    Ok(())
}

/// Builds the Debian package: the release binary (the XDP object inside), its man pages and
/// completions (written by the binary from its own CLI definition), then `cargo deb`, then
/// lintian, which must report no error. Returns the package's path.
fn package() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "lb-userspace", "--bin", "dsrlb"])?;
    let root = root();
    let dsrlb = root.join("target/release/dsrlb");
    let assets = root.join("target/debian-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let man = assets.join("man");
    let status = Command::new(&dsrlb).arg("man").arg("--dir").arg(&man).status().context("running dsrlb man")?;
    if !status.success() {
        bail!("dsrlb man --dir {} failed", man.display());
    }
    let completions = assets.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [("bash", "dsrlb"), ("zsh", "_dsrlb"), ("fish", "dsrlb.fish")] {
        let out = Command::new(&dsrlb).args(["completions", shell]).output().context("running dsrlb completions")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("dsrlb completions {shell} failed");
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    deb_and_lintian(&root.join("target/debian"), None)
}

/// The Rust target of the arm64 package, and the Debian cross tools it is built with.
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";

/// The arm64 package: the userspace binary cross-built with the nightly toolchain's
/// `-Z build-std` (no other target's std can be fetched here) and Debian's
/// `gcc-aarch64-linux-gnu` as linker and C compiler; the XDP objects inside are built from the
/// same source (BPF is architecture-neutral; aya's `bpf_target_arch` is aarch64 there, and on
/// arm64 the controller loads `dsrlb-ordered`). Man pages and completions come from the host
/// build: the CLI is the same.
fn package_arm64() -> anyhow::Result<PathBuf> {
    package()?;
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--release", "-p", "lb-userspace", "--bin", "dsrlb", "--target", ARM64_TARGET])
        .args(["-Z", "build-std=std,panic_abort"])
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        .current_dir(root())
        .status()
        .context("starting the arm64 cross-build")?;
    if !status.success() {
        bail!("cross-building dsrlb for {ARM64_TARGET} failed ({status})");
    }
    deb_and_lintian(&root().join("target/debian-arm64"), Some(ARM64_TARGET))
}

/// `cargo deb` of the built binary into `debian` (for `target`, or the host), then lintian,
/// which must report no error. Returns the package's path.
fn deb_and_lintian(debian: &Path, target: Option<&str>) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(debian);
    let out = debian.display().to_string();
    let mut args = vec!["deb", "-p", "lb-userspace", "--no-build", "--output", &out];
    if let Some(t) = target {
        args.extend(["--target", t]);
    }
    cargo(&args)?;
    let deb = std::fs::read_dir(debian)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb wrote no .deb")?;
    let lintian =
        Command::new("lintian").args(["--fail-on", "error", "--tag-display-limit", "0"]).arg(&deb).output().context("running lintian")?;
    let report = format!("{}{}", String::from_utf8_lossy(&lintian.stdout), String::from_utf8_lossy(&lintian.stderr));
    eprint!("{report}");
    if !lintian.status.success() {
        bail!("lintian reports errors on {}", deb.display());
    }
    eprintln!("xtask: {}", deb.display());
    Ok(deb)
}

fn bench() -> anyhow::Result<()> {
    setup::setup()?;
    require_root("cargo xtask bench")?;
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "tests", "--bins"])?;
    let out = root().join("bench");
    exec(&root().join("target/release/bench"), &[out.display().to_string()])
}

fn soak(args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    require_root("cargo xtask soak")?;
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "tests", "--bins"])?;
    let mut full = vec!["soak".to_owned(), "--out".to_owned(), root().join("bench").display().to_string()];
    full.extend_from_slice(args);
    exec(&root().join("target/release/bench"), &full)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Run { nodes, vrrp, routed, args } => run(nodes, vrrp, routed, &args),
        Cmd::Lab { action, nodes, vrrp, routed } => lab(&action, nodes, vrrp, routed),
        Cmd::Test { args } => test(&args),
        Cmd::TestArm64 => require_root("cargo xtask test-arm64").and_then(|()| setup::setup()).and_then(|()| arm64::test_arm64()),
        Cmd::Soak { args } => soak(&args),
        Cmd::Bench => bench(),
        Cmd::ReleaseBuilds => release_builds(),
        Cmd::Package { arch } => setup::setup().and_then(|()| if arch == "arm64" { package_arm64() } else { package() }).map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
