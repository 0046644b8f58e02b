//! The accept loop's back-off: an accept error such as `EMFILE` leaves the
//! connection queued in the kernel, so the loop waits a little and tries
//! again, and logs one line per episode rather than one per attempt.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

/// The first delay after a resource error; doubled up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(5);
const MAX_DELAY: Duration = Duration::from_millis(200);

/// An episode of accept errors.
#[derive(Debug)]
struct Episode {
    started: Instant,
    errors: u64,
    delay: Duration,
}

/// The back-off state of one accept loop.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    episode: Option<Episode>,
}

impl Backoff {
    /// An accept failed: returns how long to wait before the next one (none
    /// for an error that concerns only that connection).
    pub(super) fn failed(&mut self, error: &io::Error) -> Option<Duration> {
        let transient = is_per_connection(error);
        match &mut self.episode {
            None => {
                warn!(
                    error = %error,
                    "accept failed; retrying with back-off (one line per episode)"
                );
                self.episode = Some(Episode {
                    started: Instant::now(),
                    errors: 1,
                    delay: FIRST_DELAY,
                });
            }
            Some(episode) => {
                episode.errors += 1;
                if !transient {
                    episode.delay = (episode.delay * 2).min(MAX_DELAY);
                }
            }
        }
        match (&self.episode, transient) {
            (_, true) => None,
            (Some(episode), false) => Some(episode.delay),
            (None, false) => Some(FIRST_DELAY),
        }
    }

    /// An accept succeeded: ends the episode, if any, with a line.
    pub(super) fn succeeded(&mut self) {
        if let Some(episode) = self.episode.take() {
            info!(
                errors = episode.errors,
                duration_ms = episode.started.elapsed().as_millis() as u64,
                "accepting again after accept errors"
            );
        }
    }
}

/// Errors that concern the one connection being accepted (it was reset
/// while queued, a firewall refused it): try the next one at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::ECONNRESET | libc::EINTR)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[tokio::test(start_paused = true)]
    async fn resource_errors_back_off_doubling_up_to_the_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..8).map(|_| backoff.failed(&emfile())).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            delays,
            [
                ms(5),
                ms(10),
                ms(20),
                ms(40),
                ms(80),
                ms(160),
                ms(200),
                ms(200)
            ]
        );
        assert_eq!(backoff.episode.as_ref().map(|e| e.errors), Some(8));
        backoff.succeeded();
        assert!(backoff.episode.is_none(), "the episode ended");
        assert_eq!(
            backoff.failed(&emfile()),
            ms(5),
            "a new episode starts over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_connection_errors_do_not_wait() {
        let mut backoff = Backoff::default();
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.failed(&aborted), None);
        assert_eq!(backoff.failed(&aborted), None);
        assert_eq!(backoff.episode.as_ref().map(|e| e.errors), Some(2));
    }
}
