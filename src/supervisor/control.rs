//! The control socket: `handover upgrade` and `handover status` talk to the
//! supervisor over a Unix stream socket (mode 0600; the peer's uid is checked
//! with `SO_PEERCRED`, so only the supervisor's user and root are served).
//!
//! The protocol is lines of text. The client sends one request line,
//! `upgrade`, `status` or `status json`. For `upgrade` the supervisor answers
//! with progress lines (`waiting: ...`, `step: ...`) and ends with exactly one
//! outcome line, `ok: ...`, `failed: ...` or `refused: ...`; `error: ...`
//! means the request itself was not served. For `status` it sends the status
//! and closes the connection.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::cli::{format_duration, ClientConfig};
use super::error::Error;
use crate::listen::{probe_socket_path, SocketPath};

/// Where the progress and outcome lines of one upgrade request go.
pub(crate) type Waiter = mpsc::UnboundedSender<String>;

/// A request from a control client, for the supervisor's loop.
pub(crate) enum Request {
    /// Upgrade, and report to this waiter.
    Upgrade(Waiter),
    /// The status, as JSON or text.
    Status {
        json: bool,
        reply: oneshot::Sender<String>,
    },
}

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line accepted.
const MAX_REQUEST: u64 = 256;

fn control_error(path: &Path, problem: impl Into<String>, source: Option<io::Error>) -> Error {
    Error::Control {
        path: path.to_path_buf(),
        problem: problem.into(),
        source,
    }
}

/// Whose a file or directory may be for the control socket to be trusted:
/// this user's, or root's.
fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == me || uid == 0
}

