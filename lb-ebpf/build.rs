//! Makes cargo rebuild the program when bpf-linker changes, and says how to get it when it is missing.
use std::env;

fn main() {
    // Only the BPF build links with bpf-linker; the host-side stub library needs nothing.
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
