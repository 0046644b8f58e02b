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
        /// The fd's name from `LISTEN_FDNAMES` (or `HANDOVER_READY_FD`).
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
        /// How it ended, in words (`exited with status 1`, `killed by SIGSEGV`).
        status: String,
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

impl Error {
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
            Error::Bind {
                name,
                address,
                source,
            } => write!(f, "cannot listen on {address} for {name:?}: {source}"),
            Error::Io { operation, source } => write!(f, "{operation} failed: {source}"),
            Error::NoRuntime { operation } => write!(
                f,
                "{operation} needs a Tokio runtime with I/O, time and signals enabled; \
                 call it from inside the runtime"
            ),
            Error::Spawn { executable, source } => write!(
                f,
                "cannot start the new generation from {}: {source}; the old generation \
                 keeps serving",
                executable.display()
            ),
            Error::ChildExited { pid, status } => write!(
                f,
                "the new generation (pid {pid}) {status} before it was ready; the old \
                 generation keeps serving"
            ),
            Error::ReadyTimeout { pid, timeout } => write!(
                f,
                "the new generation (pid {pid}) was not ready within {timeout:?} and was \
                 killed; the old generation keeps serving"
            ),
            Error::UpgradeInProgress => {
                write!(f, "an upgrade is already in progress; trigger refused")
            }
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
