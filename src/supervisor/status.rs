//! What `handover status` shows: a snapshot of the supervisor, rendered as
//! text or as JSON (hand-written; the shape is documented on
//! [`Snapshot::to_json`]).

use std::fmt::Write as _;
use std::time::Duration;

use super::cli::format_duration;

/// One generation, as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GenerationInfo {
    pub(crate) generation: u64,
    pub(crate) pid: i32,
    pub(crate) uptime: Duration,
    /// Time from start to ready, once ready.
    pub(crate) ready_after: Option<Duration>,
    /// Its last `STATUS=` notification.
    pub(crate) status: Option<String>,
    /// Time since it was told to stop.
    pub(crate) stopping_for: Option<Duration>,
    /// Time left before SIGKILL.
    pub(crate) kill_in: Option<Duration>,
}

/// The outcome of the last upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutcomeInfo {
    pub(crate) succeeded: bool,
    pub(crate) generation: u64,
    pub(crate) pid: Option<i32>,
    pub(crate) trigger: &'static str,
    pub(crate) ago: Duration,
    pub(crate) ready_after: Option<Duration>,
    pub(crate) detail: String,
}

/// Health checks of one generation and their results so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthInfo {
    /// The `--health` check.
    pub(crate) check: String,
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    /// Failures in a row now.
    pub(crate) in_a_row: u32,
    /// `healthy`, or the last failure.
    pub(crate) last: Option<String>,
}

/// A probation in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbationInfo {
    pub(crate) generation: u64,
    pub(crate) pid: i32,
    /// `parked` or `canary`.
    pub(crate) mode: &'static str,
    /// The generation kept beside it.
    pub(crate) old_generation: Option<u64>,
    pub(crate) old_pid: Option<i32>,
    /// Time since it was ready.
    pub(crate) elapsed: Duration,
    /// Time left in the window (0 while a healthy result is awaited).
    pub(crate) left: Duration,
    /// Its `--health` results, when there is a check.
    pub(crate) health: Option<HealthInfo>,
}

/// The last failed probation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RollbackInfo {
    pub(crate) generation: u64,
    pub(crate) pid: i32,
    pub(crate) ago: Duration,
    /// How long after ready it failed.
    pub(crate) after_ready: Duration,
    pub(crate) reason: String,
}

/// The whole state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) supervisor_pid: i32,
    pub(crate) uptime: Duration,
    /// `starting`, `serving`, `upgrading`, `probation`, `restarting`,
    /// `shutting-down`, `stopping`.
    pub(crate) state: &'static str,
    pub(crate) current: Option<GenerationInfo>,
    pub(crate) upgrading: Option<GenerationInfo>,
    pub(crate) upgrade_pending: bool,
    pub(crate) draining: Vec<GenerationInfo>,
    pub(crate) max_draining: usize,
    pub(crate) restarts: u64,
    pub(crate) upgrades_succeeded: u64,
    pub(crate) upgrades_failed: u64,
    pub(crate) last_upgrade: Option<OutcomeInfo>,
    /// `(name, address)`.
    pub(crate) listeners: Vec<(String, String)>,
    /// The probation in progress.
    pub(crate) probation: Option<ProbationInfo>,
    /// The liveness checks of the current generation (`--health`), when no
    /// probation runs.
    pub(crate) health: Option<HealthInfo>,
    /// `--watchdog`.
    pub(crate) watchdog: Option<Duration>,
    pub(crate) last_rollback: Option<RollbackInfo>,
    /// Every worker process, by worker index then generation (`--workers`;
    /// with one worker, its generations), including those being replaced.
    pub(crate) workers: Vec<WorkerInfo>,
    /// The rolling upgrade in progress (`--workers` above 1), in words.
    pub(crate) roll: Option<String>,
}

/// One worker process, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerInfo {
    /// Its index, `HANDOVER_WORKER`.
    pub(crate) worker: usize,
    pub(crate) generation: u64,
    pub(crate) pid: i32,
    /// The executable it was started from.
    pub(crate) release: Option<String>,
    /// `starting`, `probation`, `ready`, `draining` or `failed`.
    pub(crate) state: &'static str,
    pub(crate) ready: bool,
    /// Told to stop (replaced, failed or the supervisor stops).
    pub(crate) stopping: bool,
    pub(crate) uptime: Duration,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_opt_ms(out: &mut String, d: Option<Duration>) {
    match d {
        Some(d) => {
            let _ = write!(out, "{}", ms(d));
        }
        None => out.push_str("null"),
    }
}

