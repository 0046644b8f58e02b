//! Listeners by name: inherited when a previous generation (or systemd, or the
//! supervisor) passed them, bound otherwise. Every socket the app takes is
//! recorded here, so that the next generation receives all of them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::sys;

/// What kind of thing a registered fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Unix,
    Udp,
    Other,
}

/// Socket options for what we bind ourselves.
///
/// The registry leaves the blocking mode of every socket as it finds it (a
/// fresh socket is blocking, as systemd passes them): whoever hands a socket
/// to an event loop sets it non-blocking there, explicitly, since the flag
/// lives on the open file description that every generation shares.
#[derive(Clone, Copy, Default)]
pub(crate) struct BindOptions<'a> {
    pub backlog: i32,
    pub reuseport: bool,
    /// Called with each socket before `bind` (`Options::configure_socket`).
    pub hook: Option<&'a SocketHook>,
}

/// A hook that sets socket options on a socket about to be bound.
pub(crate) type SocketHook = dyn Fn(&str, &Socket) -> io::Result<()> + Send + Sync;

impl BindOptions<'_> {
    fn configure(&self, name: &str, socket: &Socket) -> io::Result<()> {
        match self.hook {
            Some(hook) => hook(name, socket),
            None => Ok(()),
        }
    }
}

struct Entry {
    name: String,
    kind: Kind,
    /// Our own copy, passed to the next generation; the app holds another.
    fd: OwnedFd,
    unix_path: Option<PathBuf>,
    /// Bound by this process, rather than inherited.
    bound_here: bool,
}

/// The sockets of this process.
#[derive(Default)]
pub(crate) struct Registry {
    /// Passed to us and not yet claimed: `(name, fd)`.
    inherited: Vec<(String, Option<OwnedFd>)>,
    entries: Vec<Entry>,
}

/// Describes a socket (or what the fd is instead), for messages.
fn describe(fd: BorrowedFd<'_>) -> String {
    match sys::non_socket_kind(fd) {
        Ok(Some(kind)) => return kind.to_owned(),
        Ok(None) => {}
        Err(e) => return format!("an fd that cannot be inspected ({e})"),
    }
    let sock = SockRef::from(&fd);
    let ty = match sock.r#type() {
        Ok(Type::STREAM) => "stream",
        Ok(Type::DGRAM) => "datagram",
        Ok(Type::SEQPACKET) => "seqpacket",
        _ => "other",
    };
    let listening = match sock.is_listener() {
        Ok(true) => " (listening)",
        Ok(false) if ty == "stream" => " (not listening)",
        _ => "",
    };
    let addr = sock
        .local_addr()
        .map(|a| describe_addr(&a))
        .unwrap_or_else(|e| format!("? ({e})"));
    format!("a {ty} socket on {addr}{listening}")
}

fn describe_addr(addr: &SockAddr) -> String {
    if let Some(inet) = addr.as_socket() {
        return inet.to_string();
    }
    match addr.as_pathname() {
        Some(path) => format!("unix {}", path.display()),
        None => "an unnamed or abstract unix address".to_owned(),
    }
}

/// Whether a requested address matches a bound one: same IP, same port unless
/// the request says port 0.
fn addr_matches(requested: SocketAddr, bound: SocketAddr) -> bool {
    requested.ip() == bound.ip() && (requested.port() == 0 || requested.port() == bound.port())
}

/// Checks that an inherited socket is what the app asks for.
fn check(fd: BorrowedFd<'_>, want: &Want<'_>) -> bool {
    if !matches!(sys::non_socket_kind(fd), Ok(None)) {
        return false;
    }
    let sock = SockRef::from(&fd);
    let (Ok(ty), Ok(local)) = (sock.r#type(), sock.local_addr()) else {
        return false;
    };
    match want {
        Want::Tcp(addr) => {
            ty == Type::STREAM
                && sock.is_listener().unwrap_or(false)
                && local.as_socket().is_some_and(|l| addr_matches(*addr, l))
        }
        Want::Udp(addr) => {
            ty == Type::DGRAM && local.as_socket().is_some_and(|l| addr_matches(*addr, l))
        }
        Want::Unix(path) => {
            ty == Type::STREAM
                && sock.is_listener().unwrap_or(false)
                && local.as_pathname() == Some(*path)
        }
    }
}

enum Want<'a> {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(&'a Path),
}

