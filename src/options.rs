//! Options of a [`Handover`](crate::Handover), with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::SignalKind;

/// How a [`Handover`](crate::Handover) behaves. Build with
/// `Options::default()` and the setters:
///
/// ```
/// use std::time::Duration;
/// let options = handover::Options::default()
///     .ready_timeout(Duration::from_secs(20))
///     .drain_timeout(Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    pub(crate) ready_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) backlog: i32,
    pub(crate) reuseport: bool,
    pub(crate) upgrade_signal: Option<SignalKind>,
    pub(crate) stop_signals: Vec<SignalKind>,
    pub(crate) executable: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            backlog: 1024,
            reuseport: false,
            upgrade_signal: Some(SignalKind::hangup()),
            stop_signals: vec![SignalKind::terminate(), SignalKind::interrupt()],
            executable: None,
        }
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
    pub fn upgrade_signal(mut self, signal: Option<SignalKind>) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// The signals that start a final stop. Default SIGTERM and SIGINT.
    pub fn stop_signals(mut self, signals: Vec<SignalKind>) -> Self {
        self.stop_signals = signals;
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
