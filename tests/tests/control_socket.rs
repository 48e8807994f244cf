//! The control socket on its own (a stand-in answers every request): who may talk to it, where it
//! may live, and what it reads; the read-only socket beside it and what it refuses. The CLI runs
//! as other users against them. And a real controller's read-only socket, from its config.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use lb_userspace::control::{self, Access, Call, MAX_REQUEST_LINE, Response};
use tests::{dsrlb_bin, netns::Netns, require_root, wait};

/// An unprivileged user and a group of its own for the tests.
const NOBODY: u32 = 65534;
const TEST_GROUP: u32 = 60_123;

/// Serves `socket` on a runtime of its own, answering every request with `{"serving": true}`.
struct Server {
    _rt: tokio::runtime::Runtime,
}

fn serve(socket: &Path, access: Access) -> anyhow::Result<Server> {
    serve_with(|tx| control::serve(socket, access, tx, None).map(drop))
}

/// As [`serve`], with the read-only socket beside it for `group`.
fn serve_both(socket: &Path, group: u32) -> Server {
    serve_with(|tx| control::Sockets::serve(socket, Access::default(), Some(group), tx, None).map(drop)).expect("serve")
}

fn serve_with(start: impl FnOnce(tokio::sync::mpsc::Sender<Call>) -> anyhow::Result<()>) -> anyhow::Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Call>(8);
    rt.block_on(async { start(tx) })?;
    rt.spawn(async move {
        while let Some((_, reply)) = rx.recv().await {
            let _ = reply.send(Response::ok(serde_json::json!({ "serving": true, "program": 1 })));
        }
    });
    Ok(Server { _rt: rt })
}

/// A directory of the test's own under the temp dir, removed when the test ends (also when it
/// fails: it drops as the panic unwinds).
struct Temp(PathBuf);

