//! The supervisor's figures for orchestrators: what `--admin` serves on
//! `/readyz` and `/metrics`.
//!
//! The event loop owns the state; it records events here (a generation
//! ready, an upgrade's outcome, an old generation drained) and publishes
//! its gauges once per turn of the loop. The admin listener, a task on the
//! same one-thread runtime, only reads. [`Metrics`] is a cheap handle to
//! that shared state; a poisoned lock is taken over, never a panic.
//!
//! Rendered in the Prometheus text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds (seconds) of the histogram buckets of time to ready and
/// drain durations: from a fast app's 5 ms to the 60 s default timeouts.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Why an upgrade failed, as the `reason` label of
/// `handover_rollbacks_total`. Every one is exported from the start, at 0.
pub(crate) const ROLLBACK_REASONS: [&str; 6] = [
    "exited_before_ready",
    "probation",
    "ready_timeout",
    "spawn_failed",
    "stopping",
    "other",
];

/// The `reason` label for the failure text of an upgrade (the words of
/// `supervise::upgrades` and `supervise::exits`).
pub(crate) fn rollback_reason(reason: &str) -> &'static str {
    // First: a probation's failure text quotes what failed (a check, an exit).
    if reason.contains("failed its probation") || reason.contains("during its probation") {
        "probation"
    } else if reason.contains("before it was ready") {
        "exited_before_ready"
    } else if reason.contains("--ready-timeout") {
        "ready_timeout"
    } else if reason.starts_with("cannot start generation") {
        "spawn_failed"
    } else if reason.contains("the supervisor is stopping") {
        "stopping"
    } else {
        "other"
    }
}

/// A cumulative histogram over [`BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    /// Observations at or under each bound (not cumulative here).
    counts: [u64; BUCKETS.len()],
    /// Observations above the last bound.
    over: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.sum += s;
        match BUCKETS.iter().position(|&b| s <= b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// What the loop publishes each turn: its gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Gauges {
    /// The current generation's number, if one runs.
    pub(crate) generation: Option<u64>,
    /// When it started, in seconds since the epoch.
    pub(crate) generation_started: f64,
    /// A generation is ready and the supervisor is not stopping.
    pub(crate) ready: bool,
    /// SIGTERM/SIGINT arrived: shutdown delay or final stop.
    pub(crate) stopping: bool,
    /// Old generations draining after an upgrade.
    pub(crate) draining: usize,
    /// An upgrade is in progress.
    pub(crate) upgrading: bool,
    /// Restarts after a crash.
    pub(crate) crash_restarts: u64,
}

#[derive(Debug, Default)]
struct State {
    gauges: Gauges,
    started: f64,
    upgrades_succeeded: u64,
    upgrades_failed: u64,
    rollbacks: BTreeMap<&'static str, u64>,
    time_to_ready: Histogram,
    drain: Histogram,
    drains_killed: u64,
}

