//! Deadline-based waiting: every wait names what it waits for, has a deadline, and on timeout
//! says what was awaited, for how long, and the last state seen. Polling with a short pause
//! inside a bounded loop is used only for state that cannot notify (`/proc`, load counters).

use std::fmt;
use std::time::{Duration, Instant};

use super::Error;

/// A point in time by which a wait must be over.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    /// A deadline `timeout` from now (saturating far in the future).
    pub fn after(timeout: Duration) -> Deadline {
        let start = Instant::now();
        let end = start
            .checked_add(timeout)
            .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365));
        Deadline { start, end }
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

    /// The whole budget this deadline was created with (after saturation).
    pub fn budget(&self) -> Duration {
        self.end - self.start
    }

    /// The instant of expiry.
    pub fn instant(&self) -> Instant {
        self.end
    }
}

/// Pause between two polls: short at first (state that changes within a millisecond is seen
/// within a quarter of one), growing to 10 ms, never past the deadline.
fn poll_pause(round: u32, deadline: &Deadline) -> Duration {
    let base = match round {
        0..=199 => Duration::from_micros(250),
        200..=499 => Duration::from_millis(1),
        _ => Duration::from_millis(10),
    };
    base.min(deadline.remaining())
}

/// What one poll of a condition found.
pub enum Poll<T> {
    /// The condition holds: stop waiting with this value.
    Ready(T),
    /// Not yet; the string describes the state seen, for the timeout message.
    Pending(String),
    /// It never will: stop waiting now.
    Failed(String),
}

/// Polls `check` until it is ready or failed, or until `timeout` has passed. `check` is
/// always called at least once, and once more at the deadline.
///
/// # Errors
/// [`Error::Wait`] naming `what`: with `timed_out` and the last pending state at the
/// deadline, without it and with the reason when `check` fails.
pub fn poll_until<T>(
    what: impl fmt::Display,
    timeout: Duration,
    mut check: impl FnMut() -> Poll<T>,
) -> Result<T, Error> {
    let deadline = Deadline::after(timeout);
    let mut round = 0u32;
    loop {
        let expired = deadline.expired();
        match check() {
            Poll::Ready(value) => return Ok(value),
            Poll::Failed(why) => {
                return Err(Error::Wait {
                    what: what.to_string(),
                    waited: deadline.elapsed(),
                    timed_out: false,
                    detail: why,
                })
            }
            Poll::Pending(state) if expired => {
                return Err(Error::Wait {
                    what: what.to_string(),
                    waited: deadline.elapsed(),
                    timed_out: true,
                    detail: state,
                })
            }
            Poll::Pending(_) => {}
        }
        std::thread::sleep(poll_pause(round, &deadline));
        round = round.saturating_add(1);
    }
}
