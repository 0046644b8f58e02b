//! `handover run --admin ADDR`: the supervisor's own HTTP listener for
//! orchestrators, separate from the app's sockets (never passed to a
//! generation), and `handover status --check` for a `HEALTHCHECK CMD`.
//!
//! - `GET /readyz`: 200 while a generation is ready and the supervisor is
//!   not stopping; 503 from the moment SIGTERM or SIGINT arrives, through
//!   the shutdown delay, so that a load balancer stops routing before the
//!   drain starts.
//! - `GET /livez`: 200. The listener runs on the supervisor's one thread,
//!   so an answer shows that the event loop is not stuck.
//! - `GET /metrics`: [`Metrics::render`], Prometheus text format.
//!
//! A hand-written HTTP/1.1 responder: one request per connection, answered
//! with `Connection: close`; `HEAD` too. Requests larger than
//! [`MAX_REQUEST`] or slower than [`REQUEST_TIMEOUT`] are dropped, and at
//! most [`MAX_CONNECTIONS`] are served at once.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::cli::ClientConfig;
use super::control;
use super::error::Error;
use super::metrics::Metrics;

/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (EMFILE and the like), so that it is no hot
/// loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr` (close-on-exec, so no generation inherits it) and serves
/// the admin endpoints from `metrics` until the returned task is aborted.
/// Must be called inside the runtime.
pub(crate) fn start(
    addr: SocketAddr,
    metrics: Metrics,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io("binding the --admin listener", e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting the --admin listener non-blocking", e))?;
    let local = std_listener.local_addr().ok();
    let listener = TcpListener::from_std(std_listener)
        .map_err(|e| Error::io("registering the --admin listener", e))?;
    info!(
        address = %local.map_or_else(|| addr.to_string(), |a| a.to_string()),
        "admin listener: /readyz /livez /metrics"
    );
    Ok(tokio::spawn(serve(listener, metrics)))
}

async fn serve(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "admin connection refused: too many at once");
                    continue;
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    handle(stream, &metrics).await;
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Reads a request head; `None` when the client sent none in time.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Some(());
            }
            if head.len() > MAX_REQUEST {
                return None;
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read).await.ok()??;
    Some(head)
}

/// A response: status line, content type, body.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

fn text(status: &'static str, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
        allow: false,
    }
}