fn json_generation(out: &mut String, g: &GenerationInfo) {
    let _ = write!(
        out,
        "{{\"generation\":{},\"pid\":{},\"uptime_ms\":{},\"ready\":{},\"ready_after_ms\":",
        g.generation,
        g.pid,
        ms(g.uptime),
        g.ready_after.is_some()
    );
    json_opt_ms(out, g.ready_after);
    out.push_str(",\"status\":");
    match &g.status {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
    out.push_str(",\"stopping_for_ms\":");
    json_opt_ms(out, g.stopping_for);
    out.push_str(",\"kill_in_ms\":");
    json_opt_ms(out, g.kill_in);
    out.push('}');
}

fn json_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

fn json_health(out: &mut String, h: Option<&HealthInfo>) {
    let Some(h) = h else {
        out.push_str("null");
        return;
    };
    out.push_str("{\"check\":");
    json_str(out, &h.check);
    let _ = write!(
        out,
        ",\"passed\":{},\"failed\":{},\"failures_in_a_row\":{},\"last\":",
        h.passed, h.failed, h.in_a_row
    );
    json_opt_str(out, h.last.as_deref());
    out.push('}');
}

fn json_opt_generation(out: &mut String, g: Option<&GenerationInfo>) {
    match g {
        Some(g) => json_generation(out, g),
        None => out.push_str("null"),
    }
}

impl Snapshot {
    /// One JSON object:
    ///
    /// ```text
    /// {"supervisor":{"pid":1,"uptime_ms":5000},"state":"serving",
    ///  "current":GEN|null,"upgrading":GEN|null,"upgrade_pending":false,
    ///  "draining":[GEN...],"max_draining":8,"restarts":0,
    ///  "upgrades":{"succeeded":2,"failed":1},
    ///  "last_upgrade":{"outcome":"succeeded"|"failed","generation":3,"pid":42|null,
    ///                  "trigger":"SIGHUP","ago_ms":100,"ready_after_ms":35|null,
    ///                  "detail":"..."}|null,
    ///  "listeners":[{"name":"http","address":"tcp://0.0.0.0:8080"}],
    ///  "probation":{"generation":4,"pid":43,"mode":"parked"|"canary",
    ///               "old_generation":3|null,"old_pid":42|null,"elapsed_ms":2000,
    ///               "left_ms":8000,"health":HEALTH|null}|null,
    ///  "health":HEALTH|null,"watchdog_ms":3000|null,
    ///  "last_rollback":{"generation":4,"pid":43,"ago_ms":100,"after_ready_ms":310,
    ///                   "reason":"..."}|null,
    ///  "workers":[{"worker":0,"generation":3,"pid":42,"release":"/app/server"|null,
    ///              "state":"starting"|"probation"|"ready"|"draining"|"failed",
    ///              "ready":true,"stopping":false,"uptime_ms":900}...],
    ///  "roll":"2 of 4 workers replaced, 1 starting, 1 to go"|null}
    /// ```
    ///
    /// `workers` lists every process of the app, those being replaced too
    /// (`"stopping":true` until they exit); with one worker, its
    /// generations.
    ///
    /// where HEALTH is `{"check":"http://127.0.0.1:8080/healthz","passed":5,
    /// "failed":0,"failures_in_a_row":0,"last":"healthy"|"..."|null}`:
    /// `probation.health` for the generation on probation, `health` for the
    /// current one (liveness) when no probation runs.
    ///
    /// where GEN is `{"generation":2,"pid":42,"uptime_ms":900,"ready":true,
    /// "ready_after_ms":35|null,"status":"..."|null,"stopping_for_ms":N|null,
    /// "kill_in_ms":N|null}`.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "{{\"supervisor\":{{\"pid\":{},\"uptime_ms\":{}}},\"state\":",
            self.supervisor_pid,
            ms(self.uptime)
        );
        json_str(&mut out, self.state);
        out.push_str(",\"current\":");
        json_opt_generation(&mut out, self.current.as_ref());
        out.push_str(",\"upgrading\":");
        json_opt_generation(&mut out, self.upgrading.as_ref());
        let _ = write!(
            out,
            ",\"upgrade_pending\":{},\"draining\":[",
            self.upgrade_pending
        );
        for (i, g) in self.draining.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_generation(&mut out, g);
        }
        let _ = write!(
            out,
            "],\"max_draining\":{},\"restarts\":{},\"upgrades\":{{\"succeeded\":{},\"failed\":{}}},\"last_upgrade\":",
            self.max_draining, self.restarts, self.upgrades_succeeded, self.upgrades_failed
        );
        match &self.last_upgrade {
            Some(o) => {
                out.push_str("{\"outcome\":");
                json_str(&mut out, if o.succeeded { "succeeded" } else { "failed" });
                let _ = write!(out, ",\"generation\":{},\"pid\":", o.generation);
                match o.pid {
                    Some(pid) => {
                        let _ = write!(out, "{pid}");
                    }
                    None => out.push_str("null"),
                }
                out.push_str(",\"trigger\":");
                json_str(&mut out, o.trigger);
                let _ = write!(out, ",\"ago_ms\":{},\"ready_after_ms\":", ms(o.ago));
                json_opt_ms(&mut out, o.ready_after);
                out.push_str(",\"detail\":");
                json_str(&mut out, &o.detail);
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"listeners\":[");
        for (i, (name, address)) in self.listeners.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"name\":");
            json_str(&mut out, name);
            out.push_str(",\"address\":");
            json_str(&mut out, address);
            out.push('}');
        }
        out.push_str("],\"probation\":");
        match &self.probation {
            Some(p) => {
                let _ = write!(
                    out,
                    "{{\"generation\":{},\"pid\":{},\"mode\":",
                    p.generation, p.pid
                );
                json_str(&mut out, p.mode);
                out.push_str(",\"old_generation\":");
                match p.old_generation {
                    Some(g) => {
                        let _ = write!(out, "{g}");
                    }
                    None => out.push_str("null"),
                }
                out.push_str(",\"old_pid\":");
                match p.old_pid {
                    Some(pid) => {
                        let _ = write!(out, "{pid}");
                    }
                    None => out.push_str("null"),
                }
                let _ = write!(
                    out,
                    ",\"elapsed_ms\":{},\"left_ms\":{},\"health\":",
                    ms(p.elapsed),
                    ms(p.left)
                );
                json_health(&mut out, p.health.as_ref());
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"health\":");
        json_health(&mut out, self.health.as_ref());
        out.push_str(",\"watchdog_ms\":");
        json_opt_ms(&mut out, self.watchdog);
        out.push_str(",\"last_rollback\":");
        match &self.last_rollback {
            Some(r) => {
                let _ = write!(
                    out,
                    "{{\"generation\":{},\"pid\":{},\"ago_ms\":{},\"after_ready_ms\":{},\"reason\":",
                    r.generation,
                    r.pid,
                    ms(r.ago),
                    ms(r.after_ready)
                );
                json_str(&mut out, &r.reason);
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"workers\":[");
        for (i, w) in self.workers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{{\"worker\":{},\"generation\":{},\"pid\":{},\"release\":",
                w.worker, w.generation, w.pid
            );
            json_opt_str(&mut out, w.release.as_deref());
            out.push_str(",\"state\":");
            json_str(&mut out, w.state);
            let _ = write!(
                out,
                ",\"ready\":{},\"stopping\":{},\"uptime_ms\":{}}}",
                w.ready,
                w.stopping,
                ms(w.uptime)
            );
        }
        out.push_str("],\"roll\":");
        json_opt_str(&mut out, self.roll.as_deref());
        out.push_str("}\n");
        out
    }

    /// Lines for humans.
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "supervisor: pid {}, up {}, {}",
            self.supervisor_pid,
            format_duration(round(self.uptime)),
            self.state
        );
        match &self.current {
            Some(g) => {
                let _ = write!(
                    out,
                    "current: generation {} pid {}, up {}",
                    g.generation,
                    g.pid,
                    format_duration(round(g.uptime))
                );
                match g.ready_after {
                    Some(r) => {
                        let _ = write!(out, ", ready after {}", format_duration(r));
                    }
                    None => out.push_str(", not ready yet"),
                }
                if let Some(s) = &g.status {
                    let _ = write!(out, ", status {s:?}");
                }
                out.push('\n');
            }
            None => out.push_str("current: none\n"),
        }
        if let Some(g) = &self.upgrading {
            let _ = writeln!(
                out,
                "upgrading: generation {} pid {}, started {} ago",
                g.generation,
                g.pid,
                format_duration(round(g.uptime))
            );
        }
        if self.upgrade_pending {
            out.push_str("upgrade pending: yes\n");
        }
        let _ = writeln!(
            out,
            "draining: {} (at most {})",
            self.draining.len(),
            self.max_draining
        );
        for g in &self.draining {
            let _ = write!(out, "  generation {} pid {}", g.generation, g.pid);
            if let Some(d) = g.stopping_for {
                let _ = write!(out, ", told to stop {} ago", format_duration(round(d)));
            }
            match g.kill_in {
                Some(k) => {
                    let _ = write!(out, ", SIGKILL in {}", format_duration(round(k)));
                }
                None => out.push_str(", killed"),
            }
            out.push('\n');
        }
        match &self.last_upgrade {
            Some(o) => {
                let _ = writeln!(
                    out,
                    "last upgrade: {} {} ago ({}): {}",
                    if o.succeeded { "succeeded" } else { "failed" },
                    format_duration(round(o.ago)),
                    o.trigger,
                    o.detail
                );
            }
            None => out.push_str("last upgrade: none\n"),
        }
        let _ = writeln!(
            out,
            "upgrades: {} succeeded, {} failed; restarts after a crash: {}",
            self.upgrades_succeeded, self.upgrades_failed, self.restarts
        );
        if let Some(p) = &self.probation {
            let _ = write!(
                out,
                "probation: generation {} pid {}, {}, {} since ready, {} left",
                p.generation,
                p.pid,
                p.mode,
                format_duration(round(p.elapsed)),
                format_duration(round(p.left))
            );
            if let (Some(g), Some(pid)) = (p.old_generation, p.old_pid) {
                let _ = write!(
                    out,
                    "; generation {g} pid {pid} {}",
                    if p.mode == "parked" {
                        "parked beside it"
                    } else {
                        "accepting beside it"
                    }
                );
            }
            out.push('\n');
            if let Some(h) = &p.health {
                text_health(&mut out, "probation health", h);
            }
        }
        if let Some(h) = &self.health {
            text_health(&mut out, "health", h);
        }
        if let Some(w) = self.watchdog {
            let _ = writeln!(
                out,
                "watchdog: WATCHDOG=1 at least every {}",
                format_duration(w)
            );
        }
        match &self.last_rollback {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "last rollback: generation {} pid {}, {} ago, {} after ready: {}",
                    r.generation,
                    r.pid,
                    format_duration(round(r.ago)),
                    format_duration(round(r.after_ready)),
                    r.reason
                );
            }
            None => out.push_str("last rollback: none\n"),
        }
        if let Some(roll) = &self.roll {
            let _ = writeln!(out, "roll: {roll}");
        }
        if self.workers.iter().any(|w| w.worker > 0) {
            let _ = writeln!(out, "workers:");
            for w in &self.workers {
                let _ = writeln!(
                    out,
                    "  worker {} pid {} generation {}, {}, up {}, release {}",
                    w.worker,
                    w.pid,
                    w.generation,
                    w.state,
                    format_duration(round(w.uptime)),
                    w.release.as_deref().unwrap_or("unknown")
                );
            }
        }
        for (name, address) in &self.listeners {
            let _ = writeln!(out, "listener: {name} {address}");
        }
        out
    }
}

