//! The control socket on its own (a stand-in answers every request): who may talk to it, where it
//! may live, and what it reads. The CLI runs as other users against it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use lb_userspace::control::{self, Access, Call, MAX_REQUEST_LINE, Response};
use tests::{dsrlb_bin, require_root};

/// An unprivileged user and a group of its own for the tests.
const NOBODY: u32 = 65534;
const TEST_GROUP: u32 = 60_123;

/// Serves `socket` on a runtime of its own, answering every request with `{"serving": true}`.
struct Server {
    _rt: tokio::runtime::Runtime,
}

fn serve(socket: &Path, access: Access) -> anyhow::Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Call>(8);
    rt.block_on(async { control::serve(socket, access, tx, None) })?;
    rt.spawn(async move {
        while let Some((_, reply)) = rx.recv().await {
            let _ = reply.send(Response::ok(serde_json::json!({ "serving": true, "program": 1 })));
        }
    });
    Ok(Server { _rt: rt })
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsrlb-sock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A copy of the `dsrlb` binary that every user may run (the build's own may sit under a
/// directory only root can enter).
fn public_dsrlb() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsrlb-sock-bin-{}", std::process::id()));
    let bin = dir.join("dsrlb");
    if !bin.exists() {
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(dsrlb_bin(), &bin).expect("copying dsrlb");
        for p in [&dir, &bin] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
    }
    bin
}

/// `dsrlb --socket S ping` as `uid` with primary group `gid` and supplementary `groups`.
fn ping_as(socket: &Path, uid: u32, gid: u32, groups: &'static [u32]) -> (bool, String) {
    cli_as(socket, uid, gid, groups, &["ping"])
}

/// `dsrlb --socket S ARGS` as `uid` with primary group `gid` and supplementary `groups`:
/// whether it succeeded, and its output.
fn cli_as(socket: &Path, uid: u32, gid: u32, groups: &'static [u32], args: &[&str]) -> (bool, String) {
    let mut c = Command::new(public_dsrlb());
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
    let _server = serve(&socket, Access { group: Some(TEST_GROUP) }).expect("serve");
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
    let _server = serve(&socket, Access { group: Some(TEST_GROUP) }).expect("serve");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["trace", "--raw"]);
    assert!(!ok && out.contains("dsrlb trace --raw shows MQTT usernames and passwords: only root"), "{out}");
    let (ok, out) = cli_as(&socket, NOBODY, TEST_GROUP, &[], &["trace"]);
    assert!(!ok && out.contains("this controller serves no traces"), "the group's masked trace was refused: {out}");
    let (ok, out) = cli_as(&socket, 0, 0, &[], &["trace", "--raw"]);
    assert!(!ok && out.contains("this controller serves no traces"), "root's raw trace was refused: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}
