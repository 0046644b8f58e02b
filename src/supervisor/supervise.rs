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
//! - **draining**: told to stop after an upgrade, SIGKILL at its deadline;
//! - **killed**: a failed candidate, killed, waiting to be reaped before the
//!   upgrade's failure is reported.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::signalfd::siginfo;
use nix::sys::wait::WaitStatus;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::cli::{format_duration, ListenAddress, ReadyMode, RestartPolicy, RunConfig};
use super::control::{self, Request, Waiter};
use super::error::Error;
use super::signals::{self, Signals};
use super::spawn::{describe_command, Spawner};
use super::status::{GenerationInfo, OutcomeInfo, Snapshot};
use crate::listen::{BindOptions, Registry};
use crate::{notify, protocol, sys};

/// Pause between two runs of the `--ready exec:` command.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// First restart delay after a crash; doubled at each crash in a row.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest restart delay.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Quick crashes in a row after which the supervisor gives up.
const CRASH_LOOP_LIMIT: u32 = 5;
/// A generation that ran at least this long before crashing starts a new
/// count of crashes in a row.
const CRASH_RESET: Duration = Duration::from_secs(10);
/// How long an exiting supervisor lets control clients read their last line.
const CLIENT_FLUSH: Duration = Duration::from_millis(500);
/// How far up the process tree a notification sender may be from the
/// generation it speaks for.
const MAX_TREE_DEPTH: usize = 64;

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
    Draining,
    Killed,
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
    /// Receives its notifications; dropping it closes the socket.
    _notify: AbortOnDrop,
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
    /// Readiness probes: pid -> generation.
    probes: HashMap<i32, u64>,
    exit_code: Option<i32>,
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

/// Whether `pid` is `ancestor` or one of its descendants, by `/proc`.
fn in_tree_of(pid: i32, ancestor: i32) -> bool {
    let mut pid = pid;
    for _ in 0..MAX_TREE_DEPTH {
        if pid == ancestor {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) S ppid ...": comm may hold anything; split at the last ')'.
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        pid = ppid;
    }
    false
}

