//! `handover run`: the container entrypoint, a PID-1 supervisor that owns
//! the listening sockets and swaps app generations on SIGHUP.
//!
//! ```text
//! ENTRYPOINT ["handover", "run", "--listen", "tcp://0.0.0.0:8080", "--"]
//! CMD ["/app/server", "--config", "/etc/app.toml"]
//! ```
//!
//! The supervisor binds every `--listen` socket once and starts the command
//! with them by the crate's protocol (systemd socket activation:
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`; `NOTIFY_SOCKET` for
//! `READY=1`; `HANDOVER_GENERATION`; `HANDOVER_SUPERVISOR`, which tells a
//! library app that upgrades belong to the supervisor). Then:
//!
//! - **upgrade** on SIGHUP or `handover upgrade`: the next generation starts
//!   with the same sockets; once ready, the old one gets the stop signal and
//!   SIGKILL after the drain timeout. A generation that exits, crashes, is not
//!   ready in time or cannot be started is killed and reaped, and the old one
//!   keeps serving. One upgrade runs at a time; triggers during one are
//!   coalesced into the next;
//! - **PID-1 duties**: every process is reaped (orphans too; outside a PID
//!   namespace the supervisor is a child subreaper), signals it does not
//!   handle are forwarded to the current generation, children start with an
//!   empty signal mask and default dispositions, and the supervisor exits with
//!   the app's status (128 + signal when it was killed);
//! - **stop** on SIGTERM or SIGINT: the shutdown delay, then the stop signal,
//!   SIGKILL after the drain timeout, exit with the app's status;
//! - **crash restart**: a generation that fails unasked is restarted with
//!   back-off while the sockets stay open (clients wait in the backlog);
//!   after a crash loop the supervisor gives up and exits with its status;
//! - **control socket** for `handover upgrade` and `handover status`.
//!
//! The binary only parses its arguments ([`cli::parse`]) and calls [`run`],
//! [`upgrade`] or [`status`].

pub mod cli;
mod control;
mod error;
mod log;
mod signals;
mod spawn;
mod status;
mod supervise;

use std::io::Write;

pub use self::cli::{ClientConfig, Command, RunConfig, UsageError};
pub use self::error::Error;
pub use self::log::{Logger, LOG_ENV};

/// Runs the supervisor until the app has stopped for good, and returns the
/// exit code to end with: the app's status, 128 + signal when it was killed.
///
/// It blocks every signal it can in the calling thread (signals are read
/// from a signalfd), so call it from the main thread of a process that has
/// no other threads.
///
/// # Errors
/// [`Error`] when it cannot start: a listener cannot be bound, the control
/// socket cannot be set up, the command cannot be started. Failures of the
/// app after it started are not errors: they are logged and handled.
pub fn run(config: RunConfig) -> Result<i32, Error> {
    supervise::run(config)
}

/// `handover upgrade`: asks the supervisor at `config.control` for an
/// upgrade, writes the steps to `out` as they happen (problems to `err`),
/// and returns the exit code: 0 upgraded, 1 the upgrade failed or was
/// refused (the old generation keeps serving), 2 it could not ask or got no
/// outcome within `config.timeout`.
pub fn upgrade(config: &ClientConfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    control::upgrade(config, out, err)
}

/// `handover status [--json]`: writes the supervisor's status to `out`;
/// returns 0, or 2 when it could not ask (message on `err`).
pub fn status(config: &ClientConfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    control::status(config, out, err)
}
