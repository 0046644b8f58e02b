//! Options of a [`Handover`](crate::Handover), with their defaults.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::Signal;

/// What [`Options::handoff_state`] is given.
type StateProvider = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

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
    pub(crate) probation: Duration,
    pub(crate) health: Option<Health>,
    pub(crate) health_interval: Duration,
    pub(crate) health_timeout: Duration,
    pub(crate) health_threshold: u32,
    pub(crate) state_provider: Option<StateProvider>,
}

/// A health check run during a probation (see [`Options::probation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// `GET path` on the first TCP listener's address: 2xx or 3xx is healthy.
    Http(String),
    /// A TCP connect to the first TCP listener's address.
    Tcp,
    /// `sh -c CMD` exits 0 (with `HANDOVER_PID` and `HANDOVER_GENERATION`).
    Exec(String),
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
            probation: Duration::ZERO,
            health: None,
            health_interval: Duration::from_millis(500),
            health_timeout: Duration::from_secs(1),
            health_threshold: 3,
            state_provider: None,
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
            .field("probation", &self.probation)
            .field("health", &self.health)
            .field("health_interval", &self.health_interval)
            .field("health_timeout", &self.health_timeout)
            .field("health_threshold", &self.health_threshold)
            .field(
                "handoff_state",
                &self.state_provider.as_ref().map(|_| "set"),
            )
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

    /// How long a new generation stays on probation after it is ready.
    /// Default zero: none.
    ///
    /// During the window the old generation stays alive, **parked**: it
    /// accepts no new connection (every new connection goes to the new
    /// generation through the shared queue, so a health check on the
    /// listener's address reaches only the new one), finishes its in-flight
    /// work and winds idle connections down, but keeps its listeners and its
    /// state. The new generation must stay alive, pass the health check (see
    /// [`health_http`](Options::health_http)) and not declare itself
    /// [`unhealthy`](crate::Handover::unhealthy). When the window passes, the
    /// old generation drains and exits as after any upgrade, and
    /// [`upgrade`](crate::Handover::upgrade)'s outcome arrives. On a failure
    /// inside it, the old generation resumes accepting at once, the new one
    /// is stopped like a failed upgrade, and the outcome is
    /// [`Error::ProbationFailed`](crate::Error::ProbationFailed).
    ///
    /// Off by default: it keeps two processes for the window and delays every
    /// outcome by it, and the right length depends on how soon the app shows
    /// a fault (its warm-up, its first requests). A few times the health
    /// interval × threshold is a good start.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = window;
        self
    }

    /// During a probation, `GET path` on the address of the first TCP
    /// listener (its loopback address when bound to any), with
    /// `Connection: close`: 2xx or 3xx is healthy. Default: no health check
    /// (only staying alive and [`unhealthy`](crate::Handover::unhealthy)).
    pub fn health_http(mut self, path: impl Into<String>) -> Self {
        self.health = Some(Health::Http(path.into()));
        self
    }

    /// During a probation, a TCP connect to the first TCP listener's
    /// address (it shows the new generation accepts).
    pub fn health_tcp(mut self) -> Self {
        self.health = Some(Health::Tcp);
        self
    }

    /// During a probation, `sh -c command`, run with `HANDOVER_PID` and
    /// `HANDOVER_GENERATION` naming the new generation; exit status 0 is
    /// healthy. It runs in a process group of its own, killed at the health
    /// timeout.
    pub fn health_exec(mut self, command: impl Into<String>) -> Self {
        self.health = Some(Health::Exec(command.into()));
        self
    }

    /// Time between two health checks. Default 500 ms.
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How long one health check may take before it counts as failed.
    /// Default 1 s.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Failed health checks in a row that fail the probation. Default 3.
    pub fn health_threshold(mut self, failures: u32) -> Self {
        self.health_threshold = failures.max(1);
        self
    }

    /// App state to hand to the next generation: `provider` is called when
    /// an upgrade starts, and what it returns (a cache, a session table,
    /// counters: up to 1 GiB) reaches the new generation, which reads it
    /// with [`Handover::take_state`](crate::Handover::take_state) at start.
    /// The bytes travel in a sealed memfd, whole or not at all. Their format
    /// is the app's: start it with a version, so that a new release can tell
    /// an old layout (and ignore what it cannot read). Default: none.
    pub fn handoff_state(mut self, provider: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.state_provider = Some(Arc::new(provider));
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
