//! The controller's side of the control socket: a unix socket (mode 0600, owned by the
//! controller's user, or 0660 for a configured group) for root, the controller's user and that
//! group only (checked with the peer's credentials). Beside it, with `read_only_group`, the
//! read-only socket (mode 0660, that group's) serves only the requests that change nothing and
//! show no client traffic. Each request goes to the controller's loop as a [`Call`]; a trace
//! then streams the data plane's decisions from the [`TraceHub`].

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use super::proto::{MAX_REQUEST_LINE, Request, Response, TraceLine, TraceStart, read_only_path};
use crate::{
    dataplane::{
        clock::Clock,
        trace::{Filter, Session, TraceHub},
    },
    redact::Redactor,
    trace::Event,
};

/// A request on its way to the controller's loop, with the way back.
pub type Call = (Request, oneshot::Sender<Response>);

/// Who may talk to the controller besides root and the controller's own user, and what about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A group whose members may (the socket is then mode 0660, group-owned); none: mode 0600.
    pub group: Option<u32>,
    /// Serve only the requests that change nothing and show no client traffic, to everyone
    /// who may connect ([`Request::not_read_only`]).
    pub read_only: bool,
}

/// Refuses a socket directory someone else could plant things in: it must be a real directory
/// (no symlink anywhere in its path), owned by this user, and writable by no one else.
fn trusted_dir(dir: &Path) -> anyhow::Result<()> {
    let real = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let absolute = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir()?.join(dir) };
    if real != absolute {
        bail!("{} resolves to {} through a symlink: give the socket a directory without symlinks", dir.display(), real.display());
    }
    let meta = std::fs::metadata(&real).with_context(|| format!("reading {}", real.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is owned by uid {} with mode {:o}: the control socket's directory must be this user's (uid {me}) and writable by no one \
             else, or others could replace the socket",
            real.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Whether the peer of `stream` may send requests: root, the controller's user, or a member of
/// `access.group` (as its primary or a supplementary group, from `SO_PEERCRED` and
/// `SO_PEERGROUPS`). `Ok(true)` for root and the controller's user.
fn allowed(stream: &tokio::net::UnixStream, access: Access) -> Result<bool, String> {
    let cred = stream.peer_cred().map_err(|e| format!("reading the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == me {
        return Ok(true);
    }
    if let Some(group) = access.group
        && (cred.gid() == group || peer_groups(stream).contains(&group))
    {
        return Ok(false);
    }
    Err(format!(
        "uid {} may not control this balancer (root, uid {me}{})",
        cred.uid(),
        access.group.map_or(String::new(), |g| format!(" or group {g}"))
    ))
}

/// The peer's supplementary groups (`SO_PEERGROUPS`; empty when the kernel cannot say).
fn peer_groups(stream: &tokio::net::UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd as _;
    let mut groups = vec![0u32; 256];
    let mut len = libc::socklen_t::try_from(groups.len() * 4).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `groups` and updates `len`.
    let rc =
        unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &raw mut len) };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// The sockets a controller serves: the control socket, and the read-only one beside it when
/// a group is given; [`Sockets::close`] stops serving them and removes them.
pub struct Sockets {
    served: Vec<(tokio::task::JoinHandle<()>, PathBuf)>,
    replies: Replies,
}

/// Requests handed to the controller whose answers are not yet written back: counted so that
/// the controller's last answers (`dsrlb stop`'s own) reach their clients before the process
/// exits, which would otherwise end the tasks that write them.
#[derive(Clone, Default)]
pub struct Replies(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

/// One request's answer on its way back; counted in [`Replies`] until dropped.
struct Pending(Replies);

impl Replies {
    fn enter(&self) -> Pending {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Pending(self.clone())
    }

    /// Waits until every answer handed over has been written (or its client has gone), for at
    /// most `bound`; whether they all were.
    pub async fn written(&self, bound: Duration) -> bool {
        tokio::time::timeout(bound, async {
            loop {
                // Made before the check, so that a decrement to zero in between still wakes it.
                let notified = self.0.1.notified();
                if self.0.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

impl Sockets {
    /// Serves the control socket at `socket` for `access`, and with `read_only_group`, the
    /// read-only socket beside it ([`read_only_path`]) for that group.
    ///
    /// # Errors
    /// As [`serve`], for either socket; neither is left behind then.
    pub fn serve(
        socket: &Path,
        access: Access,
        read_only_group: Option<u32>,
        calls: mpsc::Sender<Call>,
        traces: Option<Arc<TraceHub>>,
    ) -> anyhow::Result<Self> {
        let replies = Replies::default();
        let mut sockets =
            Self { served: vec![(serve_counted(socket, access, calls.clone(), traces, replies.clone())?, socket.to_path_buf())], replies };
        if let Some(group) = read_only_group {
            let ro = read_only_path(socket);
            match serve_counted(&ro, Access { group: Some(group), read_only: true }, calls, None, sockets.replies.clone()) {
                Ok(task) => sockets.served.push((task, ro)),
                Err(e) => {
                    drop(sockets.close());
                    return Err(e.context("serving the read-only control socket"));
                }
            }
        }
        Ok(sockets)
    }

    /// Stops serving (no new connections) and removes the sockets; the answers still on their
    /// way are counted in what it returns.
    #[must_use]
    pub fn close(self) -> Replies {
        for (task, path) in self.served {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        self.replies
    }
}

/// Binds the socket (replacing a stale one) with no window in which it has looser permissions
/// (the umask is set before `bind`), and serves it until the process ends.
///
/// # Errors
/// When the socket's directory is not trusted, the path is something other than a stale
/// socket, another controller holds it, or binding fails.
pub fn serve(
    path: &Path,
    access: Access,
    calls: mpsc::Sender<Call>,
    traces: Option<Arc<TraceHub>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    serve_counted(path, access, calls, traces, Replies::default())
}

/// [`serve`], its answers on their way counted in `replies`.
fn serve_counted(
    path: &Path,
    access: Access,
    calls: mpsc::Sender<Call>,
    traces: Option<Arc<TraceHub>>,
    replies: Replies,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    trusted_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live controller answers; a stale socket from a crash does not.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use: another dsrlb controller is running", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket: remove it, or give --socket another path", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    // SAFETY: umask swaps the process's file mode mask; the old one is put back right after.
    let old = unsafe { libc::umask(0o777 & !mode) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    if let Some(group) = access.group {
        std::os::unix::fs::chown(path, None, Some(group)).with_context(|| format!("giving {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: wait rather than spin, as the metrics endpoint does.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let calls = calls.clone();
            tokio::spawn(serve_one(stream, access, calls, traces.clone(), replies.clone()));
        }
    }))
}

/// One client: a request per line, each at most [`MAX_REQUEST_LINE`] bytes.
async fn serve_one(
    stream: tokio::net::UnixStream,
    access: Access,
    calls: mpsc::Sender<Call>,
    traces: Option<Arc<TraceHub>>,
    replies: Replies,
) {
    use tokio::io::AsyncReadExt as _;
    let (privileged, refused) = match allowed(&stream, access) {
        Ok(p) => (p, None),
        Err(why) => (false, Some(why)),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader).take(MAX_REQUEST_LINE + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let too_long = n as u64 > MAX_REQUEST_LINE || (line.last() != Some(&b'\n') && n as u64 == MAX_REQUEST_LINE + 1);
        let pending = replies.enter();
        let resp = if let Some(why) = &refused {
            Response::err(why)
        } else if too_long {
            Response::err(format!("request longer than {MAX_REQUEST_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => Response::err(format!("bad request: {e}")),
                Ok(req) if access.read_only && req.not_read_only().is_some() => Response::err(format!(
                    "dsrlb {} is not served on the read-only control socket ({}): it serves status, stats, flow, metrics and ping; \
                     run dsrlb {} as root or as a member of the controller's --socket-group",
                    req.name(),
                    req.not_read_only().unwrap_or_default(),
                    req.name()
                )),
                Ok(Request::Trace { raw: true, .. }) if !privileged => Response::err(
                    "dsrlb trace --raw shows MQTT usernames and passwords: only root and the controller's user may ask for it \
                     (without --raw, CONNECT credentials are masked)",
                ),
                Ok(req) => {
                    let trace = match &req {
                        Request::Trace { sample, raw, .. } => Some((*sample, *raw)),
                        _ => None,
                    };
                    let (tx, rx) = oneshot::channel();
                    let resp = if calls.send((req, tx)).await.is_err() {
                        Response::err("the controller is shutting down")
                    } else {
                        rx.await.unwrap_or_else(|_| Response::err("the controller dropped the request"))
                    };
                    match (trace, resp.ok) {
                        (Some((sample, raw)), true) => {
                            let listener = resp.data_as::<TraceStart>().ok().and_then(|t| t.listener_id);
                            match traces.as_ref().map(|hub| hub.start(Filter { sample, listener })) {
                                Some(Ok(session)) => {
                                    let mut out = serde_json::to_string(&resp).unwrap_or_default();
                                    out.push('\n');
                                    let started = write.write_all(out.as_bytes()).await.is_ok();
                                    drop(pending);
                                    if started {
                                        stream_trace(session, &mut reader, &mut write, raw).await;
                                    }
                                    return;
                                }
                                Some(Err(e)) => Response::err(format!("{e:#}")),
                                None => Response::err("this controller serves no traces"),
                            }
                        }
                        _ => resp,
                    }
                }
            }
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
        out.push('\n');
        let written = write.write_all(out.as_bytes()).await.is_ok();
        drop(pending);
        if !written || refused.is_some() || too_long {
            return;
        }
    }
}

/// Events sent per write while a trace streams.
const TRACE_BATCH: usize = 256;

/// How long a trace client may leave its events unread before its trace ends.
const TRACE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams a trace session's events to its client until the client closes the connection (or
/// sends anything) or a write fails; dropping the session switches tracing off. Unless `raw`,
/// MQTT CONNECT credentials are masked in each frame before it is sent.
async fn stream_trace(
    mut session: Session,
    reader: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    raw: bool,
) {
    use tokio::io::AsyncReadExt as _;
    let clock = Clock::now();
    let mut redactor = (!raw).then(Redactor::default);
    let mut events = Vec::with_capacity(TRACE_BATCH);
    let mut scratch = [0u8; 64];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lost_sent = 0;
    loop {
        let mut out = String::new();
        tokio::select! {
            // The client sends nothing: any read that returns means it is gone or done.
            _ = reader.read(&mut scratch) => return,
            got = session.next(&mut events, TRACE_BATCH) => {
                if let Err(e) = got {
                    tracing::warn!(error = %format!("{e:#}"), "trace stopped");
                    return;
                }
                for mut ev in events.drain(..) {
                    let caplen = (ev.caplen as usize).min(ev.frame.len());
                    let masked = redactor.as_mut().and_then(|r| r.mask(&mut ev.frame[..caplen]));
                    let event = Event { masked, ..Event::from_raw(&ev, &clock) };
                    out.push_str(&serde_json::to_string(&TraceLine::Event(event)).unwrap_or_default());
                    out.push('\n');
                }
            }
            _ = tick.tick() => {
                if let Err(e) = session.renew() {
                    tracing::warn!(error = %format!("{e:#}"), "trace stopped: renewing its lease failed");
                    return;
                }
                let lost = session.lost();
                if lost != lost_sent {
                    lost_sent = lost;
                    out = serde_json::to_string(&TraceLine::Lost { lost }).unwrap_or_default();
                    out.push('\n');
                }
            }
        }
        // A client that stops reading (a stopped terminal) ends its trace rather than holding
        // tracing on.
        if !out.is_empty() && !matches!(tokio::time::timeout(TRACE_WRITE_TIMEOUT, write.write_all(out.as_bytes())).await, Ok(Ok(()))) {
            return;
        }
    }
}
