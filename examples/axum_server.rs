//! An axum app served by `handover::serve::axum`: the contract of `http_server` (HTTP/1.1 and
//! HTTP/2, upgrades itself on SIGHUP, drains on SIGTERM) plus `GET /ws`, a WebSocket echo.
//!
//! ```text
//! cargo run --release --example axum_server -- --listen 127.0.0.1:8080
//! curl http://127.0.0.1:8080/            # pid=<pid> generation=<n>
//! curl http://127.0.0.1:8080/slow?ms=500 # the same, after 500 ms
//! kill -HUP <pid>                        # upgrade to the binary now on disk
//! kill -TERM <pid>                       # drain and exit 0
//! ```
//!
//! Prints `ready pid=<pid> generation=<n> addr=<addr>` on stdout once ready. Options:
//! `--listen ADDR` (default 127.0.0.1:8080, port 0 allowed), `--ready-timeout-ms N` (60000),
//! `--drain-timeout-ms N` (30000), `--pid-file PATH`, `--never-ready` (serves, but never says
//! ready), `--unhealthy` (`GET /healthz` answers 503), `--crash-after-ready-ms N`, the
//! probation flags `--probation-ms N`, `--health-path PATH`, `--health-interval-ms N`,
//! `--health-threshold N`, and `--websocket-going-away`: when this generation stops, each
//! WebSocket gets a close frame 1001 "going away" (its client reconnects to the new
//! generation); without it a WebSocket stays until it ends or the drain timeout cuts it.
//! The `101` answer of `GET /ws` carries `x-generation: <n>`. `--idle-grace-ms N` sets
//! `Serve::idle_grace` (500). `--no-handoff` sets `Serve::connection_handoff(false)`: idle
//! keep-alive connections are closed gracefully at an upgrade instead of handed to the new
//! generation.

#[path = "shared/app.rs"]
#[allow(dead_code)] // the hyper handler is not used here, only the flags and the ready line
mod app;
#[path = "shared/axum_app.rs"]
mod axum_app;
#[path = "shared/probation.rs"]
mod probation;

use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::get;
use handover::serve::Stopping;
use handover::{Handover, Options};

struct Args {
    common: app::CommonArgs,
    options: Options,
    websocket_going_away: bool,
    idle_grace: Option<std::time::Duration>,
    handoff: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut options = Options::default();
    let mut websocket_going_away = false;
    let mut idle_grace = None;
    let mut handoff = true;
    let common = app::parse_args(|flag, value| {
        if let Some(with_probation) = probation::flag(&options, flag, value)? {
            options = with_probation;
            return Ok(true);
        }
        options = match flag {
            "--ready-timeout-ms" => options.clone().ready_timeout(value.ms()?),
            "--pid-file" => options.clone().pid_file(value.string()?),
            "--websocket-going-away" => {
                websocket_going_away = true;
                return Ok(true);
            }
            "--idle-grace-ms" => {
                idle_grace = Some(value.ms()?);
                return Ok(true);
            }
            "--no-handoff" => {
                handoff = false;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        Ok(true)
    })?;
    let options = options.drain_timeout(common.drain_timeout);
    Ok(Args {
        common,
        options,
        websocket_going_away,
        idle_grace,
        handoff,
    })
}

#[tokio::main]
async fn main() {
    app::init_logging();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("axum_server: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(args).await {
        eprintln!("axum_server: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let handover = Handover::new(args.options)?;
    let listener = handover.tcp("http", args.common.listen)?;
    let addr = listener.local_addr()?;
    let info = axum_app::Info {
        pid: std::process::id(),
        generation: handover.generation(),
        unhealthy: args.common.unhealthy,
    };
    let generation = info.generation;
    let app = axum_app::routes(info).route(
        "/ws",
        get(move |upgrade, stopping| echo(upgrade, stopping, generation)),
    );
    if args.common.never_ready {
        tracing::warn!("--never-ready: serving without ever saying ready");
    } else {
        handover.ready()?;
        app::print_ready(info.pid, info.generation, addr)?;
        app::crash_after_ready(args.common.crash_after_ready);
    }
    let mut serve = handover::serve::axum(&handover, listener, app)
        .websocket_going_away(args.websocket_going_away)
        .connection_handoff(args.handoff);
    if let Some(grace) = args.idle_grace {
        serve = serve.idle_grace(grace);
    }
    let report = serve.await;
    tracing::info!(?report, "exiting");
    Ok(())
}

/// `GET /ws`: echoes every message until the client closes, or, with
/// `--websocket-going-away`, until this generation stops (close frame 1001). The `101`
/// response says which generation the socket is on (`x-generation`).
async fn echo(upgrade: WebSocketUpgrade, stopping: Stopping, generation: u64) -> Response {
    let mut response = upgrade.on_upgrade(move |mut socket| async move {
        while let Some(Ok(message)) = stopping.recv(&mut socket).await {
            if socket.send(message).await.is_err() {
                break;
            }
        }
    });
    response
        .headers_mut()
        .insert("x-generation", HeaderValue::from(generation));
    response
}