impl std::ops::Deref for Temp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Temp {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(name: &str) -> Temp {
    let dir = std::env::temp_dir().join(format!("dsrlb-sock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    Temp(dir)
}

/// The `dsrlb` binary where every user may run it: linked into `dir` (the build's own may sit
/// under a directory only root can enter), which goes with the test's [`Temp`]. A link, not a
/// copy: the debug binary is large.
fn public_dsrlb(dir: &Path) -> PathBuf {
    let bin = dir.join("dsrlb");
    if !bin.exists() && std::fs::hard_link(dsrlb_bin(), &bin).is_err() {
        std::fs::copy(dsrlb_bin(), &bin).expect("copying dsrlb");
    }
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    bin
}

/// `dsrlb --socket S ping` as `uid` with primary group `gid` and supplementary `groups`.
fn ping_as(socket: &Path, uid: u32, gid: u32, groups: &'static [u32]) -> (bool, String) {
    cli_as(socket, uid, gid, groups, &["ping"])
}

/// `dsrlb --socket S ARGS` as `uid` with primary group `gid` and supplementary `groups`:
/// whether it succeeded, and its output.
fn cli_as(socket: &Path, uid: u32, gid: u32, groups: &'static [u32], args: &[&str]) -> (bool, String) {
    let mut c = Command::new(public_dsrlb(socket.parent().expect("the socket's directory")));
    c.arg("--socket").arg(socket).args(args);
    // SAFETY: in the child before exec, async-signal-safe calls only: the groups, then the
    // group, then the user (root's rights are gone after the last).
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = c.output().expect("the dsrlb CLI");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_socket_is_for_root_or_its_group_only() {
    require_root!();
    let dir = temp("access");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = dir.join("control.sock");
    let server = serve(&socket, Access::default()).expect("serve");
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "the socket is not root's alone");
    assert!(ping_as(&socket, 0, 0, &[]).0, "root is refused");
    let (ok, out) = ping_as(&socket, NOBODY, NOBODY, &[]);
    assert!(!ok && out.contains("permission denied"), "an unprivileged user got in: {out}");
    // Even should the file's mode be loosened by mistake, the peer's credentials are checked.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");
    let (ok, out) = ping_as(&socket, NOBODY, NOBODY, &[]);
    assert!(!ok && out.contains("uid 65534 may not control"), "the peer check let an unprivileged user in: {out}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    // With --socket-group: mode 0660, the group's, and its members (primary or supplementary) may.
    let dir = temp("group");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = dir.join("control.sock");
    let _server = serve(&socket, Access { group: Some(TEST_GROUP), ..Access::default() }).expect("serve");
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!((meta.gid(), meta.mode() & 0o777), (TEST_GROUP, 0o660));
    assert!(ping_as(&socket, NOBODY, TEST_GROUP, &[]).0, "a member by primary group is refused");
    assert!(ping_as(&socket, NOBODY, NOBODY, &[TEST_GROUP]).0, "a member by supplementary group is refused");
    assert!(!ping_as(&socket, NOBODY, NOBODY, &[]).0, "a non-member got in");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_socket_lives_only_where_no_one_else_can_plant_things() {
    require_root!();
    let dir = temp("where");
    // A directory others may write to.
    let open = dir.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).expect("chmod");
    let e = serve(&open.join("control.sock"), Access::default()).err().expect("a world-writable directory was accepted");
    assert!(format!("{e:#}").contains("writable by no one else"), "{e:#}");
    // A directory reached through a symlink someone planted.
    let real = dir.join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::os::unix::fs::symlink(&real, dir.join("link")).expect("symlink");
    let e = serve(&dir.join("link").join("control.sock"), Access::default()).err().expect("a symlinked directory was accepted");
    assert!(format!("{e:#}").contains("through a symlink"), "{e:#}");
    // A socket path that is something else (a file, a symlink to a file).
    std::fs::write(real.join("control.sock"), "not a socket").expect("write");
    let e = serve(&real.join("control.sock"), Access::default()).err().expect("a regular file was replaced");
    assert!(format!("{e:#}").contains("is not a socket"), "{e:#}");
    assert_eq!(std::fs::read_to_string(real.join("control.sock")).expect("read"), "not a socket", "the file was touched");
    std::os::unix::fs::symlink("/etc/hostname", real.join("other.sock")).expect("symlink");
    assert!(serve(&real.join("other.sock"), Access::default()).is_err(), "a symlinked socket path was replaced");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_line_longer_than_the_bound_is_refused() {
    require_root!();
    let dir = temp("long");
    let socket = dir.join("control.sock");
    let _server = serve(&socket, Access::default()).expect("serve");
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let line = vec![b'x'; usize::try_from(MAX_REQUEST_LINE).expect("small") + 100];
    stream.write_all(&line).expect("write");
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).expect("read");
    assert!(answer.contains(&format!("request longer than {MAX_REQUEST_LINE} bytes")), "{answer}");
    // And the connection is closed: nothing more is read from it.
    let mut rest = String::new();
    assert_eq!(BufReader::new(&stream).read_line(&mut rest).expect("read"), 0, "the connection stayed open");
    // A request of a normal size on a new connection is served.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    stream.write_all(b"{\"cmd\":\"ping\"}\n").expect("write");
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).expect("read");
    assert!(answer.contains("\"ok\":true"), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dsrlb trace --raw` shows MQTT passwords: the socket refuses it to the group, which may
/// trace with the credentials masked, and lets root ask (the stand-in then has no trace to
/// give).
#[test]
fn a_raw_trace_is_for_root_and_the_controllers_user_only() {
    require_root!();
    let dir = temp("raw");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = dir.join("control.sock");
    let _server = serve(&socket, Access { group: Some(TEST_GROUP), ..Access::default() }).expect("serve");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["trace", "--raw"]);
    assert!(!ok && out.contains("dsrlb trace --raw shows MQTT usernames and passwords: only root"), "{out}");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["trace"]);
    assert!(!ok && out.contains("this controller serves no traces"), "the group's masked trace was refused: {out}");
    let (ok, out) = cli_as(&socket, 0, 0, &[], &["trace", "--raw"]);
    assert!(!ok && out.contains("this controller serves no traces"), "root's raw trace was refused: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One request line on `socket` (as root), and its answer.
fn ask(socket: &Path, line: &str) -> Response {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).expect("read");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// What the read-only socket refuses and why, by request.
const REFUSED: [(&str, &str, &[&str]); 6] = [
    ("drain", "it changes the balancer", &["drain", "b1"]),
    ("undrain", "it changes the balancer", &["undrain", "b1"]),
    ("weight", "it changes the balancer", &["weight", "b1", "5"]),
    ("reload", "it changes the balancer", &["reload"]),
    ("stop", "it stops the balancer", &["stop"]),
    ("trace", "a trace shows the clients' traffic", &["trace"]),
];

/// What the read-only socket serves, as the CLI asks for it.
const SERVED: [&[&str]; 5] =
    [&["status", "--json"], &["status"], &["stats", "--json"], &["flow", "192.0.2.1:40000", "192.0.2.100:1883"], &["ping"]];

#[test]
fn the_read_only_socket_serves_its_group_what_changes_nothing_and_refuses_the_rest() {
    require_root!();
    let dir = temp("ro");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = dir.join("control.sock");
    let ro = dir.join("control-ro.sock");
    assert_eq!(control::read_only_path(&socket), ro);
    let server = serve_both(&socket, TEST_GROUP);
    let meta = |p: &Path| std::fs::metadata(p).map(|m| (m.uid(), m.gid(), m.mode() & 0o777)).expect("socket");
    assert_eq!(meta(&socket), (0, 0, 0o600), "the control socket stays root's alone");
    assert_eq!(meta(&ro), (0, TEST_GROUP, 0o660), "the read-only socket is the group's");

    // Whoever asks (root here), the read-only socket answers only the requests that change
    // nothing and show no traffic, and refuses the others by name, saying why.
    for line in [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"metrics"}"#,
        r#"{"cmd":"ping"}"#,
        r#"{"cmd":"flow","client":"192.0.2.1:40000","vip":"192.0.2.100:1883"}"#,
    ] {
        assert!(ask(&ro, line).ok, "{line} refused");
    }
    for (name, why, _) in REFUSED {
        let line = match name {
            "drain" | "undrain" => format!(r#"{{"cmd":"{name}","backend":"b1"}}"#),
            "weight" => r#"{"cmd":"weight","backend":"b1","weight":5}"#.to_owned(),
            _ => format!(r#"{{"cmd":"{name}"}}"#),
        };
        let resp = ask(&ro, &line);
        let error = resp.error.unwrap_or_default();
        assert!(
            !resp.ok && error.starts_with(&format!("dsrlb {name} is not served on the read-only control socket ({why})")),
            "{line}: {error}"
        );
        // The control socket serves it (the stand-in has no trace to give).
        let resp = ask(&socket, &line);
        assert!(resp.ok || resp.error.as_deref() == Some("this controller serves no traces"), "{line} on the control socket: {resp:?}");
    }

    // A member of the group, through the CLI given the control socket (not theirs): it falls
    // back to the read-only one.
    for args in SERVED {
        let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], args);
        assert!(ok, "dsrlb {}: {out}", args.join(" "));
    }
    for (name, why, args) in REFUSED {
        let (ok, out) = cli_as(&socket, NOBODY, NOBODY, &[TEST_GROUP], args);
        assert!(!ok && out.contains(&format!("dsrlb {name} is not served on the read-only control socket ({why})")), "dsrlb {name}: {out}");
    }
    // Someone else: neither socket, and the message names both ways in.
    let (ok, out) = cli_as(&socket, NOBODY, NOBODY, &[], &["status"]);
    assert!(!ok && out.contains("permission denied") && out.contains("read_only_group"), "{out}");
    // Closing removes both.
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dsrlb run` as a test started it: stopped (SIGKILL) and its pins removed when the test ends,
/// however it ends.
struct Controller {
    child: std::process::Child,
    pins: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = lb_userspace::dataplane::unpin_all(&self.pins);
        let _ = std::fs::remove_dir(&self.pins);
    }
}

#[test]
fn a_controller_serves_its_read_only_group_from_the_config_and_keeps_it_on_reload() {
    require_root!();
    let ns = Netns::new("dsrlb-t-ro-lb");
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"]);
    ns.ip(&["link", "set", "lb0", "up"]);
    ns.ip(&["link", "set", "lb1", "up"]);
    let dir = temp("controller");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let (socket, ro, config) = (dir.join("control.sock"), dir.join("control-ro.sock"), dir.join("dsrlb.toml"));
    let text = |group: u32| {
        format!(
            "interface = \"lb0\"\nxdp_mode = \"generic\"\nflow_table_size = 65536\nread_only_group = \"{group}\"\n[health]\ncheck = \"none\"\n\
             [[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n\
             [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\nmac = \"02:00:00:00:00:11\"\n"
        )
    };
    std::fs::write(&config, text(TEST_GROUP)).expect("config");
    let pins = PathBuf::from("/sys/fs/bpf/dsrlb-ro-test");
    let _ = lb_userspace::dataplane::unpin_all(&pins);
    let root = |args: &[&str]| {
        let out = Command::new(dsrlb_bin()).arg("--socket").arg(&socket).arg("--pin-dir").arg(&pins).args(args).output().expect("dsrlb");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let child = ns
        .command(dsrlb_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pins)
        .args(["run", "--metrics", "off", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("dsrlb run");
    let mut lb = Controller { child, pins: pins.clone() };
    let (twenty, every) = (std::time::Duration::from_secs(20), std::time::Duration::from_millis(50));
    wait::until_up("dsrlb run serving (ping answers)", &mut lb.child, twenty, every, || root(&["ping"]).0);
    let meta = std::fs::metadata(&ro).expect("the read-only socket");
    assert_eq!((meta.gid(), meta.mode() & 0o777), (TEST_GROUP, 0o660));

    // The group reads the real state, and changes nothing.
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["status", "--json"]);
    assert!(ok && out.contains("\"name\": \"mqtt\""), "{out}");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["flow", "192.0.2.1:40000", "192.0.2.100:1883"]);
    assert!(ok && out.starts_with("b1 -> "), "{out}");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["drain", "b1"]);
    assert!(!ok && out.contains("dsrlb drain is not served on the read-only control socket"), "{out}");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["stop"]);
    assert!(!ok && out.contains("dsrlb stop is not served"), "{out}");
    let (ok, out) = root(&["status", "--json"]);
    assert!(ok && !out.contains("\"drained\": true"), "the refused drain drained: {out}");
    assert!(lb.child.try_wait().expect("wait").is_none() && pins.join("link").exists(), "the refused stop stopped it");

    // A reload that changes the group is refused, and the socket stays the old group's.
    std::fs::write(&config, text(TEST_GROUP + 1)).expect("config");
    let (ok, out) = root(&["reload"]);
    assert!(!ok && out.contains("read_only_group cannot change on reload"), "{out}");
    assert_eq!(std::fs::metadata(&ro).expect("the read-only socket").gid(), TEST_GROUP);
    assert!(cli_as(&socket, NOBODY, TEST_GROUP, &[], &["ping"]).0);
    std::fs::write(&config, text(TEST_GROUP)).expect("config");
    assert!(root(&["reload"]).0, "a reload without the change");

    // dsrlb stop (root) removes both sockets with the pins.
    let (ok, out) = root(&["stop"]);
    assert!(ok, "{out}");
    assert!(lb.child.wait().expect("wait").success());
    assert!(!socket.exists() && !ro.exists(), "a socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dsrlb stop` is answered and the controller exits right after: the answer handed to the
/// socket's task must still be written before the runtime (the process) ends. On a runtime with
/// one thread the task runs only when the controller's side waits, so without the wait for
/// the answers on their way, the client reads nothing, every time.
#[test]
fn the_last_answer_is_written_before_the_controller_exits() {
    require_root!();
    let dir = temp("last-answer");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = dir.join("control.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (tx, mut calls) = tokio::sync::mpsc::channel::<Call>(4);
    let sockets = rt.block_on(async { control::Sockets::serve(&socket, Access::default(), None, tx, None) }).expect("serve");
    let client = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
            let mut line = serde_json::to_string(&control::Request::Stop).expect("request");
            line.push('\n');
            stream.write_all(line.as_bytes()).expect("request");
            let mut answer = String::new();
            let _ = BufReader::new(stream).read_line(&mut answer);
            answer
        }
    });
    let written = rt.block_on(async {
        let (_, reply) =
            tokio::time::timeout(std::time::Duration::from_secs(10), calls.recv()).await.expect("no request").expect("a request");
        let _ = reply.send(Response::ok(serde_json::json!({ "stopping": true })));
        sockets.close().written(std::time::Duration::from_secs(5)).await
    });
    drop(rt);
    let answer = client.join().expect("client");
    assert!(written, "the answer was not written within 5 s");
    assert!(answer.contains("\"stopping\":true"), "the client read {answer:?}");
}
