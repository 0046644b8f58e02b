//! The one error type of the test kit.

use std::fmt;
use std::io;
use std::time::Duration;

/// What went wrong while driving a server under test.
///
/// Failed *requests* are not errors: they are counted in a
/// [`Report`](super::Report). An `Error` means the check itself could not go
/// on: the command did not start, a wait ran out, a signal could not be sent.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The command could not be started.
    Spawn {
        /// The command line, as `Debug` shows it.
        command: String,
        /// What `spawn` said.
        source: io::Error,
    },
    /// Something awaited did not happen within its deadline, or can no longer
    /// happen (the process exited, the load finished).
    Wait {
        /// What was awaited ("generation 2 to print its ready line").
        what: String,
        /// How long it was awaited.
        waited: Duration,
        /// `true` if the deadline passed, `false` if waiting was pointless.
        timed_out: bool,
        /// The last state seen, and any recent output of the server.
        detail: String,
    },
    /// A signal could not be sent.
    Signal {
        /// The target process.
        pid: i32,
        /// The signal.
        signal: crate::Signal,
        /// What `kill(2)` said.
        source: io::Error,
    },
    /// A system call or I/O operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// The check cannot run as configured.
    Config {
        /// What is wrong.
        what: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn config(what: impl Into<String>) -> Error {
        Error::Config { what: what.into() }
    }

    /// Appends `more` to the detail of a [`Error::Wait`] (other variants are
    /// returned unchanged).
    pub(crate) fn with_detail(self, more: &str) -> Error {
        match self {
            Error::Wait {
                what,
                waited,
                timed_out,
                mut detail,
            } => {
                if !more.is_empty() {
                    if !detail.is_empty() {
                        detail.push('\n');
                    }
                    detail.push_str(more);
                }
                Error::Wait {
                    what,
                    waited,
                    timed_out,
                    detail,
                }
            }
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn { command, source } => write!(f, "cannot start {command}: {source}"),
            Error::Wait {
                what,
                waited,
                timed_out: true,
                detail,
            } => write!(
                f,
                "timed out after {waited:?} waiting for {what}; last state: {detail}"
            ),
            Error::Wait {
                what,
                waited,
                timed_out: false,
                detail,
            } => write!(f, "gave up after {waited:?} waiting for {what}: {detail}"),
            Error::Signal {
                pid,
                signal,
                source,
            } => write!(f, "cannot send signal {signal} to pid {pid}: {source}"),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Config { what } => write!(f, "invalid check: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. }
            | Error::Signal { source, .. }
            | Error::Io { source, .. } => Some(source),
            Error::Wait { .. } | Error::Config { .. } => None,
        }
    }
}
