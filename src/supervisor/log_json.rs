//! `HANDOVER_LOG_FORMAT=json`: the logger's lines as one JSON object each,
//! for log collectors (Fluent Bit, Vector, Loki, CloudWatch). The keys are
//! those of the text format: `timestamp`, `level`, `target`, `message`,
//! then the event's fields; numbers and booleans stay JSON numbers and
//! booleans, everything else is a string.
//!
//! ```text
//! {"timestamp":"2025-01-31T12:00:00.123Z","level":"INFO","target":"handover","message":"generation ready","generation":2,"pid":42,"ready_ms":35}
//! ```

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};

/// The environment variable that selects the format: `text` (default) or
/// `json`.
pub(crate) const LOG_FORMAT_ENV: &str = "HANDOVER_LOG_FORMAT";

/// Appends `s` as a JSON string.
pub(crate) fn json_str(out: &mut String, s: &str) {
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

/// Collects an event's message and fields as JSON members.
#[derive(Default)]
pub(crate) struct JsonFields {
    pub(crate) message: String,
    /// `,"name":value` for each field, in order.
    pub(crate) members: String,
}

impl JsonFields {
    fn key(&mut self, field: &Field) {
        self.members.push(',');
        json_str(&mut self.members, field.name());
        self.members.push(':');
    }

    fn raw(&mut self, field: &Field, value: impl fmt::Display) {
        self.key(field);
        let _ = write!(self.members, "{value}");
    }
}

impl Visit for JsonFields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, value);
        } else {
            self.record_str(field, &value.to_string());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.key(field);
            json_str(&mut self.members, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message.push_str(&text);
        } else {
            // `%x` fields arrive here as their Display; `?x` as Debug.
            self.key(field);
            json_str(&mut self.members, &text);
        }
    }
}

/// One JSON line: `timestamp` and `level` as the text format writes them
/// (the level without padding).
pub(crate) fn line(timestamp: &str, level: &str, fields: &JsonFields) -> String {
    let mut out = String::with_capacity(64 + fields.message.len() + fields.members.len());
    out.push_str("{\"timestamp\":");
    json_str(&mut out, timestamp);
    out.push_str(",\"level\":");
    json_str(&mut out, level.trim());
    out.push_str(",\"target\":\"handover\",\"message\":");
    json_str(&mut out, &fields.message);
    out.push_str(&fields.members);
    out.push_str("}\n");
    out
}
