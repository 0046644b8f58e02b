//! Deadline-based waiting: the only way tests wait for something.
//!
//! There is no "sleep then check": every wait names what it waits for, has a deadline, and on
//! timeout returns an error that says what was awaited, for how long, and the last state seen.
//! [`Deadline`], [`Poll`] and the polling itself are the library's
//! ([`handover::testkit::poll_until`]); the waits here return the error as a `String`.

use std::fmt;
use std::time::Duration;

pub use handover::testkit::{Deadline, Poll};

/// Polls `check` until it is ready or failed, or until `timeout` has passed.
///
/// `check` is always called at least once, and once more at the deadline. The timeout message
/// names `what`, the time waited and the last pending state.
pub fn poll_until<T>(
    what: impl fmt::Display,
    timeout: Duration,
    check: impl FnMut() -> Poll<T>,
) -> Result<T, String> {
    handover::testkit::poll_until(what, timeout, check).map_err(|e| e.to_string())
}

/// Polls `check` until it returns `Ok`, or fails once `timeout` has passed.
///
/// `check` returns `Err(state)` while the condition does not hold yet; the last `state` is put in
/// the timeout message, so it should describe what was seen ("3 fds: [...]", "pid 42 alive").
pub fn wait_for<T>(
    what: impl fmt::Display,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    poll_until(what, timeout, || match check() {
        Ok(value) => Poll::Ready(value),
        Err(state) => Poll::Pending(state),
    })
}

/// Like [`wait_for`] with a boolean condition and a description of the state for the message.
pub fn wait_until(
    what: impl fmt::Display,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    mut state: impl FnMut() -> String,
) -> Result<(), String> {
    wait_for(what, timeout, || if cond() { Ok(()) } else { Err(state()) })
}
