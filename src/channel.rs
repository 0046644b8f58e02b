//! The channel between a generation and whoever started it: its previous
//! generation (library mode) or the `handover run` supervisor. One end of a
//! `SOCK_SEQPACKET` socket pair, passed at `HANDOVER_CONTROL_FD`; each
//! message is one packet of ASCII text:
//!
//! | message | from | meaning |
//! |---|---|---|
//! | `ready` | the generation | it can serve (library mode: the upgrade's success) |
//! | `parkable` | the generation | it can pause accepting (`park`/`resume`); sent at start |
//! | `adopts` | the generation | it understands connection offers; sent at start (a generation that does not say so is offered none) |
//! | `unhealthy <reason>` | the generation | its own verdict (`Handover::unhealthy`) |
//! | `probation <ms>` | the starter | it is on probation for that long; it may not upgrade meanwhile |
//! | `promoted` | the starter | probation passed: it is the current generation |
//! | `park` | the starter | stop accepting, wind connections down, keep listeners and state |
//! | `resume` | the starter | accept again |
//! | `offer <id> <state>` + an fd | the old generation | a live connection the app registered, with the app's bytes for it (binary) |
//! | `offer-http <id> <bytes>` + an fd | the old generation | an idle HTTP connection of `serve`, with the bytes read but not parsed yet (binary) |
//! | `adopted <id>` | the new generation | prepared: it holds that connection, and reads nothing from it until the commit |
//! | `declined <id>` | the new generation | it does not take it: the old one goes on serving it |
//! | `commit <id>` | the old generation | the connection is the new generation's: the old one has let go |
//! | `abort <id>` | the old generation | the old generation serves it on: the new one drops its copy |
//!
//! End of file means the other side is gone. Unknown messages are ignored,
//! so that either side may be newer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{self as nsock, AddressFamily, MsgFlags, SockFlag, SockType};
use tokio::io::unix::AsyncFd;

/// The longest message: a reason is cut to fit.
pub(crate) const MAX_MESSAGE: usize = 1024;

/// One message of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Ready,
    Parkable,
    Adopts,
    Unhealthy(String),
    Probation(Duration),
    Promoted,
    Park,
    Resume,
    /// A connection the app registered, offered to the next generation
    /// (the fd travels beside).
    Offer(u64, Vec<u8>),
    /// An idle HTTP connection of `serve`, with its unparsed bytes.
    OfferHttp(u64, Vec<u8>),
    Adopted(u64),
    Declined(u64),
    Commit(u64),
    Abort(u64),
}

impl Message {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let text = match self {
            Message::Ready => "ready".to_owned(),
            Message::Parkable => "parkable".to_owned(),
            Message::Adopts => "adopts".to_owned(),
            Message::Unhealthy(reason) => {
                let mut reason: String = reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                while reason.len() > MAX_MESSAGE - 10 {
                    reason.pop();
                }
                format!("unhealthy {reason}")
            }
            Message::Probation(d) => format!("probation {}", d.as_millis()),
            Message::Promoted => "promoted".to_owned(),
            Message::Park => "park".to_owned(),
            Message::Resume => "resume".to_owned(),
            Message::Offer(id, state) | Message::OfferHttp(id, state) => {
                let word = if matches!(self, Message::Offer(..)) {
                    "offer"
                } else {
                    "offer-http"
                };
                let mut bytes = format!("{word} {id} ").into_bytes();
                bytes.extend_from_slice(state);
                return bytes;
            }
            Message::Adopted(id) => format!("adopted {id}"),
            Message::Declined(id) => format!("declined {id}"),
            Message::Commit(id) => format!("commit {id}"),
            Message::Abort(id) => format!("abort {id}"),
        };
        text.into_bytes()
    }

    /// `None` for a message this version does not know.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Message> {
        for (prefix, http) in [(&b"offer "[..], false), (&b"offer-http "[..], true)] {
            if let Some(rest) = bytes.strip_prefix(prefix) {
                let space = rest.iter().position(|b| *b == b' ')?;
                let id = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
                let state = rest[space + 1..].to_vec();
                return Some(if http {
                    Message::OfferHttp(id, state)
                } else {
                    Message::Offer(id, state)
                });
            }
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        Some(match word {
            "ready" => Message::Ready,
            "parkable" => Message::Parkable,
            "adopts" => Message::Adopts,
            "unhealthy" => Message::Unhealthy(rest.to_owned()),
            "probation" => Message::Probation(Duration::from_millis(rest.parse().ok()?)),
            "promoted" => Message::Promoted,
            "park" => Message::Park,
            "resume" => Message::Resume,
            "adopted" => Message::Adopted(rest.parse().ok()?),
            "declined" => Message::Declined(rest.parse().ok()?),
            "commit" => Message::Commit(rest.parse().ok()?),
            "abort" => Message::Abort(rest.parse().ok()?),
            _ => return None,
        })
    }
}

