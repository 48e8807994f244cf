//! `cargo xtask test-arm64`: the packet fixtures, the flow table's tests (its concurrent stress
//! test on two vCPUs among them), the controller's unit tests and a small netns lab, run on a
//! real arm64 kernel in `qemu-system-aarch64` (TCG, two vCPUs on their own host threads, so that
//! the two writers really run at once).
//!
//! - **Kernel**: whatever `linux-image-arm64` depends on in Debian's unstable suite for arm64
//!   (7.2 on 2026-12-06), fetched with apt under `target/arm64-vm/apt`: its own configuration,
//!   sources, lists and cache (`APT_CONFIG` and `Dir::Etc::*` point there, so neither the host's
//!   apt state nor its apt.conf.d settings and hooks are used), signed lists only. The version
//!   used is printed; the suite moves, so a later run may boot a later kernel. The kernel is booted as it is; its modules
//!   (llc, stp, bridge, veth) are loaded from its own package.
//! - **Userland**: an initramfs made here: Debian's arm64 `busybox-static` for the shell and
//!   `nsenter`, `iproute2` and `ethtool` with the libraries they and the test binaries link
//!   (`libc6`, `libgcc-s1`, ...), all from the same suite; then the test binaries, cross-built
//!   like the arm64 package (nightly `-Z build-std`, `gcc-aarch64-linux-gnu`), and `dsrlb`.
//! - **What it proves**: the ordered object verifies, is JIT-compiled and gives every verdict
//!   and counter the fixtures check on arm64; the table's slots stay whole under two writers;
//!   the controller attaches, checks and forwards there. **What it cannot**: that no race
//!   exists under load on real weakly ordered hardware (TCG is not a Neoverse core); the model
//!   check (`tests/model`) covers the protocol for every interleaving. On an x86-64 host, TCG
//!   runs the guest's loads and stores as the host's, in x86's order: a missing acquire or
//!   release would most likely pass here.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{ARM64_TARGET, root};

/// The test binaries run in the guest, with their harness arguments. Two tests at a time: the
/// verifier's work on one program is most of each packet test's time here.
const TESTS: &[(&str, &[&str])] = &[
    // Every verdict and counter, the flow table's replacement rules and its two-CPU stress test.
    ("xdp_fixtures", &["--test-threads=2"]),
    // IPv6 flows: FLOW_ADDRS6, the part of a slot the protocol orders separately.
    ("xdp_ipv6", &["--test-threads=2"]),
    // The controller's merges and walks of the table from userspace over mmap.
    ("xdp_cluster", &["--test-threads=2"]),
    // `dsrlb run` on a bridge in front of two stand-in servers, a few hundred connections.
    ("netns_segment", &["--test-threads=1"]),
];

/// Debian's packages for the guest's userland (unstable, arm64).
const USERLAND: &[&str] = &[
    "busybox-static",
    "iproute2",
    "ethtool",
    "libc6",
    "libgcc-s1",
    "libbpf1",
    "libelf1t64",
    "libmnl0",
    "libcap2",
    "libselinux1",
    "libpcre2-8-0",
    "zlib1g",
    "libzstd1",
];

/// busybox applets the guest's init and the tests use (the rest comes from Debian's packages).
const APPLETS: &[&str] = &["sh", "mount", "mkdir", "cat", "echo", "insmod", "poweroff", "uname", "nproc", "nsenter", "grep", "true"];

/// The kernel's modules the lab needs, in load order (paths under `kernel/`).
const MODULES: &[&str] = &["net/llc/llc", "net/802/stp", "net/bridge/bridge", "drivers/net/veth"];

/// How long the guest may run, boot to power-off. It takes about 2 minutes here.
const GUEST_LIMIT: Duration = Duration::from_mins(20);

/// What the guest's init prints before each result, so that the kernel's own lines cannot be
/// taken for one.
const MARK: &str = "dsrlb-arm64:";

fn vm_dir() -> PathBuf {
    root().join("target/arm64-vm")
}

