//! The balancer process of a lab test: `dsrlb run` in the lab's balancer namespace (or a
//! routed lab's node), its CLI, its status, and the ways it ends (SIGTERM, `dsrlb stop`,
//! SIGKILL, a node that dies).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_userspace::control::status::{BackendStatus, ListenerStatus, Status};

use crate::{lab::Lab, netns::nsenter, wait};

/// `dsrlb run` in the lab's balancer namespace (or a routed lab's node); stopped with SIGTERM
/// on drop.
pub struct Balancer {
    pub child: Child,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    lb_ns: String,
    /// What its controllers (this one and those before it) logged, in order.
    log: Arc<Mutex<String>>,
}

impl Balancer {
    /// Writes `config` to the lab's state directory and starts `dsrlb run` on it, returning
    /// once the program is attached to the balancer's `eth0`.
    ///
    /// # Panics
    /// When it does not attach within 20 s or exits early.
    #[must_use]
    pub fn start(lab: &Lab, config: &str) -> Self {
        let path = lab.state.join("dsrlb-test.toml");
        std::fs::write(&path, config).expect("writing the config");
        let socket = lab.state.join("control.sock");
        let mut b = Self::spawned(&lab.ns("lb"), lab.pin_dir(), path, socket, &crate::dsrlb_bin());
        b.wait_ready();
        b
    }

    /// `dsrlb run` on node `i` of a routed lab, with its own config file, socket and pins,
    /// returning once its program is attached and its socket answers (it may still be joining
    /// its cluster: see [`Self::wait_joined`]).
    ///
    /// # Panics
    /// When it does not attach within 20 s or exits early.
    #[must_use]
    pub fn start_node(lab: &Lab, i: usize, config: &str) -> Self {
        let dir = lab.node_dir(i);
        std::fs::create_dir_all(&dir).expect("node directory");
        let path = dir.join("dsrlb.toml");
        std::fs::write(&path, config).expect("writing the config");
        let mut b = Self::spawned(&lab.node_ns(i), lab.node_pin_dir(i), path, dir.join("control.sock"), &crate::dsrlb_bin());
        b.wait_ready();
        b
    }

    fn spawned(ns: &str, pin_dir: PathBuf, config: PathBuf, socket: PathBuf, bin: &Path) -> Self {
        let log = Arc::default();
        let child = Self::spawn_bin(ns, &pin_dir, bin, &config, &socket, &log);
        Self { child, config, socket, pin_dir, lb_ns: ns.to_owned(), log }
    }

    /// `dsrlb run`; its log goes to the test's stderr, as it comes, and into `log`.
    fn spawn_bin(ns: &str, pin_dir: &Path, bin: &Path, config: &Path, socket: &Path, log: &Arc<Mutex<String>>) -> Child {
        let mut child = nsenter(ns, bin)
            .arg("--socket")
            .arg(socket)
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", std::env::var("DSRLB_LAB_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dsrlb");
        let (stderr, log) = (child.stderr.take().expect("piped stderr"), Arc::clone(log));
        // Ends when the controller does (its end of the pipe closes).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(std::io::stderr(), "{line}");
                if let Ok(mut log) = log.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        child
    }

