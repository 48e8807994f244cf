//! `cargo xtask setup`: makes a fresh machine ready, idempotently. Each step says what it does
//! and, when it fails, what to do.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The bpf-linker release the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages used by tests, the lab and the benchmarks.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "ethtool",
    "tcpdump",
    "bpftool",
    "mosquitto",
    "mosquitto-clients",
    "haproxy",
    // The multi-node lab: BGP with BFD on the router and the nodes, VRRP on the nodes.
    "bird2",
    "keepalived",
    // promtool, which checks and unit-tests the alert rules in deploy/prometheus (the package's
    // service is not started: no systemd here, and policy-rc.d where there is one).
    "prometheus",
    // Checks the Debian package `cargo xtask package` builds.
    "lintian",
    // xdp-filter, the other XDP program the chaining test runs beside the balancer.
    "xdp-tools",
    // openssl s_server: a stand-in HTTPS API for the https health check's lab test.
    "openssl",
    // The model check of the flow table's slot protocol (tests/model): spin writes a C
    // verifier, gcc builds it.
    "spin",
    "gcc",
    // The arm64 package: the cross linker and C compiler, and qemu's user-mode emulator, which
    // runs the arm64 binary in the package test.
    "gcc-aarch64-linux-gnu",
    // Its C library's headers and objects (only recommended by the compiler, and recommends are
    // not installed): ring's C code in the arm64 build includes them.
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    // `cargo xtask test-arm64`: the emulated arm64 machine, and cpio and xz for its initramfs
    // and the kernel's modules (the kernel and the guest's userland come from Debian's
    // unstable suite for arm64, fetched by that command with its own apt lists).
    "qemu-system-arm",
    "debian-archive-keyring",
    "cpio",
    "xz-utils",
];

/// The cargo-deb release `cargo xtask package` is known to work with.
const CARGO_DEB_VERSION: &str = "3.8.0";

fn step(what: &str) {
    eprintln!("[setup] {what}");
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the LLVM prefix for bpf-linker lives. bpf-linker's RUNPATH points here, so it must be
/// permanent.
fn llvm_prefix() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/dsrlb/llvm-22"))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    step("nightly toolchain with rust-src (the XDP program is built with -Z build-std=core)");
    let installed = run(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    if installed.as_deref().is_ok_and(|s| s.lines().any(|l| l.starts_with("rust-src"))) {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])).context(
        "installing rust-src for nightly failed: check that `rustup toolchain list` shows a nightly toolchain \
         (rustup toolchain install nightly --profile minimal)",
    )?;
    Ok(())
}

/// Links `prefix/lib/libLLVM.so` (and the versioned name) to the nightly toolchain's LLVM.
fn llvm_links(prefix: &Path) -> anyhow::Result<()> {
    let sysroot = run(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.22")))
        .with_context(|| format!("no libLLVM.so.22* in {}: the nightly toolchain must be LLVM 22", lib.display()))?;
    let dir = prefix.join("lib");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let versioned = llvm.file_name().expect("file name").to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), versioned.as_os_str()] {
        let link = dir.join(name);
        if std::fs::read_link(&link).ok().as_deref() == Some(llvm.as_path()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn bpf_linker() -> anyhow::Result<()> {
    step(&format!("bpf-linker {BPF_LINKER_VERSION} against the toolchain's LLVM 22"));
    let prefix = llvm_prefix()?;
    llvm_links(&prefix)?;
    if bpf_linker_ok() {
        return Ok(());
    }
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} (about a minute), LLVM prefix {}", prefix.display()));
    run(Command::new("cargo")
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix))
    .context("cargo install bpf-linker failed")?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not run: is ~/.cargo/bin on PATH, \
             and does {} point at the nightly toolchain's libLLVM?",
            prefix.join("lib/libLLVM.so").display()
        );
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    step(&format!("Debian packages: {}", DEBIAN_PACKAGES.join(" ")));
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")));
    let hint = "installing Debian packages failed: run as root on a Debian host with its package sources reachable";
    run(Command::new("apt-get").args(["update", "-q"])).context(hint)?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context(hint)?;
    Ok(())
}

fn cargo_deb() -> anyhow::Result<()> {
    step(&format!("cargo-deb {CARGO_DEB_VERSION} (builds the Debian package)"));
    let have = Command::new("cargo").args(["deb", "--version"]).output();
    if have.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)) {
        return Ok(());
    }
    step(&format!("building cargo-deb {CARGO_DEB_VERSION} (about a minute)"));
    run(Command::new("cargo").args(["install", &format!("cargo-deb@{CARGO_DEB_VERSION}"), "--locked", "--force"]))
        .context("cargo install cargo-deb failed")?;
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    step("bpffs on /sys/fs/bpf");
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs failed: run as root (mount -t bpf bpf /sys/fs/bpf)")?;
    Ok(())
}

/// Runs every step. Root is needed for packages and bpffs; the toolchain steps work without.
///
/// # Errors
/// The first step that fails, with what to do about it.
pub fn setup() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_deb()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        debian_packages()?;
        bpffs()?;
    } else {
        step("not root: skipping Debian packages and bpffs (tests and the lab need root)");
    }
    step("ready");
    Ok(())
}
