//! The supervisor's state machine and event loop.
//!
//! One thread, one loop, one owner of every exit status: signals arrive on a
//! signalfd, SIGCHLD drives a `waitpid(-1)` loop whose statuses are
//! dispatched to the generation (or readiness probe) that owns the pid,
//! notifications and control requests arrive on channels, and every timeout
//! is a deadline kept in the state and slept on by the loop.
//!
//! Generations have roles:
//! - **current**: the one serving (also while it drains on a final stop);
//! - **candidate**: the next one, started by an upgrade, not ready yet;
//! - **probation**: the candidate once ready, while `--probation` runs: the
//!   current one stays beside it (parked when it can be, else canary), and
//!   any failure (exit, `--health` checks, watchdog, the app's own verdict)
//!   rolls back to it (see `probation.rs`);
//! - **draining**: told to stop after an upgrade, SIGKILL at its deadline;
//! - **failed**: a candidate whose upgrade failed while it runs: told to stop
//!   so that it finishes the requests it took, SIGKILL (with everything it
//!   started) at `--failed-drain-timeout`; the failure is reported once it is
//!   reaped.
//!
//! With `--workers N` (above 1), N generations serve side by side, one per
//! worker slot, and an upgrade is a roll through the slots (see
//! `workers.rs`); the roles above are then those of each worker.
//!
//! Readiness probes (`--ready exec:`) and health checks (`--health exec:`)
//! run in a process group of their own, killed as a whole as soon as their
//! answer no longer matters.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::signalfd::siginfo;
use nix::sys::wait::WaitStatus;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::cli::{format_duration, ListenAddress, ReadyMode, RestartPolicy, RunConfig};
use super::control::{self, Request, Waiter};
use super::error::Error;
use super::metrics::Metrics;
use super::signals::{self, Signals};
use super::spawn::{describe_command, Release, Spawner};
use super::status::{
    GenerationInfo, HealthInfo, OutcomeInfo, ProbationInfo, RollbackInfo, Snapshot, WorkerInfo,
};
use crate::channel::{self, Message};
use crate::health::Probe;
use crate::listen::{BindOptions, Registry};
use crate::pidfile::PidFile;
use crate::{notify, protocol, sys};

use self::probation::health_info;
use self::tree::{descendants, descendants_with_start, in_tree_of, start_time};

mod exits;
mod probation;
mod publish;
mod readiness;
mod tree;
mod upgrades;
mod workers;

/// Pause between two runs of the `--ready exec:` command.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// First restart delay after a crash; doubled at each crash in a row.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest restart delay.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Restarts after quick crashes in a row; the next quick crash gives up.
/// (`--help` and the README say the same.)
const RESTART_LIMIT: u32 = 5;
/// A generation that ran at least this long before crashing starts a new
/// count of crashes in a row.
const CRASH_RESET: Duration = Duration::from_secs(10);
/// How often the processes of a failed, draining candidate are listed.
const LEFTOVER_RESCAN: Duration = Duration::from_millis(100);
/// How long an exiting supervisor lets control clients read their last line.
const CLIENT_FLUSH: Duration = Duration::from_millis(500);

/// The exit code for a wait status: the code, or 128 + the signal.
pub(crate) fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => 1,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Current,
    Candidate,
    /// A candidate that is ready, on probation.
    Probation,
    Draining,
    Failed,
}

/// What a command run in its own process group is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    /// `--ready exec:`.
    Ready,
    /// `--health exec:`.
    Health,
}