/// Opens the socket's directory, creating it (mode 0700) when missing,
/// without following a symbolic link, and refuses one that this user does
/// not own or that group or others can write: anyone who can write there can
/// replace the socket and impersonate the supervisor. Returns the open
/// directory, which pins it for `bind`.
fn prepare_directory(path: &Path) -> Result<std::fs::File, Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("/"),
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(above) = dir.parent() {
                std::fs::create_dir_all(above)
                    .map_err(|e| control_error(path, "cannot create its directory", Some(e)))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => info!(dir = %dir.display(), "created the control socket's directory"),
                // Someone made it meanwhile: checked below like any other.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(control_error(path, "cannot create its directory", Some(e))),
            }
        }
        Err(e) => return Err(control_error(path, "cannot inspect its directory", Some(e))),
        Ok(_) => {}
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir);
    let file = match opened {
        Ok(file) => file,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            return Err(control_error(
                path,
                format!(
                    "{} is a symbolic link or not a directory; it is not followed",
                    dir.display()
                ),
                None,
            ))
        }
        Err(e) => return Err(control_error(path, "cannot open its directory", Some(e))),
    };
    let meta = file
        .metadata()
        .map_err(|e| control_error(path, "cannot inspect its directory", Some(e)))?;
    let me = crate::sys::euid();
    if meta.uid() != me {
        return Err(control_error(
            path,
            format!(
                "its directory belongs to uid {}, not to this user (uid {me})",
                meta.uid()
            ),
            None,
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(control_error(
            path,
            format!(
                "its directory {} has mode {:04o}: group or others could replace the socket",
                dir.display(),
                meta.mode() & 0o7777
            ),
            None,
        ));
    }
    Ok(file)
}

/// Binds the control socket at `path` with mode 0600, replacing a stale
/// socket file left by a supervisor that is gone. Call it while the process
/// has one thread (it changes the umask around `bind`).
pub(crate) fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    let dir = prepare_directory(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| control_error(path, "has no file name", None))?;
    // The directory just checked, not whatever its path names by now (unless
    // that path would not fit in sun_path).
    let mut pinned = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    if pinned.as_os_str().len() > 107 {
        pinned = path.to_path_buf();
    }
    let probed = probe_socket_path(&pinned)
        .map_err(|e| control_error(path, "cannot probe the existing socket", Some(e)))?;
    match probed {
        SocketPath::Free => {}
        SocketPath::NotSocket => {
            return Err(control_error(path, "exists and is not a socket", None))
        }
        SocketPath::Live => {
            return Err(Error::ControlInUse {
                path: path.to_path_buf(),
            })
        }
        SocketPath::Stale => {
            info!(path = %path.display(), "removing the stale control socket of a supervisor that is gone");
            std::fs::remove_file(&pinned)
                .map_err(|e| control_error(path, "cannot remove the stale socket", Some(e)))?;
        }
    }
    // The socket file is created with the umask applied: 0600 from birth,
    // rather than chmod after a window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(&pinned);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| control_error(path, "cannot bind", Some(e)))?;
    std::fs::set_permissions(&pinned, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| control_error(path, "cannot set mode 0600", Some(e)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| control_error(path, "cannot make it non-blocking", Some(e)))?;
    Ok(listener)
}

/// Accepts control connections until aborted, one task each. Every task
/// holds a clone of `alive` until it has written its last line, so that the
/// supervisor can let clients read their outcome before it exits.
pub(crate) async fn serve(
    listener: UnixListener,
    requests: mpsc::UnboundedSender<Request>,
    alive: mpsc::Sender<()>,
) {
    let own_uid = crate::sys::euid();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let alive = alive.clone();
                let requests = requests.clone();
                tokio::spawn(async move {
                    handle(stream, requests, own_uid).await;
                    drop(alive);
                });
            }
            Err(e) => {
                // Out of fds and the like: the connection stays queued; try
                // again shortly rather than spin.
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, requests: mpsc::UnboundedSender<Request>, own_uid: u32) {
    let refusal = match stream.peer_cred() {
        Ok(cred) if cred.uid() == own_uid || cred.uid() == 0 => None,
        Ok(cred) => {
            warn!(
                uid = cred.uid(),
                pid = cred.pid().unwrap_or(0),
                "control connection refused: not the supervisor's user"
            );
            Some(format!(
                "error: uid {} may not use this control socket (only uid {own_uid} and root)\n",
                cred.uid()
            ))
        }
        Err(e) => {
            warn!(error = %e, "control connection refused: peer credentials unknown");
            Some("error: peer credentials unknown\n".to_owned())
        }
    };
    let (read, mut write) = stream.into_split();
    // The request is read even when refused: closing a socket with unread
    // data resets it, and the client would not see why.
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "control connection: cannot read the request");
            return;
        }
        Err(_) => {
            let _ = write
                .write_all(b"error: no request received in time\n")
                .await;
            return;
        }
    }
    if let Some(refusal) = refusal {
        let _ = write.write_all(refusal.as_bytes()).await;
        let _ = write.shutdown().await;
        return;
    }
    match line.trim() {
        "upgrade" => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            if requests.send(Request::Upgrade(tx)).is_err() {
                let _ = write.write_all(b"error: the supervisor is exiting\n").await;
                return;
            }
            while let Some(line) = rx.recv().await {
                let line = format!("{line}\n");
                if write.write_all(line.as_bytes()).await.is_err() {
                    // The client left; the upgrade goes on without it.
                    debug!("control client left before the outcome");
                    return;
                }
            }
        }
        request @ ("status" | "status json") => {
            let (reply, rx) = oneshot::channel();
            let json = request == "status json";
            if requests.send(Request::Status { json, reply }).is_err() {
                let _ = write.write_all(b"error: the supervisor is exiting\n").await;
                return;
            }
            if let Ok(text) = rx.await {
                let _ = write.write_all(text.as_bytes()).await;
            }
        }
        other => {
            let line = format!("error: unknown request {other:?} (use upgrade or status)\n");
            let _ = write.write_all(line.as_bytes()).await;
        }
    }
    let _ = write.shutdown().await;
}

/// Refuses a control socket that another user could have put there: its
/// directory and the socket itself must be this user's or root's, the
/// directory not a symbolic link and not writable by group or others.
/// A path that does not exist passes (connecting then says so).
fn check_path(path: &Path) -> Result<(), String> {
    let me = crate::sys::euid();
    let refuse = |what: String| {
        format!(
            "refusing the control socket {}: {what}; another user may be impersonating the \
             supervisor",
            path.display()
        )
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("/"),
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", dir.display())),
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(refuse(format!("{} is a symbolic link", dir.display())));
            }
            if !meta.is_dir() {
                return Err(refuse(format!("{} is not a directory", dir.display())));
            }
            if !trusted_owner(meta.uid(), me) {
                return Err(refuse(format!(
                    "its directory {} belongs to uid {}, not to you (uid {me}) or root",
                    dir.display(),
                    meta.uid()
                )));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(refuse(format!(
                    "its directory {} has mode {:04o} (group or others can write it)",
                    dir.display(),
                    meta.mode() & 0o7777
                )));
            }
        }
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => Err(refuse("it is not a socket".to_owned())),
        Ok(meta) if !trusted_owner(meta.uid(), me) => Err(refuse(format!(
            "it belongs to uid {}, not to you (uid {me}) or root",
            meta.uid()
        ))),
        Ok(_) => Ok(()),
    }
}

