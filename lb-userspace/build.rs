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
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_UPGRADE_TEST").is_some() { &["upgrade-test"] } else { &[] };
    aya_build::build_ebpf([Package { name: "lb-ebpf", root_dir: root, features, ..Package::default() }], Toolchain::Nightly)
        .context("building the XDP program (lb-ebpf); `cargo xtask setup` installs what it needs")
}