impl Want<'_> {
    fn kind(&self) -> Kind {
        match self {
            Want::Tcp(_) => Kind::Tcp,
            Want::Udp(_) => Kind::Udp,
            Want::Unix(_) => Kind::Unix,
        }
    }

    fn describe(&self) -> String {
        match self {
            Want::Tcp(a) => format!("a listening TCP socket on {a}"),
            Want::Udp(a) => format!("a UDP socket on {a}"),
            Want::Unix(p) => format!("a listening unix socket on {}", p.display()),
        }
    }
}

impl Registry {
    /// A registry of the fds passed to this process, already adopted.
    pub(crate) fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        Registry {
            inherited: inherited
                .into_iter()
                .map(|(name, fd)| (name, Some(fd)))
                .collect(),
            entries: Vec::new(),
        }
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        crate::protocol::check_name(name).map_err(|problem| Error::InvalidName {
            name: name.to_owned(),
            problem,
        })?;
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::DuplicateName {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Takes the inherited socket for `name`, checked against `want`; with no
    /// socket of that name, an unnamed one (systemd without
    /// `FileDescriptorName=`) that matches exactly.
    fn claim(&mut self, name: &str, want: &Want<'_>) -> Result<Option<OwnedFd>> {
        let named = self.inherited.iter_mut().find_map(|(n, slot)| {
            if n == name {
                slot.take().map(|fd| (slot, fd))
            } else {
                None
            }
        });
        if let Some((slot, fd)) = named {
            if !check(fd.as_fd(), want) {
                let inherited = describe(fd.as_fd());
                // Put it back: it is closed as unclaimed at `ready`.
                *slot = Some(fd);
                return Err(Error::ListenerMismatch {
                    name: name.to_owned(),
                    inherited,
                    requested: want.describe(),
                });
            }
            return Ok(Some(fd));
        }
        let unnamed = self.inherited.iter_mut().find(|(n, fd)| {
            n == crate::protocol::UNNAMED && fd.as_ref().is_some_and(|fd| check(fd.as_fd(), want))
        });
        Ok(unnamed.and_then(|slot| slot.1.take()))
    }

    fn record(
        &mut self,
        name: &str,
        kind: Kind,
        fd: BorrowedFd<'_>,
        unix_path: Option<PathBuf>,
        bound_here: bool,
    ) -> Result<()> {
        let copy = sys::dup_above(fd, 3).map_err(|e| Error::io("duplicating a listener", e))?;
        self.entries.push(Entry {
            name: name.to_owned(),
            kind,
            fd: copy,
            unix_path,
            bound_here,
        });
        Ok(())
    }

    fn take_or_bind(
        &mut self,
        name: &str,
        want: Want<'_>,
        bind: impl FnOnce() -> io::Result<Socket>,
    ) -> Result<Socket> {
        self.check_new_name(name)?;
        let (socket, inherited) = match self.claim(name, &want)? {
            Some(fd) => (Socket::from(fd), true),
            None => {
                let socket = bind().map_err(|source| Error::Bind {
                    name: name.to_owned(),
                    address: want.describe(),
                    source,
                })?;
                (socket, false)
            }
        };
        let unix_path = match &want {
            Want::Unix(p) => Some(p.to_path_buf()),
            _ => None,
        };
        let local = socket
            .local_addr()
            .map(|a| describe_addr(&a))
            .unwrap_or_default();
        if inherited {
            info!(name, address = %local, "listener inherited");
        } else {
            info!(name, address = %local, "listener bound");
        }
        self.record(name, want.kind(), socket.as_fd(), unix_path, !inherited)?;
        Ok(socket)
    }

    pub(crate) fn tcp(
        &mut self,
        name: &str,
        addr: SocketAddr,
        opts: BindOptions<'_>,
    ) -> Result<std::net::TcpListener> {
        let socket = self.take_or_bind(name, Want::Tcp(addr), || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if opts.reuseport {
                socket.set_reuse_port(true)?;
            }
            opts.configure(name, &socket)?;
            socket.bind(&addr.into())?;
            socket.listen(opts.backlog)?;
            Ok(socket)
        })?;
        Ok(socket.into())
    }

    pub(crate) fn udp(
        &mut self,
        name: &str,
        addr: SocketAddr,
        opts: BindOptions<'_>,
    ) -> Result<std::net::UdpSocket> {
        let socket = self.take_or_bind(name, Want::Udp(addr), || {
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
            if opts.reuseport {
                socket.set_reuse_port(true)?;
            }
            opts.configure(name, &socket)?;
            socket.bind(&addr.into())?;
            Ok(socket)
        })?;
        Ok(socket.into())
    }

