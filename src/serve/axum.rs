//! axum: [`axum()`] serves a `Router`; [`Stopping`] is an extractor; with the
//! `websocket` feature, [`Stopping::recv`] receives from an axum WebSocket
//! and closes it with 1001 "going away" when the generation stops.

use ::axum::extract::FromRequestParts;
use ::axum::http::request::Parts;
use ::axum::http::StatusCode;
use ::axum::Router;
use hyper_util::service::TowerToHyperService;

use super::{Accepts, Serve, Stopping};
use crate::{Handover, Listener};

/// Serves the axum `router` on `listener` until this generation stops, then
/// drains: [`hyper`](super::hyper) for a `Router`. Await it: it resolves to
/// the [`DrainReport`](crate::DrainReport).
///
/// ```no_run
/// # async fn f(handover: handover::Handover) -> Result<(), Box<dyn std::error::Error>> {
/// use axum::{routing::get, Router};
///
/// let app = Router::new().route("/", get(|| async { "hello\n" }));
/// let listener = handover.tcp("http", "127.0.0.1:8080".parse()?)?;
/// handover.ready()?;
/// let report = handover::serve::axum(&handover, listener, app).await;
/// # let _ = report;
/// # Ok(()) }
/// ```
pub fn axum<L: Accepts>(
    handover: &Handover,
    listener: Listener<L>,
    router: Router,
) -> Serve<L, TowerToHyperService<Router>> {
    super::hyper(handover, listener, TowerToHyperService::new(router))
}

/// The rejection when a handler asks for [`Stopping`] on a router that
/// [`axum()`] does not serve.
const NOT_SERVED: (StatusCode, &str) = (
    StatusCode::INTERNAL_SERVER_ERROR,
    "handover::serve::Stopping: this router is not served by handover::serve\n",
);

impl<S: Send + Sync> FromRequestParts<S> for Stopping {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Stopping>()
            .cloned()
            .ok_or(NOT_SERVED)
    }
}

#[cfg(feature = "websocket")]
mod websocket {
    use ::axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
    use tracing::debug;

    use super::Stopping;

    impl Stopping {
        /// The next message of `socket`, as `socket.recv()` returns it, unless
        /// this generation stops first and the app asked for WebSockets to go
        /// away ([`Serve::websocket_going_away`](crate::serve::Serve::websocket_going_away)):
        /// then it sends a close frame 1001 "going away", waits for the
        /// client's close frame (messages that cross it are discarded, as
        /// RFC 6455 has it), and returns `None`; the client reconnects to the
        /// new generation. A message that has arrived is returned before the
        /// stop is looked at. Cancel-safe until the stop.
        ///
        /// ```no_run
        /// use axum::extract::ws::WebSocketUpgrade;
        /// use axum::response::Response;
        /// use handover::serve::Stopping;
        ///
        /// async fn echo(upgrade: WebSocketUpgrade, stopping: Stopping) -> Response {
        ///     upgrade.on_upgrade(move |mut socket| async move {
        ///         while let Some(Ok(message)) = stopping.recv(&mut socket).await {
        ///             if socket.send(message).await.is_err() {
        ///                 break;
        ///             }
        ///         }
        ///     })
        /// }
        /// ```
        pub async fn recv(&self, socket: &mut WebSocket) -> Option<Result<Message, ::axum::Error>> {
            if !self.websocket_going_away {
                return socket.recv().await;
            }
            tokio::select! {
                biased;
                message = socket.recv() => return message,
                _ = self.stopped() => {}
            }
            let frame = CloseFrame {
                code: close_code::AWAY,
                reason: "going away".into(),
            };
            if let Err(e) = socket.send(Message::Close(Some(frame))).await {
                debug!(error = %e, "WebSocket: cannot send the close frame");
                return None;
            }
            // The client answers with its own close frame; the drain cap
            // bounds the wait for a client that does not.
            let mut discarded = 0u64;
            while let Some(Ok(message)) = socket.recv().await {
                match message {
                    Message::Close(_) => break,
                    _ => discarded += 1,
                }
            }
            debug!(discarded, "WebSocket closed with 1001 going away");
            None
        }
    }
}
