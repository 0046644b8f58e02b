//! A minimal `tracing` subscriber for the `handover` binary: one line per
//! event on stderr, readable in `docker logs`:
//!
//! ```text
//! 2025-01-31T12:00:00.123Z  INFO handover: generation ready generation=2 pid=42 ready_ms=35
//! ```
//!
//! Spans are accepted and ignored: every lifecycle event carries its own
//! fields.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The environment variable that sets the log level
/// (`error`, `warn`, `info`, `debug`, `trace`, `off`).
pub(crate) const LOG_ENV: &str = "HANDOVER_LOG";

/// Writes one line per event to stderr.
#[derive(Debug)]
pub(crate) struct Logger {
    max: LevelFilter,
    next_span: AtomicU64,
    /// `HANDOVER_LOG_FORMAT=json`: one JSON object per line.
    json: bool,
}

impl Logger {
    /// A logger showing events up to `max`.
    pub(crate) fn new(max: LevelFilter) -> Self {
        Logger {
            max,
            next_span: AtomicU64::new(1),
            json: false,
        }
    }

    /// The same logger writing JSON lines (see `log_json`).
    pub(crate) fn json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// A logger at the level named by `HANDOVER_LOG`, `info` when unset or
    /// unknown.
    pub(crate) fn from_env() -> Self {
        let max = std::env::var(LOG_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::INFO);
        let json = std::env::var(super::log_json::LOG_FORMAT_ENV)
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("json"));
        Logger::new(max).json(json)
    }

    /// Formats one event line (without writing it).
    fn format(&self, event: &Event<'_>, now: SystemTime) -> String {
        let mut line = String::with_capacity(160);
        write_timestamp(&mut line, now);
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => " WARN",
            Level::INFO => " INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        if self.json {
            let mut fields = super::log_json::JsonFields::default();
            event.record(&mut fields);
            return super::log_json::line(&line, level, &fields);
        }
        let _ = write!(line, " {level} handover:");
        let mut visitor = Fields {
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut visitor);
        if !visitor.message.is_empty() {
            line.push(' ');
            line.push_str(&visitor.message);
        }
        line.push_str(&visitor.fields);
        // One event, one line, whatever the message holds.
        let mut line = line.replace('\n', "\\n");
        line.push('\n');
        line
    }
}

struct Fields {
    message: String,
    fields: String,
}

/// Whether a value must be quoted to stay one token.
fn needs_quotes(value: &str) -> bool {
    value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == '"' || c == '=')
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if needs_quotes(value) {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let text = format!("{value:?}");
            if needs_quotes(&text) && !text.starts_with('"') {
                let _ = write!(self.fields, " {}={text:?}", field.name());
            } else {
                let _ = write!(self.fields, " {}={text}", field.name());
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC.
fn write_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

impl Subscriber for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let line = self.format(event, SystemTime::now());
        // A log line that cannot be written is dropped: nothing better to do.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures formatted lines instead of writing them.
    struct Capture(Logger, Arc<Mutex<Vec<String>>>);

    impl Subscriber for Capture {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            self.0.enabled(m)
        }
        fn new_span(&self, s: &Attributes<'_>) -> Id {
            self.0.new_span(s)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
            self.1.lock().unwrap().push(self.0.format(e, t));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn one_line_per_event_with_fields() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let capture = Capture(Logger::new(LevelFilter::INFO), lines.clone());
        tracing::subscriber::with_default(capture, || {
            tracing::info!(
                generation = 2,
                pid = 42,
                reason = "exited with status 3",
                "generation ready"
            );
            tracing::warn!(error = %"two\nlines", "odd");
            tracing::debug!("hidden");
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            "2023-11-14T22:13:20.123Z  INFO handover: generation ready generation=2 pid=42 \
             reason=\"exited with status 3\"\n"
        );
        assert!(lines[1].starts_with("2023-11-14T22:13:20.123Z  WARN handover: odd error="));
        assert_eq!(lines[1].matches('\n').count(), 1, "{}", lines[1]);
    }

    #[test]
    fn json_lines_carry_the_same_fields() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let capture = Capture(Logger::new(LevelFilter::INFO).json(true), lines.clone());
        tracing::subscriber::with_default(capture, || {
            tracing::info!(
                generation = 2,
                pid = -1,
                pid1 = true,
                reason = "exited with \"status\" 3",
                command = %"a\nb",
                "generation ready"
            );
            tracing::warn!(error = ?"x", "odd");
        });
        let lines = lines.lock().unwrap();
        assert_eq!(
            lines[0],
            "{\"timestamp\":\"2023-11-14T22:13:20.123Z\",\"level\":\"INFO\",\"target\":\"handover\",\
             \"message\":\"generation ready\",\"generation\":2,\"pid\":-1,\"pid1\":true,\
             \"reason\":\"exited with \\\"status\\\" 3\",\"command\":\"a\\nb\"}\n"
        );
        assert_eq!(
            lines[1],
            "{\"timestamp\":\"2023-11-14T22:13:20.123Z\",\"level\":\"WARN\",\"target\":\"handover\",\
             \"message\":\"odd\",\"error\":\"\\\"x\\\"\"}\n"
        );
    }

    #[test]
    fn timestamps() {
        let mut s = String::new();
        write_timestamp(&mut s, UNIX_EPOCH);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2024-02-29T23:59:59.999Z, a leap day.
        write_timestamp(
            &mut s,
            UNIX_EPOCH + std::time::Duration::from_millis(1_709_251_199_999),
        );
        assert_eq!(s, "2024-02-29T23:59:59.999Z");
    }
}
