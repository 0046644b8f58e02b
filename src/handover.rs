//! [`Handover`]: the handle an app starts from.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::channel::{self, Message};
use crate::drain::{DrainReport, Stop, Watch};
use crate::error::{Error, Result};
use crate::handoff::{Adoptions, Moves, Successor};
use crate::lifecycle::Lifecycle;
use crate::listen::{BindOptions, Registry};
use crate::listener::Listener;
use crate::metrics::Counters;
use crate::options::Options;
use crate::protocol::Process;
use crate::signals::{self, Installed};
use crate::{environment, notify, protocol, sys};

pub(crate) struct Inner {
    pub(crate) options: Options,
    pub(crate) generation: u64,
    pub(crate) supervisor: Option<i32>,
    pub(crate) notify_socket: Option<String>,
    /// The channel to whoever started us (a previous generation or the
    /// supervisor), when there is one.
    control: Option<Arc<OwnedFd>>,
    /// The app state the previous generation handed over, until taken.
    state: Mutex<Option<OwnedFd>>,
    /// The probation this generation is on once ready (library mode), ms.
    probation_ms: u64,
    /// A previous generation of this app started us (rather than systemd,
    /// the supervisor, or nobody): the sockets we inherited are ours.
    from_previous_generation: bool,
    pub(crate) registry: Mutex<Registry>,
    /// The executable for upgrades, or why there is none.
    pub(crate) executable: std::result::Result<PathBuf, String>,
    pub(crate) argv: Vec<OsString>,
    /// The environment at start-up, protocol variables removed.
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<PathBuf>,
    /// The one owner of this generation's state, and of its drain.
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// Earlier generations that may still be draining.
    pub(crate) previous: Vec<Process>,
    /// The process group to join once this generation is current (it was
    /// started in a group of its own).
    process_group: Option<i32>,
    pub(crate) ready_done: AtomicBool,
    signals: Installed,
    /// The channel to the generation that replaced this one, for handing
    /// it live connections.
    pub(crate) successor: Successor,
    /// Live connections the previous generation handed over.
    pub(crate) adoptions: Adoptions,
    /// The connections of this generation's `serve`s, handed over at an
    /// upgrade.
    pub(crate) moves: Moves,
    /// What the lifecycle counted, for [`Handover::metrics`].
    pub(crate) counters: Counters,
    pub(crate) started_at: std::time::SystemTime,
    /// Whether the task that reads the control channel runs.
    control_reader: AtomicBool,
    started: Instant,
}

/// The handle an app starts from: it hands out listeners, takes the app's
/// readiness, runs upgrades and tells the app when to stop accepting.
///
/// Cheap to clone; all clones are the same handle.
///
/// # Lifecycle
/// 1. [`Handover::new`], first thing in `main`;
/// 2. listeners by name: [`tcp`](Handover::tcp), [`unix`](Handover::unix),
///    [`udp`](Handover::udp), [`fd`](Handover::fd);
/// 3. [`ready`](Handover::ready) once the app can serve;
/// 4. serve until [`stopping`](Handover::stopping) resolves, tracking work
///    with the [`Watch`] from [`watch`](Handover::watch);
/// 5. drop the listeners, then [`drain`](Handover::drain) and return from `main`.
#[derive(Clone)]
pub struct Handover {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("generation", &self.inner.generation)
            .field("pid", &std::process::id())
            .field("phase", &self.inner.lifecycle.phase())
            .finish()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding one of our locks leaves plain data
    // behind; carry on with it rather than panic again.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tokio needs non-blocking sockets; the flag is set here, explicitly, since
/// another process sharing the socket may have changed it.
fn nonblocking(result: std::io::Result<()>) -> Result<()> {
    result.map_err(|e| Error::io("setting a listener non-blocking", e))
}

/// Resolves the executable for upgrades: absolute, symlinks kept.
fn resolve_executable(
    explicit: Option<&Path>,
    argv0: Option<&OsString>,
    cwd: Option<&Path>,
    path_var: Option<&OsString>,
) -> std::result::Result<PathBuf, String> {
    let absolute = |p: &Path| -> std::result::Result<PathBuf, String> {
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.map(|c| c.join(p)).ok_or_else(|| {
                format!(
                    "{} is relative and the working directory is unknown",
                    p.display()
                )
            })?
        };
        // Drops `.` components only: `..` and symlinks stay as they are, so
        // the path is looked up afresh at each upgrade.
        Ok(joined.components().collect())
    };
    if let Some(path) = explicit {
        return absolute(path);
    }
    let argv0 = argv0.filter(|a| !a.is_empty()).ok_or("argv[0] is empty")?;
    // A bare name was found through PATH by whoever started us.
    let found = sys::find_program(argv0, path_var.map(OsString::as_os_str))
        .map_err(|e| format!("argv[0] {argv0:?}: {e}"))?;
    absolute(&found)
}

