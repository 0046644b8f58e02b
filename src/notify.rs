//! The sd_notify datagram protocol: the sender side (`READY=1`, `MAINPID=`,
//! `STOPPING=1`, `STATUS=` to the socket named by `NOTIFY_SOCKET`), and the
//! receiver side used by the `handover run` supervisor.
//!
//! The receiver is one datagram socket per generation, bound to a fresh
//! abstract name chosen by the kernel (autobind), so that whoever sends on it
//! (the app, or a helper such as `systemd-notify` it started) speaks for that
//! generation. `SO_PASSCRED` makes the kernel attach the sender's pid, uid and
//! gid to every datagram. Fds passed with `SCM_RIGHTS` are taken and closed
//! at once: Debian's `systemd-notify --ready` sends `BARRIER=1` with an fd and
//! waits until the receiver closes it.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::sys::socket::{
    self as nsock, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    UnixCredentials,
};
use tokio::io::unix::AsyncFd;

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

/// The largest notification accepted; systemd uses the same bound.
const MAX_MESSAGE: usize = 4096;

/// The most fds one datagram can carry (the kernel's `SCM_MAX_FD`): the
/// control buffer has room for all of them, so none is ever left open
/// because of a truncated control message.
const MAX_PASSED_FDS: usize = 253;

/// Who sent a notification, as the kernel vouches (`SCM_CREDENTIALS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The sender's pid (in the receiver's pid namespace).
    pub pid: i32,
    /// The sender's user id.
    pub uid: u32,
    /// The sender's group id.
    pub gid: u32,
}

/// One received notification datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// The `KEY=VALUE` assignments, in order.
    pub fields: Vec<(String, String)>,
    /// The sender, when the kernel said (always, with `SO_PASSCRED`).
    pub sender: Option<Credentials>,
    /// How many fds came with it (all closed already).
    pub fds_closed: usize,
    /// The datagram was longer than [`MAX_MESSAGE`] and was cut.
    pub truncated: bool,
}

impl Message {
    /// The value of the last assignment of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether it says `READY=1`.
    pub(crate) fn is_ready(&self) -> bool {
        self.get("READY") == Some("1")
    }
}

/// Parses the text of a notification: newline-separated `KEY=VALUE`
/// assignments. Lines without `=` or with an empty key are skipped, as
/// systemd does; invalid UTF-8 is replaced.
pub(crate) fn parse_message(bytes: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(bytes)
        .split('\n')
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            (!key.is_empty()).then(|| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A notification socket for one child: `NOTIFY_SOCKET=@<name>`.
pub(crate) struct Receiver {
    fd: AsyncFd<OwnedFd>,
    address: String,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("address", &self.address)
            .finish()
    }
}

impl Receiver {
    /// Binds a datagram socket to a fresh abstract name (close-on-exec,
    /// non-blocking, `SO_PASSCRED` on). Needs a Tokio runtime with I/O.
    pub(crate) fn bind() -> io::Result<Receiver> {
        let fd = nsock::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        nsock::setsockopt(&fd, nsock::sockopt::PassCred, &true)?;
        // An address of the family alone: the kernel picks a unique
        // abstract name ("autobind").
        nsock::bind(fd.as_raw_fd(), &UnixAddr::new_unnamed())?;
        let local: UnixAddr = nsock::getsockname(fd.as_raw_fd())?;
        let name = local.as_abstract().ok_or_else(|| {
            io::Error::other("the notification socket got no abstract name from autobind")
        })?;
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|n| !n.is_empty() && !n.contains('\0'))
            .ok_or_else(|| io::Error::other("autobind gave an unprintable abstract name"))?;
        let address = format!("@{name}");
        let fd = crate::sys::async_fd(fd)?;
        Ok(Receiver { fd, address })
    }

    /// The value to put in the child's `NOTIFY_SOCKET`.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Waits for the next datagram. Fds passed with it are closed before
    /// this returns.
    pub(crate) async fn recv(&self) -> io::Result<Message> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| receive(fd.get_ref().as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvmsg` on a non-blocking notification socket.
fn receive(fd: RawFd) -> io::Result<Message> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; MAX_PASSED_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = loop {
        match nsock::recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let bytes = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let mut sender = None;
    let mut passed: Vec<OwnedFd> = Vec::new();
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for cmsg in cmsgs {
                match cmsg {
                    ControlMessageOwned::ScmRights(fds) => {
                        // SAFETY: these fds were installed in this process by
                        // the recvmsg just above, and nothing else owns them.
                        passed.extend(unsafe { crate::sys::own_received_fds(&fds) });
                    }
                    ControlMessageOwned::ScmCredentials(creds) => {
                        sender = Some(Credentials {
                            pid: creds.pid(),
                            uid: creds.uid(),
                            gid: creds.gid(),
                        });
                    }
                    _ => {}
                }
            }
        }
        // The buffer has room for the most fds a datagram can carry, so
        // the control data cannot be cut; should it be, the kernel did not
        // install what did not fit.
        Err(e) => tracing::warn!(error = %e, "notification control data truncated"),
    }
    let fds_closed = passed.len();
    // Closing them now releases a sender that waits on them (BARRIER=1).
    drop(passed);
    Ok(Message {
        fields: parse_message(&buf[..bytes.min(MAX_MESSAGE)]),
        sender,
        fds_closed,
        truncated,
    })
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

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn messages_parse_like_systemd() {
        assert_eq!(
            parse_message(b"READY=1\nSTATUS=a=b\n\nnonsense\n=x\nMAINPID=7"),
            vec![
                ("READY".to_owned(), "1".to_owned()),
                ("STATUS".to_owned(), "a=b".to_owned()),
                ("MAINPID".to_owned(), "7".to_owned()),
            ]
        );
        assert!(parse_message(b"").is_empty());
    }

    #[test]
    fn receiver_gets_credentials_and_closes_passed_fds() {
        runtime().block_on(async {
            let receiver = Receiver::bind().unwrap();
            assert!(receiver.address().starts_with('@'), "{receiver:?}");
            send(receiver.address(), "READY=1\nSTATUS=up").unwrap();
            let msg = receiver.recv().await.unwrap();
            assert!(msg.is_ready());
            assert_eq!(msg.get("STATUS"), Some("up"));
            let me = msg.sender.expect("credentials");
            assert_eq!(me.pid, std::process::id() as i32);
            assert_eq!(me.uid, crate::sys::euid());

            // A BARRIER=1 with the write end of a pipe, as systemd-notify
            // sends it: once received, the fd is closed, so the read end
            // sees EOF.
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            let sender = UnixDatagram::unbound().unwrap();
            let addr = address(receiver.address()).unwrap();
            sender.connect_addr(&addr).unwrap();
            let raw = [write.as_raw_fd()];
            let cmsg = [nsock::ControlMessage::ScmRights(&raw)];
            let iov = [std::io::IoSlice::new(b"BARRIER=1")];
            nsock::sendmsg::<()>(sender.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            drop(write);
            let msg = receiver.recv().await.unwrap();
            assert_eq!(msg.get("BARRIER"), Some("1"));
            assert_eq!(msg.fds_closed, 1);
            let mut byte = [0u8; 1];
            assert_eq!(nix::unistd::read(&read, &mut byte).unwrap(), 0, "EOF");
        });
    }
}
