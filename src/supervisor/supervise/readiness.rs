//! Readiness of a generation: `READY=1`, the `--ready exec:` command, the
//! `--ready delay:` timer; and the notifications that carry them.

use super::*;

impl Supervisor {
    pub(super) fn mark_ready(&mut self, number: u64, how: &str) {
        let now = Self::now();
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.ready_at.is_some() || matches!(gen.role, Role::Failed | Role::Draining) {
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
        self.kill_probe(number, "the generation is ready");
        self.on_ready_checks(number, role, now);
        self.metrics.ready(ready_after);
        match role {
            Role::Candidate if self.pool.is_some() => self.worker_ready(number, ready_after),
            Role::Candidate => self.candidate_ready(number, ready_after),
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

    pub(super) fn tell_parent_ready(&mut self, number: u64) {
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

    pub(super) fn on_notify(&mut self, number: u64, message: notify::Message) {
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
        if let Some(value) = message.get("WATCHDOG") {
            let value = value.to_owned();
            self.on_watchdog(number, &value);
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

    pub(super) fn start_probe(&mut self, number: u64) {
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
                self.probes.insert(probe, (number, ProbeKind::Ready));
            }
            Err(e) => {
                warn!(generation = number, error = %e, "cannot run the readiness command");
                gen.probe_at = Some(Self::now() + PROBE_INTERVAL);
            }
        }
    }

    pub(super) fn on_probe_exit(&mut self, number: u64, probe: i32, status: WaitStatus) {
        let Some(gen) = self.gens.get_mut(&number) else {
            return;
        };
        if gen.probe_pid != Some(probe) {
            return;
        }
        gen.probe_pid = None;
        if gen.ready_at.is_some() || matches!(gen.role, Role::Failed | Role::Draining) {
            return;
        }
        if matches!(status, WaitStatus::Exited(_, 0)) {
            self.mark_ready(number, "readiness command exited 0");
        } else {
            debug!(generation = number, status = %describe(status), "readiness command failed; retrying");
            gen.probe_at = Some(Self::now() + PROBE_INTERVAL);
        }
    }
}