/// The answer to `method path`.
fn route(method: &str, target: &str, metrics: &Metrics) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply {
            allow: true,
            ..text("405 Method Not Allowed", "use GET or HEAD\n")
        };
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/readyz" => {
            let g = metrics.gauges();
            if g.ready {
                text(
                    "200 OK",
                    format!("ready: generation {} serving\n", g.generation.unwrap_or(0)),
                )
            } else if g.stopping {
                text("503 Service Unavailable", "not ready: stopping\n")
            } else {
                text(
                    "503 Service Unavailable",
                    "not ready: no generation is ready\n",
                )
            }
        }
        "/livez" => text("200 OK", "alive\n"),
        "/metrics" => Reply {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..text("200 OK", metrics.render())
        },
        _ => text(
            "404 Not Found",
            "not found: try /readyz, /livez or /metrics\n",
        ),
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let reply = route(method, target, metrics);
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    if reply.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if method != "HEAD" {
        out.push_str(&reply.body);
    }
    // A client that left early loses its answer; nothing else to do.
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(out.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Whether a `status --json` answer says healthy: the current generation
/// is ready and the supervisor is neither restarting nor stopping. `Ok`
/// names the serving generation, `Err` says what is wrong.
fn verdict(json: &str) -> Result<String, String> {
    let state = json
        .split_once("\"state\":\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(state, _)| state)
        .ok_or("no state in the supervisor's answer")?;
    if matches!(state, "restarting" | "shutting-down" | "stopping") {
        return Err(format!("the supervisor is {state}"));
    }
    let current = json
        .split_once("\"current\":")
        .map(|(_, rest)| rest)
        .ok_or("no current generation in the supervisor's answer")?;
    if current.starts_with("null") {
        return Err(format!("no generation is running ({state})"));
    }
    let number = |key: &str| {
        current
            .split_once(key)
            .map(|(_, rest)| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .unwrap_or_default()
    };
    let ready = current
        .split_once("\"ready\":")
        .is_some_and(|(_, rest)| rest.starts_with("true"));
    let (generation, pid) = (number("\"generation\":"), number("\"pid\":"));
    if ready {
        Ok(format!(
            "generation {generation} (pid {pid}) ready, {state}"
        ))
    } else {
        Err(format!(
            "generation {generation} (pid {pid}) is not ready yet ({state})"
        ))
    }
}

/// `handover status --check`: exits 0 when healthy, 1 otherwise (also when
/// the supervisor cannot be reached), as a `HEALTHCHECK CMD` wants; one
/// line on stdout says why, which Docker keeps in the health log.
pub(crate) fn check(config: &ClientConfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let mut json_config = config.clone();
    json_config.json = true;
    let (mut answer, mut problem) = (Vec::new(), Vec::new());
    let code = control::status(&json_config, &mut answer, &mut problem);
    let result = if code == 0 {
        verdict(&String::from_utf8_lossy(&answer))
    } else {
        let problem = String::from_utf8_lossy(&problem);
        Err(problem
            .trim()
            .trim_start_matches("handover status: ")
            .to_owned())
    };
    match result {
        Ok(line) => {
            let _ = writeln!(out, "healthy: {line}");
            let _ = out.flush();
            0
        }
        Err(why) => {
            let _ = writeln!(out, "unhealthy: {why}");
            let _ = out.flush();
            let _ = err.flush();
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::metrics::Gauges;

    #[test]
    fn routes() {
        let m = Metrics::new();
        assert_eq!(
            route("GET", "/readyz", &m).status,
            "503 Service Unavailable"
        );
        m.publish(Gauges {
            generation: Some(2),
            ready: true,
            ..Gauges::default()
        });
        let r = route("GET", "/readyz?verbose", &m);
        assert_eq!(
            (r.status, r.body.as_str()),
            ("200 OK", "ready: generation 2 serving\n")
        );
        m.publish(Gauges {
            generation: Some(2),
            stopping: true,
            ..Gauges::default()
        });
        let r = route("HEAD", "/readyz", &m);
        assert_eq!(
            (r.status, r.body.as_str()),
            ("503 Service Unavailable", "not ready: stopping\n")
        );
        assert_eq!(route("GET", "/livez", &m).status, "200 OK");
        let r = route("GET", "/metrics", &m);
        assert!(r.content_type.contains("version=0.0.4"));
        assert!(r.body.contains("handover_stopping 1\n"), "{}", r.body);
        assert_eq!(route("GET", "/", &m).status, "404 Not Found");
        let r = route("POST", "/readyz", &m);
        assert!(r.allow && r.status.starts_with("405"));
    }

    #[test]
    fn verdicts() {
        let gen = |ready: bool| {
            format!(
                "{{\"supervisor\":{{\"pid\":1,\"uptime_ms\":5}},\"state\":\"serving\",\"current\":\
                 {{\"generation\":3,\"pid\":42,\"uptime_ms\":1500,\"ready\":{ready},\
                 \"ready_after_ms\":35}},\"upgrading\":null}}"
            )
        };
        assert_eq!(
            verdict(&gen(true)),
            Ok("generation 3 (pid 42) ready, serving".into())
        );
        assert!(verdict(&gen(false)).unwrap_err().contains("not ready yet"));
        let upgrading = gen(true).replace("serving", "upgrading");
        assert!(verdict(&upgrading).is_ok());
        for state in ["restarting", "shutting-down", "stopping"] {
            let json = gen(true).replace("serving", state);
            assert!(verdict(&json).unwrap_err().contains(state));
        }
        assert!(verdict("{\"state\":\"starting\",\"current\":null}").is_err());
        assert!(verdict("garbage").is_err());
    }
}
