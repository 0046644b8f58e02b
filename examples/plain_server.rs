//! The `http_server` example's handler on a plain tokio/hyper listener, with no `handover`:
//! the baseline of the benchmarks, and the "unmodified app" that `handover run` wraps.
//!
//! ```text
//! cargo run --release --example plain_server -- --listen 127.0.0.1:8080
//! curl http://127.0.0.1:8080/            # pid=<pid> generation=1
//! curl http://127.0.0.1:8080/slow?ms=500 # the same, after 500 ms
//! kill -TERM <pid>                       # drain and exit 0
//! ```
//!
//! Prints `ready pid=<pid> generation=<n> addr=<addr>` on stdout once ready, and sends
//! `READY=1` to `$NOTIFY_SOCKET` when that is set (sd_notify). With systemd socket activation
//! (`LISTEN_PID` is this process and `LISTEN_FDS` >= 1) it serves on fd 3 instead of binding
//! `--listen`; `<n>` is `$HANDOVER_GENERATION` when set, else 1.
//! Options: `--listen ADDR` (default 127.0.0.1:8080, port 0 allowed), `--drain-timeout-ms N`
//! (30000), `--startup-delay-ms N` (0: time spent "initialising" before ready), and those
//! of a broken release: `--never-ready` (serve, but never say ready), `--unhealthy`
//! (`GET /healthz` answers 503 instead of 200), `--crash-after-ready-ms N`.
//!
//! SIGTERM or SIGINT drains the way `http_server` does: no new connections; responses carry
//! `Connection: close`; a connection still idle after a short grace is closed; exit after
//! the connections end or the drain timeout. SIGHUP is not handled: this server cannot
//! upgrade itself.
//!
//! The accept loop and that drain are written by hand here, on purpose: this server must stay
//! free of `handover` (it is the benchmarks' baseline, and the unmodified app that `handover
//! run` wraps), so it cannot use `handover::serve`, which `http_server` uses for the same.

#[path = "shared/app.rs"]
mod app;
#[path = "shared/notify.rs"]
mod notify;

use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long a stopping server lets an idle HTTP/1 connection be before closing it (what
/// `handover::serve` calls the idle grace).
const IDLE_GRACE: Duration = Duration::from_millis(500);

struct Args {
    listen: SocketAddr,
    drain_timeout: Duration,
    startup_delay: Duration,
    never_ready: bool,
    unhealthy: bool,
    crash_after_ready: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut startup_delay = Duration::ZERO;
    let common = app::parse_args(|flag, value| {
        match flag {
            "--startup-delay-ms" => startup_delay = value.ms()?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(Args {
        listen: common.listen,
        drain_timeout: common.drain_timeout,
        startup_delay,
        never_ready: common.never_ready,
        unhealthy: common.unhealthy,
        crash_after_ready: common.crash_after_ready,
    })
}

fn main() {
    // Logging set up as in `http_server`, so that the two differ by `handover` only.
    app::init_logging();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("plain_server: {e}");
            std::process::exit(2);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(serve(args)).map_err(|e| e.to_string()));
    if let Err(e) = result {
        eprintln!("plain_server: {e}");
        std::process::exit(1);
    }
}

/// The listening socket passed by systemd socket activation, if any.
fn activated_listener() -> Result<Option<std::net::TcpListener>, String> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !ours || fds == 0 {
        return Ok(None);
    }
    // SAFETY: LISTEN_PID names this process, so by the socket activation protocol fd 3 was
    // passed to it, is open, and is owned by nothing else in this process (nothing else reads
    // LISTEN_FDS here). Ownership moves into the TcpListener, which closes it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
    // The activator may have left it blocking; the flag lives on the shared description.
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("fd 3 from LISTEN_FDS: {e}"))?;
    Ok(Some(listener))
}

struct App {
    pid: u32,
    generation: u64,
    stopping: watch::Receiver<bool>,
    unhealthy: bool,
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = match activated_listener()? {
        Some(std_listener) => tokio::net::TcpListener::from_std(std_listener)?,
        None => tokio::net::TcpListener::bind(args.listen).await?,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    if !args.startup_delay.is_zero() {
        tokio::time::sleep(args.startup_delay).await;
    }
    let addr = listener.local_addr()?;
    let pid = std::process::id();
    let generation = std::env::var("HANDOVER_GENERATION")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(1u64);
    if args.never_ready {
        tracing::warn!("--never-ready: serving without ever saying ready");
    } else {
        notify::ready()?;
        app::print_ready(pid, generation, addr)?;
        tracing::info!(pid, generation, %addr, "ready");
        app::crash_after_ready(args.crash_after_ready);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(App {
        pid,
        generation,
        stopping: stop_rx.clone(),
        unhealthy: args.unhealthy,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |req| respond(req, app.clone()));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let mut stopping = stop_rx.clone();
                connections.spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = async {
                            let _ = stopping.wait_for(|s| *s).await;
                            tokio::time::sleep(IDLE_GRACE).await;
                        } => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(args.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timeout reached; cutting the connections left");
    }
    tracing::info!("exiting");
    Ok(())
}

/// The shared handler; while draining, HTTP/1 responses say `Connection: close`, so that
/// clients reconnect between requests instead of sending into a connection being closed.
async fn respond(
    req: Request<Incoming>,
    app: Arc<App>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let http1 = req.version() <= Version::HTTP_11;
    let mut response = app::respond(req, app.clone()).await?;
    if http1 && *app.stopping.borrow() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

impl app::App for App {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn unhealthy(&self) -> bool {
        self.unhealthy
    }

    async fn route(&self, _req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        None
    }
}
