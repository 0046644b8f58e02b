//! [`Metrics`]: what this generation has seen, as a snapshot an app can
//! export on its own `/metrics` (its `Display` is the Prometheus text format).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::handover::{lock, Handover};

/// A snapshot of this generation's lifecycle figures, from
/// [`Handover::metrics`]. Counts are this process's: every generation is a
/// process of its own, and starts from zero.
///
/// `format!("{metrics}")` renders the Prometheus text exposition format,
/// with the metric names `handover run --admin` uses:
///
/// ```
/// # fn f(handover: &handover::Handover) {
/// let text = handover.metrics().to_string();
/// assert!(text.contains("handover_generation "));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// This generation's number.
    pub generation: u64,
    /// This process's pid.
    pub pid: i32,
    /// When this generation started.
    pub started: SystemTime,
    /// Whether it said it is ready.
    pub ready: bool,
    /// Upgrades this generation started, by outcome: `succeeded`, or the
    /// kind of failure (`spawn`, `exited`, `ready_timeout`, `probation`,
    /// `refused`, `stopping`, `other`).
    pub upgrades: BTreeMap<&'static str, u64>,
    /// Rollbacks after ready (failed probations), by reason: `exited`,
    /// `unhealthy`, `health_check`.
    pub rollbacks: BTreeMap<&'static str, u64>,
    /// Time from trigger to ready of each successful upgrade: count and sum.
    pub ready_seconds: Summary,
    /// How long this generation's drain took, once it has drained.
    pub drain: Option<Duration>,
    /// Earlier generations still alive (draining).
    pub draining_generations: usize,
    /// In-flight work now (live guards of the `Watch`).
    pub in_flight: usize,
    /// Parked now (a new generation is on probation beside it).
    pub parked: bool,
    /// Connections `serve` accepted.
    pub connections_accepted: u64,
    /// Live connections the previous generation handed over, taken here
    /// (by `serve` or [`Handover::adopt`]).
    pub connections_adopted: u64,
    /// Live connections `serve` handed to the next generation.
    pub connections_handed_over: u64,
}

/// A count and a sum, as a Prometheus summary without quantiles.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

/// What the lifecycle counts as it goes.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    inner: Mutex<Counted>,
}

#[derive(Debug, Default)]
struct Counted {
    upgrades: BTreeMap<&'static str, u64>,
    rollbacks: BTreeMap<&'static str, u64>,
    ready: Summary,
    drain: Option<Duration>,
    accepted: u64,
    adopted: u64,
    handed_over: u64,
}

/// The outcome label of an upgrade's result.
fn outcome(result: &Result<crate::Upgraded, Error>) -> &'static str {
    match result {
        Ok(_) => "succeeded",
        Err(Error::Spawn { .. } | Error::NoExecutable { .. }) => "spawn",
        Err(Error::ChildExited { .. }) => "exited",
        Err(Error::ReadyTimeout { .. }) => "ready_timeout",
        Err(Error::ProbationFailed { .. }) => "probation",
        Err(
            Error::UpgradeInProgress
            | Error::TooManyDraining { .. }
            | Error::OnProbation
            | Error::Supervised,
        ) => "refused",
        Err(Error::Stopping) => "stopping",
        Err(_) => "other",
    }
}

impl Counters {
    pub(crate) fn upgrade(&self, result: &Result<crate::Upgraded, Error>) {
        let mut c = lock(&self.inner);
        *c.upgrades.entry(outcome(result)).or_default() += 1;
        if let Ok(up) = result {
            c.ready.count += 1;
            c.ready.sum += up.ready_after.as_secs_f64();
        }
    }

    pub(crate) fn rollback(&self, reason: &'static str) {
        *lock(&self.inner).rollbacks.entry(reason).or_default() += 1;
    }

    pub(crate) fn drained(&self, took: Duration) {
        lock(&self.inner).drain = Some(took);
    }

    pub(crate) fn accepted(&self) {
        lock(&self.inner).accepted += 1;
    }

    pub(crate) fn adopted(&self) {
        lock(&self.inner).adopted += 1;
    }

    pub(crate) fn handed_over(&self, n: usize) {
        lock(&self.inner).handed_over += n as u64;
    }

    /// Accepted, adopted, handed over.
    pub(crate) fn connections(&self) -> (u64, u64, u64) {
        let c = lock(&self.inner);
        (c.accepted, c.adopted, c.handed_over)
    }
}

impl Handover {
    /// A snapshot of this generation's figures, for the app's own
    /// `/metrics` (see [`Metrics`]).
    pub fn metrics(&self) -> Metrics {
        let inner = &self.inner;
        let counted = lock(&inner.counters.inner);
        let watch = self.watch();
        Metrics {
            generation: inner.generation,
            pid: std::process::id() as i32,
            started: inner.started_at,
            ready: inner.ready_done.load(std::sync::atomic::Ordering::SeqCst),
            upgrades: counted.upgrades.clone(),
            rollbacks: counted.rollbacks.clone(),
            ready_seconds: counted.ready,
            drain: counted.drain,
            draining_generations: self.draining_count(),
            in_flight: watch.in_flight(),
            parked: watch.is_parked(),
            connections_accepted: counted.accepted,
            connections_adopted: counted.adopted,
            connections_handed_over: counted.handed_over,
        }
    }
}

