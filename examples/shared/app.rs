//! What the example servers share, so that they differ by `handover` only (the throughput
//! bench compares `http_server` with `plain_server`): the request handler, the common options,
//! the logging set-up and the ready line. Included with `#[path = "shared/app.rs"] mod app;`.
//!
//! The drain itself is not here: `http_server` and `axum_server` get it from
//! `handover::serve`, and `plain_server`, which must stay free of `handover`, has its own.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

/// The options both servers take: `--listen ADDR` (default 127.0.0.1:8080),
/// `--drain-timeout-ms N` (30000), and those that make a broken release:
/// `--never-ready` (serve, but never say ready), `--unhealthy` (`/healthz`
/// answers 503), `--crash-after-ready-ms N` (exit 1 N ms after ready).
pub struct CommonArgs {
    pub listen: SocketAddr,
    pub drain_timeout: Duration,
    pub never_ready: bool,
    pub unhealthy: bool,
    pub crash_after_ready: Option<Duration>,
}

/// The value of a command-line flag, taken from the arguments on demand.
pub struct Value<'a> {
    flag: &'a str,
    it: &'a mut dyn Iterator<Item = String>,
}

impl Value<'_> {
    /// The next argument, as is.
    pub fn string(&mut self) -> Result<String, String> {
        self.it.next().ok_or(format!("{} needs a value", self.flag))
    }

    /// The next argument, a whole number.
    #[allow(dead_code)] // plain_server takes no number
    pub fn number<T: std::str::FromStr>(&mut self) -> Result<T, String> {
        let v = self.string()?;
        v.parse::<T>()
            .map_err(|_| format!("{}: {v:?} is not a number", self.flag))
    }

    /// The next argument, a number of milliseconds.
    pub fn ms(&mut self) -> Result<Duration, String> {
        let v = self.string()?;
        v.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{}: {v:?} is not a number of milliseconds", self.flag))
    }
}

/// Parses the command line: the common options, and those `extra` knows (it returns `false`
/// for a flag it does not know, which is an error).
pub fn parse_args(
    mut extra: impl FnMut(&str, &mut Value<'_>) -> Result<bool, String>,
) -> Result<CommonArgs, String> {
    let mut args = CommonArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        drain_timeout: Duration::from_secs(30),
        never_ready: false,
        unhealthy: false,
        crash_after_ready: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = Value {
            flag: &flag,
            it: &mut it,
        };
        match flag.as_str() {
            "--listen" => {
                let v = value.string()?;
                args.listen = v
                    .parse()
                    .map_err(|_| format!("--listen: {v:?} is not an IP:PORT address"))?;
            }
            "--drain-timeout-ms" => args.drain_timeout = value.ms()?,
            "--never-ready" => args.never_ready = true,
            "--unhealthy" => args.unhealthy = true,
            "--crash-after-ready-ms" => args.crash_after_ready = Some(value.ms()?),
            other => {
                if !extra(other, &mut value)? {
                    return Err(format!("unknown option {other:?}"));
                }
            }
        }
    }
    Ok(args)
}

/// Logs to stderr (colours on a terminal), filtered by `RUST_LOG`, `info` by default.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Prints `ready pid=<pid> generation=<n> addr=<addr>` on stdout, flushed.
pub fn print_ready(pid: u32, generation: u64, addr: SocketAddr) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready pid={pid} generation={generation} addr={addr}")?;
    out.flush()
}

/// With `--crash-after-ready-ms N`: exits 1 N ms from now (a release that
/// says ready, then crashes).
pub fn crash_after_ready(after: Option<Duration>) {
    if let Some(after) = after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tracing::error!("--crash-after-ready-ms: crashing now");
            std::process::exit(1);
        });
    }
}

/// What the handler needs from the server it runs in.
pub trait App: Send + Sync + 'static {
    /// This process.
    fn pid(&self) -> u32;
    /// Its generation.
    fn generation(&self) -> u64;
    /// Whether `/healthz` answers 503 (`--unhealthy`).
    fn unhealthy(&self) -> bool;
    /// Routes of this server beyond `/` and `/slow`; `None`: not found.
    fn route(
        &self,
        req: &Request<Incoming>,
    ) -> impl Future<Output = Option<Response<Full<Bytes>>>> + Send;
}

/// The handler: `/` answers `pid=<pid> generation=<n>`, `/slow?ms=N` the same after N ms,
/// `/healthz` 200 (503 with `--unhealthy`), then the server's own routes, else 404.
pub async fn respond<A: App>(
    req: Request<Incoming>,
    app: Arc<A>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let body = format!("pid={} generation={}", app.pid(), app.generation());
    let response = match req.uri().path() {
        "/" => Response::new(Full::new(Bytes::from(body))),
        "/healthz" if app.unhealthy() => status(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n"),
        "/healthz" => status(StatusCode::OK, "ok\n"),
        "/slow" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse::<u64>().ok());
            match ms {
                Some(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Response::new(Full::new(Bytes::from(body)))
                }
                None => status(StatusCode::BAD_REQUEST, "slow needs ?ms=N\n"),
            }
        }
        _ => match app.route(&req).await {
            Some(response) => response,
            None => status(StatusCode::NOT_FOUND, "not found\n"),
        },
    };
    Ok(response)
}

/// A response with this status and text.
pub fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
}
