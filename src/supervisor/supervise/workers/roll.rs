//! The roll of `--workers` (see the parent module): new workers started up
//! to `--max-surge`, each promoted once ready and through its probation, one
//! old worker stopped per promotion; on a failure, the rollback of the
//! promoted workers to the release they replaced, one at a time.

use super::*;

impl Supervisor {
    // ---- the roll ---------------------------------------------------------

    pub(in crate::supervisor::supervise) fn start_roll(&mut self, pending: Pending) {
        let n = self.pool_n();
        let surge = self.cfg.max_surge;
        info!(
            workers = n,
            max_surge = surge,
            trigger = pending.trigger.as_str(),
            "rolling upgrade started"
        );
        send(
            &pending.waiters,
            &format!(
                "step: rolling upgrade of {n} workers, {surge} at a time (--max-surge): {}",
                self.cmd()
            ),
        );
        if let Some(pool) = &mut self.pool {
            pool.roll = Some(Roll {
                trigger: pending.trigger,
                started: Self::now(),
                waiters: pending.waiters,
                target: None,
                todo: (0..n).collect(),
                inflight: BTreeMap::new(),
                promoted: Vec::new(),
                back: None,
            });
        }
        self.roll_fill();
    }

    pub(in crate::supervisor::supervise) fn roll_mut(&mut self) -> Option<&mut Roll> {
        self.pool.as_mut().and_then(|p| p.roll.as_mut())
    }

    fn roll_send(&self, line: &str) {
        if let Some(roll) = self.pool.as_ref().and_then(|p| p.roll.as_ref()) {
            send(&roll.waiters, line);
        }
    }

    /// Starts new workers up to `--max-surge`; ends the roll when every
    /// worker is new.
    fn roll_fill(&mut self) {
        loop {
            let surge = self.cfg.max_surge;
            let Some(roll) = self.roll_mut() else {
                return;
            };
            if roll.back.is_some() {
                return;
            }
            if roll.todo.is_empty() && roll.inflight.is_empty() {
                self.roll_succeeded();
                return;
            }
            if roll.inflight.len() >= surge {
                return;
            }
            let Some(k) = roll.todo.pop_front() else {
                return;
            };
            let target = roll.target.clone();
            self.start_new_worker(k, target);
        }
    }

    fn start_new_worker(&mut self, k: usize, target: Option<Rc<Release>>) {
        let n = self.pool_n();
        let number = self.next_number;
        self.next_number += 1;
        let from_disk = target.is_none();
        match self.spawn_worker(number, Role::Candidate, target, Some(k)) {
            Ok(pid) => {
                let release = self.gens.get(&number).and_then(|g| g.release.clone());
                let path = release
                    .as_ref()
                    .map_or("unknown".to_owned(), |r| r.path.display().to_string());
                if let Some(roll) = self.roll_mut() {
                    roll.inflight.insert(number, k);
                    if from_disk {
                        roll.target = release;
                    }
                }
                info!(
                    worker = k,
                    generation = number,
                    pid,
                    release = %path,
                    "new worker started"
                );
                self.roll_send(&format!(
                    "step: worker {}/{n}: generation {number} is pid {pid} ({path}); waiting for \
                     {} (ready timeout {})",
                    k + 1,
                    self.cfg.ready,
                    format_duration(self.cfg.ready_timeout)
                ));
            }
            Err(e) => {
                let reason = format!("cannot start generation {number} ({}): {e}", self.cmd());
                self.roll_failed(k, reason);
            }
        }
    }

