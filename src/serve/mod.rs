//! Serving HTTP on a handover [`Listener`] without losing a request across
//! upgrades: [`hyper()`] for a hyper service, `axum()` for an axum `Router`
//! (features `hyper`, `axum`, `websocket`).
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{routing::get, Router};
//! use handover::{Handover, Options};
//!
//! let app = Router::new().route("/", get(|| async { "hello\n" }));
//! let handover = Handover::new(Options::default())?;
//! let listener = handover.tcp("http", "127.0.0.1:8080".parse()?)?;
//! handover.ready()?;
//! let report = handover::serve::axum(&handover, listener, app).await; // until stopped, drained
//! # let _ = report;
//! # Ok(()) }
//! ```
//!
//! [`Serve`] does what a server must do for an upgrade to lose nothing:
//!
//! - **Accept loop**: [`Listener::accept`](crate::Listener::accept), so it
//!   pauses while a new generation is on probation (parked), resumes on a
//!   rollback, and ends once the generation stops. An accept error such as
//!   `EMFILE` leaves the connection queued: the loop backs off (5 ms, doubling
//!   up to 200 ms) and logs one line when an episode starts and one when it
//!   ends, not one per attempt.
//! - **Connection tracking**: each connection is in-flight work of the drain
//!   ([`Watch::guard`](crate::Watch::guard)) for as long as its socket is open,
//!   also after an HTTP upgrade (a WebSocket).
//! - **HTTP/1 over TCP, at an upgrade**: each connection is handed to the new
//!   generation once idle (see [below](self#live-connection-handoff)); the
//!   client keeps its connection and never sees the upgrade.
//! - **HTTP/1 otherwise** (a final stop, a Unix socket, handoff off, a new
//!   generation that does not take connections): while the generation winds
//!   down, each response carries `Connection: close`, so that clients
//!   reconnect, to the generation that accepts, between two requests; a
//!   connection still open after the idle grace ([`Serve::idle_grace`],
//!   500 ms) is closed by hyper's graceful shutdown, which never cuts a
//!   request it is reading or answering.
//! - **HTTP/2**: the same graceful shutdown sends GOAWAY, and the requests in
//!   flight complete.
//! - **The drain cap**: once the accept loop ends, [`Serve`] drains
//!   ([`Handover::drain`]) and resolves to the [`DrainReport`]: what was still
//!   open at the drain timeout (a WebSocket, an endless stream) is counted in
//!   [`DrainReport::cut`], logged, and cut when the process exits.
//! - **Long-lived connections**: every request carries a [`Stopping`] (an
//!   axum extractor, or a request extension for hyper) whose
//!   [`stopped`](Stopping::stopped) resolves when the generation stops, so that
//!   an SSE or streaming handler can end its stream. A WebSocket received
//!   through `Stopping::recv` (feature `websocket`) is closed with 1001
//!   "going away" when the generation stops if the app asked for it with
//!   [`Serve::websocket_going_away`]; the client then reconnects to the new
//!   generation. Without it, a WebSocket stays on the old generation until it
//!   ends or the drain cap cuts it.
//!
//! # Live connection handoff
//!
//! With [`Serve::connection_handoff`] on (the default) and a TCP listener, an
//! upgrade moves this generation's HTTP/1 connections to the new one instead
//! of closing them, so that keep-alive clients do not reconnect at each
//! deploy:
//!
//! 1. once the new generation is ready (and its probation, if any, has
//!    passed), this one parks (new connections go to the new one);
//! 2. each connection, at its next idle point (no response head left to
//!    write; a response in progress finishes first, with its keep-alive),
//!    ends its HTTP/1 state without closing the socket, and is offered with
//!    the bytes read but not parsed yet (hyper's read buffer) over the
//!    control channel, the fd by `SCM_RIGHTS`; the new generation prepares it
//!    (holds it, reads nothing);
//! 3. once every connection has been offered (or the idle grace has passed:
//!    a connection still busy then, a slow response or a stream, is closed
//!    gracefully as without handoff), they are all committed, and the new
//!    generation serves them, the unparsed bytes first. This generation then
//!    stops and drains what is left.
//!
//! A new generation that dies before the commit (killed, crashing) is a
//! failed upgrade: this generation resumes and serves every connection on,
//! none of which the new one has read from, so clients see nothing. A
//! connection the new generation declines stays here and is closed
//! gracefully. While the new generation is on probation, the connections
//! stay here, served as usual (not wound down): they move only once it is
//! promoted, so a rollback has nothing to give back.
//!
//! HTTP/2 connections are not moved: their HPACK tables and stream state live
//! in this process. They get GOAWAY, and their clients reconnect. Under
//! `handover run` the generations are the supervisor's children, not each
//! other's: connections are closed gracefully there.

mod accept;
#[cfg(feature = "axum")]
mod axum;
mod connection;

use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioExecutor;
use tracing::{info, warn};

pub use self::connection::Movable;

use crate::{DrainReport, Handover, Listener, Stop, Watch};

