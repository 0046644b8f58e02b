//! An HTTP/1.1 + HTTP/2 (h2c) server that upgrades itself on SIGHUP.
//!
//! ```text
//! cargo run --release --example http_server -- --listen 127.0.0.1:8080
//! curl http://127.0.0.1:8080/            # pid=<pid> generation=<n>
//! curl http://127.0.0.1:8080/slow?ms=500 # the same, after 500 ms
//! kill -HUP <pid>                        # upgrade to the binary now on disk
//! kill -TERM <pid>                       # drain and exit 0
//! ```
//!
//! Prints `ready pid=<pid> generation=<n> addr=<addr>` on stdout once ready.
//! Options: `--listen ADDR` (default 127.0.0.1:8080, port 0 allowed),
//! `--ready-timeout-ms N` (60000), `--drain-timeout-ms N` (30000),
//! `--child-probe` (enables `GET /child`, which runs
//! `/bin/sh -c 'ls -l /proc/$$/fd; env'` and returns what it printed: it shows
//! that the app's own children inherit none of handover's fds or variables),
//! `--upgrade-endpoint` (enables `POST /upgrade`, a programmatic upgrade
//! that answers with its outcome: `upgraded pid=.. generation=.. ready_ms=..`,
//! or 500 and the reason).
//!
//! Draining keeps every request: HTTP/1 responses get `Connection: close`
//! once the generation is stopping, so clients reconnect (to the new
//! generation) between requests; a connection still idle after a short grace
//! is closed by hyper's `graceful_shutdown`, which for HTTP/2 sends GOAWAY.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use handover::{Handover, Options, Watch};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tracing::{info, warn};

/// How long a stopping generation lets an idle HTTP/1 connection be before
/// closing it; see `Watch::graceful`.
const IDLE_GRACE: Duration = Duration::from_millis(500);

struct Args {
    listen: SocketAddr,
    child_probe: bool,
    upgrade_endpoint: bool,
    ready_timeout: Duration,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8080".parse().expect("literal address"),
        child_probe: false,
        upgrade_endpoint: false,
        ready_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(30),
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
            "--ready-timeout-ms" => args.ready_timeout = ms(value()?)?,
            "--child-probe" => args.child_probe = true,
            "--upgrade-endpoint" => args.upgrade_endpoint = true,
            "--drain-timeout-ms" => args.drain_timeout = ms(value()?)?,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("http_server: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
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
            eprintln!("http_server: {e}");
            std::process::exit(2);
        }
    };
    // Before the runtime starts: the protocol variables are then removed
    // from what our own children inherit.
    let handover = Handover::new(
        Options::default()
            .ready_timeout(args.ready_timeout)
            .drain_timeout(args.drain_timeout),
    )?;
    tokio::runtime::Runtime::new()?.block_on(serve(handover, args))
}

/// What a request handler knows.
struct App {
    handover: Handover,
    watch: Watch,
    pid: u32,
    generation: u64,
    child_probe: bool,
    upgrade_endpoint: bool,
}

async fn serve(handover: Handover, args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listen = args.listen;
    let listener = handover.tcp("http", listen)?;
    let addr = listener.local_addr()?;
    let pid = std::process::id();
    let generation = handover.generation();
    handover.ready()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready pid={pid} generation={generation} addr={addr}")?;
        out.flush()?;
    }

    let watch = handover.watch();
    let app = Arc::new(App {
        handover: handover.clone(),
        watch: watch.clone(),
        pid,
        generation,
        child_probe: args.child_probe,
        upgrade_endpoint: args.upgrade_endpoint,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of fds and the like: the connection stays
                        // queued; try again shortly rather than give up.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |req| respond(req, app.clone()));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = watch.graceful(conn, IDLE_GRACE, |conn| conn.graceful_shutdown());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            stop = handover.stopping() => {
                info!(?stop, "no longer accepting");
                break;
            }
        }
    }
    drop(listener);
    let report = handover.drain().await;
    info!(?report, "exiting");
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
        "/upgrade" if app.upgrade_endpoint && req.method() == Method::POST => {
            match app.handover.upgrade().await {
                Ok(up) => Response::new(Full::new(Bytes::from(format!(
                    "upgraded pid={} generation={} ready_ms={}\n",
                    up.pid,
                    up.generation,
                    up.ready_after.as_millis()
                )))),
                Err(e) => {
                    let mut r = Response::new(Full::new(Bytes::from(format!("failed: {e}\n"))));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            }
        }
        "/child" if app.child_probe => {
            let output = tokio::process::Command::new("/bin/sh")
                .args(["-c", "ls -l /proc/$$/fd; env"])
                .output()
                .await;
            match output {
                Ok(out) => Response::new(Full::new(Bytes::from(out.stdout))),
                Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "cannot run /bin/sh\n"),
            }
        }
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    };
    // While draining, ask HTTP/1 clients to reconnect (to the new generation)
    // after this response, instead of closing a connection they may be
    // sending on.
    if app.watch.is_stopping() && req.version() <= Version::HTTP_11 {
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