/// The health checks of one generation, and their results so far.
#[derive(Default)]
struct Health {
    /// When to run the check next; `None`: not checked (now).
    next_at: Option<Instant>,
    /// A network check in flight: its sequence number and task.
    running: Option<(u64, AbortOnDrop)>,
    /// An exec check in flight: its pid (group) and deadline.
    exec: Option<(i32, Instant)>,
    passed: u64,
    failed: u64,
    in_a_row: u32,
    /// `healthy`, or what the last failure said.
    last: Option<String>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Generation {
    number: u64,
    pid: i32,
    /// The worker it serves as (`--workers`; 0 with one worker).
    worker: usize,
    /// A new worker on probation may be promoted from then on.
    probation_ends: Option<Instant>,
    role: Role,
    started: Instant,
    ready_at: Option<Instant>,
    /// Its last `STATUS=`.
    status_text: Option<String>,
    /// For a candidate: failure; for the current one: a warning.
    ready_deadline: Option<Instant>,
    /// `--ready delay:`.
    delay_ready_at: Option<Instant>,
    /// `--ready exec:`: when to run the command next.
    probe_at: Option<Instant>,
    probe_pid: Option<i32>,
    stop_sent_at: Option<Instant>,
    kill_at: Option<Instant>,
    killed: bool,
    /// For a failed candidate: the processes it started, `(pid, start
    /// time)`, rescanned at `rescan_at` while it drains, killed once it is
    /// reaped (its orphans must not outlive a failed upgrade).
    leftovers: Vec<(i32, u64)>,
    rescan_at: Option<Instant>,
    /// Our end of its control channel, to send `park`, `resume`,
    /// `probation` and `promoted` (the other copy is read by a task).
    control: OwnedFd,
    /// It said `parkable` on its control channel.
    parkable: bool,
    /// It was told to park (and not to resume since).
    parked: bool,
    /// The executable it was started from, kept open.
    release: Option<Rc<Release>>,
    /// `--health` checks and results.
    health: Health,
    /// `--watchdog`: its next `WATCHDOG=1` is due by then.
    watchdog_at: Option<Instant>,
    /// Told to stop because it is unhealthy: its exit restarts it.
    liveness_restart: bool,
    /// Receive its notifications and control messages; dropping them
    /// closes the sockets.
    _notify: AbortOnDrop,
    _control: AbortOnDrop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Signal,
    Control,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Control => "handover upgrade",
        }
    }
}

/// Upgrade triggers that have not started an upgrade yet (coalesced).
struct Pending {
    trigger: Trigger,
    waiters: Vec<Waiter>,
    told_draining: bool,
}

/// The upgrade in progress.
struct Upgrade {
    number: u64,
    trigger: Trigger,
    started: Instant,
    waiters: Vec<Waiter>,
    /// Set once the candidate was killed; reported once it is reaped.
    failure: Option<String>,
    /// Set once the candidate is ready and `--probation` is on.
    probation: Option<Probation>,
}

/// A probation in progress.
struct Probation {
    /// When the candidate became ready.
    started: Instant,
    /// When it may be promoted (if every check is healthy by then).
    ends: Instant,
    ready_after: Duration,
    /// The generation that stays beside it, if any.
    old: Option<u64>,
    /// Whether `old` was parked (else: canary).
    parked: bool,
}

/// The last probation that failed.
struct Rollback {
    generation: u64,
    pid: i32,
    at: Instant,
    after_ready: Duration,
    reason: String,
}

struct Outcome {
    succeeded: bool,
    generation: u64,
    pid: Option<i32>,
    trigger: Trigger,
    at: Instant,
    ready_after: Option<Duration>,
    detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Waiting to restart after a crash.
    Restarting {
        at: Instant,
    },
    /// SIGTERM received: still serving until `stop_at` (--shutdown-delay).
    ShuttingDown {
        stop_at: Instant,
    },
    /// Every generation was told to stop; exit once all are reaped, with the
    /// status of `stop_gen` (the current one when the stop began) or `code`.
    Stopping {
        stop_gen: Option<u64>,
        code: Option<i32>,
    },
}

/// Events from tasks to the loop.
enum Event {
    Notify {
        generation: u64,
        message: notify::Message,
    },
    /// A control message; `None` at end of file.
    Control {
        generation: u64,
        message: Option<Message>,
    },
    /// The result of a network health check.
    Health {
        generation: u64,
        seq: u64,
        result: Result<(), String>,
    },
}

struct Supervisor {
    cfg: RunConfig,
    spawner: Spawner,
    registry: Registry,
    listeners: Vec<(String, String)>,
    own_pid: i32,
    own_uid: u32,
    started: Instant,
    /// `NOTIFY_SOCKET` of whoever started us (systemd), if any.
    parent_notify: Option<String>,
    parent_told_ready: bool,
    events: mpsc::UnboundedSender<Event>,
    gens: BTreeMap<u64, Generation>,
    current: Option<u64>,
    next_number: u64,
    upgrade: Option<Upgrade>,
    pending: Option<Pending>,
    phase: Phase,
    /// Quick crashes in a row.
    crashes: u32,
    restarts: u64,
    /// Exit code of the last current generation that ended unasked.
    last_crash_code: i32,
    /// The current generation ended while an upgrade was running: its status
    /// and run time, acted upon if the upgrade fails.
    lost_current: Option<(WaitStatus, Duration)>,
    last_upgrade: Option<Outcome>,
    upgrades_succeeded: u64,
    upgrades_failed: u64,
    /// Commands in process groups of their own: pid -> generation, kind.
    probes: HashMap<i32, (u64, ProbeKind)>,
    /// The last probation that failed.
    last_rollback: Option<Rollback>,
    /// Sequence number of the last network health check started.
    health_seq: u64,
    /// The release of the current generation, and the one before it (the
    /// crash-loop fallback).
    current_release: Option<Rc<Release>>,
    previous_release: Option<Rc<Release>>,
    /// Restarts start this release instead of the file on disk (after a
    /// crash-loop fallback, until the next successful upgrade).
    pinned_release: Option<Rc<Release>>,
    /// The exit being handled is of a generation stopped by a failed
    /// liveness check: restart it whatever its status.
    restart_asked: bool,
    /// `--workers` above 1: the workers and their roll (see `workers.rs`).
    pool: Option<workers::Pool>,
    /// `--pid-file`.
    pid_file: Option<PidFile>,
    exit_code: Option<i32>,
    /// What `--admin` serves.
    metrics: Metrics,
}

