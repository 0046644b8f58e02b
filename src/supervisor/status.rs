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

/// The whole state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) supervisor_pid: i32,
    pub(crate) uptime: Duration,
    /// `starting`, `serving`, `upgrading`, `restarting`, `shutting-down`, `stopping`.
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
    ///  "listeners":[{"name":"http","address":"tcp://0.0.0.0:8080"}]}
    /// ```
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
        out.push_str("]}\n");
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
        for (name, address) in &self.listeners {
            let _ = writeln!(out, "listener: {name} {address}");
        }
        out
    }
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
        }
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
            json.ends_with(
                "\"listeners\":[{\"name\":\"http\",\"address\":\"tcp://0.0.0.0:8080\"}]}\n"
            ),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let mut empty = snapshot();
        empty.current = None;
        empty.draining.clear();
        empty.last_upgrade = None;
        let json = empty.to_json();
        assert!(
            json.contains("\"current\":null,\"upgrading\":null"),
            "{json}"
        );
        assert!(json.contains("\"draining\":[]"), "{json}");
        assert!(json.contains("\"last_upgrade\":null"), "{json}");
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
    }
}
