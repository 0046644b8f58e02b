//! Workers (`--workers N`): N generations of one release share every
//! socket (the kernel spreads connections across them). Each worker is a
//! slot with its own serving generation, crash restarts and back-off.
//!
//! An upgrade is a roll: a sequence of single-worker upgrades. Up to
//! `--max-surge` new workers start beside the old ones; each must be ready
//! and pass `--probation` (with `--health`) before one old worker is told to
//! stop, so that at least N workers are ready at every step. The first new
//! worker starts from the file on disk; the others of the roll start from
//! its kept executable, so that a roll runs one release even if the file
//! changes meanwhile.
//!
//! A new worker that fails at any step (cannot start, not ready in time,
//! exits, unhealthy on probation) stops the roll: it and the other new
//! workers not yet promoted are stopped gracefully, and the workers already
//! promoted are replaced, one at a time, by workers of the release they
//! replaced, started from its kept executable (the file on disk may be the
//! bad release by now). Each replacement is ready before the worker it
//! replaces is told to stop.
//!
//! With one worker (the default) none of this runs: the single-generation
//! state machine of `upgrades.rs` does.

use std::collections::VecDeque;

use super::*;

mod roll;

/// The workers and the roll in progress.
pub(super) struct Pool {
    /// N.
    pub(super) n: usize,
    pub(super) slots: Vec<Slot>,
    pub(super) roll: Option<Roll>,
}

/// One worker.
pub(super) struct Slot {
    /// The generation serving as this worker.
    pub(super) current: Option<u64>,
    /// Since when it does (the exit status on a stop is the one of the
    /// worker current the longest).
    since: Instant,
    /// Waiting to restart after a crash: when, and from which release (the
    /// one the crashed generation ran).
    restart: Option<(Instant, Option<Rc<Release>>)>,
    /// Quick crashes in a row.
    crashes: u32,
}

/// A rolling upgrade in progress.
pub(super) struct Roll {
    trigger: Trigger,
    started: Instant,
    waiters: Vec<Waiter>,
    /// The release every new worker runs (the first one's, opened from disk).
    target: Option<Rc<Release>>,
    /// Workers still to replace, in order.
    todo: VecDeque<usize>,
    /// New workers started and not promoted yet: generation -> worker.
    inflight: BTreeMap<u64, usize>,
    /// Workers promoted to the new release, with the release their old
    /// generation ran.
    promoted: Vec<(usize, Option<Rc<Release>>)>,
    /// Set once a new worker failed.
    back: Option<Back>,
}

/// A rollback in progress.
struct Back {
    /// The failed worker, counted from 1.
    at: usize,
    reason: String,
    /// Promoted workers still to replace, with the release to start.
    queue: VecDeque<(usize, Option<Rc<Release>>)>,
    /// The replacement in flight: generation, worker.
    inflight: Option<(u64, usize)>,
    replaced: usize,
    /// What went wrong while rolling back.
    problems: Vec<String>,
}

impl Pool {
    pub(super) fn new(n: usize) -> Pool {
        let now = Instant::now();
        Pool {
            n,
            slots: (0..n)
                .map(|_| Slot {
                    current: None,
                    since: now,
                    restart: None,
                    crashes: 0,
                })
                .collect(),
            roll: None,
        }
    }
}

