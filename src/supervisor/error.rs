//! What can stop the supervisor from starting or running.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why `handover run` could not start or had to give up. Problems of a
/// generation (a failed upgrade, a crash) are not errors of the supervisor:
/// they are logged, reported to `handover upgrade`, and handled.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum Error {
    /// A `--listen` socket could not be bound.
    Listen {
        /// The `--listen` value, as given.
        spec: String,
        /// The cause.
        source: crate::Error,
    },
    /// The control socket could not be set up.
    Control {
        /// Its path.
        path: PathBuf,
        /// What went wrong, in words.
        problem: String,
        /// The cause, when a system call failed.
        source: Option<io::Error>,
    },
    /// Another supervisor already serves the control socket path.
    ControlInUse {
        /// Its path.
        path: PathBuf,
    },
    /// The directory of `--pid-file` is not usable.
    PidFile {
        /// The `--pid-file` path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The first generation could not be started (fork or exec failed).
    Spawn {
        /// The command.
        command: String,
        /// The cause.
        source: io::Error,
    },
    /// A system call the supervisor needs failed (signal mask, signalfd,
    /// notification socket, runtime).
    Io {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        source: io::Error,
    },
}

impl Error {
    /// This error with its causes, `: `-separated, for the message
    /// `handover run` prints.
    pub(crate) fn report(&self) -> String {
        crate::error::report(self)
    }

    pub(crate) fn io(operation: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io {
            operation,
            source: source.into(),
        }
    }

    /// The exit code `handover run` ends with for this error: 127 when the
    /// command does not exist, 126 when it cannot be executed (as shells
    /// do), 1 otherwise.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            Error::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => 127,
                _ => 126,
            },
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Listen { spec, .. } => write!(f, "--listen {spec}"),
            Error::Control { path, problem, .. } => write!(
                f,
                "control socket {}: {problem} (choose another path with --control)",
                path.display()
            ),
            Error::ControlInUse { path } => write!(
                f,
                "control socket {}: another handover supervisor is listening there \
                 (choose another path with --control)",
                path.display()
            ),
            Error::Spawn { command, .. } => write!(f, "cannot start {command}"),
            Error::PidFile { path, .. } => write!(f, "--pid-file {}", path.display()),
            Error::Io { operation, .. } => write!(f, "{operation} failed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Listen { source, .. } => Some(source),
            Error::Control {
                source: Some(source),
                ..
            } => Some(source),
            Error::Spawn { source, .. } | Error::Io { source, .. } => Some(source),
            Error::PidFile { source, .. } => Some(source),
            _ => None,
        }
    }
}