/// Checks who listens at the other end (`SO_PEERCRED`: the credentials of
/// the process that called `listen`).
fn check_peer(path: &Path, stream: &StdUnixStream) -> Result<(), String> {
    let me = crate::sys::euid();
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot check who serves {}: {e}", path.display()))?;
    if trusted_owner(cred.uid(), me) {
        return Ok(());
    }
    Err(format!(
        "refusing the control socket {}: it is served by uid {} (pid {}), not by you (uid {me}) \
         or root; another user may be impersonating the supervisor",
        path.display(),
        cred.uid(),
        cred.pid()
    ))
}

/// Connects and sends `request`; the error is a sentence for the user.
fn connect(config: &ClientConfig, request: &str) -> Result<StdUnixStream, String> {
    let path = &config.control;
    check_path(path)?;
    let mut stream = StdUnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                " (is `handover run` running, with this --control path?)"
            }
            io::ErrorKind::PermissionDenied => " (run this as the supervisor's user)",
            _ => "",
        };
        format!(
            "cannot reach the supervisor at {}: {e}{hint}",
            path.display()
        )
    })?;
    check_peer(path, &stream)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("cannot send the request to {}: {e}", path.display()))?;
    Ok(stream)
}

/// A line from the supervisor as it may be shown on a terminal: control
/// characters (ESC and the like, which could rewrite the screen or the
/// title) become U+FFFD; a tab stays.
pub(crate) fn printable(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Reads lines until the supervisor closes the connection or the deadline
/// passes; `on_line` sees each line without its newline, made
/// [`printable`] (invalid UTF-8 is replaced too).
fn read_lines(
    stream: StdUnixStream,
    deadline: Instant,
    mut on_line: impl FnMut(&str),
) -> Result<(), String> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".to_owned());
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                on_line(&printable(text.trim_end_matches('\n')));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out".to_owned())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `handover upgrade`: prints the steps to `out` as they come; returns the
/// exit code (0 upgraded, 1 failed or refused, 2 could not ask).
pub(crate) fn upgrade(config: &ClientConfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let deadline = Instant::now() + config.timeout;
    let stream = match connect(config, "upgrade") {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "handover upgrade: {e}");
            return 2;
        }
    };
    let mut outcome = None;
    let result = read_lines(stream, deadline, |line| {
        if line.starts_with("error: ") {
            let _ = writeln!(err, "handover upgrade: {line}");
        } else {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        for (tag, code) in [
            ("ok: ", 0),
            ("failed: ", 1),
            ("refused: ", 1),
            ("error: ", 2),
        ] {
            if line.starts_with(tag) {
                outcome = Some(code);
            }
        }
    });
    match (outcome, result) {
        (Some(code), _) => code,
        (None, Err(e)) if e == "timed out" => {
            let _ = writeln!(
                err,
                "handover upgrade: no outcome within {} (--timeout); the upgrade may still \
                 complete: see `handover status`",
                format_duration(config.timeout)
            );
            2
        }
        (None, Err(e)) => {
            let _ = writeln!(
                err,
                "handover upgrade: connection to the supervisor failed: {e}"
            );
            2
        }
        (None, Ok(())) => {
            let _ = writeln!(
                err,
                "handover upgrade: the supervisor closed the connection without an outcome"
            );
            2
        }
    }
}

/// `handover status [--json]`: prints the status; returns the exit code (0,
/// or 2 when it could not ask).
pub(crate) fn status(config: &ClientConfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let deadline = Instant::now() + config.timeout;
    let request = if config.json { "status json" } else { "status" };
    let stream = match connect(config, request) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "handover status: {e}");
            return 2;
        }
    };
    let mut text = String::new();
    if let Err(e) = read_lines(stream, deadline, |line| {
        text.push_str(line);
        text.push('\n');
    }) {
        let _ = writeln!(err, "handover status: no answer from the supervisor: {e}");
        return 2;
    }
    if text.is_empty() || text.starts_with("error: ") {
        let _ = write!(
            err,
            "handover status: {}",
            if text.is_empty() {
                "the supervisor sent nothing\n"
            } else {
                &text
            }
        );
        return 2;
    }
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_not_printed() {
        assert_eq!(printable("ok: generation 2"), "ok: generation 2");
        assert_eq!(
            printable("ok: \u{1b}]0;owned\u{7} \u{1b}[2J\r\u{9b}x\tend"),
            "ok: \u{fffd}]0;owned\u{fffd} \u{fffd}[2J\u{fffd}\u{fffd}x\tend"
        );
    }

    #[test]
    fn owners() {
        assert!(trusted_owner(1000, 1000));
        assert!(trusted_owner(0, 1000));
        assert!(!trusted_owner(65534, 1000));
        assert!(!trusted_owner(65534, 0));
    }
}
