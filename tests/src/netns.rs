//! Network namespaces made by a test and removed when it ends (also on panic), plus helpers to
//! run commands or code inside one.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

/// Runs `cmd` with `args`, panicking with its output when it fails.
///
/// # Panics
/// When the command cannot start or exits non-zero.
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    run(Command::new(cmd).args(args))
}

/// Runs a command, panicking with its output when it fails.
///
/// # Panics
/// When the command cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// `program` to run in the named network namespace (`/run/netns/NS`), by `nsenter --net`: the
/// network namespace only, so the host's bpffs (and the pins in it) stay visible. Add its
/// arguments, then run or spawn it.
#[must_use]
pub fn nsenter(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name`, removing a leftover of the same name first, and brings `lo` up.
    ///
    /// # Panics
    /// When `ip netns add` fails.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh("ip", &["netns", "add", name]);
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`.
    ///
    /// # Panics
    /// When the command fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a command inside the namespace (network namespace only: [`nsenter`]).
    ///
    /// # Panics
    /// When the command fails.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        run(self.command(cmd).args(args))
    }

    /// `program` to run inside the namespace ([`nsenter`]), to add arguments to and run.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        nsenter(&self.name, program)
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    ///
    /// # Panics
    /// When the namespace cannot be entered, or `f` panics.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.name, f).expect("entering the namespace")
    }
}

/// Runs `f` on a thread that has entered the named network namespace (`/run/netns/NAME`).
///
/// # Errors
/// When the namespace cannot be entered.
///
/// # Panics
/// When `f` panics.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| anyhow::anyhow!("opening {path}: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(anyhow::anyhow!("setns into {path}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .expect("thread inside the namespace panicked")
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Connects `a_ns`'s `a_if` and `b_ns`'s `b_if` with a veth pair.
///
/// # Panics
/// When `ip link` fails.
pub fn veth(a_ns: &Netns, a_if: &str, b_ns: &Netns, b_if: &str) {
    sh("ip", &["link", "add", a_if, "netns", &a_ns.name, "type", "veth", "peer", "name", b_if, "netns", &b_ns.name]);
    a_ns.ip(&["link", "set", a_if, "up"]);
    b_ns.ip(&["link", "set", b_if, "up"]);
}

/// An AF_PACKET socket bound to one interface: every frame it receives, whatever its MAC.
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    /// Opens it on `ifname` in the calling thread's namespace, with a receive timeout.
    ///
    /// # Panics
    /// When the socket cannot be opened or bound.
    #[must_use]
    pub fn open(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let proto = u16::try_from(libc::ETH_P_ALL).expect("fits").to_be();
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(raw >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).expect("no NUL");
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {ifname}");
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(ifindex).expect("fits");
        // SAFETY: addr is a valid sockaddr_ll of the size given.
        let rc =
            unsafe { libc::bind(raw, (&raw const addr).cast(), u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("fits")) };
        assert_eq!(rc, 0, "bind(AF_PACKET, {ifname}): {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: valid option pointer and size.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).expect("fits"),
            );
        }
        Self { fd }
    }

    /// Makes [`Self::recv`] return at once when no frame waits.
    pub fn set_nonblocking(&self) {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }

    /// Sends one whole frame out of the interface.
    ///
    /// # Panics
    /// When the kernel refuses it.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the frame is valid for its length; the socket is bound to its interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(n).ok(), Some(frame.len()), "send: {}", std::io::Error::last_os_error());
    }

    /// The next frame, or `None` after the receive timeout.
    #[must_use]
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}
