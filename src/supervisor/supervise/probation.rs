//! Probation and health: after a new generation is ready it runs beside
//! the current one for `--probation` (the current one parked when it said
//! `parkable`, else canary: both accept); every failure in the window (its
//! exit, `--health` failures in a row, a missed `--watchdog` keep-alive or
//! `WATCHDOG=trigger`, the app's own `unhealthy`) rolls back: the old one
//! resumes at once and the new one is stopped like any failed candidate.
//! Once promoted, the same checks go on as a liveness check of the current
//! generation: failures in a row restart it while the sockets stay open.

use super::*;

/// The health results of a generation, as shown by `status`.
pub(super) fn health_info(check: String, health: &Health) -> HealthInfo {
    HealthInfo {
        check,
        passed: health.passed,
        failed: health.failed,
        in_a_row: health.in_a_row,
        last: health.last.clone(),
    }
}

impl Supervisor {
    fn threshold(&self) -> u32 {
        self.cfg
            .health
            .as_ref()
            .map_or(crate::health::DEFAULT_THRESHOLD, |c| c.threshold)
    }

    /// The generation on probation, if any.
    fn on_probation(&self) -> Option<u64> {
        self.upgrade
            .as_ref()
            .filter(|u| u.probation.is_some() && u.failure.is_none())
            .map(|u| u.number)
    }

    // ---- probation --------------------------------------------------------

