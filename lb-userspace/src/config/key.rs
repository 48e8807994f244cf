//! Secret files, read once at load, that only their owner may read: the cluster's key file and
//! an HTTP check's credentials.

use std::path::Path;

use super::SyncKey;

/// The shortest `key_file` taken: 128 bits.
pub const MIN_SYNC_KEY_BYTES: usize = 16;
/// The largest `key_file` read: a key is tens of bytes, and nothing larger is read into memory.
pub const MAX_SYNC_KEY_FILE_BYTES: u64 = 4096;

/// Reads a cluster key file: a regular file (not a symbolic link) of at most
/// [`MAX_SYNC_KEY_FILE_BYTES`], owned by this process's user and readable by it alone, holding
/// at least [`MIN_SYNC_KEY_BYTES`] bytes (surrounding whitespace ignored). Read through one
/// descriptor: what is checked is what is read, even if the path is changed meanwhile.
///
/// # Errors
/// When it cannot be opened, is a link or not a regular file, is too long or too short, or
/// others may read it.
pub fn read_sync_key(path: &Path) -> anyhow::Result<SyncKey> {
    let bytes = read_secret(path, "key file")?;
    let key = bytes.trim_ascii();
    anyhow::ensure!(
        key.len() >= MIN_SYNC_KEY_BYTES,
        "{} holds {} bytes: a key needs at least {MIN_SYNC_KEY_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        path.display(),
        key.len()
    );
    Ok(SyncKey(std::sync::Arc::from(key)))
}

/// An HTTP check's credentials (`http_auth_file`): one line `user:password`, in a file read as
/// a key file is.
///
/// # Errors
/// As [`read_sync_key`]'s checks of the file; when it holds no `user:password` line, or control
/// characters.
pub fn read_http_auth(path: &Path) -> anyhow::Result<String> {
    let bytes = read_secret(path, "credentials file")?;
    let text = std::str::from_utf8(bytes.trim_ascii()).map_err(|_| anyhow::anyhow!("{} is not UTF-8", path.display()))?;
    anyhow::ensure!(
        text.contains(':') && !text.chars().any(char::is_control),
        "{} must hold one line, user:password (for HTTP basic authentication)",
        path.display()
    );
    Ok(text.to_owned())
}

/// A secret file's bytes: a regular file (not a symbolic link) of at most
/// [`MAX_SYNC_KEY_FILE_BYTES`], owned by this process's user and readable by it alone, read
/// through one descriptor.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::{
        io::Read as _,
        os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    };
    // O_NONBLOCK: a FIFO is refused below rather than waited on for a writer.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(
            |e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    anyhow::anyhow!("{} is a symbolic link, which is not followed: name the {what} itself", path.display())
                } else {
                    anyhow::anyhow!("reading {}: {e}", path.display())
                }
            },
        )?;
    let meta = file.metadata().map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind_is = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        anyhow::bail!("{} is {kind_is}: a {what} must be a regular file", path.display());
    }
    anyhow::ensure!(
        meta.len() <= MAX_SYNC_KEY_FILE_BYTES,
        "{} holds {} bytes: a {what} holds at most {MAX_SYNC_KEY_FILE_BYTES}",
        path.display(),
        meta.len()
    );
    // SAFETY: geteuid has no failure mode.
    let me = unsafe { libc::geteuid() };
    anyhow::ensure!(meta.uid() == me, "{} belongs to uid {}, not to this process's ({me}): chown it", path.display(), meta.uid());
    let others = meta.permissions().mode() & 0o077;
    anyhow::ensure!(others == 0, "{} may be read by others (mode {:o}): chmod 600 it", path.display(), meta.permissions().mode() & 0o777);
    let mut bytes = Vec::new();
    file.take(MAX_SYNC_KEY_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_SYNC_KEY_FILE_BYTES,
        "{} grew past {MAX_SYNC_KEY_FILE_BYTES} bytes while it was read",
        path.display()
    );
    Ok(bytes)
}