impl Handover {
    /// Reads the protocol from the environment, adopts the sockets passed to
    /// this process, and prepares upgrades. Call it first thing in `main`
    /// (inside `#[tokio::main]` is fine; see *Environment* below).
    ///
    /// # Errors
    /// [`Error::Protocol`] when a protocol variable is malformed,
    /// [`Error::InheritedFd`] when a passed fd is not open or the ready fd is
    /// not a pipe, [`Error::AlreadyCreated`] on a second call.
    ///
    /// # Environment
    /// The protocol variables were read and removed from the process
    /// environment before `main` (by a start-up function of this crate, while
    /// the process had a single thread), so that the app's own children do
    /// not inherit them. `Handover::new` reads that snapshot: it may be called
    /// anywhere, `#[tokio::main]` included, from any thread.
    pub fn new(options: Options) -> Result<Handover> {
        let own_pid = std::process::id() as i32;
        let mut protocol_vars = HashMap::new();
        for (name, value) in environment::protocol_variables() {
            let Some(v) = value.to_str() else {
                return Err(Error::protocol(
                    name,
                    &value.to_string_lossy(),
                    "not valid UTF-8",
                ));
            };
            protocol_vars.insert((*name).to_owned(), v.to_owned());
        }
        let env = environment::inheritable();
        let parsed = protocol::parse(&protocol_vars, own_pid)?;
        if !sys::take_inherited_once() {
            return Err(Error::AlreadyCreated);
        }
        if let Some(pid) = parsed.foreign_listen_pid {
            debug!(
                listen_pid = pid,
                "LISTEN_PID names another process; nothing inherited"
            );
        }
        let mut inherited = Vec::with_capacity(parsed.fds.len());
        for (name, fd) in parsed.fds {
            let owned = sys::adopt(fd, &name)?;
            inherited.push((name, owned));
        }
        let control = match parsed.control_fd {
            Some(fd) => {
                let owned = sys::adopt(fd, protocol::CONTROL_FD)?;
                if !channel::is_channel(owned.as_fd()) {
                    return Err(Error::InheritedFd {
                        name: protocol::CONTROL_FD.to_owned(),
                        fd,
                        problem: "is not a seqpacket socket".to_owned(),
                    });
                }
                Some(owned)
            }
            None => None,
        };
        let state = match parsed.state_fd {
            Some(fd) => Some(sys::adopt(fd, protocol::STATE_FD)?),
            None => None,
        };
        if let Some(fd) = &control {
            // This generation can pause accepting (its listeners are
            // `Listener`s): say so, so that a probation parks it.
            if let Err(e) = channel::send(fd.as_fd(), &Message::Parkable) {
                debug!(error = %e, "cannot announce parkable on the control channel");
            }
            // And it understands connection offers (`serve`'s and the
            // app's): a generation that does not say so is offered none.
            if let Err(e) = channel::send(fd.as_fd(), &Message::Adopts) {
                debug!(error = %e, "cannot announce adopts on the control channel");
            }
        }
        if let Some(signal) = options.upgrade_signal {
            sys::ignore_if_default(signal)
                .map_err(|e| Error::io("ignoring the upgrade signal until ready", e))?;
        }
        let argv: Vec<OsString> = std::env::args_os().collect();
        let cwd = std::env::current_dir().ok();
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone());
        let executable = resolve_executable(
            options.executable.as_deref(),
            argv.first(),
            cwd.as_deref(),
            path_var.as_ref(),
        );
        if own_pid == 1 && parsed.supervisor.is_none() {
            warn!(
                "running as PID 1 without the handover supervisor: a self-upgrade would end \
                 the container when this process exits; use `handover run -- <app>` as the \
                 entrypoint instead"
            );
        }
        info!(
            generation = parsed.generation,
            pid = own_pid,
            inherited = inherited.len(),
            supervised = parsed.supervisor.is_some(),
            "handover started"
        );
        Ok(Handover {
            inner: Arc::new(Inner {
                options,
                generation: parsed.generation,
                supervisor: parsed.supervisor,
                notify_socket: parsed.notify_socket,
                from_previous_generation: control.is_some() && parsed.supervisor.is_none(),
                control: control.map(Arc::new),
                state: Mutex::new(state),
                probation_ms: parsed.probation_ms,
                registry: Mutex::new(Registry::new(inherited)),
                executable,
                argv,
                env,
                cwd,
                lifecycle: Lifecycle::new(),
                previous: parsed.previous,
                process_group: parsed.process_group,
                ready_done: AtomicBool::new(false),
                signals: Installed::default(),
                counters: Counters::default(),
                successor: Successor::default(),
                adoptions: Adoptions::default(),
                moves: Moves::default(),
                started_at: std::time::SystemTime::now(),
                control_reader: AtomicBool::new(false),
                started: Instant::now(),
            }),
        })
    }

    /// This process's generation: 1 for the first, one more at each upgrade.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether `handover run` supervises this process (it then owns upgrades).
    pub fn is_supervised(&self) -> bool {
        self.inner.supervisor.is_some()
    }

    fn bind_options(&self) -> BindOptions<'_> {
        BindOptions {
            backlog: self.inner.options.backlog,
            reuseport: self.inner.options.reuseport,
            hook: self.inner.options.socket_hook.as_deref(),
        }
    }

    /// Checks for a runtime, and installs the stop signal handlers once:
    /// from the first listener on, a stop signal drains this generation
    /// (even one that never becomes ready) rather than kills it.
    fn runtime(&self, operation: &'static str) -> Result<()> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime { operation })?;
        signals::install_stop(self, &self.inner.signals)?;
        self.read_control();
        Ok(())
    }

    /// Starts, once, the task that acts on what whoever started us says on
    /// the control channel (`park`, `resume`, ...).
    fn read_control(&self) {
        let Some(fd) = &self.inner.control else {
            return;
        };
        if self.inner.control_reader.swap(true, Ordering::SeqCst) {
            return;
        }
        let receiver = channel::Receiver::new(fd.clone())
            .inspect_err(|e| warn!(error = %e, "cannot read the control channel"));
        let Ok(receiver) = receiver else {
            return;
        };
        let lifecycle = self.inner.lifecycle.clone();
        let handover = self.clone();
        let receiver = Arc::new(receiver);
        tokio::spawn(async move {
            loop {
                let received = match receiver.recv_with_fd().await {
                    Ok(Some((Message::Offer(id, bytes), fd))) => {
                        handover.answer_offer(&receiver, id, false, fd, bytes);
                        continue;
                    }
                    Ok(Some((Message::OfferHttp(id, bytes), fd))) => {
                        handover.answer_offer(&receiver, id, true, fd, bytes);
                        continue;
                    }
                    Ok(Some((Message::Commit(id), _))) => {
                        handover.inner.adoptions.commit(id);
                        continue;
                    }
                    Ok(Some((Message::Abort(id), _))) => {
                        handover.inner.adoptions.abort(id);
                        continue;
                    }
                    Ok(None) => {
                        handover.inner.adoptions.orphaned();
                        Ok(None)
                    }
                    other => other.map(|m| m.map(|(message, _)| message)),
                };
                match received {
                    Ok(Some(Message::Park)) => lifecycle.park(true),
                    Ok(Some(Message::Resume)) => lifecycle.park(false),
                    Ok(Some(Message::Probation(window))) => info!(
                        window_ms = window.as_millis() as u64,
                        "on probation: the previous generation rolls back to itself if this one fails"
                    ),
                    Ok(Some(Message::Promoted)) => {
                        lifecycle.set_on_probation(false);
                        info!("promoted: this generation is current");
                    }
                    Ok(Some(other)) => debug!(?other, "control message"),
                    Ok(None) => {
                        // Whoever started us is gone: nobody can roll back
                        // any more, this generation is current.
                        lifecycle.set_on_probation(false);
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read the control channel");
                        return;
                    }
                }
            }
        });
    }

    /// Answers an offer of the previous generation, in a task of its own
    /// when it has to wait (for a `serve` to start): the channel reader goes
    /// on meanwhile.
    fn answer_offer(
        &self,
        receiver: &Arc<channel::Receiver>,
        id: u64,
        http: bool,
        fd: Option<OwnedFd>,
        bytes: Vec<u8>,
    ) {
        let handover = self.clone();
        let receiver = receiver.clone();
        tokio::spawn(async move {
            let answer = handover.inner.adoptions.offer(id, http, fd, bytes).await;
            if let Err(e) = receiver.send(&answer).await {
                debug!(error = %e, "cannot answer a connection offer");
            }
        });
    }

    /// A TCP listener named `name` on `addr`: the inherited one when a
    /// previous generation passed it, bound here otherwise (`SO_REUSEADDR`,
    /// the configured backlog). Port 0 in `addr` matches whatever port was
    /// inherited.
    ///
    /// # Errors
    /// [`Error::ListenerMismatch`] when the socket inherited under `name` is
    /// not a listening TCP socket on `addr`; [`Error::Bind`],
    /// [`Error::DuplicateName`], [`Error::NoRuntime`].
    pub fn tcp(&self, name: &str, addr: SocketAddr) -> Result<Listener<tokio::net::TcpListener>> {
        self.runtime("Handover::tcp")?;
        let std = lock(&self.inner.registry).tcp(name, addr, self.bind_options())?;
        nonblocking(std.set_nonblocking(true))?;
        tokio::net::TcpListener::from_std(std)
            .map(|l| Listener::new(l, self.watch()))
            .map_err(|e| Error::io("registering a TCP listener with Tokio", e))
    }

    /// A Unix stream listener named `name` at `path`, inherited or bound. A
    /// stale socket file left by a dead process is replaced. The path is
    /// removed only on a final stop, never at an upgrade, and only when this
    /// app created it (bound here or by a previous generation); a socket
    /// passed by systemd or by `handover run` is theirs to remove.
    ///
    /// # Errors
    /// As [`Handover::tcp`].
    pub fn unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<Listener<tokio::net::UnixListener>> {
        self.runtime("Handover::unix")?;
        let std = lock(&self.inner.registry).unix(name, path.as_ref(), self.bind_options())?;
        nonblocking(std.set_nonblocking(true))?;
        tokio::net::UnixListener::from_std(std)
            .map(|l| Listener::new(l, self.watch()))
            .map_err(|e| Error::io("registering a unix listener with Tokio", e))
    }

    /// A UDP socket named `name` on `addr`, inherited or bound. Both
    /// generations read from the same socket during an upgrade; datagrams
    /// are never lost to a closed socket, but either may receive one.
    ///
    /// # Errors
    /// As [`Handover::tcp`].
    pub fn udp(&self, name: &str, addr: SocketAddr) -> Result<tokio::net::UdpSocket> {
        self.runtime("Handover::udp")?;
        let std = lock(&self.inner.registry).udp(name, addr, self.bind_options())?;
        nonblocking(std.set_nonblocking(true))?;
        tokio::net::UdpSocket::from_std(std)
            .map_err(|e| Error::io("registering a UDP socket with Tokio", e))
    }

    /// Any other fd to pass from generation to generation by name (a
    /// memfd with state, a socket of a kind not covered above): the inherited
    /// one, or the one `create` makes when nothing was passed. It is
    /// close-on-exec, and passed on at each upgrade.
    ///
    /// # Errors
    /// [`Error::Io`] when `create` fails, [`Error::DuplicateName`].
    pub fn fd(
        &self,
        name: &str,
        create: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> Result<OwnedFd> {
        lock(&self.inner.registry).fd(name, create)
    }

    /// Says that this generation can serve. Call it once the listeners are
    /// taken and the app is initialised. It
    /// - installs the upgrade and stop signal handlers;
    /// - closes inherited fds that this version did not ask for;
    /// - sends `READY=1` to `NOTIFY_SOCKET` when there is one, with
    ///   `MAINPID=<this pid>` when a previous generation started us, so that
    ///   systemd follows the new main process before the old one exits;
    /// - then tells the previous generation (which stops accepting and drains).
    ///
    /// Once it has succeeded, calling it again does nothing; after an error it
    /// may be called again.
    ///
    /// # Panics
    /// Like every Tokio I/O type, when the runtime was built without its I/O
    /// or time driver (use `enable_all()`); the same holds for
    /// [`tcp`](Handover::tcp), [`unix`](Handover::unix), [`udp`](Handover::udp)
    /// and [`upgrade`](Handover::upgrade).
    ///
    /// # Errors
    /// [`Error::NoRuntime`] outside a Tokio runtime; [`Error::Io`] when the
    /// previous generation or `NOTIFY_SOCKET` cannot be told.
    pub fn ready(&self) -> Result<()> {
        self.runtime("Handover::ready")?;
        if self.inner.ready_done.load(Ordering::SeqCst) {
            return Ok(());
        }
        signals::install_upgrade(self, &self.inner.signals)?;
        lock(&self.inner.registry).close_unclaimed();
        let pid = std::process::id();
        // A generation started by an upgrade ran in a process group of its
        // own, so that a failure could stop it with all it started; current
        // now, it joins the group of the generation it replaces (a shell's
        // job, say). Done before the previous generation is told, while that
        // group surely still has a member.
        if let Some(pgid) = self.inner.process_group {
            if let Err(e) = sys::join_process_group(pgid) {
                warn!(pgid, error = %e, "cannot join the process group of the previous generation; staying in a group of its own");
            }
        }
        // systemd first: it must follow MAINPID to this process before the
        // previous generation, told next, can drain and exit. A failure here
        // is returned, and the previous generation, not told, keeps serving.
        if let Some(socket) = &self.inner.notify_socket {
            let generation = self.inner.generation;
            let message = if self.inner.from_previous_generation {
                format!("READY=1\nMAINPID={pid}\nSTATUS=generation {generation} serving")
            } else {
                format!("READY=1\nSTATUS=generation {generation} serving")
            };
            notify::send(socket, &message).map_err(|e| Error::io("notifying NOTIFY_SOCKET", e))?;
        }
        // Then the previous generation, which stops accepting on our word.
        // From here on this generation is the one serving: errors are only
        // logged, since returning one could make the app exit with nobody
        // left to serve.
        self.write_pid_file();
        if self.inner.from_previous_generation && self.inner.probation_ms > 0 {
            // Current only once the previous generation promotes us.
            self.inner.lifecycle.set_on_probation(true);
        }
        if let Some(fd) = &self.inner.control {
            match channel::send(fd.as_fd(), &Message::Ready) {
                Ok(()) => {}
                // Killed or crashed meanwhile: there is nobody to tell.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    warn!("the previous generation is gone; serving on without it")
                }
                Err(e) => warn!(error = %e, "cannot tell the previous generation we are ready"),
            }
        }
        self.inner.ready_done.store(true, Ordering::SeqCst);
        info!(
            generation = self.inner.generation,
            pid,
            startup_ms = self.inner.started.elapsed().as_millis() as u64,
            "ready"
        );
        Ok(())
    }

    /// Writes the PID file, if there is one, naming this process; errors
    /// are logged (they must not stop a generation that serves).
    pub(crate) fn write_pid_file(&self) {
        let Some(path) = &self.inner.options.pid_file else {
            return;
        };
        match crate::pidfile::write(path, std::process::id() as i32) {
            Ok(()) => debug!(path = %path.display(), "PID file written"),
            Err(e) => warn!(path = %path.display(), error = %e, "PID file not written"),
        }
    }

    /// Removes the PID file if it names this process.
    fn remove_pid_file(&self) {
        let Some(path) = &self.inner.options.pid_file else {
            return;
        };
        if let Err(e) = crate::pidfile::remove_if_names(path, std::process::id() as i32) {
            warn!(path = %path.display(), error = %e, "cannot remove the PID file");
        }
    }

    /// The app state the previous generation handed over
    /// ([`Options::handoff_state`]), once: `None` when there is none (the
    /// first generation, a previous one without a provider) or when it
    /// fails its checks (then a warning says why, and this generation
    /// starts without it).
    pub fn take_state(&self) -> Option<Vec<u8>> {
        let fd = lock(&self.inner.state).take()?;
        match crate::state::read(fd) {
            Ok(state) => {
                info!(
                    bytes = state.len(),
                    "app state taken over from the previous generation"
                );
                Some(state)
            }
            Err(why) => {
                warn!("the app state handed over is unusable ({why}); starting without it");
                None
            }
        }
    }

    /// Says that this generation is unhealthy, with a reason: while it is on
    /// probation, the previous generation (or the `handover run` supervisor)
    /// then rolls back to itself and stops this one. Outside a probation it
    /// is logged (and, under the supervisor, counts as a failed liveness
    /// check).
    pub fn unhealthy(&self, reason: &str) {
        warn!(
            generation = self.inner.generation,
            pid = std::process::id(),
            reason,
            "unhealthy"
        );
        if let Some(fd) = &self.inner.control {
            if let Err(e) = channel::send(fd.as_fd(), &Message::Unhealthy(reason.to_owned())) {
                debug!(error = %e, "nobody to tell that this generation is unhealthy");
            }
        }
    }

    /// A view of the stop signal that also tracks in-flight work; clone it
    /// into connection tasks.
    pub fn watch(&self) -> Watch {
        self.inner.lifecycle.drain().watch()
    }

    /// Resolves when this generation must stop accepting: a new generation
    /// is ready ([`Stop::Upgraded`]) or a final stop was asked for
    /// ([`Stop::Shutdown`]). Cancel-safe.
    pub async fn stopping(&self) -> Stop {
        self.watch().stopping().await
    }

    /// Starts a final stop, as SIGTERM does: [`stopping`](Handover::stopping)
    /// resolves with [`Stop::Shutdown`] and `STOPPING=1` goes to
    /// `NOTIFY_SOCKET`. An upgrade that is running is abandoned: its new
    /// generation is stopped like a failed one, and
    /// [`drain`](Handover::drain) waits for that. Does nothing when already
    /// stopping.
    pub fn shutdown(&self) {
        if self.inner.lifecycle.shutdown() {
            info!(
                generation = self.inner.generation,
                pid = std::process::id(),
                "final stop requested"
            );
            if let Some(socket) = &self.inner.notify_socket {
                if let Err(e) = notify::send(socket, "STOPPING=1") {
                    warn!(error = %e, "cannot send STOPPING=1 to NOTIFY_SOCKET");
                }
            }
        }
    }

    /// Waits for in-flight work (live guards of [`Watch`]) to finish, at most
    /// the drain timeout, and reports. Starts a final stop first if nothing
    /// has stopped this generation yet. It also waits for an upgrade that a
    /// final stop interrupted to reach its outcome (its new generation
    /// stopped and reaped, at most the failed-drain timeout), so that no
    /// generation outlives this one unasked. On a final stop, the paths of
    /// Unix listeners and the PID file are removed afterwards. Then return
    /// from `main`.
    ///
    /// Drop your listeners before calling it: the sockets stay open in the
    /// new generation (and in this handle until the process exits), so no
    /// queued connection is lost.
    pub async fn drain(&self) -> DrainReport {
        if !self.watch().is_stopping() {
            self.shutdown();
        }
        let reason = self.stopping().await;
        let generation = self.inner.generation;
        let watch = self.watch();
        info!(
            generation,
            in_flight = watch.in_flight(),
            timeout_ms = self.inner.options.drain_timeout.as_millis() as u64,
            "drain started"
        );
        let lifecycle = &self.inner.lifecycle;
        let (report, ()) = tokio::join!(
            lifecycle.drain().wait(self.inner.options.drain_timeout),
            lifecycle.settled()
        );
        self.inner.counters.drained(report.elapsed);
        let (accepted, adopted, handed_over) = self.inner.counters.connections();
        if report.completed {
            info!(
                generation,
                in_flight = report.cut,
                duration_ms = report.elapsed.as_millis() as u64,
                connections_accepted = accepted,
                connections_adopted = adopted,
                connections_handed_over = handed_over,
                "drain complete"
            );
        } else {
            warn!(
                generation,
                in_flight = report.cut,
                duration_ms = report.elapsed.as_millis() as u64,
                "drain timeout reached; cutting the remaining work"
            );
        }
        // A final stop removes the Unix socket paths this app created, unless
        // a generation took over (an upgrade that raced the stop) or the
        // supervisor owns the sockets (its upgrades look like SIGTERM here).
        if reason == Stop::Shutdown && !lifecycle.replaced() {
            if self.inner.supervisor.is_none() {
                lock(&self.inner.registry).unlink_unix_paths(self.inner.from_previous_generation);
            }
            self.remove_pid_file();
        }
        report
    }

    /// Whether this process would start upgrades itself, and why not.
    pub(crate) fn check_can_upgrade(&self) -> Result<()> {
        if self.inner.supervisor.is_some() {
            return Err(Error::Supervised);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_is_absolute_and_not_resolved() {
        let cwd = Path::new("/srv/app");
        let r = resolve_executable(None, Some(&"bin/server".into()), Some(cwd), None);
        assert_eq!(r.unwrap(), Path::new("/srv/app/bin/server"));
        let r = resolve_executable(None, Some(&"/opt/current/server".into()), Some(cwd), None);
        assert_eq!(r.unwrap(), Path::new("/opt/current/server"));
        let r = resolve_executable(Some(Path::new("next")), Some(&"/x".into()), Some(cwd), None);
        assert_eq!(r.unwrap(), Path::new("/srv/app/next"));
        // A bare name is looked up in PATH, like the shell did.
        let r = resolve_executable(
            None,
            Some(&"sh".into()),
            Some(cwd),
            Some(&"/nonexistent:/bin".into()),
        );
        assert_eq!(r.unwrap(), Path::new("/bin/sh"));
        assert!(resolve_executable(
            None,
            Some(&"no-such-binary-xyz".into()),
            Some(cwd),
            Some(&"/bin".into())
        )
        .is_err());
        assert!(resolve_executable(None, Some(&"".into()), Some(cwd), None).is_err());
    }
}
