//! Test support: a small Ethernet frame builder (`frame`), the packet-fixture harness and its
//! case tables (`fixture`), network namespaces that clean up on drop (`netns`), the DSR lab
//! (`lab`) and the balancer process in it (`balancer`), a full flow table (`fill`), MQTT clients and load (`client`,
//! `mqtt`, `load`), tunnel frames for the decap tests (`tunnel`), the one way to wait for
//! something (`wait`), and a small deterministic generator ([`XorShift`]).
#![allow(clippy::must_use_candidate, reason = "helpers run commands for their effect; their output is optional")]

pub mod balancer;
pub mod client;
pub mod fill;
pub mod fixture;
pub mod frame;
pub mod lab;
pub mod load;
pub mod mqtt;
pub mod netns;
pub mod tunnel;
pub mod wait;

/// A small deterministic generator (xorshift64): a run that fails can be run again from its
/// seed.
pub struct XorShift(pub u64);

impl XorShift {
    #[allow(clippy::should_implement_trait, reason = "an infinite generator, not an iterator")]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n")
    }

    /// A byte.
    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// True when the process may load BPF programs and make namespaces.
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the test when not root: a packet, netns or lab test that did not run must not pass.
/// (`cargo xtask test` refuses to start without root, so this fires only under plain
/// `cargo test`.)
#[macro_export]
macro_rules! require_root {
    () => {
        assert!($crate::is_root(), "{} needs root (BPF and network namespaces): run `cargo xtask test` as root", module_path!());
    };
}

/// The `dsrlb` binary of this build (`cargo xtask test` builds it before the tests run).
///
/// # Panics
/// When it has not been built.
#[must_use]
pub fn dsrlb_bin() -> std::path::PathBuf {
    built_bin("dsrlb")
}

/// A binary of this build (`dsrlb`, or one of this crate's: `flood`, `loadgen`, ...), from
/// the same profile as the running test.
///
/// # Panics
/// When it has not been built.
#[must_use]
pub fn built_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> (this crate's binaries,
    // such as `lab`) -> target/<profile>/<name>
    let mut dir = exe.parent().expect("the executable's directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p lb-userspace -p tests --bins` (cargo xtask test does)",
        bin.display()
    );
    bin
}