fn send(waiters: &[Waiter], line: &str) {
    for w in waiters {
        // A client that left does not stop anything.
        let _ = w.send(line.to_owned());
    }
}

fn describe(status: WaitStatus) -> String {
    sys::describe(status)
}

/// SIGKILL to the process group of a readiness probe (it leads one).
fn kill_probe_group(generation: u64, probe: i32, why: &str) {
    match sys::signal_group(probe, Signal::SIGKILL) {
        Ok(()) => debug!(generation, probe, why, "readiness command killed"),
        Err(e) => warn!(generation, probe, error = %e, "cannot kill the readiness command"),
    }
}

impl Supervisor {
    fn now() -> Instant {
        Instant::now()
    }

    fn cmd(&self) -> String {
        describe_command(&self.spawner.command)
    }

    fn gen_pid(&self, number: u64) -> Option<i32> {
        self.gens.get(&number).map(|g| g.pid)
    }

    /// Writes the pid of the current generation to `--pid-file`, if any.
    fn write_pid_file(&mut self) {
        let Some(pid) = self.current.and_then(|c| self.gen_pid(c)) else {
            return;
        };
        self.write_pid(pid);
    }

    /// Writes `pid` to `--pid-file`, if any.
    fn write_pid(&mut self, pid: i32) {
        let Some(file) = &mut self.pid_file else {
            return;
        };
        match file.write(pid) {
            Ok(()) => debug!(pid, path = %file.path().display(), "pid file written"),
            Err(e) => {
                warn!(pid, path = %file.path().display(), error = %e, "cannot write the pid file")
            }
        }
    }

    /// Removes `--pid-file` on the final exit.
    fn remove_pid_file(&mut self) {
        if let Some(file) = &mut self.pid_file {
            if let Err(e) = file.remove() {
                warn!(path = %file.path().display(), error = %e, "cannot remove the pid file");
            }
        }
    }

    fn draining_count(&self) -> usize {
        self.gens
            .values()
            .filter(|g| g.role == Role::Draining && Some(g.number) != self.current)
            .count()
    }

    /// Binds a notification socket, makes a control channel and starts
    /// generation `number`: from the file on disk, or from `release` (a
    /// kept executable) when given.
    fn spawn_generation(
        &mut self,
        number: u64,
        role: Role,
        release: Option<Rc<Release>>,
    ) -> std::io::Result<i32> {
        self.spawn_worker(number, role, release, None)
    }

