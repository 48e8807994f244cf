//! The Debian package `cargo xtask package` builds (and `cargo xtask test` builds before the
//! tests): unpacked into a root of its own, with no toolchain in it, its binary runs, checks the
//! packaged config, and loads and attaches its XDP program; lintian reports no error.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use lb_userspace::control::status::Status;
use tests::{
    netns::{Netns, veth},
    require_root, wait,
};

/// The package in `target/debian`.
fn deb() -> PathBuf {
    deb_of("debian", "amd64")
}

/// The package for `arch` in `target/DIR`.
fn deb_of(dir: &str, arch: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(dir);
    let tail = format!("_{arch}.deb");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("dsrlb_") && n.ends_with(&tail)))
        .unwrap_or_else(|| {
            panic!("no dsrlb_*{tail} in {}: run `cargo xtask package --arch {arch}` (`cargo xtask test` does)", dir.display())
        })
}

/// The package unpacked (`dpkg-deb -x`, and its control files under `DEBIAN`) into a fresh
/// directory.
fn unpacked(tag: &str) -> PathBuf {
    unpacked_of(tag, &deb())
}

fn unpacked_of(tag: &str, deb: &Path) -> PathBuf {
    let root = std::env::temp_dir().join(format!("dsrlb-pkg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("temp root");
    for args in [vec!["-x"], vec!["-e"]] {
        let target = if args[0] == "-e" { root.join("DEBIAN") } else { root.clone() };
        let out = Command::new("dpkg-deb").args(&args).arg(deb).arg(&target).output().expect("dpkg-deb");
        assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    root
}

fn run(bin: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_package_holds_everything_and_its_binary_runs_from_it_alone() {
    let root = unpacked("files");
    for file in [
        "usr/bin/dsrlb",
        "etc/dsrlb/dsrlb.toml",
        "usr/lib/systemd/system/dsrlb.service",
        "usr/share/man/man1/dsrlb.1.gz",
        "usr/share/man/man1/dsrlb-run.1.gz",
        "usr/share/bash-completion/completions/dsrlb",
        "usr/share/zsh/vendor-completions/_dsrlb",
        "usr/share/fish/vendor_completions.d/dsrlb.fish",
        "usr/share/dsrlb/backend-setup.sh",
        "usr/share/dsrlb/grafana/dsrlb-dashboard.json",
        "usr/share/dsrlb/prometheus/dsrlb-alerts.yml",
        "usr/share/doc/dsrlb/copyright",
        "usr/share/doc/dsrlb/changelog.Debian.gz",
    ] {
        assert!(root.join(file).is_file(), "the package has no {file}");
    }
    let conffiles = std::fs::read_to_string(root.join("DEBIAN/conffiles")).expect("conffiles");
    assert!(conffiles.lines().any(|l| l == "/etc/dsrlb/dsrlb.toml"), "the config is not a conffile: {conffiles}");
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/dsrlb.service")).expect("unit");
    for line in
        ["ExecStart=/usr/bin/dsrlb run", "CapabilityBoundingSet=", "NoNewPrivileges=yes", "ProtectSystem=strict", "SystemCallFilter="]
    {
        assert!(unit.contains(line), "the unit lacks {line}");
    }

    // The binary from the package, with nothing of this build around it.
    let bin = root.join("usr/bin/dsrlb");
    let (ok, out) = run(&bin, &["--version"]);
    assert!(ok && out.starts_with("dsrlb 0."), "dsrlb --version: {out}");
    let config = root.join("etc/dsrlb/dsrlb.toml");
    let (ok, out) = run(&bin, &["check", "--config", config.to_str().expect("UTF-8")]);
    assert!(ok && out.contains(": valid"), "dsrlb check on the packaged config: {out}");
    // It needs the C library and nothing of a Rust or LLVM toolchain.
    let (ok, libs) = run(Path::new("ldd"), &[bin.to_str().expect("UTF-8")]);
    assert!(ok, "ldd: {libs}");
    for line in libs.lines() {
        let lib = line.split_whitespace().next().unwrap_or("");
        assert!(
            ["linux-vdso", "libc.so", "libm.so", "libgcc_s.so", "ld-linux", "/lib64/ld-linux"].iter().any(|ok| lib.contains(ok)),
            "the binary needs {lib}: {libs}"
        );
    }
    let (ok, man) = run(Path::new("zcat"), &[root.join("usr/share/man/man1/dsrlb.1.gz").to_str().expect("UTF-8")]);
    assert!(ok && man.contains(".TH dsrlb 1"), "not a man page: {man}");
    let completion = root.join("usr/share/bash-completion/completions/dsrlb");
    let (ok, out) = run(Path::new("bash"), &["-c", &format!("source {} && complete -p dsrlb", completion.display())]);
    assert!(ok && out.contains("dsrlb"), "the bash completion does not load: {out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn lintian_reports_no_error() {
    for deb in [deb(), deb_of("debian-arm64", "arm64")] {
        let out = Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(&deb)
            .output()
            .expect("lintian (cargo xtask setup installs it)");
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "lintian on {}:\n{report}", deb.display());
        assert!(!report.lines().any(|l| l.starts_with("E: ")), "lintian errors on {}:\n{report}", deb.display());
    }
}

/// The arm64 package (issue 26): an arm64 binary, with the same files as the amd64 one, that
/// runs under qemu's user-mode emulator and checks its packaged config. (qemu-user has no
/// `bpf()`: loading the program on an arm64 kernel is not tested here.)
#[test]
fn the_arm64_package_holds_an_arm64_binary_that_runs() {
    use object::Object as _;
    let arm = deb_of("debian-arm64", "arm64");
    let out = Command::new("dpkg-deb").args(["-f"]).arg(&arm).arg("Architecture").output().expect("dpkg-deb");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "arm64");
    let list = |deb: &Path| -> Vec<String> {
        let out = Command::new("dpkg-deb").arg("-c").arg(deb).output().expect("dpkg-deb -c");
        let mut files: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().last().map(str::to_owned)).collect();
        files.sort();
        files
    };
    assert_eq!(list(&arm), list(&deb()), "the arm64 package holds other files than the amd64 one");
    let root = unpacked_of("arm64", &arm);
    let bin = root.join("usr/bin/dsrlb");
    let bytes = std::fs::read(&bin).expect("the binary");
    let file = object::File::parse(&*bytes).expect("an ELF binary");
    assert_eq!(file.architecture(), object::Architecture::Aarch64);
    let qemu = |args: &[&str]| {
        let out = Command::new("qemu-aarch64-static")
            .args(["-L", "/usr/aarch64-linux-gnu"])
            .arg(&bin)
            .args(args)
            .output()
            .expect("qemu-aarch64-static (cargo xtask setup installs qemu-user-static)");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, out) = qemu(&["--version"]);
    assert!(ok && out.starts_with("dsrlb "), "{out}");
    let config = root.join("etc/dsrlb/dsrlb.toml");
    let (ok, out) = qemu(&["check", "--config", &config.display().to_string()]);
    assert!(ok && out.contains("valid"), "dsrlb check under qemu-aarch64: {out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_packaged_binary_loads_and_attaches_its_xdp_program() {
    require_root!();
    let root = unpacked("xdp");
    let bin = root.join("usr/bin/dsrlb");
    let lb = Netns::new("dsrlb-t-pkg-lb");
    let cl = Netns::new("dsrlb-t-pkg-cl");
    veth(&lb, "lb0", &cl, "cl0");
    lb.ip(&["addr", "add", "192.0.2.2/24", "dev", "lb0"]);
    let config = root.join("test.toml");
    std::fs::write(
        &config,
        "interface = \"lb0\"\nxdp_mode = \"native\"\n[health]\ncheck = \"none\"\n\
         [[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n\
         [[listener]]\nname = \"mqtt6\"\nvip = \"2001:db8::100\"\nport = 1883\n\
         [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\naddress6 = \"2001:db8::11\"\nmac = \"02:00:00:00:00:11\"\n",
    )
    .expect("config");
    let (socket, pins) = (root.join("control.sock"), PathBuf::from("/sys/fs/bpf/dsrlb-pkg-test"));
    let _ = lb_userspace::dataplane::unpin_all(&pins);
    // The packaged dsrlb in the balancer's namespace, on this test's socket and pins.
    let dsrlb = |args: &[&str]| {
        let mut c = lb.command(&bin);
        c.arg("--socket").arg(&socket).arg("--pin-dir").arg(&pins).args(args);
        c
    };
    let mut child = dsrlb(&["run", "--metrics", "off", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the packaged dsrlb");
    let attached = || String::from_utf8_lossy(&lb.ip(&["-d", "link", "show", "lb0"]).stdout).contains("prog/xdp");
    wait::until_up("the packaged dsrlb attached", &mut child, Duration::from_secs(20), Duration::from_millis(100), || {
        attached() && socket.exists()
    });
    let out = dsrlb(&["status", "--json"]).output().expect("dsrlb status");
    let v: Status = serde_json::from_slice(&out.stdout).expect("status JSON");
    let names: Vec<&str> = v.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["mqtt", "mqtt6"], "{v:?}");
    let out = dsrlb(&["stop"]).output().expect("dsrlb stop");
    assert!(out.status.success(), "dsrlb stop: {}", String::from_utf8_lossy(&out.stderr));
    let _ = child.wait();
    assert!(!attached(), "still attached after dsrlb stop");
    // `dsrlb stop` removes the pins; the directory is the test's.
    let _ = std::fs::remove_dir(&pins);
    drop(cl);
    let _ = std::fs::remove_dir_all(&root);
}
