#![doc = include_str!("guide.md")]
//!
//! # API
//!
//! The `handover` binary only parses its arguments ([`cli::parse`]), installs the [`Logger`],
//! and calls [`run`], [`upgrade`] or [`status`].

pub mod cli;
mod control;
mod error;
mod log;
mod pidfile;
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