    pub(crate) fn unix(
        &mut self,
        name: &str,
        path: &Path,
        opts: BindOptions<'_>,
    ) -> Result<std::os::unix::net::UnixListener> {
        let socket = self.take_or_bind(name, Want::Unix(path), || {
            remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            opts.configure(name, &socket)?;
            socket.bind(&SockAddr::unix(path)?)?;
            socket.listen(opts.backlog)?;
            Ok(socket)
        })?;
        Ok(socket.into())
    }

    /// An arbitrary fd by name: the inherited one, or the one `create` makes;
    /// passed on to the next generation either way.
    pub(crate) fn fd(
        &mut self,
        name: &str,
        create: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> Result<OwnedFd> {
        self.check_new_name(name)?;
        let inherited = self
            .inherited
            .iter_mut()
            .find(|(n, fd)| n == name && fd.is_some())
            .and_then(|slot| slot.1.take());
        let fd = match inherited {
            Some(fd) => fd,
            None => create().map_err(|e| Error::io("creating an fd to pass on", e))?,
        };
        sys::set_cloexec(fd.as_fd()).map_err(|e| Error::io("setting close-on-exec", e))?;
        self.record(name, Kind::Other, fd.as_fd(), None, false)?;
        Ok(fd)
    }

    /// Closes inherited fds nobody claimed (this version no longer uses
    /// them); returns their names.
    pub(crate) fn close_unclaimed(&mut self) -> Vec<String> {
        let names: Vec<String> = self
            .inherited
            .iter_mut()
            .filter_map(|(name, fd)| fd.take().map(|_| name.clone()))
            .collect();
        for name in &names {
            warn!(name, "inherited fd not used by this version; closed");
        }
        names
    }

    /// The local address of the first TCP listener, if any.
    pub(crate) fn first_tcp_address(&self) -> Option<SocketAddr> {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Tcp)
            .find_map(|e| SockRef::from(&e.fd).local_addr().ok()?.as_socket())
    }

    /// The fds to pass to the next generation, with their names, in order.
    pub(crate) fn handoff(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.fd.as_fd()))
            .collect()
    }

    /// Removes the paths of unix listeners: only on a final stop, when no
    /// later generation will serve on them.
    ///
    /// Only paths this line of generations created: bound here, or inherited
    /// when `inherited_are_ours` (from a previous generation of ours, which
    /// bound them). A path from systemd or the supervisor is theirs to keep.
    pub(crate) fn unlink_unix_paths(&self, inherited_are_ours: bool) {
        let ours = |e: &&Entry| e.kind == Kind::Unix && (e.bound_here || inherited_are_ours);
        for entry in self.entries.iter().filter(ours) {
            if let Some(path) = &entry.unix_path {
                match std::fs::remove_file(path) {
                    Ok(()) => debug!(path = %path.display(), "unix socket path removed"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove unix socket path")
                    }
                }
            }
        }
    }
}

/// What is at a Unix socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketPath {
    /// Nothing.
    Free,
    /// A socket file nobody listens on (its process is gone).
    Stale,
    /// A socket someone listens on (or whose queue is full, which also
    /// means someone listens).
    Live,
    /// Something that is not a socket.
    NotSocket,
}

/// Looks at `path` without blocking: a non-blocking `connect` tells a live
/// listener (accepted, or `EAGAIN` with a full queue) from a stale file
/// (`ECONNREFUSED`). Used for the app's Unix listeners and the supervisor's
/// control socket alike.
pub(crate) fn probe_socket_path(path: &Path) -> io::Result<SocketPath> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketPath::Free),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Ok(SocketPath::NotSocket);
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(SocketPath::Live),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(SocketPath::Stale),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(SocketPath::Live),
        Err(e) => Err(e),
    }
}

