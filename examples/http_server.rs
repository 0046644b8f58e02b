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

#[path = "shared/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use handover::{Handover, Options, Watch};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tracing::{info, warn};

use app::{status, IDLE_GRACE};

struct Args {
    listen: SocketAddr,
    child_probe: bool,
    upgrade_endpoint: bool,
    ready_timeout: Duration,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let (mut child_probe, mut upgrade_endpoint) = (false, false);
    let mut ready_timeout = Duration::from_secs(60);
    let common = app::parse_args(|flag, value| {
        match flag {
            "--ready-timeout-ms" => ready_timeout = value.ms()?,
            "--child-probe" => child_probe = true,
            "--upgrade-endpoint" => upgrade_endpoint = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(Args {
        listen: common.listen,
        child_probe,
        upgrade_endpoint,
        ready_timeout,
        drain_timeout: common.drain_timeout,
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("http_server: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    app::init_logging();
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
    app::print_ready(pid, generation, addr)?;

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
                let service = service_fn(move |req| app::respond(req, app.clone()));
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

impl app::App for App {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn is_stopping(&self) -> bool {
        self.watch.is_stopping()
    }

    async fn route(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        Some(match req.uri().path() {
            "/upgrade" if self.upgrade_endpoint && req.method() == Method::POST => {
                match self.handover.upgrade().await {
                    Ok(up) => Response::new(Full::new(Bytes::from(format!(
                        "upgraded pid={} generation={} ready_ms={}\n",
                        up.pid,
                        up.generation,
                        up.ready_after.as_millis()
                    )))),
                    Err(e) => {
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "failed: {}\n",
                            e.report()
                        ))));
                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        r
                    }
                }
            }
            "/child" if self.child_probe => {
                let output = tokio::process::Command::new("/bin/sh")
                    .args(["-c", "ls -l /proc/$$/fd; env"])
                    .output()
                    .await;
                match output {
                    Ok(out) => Response::new(Full::new(Bytes::from(out.stdout))),
                    Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "cannot run /bin/sh\n"),
                }
            }
            _ => return None,
        })
    }
}
