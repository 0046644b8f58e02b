//! The upgrade: start the next generation with our sockets, wait for ready /
//! exit / timeout, and on failure stop it (gracefully, with everything it
//! started) before reporting. The state it moves through is the
//! [`Lifecycle`](crate::lifecycle::Lifecycle)'s.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::time::Sleep;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::channel::{self, Message};
use crate::error::{Error, Result};
use crate::handoff::Link;
use crate::handover::{lock, Handover};
use crate::lifecycle::UpgradeSlot;
use crate::probation::Verdict;
use crate::protocol::{self, Handoff, Process};
use crate::state;
use crate::sys::{self, Child, Exec};
use crate::Signal;

/// A successful upgrade: the new generation is ready and serving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The new generation's pid.
    pub pid: i32,
    /// The new generation's number.
    pub generation: u64,
    /// Time from the start of the upgrade to the new generation's ready.
    pub ready_after: Duration,
    /// Time the new generation then spent on probation (zero without one).
    pub probation: Duration,
}

/// How the wait for the new generation ended.
enum Waited {
    Ready,
    /// Ready, but this generation was told to stop meanwhile.
    ReadyWhileStopping,
    ChannelClosed,
    Exited(nix::sys::wait::WaitStatus),
    TimedOut,
    Abandoned,
    Failed(std::io::Error),
}