    /// A new worker (or a rollback's replacement) is ready.
    pub(in crate::supervisor::supervise) fn worker_ready(
        &mut self,
        number: u64,
        ready_after: Duration,
    ) {
        let n = self.pool_n();
        let Some(roll) = self.pool.as_ref().and_then(|p| p.roll.as_ref()) else {
            return;
        };
        let replacement = roll
            .back
            .as_ref()
            .and_then(|b| b.inflight)
            .filter(|(g, _)| *g == number);
        if let Some((_, k)) = replacement {
            self.promote_worker(number, k, ready_after);
            if let Some(back) = self.roll_mut().and_then(|r| r.back.as_mut()) {
                back.inflight = None;
                back.replaced += 1;
            }
            self.roll_back_next();
            return;
        }
        let Some(&k) = roll.inflight.get(&number) else {
            debug!(generation = number, "ready, but no longer part of a roll");
            return;
        };
        let window = self.cfg.probation;
        if window.is_zero() {
            self.promote_new(number, k, ready_after);
            return;
        }
        let now = Self::now();
        let pid = self.gen_pid(number).unwrap_or(0);
        let old = self.pool.as_ref().and_then(|p| p.slots[k].current);
        let parked = old.is_some_and(|o| {
            self.gens.get(&o).is_some_and(|g| g.parkable) && self.tell(o, &Message::Park)
        });
        if let Some(g) = old.and_then(|o| self.gens.get_mut(&o)) {
            g.parked = parked;
        }
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.role = Role::Probation;
            gen.probation_ends = Some(now + window);
        }
        self.tell(number, &Message::Probation(window));
        self.start_health(number, now);
        let mode = if parked { "parked" } else { "canary" };
        info!(
            worker = k,
            generation = number,
            pid,
            old_generation = old.unwrap_or(0),
            mode,
            ready_ms = ready_after.as_millis() as u64,
            probation_ms = window.as_millis() as u64,
            "worker on probation"
        );
        self.roll_send(&format!(
            "step: worker {}/{n}: generation {number} (pid {pid}) ready after {}; on probation \
             for {} ({mode})",
            k + 1,
            format_duration(ready_after),
            format_duration(window)
        ));
    }

    /// A new worker is promoted: its old one stops, the roll goes on.
    pub(in crate::supervisor::supervise) fn promote_new(
        &mut self,
        number: u64,
        k: usize,
        ready_after: Duration,
    ) {
        let old_release = self
            .pool
            .as_ref()
            .and_then(|p| p.slots[k].current)
            .and_then(|o| self.gens.get(&o))
            .and_then(|g| g.release.clone());
        self.promote_worker(number, k, ready_after);
        if let Some(roll) = self.roll_mut() {
            roll.inflight.remove(&number);
            roll.promoted.push((k, old_release));
        }
        self.roll_fill();
    }

    /// Generation `number` becomes worker `k`; the one it replaces is told
    /// to stop (SIGKILL at the drain timeout).
    fn promote_worker(&mut self, number: u64, k: usize, ready_after: Duration) {
        let n = self.pool_n();
        let now = Self::now();
        let Some(pid) = self.gen_pid(number) else {
            return;
        };
        let probation = self.gens.get_mut(&number).map(|gen| {
            gen.role = Role::Current;
            gen.probation_ends.take()
        });
        self.tell(number, &Message::Promoted);
        if self.cfg.health.is_some()
            && self
                .gens
                .get(&number)
                .is_some_and(|g| g.health.next_at.is_none())
        {
            self.start_health(number, now);
        }
        let old = self.pool.as_mut().and_then(|p| {
            let slot = &mut p.slots[k];
            slot.restart = None;
            slot.since = now;
            slot.current.replace(number)
        });
        if k == 0 {
            self.write_pid(pid);
        }
        let mut line = format!(
            "step: worker {}/{n}: generation {number} (pid {pid}) promoted, ready after {}",
            k + 1,
            format_duration(ready_after)
        );
        if probation.flatten().is_some() {
            line.push_str(&format!(
                " and {} on probation",
                format_duration(self.cfg.probation)
            ));
        }
        match old.and_then(|o| self.gen_pid(o).map(|p| (o, p))) {
            Some((o, old_pid)) => {
                self.stop_generation(o);
                line.push_str(&format!(
                    "; generation {o} (pid {old_pid}) told to stop ({}), SIGKILL in {}",
                    self.cfg.stop_signal.as_str(),
                    format_duration(self.cfg.drain_timeout)
                ));
            }
            None => line.push_str("; no generation was serving as this worker"),
        }
        info!(
            worker = k,
            generation = number,
            pid,
            replaced = old.unwrap_or(0),
            ready_ms = ready_after.as_millis() as u64,
            "worker promoted"
        );
        self.roll_send(&line);
    }

    fn roll_succeeded(&mut self) {
        let Some(roll) = self.pool.as_mut().and_then(|p| p.roll.take()) else {
            return;
        };
        let n = self.pool_n();
        let took = roll.started.elapsed();
        self.promote_release(roll.target.clone());
        self.crashes = 0;
        let gens: Vec<String> = self
            .pool
            .as_ref()
            .map(|p| {
                p.slots
                    .iter()
                    .filter_map(|s| s.current)
                    .map(|c| format!("{c} (pid {})", self.gen_pid(c).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let detail = format!(
            "{n} workers replaced in {}: generations {}",
            format_duration(Duration::from_millis(took.as_millis() as u64)),
            gens.join(", ")
        );
        info!(
            workers = n,
            roll_ms = took.as_millis() as u64,
            "rolling upgrade succeeded"
        );
        send(&roll.waiters, &format!("ok: {detail}"));
        self.upgrades_succeeded += 1;
        self.metrics.upgrade_succeeded();
        let last = self.pool.as_ref().and_then(|p| p.slots[0].current);
        self.last_upgrade = Some(Outcome {
            succeeded: true,
            generation: last.unwrap_or(0),
            pid: last.and_then(|c| self.gen_pid(c)),
            trigger: roll.trigger,
            at: Self::now(),
            ready_after: None,
            detail,
        });
    }

    // ---- failure and rollback ---------------------------------------------

    /// Stops a new worker that failed, gracefully: the stop signal, SIGKILL
    /// with everything it started at `--failed-drain-timeout`.
    fn stop_failed_worker(&mut self, number: u64) {
        let (signal, grace) = (self.cfg.stop_signal, self.cfg.failed_drain_timeout);
        let now = Self::now();
        self.kill_probe(number, "the worker failed");
        self.stop_health(number, "the worker failed");
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.role == Role::Failed {
            return;
        }
        let pid = gen.pid;
        gen.role = Role::Failed;
        gen.ready_deadline = None;
        gen.delay_ready_at = None;
        gen.watchdog_at = None;
        gen.probation_ends = None;
        gen.stop_sent_at = Some(now);
        gen.kill_at = Some(now + grace);
        gen.leftovers = descendants_with_start(pid);
        gen.rescan_at = Some(now + LEFTOVER_RESCAN);
        warn!(
            worker = gen.worker,
            generation = number,
            pid,
            signal = signal.as_str(),
            sigkill_in = %format_duration(grace),
            "stopping the failed worker"
        );
        if grace.is_zero() {
            gen.killed = true;
            gen.kill_at = None;
            gen.rescan_at = None;
            self.kill_tree(number, pid);
        } else {
            self.send_signal(pid, signal);
        }
    }

    /// The old worker `k` resumes if it was parked for a new one.
    pub(in crate::supervisor::supervise) fn resume_old(&mut self, k: usize) {
        let Some(old) = self.pool.as_ref().and_then(|p| p.slots[k].current) else {
            return;
        };
        if self.gens.get(&old).is_some_and(|g| g.parked) {
            let resumed = self.tell(old, &Message::Resume);
            if let Some(g) = self.gens.get_mut(&old) {
                g.parked = false;
            }
            info!(
                worker = k,
                generation = old,
                resumed,
                "old worker told to resume"
            );
        }
    }

    /// A new worker of the roll failed while it runs (ready timeout,
    /// unhealthy on probation): it is stopped, and the roll rolls back.
    pub(in crate::supervisor::supervise) fn worker_failed(&mut self, number: u64, reason: String) {
        let Some(roll) = self.pool.as_ref().and_then(|p| p.roll.as_ref()) else {
            return;
        };
        let replacement = roll.back.as_ref().and_then(|b| b.inflight);
        if let Some((g, k)) = replacement.filter(|(g, _)| *g == number) {
            self.stop_failed_worker(g);
            self.replacement_failed(k, reason);
            return;
        }
        let Some(&k) = roll.inflight.get(&number) else {
            return;
        };
        if let Some(roll) = self.roll_mut() {
            roll.inflight.remove(&number);
        }
        self.resume_old(k);
        self.stop_failed_worker(number);
        self.record_rollback(number, &reason);
        self.roll_failed(k, reason);
    }

    fn record_rollback(&mut self, number: u64, reason: &str) {
        let Some(gen) = self.gens.get(&number) else {
            return;
        };
        self.last_rollback = Some(Rollback {
            generation: number,
            pid: gen.pid,
            at: Self::now(),
            after_ready: gen.ready_at.map_or(Duration::ZERO, |r| r.elapsed()),
            reason: reason.to_owned(),
        });
    }

    pub(in crate::supervisor::supervise) fn replacement_failed(
        &mut self,
        k: usize,
        reason: String,
    ) {
        warn!(worker = k, reason = %reason, "rollback: the replacement failed; the worker keeps the new release");
        if let Some(back) = self.roll_mut().and_then(|r| r.back.as_mut()) {
            back.inflight = None;
            back.problems
                .push(format!("worker {} not rolled back: {reason}", k + 1));
        }
        self.roll_back_next();
    }

    /// Worker `k` failed for `reason`: the roll stops and rolls back.
    pub(in crate::supervisor::supervise) fn roll_failed(&mut self, k: usize, reason: String) {
        let n = self.pool_n();
        let Some(roll) = self.roll_mut() else {
            return;
        };
        if roll.back.is_some() {
            debug!(worker = k, reason = %reason, "another new worker failed during the rollback");
            return;
        }
        roll.todo.clear();
        let others: Vec<(u64, usize)> = std::mem::take(&mut roll.inflight).into_iter().collect();
        let queue: VecDeque<_> = roll.promoted.drain(..).rev().collect();
        let promoted = queue.len();
        roll.back = Some(Back {
            at: k + 1,
            reason: reason.clone(),
            queue,
            inflight: None,
            replaced: 0,
            problems: Vec::new(),
        });
        for (g, j) in others {
            self.resume_old(j);
            self.stop_failed_worker(g);
        }
        error!(
            worker = k,
            workers = n,
            promoted,
            reason = %reason,
            "rolling upgrade failed: rolling back"
        );
        self.roll_send(&format!(
            "step: worker {}/{n} failed: {reason}; rolling back the {promoted} promoted workers to \
             the previous release, one at a time",
            k + 1
        ));
        self.roll_back_next();
    }

    /// Starts the next replacement of the rollback, or ends it.
    fn roll_back_next(&mut self) {
        let n = self.pool_n();
        loop {
            let Some(back) = self.roll_mut().and_then(|r| r.back.as_mut()) else {
                return;
            };
            if back.inflight.is_some() {
                return;
            }
            let Some((k, release)) = back.queue.pop_front() else {
                self.roll_finish_failure();
                return;
            };
            let Some(release) = release else {
                back.problems.push(format!(
                    "worker {} not rolled back: the previous executable was not kept",
                    k + 1
                ));
                continue;
            };
            let number = self.next_number;
            self.next_number += 1;
            let path = release.path.display().to_string();
            match self.spawn_worker(number, Role::Candidate, Some(release), Some(k)) {
                Ok(pid) => {
                    if let Some(back) = self.roll_mut().and_then(|r| r.back.as_mut()) {
                        back.inflight = Some((number, k));
                    }
                    info!(worker = k, generation = number, pid, release = %path, "rollback: worker of the previous release started");
                    self.roll_send(&format!(
                        "step: rollback: worker {}/{n}: generation {number} is pid {pid}, the \
                         previous release ({path}, kept open)",
                        k + 1
                    ));
                    return;
                }
                Err(e) => {
                    if let Some(back) = self.roll_mut().and_then(|r| r.back.as_mut()) {
                        back.problems.push(format!(
                            "worker {} not rolled back: cannot start {path}: {e}",
                            k + 1
                        ));
                    }
                }
            }
        }
    }

    fn roll_finish_failure(&mut self) {
        let n = self.pool_n();
        let Some(roll) = self.pool.as_mut().and_then(|p| p.roll.take()) else {
            return;
        };
        let Some(back) = roll.back else {
            return;
        };
        let mut detail = format!("rolled back at worker {} of {n}: {}", back.at, back.reason);
        if back.replaced > 0 {
            detail.push_str(&format!(
                "; {} promoted workers replaced by the previous release",
                back.replaced
            ));
        }
        for p in &back.problems {
            detail.push_str("; ");
            detail.push_str(p);
        }
        error!(
            worker = back.at - 1,
            workers = n,
            replaced = back.replaced,
            roll_ms = roll.started.elapsed().as_millis() as u64,
            "rolling upgrade rolled back"
        );
        send(&roll.waiters, &format!("failed: {detail}"));
        self.upgrades_failed += 1;
        self.metrics.upgrade_failed(&back.reason);
        self.last_upgrade = Some(Outcome {
            succeeded: false,
            generation: self.last_rollback.as_ref().map_or(0, |r| r.generation),
            pid: self.last_rollback.as_ref().map(|r| r.pid),
            trigger: roll.trigger,
            at: Self::now(),
            ready_after: None,
            detail,
        });
    }

    /// The supervisor stops: the roll ends, new workers not promoted stop.
    pub(in crate::supervisor::supervise) fn abandon_roll(&mut self, why: &str) {
        let Some(roll) = self.pool.as_mut().and_then(|p| p.roll.take()) else {
            return;
        };
        let mut stop: Vec<u64> = roll.inflight.keys().copied().collect();
        stop.extend(roll.back.as_ref().and_then(|b| b.inflight).map(|(g, _)| g));
        for g in stop {
            self.stop_failed_worker(g);
        }
        warn!(why, "rolling upgrade abandoned");
        send(&roll.waiters, &format!("failed: {why}"));
        self.upgrades_failed += 1;
        self.metrics.upgrade_failed(why);
    }
}