fn text_health(out: &mut String, label: &str, h: &HealthInfo) {
    let _ = write!(
        out,
        "{label}: {}: {} passed, {} failed, {} in a row",
        h.check, h.passed, h.failed, h.in_a_row
    );
    if let Some(last) = &h.last {
        let _ = write!(out, ", last: {last}");
    }
    out.push('\n');
}

/// Rounds to whole milliseconds for display.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let g = |generation, pid| GenerationInfo {
            generation,
            pid,
            uptime: Duration::from_millis(1500),
            ready_after: Some(Duration::from_millis(35)),
            status: Some("serving \"ok\"\n".to_owned()),
            stopping_for: None,
            kill_in: None,
        };
        Snapshot {
            supervisor_pid: 1,
            uptime: Duration::from_secs(5),
            state: "serving",
            current: Some(g(3, 42)),
            upgrading: None,
            upgrade_pending: false,
            draining: vec![GenerationInfo {
                stopping_for: Some(Duration::from_secs(1)),
                kill_in: Some(Duration::from_secs(29)),
                ..g(2, 41)
            }],
            max_draining: 8,
            restarts: 1,
            upgrades_succeeded: 2,
            upgrades_failed: 1,
            last_upgrade: Some(OutcomeInfo {
                succeeded: true,
                generation: 3,
                pid: Some(42),
                trigger: "SIGHUP",
                ago: Duration::from_millis(100),
                ready_after: Some(Duration::from_millis(35)),
                detail: "generation 3 ready".to_owned(),
            }),
            listeners: vec![("http".to_owned(), "tcp://0.0.0.0:8080".to_owned())],
            probation: None,
            health: Some(HealthInfo {
                check: "http://127.0.0.1:8080/healthz".to_owned(),
                passed: 7,
                failed: 1,
                in_a_row: 0,
                last: Some("healthy".to_owned()),
            }),
            watchdog: None,
            last_rollback: Some(RollbackInfo {
                generation: 2,
                pid: 40,
                ago: Duration::from_secs(60),
                after_ready: Duration::from_millis(310),
                reason: "generation 2 (pid 40) exited with status 1".to_owned(),
            }),
            workers: Vec::new(),
            roll: None,
        }
    }

    #[test]
    fn workers_in_json_and_text() {
        let mut s = snapshot();
        s.state = "rolling";
        s.roll = Some("1 of 2 workers replaced, 1 starting, 0 to go".to_owned());
        let w = |worker, generation, pid, state, ready, stopping| WorkerInfo {
            worker,
            generation,
            pid,
            release: Some("/app/v2".to_owned()),
            state,
            ready,
            stopping,
            uptime: Duration::from_secs(3),
        };
        s.workers = vec![
            w(0, 3, 42, "draining", true, true),
            w(0, 5, 44, "ready", true, false),
            w(1, 4, 43, "ready", true, false),
            w(1, 6, 45, "starting", false, false),
        ];
        let json = s.to_json();
        assert!(
            json.ends_with(
                "\"workers\":[{\"worker\":0,\"generation\":3,\"pid\":42,\"release\":\"/app/v2\",\
                 \"state\":\"draining\",\"ready\":true,\"stopping\":true,\"uptime_ms\":3000},\
                 {\"worker\":0,\"generation\":5,\"pid\":44,\"release\":\"/app/v2\",\
                 \"state\":\"ready\",\"ready\":true,\"stopping\":false,\"uptime_ms\":3000},\
                 {\"worker\":1,\"generation\":4,\"pid\":43,\"release\":\"/app/v2\",\
                 \"state\":\"ready\",\"ready\":true,\"stopping\":false,\"uptime_ms\":3000},\
                 {\"worker\":1,\"generation\":6,\"pid\":45,\"release\":\"/app/v2\",\
                 \"state\":\"starting\",\"ready\":false,\"stopping\":false,\"uptime_ms\":3000}],\
                 \"roll\":\"1 of 2 workers replaced, 1 starting, 0 to go\"}\n"
            ),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let text = s.to_text();
        assert!(
            text.contains("roll: 1 of 2 workers replaced, 1 starting, 0 to go\nworkers:\n"),
            "{text}"
        );
        assert!(
            text.contains("  worker 1 pid 45 generation 6, starting, up 3s, release /app/v2\n"),
            "{text}"
        );
    }

    fn on_probation() -> Snapshot {
        let mut s = snapshot();
        s.state = "probation";
        s.probation = Some(ProbationInfo {
            generation: 4,
            pid: 43,
            mode: "parked",
            old_generation: Some(3),
            old_pid: Some(42),
            elapsed: Duration::from_secs(2),
            left: Duration::from_secs(8),
            health: Some(HealthInfo {
                check: "tcp://127.0.0.1:8080".to_owned(),
                passed: 2,
                failed: 1,
                in_a_row: 1,
                last: Some("cannot connect".to_owned()),
            }),
        });
        s.health = None;
        s.watchdog = Some(Duration::from_secs(3));
        s
    }

    #[test]
    fn probation_in_json_and_text() {
        let json = on_probation().to_json();
        assert!(
            json.contains(
                "\"probation\":{\"generation\":4,\"pid\":43,\"mode\":\"parked\",\
                 \"old_generation\":3,\"old_pid\":42,\"elapsed_ms\":2000,\"left_ms\":8000,\
                 \"health\":{\"check\":\"tcp://127.0.0.1:8080\",\"passed\":2,\"failed\":1,\
                 \"failures_in_a_row\":1,\"last\":\"cannot connect\"}},\"health\":null,\
                 \"watchdog_ms\":3000,"
            ),
            "{json}"
        );
        assert!(
            json.ends_with(
                "\"last_rollback\":{\"generation\":2,\"pid\":40,\"ago_ms\":60000,\
                 \"after_ready_ms\":310,\"reason\":\"generation 2 (pid 40) exited with status 1\"},\
                 \"workers\":[],\"roll\":null}\n"
            ),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let text = on_probation().to_text();
        assert!(
            text.contains(
                "probation: generation 4 pid 43, parked, 2s since ready, 8s left; generation 3 \
                 pid 42 parked beside it\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "probation health: tcp://127.0.0.1:8080: 2 passed, 1 failed, 1 in a row, last: \
                 cannot connect\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("watchdog: WATCHDOG=1 at least every 3s\n"),
            "{text}"
        );
    }

    #[test]
    fn json_shape() {
        let json = snapshot().to_json();
        assert!(
            json.starts_with(
                "{\"supervisor\":{\"pid\":1,\"uptime_ms\":5000},\"state\":\"serving\",\"current\":\
             {\"generation\":3,\"pid\":42,\"uptime_ms\":1500,\"ready\":true,\"ready_after_ms\":35,\
             \"status\":\"serving \\\"ok\\\"\\n\",\"stopping_for_ms\":null,\"kill_in_ms\":null}"
            ),
            "{json}"
        );
        assert!(
            json.contains("\"draining\":[{\"generation\":2,\"pid\":41,"),
            "{json}"
        );
        assert!(json.contains("\"kill_in_ms\":29000}]"), "{json}");
        assert!(
            json.contains("\"upgrades\":{\"succeeded\":2,\"failed\":1}"),
            "{json}"
        );
        assert!(json.contains("\"last_upgrade\":{\"outcome\":\"succeeded\",\"generation\":3,\"pid\":42,\"trigger\":\"SIGHUP\""), "{json}");
        assert!(
            json.contains(
                "\"listeners\":[{\"name\":\"http\",\"address\":\"tcp://0.0.0.0:8080\"}],\
                 \"probation\":null,\"health\":{\"check\":\"http://127.0.0.1:8080/healthz\",\
                 \"passed\":7,\"failed\":1,\"failures_in_a_row\":0,\"last\":\"healthy\"},\
                 \"watchdog_ms\":null,\"last_rollback\":{"
            ),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let mut empty = snapshot();
        empty.current = None;
        empty.draining.clear();
        empty.last_upgrade = None;
        empty.health = None;
        empty.last_rollback = None;
        let json = empty.to_json();
        assert!(
            json.contains("\"current\":null,\"upgrading\":null"),
            "{json}"
        );
        assert!(json.contains("\"draining\":[]"), "{json}");
        assert!(json.contains("\"last_upgrade\":null"), "{json}");
        assert!(
            json.ends_with(
                "\"health\":null,\"watchdog_ms\":null,\"last_rollback\":null,\"workers\":[],\
                 \"roll\":null}\n"
            ),
            "{json}"
        );
        let mut s = String::new();
        json_str(&mut s, "\u{1}");
        assert_eq!(s, "\"\\u0001\"");
    }

    #[test]
    fn text_lines() {
        let text = snapshot().to_text();
        assert!(text.contains("supervisor: pid 1, up 5s, serving"), "{text}");
        assert!(
            text.contains("current: generation 3 pid 42, up 1.50s, ready after 35ms"),
            "{text}"
        );
        assert!(text.contains("draining: 1 (at most 8)"), "{text}");
        assert!(
            text.contains("  generation 2 pid 41, told to stop 1s ago, SIGKILL in 29s"),
            "{text}"
        );
        assert!(
            text.contains("last upgrade: succeeded 100ms ago (SIGHUP): generation 3 ready"),
            "{text}"
        );
        assert!(
            text.contains(
                "health: http://127.0.0.1:8080/healthz: 7 passed, 1 failed, 0 in a row, last: \
                 healthy\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "last rollback: generation 2 pid 40, 1m ago, 310ms after ready: generation 2 \
                 (pid 40) exited with status 1\n"
            ),
            "{text}"
        );
    }
}
