//! Exits: the reaper's dispatch, crash restarts, and stopping for good.

use super::*;

impl Supervisor {
    pub(super) fn reap(&mut self) {
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

    pub(super) fn on_exit(&mut self, pid: i32, status: WaitStatus) {
        if let Some((number, kind)) = self.probes.remove(&pid) {
            // Whatever the probe started in its group goes with it: its
            // answer is in.
            if let Err(e) = sys::signal_group(pid, Signal::SIGKILL) {
                debug!(generation = number, probe = pid, error = %e, "cannot kill the probe's group");
            }
            match kind {
                ProbeKind::Ready => self.on_probe_exit(number, pid, status),
                ProbeKind::Health => self.on_health_exit(number, pid, status),
            }
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
            kill_probe_group(number, probe, "the generation has exited");
        }
        if let Some((probe, _)) = gen.health.exec {
            kill_probe_group(number, probe, "the generation has exited");
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
        if self.pool.is_some() {
            self.worker_exited(gen, pid, status, ran);
            return;
        }
        match gen.role {
            Role::Candidate => {
                let reason = format!(
                    "generation {number} (pid {pid}) {} before it was ready",
                    describe(status)
                );
                self.finish_upgrade_failure(reason, Some(pid));
            }
            Role::Probation => {
                let after = gen.ready_at.map_or(Duration::ZERO, |r| r.elapsed());
                let reason = format!(
                    "generation {number} (pid {pid}) {} during its probation, {} after ready",
                    describe(status),
                    format_duration(Duration::from_millis(after.as_millis() as u64))
                );
                self.leave_probation(&reason, Self::now());
                self.finish_upgrade_failure(reason, Some(pid));
            }
            Role::Failed => {
                info!(
                    generation = number,
                    pid,
                    status = %describe(status),
                    stopped_after_ms = gen.stop_sent_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                    "failed generation reaped"
                );
                self.kill_leftovers(number, pid, &gen.leftovers);
                let reason = self
                    .upgrade
                    .as_mut()
                    .and_then(|u| u.failure.take())
                    .unwrap_or_else(|| format!("generation {number} (pid {pid}) was killed"));
                self.finish_upgrade_failure(reason, Some(pid));
            }
            Role::Draining if !was_current => {
                self.metrics
                    .drained(gen.stop_sent_at.map(|t| t.elapsed()), gen.killed);
                let clean = code == 0;
                if clean {
                    info!(generation = number, pid, status = %describe(status), "old generation exited");
                } else {
                    warn!(generation = number, pid, status = %describe(status), "old generation exited");
                }
            }
            Role::Draining | Role::Current => {
                self.restart_asked = gen.liveness_restart;
                self.current_ended(number, pid, status, ran);
                self.restart_asked = false;
            }
        }
    }

    pub(super) fn current_ended(
        &mut self,
        number: u64,
        pid: i32,
        status: WaitStatus,
        ran: Duration,
    ) {
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
    pub(super) fn after_current_ended(&mut self, status: WaitStatus, ran: Duration) {
        let code = exit_code(status);
        self.last_crash_code = code;
        let asked = std::mem::take(&mut self.restart_asked);
        if asked {
            info!(status = %describe(status), "the unhealthy generation has exited");
        } else if self.cfg.restart == RestartPolicy::Never {
            info!(status = %describe(status), "the app exited; --restart never: stopping");
            self.begin_final(Some(code));
            return;
        }
        if !asked && matches!(status, WaitStatus::Exited(_, 0)) {
            info!("the app exited with status 0 without being asked to; stopping");
            self.begin_final(Some(0));
            return;
        }
        if ran >= CRASH_RESET {
            self.crashes = 0;
        }
        self.crashes += 1;
        if self.crashes > RESTART_LIMIT && self.fall_back() {
            return;
        }
        if self.crashes > RESTART_LIMIT {
            error!(
                crashes = self.crashes,
                restarts = RESTART_LIMIT,
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
            restart = self.crashes,
            max_restarts = RESTART_LIMIT,
            "the app failed; restarting it (the sockets stay open)"
        );
        self.phase = Phase::Restarting {
            at: Self::now() + delay,
        };
        self.refuse_pending(
            "the app is restarting after a crash (the restart starts the command now on disk)",
        );
    }

    pub(super) fn restart(&mut self) {
        self.phase = Phase::Running;
        let number = self.next_number;
        self.next_number += 1;
        let pinned = self.pinned_release.clone();
        let from = pinned
            .as_ref()
            .map_or("the command on disk".to_owned(), |r| {
                format!("the kept release {}", r.path.display())
            });
        match self.spawn_generation(number, Role::Current, pinned.clone()) {
            Ok(pid) => {
                self.current = Some(number);
                self.restarts += 1;
                self.write_pid_file();
                if pinned.is_none() {
                    // A deploy since the last start is a new release.
                    let release = self.gens.get(&number).and_then(|g| g.release.clone());
                    self.promote_release(release);
                }
                info!(
                    generation = number,
                    pid,
                    restarts = self.restarts,
                    from,
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

    /// A crash loop: when the release before the current one is kept (and
    /// was not fallen back to already), restart that one instead of giving
    /// up. True when it will.
    fn fall_back(&mut self) -> bool {
        let (Some(previous), Some(current)) = (&self.previous_release, &self.current_release)
        else {
            return false;
        };
        if self.pinned_release.is_some() || previous.id == current.id {
            return false;
        }
        let previous = previous.clone();
        error!(
            crashes = self.crashes,
            broken = %current.path.display(),
            previous = %previous.path.display(),
            "crash loop: falling back to the previous release (kept open since it ran)"
        );
        self.current_release = Some(previous.clone());
        self.pinned_release = Some(previous);
        self.crashes = 0;
        self.phase = Phase::Restarting {
            at: Self::now() + RESTART_BACKOFF_FIRST,
        };
        self.refuse_pending("the app is restarting after a crash loop (falling back)");
        true
    }

    // ---- stopping -------------------------------------------------------

    pub(super) fn on_stop_signal(&mut self, signo: i32) {
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

    pub(super) fn abandon_upgrades(&mut self) {
        self.refuse_pending("the supervisor is stopping");
        self.abandon_roll("the supervisor is stopping");
        self.fail_upgrade("the supervisor is stopping".to_owned());
    }

    pub(super) fn tell_parent_stopping(&self) {
        if let Some(socket) = &self.parent_notify {
            if let Err(e) = notify::send(socket, "STOPPING=1") {
                warn!(error = %e, "cannot notify our own NOTIFY_SOCKET");
            }
        }
    }

    /// Stops everything and exits once every generation is reaped, with the
    /// status of the current generation, or `code` if given.
    pub(super) fn begin_final(&mut self, code: Option<i32>) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let was_shutting_down = matches!(self.phase, Phase::ShuttingDown { .. });
        // Without a current generation (it ended during an upgrade), its
        // status is the one to exit with.
        // With workers, the status of the one current the longest.
        let longest = self.longest_current();
        let code = code.or_else(|| {
            (self.current.is_none() && longest.is_none()).then(|| {
                self.lost_current
                    .map_or(self.last_crash_code, |(status, _)| exit_code(status))
            })
        });
        self.phase = Phase::Stopping {
            stop_gen: if code.is_none() {
                self.current.or(longest)
            } else {
                None
            },
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
                .is_some_and(|g| g.role != Role::Failed)
            {
                self.stop_generation(number);
            }
        }
    }
}