    /// The candidate `number` is ready: with `--probation` it starts its
    /// probation beside the current generation; without (or with nothing
    /// to keep beside it) it is promoted at once.
    pub(super) fn candidate_ready(&mut self, number: u64, ready_after: Duration) {
        let window = self.cfg.probation;
        let old = self
            .current
            .filter(|c| self.gens.get(c).is_some_and(|g| g.role == Role::Current));
        let (Some(old), false) = (old, window.is_zero()) else {
            if !window.is_zero() {
                info!(
                    generation = number,
                    "no previous generation is running: promoted without probation"
                );
            }
            self.upgrade_succeeded(number, ready_after);
            return;
        };
        let now = Self::now();
        let Some(pid) = self.gen_pid(number) else {
            return;
        };
        let old_pid = self.gen_pid(old).unwrap_or(0);
        // The old one first: from here on new connections should reach the
        // new generation only.
        let parked =
            self.gens.get(&old).is_some_and(|g| g.parkable) && self.tell(old, &Message::Park);
        if let Some(g) = self.gens.get_mut(&old) {
            g.parked = parked;
        }
        self.stop_health(old, "the new generation is on probation");
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.role = Role::Probation;
        }
        self.tell(number, &Message::Probation(window));
        self.start_health(number, now);
        self.write_pid(pid);
        let mode = if parked { "parked" } else { "canary" };
        let Some(up) = &mut self.upgrade else {
            return;
        };
        up.probation = Some(Probation {
            started: now,
            ends: now + window,
            ready_after,
            old: Some(old),
            parked,
        });
        let checks = match &self.cfg.health {
            Some(c) => format!("--health {} every {}", c.probe, format_duration(c.interval)),
            None => "no --health check: it must stay alive".to_owned(),
        };
        let line = format!(
            "step: generation {number} (pid {pid}) ready after {}; on probation for {} beside \
             generation {old} (pid {old_pid}), {mode}{}; {checks}",
            format_duration(ready_after),
            format_duration(window),
            if parked {
                ": it takes no new connections meanwhile"
            } else {
                ": both accept"
            }
        );
        send(&up.waiters, &line);
        info!(
            generation = number,
            pid,
            old_generation = old,
            old_pid,
            mode,
            ready_ms = ready_after.as_millis() as u64,
            probation_ms = window.as_millis() as u64,
            "probation started"
        );
    }

    pub(super) fn probation_deadline(&self) -> Option<Instant> {
        let up = self.upgrade.as_ref().filter(|u| u.failure.is_none())?;
        let p = up.probation.as_ref()?;
        (p.ends > Self::now()).then_some(p.ends)
    }

    /// Promotes the generation on probation once its window is over and
    /// its checks are healthy (at least one passed, the last one passed).
    pub(super) fn probation_timer(&mut self, now: Instant) {
        let Some(number) = self.on_probation() else {
            return;
        };
        let Some(p) = self.upgrade.as_ref().and_then(|u| u.probation.as_ref()) else {
            return;
        };
        if p.ends > now {
            return;
        }
        let ready_after = p.ready_after;
        let Some(gen) = self.gens.get(&number) else {
            return;
        };
        let healthy =
            self.cfg.health.is_none() || (gen.health.passed > 0 && gen.health.in_a_row == 0);
        if !healthy {
            // Waits for the next result: healthy promotes, the threshold
            // rolls back.
            return;
        }
        self.upgrade_succeeded(number, ready_after);
    }

    /// What `status` shows of a probation in progress.
    pub(super) fn probation_info(&self, now: Instant) -> Option<ProbationInfo> {
        let up = self.upgrade.as_ref().filter(|u| u.failure.is_none())?;
        let p = up.probation.as_ref()?;
        let gen = self.gens.get(&up.number)?;
        Some(ProbationInfo {
            generation: up.number,
            pid: gen.pid,
            mode: if p.parked { "parked" } else { "canary" },
            old_generation: p.old,
            old_pid: p.old.and_then(|o| self.gen_pid(o)),
            elapsed: now - p.started,
            left: p.ends.saturating_duration_since(now),
            health: self
                .cfg
                .health
                .as_ref()
                .map(|c| health_info(c.probe.to_string(), &gen.health)),
        })
    }

    /// Ends the probation in progress without a promotion: the old
    /// generation resumes (parked) or carries on (canary) at once, names
    /// the PID file again and is checked again; the rollback is recorded.
    /// The caller stops the new generation (or has seen it exit).
    pub(super) fn leave_probation(&mut self, reason: &str, detected: Instant) {
        let Some(up) = &mut self.upgrade else {
            return;
        };
        let Some(p) = up.probation.take() else {
            return;
        };
        let number = up.number;
        let pid = self.gen_pid(number).unwrap_or(0);
        let old = p
            .old
            .filter(|o| self.gens.get(o).is_some_and(|g| g.role == Role::Current));
        if let Some(old) = old {
            if p.parked {
                let resumed = self.tell(old, &Message::Resume);
                if let Some(g) = self.gens.get_mut(&old) {
                    g.parked = false;
                }
                let resume_us = detected.elapsed().as_micros() as u64;
                if resumed {
                    info!(generation = old, resume_us, "old generation told to resume");
                } else {
                    warn!(generation = old, "cannot tell the old generation to resume");
                }
            }
            self.write_pid_file();
            let interval = self
                .cfg
                .health
                .as_ref()
                .map_or(Duration::ZERO, |c| c.interval);
            self.start_health(old, Self::now() + interval);
        }
        let after_ready = p.started.elapsed();
        warn!(
            generation = number,
            pid,
            old_generation = p.old.unwrap_or(0),
            mode = if p.parked { "parked" } else { "canary" },
            after_ready_ms = after_ready.as_millis() as u64,
            reason,
            "probation failed: rolling back"
        );
        self.last_rollback = Some(Rollback {
            generation: number,
            pid,
            at: Self::now(),
            after_ready,
            reason: reason.to_owned(),
        });
    }

    /// Fails the probation in progress for `why`: rolls back and stops the
    /// new generation gracefully (see `fail_upgrade`).
    pub(super) fn fail_probation(&mut self, why: &str) {
        let Some(number) = self.on_probation() else {
            return;
        };
        let after = self
            .upgrade
            .as_ref()
            .and_then(|u| u.probation.as_ref())
            .map_or(Duration::ZERO, |p| p.started.elapsed());
        let pid = self.gen_pid(number).unwrap_or(0);
        let reason = format!(
            "generation {number} (pid {pid}) failed its probation {} after ready: {why}",
            format_duration(Duration::from_millis(after.as_millis() as u64))
        );
        // fail_upgrade leaves the probation first.
        self.fail_upgrade(reason);
    }

    // ---- health checks ----------------------------------------------------

    /// Checks generation `number` from `at` on (with `--health`).
    pub(super) fn start_health(&mut self, number: u64, at: Instant) {
        if self.cfg.health.is_none() {
            return;
        }
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.health.next_at = Some(at);
        }
    }

    /// Stops checking generation `number`: a check in flight is abandoned
    /// (an exec one killed with its process group, reaped later).
    pub(super) fn stop_health(&mut self, number: u64, why: &str) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        gen.health.next_at = None;
        gen.health.running = None;
        if let Some((probe, _)) = gen.health.exec.take() {
            kill_probe_group(number, probe, why);
        }
    }

    /// The health timers of generation `number`: a watchdog keep-alive
    /// overdue, an exec check past its timeout, a check due. True when
    /// something was done.
    pub(super) fn health_timers(&mut self, number: u64, now: Instant) -> bool {
        let Some(gen) = self.gens.get_mut(&number) else {
            return false;
        };
        if gen.watchdog_at.is_some_and(|t| t <= now) {
            gen.watchdog_at = None;
            let limit = self.cfg.watchdog.unwrap_or_default();
            self.unhealthy(
                number,
                format!(
                    "no WATCHDOG=1 within {} (--watchdog)",
                    format_duration(limit)
                ),
            );
            return true;
        }
        if let Some((probe, deadline)) = gen.health.exec {
            if deadline <= now {
                gen.health.exec = None;
                kill_probe_group(number, probe, "the health check timed out");
                let timeout = self
                    .cfg
                    .health
                    .as_ref()
                    .map_or(Duration::ZERO, |c| c.timeout);
                self.record_result(
                    number,
                    Err(format!(
                        "no answer within {} (--health-timeout)",
                        format_duration(timeout)
                    )),
                );
                return true;
            }
            return false;
        }
        let due = gen.health.running.is_none() && gen.health.next_at.is_some_and(|t| t <= now);
        if due && self.phase == Phase::Running {
            self.start_health_check(number, now);
            return true;
        }
        false
    }

    fn start_health_check(&mut self, number: u64, now: Instant) {
        let Some(check) = self.cfg.health.clone() else {
            return;
        };
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        gen.health.next_at = Some(now + check.interval);
        let pid = gen.pid;
        match &check.probe {
            Probe::Exec { command } => match self.spawner.probe(command, pid, number) {
                Ok(probe) => {
                    debug!(generation = number, probe, "health command started");
                    self.probes.insert(probe, (number, ProbeKind::Health));
                    if let Some(gen) = self.gens.get_mut(&number) {
                        gen.health.exec = Some((probe, now + check.timeout));
                    }
                }
                Err(e) => self.record_result(number, Err(format!("cannot run `{command}`: {e}"))),
            },
            probe => {
                self.health_seq += 1;
                let seq = self.health_seq;
                let events = self.events.clone();
                let probe = probe.clone();
                let task = tokio::spawn(async move {
                    let result = probe.run(check.timeout).await;
                    let _ = events.send(Event::Health {
                        generation: number,
                        seq,
                        result,
                    });
                });
                gen.health.running = Some((seq, AbortOnDrop(task)));
            }
        }
    }

    pub(super) fn on_health_result(&mut self, number: u64, seq: u64, result: Result<(), String>) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.health.running.as_ref().map(|(s, _)| *s) != Some(seq) {
            return;
        }
        gen.health.running = None;
        self.record_result(number, result);
    }

    pub(super) fn on_health_exit(&mut self, number: u64, probe: i32, status: WaitStatus) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.health.exec.map(|(p, _)| p) != Some(probe) {
            return;
        }
        gen.health.exec = None;
        let result = if matches!(status, WaitStatus::Exited(_, 0)) {
            Ok(())
        } else {
            let command = match self.cfg.health.as_ref().map(|c| &c.probe) {
                Some(Probe::Exec { command }) => command.as_str(),
                _ => "the health command",
            };
            Err(format!("`{command}` {}", describe(status)))
        };
        self.record_result(number, result);
    }

    /// One health result of generation `number`; at the threshold of
    /// failures in a row, it is unhealthy.
    pub(super) fn record_result(&mut self, number: u64, result: Result<(), String>) {
        let threshold = self.threshold();
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        let pid = gen.pid;
        match result {
            Ok(()) => {
                gen.health.passed += 1;
                gen.health.in_a_row = 0;
                gen.health.last = Some("healthy".to_owned());
                debug!(
                    generation = number,
                    pid,
                    passed = gen.health.passed,
                    "health check passed"
                );
            }
            Err(e) => {
                gen.health.failed += 1;
                gen.health.in_a_row += 1;
                gen.health.last = Some(e.clone());
                let in_a_row = gen.health.in_a_row;
                warn!(generation = number, pid, in_a_row, threshold, error = %e, "health check failed");
                if in_a_row >= threshold {
                    self.unhealthy(
                        number,
                        format!("{in_a_row} health checks failed in a row, the last: {e}"),
                    );
                }
            }
        }
    }

    /// Generation `number` is unhealthy: on probation it is rolled back;
    /// the current one is restarted (liveness); otherwise nothing.
    pub(super) fn unhealthy(&mut self, number: u64, reason: String) {
        if self.pool.is_some() {
            self.worker_unhealthy(number, reason);
            return;
        }
        if self.on_probation() == Some(number) {
            self.fail_probation(&reason);
            return;
        }
        let restartable = self.current == Some(number)
            && self.phase == Phase::Running
            && self.upgrade.is_none()
            && self.gens.get(&number).is_some_and(|g| {
                g.role == Role::Current && g.ready_at.is_some() && !g.liveness_restart
            });
        if !restartable {
            debug!(
                generation = number,
                reason, "unhealthy, but not restarted now"
            );
            return;
        }
        let pid = self.gen_pid(number).unwrap_or(0);
        warn!(
            generation = number,
            pid, reason, "liveness check failed: restarting the generation (the sockets stay open)"
        );
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.liveness_restart = true;
        }
        self.stop_generation(number);
    }

    // ---- what the app says ------------------------------------------------

    pub(super) fn on_control(&mut self, number: u64, message: Option<Message>) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        let pid = gen.pid;
        match message {
            Some(Message::Parkable) => {
                gen.parkable = true;
                info!(generation = number, pid, "generation can be parked");
            }
            Some(Message::Ready) => debug!(
                generation = number,
                pid, "the app says ready on its channel"
            ),
            Some(Message::Unhealthy(reason)) => {
                warn!(
                    generation = number,
                    pid, reason, "the app says it is unhealthy"
                );
                let why = format!("the app says it is unhealthy: {reason}");
                let worker_on_probation = self.pool.is_some() && gen.role == Role::Probation;
                if self.on_probation() == Some(number) || worker_on_probation {
                    self.unhealthy(number, why);
                } else {
                    self.record_result(number, Err(why));
                }
            }
            Some(other) => debug!(generation = number, pid, ?other, "control message ignored"),
            None => debug!(generation = number, pid, "control channel closed"),
        }
    }

    /// `WATCHDOG=1` and `WATCHDOG=trigger` of generation `number`.
    pub(super) fn on_watchdog(&mut self, number: u64, value: &str) {
        let Some(limit) = self.cfg.watchdog else {
            debug!(
                generation = number,
                value, "WATCHDOG= ignored: no --watchdog"
            );
            return;
        };
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        match value {
            "1" if gen.ready_at.is_some() && gen.watchdog_at.is_some() => {
                gen.watchdog_at = Some(Self::now() + limit);
            }
            "trigger" if gen.ready_at.is_some() => {
                gen.watchdog_at = None;
                self.unhealthy(number, "the app sent WATCHDOG=trigger".to_owned());
            }
            _ => debug!(generation = number, value, "WATCHDOG= ignored"),
        }
    }

    /// At ready: the watchdog starts, and so do the checks of a generation
    /// that serves alone.
    pub(super) fn on_ready_checks(&mut self, number: u64, role: Role, now: Instant) {
        if let (Some(limit), Some(gen)) = (self.cfg.watchdog, self.gens.get_mut(&number)) {
            gen.watchdog_at = Some(now + limit);
        }
        if role == Role::Current {
            self.start_health(number, now);
        }
    }
}
