//! The sd_notify datagram protocol, sender side: `READY=1`, `MAINPID=`,
//! `STOPPING=1`, `STATUS=` to the socket named by `NOTIFY_SOCKET`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Parses a `NOTIFY_SOCKET` value: an absolute path, or `@name` for an
/// abstract socket.
pub(crate) fn address(socket: &str) -> io::Result<SocketAddr> {
    if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={socket:?} is neither an absolute path nor @abstract"),
        ))
    }
}

/// Sends one notification datagram (`KEY=VALUE` lines) to `socket`.
pub(crate) fn send(socket: &str, message: &str) -> io::Result<()> {
    let addr = address(socket)?;
    // std creates the socket close-on-exec.
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(message.as_bytes(), &addr)?;
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram truncated",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("handover-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\nMAINPID=7").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nMAINPID=7");

        let name = format!("@handover-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&address(&name).unwrap()).unwrap();
        send(&name, "STOPPING=1").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(address("notify.sock").is_err());
        assert!(send("/nonexistent/handover/notify.sock", "READY=1").is_err());
    }
}
