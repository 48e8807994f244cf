//! Builds the XDP object from `lb-ebpf` (with BTF) into `OUT_DIR/dsrlb`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).parent().ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?.join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // aya-build passes everything the nested cargo prints on as `cargo:warning` lines, so a clean
    // build would print "warning: Compiling lb-ebpf". Quiet, the nested cargo prints only
    // compiler diagnostics, which are worth a warning; a failed build still fails with them.
    // SAFETY: the build script is single-threaded here; the variable is read by the child cargo.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_UPGRADE_TEST");
    let upgrade = std::env::var_os("CARGO_FEATURE_UPGRADE_TEST").is_some();
    let features: &[&str] = if upgrade { &["upgrade-test"] } else { &[] };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let shared = shared_bpf_dir(&out, &format!("{arch}-plain{}", if upgrade { "-upgrade-test" } else { "" }));
    share_aya_build_dir(&out, &shared)?;
    {
        // Held over the nested build and aya-build's copy out of it (cargo's own lock ends
        // with the nested cargo, before the copy).
        let _lock = lock(&shared)?;
        aya_build::build_ebpf([Package { name: "lb-ebpf", root_dir: root, features, ..Package::default() }], Toolchain::Nightly)
            .context("building the XDP program (lb-ebpf); `cargo xtask setup` installs what it needs")?;
    }
    build_ordered(root, upgrade).context("building the ordered XDP program (lb-ebpf, feature ordered)")
}

/// The balancer for weakly ordered CPUs, `dsrlb-ordered`: `lb-ebpf` with feature `ordered` for
/// BPF ISA v4, with load-acquire and store-release (LLVM selects them from v4 on). aya-build sets the nested build's flags itself, with no way to
/// add the target CPU, so this build is run here: the same command and flags, and
/// `-C target-cpu=v4`, which rustc hands to bpf-linker.
fn build_ordered(root: &str, upgrade: bool) -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = shared_bpf_dir(&out, &format!("{arch}-ordered{}", if upgrade { "-upgrade-test" } else { "" }));
    // Where this build was made before the directory was shared.
    let _ = std::fs::remove_dir_all(out.join("ordered-target"));
    std::fs::create_dir_all(&target_dir).with_context(|| format!("creating {}", target_dir.display()))?;
    // Held over the nested build and the copy out of it, as for the plain build.
    let _lock = lock(&target_dir)?;
    let features = if upgrade { "ordered,upgrade-test" } else { "ordered" };
    let flags = [&format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v4"]
        .map(std::string::ToString::to_string);
    let status = std::process::Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--package", "lb-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--features", features])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .context("running cargo for lb-ebpf")?;
    anyhow::ensure!(status.success(), "cargo build of lb-ebpf --features {features} failed: {status}");
    let built = target_dir.join("bpfel-unknown-none/release/dsrlb");
    std::fs::copy(&built, out.join("dsrlb-ordered")).with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}

/// Where the nested BPF builds of one flavour (the host architecture, plain or ordered, with or
/// without `upgrade-test`) keep their target directory: `bpf/FLAVOUR` in the workspace's target
/// directory, shared by every build of lb-userspace there, whatever its profile, target or
/// features (each of those has an `OUT_DIR` of its own, and would otherwise build core and the
/// program from nothing: a minute of a CI run each time). Two builds at once are kept apart by
/// [`lock`], held over the nested build and the copy out of it. Without a recognisable target
/// directory, a directory in `OUT_DIR`, as before.
fn shared_bpf_dir(out: &std::path::Path, flavour: &str) -> std::path::PathBuf {
    // OUT_DIR is TARGET/[TRIPLE/]PROFILE/build/lb-userspace-HASH/out: the target directory is
    // five levels up for a cross build, four otherwise (cargo tags both it and TARGET/TRIPLE).
    [5, 4]
        .into_iter()
        .filter_map(|up| out.ancestors().nth(up))
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| out.join("bpf").join(flavour), |target| target.join("bpf").join(flavour))
}

/// An exclusive lock on `dir` (its `.dsrlb-lock` file) for as long as the file is held.
fn lock(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(".dsrlb-lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock().with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// aya-build builds in `OUT_DIR/aya-build/target/lb-ebpf`, with no option for another place:
/// that path becomes a link to `shared`.
fn share_aya_build_dir(out: &std::path::Path, shared: &std::path::Path) -> anyhow::Result<()> {
    let link = out.join("aya-build/target/lb-ebpf");
    std::fs::create_dir_all(shared).with_context(|| format!("creating {}", shared.display()))?;
    if std::fs::read_link(&link).is_ok_and(|to| to == shared) {
        return Ok(());
    }
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&link),
        Ok(_) => std::fs::remove_file(&link),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("removing {}", link.display()))?;
    let parent = link.parent().ok_or_else(|| anyhow!("{} has no parent", link.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::os::unix::fs::symlink(shared, &link).with_context(|| format!("linking {} to {}", link.display(), shared.display()))
}