#[cfg(feature = "axum")]
pub use self::axum::axum;

/// How long a connection may stay open once its generation winds down before
/// it is closed gracefully; see [`Serve::idle_grace`].
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(500);

/// Serves the hyper `service` on `listener` until this generation stops,
/// then drains; see the [module docs](self). Await it (or
/// [`tokio::spawn`] it): it resolves to the [`DrainReport`], after which the
/// app returns from `main`.
///
/// The service is cloned for each connection. Each request carries a
/// [`Stopping`] in its extensions.
pub fn hyper<L, S, B>(handover: &Handover, listener: Listener<L>, service: S) -> Serve<L, S>
where
    L: Accepts,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Serve {
        handover: handover.clone(),
        listener,
        service,
        idle_grace: DEFAULT_IDLE_GRACE,
        websocket_going_away: false,
        handoff: true,
        http1: http1::Builder::new(),
        http2: http2::Builder::new(TokioExecutor::new()),
    }
}

/// A server that runs until its generation stops and then drains; made by
/// [`hyper()`] or `axum()`; await it.
#[must_use = "a Serve does nothing until it is awaited"]
pub struct Serve<L, S> {
    handover: Handover,
    listener: Listener<L>,
    service: S,
    idle_grace: Duration,
    websocket_going_away: bool,
    handoff: bool,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl<L, S> std::fmt::Debug for Serve<L, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("idle_grace", &self.idle_grace)
            .field("websocket_going_away", &self.websocket_going_away)
            .field("handoff", &self.handoff)
            .finish_non_exhaustive()
    }
}

impl<L, S> Serve<L, S> {
    /// How long a connection may stay open once this generation winds down
    /// (parked or stopping) before hyper's graceful shutdown closes it
    /// (default [`DEFAULT_IDLE_GRACE`], 500 ms). Meanwhile each HTTP/1
    /// response says `Connection: close`, so a busy client reconnects after its
    /// next response; the grace is for an idle one, which might be sending a
    /// request right now: closing at once would lose that request.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// Whether a WebSocket that the app receives with `Stopping::recv` is
    /// closed with 1001 "going away" when this generation stops, so that its
    /// client reconnects to the new generation (default `false`: it stays on
    /// this generation until it ends or the drain cap cuts it).
    pub fn websocket_going_away(mut self, on: bool) -> Self {
        self.websocket_going_away = on;
        self
    }

    /// Whether idle HTTP/1 connections are handed to the new generation at
    /// an upgrade, so that their clients never reconnect (default `true`; TCP
    /// only). Off, every keep-alive connection is closed gracefully at an
    /// upgrade and its client reconnects, as HTTP/2 connections always are.
    /// See the [module docs](self#live-connection-handoff).
    pub fn connection_handoff(mut self, on: bool) -> Self {
        self.handoff = on;
        self
    }

    /// Configures hyper's HTTP/1 connections (keep-alive, header limits,
    /// timeouts...).
    pub fn http1(mut self, configure: impl FnOnce(&mut http1::Builder)) -> Self {
        configure(&mut self.http1);
        self
    }

    /// Configures hyper's HTTP/2 connections (with prior knowledge: the
    /// client's first bytes are HTTP/2's preface).
    pub fn http2(mut self, configure: impl FnOnce(&mut http2::Builder<TokioExecutor>)) -> Self {
        configure(&mut self.http2);
        self
    }
}

impl<L, S, B> IntoFuture for Serve<L, S>
where
    L: Accepts,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = DrainReport;
    type IntoFuture = Pin<Box<dyn Future<Output = DrainReport> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<L, S, B> Serve<L, S>
where
    L: Accepts,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn run(self) -> DrainReport {
        let Serve {
            handover,
            listener,
            service,
            idle_grace,
            websocket_going_away,
            handoff,
            http1,
            http2,
        } = self;
        let watch = handover.watch();
        let stopping = Stopping {
            watch: watch.clone(),
            websocket_going_away,
        };
        // With handoff on a TCP listener: this generation's connections move
        // at an upgrade, and those the previous one hands over come in here.
        let local = handoff.then(|| L::local_addr(&listener)).flatten();
        if !handoff {
            if let Some(addr) = L::local_addr(&listener) {
                // Offers for this listener are declined at once, not after
                // waiting for a `serve` that takes them.
                handover.inner.adoptions.decline_http(addr);
            }
        }
        let _registration = local.map(|_| handover.inner.moves.register_serve(idle_grace));
        let mut adopted = local.map(|addr| handover.inner.adoptions.take_http(addr));
        let settings = connection::Settings {
            service,
            http1,
            http2,
            stopping,
            idle_grace,
            handoff: local.map(|_| handover.clone()),
        };
        let mut backoff = accept::Backoff::default();
        // Ends once this generation stops; waits while it is parked.
        loop {
            let next_adopted = async {
                match adopted.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                accepted = L::next(&listener) => match accepted {
                    None => break,
                    Some(Ok(io)) => {
                        backoff.succeeded();
                        handover.inner.counters.accepted();
                        tokio::spawn(connection::serve(io, Vec::new(), settings.clone()));
                    }
                    Some(Err(e)) => {
                        if let Some(delay) = backoff.failed(&e) {
                            tokio::time::sleep(delay).await;
                        }
                    }
                },
                Some((fd, bytes)) = next_adopted => adopt(fd, bytes, &settings),
            }
        }
        // Handed over but not taken yet: served (and wound down) here.
        if let Some(mut rx) = adopted.take() {
            rx.close();
            while let Ok((fd, bytes)) = rx.try_recv() {
                adopt(fd, bytes, &settings);
            }
        }
        let stop = handover.stopping().await;
        info!(?stop, "serve: no longer accepting");
        // The socket stays open in the new generation (and in the Handover).
        drop(listener);
        let report = handover.drain().await;
        if report.cut > 0 {
            warn!(
                cut = report.cut,
                in_flight_at_start = report.in_flight_at_start,
                "serve: {} connection(s) still open at the drain timeout (WebSockets, \
                 streams, slow requests) are cut",
                report.cut
            );
        }
        report
    }
}