impl Handover {
    /// Upgrades to the executable now on disk: starts it as the next
    /// generation with this process's sockets, waits until it is
    /// [`ready`](Handover::ready), then tells this generation to stop
    /// ([`stopping`](Handover::stopping) resolves with
    /// [`Stop::Upgraded`](crate::Stop::Upgraded)).
    ///
    /// One upgrade runs at a time. On failure nothing changes: this
    /// generation keeps serving; the failed generation, if still alive, is
    /// sent the stop signal, given [`Options::failed_drain_timeout`](crate::Options::failed_drain_timeout)
    /// to finish what it accepted, then killed with every process it
    /// started; the error comes once it is reaped.
    ///
    /// # Errors
    /// [`Error::Spawn`] (the executable cannot be started),
    /// [`Error::ChildExited`], [`Error::ReadyTimeout`],
    /// [`Error::UpgradeInProgress`], [`Error::TooManyDraining`],
    /// [`Error::Stopping`] (this generation was replaced or told to stop,
    /// also while the upgrade ran), [`Error::Supervised`],
    /// [`Error::NoExecutable`], [`Error::NoRuntime`] (also for a runtime
    /// without its I/O or time driver), [`Error::TaskFailed`].
    ///
    /// # Cancellation
    /// The upgrade runs in a task of its own: dropping the returned future
    /// does not abandon a half-started generation; the upgrade still runs to
    /// its outcome, which is logged, and a final stop waits for it.
    pub async fn upgrade(&self) -> Result<Upgraded> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime {
            operation: "Handover::upgrade",
        })?;
        let handover = self.clone();
        match runtime
            .spawn(async move { handover.upgrade_to_outcome().await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(Error::TaskFailed {
                operation: "the upgrade",
                panicked: e.is_panic(),
            }),
        }
    }

    /// Starts an upgrade in a task of its own (for the upgrade signal).
    pub(crate) fn spawn_upgrade(&self) {
        let handover = self.clone();
        tokio::spawn(async move {
            let _ = handover.upgrade_to_outcome().await;
        });
    }

    async fn upgrade_to_outcome(&self) -> Result<Upgraded> {
        let span = info_span!(
            "upgrade",
            generation = self.inner.generation.saturating_add(1),
            parent_pid = std::process::id()
        );
        async {
            let result = self.upgrade_once().await;
            self.inner.counters.upgrade(&result);
            result
        }
        .instrument(span)
        .await
    }

    async fn upgrade_once(&self) -> Result<Upgraded> {
        {
            self.check_can_upgrade()?;
            let slot = self
                .inner
                .lifecycle
                .begin_upgrade()
                .inspect_err(|e| warn!(error = %e.report(), "upgrade refused"))?;
            let result = self.run_upgrade(&slot).await;
            match &result {
                Ok(up) => {
                    info!(
                        new_pid = up.pid,
                        ready_ms = up.ready_after.as_millis() as u64,
                        "upgrade succeeded; this generation stops accepting"
                    );
                    slot.succeed(up.clone());
                }
                Err(e) => {
                    // The PID file names the generation that serves: this one.
                    self.write_pid_file();
                    error!(error = %e.report(), "upgrade failed; this generation keeps serving");
                    slot.fail();
                }
            }
            result
        }
    }

    /// How many earlier generations are still alive (draining).
    pub(crate) fn draining_count(&self) -> usize {
        self.draining().len()
    }

    /// Earlier generations still alive (draining).
    fn draining(&self) -> Vec<Process> {
        self.inner
            .previous
            .iter()
            .copied()
            .filter(|p| sys::start_time(p.pid) == Some(p.start_time))
            .collect()
    }

    async fn run_upgrade(&self, slot: &UpgradeSlot) -> Result<Upgraded> {
        let inner = &self.inner;
        let executable = inner
            .executable
            .clone()
            .map_err(|problem| Error::NoExecutable { problem })?;
        let mut previous = self.draining();
        let max = inner.options.max_draining;
        if previous.len() >= max {
            return Err(Error::TooManyDraining {
                draining: previous.len(),
                max,
            });
        }
        if std::process::id() == 1 {
            warn!("upgrading as PID 1: when this generation exits, the container ends; use `handover run` as the entrypoint");
        }
        let own_pid = std::process::id() as i32;
        if let Some(start_time) = sys::start_time(own_pid) {
            previous.push(Process {
                pid: own_pid,
                start_time,
            });
        }
        let started = Instant::now();
        let (ours, theirs) =
            channel::pair().map_err(|e| Error::io("creating the control channel", e))?;
        // Everything that needs the runtime's drivers is made before the
        // fork: a runtime without them fails here, with no child started.
        let (control, timer) = watchers(ours, inner.options.ready_timeout)?;
        let spawn_error = |source| Error::Spawn {
            executable: executable.clone(),
            source,
        };
        // The app's state, if it hands any over: taken now, written and
        // sealed before the new generation exists.
        let state = inner.options.state_provider.as_ref().and_then(|provide| {
            let blob = provide();
            match state::write(&blob) {
                Ok(fd) => {
                    info!(bytes = blob.len(), "app state handed to the new generation");
                    Some(fd)
                }
                Err(e) => {
                    warn!(error = %e, "cannot hand the app state over; the new generation starts without it");
                    None
                }
            }
        });
        let handoff_sockets;
        let (exec, mut fds) = {
            let registry = lock(&inner.registry);
            let handoff = registry.handoff();
            // Copies, so that the registry is not locked while the child
            // starts, and the start can wait on a blocking thread.
            let mut fds = handoff
                .iter()
                .map(|(_, fd)| fd.try_clone_to_owned())
                .collect::<std::io::Result<Vec<OwnedFd>>>()
                .map_err(|e| Error::io("duplicating the sockets to pass on", e))?;
            handoff_sockets = handoff.len();
            let vars = Handoff {
                names: handoff.iter().map(|(name, _)| *name).collect(),
                control_fd: Some(protocol::FIRST_FD + fds.len() as i32),
                state_fd: state
                    .as_ref()
                    .map(|_| protocol::FIRST_FD + fds.len() as i32 + 1),
                probation_ms: inner.options.probation.as_millis() as u64,
                generation: inner.generation.saturating_add(1),
                supervisor: None,
                notify_socket: inner.notify_socket.as_deref(),
                process_group: Some(sys::process_group()),
                previous: &previous,
            };
            let exec = Exec::generation(
                executable.as_os_str(),
                inner.argv.iter().map(|a| a.as_os_str()),
                &inner.env,
                &vars,
                inner.cwd.as_deref().map(|c| c.as_os_str()),
            )
            .map_err(spawn_error)?
            .in_new_process_group();
            fds.push(theirs);
            fds.extend(state);
            (exec, fds)
        };
        let sockets = handoff_sockets;
        // fork, then a blocking wait until the child has exec'd (or failed
        // to): off the runtime's workers.
        let spawned = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let pid = sys::spawn(exec, &borrowed);
            // Our copies, the child's end of the channel among them, close here.
            fds.clear();
            pid
        })
        .await
        .map_err(|e| Error::TaskFailed {
            operation: "starting the new generation",
            panicked: e.is_panic(),
        })?;
        // From here on the child is killed and reaped should anything below
        // unwind: `Child` does so on drop.
        let mut child = Child::new(spawned.map_err(spawn_error)?, true);
        let pid = child.pid();
        info!(pid, executable = %executable.display(), sockets, "new generation started; waiting for ready");

        // Whether the new generation understands connection offers.
        let adopts = std::sync::atomic::AtomicBool::new(false);
        let waited = self.wait_ready(&mut child, &control, timer, &adopts).await;
        let ready_after = started.elapsed();
        let timeout = inner.options.ready_timeout;
        match waited {
            Waited::Ready => {
                // A generation serves on our sockets now: they are no longer
                // ours alone to clean up.
                slot.mark_replaced();
                // `serve`'s connections stay open (not wound down) for the
                // handover after the probation, if any.
                // A release that does not understand offers is offered none.
                let adopts = adopts.load(std::sync::atomic::Ordering::SeqCst);
                let hold = (inner.moves.wanted() && adopts).then(|| inner.moves.hold());
                let probation = self
                    .probation_phase(&mut child, &control, ready_after)
                    .await?;
                // Kept, so that live connections can be handed to it.
                let link = Link::attach(control);
                inner.successor.set(link.clone());
                if hold.is_some() {
                    self.hand_connections_over(&mut child, &link).await?;
                }
                drop(hold);
                if let Err(e) = channel::send(link.channel().as_fd(), &Message::Promoted) {
                    debug!(pid, error = %e, "cannot tell the new generation it is promoted");
                }
                child.detach();
                Ok(Upgraded {
                    pid,
                    generation: inner.generation.saturating_add(1),
                    ready_after,
                    probation,
                })
            }
            Waited::Exited(status) => {
                leftovers(pid);
                Err(Error::ChildExited {
                    pid,
                    status: sys::exit_status(status),
                })
            }
            Waited::ChannelClosed => {
                // The channel closes when the child exits; give the exit a
                // moment to be seen, within what is left of the timeout.
                let left = timeout.saturating_sub(ready_after);
                match tokio::time::timeout(left, child.wait()).await {
                    Ok(Ok(status)) => {
                        leftovers(pid);
                        Err(Error::ChildExited {
                            pid,
                            status: sys::exit_status(status),
                        })
                    }
                    _ => {
                        self.stop_failed(
                            &mut child,
                            "it closed its control channel without a word",
                        )
                        .await;
                        Err(Error::ReadyTimeout { pid, timeout })
                    }
                }
            }
            Waited::TimedOut => {
                self.stop_failed(&mut child, "it was not ready in time")
                    .await;
                Err(Error::ReadyTimeout { pid, timeout })
            }
            Waited::Abandoned => {
                self.stop_failed(&mut child, "this generation was told to stop")
                    .await;
                Err(Error::Stopping)
            }
            Waited::ReadyWhileStopping => {
                // It may already hold connections: it drains like we do.
                self.stop_failed(
                    &mut child,
                    "it became ready as this generation was told to stop",
                )
                .await;
                Err(Error::Stopping)
            }
            Waited::Failed(e) => {
                self.stop_failed(&mut child, "waiting for it failed").await;
                Err(Error::io("waiting for the new generation", e))
            }
        }
    }

    /// The last step before this generation stops: its `serve`s hand their
    /// idle connections to the new generation (parked meanwhile, so that
    /// new connections go to the new one). If the new generation goes away
    /// before the commit, the upgrade fails: this generation resumes with
    /// every connection, the new one is stopped.
    async fn hand_connections_over(&self, child: &mut Child, link: &Link) -> Result<()> {
        let lifecycle = &self.inner.lifecycle;
        let pid = child.pid();
        lifecycle.park(true);
        match self.inner.moves.transfer(link).await {
            Ok(report) => {
                self.inner.counters.handed_over(report.moved);
                Ok(())
            }
            Err(report) => {
                lifecycle.park(false);
                self.write_pid_file();
                let reason = format!(
                    "it went away while adopting connections ({} kept here)",
                    report.lost
                );
                warn!(
                    pid,
                    reason, "handover failed: rolled back, this generation serves again"
                );
                self.stop_failed(child, "it failed while adopting connections")
                    .await;
                Err(Error::HandoffFailed { pid, reason })
            }
        }
    }

    /// After the new generation is ready: its probation, if any (this
    /// generation parked meanwhile). Returns the time spent on probation; on
    /// a failure this generation has resumed and the new one is stopped.
    async fn probation_phase(
        &self,
        child: &mut Child,
        control: &channel::Receiver,
        ready_after: Duration,
    ) -> Result<Duration> {
        let window = self.inner.options.probation;
        let ready_at = Instant::now();
        let pid = child.pid();
        if !window.is_zero() {
            let lifecycle = &self.inner.lifecycle;
            lifecycle.park(true);
            let verdict = self.probation(child, control, ready_at).await;
            match verdict {
                Verdict::Promoted => {
                    info!(
                        pid,
                        probation_ms = ready_at.elapsed().as_millis() as u64,
                        "probation passed"
                    );
                }
                Verdict::Failed(kind, reason) => {
                    let after_ready = ready_at.elapsed();
                    self.inner.counters.rollback(kind);
                    // Serve again first: within moments of the detection.
                    lifecycle.park(false);
                    self.write_pid_file();
                    warn!(
                        pid,
                        after_ready_ms = after_ready.as_millis() as u64,
                        ready_ms = ready_after.as_millis() as u64,
                        reason,
                        "probation failed: rolled back, this generation serves again"
                    );
                    self.stop_failed(child, "it failed its probation").await;
                    return Err(Error::ProbationFailed {
                        pid,
                        reason,
                        after_ready,
                    });
                }
                Verdict::Stopped => {
                    self.stop_failed(
                        child,
                        "this generation was told to stop during its probation",
                    )
                    .await;
                    return Err(Error::Stopping);
                }
            }
        }
        Ok(ready_at.elapsed())
    }

    async fn wait_ready(
        &self,
        child: &mut Child,
        control: &channel::Receiver,
        mut timer: Pin<Box<Sleep>>,
        adopts: &std::sync::atomic::AtomicBool,
    ) -> Waited {
        let watch = self.watch();
        let ready = async {
            loop {
                match control.recv().await {
                    Ok(Some(Message::Ready)) => return Waited::Ready,
                    Ok(Some(Message::Adopts)) => {
                        adopts.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Some(other)) => debug!(?other, "control message before ready"),
                    Ok(None) => return Waited::ChannelClosed,
                    Err(e) => return Waited::Failed(e),
                }
            }
        };
        tokio::pin!(ready);
        let waited = tokio::select! {
            // Readiness first: when it comes together with the timeout or a
            // stop, the child is serving and must not be killed.
            biased;
            waited = &mut ready => waited,
            status = child.wait() => match status {
                Ok(status) => Waited::Exited(status),
                Err(e) => Waited::Failed(e),
            },
            () = &mut timer => Waited::TimedOut,
            _ = watch.stopping() => Waited::Abandoned,
        };
        // `ready` may have landed just after the timer or the stop fired.
        if matches!(waited, Waited::TimedOut | Waited::Abandoned) {
            let late = tokio::time::timeout(Duration::ZERO, &mut ready).await;
            if matches!(late, Ok(Waited::Ready)) {
                return match waited {
                    Waited::TimedOut => Waited::Ready,
                    _ => Waited::ReadyWhileStopping,
                };
            }
        }
        waited
    }

    /// Stops a failed new generation the way a generation drains: the stop
    /// signal to its process group, the failed-drain timeout to finish what
    /// it accepted from the shared queue, then SIGKILL to the group.
    async fn stop_failed(&self, child: &mut Child, why: &str) {
        let pid = child.pid();
        let signal = self
            .inner
            .options
            .stop_signals
            .first()
            .copied()
            .unwrap_or(Signal::SIGTERM);
        let grace = self.inner.options.effective_failed_drain_timeout();
        info!(
            pid,
            signal = signal.as_str(),
            sigkill_in_ms = grace.as_millis() as u64,
            "stopping the failed new generation: {why}"
        );
        if let Err(e) = child.signal_everything(signal) {
            warn!(pid, error = %e, "cannot send the stop signal to the failed new generation");
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => {
                info!(pid, status = %sys::describe(status), "failed new generation exited")
            }
            Ok(Err(e)) => warn!(pid, error = %e, "cannot wait for the failed new generation"),
            Err(_) => {
                warn!(
                    pid,
                    "the failed new generation did not exit in time: SIGKILL"
                );
                if let Err(e) = child.signal_everything(Signal::SIGKILL) {
                    warn!(pid, error = %e, "cannot kill the failed new generation");
                }
                match child.wait().await {
                    Ok(status) => {
                        info!(pid, status = %sys::describe(status), "failed new generation reaped")
                    }
                    Err(e) => warn!(pid, error = %e, "cannot reap the failed new generation"),
                }
            }
        }
        leftovers(pid);
    }
}

/// Kills what a failed generation started and left behind in its process
/// group (an orphaned `sleep` of a shell script would hold the listener).
fn leftovers(pgid: i32) {
    if let Err(e) = sys::signal_group(pgid, Signal::SIGKILL) {
        warn!(pgid, error = %e, "cannot kill what the failed new generation left behind");
    }
}

/// Our end of the control channel and the ready timer, made before any
/// fork. Tokio panics when the runtime lacks the I/O or time driver; that
/// panic is turned into [`Error::NoRuntime`] here, before a child exists.
fn watchers(control: OwnedFd, timeout: Duration) -> Result<(channel::Receiver, Pin<Box<Sleep>>)> {
    let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let timer = Box::pin(tokio::time::sleep(timeout));
        let control = channel::Receiver::new(control);
        (control, timer)
    }));
    match made {
        Ok((Ok(control), timer)) => Ok((control, timer)),
        Ok((Err(e), _)) => Err(Error::io("watching the control channel", e)),
        Err(_) => Err(Error::NoRuntime {
            operation:
                "Handover::upgrade (the runtime needs its I/O and time drivers: enable_all())",
        }),
    }
}