    /// [`Self::spawn_generation`] as worker `worker` (`HANDOVER_WORKER`).
    fn spawn_worker(
        &mut self,
        number: u64,
        role: Role,
        release: Option<Rc<Release>>,
        worker: Option<usize>,
    ) -> std::io::Result<i32> {
        let receiver = notify::Receiver::bind()?;
        let (ours, theirs) = channel::pair()?;
        let control = ours.try_clone()?;
        let control_rx = channel::Receiver::new(ours)?;
        let (pid, opened) = {
            let handoff = self.registry.handoff();
            let sockets: Vec<(&str, BorrowedFd<'_>)> =
                handoff.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
            self.spawner.app(
                number,
                &sockets,
                theirs.as_fd(),
                receiver.address(),
                release.as_deref(),
                worker,
            )?
        };
        // The child has its copy; ours would keep the channel from ever
        // reaching end of file.
        drop(theirs);
        let fallback = release.is_some();
        let release = release.or_else(|| opened.map(|r| self.intern_release(r)));
        let events = self.events.clone();
        let control_task = tokio::spawn(async move {
            loop {
                let message = match control_rx.recv().await {
                    Ok(message) => message,
                    Err(e) => {
                        warn!(generation = number, error = %e, "cannot read the control channel");
                        return;
                    }
                };
                let end = message.is_none();
                let event = Event::Control {
                    generation: number,
                    message,
                };
                if events.send(event).is_err() || end {
                    return;
                }
            }
        });
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(message) => {
                        if events
                            .send(Event::Notify {
                                generation: number,
                                message,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(generation = number, error = %e, "cannot receive notifications");
                        return;
                    }
                }
            }
        });
        let now = Self::now();
        let mut gen = Generation {
            number,
            pid,
            worker: worker.unwrap_or(0),
            probation_ends: None,
            role,
            started: now,
            ready_at: None,
            status_text: None,
            ready_deadline: Some(now + self.cfg.ready_timeout),
            delay_ready_at: None,
            probe_at: None,
            probe_pid: None,
            stop_sent_at: None,
            kill_at: None,
            killed: false,
            leftovers: Vec::new(),
            rescan_at: None,
            control,
            parkable: false,
            parked: false,
            release: release.clone(),
            health: Health::default(),
            watchdog_at: None,
            liveness_restart: false,
            _notify: AbortOnDrop(task),
            _control: AbortOnDrop(control_task),
        };
        match &self.cfg.ready {
            ReadyMode::Notify => {}
            ReadyMode::Exec(_) => gen.probe_at = Some(now),
            ReadyMode::Delay(d) => gen.delay_ready_at = Some(now + *d),
        }
        self.gens.insert(number, gen);
        info!(
            generation = number,
            pid,
            worker,
            command = %self.cmd(),
            sockets = self.registry.handoff().len(),
            release = %release.as_ref().map_or("unknown".into(), |r| r.path.display().to_string()),
            fallback,
            "generation started"
        );
        Ok(pid)
    }

    /// `release`, or the kept one that is the same file.
    fn intern_release(&self, release: Release) -> Rc<Release> {
        [
            &self.current_release,
            &self.previous_release,
            &self.pinned_release,
        ]
        .into_iter()
        .flatten()
        .find(|kept| kept.id == release.id)
        .cloned()
        .unwrap_or_else(|| Rc::new(release))
    }

    /// Sends a control message to generation `number`; false when it is
    /// gone or its channel is (it exits, or does not read it).
    fn tell(&self, number: u64, message: &Message) -> bool {
        let Some(gen) = self.gens.get(&number) else {
            return false;
        };
        match channel::send(gen.control.as_fd(), message) {
            Ok(()) => {
                debug!(
                    generation = number,
                    pid = gen.pid,
                    ?message,
                    "control message sent"
                );
                true
            }
            Err(e) => {
                debug!(generation = number, pid = gen.pid, ?message, error = %e, "control message not sent");
                false
            }
        }
    }

    /// SIGKILL to a generation and every process it started: nothing of a
    /// failed or timed-out generation may keep running (or keep serving on
    /// an inherited socket) once it is reaped.
    fn kill_tree(&self, number: u64, pid: i32) {
        let below = descendants(pid);
        for p in &below {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        }
        self.send_signal(pid, Signal::SIGKILL);
        if !below.is_empty() {
            info!(
                generation = number,
                pid,
                descendants = below.len(),
                "killed the processes it started too"
            );
        }
    }

    fn send_signal(&self, pid: i32, signal: Signal) {
        if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            warn!(pid, signal = signal.as_str(), error = %e, "cannot send signal");
        }
    }

    /// Tells a generation to stop: the stop signal now, SIGKILL at the drain
    /// deadline. Does nothing if it was told already.
    fn stop_generation(&mut self, number: u64) {
        let now = Self::now();
        let (signal, drain) = (self.cfg.stop_signal, self.cfg.drain_timeout);
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.stop_sent_at.is_some() || gen.killed {
            return;
        }
        gen.role = Role::Draining;
        gen.stop_sent_at = Some(now);
        gen.kill_at = Some(now + drain);
        gen.ready_deadline = None;
        gen.delay_ready_at = None;
        gen.watchdog_at = None;
        let pid = gen.pid;
        self.kill_probe(number, "the generation is stopping");
        self.stop_health(number, "the generation is stopping");
        info!(
            generation = number,
            pid,
            signal = signal.as_str(),
            sigkill_in = %format_duration(drain),
            "generation told to stop"
        );
        self.send_signal(pid, signal);
    }

    /// Stops the readiness probes of generation `number`: none is started
    /// any more, and the running one is killed with its whole process group
    /// (reaped later; its exit is then ignored).
    fn kill_probe(&mut self, number: u64, why: &str) {
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.probe_at = None;
            if let Some(probe) = gen.probe_pid.take() {
                kill_probe_group(number, probe, why);
            }
        }
    }

    /// The processes a failed candidate left behind when its main process
    /// ended: SIGKILL to each one still running (same pid and start time)
    /// and to everything below it.
    fn kill_leftovers(&self, number: u64, pid: i32, leftovers: &[(i32, u64)]) {
        let mut killed = 0;
        for &(p, started) in leftovers {
            if start_time(p) != Some(started) {
                continue;
            }
            for below in descendants(p) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(below), Signal::SIGKILL);
                killed += 1;
            }
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            killed += 1;
        }
        if killed > 0 {
            info!(
                generation = number,
                pid,
                processes = killed,
                "killed what the failed generation left running"
            );
        }
    }

    // ---- signals and timers ----------------------------------------------

    fn forward(&self, signo: i32) {
        let name = signals::name(signo);
        if self.pool.is_some() {
            for pid in self.worker_pids() {
                info!(signal = %name, pid, "signal forwarded to a worker");
                if let Err(e) = sys::send_signal_number(pid, signo) {
                    warn!(signal = %name, pid, error = %e, "cannot forward signal");
                }
            }
            return;
        }
        match self.current.and_then(|c| self.gen_pid(c)) {
            Some(pid) => {
                info!(signal = %name, pid, "signal forwarded");
                if let Err(e) = sys::send_signal_number(pid, signo) {
                    warn!(signal = %name, pid, error = %e, "cannot forward signal");
                }
            }
            None => info!(signal = %name, "signal dropped: no app process is running"),
        }
    }

    fn on_signal(&mut self, info: &siginfo) {
        let signo = info.ssi_signo as i32;
        match Signal::try_from(signo) {
            Ok(Signal::SIGCHLD) => self.reap(),
            Ok(Signal::SIGHUP) => {
                info!(sender = info.ssi_pid, "SIGHUP received");
                self.request_upgrade(Trigger::Signal, None);
            }
            Ok(Signal::SIGTERM | Signal::SIGINT) => self.on_stop_signal(signo),
            _ => self.forward(signo),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Restarting { at } => Some(at),
            Phase::ShuttingDown { stop_at } => Some(stop_at),
            _ => None,
        };
        self.gens
            .values()
            .flat_map(|g| {
                let waiting =
                    g.ready_at.is_none() && matches!(g.role, Role::Current | Role::Candidate);
                let checking = g.health.running.is_none() && g.health.exec.is_none();
                [
                    g.kill_at.filter(|_| !g.killed),
                    g.rescan_at.filter(|_| !g.killed),
                    g.ready_deadline.filter(|_| waiting),
                    g.delay_ready_at.filter(|_| waiting),
                    g.probe_at.filter(|_| waiting && g.probe_pid.is_none()),
                    g.health.next_at.filter(|_| checking),
                    g.health.exec.map(|(_, deadline)| deadline),
                    g.watchdog_at,
                ]
            })
            .flatten()
            .chain(phase)
            .chain(self.probation_deadline())
            .chain(self.pool_deadline())
            .min()
    }

    fn on_timer(&mut self) {
        let now = Self::now();
        let numbers: Vec<u64> = self.gens.keys().copied().collect();
        for number in numbers {
            let Some(gen) = self.gens.get_mut(&number) else {
                continue;
            };
            if !gen.killed && gen.kill_at.is_some_and(|t| t <= now) {
                gen.killed = true;
                gen.kill_at = None;
                gen.rescan_at = None;
                let pid = gen.pid;
                if gen.role == Role::Failed {
                    warn!(
                        generation = number,
                        pid, "failed generation still running at --failed-drain-timeout: SIGKILL"
                    );
                } else {
                    warn!(generation = number, pid, "drain timeout: SIGKILL");
                }
                self.kill_tree(number, pid);
                continue;
            }
            if self.health_timers(number, now) {
                continue;
            }
            let Some(gen) = self.gens.get_mut(&number) else {
                continue;
            };
            if !gen.killed && gen.rescan_at.is_some_and(|t| t <= now) {
                let pid = gen.pid;
                for found in descendants_with_start(pid) {
                    if !gen.leftovers.contains(&found) {
                        gen.leftovers.push(found);
                    }
                }
                gen.rescan_at = Some(now + LEFTOVER_RESCAN);
                continue;
            }
            let waiting =
                gen.ready_at.is_none() && matches!(gen.role, Role::Current | Role::Candidate);
            if !waiting {
                continue;
            }
            if gen.delay_ready_at.is_some_and(|t| t <= now) {
                self.mark_ready(number, "ready delay elapsed");
                continue;
            }
            if gen.ready_deadline.is_some_and(|t| t <= now) {
                gen.ready_deadline = None;
                let pid = gen.pid;
                if gen.role == Role::Candidate {
                    let reason = format!(
                        "generation {number} (pid {pid}) was not ready within {} (--ready-timeout)",
                        format_duration(self.cfg.ready_timeout)
                    );
                    if self.pool.is_some() {
                        self.worker_failed(number, reason);
                    } else {
                        self.fail_upgrade(reason);
                    }
                } else {
                    self.kill_probe(number, "the ready timeout has passed");
                    warn!(
                        generation = number,
                        pid,
                        timeout = %format_duration(self.cfg.ready_timeout),
                        ready = %self.cfg.ready,
                        "generation not ready in time; treating it as serving since nothing else \
                         can (upgrades wait for readiness the same way: check --ready)"
                    );
                }
                continue;
            }
            if gen.probe_pid.is_none() && gen.probe_at.is_some_and(|t| t <= now) {
                self.start_probe(number);
            }
        }
        self.probation_timer(now);
        self.pool_timer(now);
        match self.phase {
            Phase::Restarting { at } if at <= now => self.restart(),
            Phase::ShuttingDown { stop_at } if stop_at <= now => {
                info!("shutdown delay over");
                self.begin_final(None);
            }
            _ => {}
        }
    }

    fn check_done(&mut self) {
        if let Phase::Stopping { code, .. } = self.phase {
            // Killed probes are reaped too: nothing we started outlives us.
            if self.gens.is_empty()
                && self.upgrade.is_none()
                && !self.rolling()
                && self.probes.is_empty()
            {
                self.exit_code = Some(code.unwrap_or(0));
            }
        }
    }

    // ---- status ---------------------------------------------------------

    fn snapshot(&self) -> Snapshot {
        let now = Self::now();
        let info = |g: &Generation| GenerationInfo {
            generation: g.number,
            pid: g.pid,
            uptime: now - g.started,
            ready_after: g.ready_at.map(|r| r - g.started),
            status: g.status_text.clone(),
            stopping_for: g.stop_sent_at.map(|s| now - s),
            kill_in: g.kill_at.map(|k| k.saturating_duration_since(now)),
        };
        let current = self
            .current
            .or_else(|| self.pool.as_ref().and_then(|p| p.slots[0].current))
            .and_then(|c| self.gens.get(&c));
        let on_probation = self.upgrade.as_ref().is_some_and(|u| u.probation.is_some());
        let all_ready = self.pool.as_ref().is_some_and(|p| {
            p.slots.iter().all(|s| {
                s.current
                    .and_then(|c| self.gens.get(&c))
                    .is_some_and(|g| g.ready_at.is_some())
            })
        });
        let state = match self.phase {
            Phase::Running if self.roll_info().is_some() => "rolling",
            Phase::Running if self.pool.is_some() && all_ready => "serving",
            Phase::Running if self.pool.is_some() => "starting",
            Phase::Running if on_probation => "probation",
            Phase::Running if self.upgrade.is_some() => "upgrading",
            Phase::Running if current.is_some_and(|g| g.ready_at.is_some()) => "serving",
            Phase::Running => "starting",
            Phase::Restarting { .. } => "restarting",
            Phase::ShuttingDown { .. } => "shutting-down",
            Phase::Stopping { .. } => "stopping",
        };
        Snapshot {
            supervisor_pid: self.own_pid,
            uptime: now - self.started,
            state,
            current: current.map(info),
            upgrading: self
                .upgrade
                .as_ref()
                .and_then(|u| self.gens.get(&u.number))
                .map(info),
            upgrade_pending: self.pending.is_some(),
            draining: self
                .gens
                .values()
                .filter(|g| g.role == Role::Draining && Some(g.number) != self.current)
                .map(info)
                .collect(),
            max_draining: self.cfg.max_draining,
            restarts: self.restarts,
            upgrades_succeeded: self.upgrades_succeeded,
            upgrades_failed: self.upgrades_failed,
            last_upgrade: self.last_upgrade.as_ref().map(|o| OutcomeInfo {
                succeeded: o.succeeded,
                generation: o.generation,
                pid: o.pid,
                trigger: o.trigger.as_str(),
                ago: now - o.at,
                ready_after: o.ready_after,
                detail: o.detail.clone(),
            }),
            listeners: self.listeners.clone(),
            probation: self.probation_info(now),
            health: self
                .cfg
                .health
                .as_ref()
                .zip(current)
                .filter(|_| !on_probation)
                .map(|(check, g)| health_info(check.probe.to_string(), &g.health)),
            watchdog: self.cfg.watchdog,
            last_rollback: self.last_rollback.as_ref().map(|r| RollbackInfo {
                generation: r.generation,
                pid: r.pid,
                ago: now - r.at,
                after_ready: r.after_ready,
                reason: r.reason.clone(),
            }),
            workers: self.workers_info(now),
            roll: self.roll_info(),
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Upgrade(waiter) => self.request_upgrade(Trigger::Control, Some(waiter)),
            Request::Status { json, reply } => {
                let snapshot = self.snapshot();
                let _ = reply.send(if json {
                    snapshot.to_json()
                } else {
                    snapshot.to_text()
                });
            }
        }
    }
}

