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
//! or 500 and the reason), `--pid-file PATH` (`Options::pid_file`),
//! `GET /metrics` (`Handover::metrics` in the Prometheus text format),
//! `--max-draining N` (8), `--failed-drain-timeout-ms N` (the drain timeout),
//! `--never-ready` (takes the sockets and serves, but never says ready: a
//! broken release), `--unhealthy` (`GET /healthz` answers 503 instead of
//! 200), `--crash-after-ready-ms N` (exits 1 N ms after it is ready), and
//! for probation (`Options::probation`): `--probation-ms N` (0),
//! `--health-path PATH` (an HTTP check of `GET PATH` on the listener's
//! address), `--health-interval-ms N` (500), `--health-threshold N` (3),
//! `--no-handoff` (`Serve::connection_handoff(false)`: keep-alive clients
//! reconnect at every upgrade instead of keeping their connection),
//! `--idle-grace-ms N` (`Serve::idle_grace`, 500).
//!
//! The server is `handover::serve::hyper`, which loses no request at an
//! upgrade: idle HTTP/1 keep-alive connections are handed to the new
//! generation (the client keeps its connection); with `--no-handoff`, and
//! for HTTP/2, they are closed gracefully (`Connection: close`, GOAWAY), so
//! clients reconnect to the new generation between requests; then the drain.

#[path = "shared/app.rs"]
mod app;

use std::sync::Arc;

use bytes::Bytes;
use handover::{Handover, Options};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use tracing::info;

use app::status;

struct Args {
    common: app::CommonArgs,
    child_probe: bool,
    upgrade_endpoint: bool,
    handoff: bool,
    idle_grace: Option<std::time::Duration>,
    options: Options,
}

fn parse_args() -> Result<Args, String> {
    let (mut child_probe, mut upgrade_endpoint, mut handoff) = (false, false, true);
    let mut idle_grace = None;
    let mut options = Options::default();
    let common = app::parse_args(|flag, value| {
        options = match flag {
            "--ready-timeout-ms" => options.clone().ready_timeout(value.ms()?),
            "--failed-drain-timeout-ms" => options.clone().failed_drain_timeout(value.ms()?),
            "--max-draining" => options.clone().max_draining(value.number()?),
            "--pid-file" => options.clone().pid_file(value.string()?),
            "--probation-ms" => options.clone().probation(value.ms()?),
            "--health-path" => options.clone().health_http(value.string()?),
            "--health-interval-ms" => options.clone().health_interval(value.ms()?),
            "--health-threshold" => options.clone().health_threshold(value.number()?),
            "--child-probe" => {
                child_probe = true;
                return Ok(true);
            }
            "--upgrade-endpoint" => {
                upgrade_endpoint = true;
                return Ok(true);
            }
            "--no-handoff" => {
                handoff = false;
                return Ok(true);
            }
            "--idle-grace-ms" => {
                idle_grace = Some(value.ms()?);
                return Ok(true);
            }
            _ => return Ok(false),
        };
        Ok(true)
    })?;
    let options = options.drain_timeout(common.drain_timeout);
    Ok(Args {
        common,
        child_probe,
        upgrade_endpoint,
        handoff,
        idle_grace,
        options,
    })
}

#[tokio::main]
async fn main() {
    app::init_logging();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("http_server: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(args).await {
        eprintln!("http_server: {e}");
        std::process::exit(1);
    }
}

/// What a request handler knows.
struct App {
    handover: Handover,
    pid: u32,
    generation: u64,
    child_probe: bool,
    upgrade_endpoint: bool,
    unhealthy: bool,
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Inside the runtime is fine: the protocol variables were taken out of
    // the environment before main.
    let handover = Handover::new(args.options.clone())?;
    let listener = handover.tcp("http", args.common.listen)?;
    let addr = listener.local_addr()?;
    let pid = std::process::id();
    let generation = handover.generation();
    if args.common.never_ready {
        tracing::warn!("--never-ready: serving without ever saying ready");
    } else {
        handover.ready()?;
        app::print_ready(pid, generation, addr)?;
        app::crash_after_ready(args.common.crash_after_ready);
    }

    let app = Arc::new(App {
        handover: handover.clone(),
        pid,
        generation,
        child_probe: args.child_probe,
        upgrade_endpoint: args.upgrade_endpoint,
        unhealthy: args.common.unhealthy,
    });
    let service = service_fn(move |req| app::respond(req, app.clone()));
    // Until this generation stops (waiting while it is parked), then the drain.
    let mut serve =
        handover::serve::hyper(&handover, listener, service).connection_handoff(args.handoff);
    if let Some(grace) = args.idle_grace {
        serve = serve.idle_grace(grace);
    }
    let report = serve.await;
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

    fn unhealthy(&self) -> bool {
        self.unhealthy
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
            "/metrics" => {
                Response::new(Full::new(Bytes::from(self.handover.metrics().to_string())))
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