/// A new socket pair, both ends close-on-exec (and blocking: the end passed
/// to a child is made non-blocking by whoever reads it).
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nsock::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Whether `fd` is a seqpacket socket (what `HANDOVER_CONTROL_FD` must be).
pub(crate) fn is_channel(fd: BorrowedFd<'_>) -> bool {
    nsock::getsockopt(&fd, nsock::sockopt::SockType).is_ok_and(|t| t == SockType::SeqPacket)
}

/// Sends one message without blocking (a few bytes into an empty queue);
/// usable outside a runtime.
pub(crate) fn send(fd: BorrowedFd<'_>, message: &Message) -> io::Result<()> {
    let bytes = message.encode();
    loop {
        match nsock::send(
            fd.as_raw_fd(),
            &bytes,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one message with an fd (`SCM_RIGHTS`) without blocking.
pub(crate) fn send_with_fd(
    fd: BorrowedFd<'_>,
    message: &Message,
    passed: BorrowedFd<'_>,
) -> io::Result<()> {
    let bytes = message.encode();
    let iov = [io::IoSlice::new(&bytes)];
    let fds = [passed.as_raw_fd()];
    let cmsg = [nsock::ControlMessage::ScmRights(&fds)];
    loop {
        match nsock::sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The receiving side, registered with Tokio.
pub(crate) struct Receiver {
    fd: AsyncFd<Arc<OwnedFd>>,
}

impl Receiver {
    /// Registers `fd` (made non-blocking). Panics like every Tokio I/O type
    /// without the runtime's I/O driver: make it before any fork.
    pub(crate) fn new(fd: impl Into<Arc<OwnedFd>>) -> io::Result<Receiver> {
        let fd = fd.into();
        let flags = nix::fcntl::fcntl(&*fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&*fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Receiver {
            fd: crate::sys::async_fd(fd)?,
        })
    }

    /// The fd, to send on.
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.get_ref().as_fd()
    }

    /// Sends one message with an fd (`SCM_RIGHTS`), waiting while the
    /// channel is full (a thousand offers in a row fill it).
    pub(crate) async fn send_with_fd(
        &self,
        message: &Message,
        passed: BorrowedFd<'_>,
    ) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                use std::os::fd::AsFd;
                send_with_fd(fd.get_ref().as_fd(), message, passed)
            }) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    /// Sends one message, waiting while the channel is full.
    pub(crate) async fn send(&self, message: &Message) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                use std::os::fd::AsFd;
                send(fd.get_ref().as_fd(), message)
            }) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    /// The next message this version knows; `None` at end of file. An fd
    /// passed with a message is closed.
    pub(crate) async fn recv(&self) -> io::Result<Option<Message>> {
        Ok(self.recv_with_fd().await?.map(|(message, _)| message))
    }

    /// The next message this version knows, with the fd passed with it, if
    /// any; `None` at end of file.
    pub(crate) async fn recv_with_fd(&self) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|fd| receive(fd.get_ref().as_raw_fd(), &mut buf));
            match got {
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some((n, passed)))) => {
                    if let Some(message) = Message::decode(&buf[..n]) {
                        return Ok(Some((message, passed)));
                    }
                    tracing::debug!("unknown control message ignored");
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// The largest packet read: an offer carries the app's bytes for a
/// connection.
const MAX_PACKET: usize = 64 * 1024;

/// One `recvmsg`: the length read and the fd passed, if any; `None` at end
/// of file. Fds beyond the first are closed.
fn receive(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = nsock::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let mut passed = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let nsock::ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: these fds were installed in this process by the
                // recvmsg just above, and nothing else owns them.
                passed.extend(unsafe { crate::sys::own_received_fds(&fds) });
            }
        }
    }
    if n == 0 && passed.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, passed.into_iter().next())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Ready,
            Message::Parkable,
            Message::Adopts,
            Message::Unhealthy("disk full".into()),
            Message::Probation(Duration::from_millis(1500)),
            Message::Promoted,
            Message::Park,
            Message::Resume,
            Message::Offer(7, b"a b\n\0".to_vec()),
            Message::OfferHttp(8, b"GET / HTTP/1.1\r\n".to_vec()),
            Message::Offer(9, Vec::new()),
            Message::Adopted(7),
            Message::Declined(8),
            Message::Commit(7),
            Message::Abort(9),
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode(b"from the future"), None);
        assert_eq!(
            Message::decode(&Message::Unhealthy("a\nb".into()).encode()),
            Some(Message::Unhealthy("a b".into()))
        );
    }

    #[tokio::test]
    async fn a_pair_carries_messages_and_end_of_file() {
        let (a, b) = pair().unwrap();
        assert!(is_channel(a.as_fd()));
        let rx = Receiver::new(b).unwrap();
        send(a.as_fd(), &Message::Ready).unwrap();
        send(a.as_fd(), &Message::Unhealthy("x".into())).unwrap();
        assert_eq!(rx.recv().await.unwrap(), Some(Message::Ready));
        assert_eq!(
            rx.recv().await.unwrap(),
            Some(Message::Unhealthy("x".into()))
        );
        drop(a);
        assert_eq!(rx.recv().await.unwrap(), None);
    }
}
