//! Builds the XDP object from `lb-ebpf` (with BTF) into `OUT_DIR/dsrlb`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).parent().ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?.join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf([Package { name: "lb-ebpf", root_dir: root, ..Package::default() }], Toolchain::Nightly)
        .context("building the XDP program (lb-ebpf); `cargo xtask setup` installs what it needs")
}