/// Refuses a `--pid-file` whose directory does not exist, before anything
/// is bound or started.
fn check_pid_file_dir(path: &std::path::Path) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::PidFile {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ),
        }),
        Err(source) => Err(Error::PidFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Binds every `--listen` socket. They are passed to children blocking, as
/// systemd does by default: apps that want non-blocking sockets set it.
fn bind_listeners(cfg: &RunConfig) -> Result<(Registry, Vec<(String, String)>), Error> {
    let mut registry = Registry::default();
    let mut described = Vec::new();
    let opts = BindOptions {
        backlog: cfg.backlog,
        ..BindOptions::default()
    };
    for spec in &cfg.listeners {
        let failed = |source| Error::Listen {
            spec: if spec.name == protocol::UNNAMED {
                spec.address.to_string()
            } else {
                format!("{}={}", spec.name, spec.address)
            },
            source,
        };
        let local = match &spec.address {
            ListenAddress::Tcp(addr) => registry
                .tcp(&spec.name, *addr, opts)
                .and_then(|l| {
                    l.local_addr()
                        .map(|a| format!("tcp://{a}"))
                        .map_err(|e| crate::Error::io("reading a listener's address", e))
                })
                .map_err(failed)?,
            ListenAddress::Udp(addr) => registry
                .udp(&spec.name, *addr, opts)
                .and_then(|l| {
                    l.local_addr()
                        .map(|a| format!("udp://{a}"))
                        .map_err(|e| crate::Error::io("reading a socket's address", e))
                })
                .map_err(failed)?,
            ListenAddress::Unix(path) => {
                registry.unix(&spec.name, path, opts).map_err(failed)?;
                format!("unix://{}", path.display())
            }
        };
        described.push((spec.name.clone(), local));
    }
    Ok((registry, described))
}

/// Runs `handover run` until the app is stopped for good; returns the exit
/// code to end with.
pub(crate) fn run(cfg: RunConfig) -> Result<i32, Error> {
    // First, while we have one thread: queue signals instead of dying of
    // them (and as PID 1, instead of losing them).
    let signal_fd = signals::block().map_err(|e| Error::io("blocking signals", e))?;
    // The app gets stdio and its sockets, nothing else we inherited.
    let inherited = sys::cloexec_from(3).map_err(|e| Error::io("listing inherited fds", e))?;
    let own_pid = std::process::id() as i32;
    if own_pid != 1 {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| Error::io("becoming a child subreaper", e))?;
    }
    // Our own NOTIFY_SOCKET (systemd's), from the start-up snapshot: the
    // protocol variables are not in the environment any more.
    let parent_notify = crate::environment::protocol_variable(protocol::NOTIFY_SOCKET)
        .and_then(|v| v.to_str())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let env = crate::environment::inheritable();
    if let Some(path) = &cfg.pid_file {
        check_pid_file_dir(path)?;
    }
    let (registry, listeners) = bind_listeners(&cfg)?;
    let control = match control::bind(&cfg.control) {
        Ok(control) => control,
        Err(e) => {
            registry.unlink_unix_paths(false);
            return Err(e);
        }
    };
    let control_path = cfg.control.clone();
    let control_inode = std::fs::metadata(&control_path).map(|m| m.ino()).ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            registry.unlink_unix_paths(false);
            let _ = std::fs::remove_file(&control_path);
            return Err(Error::io("starting the runtime", e));
        }
    };
    let result = runtime.block_on(async move {
        let signals =
            Signals::new(signal_fd).map_err(|e| Error::io("registering the signalfd", e))?;
        let control = tokio::net::UnixListener::from_std(control)
            .map_err(|e| Error::io("registering the control socket", e))?;
        let (requests_tx, mut requests) = mpsc::unbounded_channel();
        let (alive_tx, mut alive) = mpsc::channel::<()>(1);
        let control_server = tokio::spawn(control::serve(control, requests_tx, alive_tx));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut sup = Supervisor {
            spawner: Spawner {
                command: cfg.command.clone(),
                env,
                supervisor_pid: own_pid,
                watchdog: cfg.watchdog,
            },
            registry,
            listeners,
            own_pid,
            own_uid: crate::sys::euid(),
            started: Instant::now(),
            parent_notify,
            parent_told_ready: false,
            events: events_tx,
            gens: BTreeMap::new(),
            current: None,
            next_number: 1,
            upgrade: None,
            pending: None,
            phase: Phase::Running,
            crashes: 0,
            restarts: 0,
            last_crash_code: 0,
            lost_current: None,
            last_upgrade: None,
            upgrades_succeeded: 0,
            upgrades_failed: 0,
            probes: HashMap::new(),
            last_rollback: None,
            health_seq: 0,
            current_release: None,
            previous_release: None,
            pinned_release: None,
            restart_asked: false,
            pool: (cfg.workers > 1).then(|| workers::Pool::new(cfg.workers)),
            pid_file: cfg.pid_file.clone().map(PidFile::new),
            exit_code: None,
            metrics: Metrics::new(),
            cfg,
        };
        if inherited > 0 {
            info!(
                fds = inherited,
                "fds inherited by the supervisor are not passed on"
            );
        }
        info!(
            pid = own_pid,
            pid1 = own_pid == 1,
            listeners = sup.listeners.len(),
            control = %sup.cfg.control.display(),
            ready = %sup.cfg.ready,
            "supervisor started"
        );
        for (name, address) in &sup.listeners {
            info!(name, address, "listening");
        }
        // Before the app starts: a bad --admin changes nothing.
        let _admin = match sup
            .cfg
            .admin
            .map(|a| super::admin::start(a, sup.metrics.clone()))
        {
            Some(Err(e)) => {
                sup.registry.unlink_unix_paths(false);
                return Err(e);
            }
            admin => admin.and_then(Result::ok).map(AbortOnDrop),
        };
        let started = if sup.pool.is_some() {
            sup.start_workers()
        } else {
            sup.spawn_generation(1, Role::Current, None).map(|_| ())
        };
        match started {
            Ok(()) if sup.pool.is_some() => {}
            Ok(()) => {
                sup.current = Some(1);
                sup.current_release = sup.gens.get(&1).and_then(|g| g.release.clone());
                sup.write_pid_file();
            }
            Err(source) => {
                for gen in sup.gens.values() {
                    sup.kill_tree(gen.number, gen.pid);
                }
                sup.registry.unlink_unix_paths(false);
                return Err(Error::Spawn {
                    command: sup.cmd(),
                    source,
                });
            }
        }
        sup.next_number = sup.next_number.max(2);
        loop {
            sup.on_timer();
            sup.maybe_start_upgrade();
            sup.check_done();
            sup.publish_metrics();
            if let Some(code) = sup.exit_code {
                info!(code, "supervisor exiting");
                sup.registry.unlink_unix_paths(false);
                sup.remove_pid_file();
                // Let control clients read their last line (an upgrade's
                // outcome): every waiter is gone with `sup`, so their tasks
                // end once written.
                drop(sup);
                control_server.abort();
                let _ = tokio::time::timeout(CLIENT_FLUSH, alive.recv()).await;
                return Ok(code);
            }
            let deadline = sup.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                batch = signals.recv() => match batch {
                    Ok(batch) => {
                        for info in &batch {
                            sup.on_signal(info);
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "cannot read signals; killing the app and exiting");
                        for gen in sup.gens.values() {
                            sup.kill_tree(gen.number, gen.pid);
                        }
                        for (&probe, &(generation, _)) in &sup.probes {
                            kill_probe_group(generation, probe, "the supervisor is exiting");
                        }
                        sup.remove_pid_file();
                        return Err(Error::io("reading the signalfd", e));
                    }
                },
                Some(event) = events.recv() => match event {
                    Event::Notify { generation, message } => sup.on_notify(generation, message),
                    Event::Control { generation, message } => sup.on_control(generation, message),
                    Event::Health { generation, seq, result } => {
                        sup.on_health_result(generation, seq, result)
                    }
                },
                Some(request) = requests.recv() => sup.on_request(request),
                () = sleep => {}
            }
        }
    });
    // Remove the control socket, unless someone replaced it meanwhile.
    if std::fs::metadata(&control_path).map(|m| m.ino()).ok() == control_inode {
        let _ = std::fs::remove_file(&control_path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let pid = nix::unistd::Pid::from_raw(5);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), 0);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 255)), 255);
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            137
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            143
        );
    }
}