/// Serves a connection the previous generation handed over.
fn adopt<S, B>(fd: std::os::fd::OwnedFd, bytes: Vec<u8>, settings: &connection::Settings<S>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match <tokio::net::TcpStream as Movable>::from_fd(fd) {
        Ok(io) => {
            if let Some(handover) = &settings.handoff {
                handover.inner.counters.adopted();
            }
            tracing::debug!(peer = ?io.peer_addr().ok(), "connection adopted from the previous generation");
            tokio::spawn(connection::serve(io, bytes, settings.clone()));
        }
        Err(e) => tracing::debug!(error = %e, "a connection handed over is already gone"),
    }
}

/// A listener [`Serve`] can accept on: a [`Listener`] of a Tokio
/// `TcpListener` (its connections get `TCP_NODELAY`, and can be handed over)
/// or `UnixListener`.
pub trait Accepts: private::Sealed + Sized + Send + Sync + 'static {
    /// An accepted connection.
    type Io: Movable;

    /// The next connection, `None` once the generation stops.
    fn next(listener: &Listener<Self>)
        -> impl Future<Output = Option<io::Result<Self::Io>>> + Send;

    /// The address connections handed over on this listener came to: TCP
    /// only.
    fn local_addr(listener: &Listener<Self>) -> Option<std::net::SocketAddr>;
}

impl Accepts for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    fn local_addr(listener: &Listener<Self>) -> Option<std::net::SocketAddr> {
        listener.get_ref().local_addr().ok()
    }

    async fn next(listener: &Listener<Self>) -> Option<io::Result<Self::Io>> {
        let accepted = listener.accept().await?;
        Some(accepted.map(|(stream, _)| {
            // Responses are written whole; do not let Nagle hold them back.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            stream
        }))
    }
}

impl Accepts for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    fn local_addr(_: &Listener<Self>) -> Option<std::net::SocketAddr> {
        None
    }

    async fn next(listener: &Listener<Self>) -> Option<io::Result<Self::Io>> {
        let accepted = listener.accept().await?;
        Some(accepted.map(|(stream, _)| stream))
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for tokio::net::TcpListener {}
    impl Sealed for tokio::net::UnixListener {}
}

/// The stop signal as a request handler sees it: in the extensions of every
/// request that [`Serve`] passes on (and an axum extractor).
///
/// A handler of a long-lived response (SSE, a stream, a WebSocket) awaits
/// [`stopped`](Stopping::stopped) to end it when the generation stops, so
/// that the client reconnects to the new generation instead of being cut at
/// the drain cap.
#[derive(Clone)]
pub struct Stopping {
    watch: Watch,
    websocket_going_away: bool,
}

impl std::fmt::Debug for Stopping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopping")
            .field("stopping", &self.is_stopping())
            .field("websocket_going_away", &self.websocket_going_away)
            .finish()
    }
}

impl Stopping {
    /// Whether this generation has been told to stop for good.
    pub fn is_stopping(&self) -> bool {
        self.watch.is_stopping()
    }

    /// Whether connections wind down: the generation is stopping, or parked
    /// while a new one is on probation (HTTP/1 responses then say
    /// `Connection: close`).
    pub fn is_winding_down(&self) -> bool {
        self.watch.is_winding_down()
    }

    /// Resolves when this generation stops for good (replaced by a new one, or
    /// a final stop), with the reason. Cancel-safe.
    pub async fn stopped(&self) -> Stop {
        self.watch.stopping().await
    }

    /// Whether the app asked for WebSockets to be closed with 1001 "going
    /// away" at the stop ([`Serve::websocket_going_away`]).
    pub fn websocket_going_away(&self) -> bool {
        self.websocket_going_away
    }

    /// The [`Watch`] of this generation.
    pub fn watch(&self) -> &Watch {
        &self.watch
    }
}
