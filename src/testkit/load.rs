//! A hand-written HTTP/1.1 load client that classifies every failure exactly and never retries.
//!
//! ```no_run
//! use std::time::Duration;
//! use handover::testkit::{Load, LoadConfig, Mode};
//!
//! # fn main() -> Result<(), handover::testkit::Error> {
//! let addr = "127.0.0.1:8080".parse().expect("literal address");
//! let load = Load::start(LoadConfig::new(addr, Mode::KeepAlive { connections: 8 }));
//! load.wait_for_ok(100, Duration::from_secs(5))?; // load is flowing
//! // ... upgrade the server ...
//! let report = load.stop();
//! assert_eq!(report.failures.total(), 0, "{report}");
//! # Ok(())
//! # }
//! ```
//!
//! Each request is counted once: as `ok` (2xx with a complete response) or as exactly one
//! failure class. A keep-alive connection is reused until the server answers with
//! `Connection: close` (or a close-delimited body), or is found closed by the server while
//! idle, before the next request is written: neither of those is a failure. A request written
//! on a connection that the server then closes without answering is a failure
//! (`eof_before_response` or `reset`): that is the keep-alive close race servers must avoid.
//!
//! Every request loop is bounded: by [`LoadConfig::max_duration`] (default 60 s), optionally by
//! [`LoadConfig::max_requests`], and each request by [`LoadConfig::request_timeout`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant as TokioInstant};

use super::wait::{poll_until, Poll};
use super::Error;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 16 << 20;
/// Failure messages kept per class.
const SAMPLES_PER_CLASS: usize = 5;

/// How the load uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// `connections` persistent connections, each sending requests back-to-back.
    KeepAlive {
        /// Number of concurrent connections.
        connections: usize,
    },
    /// `concurrency` workers, each opening a new connection per request (`Connection: close`).
    PerRequest {
        /// Number of concurrent workers.
        concurrency: usize,
    },
}

impl Mode {
    /// Number of concurrent workers (connections or request loops).
    pub fn workers(&self) -> usize {
        match *self {
            Mode::KeepAlive { connections } => connections,
            Mode::PerRequest { concurrency } => concurrency,
        }
    }

    /// `keep-alive` or `per-request`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::KeepAlive { .. } => "keep-alive",
            Mode::PerRequest { .. } => "per-request",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} x{}", self.name(), self.workers())
    }
}

/// What a load does and when it stops. Built with [`LoadConfig::new`] and by-value setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LoadConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// Connection use.
    pub mode: Mode,
    /// Request target. Default `/`.
    pub path: String,
    /// Budget of one request: connect (when a connection is opened for it), write, and the
    /// whole response. Default 5 s.
    pub request_timeout: Duration,
    /// Hard bound: no request starts after this much time. Default 60 s.
    pub max_duration: Duration,
    /// Hard bound: at most this many requests in total. Default: none.
    pub max_requests: Option<u64>,
    /// Pause of a worker after a failed request, so a dead server does not make a hot loop.
    /// Default 10 ms.
    pub pause_after_failure: Duration,
    /// No request starts once this is set. [`Load::stop`] sets it; it can be shared.
    pub stop: Arc<AtomicBool>,
    /// Threads of the load's tokio runtime. Default 2. With 1, the whole load runs on one
    /// thread (plus an idle one that collects the workers), which is what a benchmark that
    /// pins the client to one core wants.
    pub threads: usize,
}

impl LoadConfig {
    /// A load on `addr` with the defaults documented on each field.
    pub fn new(addr: SocketAddr, mode: Mode) -> LoadConfig {
        LoadConfig {
            addr,
            mode,
            path: "/".to_string(),
            request_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(60),
            max_requests: None,
            pause_after_failure: Duration::from_millis(10),
            stop: Arc::new(AtomicBool::new(false)),
            threads: 2,
        }
    }

    /// Sets the request target (`/slow?ms=100`).
    pub fn path(mut self, path: impl Into<String>) -> LoadConfig {
        self.path = path.into();
        self
    }

    /// Sets the per-request budget.
    pub fn request_timeout(mut self, timeout: Duration) -> LoadConfig {
        self.request_timeout = timeout;
        self
    }

    /// Sets the time bound.
    pub fn max_duration(mut self, bound: Duration) -> LoadConfig {
        self.max_duration = bound;
        self
    }

    /// Sets the request-count bound.
    pub fn max_requests(mut self, bound: u64) -> LoadConfig {
        self.max_requests = Some(bound);
        self
    }