/// Removes a unix socket file left by a process that is gone. Anything else
/// at the path is left alone, and bind then reports EADDRINUSE.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if probe_socket_path(path)? == SocketPath::Stale {
        info!(path = %path.display(), "removing stale unix socket");
        std::fs::remove_file(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: BindOptions<'static> = BindOptions {
        backlog: 16,
        reuseport: false,
        hook: None,
    };

    fn inherited(name: &str, fd: impl Into<OwnedFd>) -> Registry {
        Registry::new(vec![(name.to_owned(), fd.into())])
    }

    #[test]
    fn binds_when_nothing_inherited() {
        let mut reg = Registry::default();
        let l = reg
            .tcp("http", "127.0.0.1:0".parse().unwrap(), OPTS)
            .unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
        assert_eq!(reg.handoff().len(), 1);
        assert!(matches!(
            reg.tcp("http", "127.0.0.1:0".parse().unwrap(), OPTS),
            Err(Error::DuplicateName { .. })
        ));
    }

    #[test]
    fn adopts_matching_inherited_listener() {
        let orig = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = orig.local_addr().unwrap();
        let mut reg = inherited("http", orig.try_clone().unwrap());
        let l = reg.tcp("http", addr, OPTS).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        // Port 0 in the request matches whatever port was inherited.
        let mut reg = inherited("http", orig.try_clone().unwrap());
        let l = reg
            .tcp("http", "127.0.0.1:0".parse().unwrap(), OPTS)
            .unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
    }

    #[test]
    fn other_address_is_a_mismatch_not_a_rebind() {
        let orig = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut other = orig.local_addr().unwrap();
        other.set_port(other.port().wrapping_add(1).max(1));
        let mut reg = inherited("http", orig);
        match reg.tcp("http", other, OPTS) {
            Err(Error::ListenerMismatch { inherited, .. }) => {
                assert!(inherited.contains("listening"), "{inherited}")
            }
            r => panic!("expected a mismatch, got {r:?}"),
        }
    }

    #[test]
    fn wrong_kinds_are_mismatches() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let mut reg = inherited("http", udp);
        let err = reg.tcp("http", addr, OPTS).unwrap_err();
        assert!(err.to_string().contains("datagram socket"), "{err}");

        let dir = std::env::temp_dir().join(format!("handover-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::create(dir.join("regular")).unwrap();
        let mut reg = inherited("http", file);
        let err = reg.tcp("http", addr, OPTS).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");

        // A connected stream socket is not a listener.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let local = stream.local_addr().unwrap();
        let mut reg = inherited("http", stream);
        let err = reg.tcp("http", local, OPTS).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unnamed_sockets_are_matched_by_address() {
        let orig = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = orig.local_addr().unwrap();
        let mut reg = inherited("unknown", orig);
        let l = reg.tcp("http", addr, OPTS).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        assert!(reg.close_unclaimed().is_empty());
    }

    #[test]
    fn unix_listener_path_and_stale_socket() {
        let dir = std::env::temp_dir().join(format!("handover-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // A stale socket file from a dead process is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let mut reg = Registry::default();
        let l = reg.unix("api", &path, OPTS).unwrap();
        assert_eq!(l.local_addr().unwrap().as_pathname(), Some(path.as_path()));
        // Inherited under its name, the same path is accepted, another is not.
        let mut reg2 = inherited("api", l.try_clone().unwrap());
        let err = reg2.unix("api", &dir.join("other.sock"), OPTS).unwrap_err();
        assert!(matches!(err, Error::ListenerMismatch { .. }), "{err}");
        let mut reg3 = inherited("api", l);
        reg3.unix("api", &path, OPTS).unwrap();
        // Inherited from systemd or the supervisor: not ours to remove.
        reg3.unlink_unix_paths(false);
        assert!(path.exists());
        // Inherited from a previous generation of ours: removed.
        reg3.unlink_unix_paths(true);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn udp_by_name() {
        let mut reg = Registry::default();
        let s = reg
            .udp("dns", "127.0.0.1:0".parse().unwrap(), OPTS)
            .unwrap();
        let addr = s.local_addr().unwrap();
        let mut reg2 = inherited("dns", s);
        assert_eq!(
            reg2.udp("dns", addr, OPTS).unwrap().local_addr().unwrap(),
            addr
        );
    }

    #[test]
    fn reuseport_is_opt_in() {
        let mut first = Registry::default();
        let l = first
            .tcp("http", "127.0.0.1:0".parse().unwrap(), OPTS)
            .unwrap();
        let addr = l.local_addr().unwrap();
        // Without SO_REUSEPORT an independent process cannot bind beside us.
        let err = Registry::default().tcp("http", addr, OPTS).unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err}");
        // With it on both sides, it can (each socket has its own queue).
        let opts = BindOptions {
            reuseport: true,
            ..OPTS
        };
        let mut a = Registry::default();
        let la = a.tcp("http", "127.0.0.1:0".parse().unwrap(), opts).unwrap();
        let mut b = Registry::default();
        let lb = b.tcp("http", la.local_addr().unwrap(), opts).unwrap();
        assert_eq!(la.local_addr().unwrap(), lb.local_addr().unwrap());
    }

    #[test]
    fn unclaimed_are_closed_and_reported() {
        let orig = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut reg = inherited("old-admin", orig);
        assert_eq!(reg.close_unclaimed(), vec!["old-admin".to_owned()]);
        assert!(reg.handoff().is_empty());
    }
}