/// A handle to the figures, shared by the event loop and the admin
/// listener.
#[derive(Debug, Clone)]
pub(crate) struct Metrics(Arc<Mutex<State>>);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Seconds since the epoch at which something that has run for `elapsed`
/// started.
pub(crate) fn unix_start(elapsed: Duration) -> f64 {
    (unix_now() - elapsed.as_secs_f64()).max(0.0)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Figures of a supervisor starting now.
    pub(crate) fn new() -> Self {
        let state = State {
            started: unix_now(),
            rollbacks: ROLLBACK_REASONS.iter().map(|&r| (r, 0)).collect(),
            ..State::default()
        };
        Metrics(Arc::new(Mutex::new(state)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the figures
        // are still worth serving.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A generation became ready `after` it started.
    pub(crate) fn ready(&self, after: Duration) {
        self.lock().time_to_ready.observe(after);
    }

    /// An upgrade succeeded.
    pub(crate) fn upgrade_succeeded(&self) {
        self.lock().upgrades_succeeded += 1;
    }

    /// An upgrade failed (the old generation kept serving) for `reason`.
    pub(crate) fn upgrade_failed(&self, reason: &str) {
        let mut s = self.lock();
        s.upgrades_failed += 1;
        *s.rollbacks.entry(rollback_reason(reason)).or_insert(0) += 1;
    }

    /// An old generation exited `after` its stop signal (`None`: never
    /// told); `killed`: by SIGKILL at the drain timeout.
    pub(crate) fn drained(&self, after: Option<Duration>, killed: bool) {
        let mut s = self.lock();
        if let Some(after) = after {
            s.drain.observe(after);
        }
        if killed {
            s.drains_killed += 1;
        }
    }

    /// The loop's gauges, replaced as a whole; the start time of a
    /// generation is kept from its first publication, so that it does not
    /// move between scrapes.
    pub(crate) fn publish(&self, mut gauges: Gauges) {
        let mut s = self.lock();
        if gauges.generation.is_some() && gauges.generation == s.gauges.generation {
            gauges.generation_started = s.gauges.generation_started;
        }
        s.gauges = gauges;
    }

    /// The gauges last published.
    pub(crate) fn gauges(&self) -> Gauges {
        self.lock().gauges.clone()
    }

    /// Everything, in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let s = self.lock();
        let g = &s.gauges;
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "handover_supervisor_start_time_seconds",
            "When the supervisor started, in seconds since the epoch.",
            &s.started,
        );
        gauge(
            "handover_ready",
            "1 while a generation is ready and the supervisor is not stopping (what /readyz says).",
            &u8::from(g.ready),
        );
        gauge(
            "handover_stopping",
            "1 from SIGTERM or SIGINT on: shutdown delay, then the final stop.",
            &u8::from(g.stopping),
        );
        gauge(
            "handover_generation",
            "Number of the current generation (0 while none runs).",
            &g.generation.unwrap_or(0),
        );
        gauge(
            "handover_generation_start_time_seconds",
            "When the current generation started, in seconds since the epoch.",
            &g.generation_started,
        );
        gauge(
            "handover_upgrade_in_progress",
            "1 while a new generation is starting beside the current one.",
            &u8::from(g.upgrading),
        );
        gauge(
            "handover_draining_generations",
            "Old generations still draining after an upgrade.",
            &g.draining,
        );
        let _ = writeln!(
            out,
            "# HELP handover_upgrades_total Upgrades by outcome (a failed one left the old \
             generation serving)."
        );
        let _ = writeln!(out, "# TYPE handover_upgrades_total counter");
        let _ = writeln!(
            out,
            "handover_upgrades_total{{outcome=\"succeeded\"}} {}",
            s.upgrades_succeeded
        );
        let _ = writeln!(
            out,
            "handover_upgrades_total{{outcome=\"failed\"}} {}",
            s.upgrades_failed
        );
        let _ = writeln!(
            out,
            "# HELP handover_rollbacks_total Failed upgrades rolled back, by reason."
        );
        let _ = writeln!(out, "# TYPE handover_rollbacks_total counter");
        for (reason, n) in &s.rollbacks {
            let _ = writeln!(out, "handover_rollbacks_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP handover_crash_restarts_total Restarts of the app after it failed unasked."
        );
        let _ = writeln!(out, "# TYPE handover_crash_restarts_total counter");
        let _ = writeln!(out, "handover_crash_restarts_total {}", g.crash_restarts);
        let _ = writeln!(
            out,
            "# HELP handover_drains_killed_total Old generations killed at the drain timeout."
        );
        let _ = writeln!(out, "# TYPE handover_drains_killed_total counter");
        let _ = writeln!(out, "handover_drains_killed_total {}", s.drains_killed);
        s.time_to_ready.render(
            &mut out,
            "handover_time_to_ready_seconds",
            "Time from a generation's start to its readiness (first start, upgrades, restarts).",
        );
        s.drain.render(
            &mut out,
            "handover_drain_duration_seconds",
            "Time from an old generation's stop signal to its exit.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_from_the_failure_texts() {
        for (text, reason) in [
            (
                "generation 3 (pid 9) exited with status 1 before it was ready",
                "exited_before_ready",
            ),
            (
                "generation 3 (pid 9) was not ready within 2s (--ready-timeout)",
                "ready_timeout",
            ),
            (
                "cannot start generation 3 (/app): No such file",
                "spawn_failed",
            ),
            ("the supervisor is stopping", "stopping"),
            (
                "generation 3 (pid 9) failed its probation 1s after ready: 3 health checks \
                 failed in a row, the last: GET / answered 503",
                "probation",
            ),
            (
                "generation 3 (pid 9) exited with status 1 during its probation, 20ms after ready",
                "probation",
            ),
            ("generation 3 (pid 9) was killed", "other"),
        ] {
            assert_eq!(rollback_reason(text), reason, "{text}");
            assert!(ROLLBACK_REASONS.contains(&reason));
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(500));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"120\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 500.033"), "{out}");
    }

    #[test]
    fn render_counts_events() {
        let m = Metrics::new();
        m.upgrade_succeeded();
        m.upgrade_failed("generation 2 (pid 5) exited with status 3 before it was ready");
        m.drained(Some(Duration::from_millis(20)), true);
        m.ready(Duration::from_millis(7));
        m.publish(Gauges {
            generation: Some(3),
            ready: true,
            draining: 1,
            crash_restarts: 2,
            ..Gauges::default()
        });
        let text = m.render();
        for line in [
            "handover_upgrades_total{outcome=\"succeeded\"} 1",
            "handover_upgrades_total{outcome=\"failed\"} 1",
            "handover_rollbacks_total{reason=\"exited_before_ready\"} 1",
            "handover_rollbacks_total{reason=\"ready_timeout\"} 0",
            "handover_generation 3",
            "handover_ready 1",
            "handover_draining_generations 1",
            "handover_crash_restarts_total 2",
            "handover_drains_killed_total 1",
            "handover_time_to_ready_seconds_count 1",
            "handover_drain_duration_seconds_bucket{le=\"0.025\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Every sample line belongs to a family declared just before.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} histogram")),
                "{l}"
            );
        }
    }
}
