//! Deadline-based waiting: the only way tests wait for something.
//!
//! There is no "sleep then check": every wait names what it waits for, has a deadline, and on
//! timeout returns an error that says what was awaited, for how long, and the last state seen.
//! Polling with a short pause inside a bounded loop is used only for state that cannot notify
//! (`/proc`, counters of a background load).

use std::fmt;
use std::time::{Duration, Instant};

/// A point in time by which a wait must be over.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        let start = Instant::now();
        Deadline {
            start,
            end: start + timeout,
        }
    }

    /// Time left, zero once expired.
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.end
    }

    /// Time since the deadline was created.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The whole budget this deadline was created with.
    pub fn budget(&self) -> Duration {
        self.end - self.start
    }

    /// The instant of expiry.
    pub fn instant(&self) -> Instant {
        self.end
    }
}

/// Pause between two polls: short at first, growing to 20 ms, never past the deadline.
fn poll_pause(round: u32, deadline: &Deadline) -> Duration {
    let base = Duration::from_millis(match round {
        0..=9 => 1,
        10..=49 => 5,
        _ => 20,
    });
    base.min(deadline.remaining())
}

/// What one poll of a condition found.
pub enum Poll<T> {
    /// The condition holds: stop waiting with this value.
    Ready(T),
    /// Not yet; the string describes the state seen, for the timeout message.
    Pending(String),
    /// It never will (the awaited process is gone, the load has finished): stop waiting now.
    Failed(String),
}

/// Polls `check` until it is ready or failed, or until `timeout` has passed.
///
/// `check` is always called at least once, and once more at the deadline. The timeout message
/// names `what`, the time waited and the last pending state.
pub fn poll_until<T>(
    what: impl fmt::Display,
    timeout: Duration,
    mut check: impl FnMut() -> Poll<T>,
) -> Result<T, String> {
    let deadline = Deadline::after(timeout);
    let mut round = 0u32;
    loop {
        let expired = deadline.expired();
        match check() {
            Poll::Ready(value) => return Ok(value),
            Poll::Failed(why) => {
                return Err(format!(
                    "gave up after {:?} waiting for {what}: {why}",
                    deadline.elapsed()
                ))
            }
            Poll::Pending(state) if expired => {
                return Err(format!(
                    "timed out after {:?} waiting for {what}; last state: {state}",
                    deadline.elapsed()
                ))
            }
            Poll::Pending(_) => {}
        }
        std::thread::sleep(poll_pause(round, &deadline));
        round = round.saturating_add(1);
    }
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
