//! The one error type of the crate.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in `handover`.
///
/// Each variant says what failed and, where there is one, carries the cause
/// (see [`std::error::Error::source`]). None of them is a panic: the library
/// never exits or panics on a bad environment or a failing system call.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A protocol environment variable (`LISTEN_FDS`, `LISTEN_FDNAMES`,
    /// `LISTEN_PID`, `HANDOVER_*`) is malformed. Nothing was adopted.
    Protocol {
        /// The variable's name.
        variable: &'static str,
        /// Its value, as found.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An inherited file descriptor is not what the protocol says it is
    /// (closed, not a socket, a socket of another type).
    InheritedFd {
        /// The fd's name from `LISTEN_FDNAMES` (or `HANDOVER_CONTROL_FD`).
        name: String,
        /// The fd number.
        fd: i32,
        /// What is wrong with it.
        problem: String,
    },
    /// The app asked for a listener whose inherited socket has another kind or
    /// address. Changing a listener's address needs a full restart, not an upgrade.
    ListenerMismatch {
        /// The listener's name.
        name: String,
        /// What was inherited under that name.
        inherited: String,
        /// What the app asked for.
        requested: String,
    },
    /// The same listener name was asked for twice in one process.
    DuplicateName {
        /// The name.
        name: String,
    },
    /// Creating, binding or listening on a socket failed.
    Bind {
        /// The listener's name.
        name: String,
        /// The address it was to be bound to.
        address: String,
        /// The cause.
        source: io::Error,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The call needs a Tokio runtime (with I/O, time and signals enabled) and
    /// none is running on this thread.
    NoRuntime {
        /// What was being done.
        operation: &'static str,
    },
    /// The new generation could not be started (fork or exec failed: binary
    /// missing, not executable, wrong format). The old generation keeps serving.
    Spawn {
        /// The executable that was to be started.
        executable: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The new generation exited before it said it was ready. The old
    /// generation keeps serving.
    ChildExited {
        /// The child's pid.
        pid: i32,
        /// How it ended: [`code`](std::process::ExitStatus::code), or
        /// [`signal`](std::os::unix::process::ExitStatusExt::signal).
        status: std::process::ExitStatus,
    },
    /// The new generation did not say it was ready within the ready timeout;
    /// it was killed and reaped. The old generation keeps serving.
    ReadyTimeout {
        /// The child's pid.
        pid: i32,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// An upgrade is already running; this trigger was refused.
    UpgradeInProgress,
    /// The new generation was ready but failed its probation (it exited,
    /// failed its health check, or said it was unhealthy). This generation
    /// resumed serving; the new one was stopped.
    ProbationFailed {
        /// The new generation's pid.
        pid: i32,
        /// What failed.
        reason: String,
        /// How long after its ready it failed.
        after_ready: Duration,
    },
    /// The new generation went away while it was adopting this
    /// generation's live connections (before their commit). This generation
    /// resumed serving, every connection with it; the new one was stopped.
    HandoffFailed {
        /// The new generation's pid.
        pid: i32,
        /// What failed.
        reason: String,
    },
    /// This generation is on probation (a previous generation may still
    /// roll back to itself): it starts no upgrade until promoted.
    OnProbation,
    /// Too many earlier generations are still draining
    /// ([`Options::max_draining`](crate::Options::max_draining)); the upgrade
    /// was refused. Try again once one has exited.
    TooManyDraining {
        /// Earlier generations alive now.
        draining: usize,
        /// The cap.
        max: usize,
    },
    /// A listener name is not valid (systemd's rules: 1 to 255 printable
    /// ASCII characters, no `:`).
    InvalidName {
        /// The name, as given.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A task of the crate's own (an upgrade) ended without an outcome: it
    /// panicked, or the runtime shut down under it. The state it held was
    /// restored; a later upgrade may be tried.
    TaskFailed {
        /// What the task was doing.
        operation: &'static str,
        /// Whether it panicked (rather than was cancelled).
        panicked: bool,
    },
    /// This generation is stopping (it was replaced or told to stop), so it
    /// starts no upgrade.
    Stopping,
    /// The process runs under the `handover run` supervisor, which owns
    /// upgrades; ask it (`handover upgrade`) instead.
    Supervised,
    /// [`Handover::new`](crate::Handover::new) was called a second time in
    /// this process; the inherited sockets belong to the first handle.
    AlreadyCreated,
    /// The executable to re-exec could not be determined at start-up.
    NoExecutable {
        /// Why.
        problem: String,
    },
}

/// An error and its causes (`source()` chain), `: `-separated.
pub(crate) fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

impl Error {
    /// This error with its causes, `: `-separated, for a log line or a
    /// message to a person (`Display` alone says what failed, and
    /// [`source`](std::error::Error::source) why).
    pub fn report(&self) -> String {
        report(self)
    }

    pub(crate) fn io(operation: &'static str, source: io::Error) -> Self {
        Error::Io { operation, source }
    }

    pub(crate) fn protocol(
        variable: &'static str,
        value: &str,
        problem: impl Into<String>,
    ) -> Self {
        Error::Protocol {
            variable,
            value: value.to_owned(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol {
                variable,
                value,
                problem,
            } => write!(
                f,
                "malformed {variable}={value:?}: {problem}; the process that started this one \
                 passed a broken socket-activation environment"
            ),
            Error::InheritedFd { name, fd, problem } => write!(
                f,
                "inherited fd {fd} ({name:?}) {problem}; refusing to use it"
            ),
            Error::ListenerMismatch {
                name,
                inherited,
                requested,
            } => write!(
                f,
                "listener {name:?} was inherited as {inherited} but this version asks for \
                 {requested}; changing a listener needs a full restart, not an upgrade"
            ),
            Error::DuplicateName { name } => {
                write!(
                    f,
                    "listener name {name:?} is already in use in this process"
                )
            }
            Error::Bind { name, address, .. } => {
                write!(f, "cannot listen on {address} for {name:?}")
            }
            Error::Io { operation, .. } => write!(f, "{operation} failed"),
            Error::NoRuntime { operation } => write!(
                f,
                "{operation} needs a Tokio runtime with I/O, time and signals enabled; \
                 call it from inside the runtime"
            ),
            Error::Spawn { executable, .. } => write!(
                f,
                "cannot start the new generation from {} (the old generation keeps serving)",
                executable.display()
            ),
            Error::ChildExited { pid, status } => {
                use std::os::unix::process::ExitStatusExt;
                write!(f, "the new generation (pid {pid}) ")?;
                match (status.code(), status.signal()) {
                    (Some(code), _) => write!(f, "exited with status {code}")?,
                    (None, Some(signal)) => match crate::Signal::try_from(signal) {
                        Ok(signal) => write!(f, "was killed by {}", signal.as_str())?,
                        Err(_) => write!(f, "was killed by signal {signal}")?,
                    },
                    (None, None) => write!(f, "ended ({status})")?,
                }
                write!(f, " before it was ready; the old generation keeps serving")
            }
            Error::ReadyTimeout { pid, timeout } => write!(
                f,
                "the new generation (pid {pid}) was not ready within {timeout:?} and was \
                 killed; the old generation keeps serving"
            ),
            Error::UpgradeInProgress => {
                write!(f, "an upgrade is already in progress; trigger refused")
            }
            Error::ProbationFailed {
                pid,
                reason,
                after_ready,
            } => write!(
                f,
                "the new generation (pid {pid}) failed its probation {} ms after it was ready: \
                 {reason}; rolled back, the old generation serves again",
                after_ready.as_millis()
            ),
            Error::HandoffFailed { pid, reason } => write!(
                f,
                "the new generation (pid {pid}) failed during the handover of live \
                 connections: {reason}; rolled back, the old generation serves again"
            ),
            Error::OnProbation => write!(
                f,
                "this generation is still on probation; it starts no upgrade until promoted"
            ),
            Error::TooManyDraining { draining, max } => write!(
                f,
                "{draining} earlier generations are still draining (at most {max}, \
                 Options::max_draining); upgrade refused, try again once one has exited"
            ),
            Error::InvalidName { name, problem } => {
                write!(f, "invalid listener name {name:?}: {problem}")
            }
            Error::TaskFailed {
                operation,
                panicked,
            } => write!(
                f,
                "{operation} ended without an outcome ({}); this generation serves on",
                if *panicked {
                    "its task panicked"
                } else {
                    "its task was cancelled"
                }
            ),
            Error::Stopping => write!(
                f,
                "this generation is stopping (replaced or told to stop); no upgrade started"
            ),
            Error::Supervised => write!(
                f,
                "this process runs under the handover supervisor, which owns upgrades; \
                 run `handover upgrade` instead"
            ),
            Error::AlreadyCreated => write!(
                f,
                "Handover::new was already called in this process; clone the first handle instead"
            ),
            Error::NoExecutable { problem } => write!(
                f,
                "cannot tell which executable to start for upgrades: {problem}; set \
                 Options::executable"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::Io { source, .. } | Error::Spawn { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// Result type of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_does_not_repeat_the_source() {
        let cause = io::Error::other("the very cause");
        let errors = [
            Error::io("doing a thing", io::Error::other("the very cause")),
            Error::Bind {
                name: "http".into(),
                address: "127.0.0.1:1".into(),
                source: io::Error::other("the very cause"),
            },
            Error::Spawn {
                executable: "/x".into(),
                source: io::Error::other("the very cause"),
            },
        ];
        for e in errors {
            assert!(e.source().is_some(), "{e:?}");
            assert!(!e.to_string().contains(&cause.to_string()), "{e}");
            assert!(e.report().ends_with(": the very cause"), "{}", e.report());
        }
    }
}
