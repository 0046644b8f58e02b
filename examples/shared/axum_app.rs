//! The routes `axum_server` and `axum_naive` share, the contract of `http_server` in axum:
//! `GET /` answers `pid=<pid> generation=<n>`, `/slow?ms=N` the same after N ms, `/healthz`
//! 200 (503 with `--unhealthy`), anything else 404. Each server adds its own `GET /ws`.
//! Included with `#[path = "shared/axum_app.rs"] mod axum_app;`.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

/// What the handlers know.
#[derive(Clone, Copy)]
pub struct Info {
    pub pid: u32,
    pub generation: u64,
    pub unhealthy: bool,
}

/// `/`, `/slow`, `/healthz` and the 404.
pub fn routes(info: Info) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/slow", get(slow))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(info)
}

async fn hello(State(info): State<Info>) -> String {
    format!("pid={} generation={}", info.pid, info.generation)
}

async fn slow(
    State(info): State<Info>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<String, (StatusCode, &'static str)> {
    let ms = query.get("ms").and_then(|v| v.parse::<u64>().ok());
    let ms = ms.ok_or((StatusCode::BAD_REQUEST, "slow needs ?ms=N\n"))?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(hello(State(info)).await)
}

async fn healthz(State(info): State<Info>) -> (StatusCode, &'static str) {
    if info.unhealthy {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}
