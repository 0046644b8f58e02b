//! What the loop tells `--admin` each turn: its gauges (see
//! `supervisor::metrics`). Events (ready, outcomes, drains) are recorded
//! where they happen.

use super::*;
use crate::supervisor::metrics::{unix_start, Gauges};

impl Supervisor {
    /// Publishes the gauges of this turn of the loop; after a stop signal,
    /// the first turn that handles it flips `ready` off.
    pub(super) fn publish_metrics(&self) {
        // With --workers: the worker current the longest.
        let current = self
            .current
            .or_else(|| self.longest_current())
            .and_then(|c| self.gens.get(&c));
        let stopping = matches!(
            self.phase,
            Phase::ShuttingDown { .. } | Phase::Stopping { .. }
        );
        let ready = self.phase == Phase::Running
            && current.is_some_and(|g| g.ready_at.is_some() && g.stop_sent_at.is_none());
        self.metrics.publish(Gauges {
            generation: current.map(|g| g.number),
            generation_started: current.map_or(0.0, |g| unix_start(g.started.elapsed())),
            ready,
            stopping,
            draining: self.draining_count(),
            upgrading: self.upgrade.is_some() || self.rolling(),
            crash_restarts: self.restarts,
        });
    }
}
