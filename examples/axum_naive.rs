//! The way an axum app does a graceful restart without `handover::serve`: `listenfd` takes the
//! inherited socket, `axum::serve(listener, app).with_graceful_shutdown(sigterm)` drains,
//! readiness is sd_notify by hand. It uses no `handover` code; run it under `handover run`,
//! which passes the socket and upgrades it on SIGHUP. The baseline of the
//! `upgrade_failures` bench against `axum_server` (the same routes served by `handover`).
//!
//! ```text
//! handover run --listen http=tcp://127.0.0.1:8080 -- target/release/examples/axum_naive
//! ```
//!
//! Prints `ready pid=<pid> generation=<n> addr=<addr>` on stdout once ready (`<n>` is
//! `$HANDOVER_GENERATION`, else 1) and sends `READY=1` to `$NOTIFY_SOCKET`. Options:
//! `--listen ADDR` (bound when no socket is passed; default 127.0.0.1:8080),
//! `--drain-timeout-ms N` (accepted for a common command line; `axum::serve` has no drain
//! cap: `handover run` kills at its own), `--never-ready`, `--unhealthy`,
//! `--crash-after-ready-ms N`. `GET /ws` is a WebSocket echo that knows nothing of stopping.
//!
//! What it loses across upgrades, and why: `with_graceful_shutdown` closes idle keep-alive
//! connections at once, racing with clients that are sending on them, and answers no
//! request with `Connection: close` first.

#[path = "shared/app.rs"]
#[allow(dead_code)] // the hyper handler is not used here, only the flags and the ready line
mod app;
#[path = "shared/axum_app.rs"]
mod axum_app;
#[path = "shared/notify.rs"]
mod notify;

use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() {
    app::init_logging();
    let args = match app::parse_args(|_, _| Ok(false)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("axum_naive: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(args).await {
        eprintln!("axum_naive: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: app::CommonArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut listenfd = listenfd::ListenFd::from_env();
    let listener = match listenfd.take_tcp_listener(0)? {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)?
        }
        None => tokio::net::TcpListener::bind(args.listen).await?,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let addr = listener.local_addr()?;
    let info = axum_app::Info {
        pid: std::process::id(),
        generation: std::env::var("HANDOVER_GENERATION")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(1),
        unhealthy: args.unhealthy,
    };
    let app = axum_app::routes(info).route("/ws", get(echo));
    if args.never_ready {
        tracing::warn!("--never-ready: serving without ever saying ready");
    } else {
        notify::ready()?;
        app::print_ready(info.pid, info.generation, addr)?;
        app::crash_after_ready(args.crash_after_ready);
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            terminate.recv().await;
        })
        .await?;
    tracing::info!("exiting");
    Ok(())
}

async fn echo(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            if socket.send(message).await.is_err() {
                break;
            }
        }
    })
}