    /// Sets the pause after a failed request.
    pub fn pause_after_failure(mut self, pause: Duration) -> LoadConfig {
        self.pause_after_failure = pause;
        self
    }

    /// Uses `flag` as the stop flag (to stop several loads at once).
    pub fn stop_flag(mut self, flag: Arc<AtomicBool>) -> LoadConfig {
        self.stop = flag;
        self
    }

    /// Sets the number of runtime threads (at least 1).
    pub fn threads(mut self, threads: usize) -> LoadConfig {
        self.threads = threads.max(1);
        self
    }
}

/// The class of a failed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureClass {
    /// `connect` got ECONNREFUSED.
    Refused,
    /// ECONNRESET, EPIPE or ECONNABORTED on connect, write or read.
    Reset,
    /// The connection was closed (FIN) before a complete response.
    EofBeforeResponse,
    /// The request budget ran out (connect, write or read).
    Timeout,
    /// A complete response with a non-2xx status.
    BadStatus,
    /// Anything else: malformed response, unexpected bytes, other errno.
    Other,
}

impl FailureClass {
    /// Every class, in report order.
    pub const ALL: [FailureClass; 6] = [
        FailureClass::Refused,
        FailureClass::Reset,
        FailureClass::EofBeforeResponse,
        FailureClass::Timeout,
        FailureClass::BadStatus,
        FailureClass::Other,
    ];

    /// The name used in reports (`eof_before_response`).
    pub fn name(&self) -> &'static str {
        match self {
            FailureClass::Refused => "refused",
            FailureClass::Reset => "reset",
            FailureClass::EofBeforeResponse => "eof_before_response",
            FailureClass::Timeout => "timeout",
            FailureClass::BadStatus => "bad_status",
            FailureClass::Other => "other",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Its class.
    pub class: FailureClass,
    /// What happened, for humans.
    pub message: String,
}

impl Failure {
    fn new(class: FailureClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            message: message.into(),
        }
    }

    fn io(e: &io::Error, what: &str) -> Failure {
        let class = match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureClass::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => FailureClass::Reset,
            io::ErrorKind::TimedOut => FailureClass::Timeout,
            io::ErrorKind::UnexpectedEof => FailureClass::EofBeforeResponse,
            _ => FailureClass::Other,
        };
        Failure::new(class, format!("{what}: {e}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.class, self.message)
    }
}

impl std::error::Error for Failure {}

/// Failure counts by class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failures {
    /// See [`FailureClass::Refused`].
    pub refused: u64,
    /// See [`FailureClass::Reset`].
    pub reset: u64,
    /// See [`FailureClass::EofBeforeResponse`].
    pub eof_before_response: u64,
    /// See [`FailureClass::Timeout`].
    pub timeout: u64,
    /// See [`FailureClass::BadStatus`].
    pub bad_status: u64,
    /// See [`FailureClass::Other`].
    pub other: u64,
}

impl Failures {
    /// Sum over all classes.
    pub fn total(&self) -> u64 {
        FailureClass::ALL.iter().map(|c| self.get(*c)).sum()
    }

    /// The count of `class`.
    pub fn get(&self, class: FailureClass) -> u64 {
        match class {
            FailureClass::Refused => self.refused,
            FailureClass::Reset => self.reset,
            FailureClass::EofBeforeResponse => self.eof_before_response,
            FailureClass::Timeout => self.timeout,
            FailureClass::BadStatus => self.bad_status,
            FailureClass::Other => self.other,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Failures) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.eof_before_response += other.eof_before_response;
        self.timeout += other.timeout;
        self.bad_status += other.bad_status;
        self.other += other.other;
    }

    fn bump(&mut self, class: FailureClass) {
        let slot = match class {
            FailureClass::Refused => &mut self.refused,
            FailureClass::Reset => &mut self.reset,
            FailureClass::EofBeforeResponse => &mut self.eof_before_response,
            FailureClass::Timeout => &mut self.timeout,
            FailureClass::BadStatus => &mut self.bad_status,
            FailureClass::Other => &mut self.other,
        };
        *slot += 1;
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, class) in FailureClass::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{class} {}", self.get(*class))?;
        }
        Ok(())
    }
}

/// Why a load stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The stop flag was set.
    Flag,
    /// `max_duration` passed.
    Duration,
    /// `max_requests` were started.
    Count,
}