/// apt with its own configuration, lists and cache under `target/arm64-vm/apt`, for arm64
/// from Debian's unstable suite; the host's apt is not touched.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new() -> anyhow::Result<Self> {
        let dir = vm_dir().join("apt");
        for d in ["lists/partial", "cache/archives/partial", "preferences.d", "debs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(
            dir.join("sources.list"),
            "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian unstable main\n",
        )?;
        std::fs::write(dir.join("status"), "")?;
        // apt's own configuration: none of the host's (its apt.conf.d hooks and settings).
        std::fs::write(dir.join("apt.conf"), "")?;
        std::fs::create_dir_all(dir.join("apt.conf.d"))?;
        Ok(Self { dir })
    }

    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        [
            ("Dir::Etc::main", d("apt.conf")),
            ("Dir::Etc::Parts", d("apt.conf.d")),
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".to_owned()),
            ("Dir::Etc::Preferences", "/dev/null".to_owned()),
            ("Dir::Etc::PreferencesParts", d("preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::Status", d("status")),
            ("Dir::Cache", d("cache")),
            ("APT::Architecture", "arm64".to_owned()),
            ("APT::Architectures", "arm64".to_owned()),
            // Downloads land in a directory of ours, which apt's sandbox user cannot write.
            ("APT::Sandbox::User", "root".to_owned()),
            // Signed lists and hashed packages only, whatever anything else says.
            ("Acquire::AllowInsecureRepositories", "false".to_owned()),
            ("APT::Get::AllowUnauthenticated", "false".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={v}")])
        .collect()
    }

    fn run(&self, tool: &str, args: &[&str], cwd: &Path) -> anyhow::Result<String> {
        let out = Command::new(tool)
            .arg("-q")
            .args(self.options())
            .args(args)
            .current_dir(cwd)
            .output()
            .with_context(|| format!("starting {tool}"))?;
        ensure!(
            out.status.success(),
            "{tool} {} failed (Debian's unstable suite for arm64 must be reachable): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The first package `package` depends on whose name starts with `prefix`.
    fn dependency(&self, package: &str, prefix: &str) -> anyhow::Result<String> {
        let out = self.run("apt-cache", &["depends", package], &self.dir)?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(str::trim)
            .find(|d| d.starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| format!("{package} in Debian unstable (arm64) depends on no {prefix}*:\n{out}"))
    }

    /// Downloads `packages` into `debs/` (apt keeps what it already has), and returns their
    /// files by package name.
    fn download(&self, packages: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let debs = self.dir.join("debs");
        let names: Vec<&str> = packages.iter().map(String::as_str).collect();
        let mut args = vec!["download"];
        args.extend(&names);
        self.run("apt-get", &args, &debs)?;
        let mut found = BTreeMap::new();
        for p in packages {
            let file = std::fs::read_dir(&debs)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{p}_")))
                        && f.extension().is_some_and(|x| x == "deb")
                })
                .max_by_key(|f| f.metadata().and_then(|m| m.modified()).ok())
                .with_context(|| format!("apt-get download {p} wrote no .deb"))?;
            found.insert(p.clone(), file);
        }
        Ok(found)
    }
}

/// Cross-builds the test binaries and `dsrlb` for arm64, as the arm64 package is built. Returns
/// the test binaries by name.
pub fn cross_build() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let cross = |args: &[&str]| {
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "cargo"])
            .args(args)
            .args(["--release", "--target", ARM64_TARGET, "-Z", "build-std=std,panic_abort"])
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
            .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
            .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
            .current_dir(root());
        c
    };
    let status = cross(&["build", "-p", "lb-userspace", "--bin", "dsrlb"]).status().context("starting the arm64 cross-build")?;
    ensure!(status.success(), "cross-building dsrlb for {ARM64_TARGET} failed ({status})");
    let mut args = vec!["test", "--no-run", "--message-format=json-render-diagnostics", "-p", "lb-userspace", "--lib", "-p", "tests"];
    for (t, _) in TESTS {
        args.extend(["--test", t]);
    }
    let out = cross(&args).stderr(Stdio::inherit()).output().context("starting the arm64 cross-build of the tests")?;
    ensure!(out.status.success(), "cross-building the tests for {ARM64_TARGET} failed ({})", out.status);
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) else { continue };
        bins.insert(name.replace('-', "_"), PathBuf::from(exe));
    }
    for want in TESTS.iter().map(|(t, _)| *t).chain(["lb_userspace"]) {
        ensure!(bins.contains_key(want), "the arm64 test build made no {want} binary: {:?}", bins.keys());
    }
    Ok(bins)
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The guest's init: mounts, modules, then each test binary, each result on a line of its own.
fn init_script() -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         export PATH=/usr/sbin:/usr/bin RUST_BACKTRACE=1\n",
    );
    for m in MODULES {
        let name = Path::new(m).file_name().and_then(|n| n.to_str()).unwrap_or(m);
        let _ = writeln!(s, "insmod /modules/{name}.ko || echo \"{MARK} module {name} failed\"");
    }
    let _ =
        writeln!(s, "echo \"{MARK} kernel $(uname -r) $(uname -m) cpus $(nproc) bpf_jit_enable $(cat /proc/sys/net/core/bpf_jit_enable)\"");
    s += "ip link set lo up\ncd /t\n";
    // `layers_point_down` reads the crate's sources, which the guest does not carry.
    let _ = writeln!(s, "./deps/lb_userspace --test-threads=2 --skip tests::layers_point_down\necho \"{MARK} lb_userspace exit $?\"");
    for (t, args) in TESTS {
        let _ = writeln!(s, "./deps/{t} {}\necho \"{MARK} {t} exit $?\"", args.join(" "));
    }
    let _ = writeln!(s, "echo \"{MARK} done\"\npoweroff -f");
    s
}