/// Every process below `root` in the process tree (children, grandchildren,
/// ...), by the parent pids in `/proc`.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        {
            parents.push((pid, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            if !found.contains(pid) && *pid != root {
                found.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    found
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

    fn draining_count(&self) -> usize {
        self.gens
            .values()
            .filter(|g| g.role == Role::Draining && Some(g.number) != self.current)
            .count()
    }

    /// Binds a notification socket and starts generation `number`.
    fn spawn_generation(&mut self, number: u64, role: Role) -> std::io::Result<i32> {
        let receiver = notify::Receiver::bind()?;
        let pid = {
            let handoff = self.registry.handoff();
            let sockets: Vec<(&str, BorrowedFd<'_>)> =
                handoff.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
            self.spawner.app(number, &sockets, receiver.address())?
        };
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
            _notify: AbortOnDrop(task),
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
            command = %self.cmd(),
            sockets = self.registry.handoff().len(),
            "generation started"
        );
        Ok(pid)
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
        gen.probe_at = None;
        let pid = gen.pid;
        info!(
            generation = number,
            pid,
            signal = signal.as_str(),
            sigkill_in = %format_duration(drain),
            "generation told to stop"
        );
        self.send_signal(pid, signal);
    }

    fn kill_probe(&mut self, number: u64) {
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.probe_at = None;
            if let Some(probe) = gen.probe_pid.take() {
                // Reaped later, as an orphan of no interest.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(probe), Signal::SIGKILL);
            }
        }
    }

    // ---- readiness ------------------------------------------------------

    fn mark_ready(&mut self, number: u64, how: &str) {
        let now = Self::now();
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.ready_at.is_some() || matches!(gen.role, Role::Killed | Role::Draining) {
            debug!(
                generation = number,
                how, "readiness ignored (already ready or stopping)"
            );
            return;
        }
        gen.ready_at = Some(now);
        gen.ready_deadline = None;
        gen.delay_ready_at = None;
        let role = gen.role;
        let (pid, ready_after) = (gen.pid, now - gen.started);
        self.kill_probe(number);
        match role {
            Role::Candidate => self.upgrade_succeeded(number, ready_after),
            _ => {
                info!(
                    generation = number,
                    pid,
                    how,
                    ready_ms = ready_after.as_millis() as u64,
                    "generation ready"
                );
                self.tell_parent_ready(number);
            }
        }
    }

    fn tell_parent_ready(&mut self, number: u64) {
        let Some(socket) = &self.parent_notify else {
            return;
        };
        let message = if self.parent_told_ready {
            format!("STATUS=generation {number} serving")
        } else {
            format!("READY=1\nSTATUS=generation {number} serving")
        };
        match notify::send(socket, &message) {
            Ok(()) => self.parent_told_ready = true,
            Err(e) => warn!(error = %e, "cannot notify our own NOTIFY_SOCKET"),
        }
    }

    fn on_notify(&mut self, number: u64, message: notify::Message) {
        let own_uid = self.own_uid;
        let Some(gen) = self.gens.get_mut(&number) else {
            debug!(
                generation = number,
                "notification from a generation that is gone"
            );
            return;
        };
        let allowed = message.sender.is_some_and(|c| {
            c.uid == own_uid || c.uid == 0 || c.pid == gen.pid || in_tree_of(c.pid, gen.pid)
        });
        if !allowed {
            warn!(
                generation = number,
                sender_pid = message.sender.map(|c| c.pid),
                sender_uid = message.sender.map(|c| c.uid),
                "notification refused: the sender is neither our user nor a process of the generation"
            );
            return;
        }
        let sender = message.sender.map_or(0, |c| c.pid);
        if message.fds_closed > 0 {
            debug!(
                generation = number,
                sender,
                fds = message.fds_closed,
                "closed the fds passed with a notification"
            );
        }
        if message.truncated {
            warn!(
                generation = number,
                sender, "notification longer than 4096 bytes; truncated"
            );
        }
        if let Some(status) = message.get("STATUS") {
            debug!(generation = number, sender, status, "generation status");
            gen.status_text = Some(status.to_owned());
        }
        if message.get("STOPPING") == Some("1") {
            info!(
                generation = number,
                sender, "generation says it is stopping"
            );
        }
        if let Some(mainpid) = message.get("MAINPID") {
            debug!(
                generation = number,
                mainpid, "MAINPID ignored: the supervisor follows the process it started"
            );
        }
        if message.is_ready() {
            if self.cfg.ready == ReadyMode::Notify {
                self.mark_ready(number, "READY=1");
            } else {
                debug!(
                    generation = number,
                    "READY=1 ignored: --ready is not notify"
                );
            }
        }
    }

    fn start_probe(&mut self, number: u64) {
        let ReadyMode::Exec(command) = &self.cfg.ready else {
            return;
        };
        let Some(gen) = self.gens.get(&number) else {
            return;
        };
        let pid = gen.pid;
        let result = self.spawner.probe(command, pid, number);
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        gen.probe_at = None;
        match result {
            Ok(probe) => {
                debug!(generation = number, probe, "readiness command started");
                gen.probe_pid = Some(probe);
                self.probes.insert(probe, number);
            }
            Err(e) => {
                warn!(generation = number, error = %e, "cannot run the readiness command");
                gen.probe_at = Some(Self::now() + PROBE_INTERVAL);
            }
        }
    }

    fn on_probe_exit(&mut self, number: u64, probe: i32, status: WaitStatus) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.probe_pid != Some(probe) {
            return;
        }
        gen.probe_pid = None;
        if gen.ready_at.is_some() || matches!(gen.role, Role::Killed | Role::Draining) {
            return;
        }
        if matches!(status, WaitStatus::Exited(_, 0)) {
            self.mark_ready(number, "readiness command exited 0");
        } else {
            debug!(generation = number, status = %describe(status), "readiness command failed; retrying");
            gen.probe_at = Some(Self::now() + PROBE_INTERVAL);
        }
    }

    // ---- upgrades -------------------------------------------------------

    fn request_upgrade(&mut self, trigger: Trigger, waiter: Option<Waiter>) {
        info!(trigger = trigger.as_str(), "upgrade requested");
        let refusal = match self.phase {
            Phase::Running => None,
            Phase::Restarting { .. } => Some(
                "the app is restarting after a crash (the restart starts the command now on disk)",
            ),
            Phase::ShuttingDown { .. } | Phase::Stopping { .. } => {
                Some("the supervisor is stopping")
            }
        };
        if let Some(why) = refusal {
            warn!(trigger = trigger.as_str(), "upgrade refused: {why}");
            if let Some(w) = waiter {
                let _ = w.send(format!("refused: {why}"));
            }
            return;
        }
        if let Some(up) = &self.upgrade {
            let line = format!(
                "waiting: generation {} is being started by an earlier trigger; this upgrade \
                 starts after it",
                up.number
            );
            info!(
                in_progress = up.number,
                "upgrade already in progress; another one will follow it"
            );
            if let Some(w) = &waiter {
                let _ = w.send(line);
            }
        }
        let pending = self.pending.get_or_insert(Pending {
            trigger,
            waiters: Vec::new(),
            told_draining: false,
        });
        if trigger == Trigger::Control {
            pending.trigger = trigger;
        }
        if let (Some(w), true) = (&waiter, pending.told_draining) {
            let _ = w.send(format!(
                "waiting: old generations are still draining (--max-draining {}); the \
                 upgrade starts when one has exited",
                self.cfg.max_draining
            ));
        }
        pending.waiters.extend(waiter);
        self.maybe_start_upgrade();
    }

    fn refuse_pending(&mut self, why: &str) {
        if let Some(p) = self.pending.take() {
            warn!("pending upgrade dropped: {why}");
            send(&p.waiters, &format!("refused: {why}"));
        }
    }

    fn maybe_start_upgrade(&mut self) {
        if self.phase != Phase::Running || self.upgrade.is_some() {
            return;
        }
        let draining = self.draining_count();
        let max = self.cfg.max_draining;
        let Some(pending) = &mut self.pending else {
            return;
        };
        if draining >= max {
            if !pending.told_draining {
                pending.told_draining = true;
                info!(
                    draining,
                    max, "upgrade waits: too many generations still draining"
                );
                send(
                    &pending.waiters,
                    &format!(
                        "waiting: {draining} old generations are still draining (--max-draining \
                         {max}); the upgrade starts when one has exited"
                    ),
                );
            }
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.start_upgrade(pending);
    }

    fn start_upgrade(&mut self, pending: Pending) {
        let number = self.next_number;
        self.next_number += 1;
        let from = self.current;
        info!(
            generation = number,
            from = from.unwrap_or(0),
            trigger = pending.trigger.as_str(),
            "upgrade started"
        );
        send(
            &pending.waiters,
            &format!("step: starting generation {number}: {}", self.cmd()),
        );
        self.upgrade = Some(Upgrade {
            number,
            trigger: pending.trigger,
            started: Self::now(),
            waiters: pending.waiters,
            failure: None,
        });
        match self.spawn_generation(number, Role::Candidate) {
            Ok(pid) => {
                let line = format!(
                    "step: generation {number} is pid {pid}; waiting for {} (ready timeout {})",
                    self.cfg.ready,
                    format_duration(self.cfg.ready_timeout)
                );
                if let Some(up) = &self.upgrade {
                    send(&up.waiters, &line);
                }
            }
            Err(e) => {
                let reason = format!("cannot start generation {number} ({}): {e}", self.cmd());
                self.finish_upgrade_failure(reason, None);
            }
        }
    }

    fn upgrade_succeeded(&mut self, number: u64, ready_after: Duration) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let Some(pid) = self.gen_pid(number) else {
            return;
        };
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.role = Role::Current;
        }
        let old = self.current.replace(number);
        self.lost_current = None;
        // New code that got ready: crashes of the old code do not count.
        self.crashes = 0;
        let mut detail = format!(
            "generation {number} (pid {pid}) ready after {}",
            format_duration(ready_after)
        );
        match old.and_then(|o| self.gen_pid(o).map(|p| (o, p))) {
            Some((old, old_pid)) => {
                self.stop_generation(old);
                detail.push_str(&format!(
                    "; generation {old} (pid {old_pid}) told to stop ({}), SIGKILL in {}",
                    self.cfg.stop_signal.as_str(),
                    format_duration(self.cfg.drain_timeout)
                ));
            }
            None => detail.push_str("; no previous generation was running"),
        }
        info!(
            generation = number,
            pid,
            ready_ms = ready_after.as_millis() as u64,
            upgrade_ms = up.started.elapsed().as_millis() as u64,
            "upgrade succeeded"
        );
        send(&up.waiters, &format!("ok: {detail}"));
        self.upgrades_succeeded += 1;
        self.last_upgrade = Some(Outcome {
            succeeded: true,
            generation: number,
            pid: Some(pid),
            trigger: up.trigger,
            at: Self::now(),
            ready_after: Some(ready_after),
            detail,
        });
        self.tell_parent_ready(number);
    }

    /// Kills the candidate; the failure is reported once it is reaped.
    fn fail_upgrade(&mut self, reason: String) {
        let Some(up) = &mut self.upgrade else {
            return;
        };
        if up.failure.is_some() {
            return;
        }
        let number = up.number;
        let Some(pid) = self.gens.get(&number).map(|g| g.pid) else {
            self.finish_upgrade_failure(reason, None);
            return;
        };
        warn!(generation = number, pid, reason = %reason, "upgrade failing: killing the new generation");
        send(
            &up.waiters,
            &format!("step: killing generation {number} (pid {pid}): {reason}"),
        );
        up.failure = Some(reason);
        self.kill_probe(number);
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.role = Role::Killed;
            gen.killed = true;
            gen.ready_deadline = None;
            gen.delay_ready_at = None;
        }
        self.kill_tree(number, pid);
    }

    fn finish_upgrade_failure(&mut self, reason: String, pid: Option<i32>) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let keeps = match self.current.and_then(|c| self.gen_pid(c).map(|p| (c, p))) {
            Some((c, p)) => format!("generation {c} (pid {p}) keeps serving"),
            None => "no generation is serving".to_owned(),
        };
        error!(
            generation = up.number,
            reason = %reason,
            "upgrade failed; {keeps}"
        );
        send(&up.waiters, &format!("failed: {reason}; {keeps}"));
        self.upgrades_failed += 1;
        self.last_upgrade = Some(Outcome {
            succeeded: false,
            generation: up.number,
            pid,
            trigger: up.trigger,
            at: Self::now(),
            ready_after: None,
            detail: format!("{reason}; {keeps}"),
        });
        if self.current.is_none() && self.phase == Phase::Running {
            let (status, ran) = self.lost_current.take().unwrap_or((
                WaitStatus::Exited(nix::unistd::Pid::from_raw(0), 1),
                Duration::ZERO,
            ));
            self.after_current_ended(status, ran);
        }
    }

    // ---- exits ----------------------------------------------------------

    fn reap(&mut self) {
        loop {
            let reaped = if self.cfg.debug_no_reap {
                // Test-only: reap the processes we started, one by one, and
                // leave orphans as zombies.
                let known: Vec<i32> = self
                    .gens
                    .values()
                    .map(|g| g.pid)
                    .chain(self.probes.keys().copied())
                    .collect();
                known
                    .into_iter()
                    .find_map(|pid| sys::reap_pid(pid).ok().flatten())
            } else {
                match sys::reap_any() {
                    Ok(r) => r,
                    Err(e) => {
                        error!(error = %e, "waitpid failed");
                        None
                    }
                }
            };
            let Some(status) = reaped else {
                return;
            };
            let Some(pid) = status.pid() else {
                continue;
            };
            self.on_exit(pid.as_raw(), status);
        }
    }

    fn on_exit(&mut self, pid: i32, status: WaitStatus) {
        if let Some(number) = self.probes.remove(&pid) {
            self.on_probe_exit(number, pid, status);
            return;
        }
        let Some(number) = self.gens.values().find(|g| g.pid == pid).map(|g| g.number) else {
            debug!(pid, status = %describe(status), "reaped an orphaned process");
            return;
        };
        let Some(gen) = self.gens.remove(&number) else {
            return;
        };
        let code = exit_code(status);
        let ran = gen.started.elapsed();
        if let Some(probe) = gen.probe_pid {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(probe), Signal::SIGKILL);
        }
        let was_current = self.current == Some(number);
        if was_current {
            self.current = None;
        }
        if let Phase::Stopping {
            stop_gen: Some(n),
            code: c,
        } = &mut self.phase
        {
            if *n == number {
                *c = Some(code);
            }
        }
        match gen.role {
            Role::Candidate => {
                let reason = format!(
                    "generation {number} (pid {pid}) {} before it was ready",
                    describe(status)
                );
                self.finish_upgrade_failure(reason, Some(pid));
            }
            Role::Killed => {
                info!(generation = number, pid, status = %describe(status), "failed generation reaped");
                let reason = self
                    .upgrade
                    .as_mut()
                    .and_then(|u| u.failure.take())
                    .unwrap_or_else(|| format!("generation {number} (pid {pid}) was killed"));
                self.finish_upgrade_failure(reason, Some(pid));
            }
            Role::Draining if !was_current => {
                let clean = code == 0;
                if clean {
                    info!(generation = number, pid, status = %describe(status), "old generation exited");
                } else {
                    warn!(generation = number, pid, status = %describe(status), "old generation exited");
                }
            }
            Role::Draining | Role::Current => self.current_ended(number, pid, status, ran),
        }
    }

    fn current_ended(&mut self, number: u64, pid: i32, status: WaitStatus, ran: Duration) {
        match self.phase {
            Phase::Stopping { .. } => {
                info!(generation = number, pid, status = %describe(status), "generation stopped");
            }
            Phase::ShuttingDown { .. } => {
                warn!(generation = number, pid, status = %describe(status), "generation exited during the shutdown delay");
                self.begin_final(Some(exit_code(status)));
            }
            Phase::Running | Phase::Restarting { .. } => {
                if let Some(up) = self.upgrade.as_ref().filter(|u| u.failure.is_none()) {
                    warn!(
                        generation = number,
                        pid,
                        status = %describe(status),
                        next = up.number,
                        "generation exited during an upgrade; the new generation takes over if it becomes ready"
                    );
                    self.lost_current = Some((status, ran));
                    return;
                }
                self.after_current_ended(status, ran);
            }
        }
    }

    /// The current generation ended unasked and nothing replaces it: restart
    /// it, or stop, by the policy.
    fn after_current_ended(&mut self, status: WaitStatus, ran: Duration) {
        let code = exit_code(status);
        self.last_crash_code = code;
        if self.cfg.restart == RestartPolicy::Never {
            info!(status = %describe(status), "the app exited; --restart never: stopping");
            self.begin_final(Some(code));
            return;
        }
        if matches!(status, WaitStatus::Exited(_, 0)) {
            info!("the app exited with status 0 without being asked to; stopping");
            self.begin_final(Some(0));
            return;
        }
        if ran >= CRASH_RESET {
            self.crashes = 0;
        }
        self.crashes += 1;
        if self.crashes > CRASH_LOOP_LIMIT {
            error!(
                crashes = self.crashes - 1,
                status = %describe(status),
                "crash loop: the app keeps failing soon after it starts; giving up"
            );
            self.begin_final(Some(code));
            return;
        }
        let delay = RESTART_BACKOFF_FIRST
            .saturating_mul(1 << (self.crashes - 1).min(16))
            .min(RESTART_BACKOFF_MAX);
        warn!(
            status = %describe(status),
            ran_ms = ran.as_millis() as u64,
            restart_in = %format_duration(delay),
            crash = self.crashes,
            limit = CRASH_LOOP_LIMIT,
            "the app failed; restarting it (the sockets stay open)"
        );
        self.phase = Phase::Restarting {
            at: Self::now() + delay,
        };
        self.refuse_pending(
            "the app is restarting after a crash (the restart starts the command now on disk)",
        );
    }

    fn restart(&mut self) {
        self.phase = Phase::Running;
        let number = self.next_number;
        self.next_number += 1;
        match self.spawn_generation(number, Role::Current) {
            Ok(pid) => {
                self.current = Some(number);
                self.restarts += 1;
                info!(
                    generation = number,
                    pid,
                    restarts = self.restarts,
                    "app restarted"
                );
            }
            Err(e) => {
                error!(generation = number, error = %e, "cannot restart the app");
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                self.after_current_ended(
                    WaitStatus::Exited(nix::unistd::Pid::from_raw(0), code),
                    Duration::ZERO,
                );
            }
        }
    }

    // ---- stopping -------------------------------------------------------

    fn on_stop_signal(&mut self, signo: i32) {
        let name = signals::name(signo);
        match self.phase {
            Phase::Running => {
                if self.cfg.shutdown_delay.is_zero() {
                    info!(signal = %name, "stop requested");
                    self.begin_final(None);
                } else {
                    info!(
                        signal = %name,
                        delay = %format_duration(self.cfg.shutdown_delay),
                        "stop requested; still serving during the shutdown delay"
                    );
                    self.abandon_upgrades();
                    self.phase = Phase::ShuttingDown {
                        stop_at: Self::now() + self.cfg.shutdown_delay,
                    };
                    self.tell_parent_stopping();
                }
            }
            Phase::Restarting { .. } => {
                info!(signal = %name, "stop requested while waiting to restart");
                self.begin_final(Some(self.last_crash_code));
            }
            Phase::ShuttingDown { .. } => {
                info!(signal = %name, "second stop request: ending the shutdown delay now");
                self.begin_final(None);
            }
            Phase::Stopping { .. } => {
                info!(signal = %name, "already stopping; signal forwarded");
                self.forward(signo);
            }
        }
    }

    fn abandon_upgrades(&mut self) {
        self.refuse_pending("the supervisor is stopping");
        self.fail_upgrade("the supervisor is stopping".to_owned());
    }

    fn tell_parent_stopping(&self) {
        if let Some(socket) = &self.parent_notify {
            if let Err(e) = notify::send(socket, "STOPPING=1") {
                warn!(error = %e, "cannot notify our own NOTIFY_SOCKET");
            }
        }
    }

    /// Stops everything and exits once every generation is reaped, with the
    /// status of the current generation, or `code` if given.
    fn begin_final(&mut self, code: Option<i32>) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let was_shutting_down = matches!(self.phase, Phase::ShuttingDown { .. });
        // Without a current generation (it ended during an upgrade), its
        // status is the one to exit with.
        let code = code.or_else(|| {
            self.current.is_none().then(|| {
                self.lost_current
                    .map_or(self.last_crash_code, |(status, _)| exit_code(status))
            })
        });
        self.phase = Phase::Stopping {
            stop_gen: if code.is_none() { self.current } else { None },
            code,
        };
        info!(generations = self.gens.len(), "stopping");
        self.abandon_upgrades();
        if !was_shutting_down {
            self.tell_parent_stopping();
        }
        let numbers: Vec<u64> = self.gens.keys().copied().collect();
        for number in numbers {
            if self
                .gens
                .get(&number)
                .is_some_and(|g| g.role != Role::Killed)
            {
                self.stop_generation(number);
            }
        }
    }

    // ---- signals and timers ----------------------------------------------

    fn forward(&self, signo: i32) {
        let name = signals::name(signo);
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
                [
                    g.kill_at.filter(|_| !g.killed),
                    g.ready_deadline.filter(|_| waiting),
                    g.delay_ready_at.filter(|_| waiting),
                    g.probe_at.filter(|_| waiting && g.probe_pid.is_none()),
                ]
            })
            .flatten()
            .chain(phase)
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
                let pid = gen.pid;
                warn!(generation = number, pid, "drain timeout: SIGKILL");
                self.kill_tree(number, pid);
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
                    self.fail_upgrade(reason);
                } else {
                    gen.probe_at = None;
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
            if self.gens.is_empty() && self.upgrade.is_none() {
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
        let current = self.current.and_then(|c| self.gens.get(&c));
        let state = match self.phase {
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

/// Binds every `--listen` socket. They are passed to children blocking, as
/// systemd does by default: apps that want non-blocking sockets set it.
fn bind_listeners(cfg: &RunConfig) -> Result<(Registry, Vec<(String, String)>), Error> {
    let mut registry = Registry::default();
    let mut described = Vec::new();
    let opts = BindOptions {
        backlog: cfg.backlog,
        reuseport: false,
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
    for (_, fd) in registry.handoff() {
        // The registry made them non-blocking (the flag lives on the shared
        // open file description): undo that before any child sees them.
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io("reading a listener's flags", e))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::io("making a listener blocking", e))?;
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
    let mut env = Vec::new();
    let mut parent_notify = None;
    for (key, value) in std::env::vars_os() {
        if key == protocol::NOTIFY_SOCKET {
            parent_notify = value.to_str().filter(|v| !v.is_empty()).map(str::to_owned);
        }
        if key
            .to_str()
            .is_some_and(|k| protocol::VARIABLES.contains(&k))
        {
            continue;
        }
        env.push((key, value));
    }
    let (registry, listeners) = bind_listeners(&cfg)?;
    let control = control::bind(&cfg.control)?;
    let control_path = cfg.control.clone();
    let control_inode = std::fs::metadata(&control_path).map(|m| m.ino()).ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
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
            exit_code: None,
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
        match sup.spawn_generation(1, Role::Current) {
            Ok(_) => sup.current = Some(1),
            Err(source) => {
                sup.registry.unlink_unix_paths();
                return Err(Error::Spawn {
                    command: sup.cmd(),
                    source,
                });
            }
        }
        sup.next_number = 2;
        loop {
            sup.on_timer();
            sup.maybe_start_upgrade();
            sup.check_done();
            if let Some(code) = sup.exit_code {
                info!(code, "supervisor exiting");
                sup.registry.unlink_unix_paths();
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
                        return Err(Error::io("reading the signalfd", e));
                    }
                },
                Some(event) = events.recv() => match event {
                    Event::Notify { generation, message } => sup.on_notify(generation, message),
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

    #[test]
    fn descendants_are_found() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = descendants(root);
            if found.len() == 2 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(found.len(), 2, "{found:?}");
        for pid in found {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn process_tree() {
        let me = std::process::id() as i32;
        assert!(in_tree_of(me, me));
        let parent = nix::unistd::getppid().as_raw();
        assert!(in_tree_of(me, parent));
        assert!(!in_tree_of(parent, me));
        assert!(!in_tree_of(i32::MAX, me));
    }
}