/// What a load saw.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Report {
    /// Requests answered 2xx with a complete response.
    pub ok: u64,
    /// Failed requests by class.
    pub failures: Failures,
    /// The first few failure messages of each class, each with the time since the start, the
    /// worker, the request number and whether the connection was fresh or reused.
    pub samples: BTreeMap<FailureClass, Vec<String>>,
    /// Body (trimmed) of each 2xx response -> count: which pids and generations served.
    pub bodies: BTreeMap<String, u64>,
    /// Status of each complete response -> count.
    pub statuses: BTreeMap<u16, u64>,
    /// Latency of each 2xx response, in completion order.
    pub latencies: Vec<Duration>,
    /// TCP connections established.
    pub connections: u64,
    /// Responses after which the server closed the connection (`Connection: close`, HTTP/1.0,
    /// close-delimited body).
    pub server_closes: u64,
    /// Of those, responses carrying an explicit `Connection: close` header.
    pub connection_close_headers: u64,
    /// Keep-alive connections found closed (or reset) by the server while idle, before the
    /// next request was written; not failures.
    pub idle_closes: u64,
    /// Time from start to the end of the last request.
    pub elapsed: Duration,
    /// Why the load stopped (`None` while running).
    pub stopped_by: Option<StopReason>,
}

impl Report {
    /// Total failed requests.
    pub fn failure_total(&self) -> u64 {
        self.failures.total()
    }

    /// Total requests (ok and failed).
    pub fn requests(&self) -> u64 {
        self.ok + self.failures.total()
    }

    /// The `q`-quantile (0.0..=1.0) of the latencies of successful responses.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
        Some(sorted[rank])
    }

    /// Median latency.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(0.50)
    }

    /// 99th percentile latency.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(0.99)
    }

    /// Largest latency.
    pub fn max_latency(&self) -> Option<Duration> {
        self.latencies.iter().max().copied()
    }

    /// Number of 2xx responses whose body satisfies `pred`.
    pub fn ok_matching(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.bodies
            .iter()
            .filter(|(body, _)| pred(body))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Panics with the whole report if any request failed: an assertion for tests.
    ///
    /// # Panics
    /// If any request failed.
    pub fn assert_no_failures(&self) {
        assert!(
            self.failures.total() == 0,
            "load had {} failed requests:\n{self}",
            self.failures.total()
        );
    }

    fn record_failure(&mut self, failure: &Failure, context: &str) {
        self.failures.bump(failure.class);
        let samples = self.samples.entry(failure.class).or_default();
        if samples.len() < SAMPLES_PER_CLASS {
            samples.push(format!("{context}: {}", failure.message));
        }
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_string(),
        |d| format!("{:.2}ms", d.as_secs_f64() * 1e3),
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "load report: {} ok, {} failed in {:.2?} (stopped by {:?})",
            self.ok,
            self.failures.total(),
            self.elapsed,
            self.stopped_by
        )?;
        writeln!(f, "  failures: {}", self.failures)?;
        writeln!(
            f,
            "  connections {}, server closes {} ({} with Connection: close), idle closes {}",
            self.connections, self.server_closes, self.connection_close_headers, self.idle_closes
        )?;
        writeln!(
            f,
            "  latency: p50 {} p99 {} max {}",
            ms(self.p50()),
            ms(self.p99()),
            ms(self.max_latency())
        )?;
        writeln!(f, "  statuses: {:?}", self.statuses)?;
        let mut bodies: Vec<_> = self.bodies.iter().collect();
        bodies.sort_by(|a, b| b.1.cmp(a.1));
        write!(f, "  bodies ({} distinct):", bodies.len())?;
        for (body, n) in bodies.iter().take(12) {
            write!(f, " {body:?} x{n};")?;
        }
        writeln!(f)?;
        for (class, samples) in &self.samples {
            for s in samples {
                writeln!(f, "  [{class}] {s}")?;
            }
        }
        Ok(())
    }
}

/// A complete HTTP/1.x response.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Response {
    /// Minor version: `HTTP/1.<version>`.
    pub version: u8,
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Body, de-chunked.
    pub body: Vec<u8>,
    /// An explicit `Connection: close` header.
    pub connection_close: bool,
    /// The server closes the connection after this response: `Connection: close`, HTTP/1.0
    /// without keep-alive, or a close-delimited body.
    pub close: bool,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Body as text (lossy).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Now plus `timeout`, or a year from now if that overflows (`Duration::MAX` means "no limit").