/// The initramfs: Debian's userland, the kernel's modules, the test binaries and `dsrlb`
/// (`/t/deps/TEST` beside `/t/dsrlb`, as the tests look for it), and the init.
fn initramfs(debs: &BTreeMap<String, PathBuf>, modules: &Path, bins: &BTreeMap<String, PathBuf>) -> anyhow::Result<PathBuf> {
    let vm = vm_dir();
    let rootfs = vm.join("root");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs)?;
    for deb in debs.values() {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&rootfs))?;
    }
    // Debian's usr-merged layout: the loader is /lib/ld-linux-aarch64.so.1.
    for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
        if !rootfs.join(link).exists() {
            std::os::unix::fs::symlink(to, rootfs.join(link))?;
        }
    }
    let busybox = rootfs.join("usr/bin/busybox");
    ensure!(busybox.exists(), "busybox-static put no usr/bin/busybox");
    for a in APPLETS {
        let at = rootfs.join("usr/bin").join(a);
        if !at.exists() && !rootfs.join("usr/sbin").join(a).exists() {
            std::os::unix::fs::symlink("busybox", at)?;
        }
    }
    for d in ["proc", "sys", "dev", "tmp", "run", "etc", "modules", "t/deps"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    for m in MODULES {
        let name = Path::new(m).file_name().and_then(|n| n.to_str()).unwrap_or(m);
        let src = modules.join("kernel").join(format!("{m}.ko.xz"));
        let out = Command::new("xz").arg("-dc").arg(&src).output().with_context(|| format!("starting xz for {}", src.display()))?;
        ensure!(out.status.success(), "unpacking {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
        std::fs::write(rootfs.join("modules").join(format!("{name}.ko")), out.stdout)?;
    }
    for (name, exe) in bins {
        std::fs::copy(exe, rootfs.join("t/deps").join(name)).with_context(|| format!("copying {}", exe.display()))?;
    }
    let dsrlb = root().join("target").join(ARM64_TARGET).join("release/dsrlb");
    std::fs::copy(&dsrlb, rootfs.join("t/dsrlb")).with_context(|| format!("copying {}", dsrlb.display()))?;
    // A host's users and groups (the config's `read_only_group` is checked against them).
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    let init = rootfs.join("init");
    std::fs::write(&init, init_script())?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cpio = vm.join("initramfs.cpio");
    let out = std::fs::File::create(&cpio)?;
    sh(Command::new("sh").arg("-c").arg("find . | LC_ALL=C sort | cpio --quiet -o -H newc").current_dir(&rootfs).stdout(out))?;
    Ok(cpio)
}

/// What the guest's console said: each test's exit code, the kernel line, and anything marked
/// that is not one of those (a module that did not load, a result given twice).
#[derive(Default)]
struct Console {
    results: BTreeMap<String, i32>,
    kernel: Option<String>,
    problems: Vec<String>,
    finished: bool,
}

impl Console {
    fn line(&mut self, line: &str) {
        let Some(rest) = line.trim_end_matches('\r').strip_prefix(MARK).map(str::trim) else { return };
        if rest == "done" {
            self.finished = true;
        } else if let Some(kernel) = rest.strip_prefix("kernel ") {
            self.kernel = Some(kernel.to_owned());
        } else if let Some((name, code)) = rest.rsplit_once(" exit ") {
            let code = code.trim().parse().unwrap_or(-1);
            if self.results.insert(name.to_owned(), code).is_some() {
                self.problems.push(format!("{name} reported twice"));
            }
        } else {
            self.problems.push(rest.to_owned());
        }
    }
}

/// qemu, killed when dropped before it exited (an early return, a panic).
struct Guest(std::process::Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots the guest and follows its console to the end.
fn boot(kernel: &Path, initramfs: &Path) -> anyhow::Result<Console> {
    let log_path = vm_dir().join("console.log");
    let mut log = std::fs::File::create(&log_path)?;
    let mut guest = Guest(
        Command::new("qemu-system-aarch64")
            .args(["-M", "virt", "-smp", "2", "-m", "3072", "-nographic", "-no-reboot", "-nic", "none"])
            // Pointer authentication with QEMU's own algorithm: the architected QARMA is many
            // times slower under TCG, and Debian's kernel signs every return address.
            .args(["-cpu", "max,pauth-impdef=on", "-accel", "tcg,thread=multi"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initramfs)
            // Only the kernel's emergencies on the console: its warnings would cut result lines.
            .args(["-append", "console=ttyAMA0 panic=-1 quiet loglevel=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-system-aarch64 (Debian's qemu-system-arm; `cargo xtask setup` installs it)")?,
    );
    let stdout = guest.0.stdout.take().context("qemu's console")?;
    let pid = guest.0.id();
    let started = Instant::now();
    // A watchdog: the guest is killed when it runs past its limit. It is told to stand down
    // (and joined) before qemu is reaped, so its pid cannot be another process's by then.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(GUEST_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(i32::try_from(pid).unwrap_or(i32::MAX), libc::SIGKILL) };
            return true;
        }
        false
    });
    let mut console = Console::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let _ = writeln!(log, "{line}");
        eprintln!("[arm64] {line}");
        console.line(&line);
    }
    let _ = done_tx.send(());
    let killed = watchdog.join().unwrap_or(true);
    let status = guest.0.wait()?;
    eprintln!("xtask: the arm64 guest ran {:.0} s ({status}); its console is in {}", started.elapsed().as_secs_f64(), log_path.display());
    ensure!(!killed, "the arm64 guest ran past {} min and was killed; see {}", GUEST_LIMIT.as_secs() / 60, log_path.display());
    ensure!(console.finished, "the arm64 guest stopped before its tests finished ({status}); see {}", log_path.display());
    Ok(console)
}

