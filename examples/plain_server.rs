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
//! (30000), `--startup-delay-ms N` (0: time spent "initialising" before ready).
//!
//! SIGTERM or SIGINT drains the way `http_server` does: no new connections; responses carry
//! `Connection: close`; a connection still idle after a short grace is closed; exit after
//! the connections end or the drain timeout. SIGHUP is not handled: this server cannot
//! upgrade itself.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// As in `http_server`: how long a stopping server lets an idle HTTP/1 connection be.
const IDLE_GRACE: Duration = Duration::from_millis(500);

struct Args {
    listen: SocketAddr,
    drain_timeout: Duration,
    startup_delay: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        drain_timeout: Duration::from_secs(30),
        startup_delay: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let ms = |v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{flag}: {v:?} is not a number of milliseconds"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen = v
                    .parse()
                    .map_err(|_| format!("--listen: {v:?} is not an IP:PORT address"))?;
            }
            "--drain-timeout-ms" => args.drain_timeout = ms(value()?)?,
            "--startup-delay-ms" => args.startup_delay = ms(value()?)?,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(args)
}

fn main() {
    // Logging set up as in `http_server`, so that the two differ by `handover` only.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
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

/// `READY=1` to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
fn notify_ready() -> Result<(), String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| e.to_string())?;
            socket.send_to_addr(message.as_bytes(), &addr)
        }
        None => socket.send_to(message.as_bytes(), &path),
    };
    sent.map(|_| ())
        .map_err(|e| format!("NOTIFY_SOCKET {path:?}: {e}"))
}

struct App {
    pid: u32,
    generation: u64,
    stopping: watch::Receiver<bool>,
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
    notify_ready()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready pid={pid} generation={generation} addr={addr}")?;
        out.flush()?;
    }
    tracing::info!(pid, generation, %addr, "ready");

    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(App {
        pid,
        generation,
        stopping: stop_rx.clone(),
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

async fn respond(
    req: Request<Incoming>,
    app: Arc<App>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!("pid={} generation={}", app.pid, app.generation);
    let mut response = match req.uri().path() {
        "/" => Response::new(Full::new(Bytes::from(body))),
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
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    };
    if *app.stopping.borrow() && req.version() <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
}
