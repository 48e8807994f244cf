//! The control socket: a unix socket (mode 0600, owned by the controller's user) speaking one
//! JSON request and one JSON response per line. The CLI is its client.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Where `dsrlb run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dsrlb/control.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Drain {
        backend: String,
    },
    Undrain {
        backend: String,
    },
    Weight {
        backend: String,
        weight: u32,
    },
    Reload,
    Flow {
        client: String,
        vip: String,
    },
    /// Detach, remove the pins, and exit.
    Stop,
    /// The Prometheus text (what `GET /metrics` serves).
    Metrics,
    /// Whether the controller serves and its program is attached: cheap (no walk of the flow
    /// table), for keepalived's health script.
    Ping,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    #[must_use]
    pub fn ok(data: serde_json::Value) -> Self {
        Self { ok: true, error: None, data }
    }

    #[must_use]
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self { ok: false, error: Some(e.to_string()), data: serde_json::Value::Null }
    }
}

/// A request on its way to the controller's loop, with the way back.
pub type Call = (Request, oneshot::Sender<Response>);

/// Binds the socket (replacing a stale one), mode 0600, and serves it until the process ends.
///
/// # Errors
/// When the socket cannot be bound, e.g. another controller holds it.
pub fn serve(path: &Path, calls: mpsc::Sender<Call>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        // A live controller answers; a stale socket from a crash does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another dsrlb controller is running", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let calls = calls.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Err(e) => Response::err(format!("bad request: {e}")),
                        Ok(req) => {
                            let (tx, rx) = oneshot::channel();
                            if calls.send((req, tx)).await.is_err() {
                                Response::err("the controller is shutting down")
                            } else {
                                rx.await.unwrap_or_else(|_| Response::err("the controller dropped the request"))
                            }
                        }
                    };
                    let mut out = serde_json::to_string(&resp).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
                    out.push('\n');
                    if write.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    }))
}

/// The CLI side: one request, one response.
///
/// # Errors
/// With a message for the operator when no controller runs or the socket is not theirs.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no controller is running: {} does not exist (start one with `dsrlb run --config FILE`)", path.display())
        }
        Err(e) => bail!("cannot reach {}: {e}", path.display()),
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!("{} belongs to uid {}, not to you (uid {me}): run the CLI as that user (usually root)", path.display(), meta.uid());
    }
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            anyhow::anyhow!("no controller is running: {} is stale (dsrlb run removes it on start)", path.display())
        } else if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!("permission denied on {}: run the CLI as root", path.display())
        } else {
            anyhow::anyhow!("connecting to {}: {e}", path.display())
        }
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).context("reading the controller's answer")?;
    serde_json::from_str(&answer).with_context(|| format!("the controller answered {answer:?}"))
}

/// The socket path from `--socket` or the default.
#[must_use]
pub fn socket_path(arg: Option<&PathBuf>) -> PathBuf {
    arg.cloned().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
