//! Helpers of the `--admin` tests (`tests/admin.rs`, `tests/docker.rs`): a tiny blocking HTTP
//! client for the admin endpoints, and the Prometheus text parser of `prometheus_client`
//! (Python) as the judge of `/metrics`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `GET path` on a new connection: `(status, body)`, or why it failed. Blocking, std only,
/// so that a poll costs a connect and a few syscalls (the readiness flip is timed in ms).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The status of `GET path`, or 0 when the request failed.
pub fn status_of(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path, Duration::from_secs(2)).map_or(0, |(s, _)| s)
}

/// Parsed `/metrics`: every sample as `name{label="v",...}` (labels sorted) -> value, and every
/// family as `name` -> type, as `prometheus_client.parser.text_string_to_metric_families` sees
/// them. Panics with the parser's error when the text does not parse, or when Python or
/// `prometheus_client` is missing (.ci/run installs them).
pub struct Parsed {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
}

impl Parsed {
    /// The value of sample `key`; panics with every sample when it is missing.
    pub fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in {:#?}", self.samples))
    }
}

const PARSER: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    print("type", fam.name, fam.type)
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("sample", s.name + ("{" + labels + "}" if labels else ""), repr(float(s.value)))
"#;

pub fn parse_metrics(text: &str) -> Parsed {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 (with prometheus_client) is needed: {e}"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write to the parser");
    let out = child.wait_with_output().expect("the parser's output");
    assert!(
        out.status.success(),
        "prometheus_client did not parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parsed = Parsed {
        samples: BTreeMap::new(),
        types: BTreeMap::new(),
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("type"), Some(name), Some(kind)) => {
                parsed.types.insert(name.to_owned(), kind.to_owned());
            }
            (Some("sample"), Some(key), Some(value)) => {
                let v: f64 = value.parse().unwrap_or(f64::NAN);
                parsed.samples.insert(key.to_owned(), v);
            }
            _ => panic!("odd parser line {line:?}"),
        }
    }
    parsed
}