fn deadline_after(timeout: Duration) -> TokioInstant {
    let now = TokioInstant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

fn request_bytes(addr: SocketAddr, path: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: handover-test-load\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

async fn connect(addr: SocketAddr, deadline: TokioInstant) -> Result<TcpStream, Failure> {
    match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => Err(Failure::new(
            FailureClass::Timeout,
            format!("connecting to {addr}: timed out"),
        )),
        Ok(Err(e)) => Err(Failure::io(&e, &format!("connecting to {addr}"))),
        Ok(Ok(stream)) => {
            // Latency matters more than packet count here; failing to set it is harmless.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// Writes `request` and reads one complete response, within `deadline`.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    deadline: TokioInstant,
) -> Result<Response, Failure> {
    match timeout_at(deadline, stream.write_all(request)).await {
        Err(_) => {
            return Err(Failure::new(
                FailureClass::Timeout,
                "writing the request: timed out",
            ))
        }
        Ok(Err(e)) => return Err(Failure::io(&e, "writing the request")),
        Ok(Ok(())) => {}
    }
    read_response(stream, deadline).await
}

/// Reads one response from `stream`. Bytes after the response are an error (nothing was
/// pipelined, so nothing may follow).
pub async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: TokioInstant,
) -> Result<Response, Failure> {
    let mut wire = Wire {
        stream,
        buf: Vec::with_capacity(4096),
        pos: 0,
        received: 0,
        deadline,
    };
    let response = wire.response().await?;
    if wire.buf.len() > wire.pos {
        return Err(Failure::new(
            FailureClass::Other,
            format!(
                "{} unexpected bytes after a complete response: {:?}",
                wire.buf.len() - wire.pos,
                String::from_utf8_lossy(&wire.buf[wire.pos..wire.buf.len().min(wire.pos + 80)])
            ),
        ));
    }
    Ok(response)
}

/// A read buffer over a stream, with the request deadline.
struct Wire<'a, S> {
    stream: &'a mut S,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes.
    pos: usize,
    /// Bytes received so far for this response.
    received: usize,
    deadline: TokioInstant,
}

impl<S: AsyncRead + Unpin> Wire<'_, S> {
    /// Reads more bytes; `Ok(0)` at EOF.
    async fn read_more(&mut self, what: &str) -> Result<usize, Failure> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 8192];
        match timeout_at(self.deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Err(Failure::new(
                FailureClass::Timeout,
                format!(
                    "{what}: timed out ({} bytes of response received)",
                    self.received
                ),
            )),
            Ok(Err(e)) => Err(Failure::io(
                &e,
                &format!("{what} ({} bytes of response received)", self.received),
            )),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.received += n;
                Ok(n)
            }
        }
    }

    fn eof(&self, what: &str) -> Failure {
        let msg = if self.received == 0 {
            format!("{what}: connection closed before any response byte")
        } else {
            format!(
                "{what}: connection closed after {} bytes, before a complete response",
                self.received
            )
        };
        Failure::new(FailureClass::EofBeforeResponse, msg)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Makes at least `n` unconsumed bytes available.
    async fn need(&mut self, n: usize, what: &str) -> Result<(), Failure> {
        while self.available().len() < n {
            if self.read_more(what).await? == 0 {
                return Err(self.eof(what));
            }
        }
        Ok(())
    }

    /// Consumes bytes up to and including the first `delim`, returning the bytes before it.
    async fn until(&mut self, delim: &[u8], limit: usize, what: &str) -> Result<Vec<u8>, Failure> {
        let mut searched: usize = 0;
        loop {
            let avail = self.available();
            let from = searched.saturating_sub(delim.len());
            if let Some(i) = find(&avail[from..], delim) {
                let end = from + i;
                let bytes = avail[..end].to_vec();
                self.pos += end + delim.len();
                return Ok(bytes);
            }
            searched = avail.len();
            if searched > limit {
                return Err(Failure::new(
                    FailureClass::Other,
                    format!("{what}: more than {limit} bytes without {delim:?}"),
                ));
            }
            if self.read_more(what).await? == 0 {
                return Err(self.eof(what));
            }
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        bytes
    }

    async fn response(&mut self) -> Result<Response, Failure> {
        let malformed = |msg: String| Failure::new(FailureClass::Other, msg);
        loop {
            let head = self
                .until(b"\r\n\r\n", MAX_HEAD, "reading the response head")
                .await?;
            let head = String::from_utf8_lossy(&head).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let mut parts = status_line.splitn(3, ' ');
            let version = match parts.next() {
                Some("HTTP/1.1") => 1,
                Some("HTTP/1.0") => 0,
                _ => return Err(malformed(format!("bad status line {status_line:?}"))),
            };
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .filter(|s| (100..1000).contains(s))
                .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
            let mut headers = Vec::new();
            for line in lines {
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| malformed(format!("bad header line {line:?}")))?;
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            if (100..200).contains(&status) && status != 101 {
                continue; // interim response: the real one follows
            }

            let tokens = |name: &str| -> Vec<String> {
                headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .flat_map(|(_, v)| v.split(','))
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty())
                    .collect()
            };
            let connection = tokens("connection");
            let connection_close = connection.iter().any(|t| t == "close");
            let keep_alive = connection.iter().any(|t| t == "keep-alive");
            let mut close = connection_close || (version == 0 && !keep_alive);
            let chunked = tokens("transfer-encoding").last().map(String::as_str) == Some("chunked");
            let lengths = tokens("content-length");

            let body = if status == 204 || status == 304 || (100..200).contains(&status) {
                Vec::new()
            } else if chunked {
                self.chunked_body().await?
            } else if let Some(first) = lengths.first() {
                if lengths.iter().any(|l| l != first) {
                    return Err(malformed(format!("conflicting Content-Length {lengths:?}")));
                }
                let len: usize = first
                    .parse()
                    .map_err(|_| malformed(format!("bad Content-Length {first:?}")))?;
                if len > MAX_BODY {
                    return Err(malformed(format!("Content-Length {len} too large")));
                }
                self.need(len, "reading the response body").await?;
                self.take(len).to_vec()
            } else {
                close = true;
                self.close_delimited_body().await?
            };
            return Ok(Response {
                version,
                status,
                headers,
                body,
                connection_close,
                close,
            });
        }
    }

    async fn chunked_body(&mut self) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let line = self.until(b"\r\n", 1024, "reading a chunk size").await?;
            let line = String::from_utf8_lossy(&line);
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| {
                Failure::new(FailureClass::Other, format!("bad chunk size {line:?}"))
            })?;
            if size == 0 {
                // Trailers, up to an empty line.
                while !self
                    .until(b"\r\n", MAX_HEAD, "reading the chunked trailer")
                    .await?
                    .is_empty()
                {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(Failure::new(FailureClass::Other, "chunked body too large"));
            }
            self.need(size + 2, "reading a chunk").await?;
            body.extend_from_slice(self.take(size));
            if self.take(2) != b"\r\n" {
                return Err(Failure::new(
                    FailureClass::Other,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }

    async fn close_delimited_body(&mut self) -> Result<Vec<u8>, Failure> {
        while self.read_more("reading a close-delimited body").await? > 0 {
            if self.available().len() > MAX_BODY {
                return Err(Failure::new(FailureClass::Other, "body too large"));
            }
        }
        let n = self.available().len();
        Ok(self.take(n).to_vec())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// State of an idle keep-alive connection, seen without consuming anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleState {
    /// Nothing to read, no FIN: usable.
    Open,
    /// The server sent FIN.
    Closed,
    /// The server reset it (or another socket error is pending).
    Reset(String),
    /// The server sent bytes nobody asked for.
    Unsolicited(usize),
}

/// Peeks at `stream` (non-blocking `recv(MSG_PEEK)`, straight to the kernel) to tell whether
/// the server closed it.
pub fn idle_state(stream: &TcpStream) -> IdleState {
    let mut byte = [0u8; 1];
    match recv(
        stream.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => IdleState::Closed,
        Ok(_) => {
            let mut buf = [0u8; 4096];
            let n = recv(
                stream.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .unwrap_or(1);
            IdleState::Unsolicited(n)
        }
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => IdleState::Open,
        Err(e) => IdleState::Reset(e.to_string()),
    }
}

/// One client connection, for tests that need control over which connection a request uses.
pub struct Conn {
    addr: SocketAddr,
    stream: TcpStream,
}

impl Conn {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Failure> {
        let stream = connect(addr, deadline_after(timeout)).await?;
        Ok(Conn { addr, stream })
    }

    /// Sends `GET path` (with `Connection: close` if `close`) and reads the whole response
    /// within `timeout`. A non-2xx response is returned as `Ok`.
    pub async fn request(
        &mut self,
        path: &str,
        close: bool,
        timeout: Duration,
    ) -> Result<Response, Failure> {
        let req = request_bytes(self.addr, path, close);
        exchange(&mut self.stream, &req, deadline_after(timeout)).await
    }

    /// Whether the server closed this connection while it was idle.
    pub fn idle_state(&self) -> IdleState {
        idle_state(&self.stream)
    }

    /// The socket, e.g. to write a partial request by hand.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A [`Conn`] usable from synchronous tests (it owns a small runtime, so it cannot be used
/// from inside an async test: use [`Conn`] there).
pub struct BlockingConn {
    rt: tokio::runtime::Runtime,
    conn: Conn,
}

impl BlockingConn {
    /// Connects to `addr` within `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<BlockingConn, Failure> {
        let rt = small_runtime()?;
        let conn = rt.block_on(Conn::connect(addr, timeout))?;
        Ok(BlockingConn { rt, conn })
    }

    /// See [`Conn::request`].
    pub fn request(
        &mut self,
        path: &str,
        close: bool,
        timeout: Duration,
    ) -> Result<Response, Failure> {
        self.rt.block_on(self.conn.request(path, close, timeout))
    }

    /// See [`Conn::idle_state`].
    pub fn idle_state(&self) -> IdleState {
        self.conn.idle_state()
    }
}

fn small_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(FailureClass::Other, format!("no tokio runtime: {e}")))
}

/// One `GET path` on a new connection with `Connection: close`, blocking, within `timeout`
/// (connect included). A non-2xx response is returned as `Ok`. Not from inside an async test
/// (it runs its own runtime): use [`get_async`] there.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Failure> {
    small_runtime()?.block_on(get_async(addr, path, timeout))
}

/// Async [`get`].
pub async fn get_async(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, Failure> {
    let deadline = deadline_after(timeout);
    let mut stream = connect(addr, deadline).await?;
    exchange(&mut stream, &request_bytes(addr, path, true), deadline).await
}

/// State shared by the load's workers and its handle.
struct Ctx {
    cfg: LoadConfig,
    start: Instant,
    started_requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    finished: AtomicBool,
    report: Mutex<Report>,
    request_keepalive: Vec<u8>,
    request_close: Vec<u8>,
}

impl Ctx {
    fn report(&self) -> MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the next request, or says why the load stops.
    fn next_request(&self) -> Result<u64, StopReason> {
        let reason = if self.cfg.stop.load(Ordering::SeqCst) {
            Some(StopReason::Flag)
        } else if self.start.elapsed() >= self.cfg.max_duration {
            Some(StopReason::Duration)
        } else {
            None
        };
        let seq = self.started_requests.fetch_add(1, Ordering::SeqCst);
        let reason = reason.or_else(|| {
            self.cfg
                .max_requests
                .filter(|max| seq >= *max)
                .map(|_| StopReason::Count)
        });
        match reason {
            Some(reason) => {
                self.report().stopped_by.get_or_insert(reason);
                Err(reason)
            }
            None => Ok(seq),
        }
    }

    fn context(&self, worker: usize, seq: u64, fresh: bool) -> String {
        format!(
            "+{:.1}ms worker {worker} request {seq} on a {} connection",
            self.start.elapsed().as_secs_f64() * 1e3,
            if fresh { "new" } else { "reused" }
        )
    }

    fn record_response(
        &self,
        resp: &Response,
        latency: Duration,
        worker: usize,
        seq: u64,
        fresh: bool,
    ) {
        let mut report = self.report();
        *report.statuses.entry(resp.status).or_default() += 1;
        if resp.close {
            report.server_closes += 1;
        }
        if resp.connection_close {
            report.connection_close_headers += 1;
        }
        if resp.is_success() {
            report.ok += 1;
            *report
                .bodies
                .entry(resp.body_str().trim().to_string())
                .or_default() += 1;
            report.latencies.push(latency);
            self.ok.fetch_add(1, Ordering::SeqCst);
        } else {
            let body = resp.body_str();
            let body: String = body.chars().take(200).collect();
            let failure = Failure::new(
                FailureClass::BadStatus,
                format!("status {} (body {body:?})", resp.status),
            );
            report.record_failure(&failure, &self.context(worker, seq, fresh));
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn record_failure(&self, failure: &Failure, worker: usize, seq: u64, fresh: bool) {
        self.report()
            .record_failure(failure, &self.context(worker, seq, fresh));
        self.failed.fetch_add(1, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Report {
        let mut report = self.report().clone();
        if !self.finished.load(Ordering::SeqCst) {
            report.elapsed = self.start.elapsed();
        }
        report
    }

    fn summary(&self) -> String {
        self.snapshot().to_string()
    }

    /// Ends a load that cannot run, with `why` as its one failure.
    fn give_up(&self, why: &str) {
        let failure = Failure::new(FailureClass::Other, why);
        self.report().record_failure(&failure, "load");
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.report().elapsed = self.start.elapsed();
        self.finished.store(true, Ordering::SeqCst);
    }
}

async fn worker(ctx: Arc<Ctx>, id: usize) {
    let keepalive = matches!(ctx.cfg.mode, Mode::KeepAlive { .. });
    let mut conn: Option<TcpStream> = None;
    while let Ok(seq) = ctx.next_request() {
        if let Some(stream) = &conn {
            match idle_state(stream) {
                IdleState::Open => {}
                IdleState::Closed | IdleState::Reset(_) => {
                    ctx.report().idle_closes += 1;
                    conn = None;
                }
                IdleState::Unsolicited(n) => {
                    let failure = Failure::new(
                        FailureClass::Other,
                        format!("{n} unsolicited bytes on an idle keep-alive connection"),
                    );
                    ctx.record_failure(&failure, id, seq, false);
                    conn = None;
                    continue;
                }
            }
        }
        let start = Instant::now();
        let deadline = deadline_after(ctx.cfg.request_timeout);
        let fresh = conn.is_none();
        let mut stream = match conn.take() {
            Some(stream) => stream,
            None => match connect(ctx.cfg.addr, deadline).await {
                Ok(stream) => {
                    ctx.report().connections += 1;
                    stream
                }
                Err(failure) => {
                    ctx.record_failure(&failure, id, seq, true);
                    tokio::time::sleep(ctx.cfg.pause_after_failure).await;
                    continue;
                }
            },
        };
        let request = if keepalive {
            &ctx.request_keepalive
        } else {
            &ctx.request_close
        };
        match exchange(&mut stream, request, deadline).await {
            Ok(resp) => {
                ctx.record_response(&resp, start.elapsed(), id, seq, fresh);
                if keepalive && !resp.close {
                    conn = Some(stream);
                }
            }
            Err(failure) => {
                ctx.record_failure(&failure, id, seq, fresh);
                tokio::time::sleep(ctx.cfg.pause_after_failure).await;
            }
        }
    }
}

fn run(ctx: Arc<Ctx>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ctx.cfg.threads.max(1))
        .thread_name("load-worker")
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for id in 0..ctx.cfg.mode.workers() {
                set.spawn(worker(ctx.clone(), id));
            }
            while let Some(joined) = set.join_next().await {
                if let Err(e) = joined {
                    let failure = Failure::new(FailureClass::Other, format!("worker died: {e}"));
                    ctx.report().record_failure(&failure, "load");
                }
            }
        }),
        Err(e) => {
            let failure = Failure::new(FailureClass::Other, format!("no tokio runtime: {e}"));
            ctx.report().record_failure(&failure, "load");
        }
    }
    ctx.report().elapsed = ctx.start.elapsed();
    ctx.finished.store(true, Ordering::SeqCst);
}

/// The running counts of a [`Load`], readable from any thread. See [`Load::counters`].
#[derive(Clone)]
pub struct Counters {
    ctx: Arc<Ctx>,
}

impl Counters {
    /// Successful responses so far.
    pub fn ok(&self) -> u64 {
        self.ctx.ok.load(Ordering::SeqCst)
    }

    /// Failed requests so far.
    pub fn failed(&self) -> u64 {
        self.ctx.failed.load(Ordering::SeqCst)
    }

    /// Whether the load has stopped.
    pub fn is_finished(&self) -> bool {
        self.ctx.finished.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counters")
            .field("ok", &self.ok())
            .field("failed", &self.failed())
            .finish()
    }
}

/// A load running in a background thread. Stop it with [`Load::stop`]; dropping it stops it
/// too (and waits for requests in flight, each bounded by the request timeout).
pub struct Load {
    ctx: Arc<Ctx>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    /// Starts the load now, in a thread of its own.
    ///
    /// This never fails: a load that cannot run (no workers, no thread, no runtime) finishes at
    /// once with the reason counted as a failure of class [`FailureClass::Other`], which the
    /// report and every wait then show.
    pub fn start(cfg: LoadConfig) -> Load {
        let ctx = Arc::new(Ctx {
            request_keepalive: request_bytes(cfg.addr, &cfg.path, false),
            request_close: request_bytes(cfg.addr, &cfg.path, true),
            cfg,
            start: Instant::now(),
            started_requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            report: Mutex::new(Report::default()),
        });
        if ctx.cfg.mode.workers() == 0 {
            ctx.give_up("a load needs at least one worker");
            return Load { ctx, thread: None };
        }
        let runner = ctx.clone();
        let thread = std::thread::Builder::new()
            .name("load".to_string())
            .spawn(move || run(runner));
        match thread {
            Ok(thread) => Load {
                ctx,
                thread: Some(thread),
            },
            Err(e) => {
                ctx.give_up(&format!("cannot spawn the load thread: {e}"));
                Load { ctx, thread: None }
            }
        }
    }

    /// Successful responses so far.
    pub fn ok_count(&self) -> u64 {
        self.ctx.ok.load(Ordering::SeqCst)
    }

    /// Failed requests so far.
    pub fn failure_count(&self) -> u64 {
        self.ctx.failed.load(Ordering::SeqCst)
    }

    /// Whether every worker has stopped (by the flag or a bound).
    pub fn is_finished(&self) -> bool {
        self.ctx.finished.load(Ordering::SeqCst)
    }

    /// The report so far.
    pub fn snapshot(&self) -> Report {
        self.ctx.snapshot()
    }

    /// A handle on the running counts, for another thread (a progress line).
    pub fn counters(&self) -> Counters {
        Counters {
            ctx: self.ctx.clone(),
        }
    }

    /// The stop flag (shared with the config).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.ctx.cfg.stop.clone()
    }

    /// Waits until at least `n` successful responses in total. Fails at the timeout, or at once
    /// if the load has finished short of `n`; the error carries the report so far.
    ///
    /// # Errors
    /// [`Error::Wait`], whose detail holds the report so far.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> Result<(), Error> {
        poll_until(format_args!("{n} successful responses"), timeout, || {
            self.poll_ok(n)
        })
        .map_err(|e| e.with_detail(&self.ctx.summary()))
    }

    /// Waits until `n` more successful responses than now.
    ///
    /// # Errors
    /// [`Error::Wait`], whose detail holds the report so far.
    pub fn wait_for_more_ok(&self, n: u64, timeout: Duration) -> Result<(), Error> {
        let target = self.ok_count() + n;
        poll_until(
            format_args!("{n} more successful responses (total {target})"),
            timeout,
            || self.poll_ok(target),
        )
        .map_err(|e| e.with_detail(&self.ctx.summary()))
    }

    fn poll_ok(&self, target: u64) -> Poll<()> {
        // Read `finished` first: if it was set, the count read after it is final.
        let finished = self.is_finished();
        let ok = self.ok_count();
        if ok >= target {
            Poll::Ready(())
        } else if finished {
            Poll::Failed(format!("the load finished with {ok} successful responses"))
        } else {
            Poll::Pending(format!("{ok} successful, {} failed", self.failure_count()))
        }
    }

    /// Waits until a successful response body satisfies `pred` (e.g. a new generation served),
    /// and returns that body.
    ///
    /// # Errors
    /// [`Error::Wait`], whose detail holds the report so far.
    pub fn wait_for_body(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, Error> {
        poll_until(
            "a successful response with a matching body",
            timeout,
            || {
                let finished = self.is_finished();
                let report = self.ctx.report();
                if let Some(body) = report.bodies.keys().find(|b| pred(b)) {
                    Poll::Ready(body.clone())
                } else if finished {
                    Poll::Failed("the load finished".to_string())
                } else {
                    Poll::Pending(format!("bodies seen: {:?}", report.bodies))
                }
            },
        )
        .map_err(|e| e.with_detail(&self.ctx.summary()))
    }

    /// Waits until the load stops by itself (a bound was reached).
    ///
    /// # Errors
    /// [`Error::Wait`] at the timeout.
    pub fn wait_finished(&self, timeout: Duration) -> Result<(), Error> {
        poll_until("the load to finish", timeout, || {
            if self.is_finished() {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{} ok so far", self.ok_count()))
            }
        })
    }

    /// Sets the stop flag, waits for requests in flight, and returns the final report.
    pub fn stop(mut self) -> Report {
        self.finish();
        self.ctx.snapshot()
    }

    fn finish(&mut self) {
        self.ctx.cfg.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                let failure = Failure::new(FailureClass::Other, "the load thread panicked");
                self.ctx.report().record_failure(&failure, "load");
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}