impl fmt::Display for Metrics {
    /// The Prometheus text exposition format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gauge = |f: &mut fmt::Formatter<'_>, name: &str, help: &str, value: f64| {
            writeln!(f, "# HELP {name} {help}")?;
            writeln!(f, "# TYPE {name} gauge")?;
            writeln!(f, "{name} {value}")
        };
        gauge(
            f,
            "handover_generation",
            "The serving generation's number.",
            self.generation as f64,
        )?;
        let started = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        gauge(
            f,
            "handover_generation_start_time_seconds",
            "When the generation started, in seconds since the epoch.",
            started,
        )?;
        gauge(
            f,
            "handover_ready",
            "1 once the generation said it is ready.",
            u8::from(self.ready).into(),
        )?;
        let counter = |f: &mut fmt::Formatter<'_>,
                       name: &str,
                       help: &str,
                       label: &str,
                       values: &BTreeMap<&'static str, u64>| {
            writeln!(f, "# HELP {name} {help}")?;
            writeln!(f, "# TYPE {name} counter")?;
            for (key, value) in values {
                writeln!(f, "{name}{{{label}=\"{key}\"}} {value}")?;
            }
            Ok(())
        };
        counter(
            f,
            "handover_upgrades_total",
            "Upgrades by outcome.",
            "outcome",
            &self.upgrades,
        )?;
        counter(
            f,
            "handover_rollbacks_total",
            "Rollbacks after ready (failed probations) by reason.",
            "reason",
            &self.rollbacks,
        )?;
        writeln!(f, "# HELP handover_time_to_ready_seconds Time from an upgrade's trigger to the new generation's ready.")?;
        writeln!(f, "# TYPE handover_time_to_ready_seconds summary")?;
        writeln!(
            f,
            "handover_time_to_ready_seconds_sum {}",
            self.ready_seconds.sum
        )?;
        writeln!(
            f,
            "handover_time_to_ready_seconds_count {}",
            self.ready_seconds.count
        )?;
        writeln!(
            f,
            "# HELP handover_drain_duration_seconds How long the drains took."
        )?;
        writeln!(f, "# TYPE handover_drain_duration_seconds summary")?;
        let (sum, count) = self.drain.map_or((0.0, 0), |d| (d.as_secs_f64(), 1));
        writeln!(f, "handover_drain_duration_seconds_sum {sum}")?;
        writeln!(f, "handover_drain_duration_seconds_count {count}")?;
        gauge(
            f,
            "handover_draining_generations",
            "Earlier generations still draining.",
            self.draining_generations as f64,
        )?;
        gauge(
            f,
            "handover_in_flight",
            "In-flight work of this generation.",
            self.in_flight as f64,
        )?;
        gauge(
            f,
            "handover_parked",
            "1 while parked beside a generation on probation.",
            u8::from(self.parked).into(),
        )?;
        for (name, help, value) in [
            (
                "handover_connections_accepted_total",
                "Connections serve accepted.",
                self.connections_accepted,
            ),
            (
                "handover_connections_adopted_total",
                "Live connections taken over from the previous generation.",
                self.connections_adopted,
            ),
            (
                "handover_connections_handed_over_total",
                "Live connections handed to the next generation.",
                self.connections_handed_over,
            ),
        ] {
            writeln!(f, "# HELP {name} {help}")?;
            writeln!(f, "# TYPE {name} counter")?;
            writeln!(f, "{name} {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_and_samples() {
        let counters = Counters::default();
        counters.upgrade(&Err(Error::Stopping));
        counters.upgrade(&Ok(crate::Upgraded {
            pid: 2,
            generation: 2,
            ready_after: Duration::from_millis(250),
            probation: Duration::ZERO,
        }));
        counters.rollback("unhealthy");
        let counted = lock(&counters.inner);
        let metrics = Metrics {
            generation: 3,
            pid: 9,
            started: UNIX_EPOCH + Duration::from_secs(100),
            ready: true,
            upgrades: counted.upgrades.clone(),
            rollbacks: counted.rollbacks.clone(),
            ready_seconds: counted.ready,
            drain: None,
            draining_generations: 1,
            in_flight: 4,
            parked: false,
            connections_accepted: 5,
            connections_adopted: 6,
            connections_handed_over: 7,
        };
        let text = metrics.to_string();
        for line in [
            "# TYPE handover_generation gauge",
            "handover_generation 3",
            "handover_generation_start_time_seconds 100",
            "handover_upgrades_total{outcome=\"stopping\"} 1",
            "handover_upgrades_total{outcome=\"succeeded\"} 1",
            "handover_rollbacks_total{reason=\"unhealthy\"} 1",
            "handover_time_to_ready_seconds_sum 0.25",
            "handover_time_to_ready_seconds_count 1",
            "handover_draining_generations 1",
            "handover_in_flight 4",
            "handover_connections_accepted_total 5",
            "handover_connections_adopted_total 6",
            "handover_connections_handed_over_total 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        // Every sample line belongs to a metric with a TYPE line.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
