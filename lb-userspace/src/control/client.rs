//! The CLI's side of the control socket: connect (falling back to the read-only socket when
//! the control socket is not this user's), send one request, read one response.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::proto::{DEFAULT_SOCKET, Request, Response, read_only_path};

/// The CLI side: one request, one response.
///
/// # Errors
/// With a message for the operator when no controller runs or the socket is not theirs.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).context("reading the controller's answer")?;
    serde_json::from_str(&answer).with_context(|| format!("the controller answered {answer:?}"))
}

/// Connects to the controller's socket `path`, or to the read-only socket beside it when `path`
/// is not this user's; with a message for the operator when it cannot.
///
/// # Errors
/// When no controller is running or neither socket is theirs.
pub fn connect(path: &Path) -> anyhow::Result<std::os::unix::net::UnixStream> {
    use std::io::ErrorKind;
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => Ok(stream),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            let ro = read_only_path(path);
            std::os::unix::net::UnixStream::connect(&ro).map_err(|_| {
                anyhow::anyhow!(
                    "permission denied on {}: run the CLI as root, or as a member of the controller's --socket-group (or, for \
                     status, stats, flow and ping, of its read_only_group, through {})",
                    path.display(),
                    ro.display()
                )
            })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("no controller is running: {} does not exist (start one with `dsrlb run --config FILE`)", path.display())
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            bail!("no controller is running: {} is stale (dsrlb run removes it on start)", path.display())
        }
        Err(e) => bail!("connecting to {}: {e}", path.display()),
    }
}

/// The socket path from `--socket` or the default.
#[must_use]
pub fn socket_path(arg: Option<&PathBuf>) -> PathBuf {
    arg.cloned().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
