//! The upgrade state machine: one at a time, triggers coalesced into the
//! next one, a draining cap, success and failure reported to every waiter.

use super::*;

impl Supervisor {
    pub(super) fn request_upgrade(&mut self, trigger: Trigger, waiter: Option<Waiter>) {
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
        if self.rolling() {
            info!("rolling upgrade in progress; another one will follow it");
            if let Some(w) = &waiter {
                let _ = w.send(
                    "waiting: a rolling upgrade is in progress; this one starts after it"
                        .to_owned(),
                );
            }
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

    pub(super) fn refuse_pending(&mut self, why: &str) {
        if let Some(p) = self.pending.take() {
            warn!("pending upgrade dropped: {why}");
            send(&p.waiters, &format!("refused: {why}"));
        }
    }

    pub(super) fn maybe_start_upgrade(&mut self) {
        if self.phase != Phase::Running || self.upgrade.is_some() || self.rolling() {
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
        if self.pool.is_some() {
            self.start_roll(pending);
        } else {
            self.start_upgrade(pending);
        }
    }

    pub(super) fn start_upgrade(&mut self, pending: Pending) {
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
            probation: None,
        });
        match self.spawn_generation(number, Role::Candidate, None) {
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

    pub(super) fn upgrade_succeeded(&mut self, number: u64, ready_after: Duration) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let Some(pid) = self.gen_pid(number) else {
            return;
        };
        let release = self.gens.get_mut(&number).and_then(|gen| {
            gen.role = Role::Current;
            gen.release.clone()
        });
        let old = self.current.replace(number);
        self.lost_current = None;
        self.write_pid_file();
        // New code that got ready: crashes of the old code do not count.
        self.crashes = 0;
        self.promote_release(release);
        self.tell(number, &Message::Promoted);
        let mut detail = format!(
            "generation {number} (pid {pid}) ready after {}",
            format_duration(ready_after)
        );
        let on_probation = up.probation.as_ref().map(|p| p.started.elapsed());
        if let Some(p) = &up.probation {
            let checks = match (&self.cfg.health, self.gens.get(&number)) {
                (Some(_), Some(g)) => format!(
                    "{} health checks passed, {} failed",
                    g.health.passed, g.health.failed
                ),
                _ => "it stayed alive".to_owned(),
            };
            detail.push_str(&format!(
                ", promoted after {} on probation ({}; {checks})",
                format_duration(Duration::from_millis(p.started.elapsed().as_millis() as u64)),
                if p.parked { "parked" } else { "canary" },
            ));
        }
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
            probation_ms = on_probation.map_or(0, |d| d.as_millis() as u64),
            upgrade_ms = up.started.elapsed().as_millis() as u64,
            "upgrade succeeded"
        );
        send(&up.waiters, &format!("ok: {detail}"));
        self.upgrades_succeeded += 1;
        self.metrics.upgrade_succeeded();
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

    /// Fails the upgrade while the candidate runs: it gets the stop signal,
    /// so that it finishes the requests it already took from the shared
    /// sockets, and SIGKILL with everything it started at
    /// `--failed-drain-timeout`; the failure is reported once it is reaped.
    pub(super) fn fail_upgrade(&mut self, reason: String) {
        let Some(up) = &mut self.upgrade else {
            return;
        };
        if up.failure.is_some() {
            return;
        }
        let number = up.number;
        // A rollback first: the old generation resumes before anything else.
        self.leave_probation(&reason, Self::now());
        self.stop_health(number, "the upgrade failed");
        let Some(up) = &mut self.upgrade else {
            return;
        };
        let Some(pid) = self.gens.get(&number).map(|g| g.pid) else {
            self.finish_upgrade_failure(reason, None);
            return;
        };
        let (signal, grace) = (self.cfg.stop_signal, self.cfg.failed_drain_timeout);
        warn!(
            generation = number,
            pid,
            reason = %reason,
            signal = signal.as_str(),
            sigkill_in = %format_duration(grace),
            "upgrade failing: stopping the new generation"
        );
        send(
            &up.waiters,
            &format!(
                "step: stopping generation {number} (pid {pid}) with {}, SIGKILL in {} \
                 (--failed-drain-timeout): {reason}",
                signal.as_str(),
                format_duration(grace)
            ),
        );
        up.failure = Some(reason);
        self.kill_probe(number, "the upgrade failed");
        let now = Self::now();
        let leftovers = descendants_with_start(pid);
        if let Some(gen) = self.gens.get_mut(&number) {
            gen.role = Role::Failed;
            gen.ready_deadline = None;
            gen.delay_ready_at = None;
            gen.watchdog_at = None;
            gen.stop_sent_at = Some(now);
            gen.kill_at = Some(now + grace);
            gen.leftovers = leftovers;
            gen.rescan_at = Some(now + LEFTOVER_RESCAN);
        }
        if grace.is_zero() {
            if let Some(gen) = self.gens.get_mut(&number) {
                gen.killed = true;
                gen.kill_at = None;
                gen.rescan_at = None;
            }
            self.kill_tree(number, pid);
        } else {
            self.send_signal(pid, signal);
        }
    }

    pub(super) fn finish_upgrade_failure(&mut self, reason: String, pid: Option<i32>) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let keeps = match self.current.and_then(|c| self.gen_pid(c).map(|p| (c, p))) {
            Some((c, p)) => match self.phase {
                Phase::Stopping { .. } => {
                    format!("generation {c} (pid {p}) is being stopped: the supervisor is stopping")
                }
                Phase::ShuttingDown { .. } => format!(
                    "generation {c} (pid {p}) serves until the shutdown delay ends, then stops \
                     with the supervisor"
                ),
                Phase::Running | Phase::Restarting { .. } => {
                    format!("generation {c} (pid {p}) keeps serving")
                }
            },
            None if matches!(self.phase, Phase::Stopping { .. }) => {
                "no generation is serving: the supervisor is stopping".to_owned()
            }
            None => "no generation is serving".to_owned(),
        };
        error!(
            generation = up.number,
            reason = %reason,
            "upgrade failed; {keeps}"
        );
        send(&up.waiters, &format!("failed: {reason}; {keeps}"));
        self.upgrades_failed += 1;
        self.metrics.upgrade_failed(&reason);
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
}

impl Supervisor {
    /// `release` is now the current one: the one it replaces becomes the
    /// crash-loop fallback, and restarts start the file on disk again.
    pub(super) fn promote_release(&mut self, release: Option<Rc<Release>>) {
        self.pinned_release = None;
        let Some(release) = release else {
            return;
        };
        if self.current_release.as_ref().map(|r| r.id) != Some(release.id) {
            if let Some(old) = self.current_release.replace(release.clone()) {
                debug!(
                    current = %release.path.display(),
                    previous = %old.path.display(),
                    "new release; the previous one is kept for a crash-loop fallback"
                );
                self.previous_release = Some(old);
            }
        }
    }
}