pub fn test_arm64() -> anyhow::Result<()> {
    let bins = cross_build()?;
    let apt = Apt::new()?;
    apt.run("apt-get", &["update"], &apt.dir)?;
    // The kernel `linux-image-arm64` stands for today, in its binary and modules packages.
    let image = apt.dependency("linux-image-arm64", "linux-image-")?;
    let release = image.trim_start_matches("linux-image-").to_owned();
    let kernel_debs = apt.download(&[format!("linux-binary-{release}"), format!("linux-modules-{release}")])?;
    let userland = apt.download(&USERLAND.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    eprintln!("xtask: arm64 guest: Debian unstable's {image}");
    let kernel_tree = vm_dir().join("kernel");
    let _ = std::fs::remove_dir_all(&kernel_tree);
    for deb in kernel_debs.values() {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&kernel_tree))?;
    }
    let modules = kernel_tree.join("usr/lib/modules").join(&release);
    let vmlinuz = modules.join("vmlinuz");
    ensure!(vmlinuz.exists(), "{} is missing from the kernel's package", vmlinuz.display());
    let initramfs = initramfs(&userland, &modules, &bins)?;
    let console = boot(&vmlinuz, &initramfs)?;
    let results = &console.results;
    let mut failed = console.problems.clone();
    // The guest must be what it claims: an arm64 kernel on two CPUs, with the BPF JIT on.
    match &console.kernel {
        Some(k) if k.contains(" aarch64 ") && k.contains("cpus 2 ") && k.ends_with("bpf_jit_enable 1") => {}
        other => failed.push(format!("the guest's kernel line is {other:?}, not aarch64 with 2 CPUs and the BPF JIT on")),
    }
    for name in std::iter::once("lb_userspace").chain(TESTS.iter().map(|(t, _)| *t)) {
        match results.get(name) {
            Some(0) => {}
            Some(code) => failed.push(format!("{name} (exit {code})")),
            None => failed.push(format!("{name} (no result)")),
        }
    }
    if let Some(extra) = results.keys().find(|k| *k != "lb_userspace" && !TESTS.iter().any(|(t, _)| t == k)) {
        failed.push(format!("a result for {extra}, which the guest was not given"));
    }
    if !failed.is_empty() {
        bail!("on the arm64 guest, failed: {}", failed.join(", "));
    }
    eprintln!("xtask: on arm64 ({image}): lb_userspace and {} passed", TESTS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "));
    Ok(())
}
