//! Options of a [`Handover`](crate::Handover), with their defaults.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::Signal;

/// What [`Options::configure_socket`] is given.
type SocketHook = Arc<dyn Fn(&str, &socket2::Socket) -> std::io::Result<()> + Send + Sync>;

/// How a [`Handover`](crate::Handover) behaves. Build with
/// `Options::default()` and the setters:
///
/// ```
/// use std::time::Duration;
/// let options = handover::Options::default()
///     .ready_timeout(Duration::from_secs(20))
///     .drain_timeout(Duration::from_secs(10));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Options {
    pub(crate) ready_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) failed_drain_timeout: Option<Duration>,
    pub(crate) max_draining: usize,
    pub(crate) backlog: i32,
    pub(crate) reuseport: bool,
    pub(crate) upgrade_signal: Option<Signal>,
    pub(crate) stop_signals: Vec<Signal>,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) socket_hook: Option<SocketHook>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            failed_drain_timeout: None,
            max_draining: 8,
            backlog: 1024,
            reuseport: false,
            upgrade_signal: Some(Signal::SIGHUP),
            stop_signals: vec![Signal::SIGTERM, Signal::SIGINT],
            executable: None,
            pid_file: None,
            socket_hook: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("ready_timeout", &self.ready_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field(
                "failed_drain_timeout",
                &self.effective_failed_drain_timeout(),
            )
            .field("max_draining", &self.max_draining)
            .field("backlog", &self.backlog)
            .field("reuseport", &self.reuseport)
            .field("upgrade_signal", &self.upgrade_signal)
            .field("stop_signals", &self.stop_signals)
            .field("executable", &self.executable)
            .field("pid_file", &self.pid_file)
            .field("socket_hook", &self.socket_hook.as_ref().map(|_| "set"))
            .finish()
    }
}

impl Options {
    /// How long a new generation may take to call
    /// [`ready`](crate::Handover::ready) before it is killed and the upgrade
    /// fails. Default 60 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long [`drain`](crate::Handover::drain) waits for in-flight work
    /// before it gives up on it. Default 30 s (Kubernetes' grace period).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a failed new generation that is still alive (it missed the
    /// ready timeout, or a final stop came first) gets to finish what it
    /// accepted from the shared queue: it is sent the stop signal, and
    /// killed with every process it started when this has passed. Default:
    /// the drain timeout.
    pub fn failed_drain_timeout(mut self, timeout: Duration) -> Self {
        self.failed_drain_timeout = Some(timeout);
        self
    }

    pub(crate) fn effective_failed_drain_timeout(&self) -> Duration {
        self.failed_drain_timeout.unwrap_or(self.drain_timeout)
    }

    /// How many earlier generations may still be draining when an upgrade
    /// starts. Beyond, the upgrade is refused with
    /// [`Error::TooManyDraining`](crate::Error::TooManyDraining) (try again
    /// once one has exited), so that quick upgrades with long requests do not
    /// pile up processes. Default 8, like `handover run --max-draining`.
    pub fn max_draining(mut self, generations: usize) -> Self {
        self.max_draining = generations;
        self
    }

    /// A file that always holds the pid of the serving generation, so that
    /// `kill -HUP $(cat app.pid)` reaches it. The generation that becomes
    /// current writes it (a temporary file renamed over it, so that a reader
    /// never sees half a pid); the old generation writes it again when an
    /// upgrade fails; a final stop removes it. Default: none.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// A hook called with each socket this process binds (never with an
    /// inherited one), after the socket is created and before `bind`, with
    /// the listener's name: set the socket options `handover` does not
    /// (`TCP_FASTOPEN`, `SO_RCVBUF`, `IPV6_V6ONLY`, a `TCP_DEFER_ACCEPT`...).
    /// An error fails the listener with [`Error::Bind`](crate::Error::Bind).
    ///
    /// ```
    /// let options = handover::Options::default().configure_socket(|_name, socket| {
    ///     socket.set_recv_buffer_size(1 << 20)
    /// });
    /// ```
    pub fn configure_socket(
        mut self,
        hook: impl Fn(&str, &socket2::Socket) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.socket_hook = Some(Arc::new(hook));
        self
    }

    /// The `listen(2)` backlog of sockets bound here (not of inherited ones).
    /// Connections queue there while a new generation warms up. Default 1024
    /// (the kernel caps it at `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Sets `SO_REUSEPORT` on sockets bound here. Default off.
    ///
    /// Upgrades never need it: the same socket is passed on. It lets an
    /// *independent* process bind the same address beside this one (say, a
    /// second instance started by hand).
    ///
    /// # Caveats
    /// Each `SO_REUSEPORT` socket has its own accept queue. When one of them
    /// is closed, connections the kernel had already queued on it are reset
    /// (unless `net.ipv4.tcp_migrate_req=1`, Linux 5.14+). Stop such an
    /// independent process only after its queue is empty.
    pub fn reuseport(mut self, on: bool) -> Self {
        self.reuseport = on;
        self
    }

    /// The signal that triggers an upgrade, or `None` for upgrades by
    /// [`upgrade`](crate::Handover::upgrade) calls only. Default SIGHUP.
    pub fn upgrade_signal(mut self, signal: Option<Signal>) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// The signals that start a final stop. Default SIGTERM and SIGINT. The
    /// first one is also what a failed new generation is sent. SIGKILL and
    /// SIGSTOP cannot be handled and are ignored here.
    pub fn stop_signals(mut self, signals: Vec<Signal>) -> Self {
        self.stop_signals = signals
            .into_iter()
            .filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP))
            .collect();
        self
    }

    /// The executable an upgrade starts. Default: the path this process was
    /// started with (`argv[0]`, looked up in `PATH` when it has no `/`), made
    /// absolute at start-up, symlinks *not* resolved, so that a deploy that
    /// replaces the file or flips a `current` symlink starts the new version.
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }
}
