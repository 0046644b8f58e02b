//! The upgrade: one at a time, start the next generation with our sockets,
//! wait for ready / exit / timeout, report the outcome.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use std::sync::atomic::Ordering;

use tokio::io::AsyncReadExt;
use tokio::signal::unix::signal;
use tracing::{error, info, info_span, warn, Instrument};

use crate::drain::Stop;
use crate::error::{Error, Result};
use crate::handover::{lock, Handover, State};
use crate::protocol::{self, Handoff};
use crate::sys::{self, Child, Exec};

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
}

/// How the wait for the new generation ended.
enum Waited {
    Ready,
    /// Ready, but this generation was told to stop meanwhile.
    ReadyWhileStopping,
    PipeClosed,
    Exited(nix::sys::wait::WaitStatus),
    TimedOut,
    Abandoned,
    Failed(std::io::Error),
}

impl Handover {
    /// Upgrades to the executable now on disk: starts it as the next
    /// generation with this process's sockets, waits until it is
    /// [`ready`](Handover::ready), then tells this generation to stop
    /// ([`stopping`](Handover::stopping) resolves with [`Stop::Upgraded`]).
    ///
    /// One upgrade runs at a time. On failure nothing changes: this
    /// generation keeps serving, the failed child is killed and reaped, and a
    /// later upgrade may be tried.
    ///
    /// # Errors
    /// [`Error::Spawn`] (the executable cannot be started),
    /// [`Error::ChildExited`], [`Error::ReadyTimeout`],
    /// [`Error::UpgradeInProgress`], [`Error::Stopping`] (this generation was
    /// replaced or told to stop, also while the upgrade ran),
    /// [`Error::Supervised`], [`Error::NoExecutable`], [`Error::NoRuntime`].
    ///
    /// # Cancellation
    /// The upgrade runs in a task of its own: dropping the returned future
    /// does not abandon a half-started generation; the upgrade still runs to
    /// its outcome, which is logged.
    pub async fn upgrade(&self) -> Result<Upgraded> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime {
            operation: "Handover::upgrade",
        })?;
        let handover = self.clone();
        runtime
            .spawn(async move { handover.upgrade_to_outcome().await })
            .await
            .map_err(|e| Error::io("running the upgrade", std::io::Error::other(e.to_string())))?
    }

    async fn upgrade_to_outcome(&self) -> Result<Upgraded> {
        let from = self.inner.generation;
        let span = info_span!(
            "upgrade",
            generation = from + 1,
            parent_pid = std::process::id()
        );
        async {
            self.check_can_upgrade()?;
            {
                let mut state = self.inner.state();
                match *state {
                    State::Serving => *state = State::Upgrading,
                    State::Upgrading => {
                        warn!("upgrade already in progress; trigger refused");
                        return Err(Error::UpgradeInProgress);
                    }
                    State::Stopping => {
                        warn!("this generation is stopping; upgrade refused");
                        return Err(Error::Stopping);
                    }
                }
            }
            let result = self.run_upgrade().await;
            {
                let mut state = self.inner.state();
                if *state == State::Upgrading {
                    *state = if result.is_ok() {
                        State::Stopping
                    } else {
                        State::Serving
                    };
                }
            }
            match &result {
                Ok(up) => {
                    info!(
                        new_pid = up.pid,
                        ready_ms = up.ready_after.as_millis() as u64,
                        "upgrade succeeded; this generation stops accepting"
                    );
                    self.inner.drain.stop(Stop::Upgraded(up.clone()));
                }
                Err(e) => error!(error = %e, "upgrade failed; this generation keeps serving"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn run_upgrade(&self) -> Result<Upgraded> {
        let inner = &self.inner;
        let executable = inner
            .executable
            .clone()
            .map_err(|problem| Error::NoExecutable { problem })?;
        if std::process::id() == 1 {
            warn!("upgrading as PID 1: when this generation exits, the container ends; use `handover run` as the entrypoint");
        }
        let started = Instant::now();
        let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("creating the ready pipe", e.into()))?;
        let spawn_error = |source| Error::Spawn {
            executable: executable.clone(),
            source,
        };
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
            let vars = Handoff {
                names: handoff.iter().map(|(name, _)| *name).collect(),
                ready_fd: Some(protocol::FIRST_FD + fds.len() as i32),
                generation: inner.generation + 1,
                supervisor: None,
                notify_socket: inner.notify_socket.as_deref(),
            };
            let exec = Exec::generation(
                executable.as_os_str(),
                inner.argv.iter().map(|a| a.as_os_str()),
                &inner.env,
                &vars,
                inner.cwd.as_deref().map(|c| c.as_os_str()),
            )
            .map_err(spawn_error)?;
            fds.push(ready_write);
            (exec, fds)
        };
        let sockets = fds.len() - 1;
        // fork, then a blocking wait until the child has exec'd (or failed
        // to): off the runtime's workers.
        let spawned = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let child = sys::spawn(exec, &borrowed);
            // Our copies, the ready pipe's write end among them, close here.
            fds.clear();
            child
        })
        .await
        .map_err(|e| {
            Error::io(
                "starting the new generation",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut child = Child::new(spawned.map_err(spawn_error)?, false);
        let pid = child.pid();
        info!(pid, executable = %executable.display(), sockets, "new generation started; waiting for ready");

        let waited = self.wait_ready(&mut child, ready_read).await;
        let ready_after = started.elapsed();
        let timeout = inner.options.ready_timeout;
        if matches!(waited, Waited::Ready | Waited::ReadyWhileStopping) {
            // A generation serves on our sockets now: they are no longer ours
            // alone to clean up, even if a final stop races this upgrade.
            self.inner.replaced.store(true, Ordering::SeqCst);
        }
        match waited {
            Waited::Ready => {
                child.detach();
                Ok(Upgraded {
                    pid,
                    generation: inner.generation + 1,
                    ready_after,
                })
            }
            Waited::Exited(status) => Err(Error::ChildExited {
                pid,
                status: sys::describe(status),
            }),
            Waited::PipeClosed => {
                // The pipe closes when the child exits; give the exit a
                // moment to be seen, within what is left of the timeout.
                let left = timeout.saturating_sub(ready_after);
                match tokio::time::timeout(left, child.wait()).await {
                    Ok(Ok(status)) => Err(Error::ChildExited {
                        pid,
                        status: sys::describe(status),
                    }),
                    _ => {
                        kill_and_reap(&mut child).await;
                        Err(Error::ReadyTimeout { pid, timeout })
                    }
                }
            }
            Waited::TimedOut => {
                kill_and_reap(&mut child).await;
                Err(Error::ReadyTimeout { pid, timeout })
            }
            Waited::Abandoned => {
                kill_and_reap(&mut child).await;
                Err(Error::Stopping)
            }
            Waited::ReadyWhileStopping => {
                // It may already hold connections: stop it the way we stop,
                // gracefully, rather than kill it.
                if let Err(e) = child.signal(Signal::SIGTERM) {
                    warn!(pid, error = %e, "cannot stop the new generation");
                }
                child.detach();
                Err(Error::Stopping)
            }
            Waited::Failed(e) => {
                kill_and_reap(&mut child).await;
                Err(Error::io("waiting for the new generation", e))
            }
        }
    }

    async fn wait_ready(&self, child: &mut Child, ready_read: std::os::fd::OwnedFd) -> Waited {
        let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(ready_read) {
            Ok(p) => p,
            Err(e) => return Waited::Failed(e),
        };
        let watch = self.watch();
        let mut byte = [0u8; 1];
        let waited = tokio::select! {
            // Readiness first: when it comes together with the timeout or a
            // stop, the child is serving and must not be killed.
            biased;
            read = pipe.read(&mut byte) => match read {
                Ok(1) => Waited::Ready,
                Ok(_) => Waited::PipeClosed,
                Err(e) => Waited::Failed(e),
            },
            status = child.wait() => match status {
                Ok(status) => Waited::Exited(status),
                Err(e) => Waited::Failed(e),
            },
            () = tokio::time::sleep(self.inner.options.ready_timeout) => Waited::TimedOut,
            _ = watch.stopping() => Waited::Abandoned,
        };
        // The byte may have landed just after the timer or the stop fired.
        let mut said_ready = || matches!(pipe.try_read(&mut byte), Ok(1));
        match waited {
            Waited::TimedOut if said_ready() => Waited::Ready,
            Waited::Abandoned if said_ready() => Waited::ReadyWhileStopping,
            other => other,
        }
    }
}

async fn kill_and_reap(child: &mut Child) {
    let pid = child.pid();
    if let Err(e) = child.signal(Signal::SIGKILL) {
        warn!(pid, error = %e, "cannot kill the failed new generation");
    }
    match child.wait().await {
        Ok(status) => info!(pid, status = %sys::describe(status), "failed new generation reaped"),
        Err(e) => warn!(pid, error = %e, "cannot reap the failed new generation"),
    }
}

/// Spawns the tasks that turn signals into upgrades and stops.
pub(crate) fn install_signal_handlers(handover: &Handover) -> Result<()> {
    let (upgrade_kind, stop_kinds) = handover.signal_kinds();
    if let Some(kind) = upgrade_kind {
        let mut stream =
            signal(kind).map_err(|e| Error::io("installing the upgrade signal handler", e))?;
        let h = handover.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!(
                    generation = h.generation(),
                    signal = kind.as_raw_value(),
                    "upgrade signal received"
                );
                if let Err(Error::Supervised) = h.check_can_upgrade() {
                    warn!("upgrade signal ignored: the handover supervisor owns upgrades");
                    continue;
                }
                // The upgrade runs beside this loop, so that a burst of
                // signals is refused one by one rather than queued.
                let h = h.clone();
                tokio::spawn(async move {
                    let _ = h.upgrade_to_outcome().await;
                });
            }
        });
    }
    for kind in stop_kinds {
        let mut stream =
            signal(kind).map_err(|e| Error::io("installing a stop signal handler", e))?;
        let h = handover.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!(
                    generation = h.generation(),
                    signal = kind.as_raw_value(),
                    "stop signal received"
                );
                h.shutdown();
            }
        });
    }
    Ok(())
}