    /// What its controllers logged so far (at `DSRLB_LAB_LOG`'s level, warn by default), the
    /// current one's last.
    ///
    /// # Panics
    /// When a thread that reads the log panicked.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().expect("the controller's log").clone()
    }

    /// Waits until the controller has joined its cluster (`dsrlb ping` answers), at most `within`.
    ///
    /// # Panics
    /// When it does not.
    pub fn wait_joined(&self, within: Duration) {
        wait::until_every(format!("{}: ready (dsrlb ping answers)", self.lb_ns), within, Duration::from_millis(50), || {
            let (ok, _, err) = self.cli(&["ping"]);
            if ok { Ok(()) } else { Err(err) }
        });
    }

    /// Waits until the program is attached and the control socket answers.
    fn wait_ready(&mut self) {
        let (ns, socket, pin_dir) = (&self.lb_ns, &self.socket, &self.pin_dir);
        wait::until_up(
            "dsrlb ready (program attached, status answered)",
            &mut self.child,
            Duration::from_secs(20),
            Duration::from_millis(50),
            || xdp_attached(ns) && run_cli(ns, socket, pin_dir, &["status", "--json"]).0,
        );
    }

    /// Starts a new controller process on the same config, socket and pins (after a crash or
    /// an upgrade) and waits until it serves.
    pub fn restart(&mut self, lab: &Lab) {
        self.restart_with(lab, &crate::dsrlb_bin());
    }

    /// As [`Self::restart`], with another `dsrlb` binary (an upgrade).
    pub fn restart_with(&mut self, _lab: &Lab, bin: &Path) {
        self.child = Self::spawn_bin(&self.lb_ns, &self.pin_dir, bin, &self.config, &self.socket, &self.log);
        self.wait_ready();
    }

    /// SIGKILL: the controller dies without any clean-up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `dsrlb stop`: detach and unpin, through the running controller.
    ///
    /// # Panics
    /// When the command fails.
    pub fn stop_for_good(&mut self) {
        let (ok, out, err) = self.cli(&["stop"]);
        assert!(ok, "dsrlb stop failed: {out}{err}");
        wait::until("dsrlb to exit after dsrlb stop", Duration::from_secs(10), || self.child.try_wait().expect("wait"));
    }

    /// Runs `dsrlb --socket S ARGS...` (the CLI) and returns (success, stdout, stderr).
    ///
    /// # Panics
    /// When the CLI cannot start.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        run_cli(&self.lb_ns, &self.socket, &self.pin_dir, args)
    }

    /// `dsrlb status --json`, as the controller's [`Status`].
    ///
    /// # Panics
    /// When the CLI fails or its JSON is not a status.
    #[must_use]
    pub fn status(&self) -> Status {
        let (ok, out, err) = self.cli(&["status", "--json"]);
        assert!(ok, "dsrlb status failed: {err}");
        serde_json::from_str(&out).expect("status JSON")
    }

    /// The state of (listener, backend) from `dsrlb status`.
    ///
    /// # Panics
    /// When the status has no such pair.
    #[must_use]
    pub fn state(&self, listener: &str, backend: &str) -> String {
        let s = self.status();
        s.backend(listener, backend).unwrap_or_else(|| panic!("no {listener}/{backend} in status: {s:?}")).state.clone()
    }

    /// Whether the balancer's `eth0` carries an XDP program.
    #[must_use]
    pub fn attached(&self) -> bool {
        xdp_attached(&self.lb_ns)
    }

    /// The namespace it runs in.
    #[must_use]
    pub fn ns(&self) -> &str {
        &self.lb_ns
    }

    /// The node dies: SIGKILL, and its program detached (its pins removed), as when the host
    /// loses power. Nothing is withdrawn: the routers find out by BFD or the BGP hold time.
    pub fn kill_node(&mut self) {
        self.kill9();
        let _ = lb_userspace::dataplane::unpin_all(&self.pin_dir);
        let _ = wait::within(Duration::from_secs(5), wait::EVERY, || !self.attached());
    }

    /// SIGTERM (the controller exits, forwarding continues from the pins), and the exit status.
    ///
    /// # Panics
    /// When it does not exit within 10 s.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGTERM) };
        wait::until("dsrlb to exit after SIGTERM", Duration::from_secs(10), || self.child.try_wait().expect("wait"))
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // Tests end with nothing attached: `dsrlb stop` through the controller, or directly.
        let _ = self.cli(&["stop"]);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

/// `dsrlb --socket S --pin-dir P ARGS...` in namespace `ns`, as an operator on that host would
/// run it (`dsrlb stop` without a controller withdraws that namespace's routes): (success,
/// stdout, stderr).
fn run_cli(ns: &str, socket: &Path, pin_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = nsenter(ns, crate::dsrlb_bin())
        .arg("--socket")
        .arg(socket)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .expect("starting the dsrlb CLI");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Whether `eth0` in namespace `ns` carries an XDP program.
#[must_use]
pub fn xdp_attached(ns: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "eth0"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
}

/// Lookups by name in a [`Status`], for what the tests read of it.
pub trait StatusExt {
    /// The listener named `name`.
    fn listener(&self, name: &str) -> Option<&ListenerStatus>;
    /// Backend `backend` of listener `listener`.
    fn backend(&self, listener: &str, backend: &str) -> Option<&BackendStatus>;
}

impl StatusExt for Status {
    fn listener(&self, name: &str) -> Option<&ListenerStatus> {
        self.listeners.iter().find(|l| l.name == name)
    }

    fn backend(&self, listener: &str, backend: &str) -> Option<&BackendStatus> {
        self.listener(listener)?.backend(backend)
    }
}

/// Lookups by name in a [`ListenerStatus`].
pub trait ListenerExt {
    /// The backend named `name`.
    fn backend(&self, name: &str) -> Option<&BackendStatus>;
}

impl ListenerExt for ListenerStatus {
    fn backend(&self, name: &str) -> Option<&BackendStatus> {
        self.backends.iter().find(|b| b.name == name)
    }
}
