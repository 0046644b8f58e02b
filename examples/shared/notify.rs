//! sd_notify by hand, for the servers that do not use `handover` (`plain_server`,
//! `axum_naive`): what an app that knows nothing of this crate does to say it is ready.
//! Included with `#[path = "shared/notify.rs"] mod notify;`.

/// `READY=1` to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
pub fn ready() -> Result<(), String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| e.to_string())?;
            socket.send_to_addr(message.as_bytes(), &addr)
        }
        None => socket.send_to(message.as_bytes(), &path),
    };
    sent.map(|_| ())
        .map_err(|e| format!("NOTIFY_SOCKET {path:?}: {e}"))
}