impl Supervisor {
    fn pool_n(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.n)
    }

    /// The worker a generation of the pool serves as, if it is current.
    fn slot_of(&self, number: u64) -> Option<usize> {
        let pool = self.pool.as_ref()?;
        pool.slots.iter().position(|s| s.current == Some(number))
    }

    /// Starts every worker at start-up.
    pub(super) fn start_workers(&mut self) -> std::io::Result<()> {
        let n = self.pool_n();
        for k in 0..n {
            let number = self.next_number;
            self.next_number += 1;
            self.spawn_worker(number, Role::Current, None, Some(k))?;
            let release = self.gens.get(&number).and_then(|g| g.release.clone());
            if self.current_release.is_none() {
                self.current_release = release;
            }
            if let Some(pool) = &mut self.pool {
                pool.slots[k].current = Some(number);
                pool.slots[k].since = Self::now();
            }
            if k == 0 {
                self.write_pid_file_of(number);
            }
        }
        info!(workers = n, "workers started");
        Ok(())
    }

    fn write_pid_file_of(&mut self, number: u64) {
        if let Some(pid) = self.gen_pid(number) {
            self.write_pid(pid);
        }
    }

    /// The generations serving as workers, in worker order.
    pub(super) fn worker_pids(&self) -> Vec<i32> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        pool.slots
            .iter()
            .filter_map(|s| s.current.and_then(|c| self.gen_pid(c)))
            .collect()
    }

    /// The worker current the longest, whose exit status ends a stop.
    pub(super) fn longest_current(&self) -> Option<u64> {
        let pool = self.pool.as_ref()?;
        pool.slots
            .iter()
            .filter_map(|s| s.current.map(|c| (s.since, c)))
            .min()
            .map(|(_, c)| c)
    }

    pub(super) fn rolling(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.roll.is_some())
    }

    // ---- health -----------------------------------------------------------

    /// A worker is unhealthy: on probation, the roll rolls back; a serving
    /// worker is restarted (liveness).
    pub(super) fn worker_unhealthy(&mut self, number: u64, reason: String) {
        let Some(gen) = self.gens.get(&number) else {
            return;
        };
        if gen.role == Role::Probation {
            let pid = gen.pid;
            self.worker_failed(
                number,
                format!("generation {number} (pid {pid}) failed its probation: {reason}"),
            );
            return;
        }
        let restartable = gen.role == Role::Current
            && gen.ready_at.is_some()
            && !gen.liveness_restart
            && self.phase == Phase::Running
            && self.slot_of(number).is_some();
        if !restartable {
            debug!(
                generation = number,
                reason, "unhealthy, but not restarted now"
            );
            return;
        }
        warn!(
            worker = gen.worker,
            generation = number,
            pid = gen.pid,
            reason,
            "liveness check failed: restarting the worker"
        );
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.liveness_restart = true;
        }
        self.stop_generation(number);
    }

    // ---- timers -----------------------------------------------------------

    pub(super) fn pool_deadline(&self) -> Option<Instant> {
        let pool = self.pool.as_ref()?;
        let now = Self::now();
        let restarts = pool
            .slots
            .iter()
            .filter_map(|s| s.restart.as_ref().map(|r| r.0));
        let probations = self
            .gens
            .values()
            .filter(|g| g.role == Role::Probation)
            .filter_map(|g| g.probation_ends)
            .filter(|t| *t > now);
        restarts.chain(probations).min()
    }

    pub(super) fn pool_timer(&mut self, now: Instant) {
        if self.pool.is_none() {
            return;
        }
        let due: Vec<(u64, Duration)> = self
            .gens
            .values()
            .filter(|g| g.role == Role::Probation && g.probation_ends.is_some_and(|t| t <= now))
            .filter(|g| {
                self.cfg.health.is_none() || (g.health.passed > 0 && g.health.in_a_row == 0)
            })
            .map(|g| {
                (
                    g.number,
                    g.ready_at.map_or(Duration::ZERO, |r| r - g.started),
                )
            })
            .collect();
        for (number, ready_after) in due {
            let k = self
                .pool
                .as_ref()
                .and_then(|p| p.roll.as_ref())
                .and_then(|r| r.inflight.get(&number).copied());
            if let Some(k) = k {
                self.promote_new(number, k, ready_after);
            }
        }
        let restarts: Vec<usize> = self
            .pool
            .as_ref()
            .map(|p| {
                p.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.restart.as_ref().is_some_and(|r| r.0 <= now))
                    .map(|(k, _)| k)
                    .collect()
            })
            .unwrap_or_default();
        for k in restarts {
            if self.phase == Phase::Running {
                self.restart_worker(k);
            } else if let Some(pool) = &mut self.pool {
                // Stopping: a crashed worker is not started again.
                pool.slots[k].restart = None;
            }
        }
    }

    // ---- exits and restarts -------------------------------------------------

    /// A worker process was reaped (the caller removed it from `gens`).
    pub(super) fn worker_exited(
        &mut self,
        gen: Generation,
        pid: i32,
        status: WaitStatus,
        ran: Duration,
    ) {
        let number = gen.number;
        let k = gen.worker;
        let replacement = self
            .pool
            .as_ref()
            .and_then(|p| p.roll.as_ref())
            .and_then(|r| r.back.as_ref())
            .and_then(|b| b.inflight)
            .filter(|(g, _)| *g == number);
        if replacement.is_some() {
            let reason = format!(
                "generation {number} (pid {pid}) {} before it was ready",
                describe(status)
            );
            self.replacement_failed(k, reason);
            return;
        }
        let in_roll = self
            .pool
            .as_ref()
            .and_then(|p| p.roll.as_ref())
            .is_some_and(|r| r.inflight.contains_key(&number));
        if in_roll && matches!(gen.role, Role::Candidate | Role::Probation) {
            let reason = match gen.ready_at {
                None => format!(
                    "generation {number} (pid {pid}) {} before it was ready",
                    describe(status)
                ),
                Some(r) => format!(
                    "generation {number} (pid {pid}) {} during its probation, {} after ready",
                    describe(status),
                    format_duration(Duration::from_millis(r.elapsed().as_millis() as u64))
                ),
            };
            self.last_rollback = Some(Rollback {
                generation: number,
                pid,
                at: Self::now(),
                after_ready: gen.ready_at.map_or(Duration::ZERO, |r| r.elapsed()),
                reason: reason.clone(),
            });
            if let Some(roll) = self.roll_mut() {
                roll.inflight.remove(&number);
            }
            self.resume_old(k);
            self.roll_failed(k, reason);
            return;
        }
        let was_slot = self.slot_of(number).is_some();
        if !was_slot {
            match gen.role {
                Role::Failed => {
                    info!(
                        worker = k,
                        generation = number,
                        pid,
                        status = %describe(status),
                        "failed worker reaped"
                    );
                    self.kill_leftovers(number, pid, &gen.leftovers);
                }
                _ => {
                    self.metrics
                        .drained(gen.stop_sent_at.map(|t| t.elapsed()), gen.killed);
                    info!(worker = k, generation = number, pid, status = %describe(status), "old worker exited")
                }
            }
            return;
        }
        if let Some(pool) = &mut self.pool {
            pool.slots[k].current = None;
        }
        let code = exit_code(status);
        match self.phase {
            Phase::Stopping { .. } => {
                info!(worker = k, generation = number, pid, status = %describe(status), "worker stopped");
                return;
            }
            Phase::ShuttingDown { .. } => {
                warn!(worker = k, generation = number, pid, status = %describe(status), "worker exited during the shutdown delay");
                return;
            }
            Phase::Running | Phase::Restarting { .. } => {}
        }
        self.last_crash_code = code;
        let asked = gen.liveness_restart;
        if !asked && self.cfg.restart == RestartPolicy::Never {
            info!(worker = k, status = %describe(status), "a worker exited; --restart never: stopping");
            self.begin_final(Some(code));
            return;
        }
        if !asked && matches!(status, WaitStatus::Exited(_, 0)) {
            info!(
                worker = k,
                "a worker exited with status 0 without being asked to; stopping"
            );
            self.begin_final(Some(0));
            return;
        }
        let Some(pool) = &mut self.pool else {
            return;
        };
        let slot = &mut pool.slots[k];
        if ran >= CRASH_RESET || asked {
            slot.crashes = 0;
        }
        slot.crashes += 1;
        let crashes = slot.crashes;
        if crashes > RESTART_LIMIT {
            error!(
                worker = k,
                crashes,
                status = %describe(status),
                "crash loop: a worker keeps failing soon after it starts; giving up"
            );
            self.begin_final(Some(code));
            return;
        }
        let delay = RESTART_BACKOFF_FIRST
            .saturating_mul(1 << (crashes - 1).min(16))
            .min(RESTART_BACKOFF_MAX);
        slot.restart = Some((Self::now() + delay, gen.release.clone()));
        warn!(
            worker = k,
            generation = number,
            pid,
            status = %describe(status),
            ran_ms = ran.as_millis() as u64,
            restart_in = %format_duration(delay),
            crash = crashes,
            max_restarts = RESTART_LIMIT,
            "a worker failed; restarting it while the others serve"
        );
    }

    /// Restarts worker `k` from the release it ran.
    fn restart_worker(&mut self, k: usize) {
        let Some(release) = self
            .pool
            .as_mut()
            .and_then(|p| p.slots[k].restart.take())
            .map(|(_, r)| r)
        else {
            return;
        };
        let number = self.next_number;
        self.next_number += 1;
        match self.spawn_worker(number, Role::Current, release, Some(k)) {
            Ok(pid) => {
                self.restarts += 1;
                if let Some(pool) = &mut self.pool {
                    pool.slots[k].current = Some(number);
                    pool.slots[k].since = Self::now();
                }
                if k == 0 {
                    self.write_pid(pid);
                }
                info!(
                    worker = k,
                    generation = number,
                    pid,
                    restarts = self.restarts,
                    "worker restarted"
                );
            }
            Err(e) => {
                error!(worker = k, generation = number, error = %e, "cannot restart the worker");
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                self.last_crash_code = code;
                let delay = RESTART_BACKOFF_MAX;
                if let Some(pool) = &mut self.pool {
                    pool.slots[k].crashes += 1;
                    if pool.slots[k].crashes > RESTART_LIMIT {
                        self.begin_final(Some(code));
                        return;
                    }
                    pool.slots[k].restart = Some((Self::now() + delay, None));
                }
            }
        }
    }

    // ---- status -----------------------------------------------------------

    /// Every worker process for `status`.
    pub(super) fn workers_info(&self, now: Instant) -> Vec<WorkerInfo> {
        let mut list: Vec<WorkerInfo> = self
            .gens
            .values()
            .map(|g| {
                let stopping = g.stop_sent_at.is_some() || g.role == Role::Failed;
                let state = match g.role {
                    Role::Failed => "failed",
                    _ if stopping => "draining",
                    Role::Probation => "probation",
                    _ if g.ready_at.is_some() => "ready",
                    _ => "starting",
                };
                WorkerInfo {
                    worker: g.worker,
                    generation: g.number,
                    pid: g.pid,
                    release: g.release.as_ref().map(|r| r.path.display().to_string()),
                    state,
                    ready: g.ready_at.is_some(),
                    stopping,
                    uptime: now - g.started,
                }
            })
            .collect();
        list.sort_by_key(|w| (w.worker, w.generation));
        list
    }

    /// The roll in progress, in words.
    pub(super) fn roll_info(&self) -> Option<String> {
        let n = self.pool_n();
        let roll = self.pool.as_ref()?.roll.as_ref()?;
        Some(match &roll.back {
            Some(b) => format!(
                "rolling back at worker {} of {n} ({}): {} of {} promoted workers replaced",
                b.at,
                b.reason,
                b.replaced,
                b.replaced + b.queue.len() + usize::from(b.inflight.is_some())
            ),
            None => format!(
                "{} of {n} workers replaced, {} starting, {} to go",
                roll.promoted.len(),
                roll.inflight.len(),
                roll.todo.len()
            ),
        })
    }
}
