//! The HTTP/1.1 load client of the tests: the library's [`handover::testkit::load`], re-exported.
//!
//! The only addition is [`Load`], a wrapper whose waits return the error as a `String` (the
//! tests match on its text and pass it to `expect`); everything else is the library's.

pub use handover::testkit::load::*;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// [`handover::testkit::Load`], with `String` errors.
pub struct Load(handover::testkit::Load);

impl Load {
    /// See [`handover::testkit::Load::start`].
    pub fn start(cfg: LoadConfig) -> Load {
        Load(handover::testkit::Load::start(cfg))
    }

    /// Successful responses so far.
    pub fn ok_count(&self) -> u64 {
        self.0.ok_count()
    }

    /// Failed requests so far.
    pub fn failure_count(&self) -> u64 {
        self.0.failure_count()
    }

    /// Whether every worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// The report so far.
    pub fn snapshot(&self) -> Report {
        self.0.snapshot()
    }

    /// The stop flag.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.0.stop_flag()
    }

    /// See [`handover::testkit::Load::wait_for_ok`].
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> Result<(), String> {
        self.0.wait_for_ok(n, timeout).map_err(|e| e.to_string())
    }

    /// See [`handover::testkit::Load::wait_for_more_ok`].
    pub fn wait_for_more_ok(&self, n: u64, timeout: Duration) -> Result<(), String> {
        self.0
            .wait_for_more_ok(n, timeout)
            .map_err(|e| e.to_string())
    }

    /// See [`handover::testkit::Load::wait_for_body`].
    pub fn wait_for_body(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        self.0
            .wait_for_body(pred, timeout)
            .map_err(|e| e.to_string())
    }

    /// See [`handover::testkit::Load::wait_finished`].
    pub fn wait_finished(&self, timeout: Duration) -> Result<(), String> {
        self.0.wait_finished(timeout).map_err(|e| e.to_string())
    }

    /// Stops the load and returns the final report.
    pub fn stop(self) -> Report {
        self.0.stop()
    }
}
