//! One connection: its socket counted as in-flight work for as long as it is
//! open, HTTP/1 or HTTP/2 told apart by the client's first bytes, and at an
//! upgrade either handed to the new generation once idle (HTTP/1 over TCP,
//! with handoff on) or wound down: `Connection: close` on HTTP/1 responses
//! and hyper's graceful shutdown after the idle grace.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};

use super::Stopping;
use crate::handoff::{Batch, Phase, Submission, Ticket};
use crate::{Guard, Watch};

/// A connection's socket, as far as a handover goes: a TCP stream moves, a
/// Unix stream does not (its `serve` neither offers nor takes connections).
pub trait Movable: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// Its fd, to hand over.
    fn into_fd(self) -> io::Result<OwnedFd>;
    /// A socket handed over (or given back), ready for the runtime.
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
}

impl Movable for tokio::net::TcpStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        self.into_std().map(OwnedFd::from)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let stream = crate::handoff::adopt_fd(fd)?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    }
}

impl Movable for tokio::net::UnixStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        self.into_std().map(OwnedFd::from)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(std)
    }
}

/// What every connection of one `Serve` shares.
pub(super) struct Settings<S> {
    pub(super) service: S,
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    pub(super) stopping: Stopping,
    pub(super) idle_grace: Duration,
    /// Handoff on (a TCP listener): the generation whose movable
    /// connections these are.
    pub(super) handoff: Option<crate::Handover>,
}

impl<S: Clone> Clone for Settings<S> {
    fn clone(&self) -> Self {
        Settings {
            service: self.service.clone(),
            http1: self.http1.clone(),
            http2: self.http2.clone(),
            stopping: self.stopping.clone(),
            idle_grace: self.idle_grace,
            handoff: self.handoff.clone(),
        }
    }
}

/// Serves one connection to its end, or until it is handed over. `prefix`:
/// bytes already read from it (a connection handed over with them). Not an
/// `async fn`: the connection is counted as in-flight work (and as movable)
/// from now, not from when its task first runs, so that a drain or a
/// handover that starts in between waits for it.
pub(super) fn serve<I, S, B>(
    io: I,
    prefix: Vec<u8>,
    settings: Settings<S>,
) -> impl Future<Output = ()> + Send + 'static
where
    I: Movable,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let guard = settings.stopping.watch.guard();
    let ticket = settings.handoff.as_ref().map(|h| h.inner.moves.ticket());
    let phase = settings.handoff.as_ref().map(|h| h.inner.moves.subscribe());
    async move {
        let mut conn = Conn {
            io,
            prefix,
            guard,
            ticket,
            phase,
            settings,
        };
        loop {
            match conn.serve_once().await {
                Next::Done => return,
                Next::Again(again) => conn = *again,
            }
        }
    }
}

/// A connection between two rounds: a round ends at its close, at its
/// handover, or when a handover gives it back.
struct Conn<I, S> {
    io: I,
    prefix: Vec<u8>,
    guard: Guard,
    ticket: Option<Ticket>,
    phase: Option<watch::Receiver<Phase>>,
    settings: Settings<S>,
}

enum Next<I, S> {
    Done,
    /// Given back by a handover that did not take it: served on.
    Again(Box<Conn<I, S>>),
}

/// What a connection waits for besides its own traffic.
enum Event {
    /// Hand it over, once idle.
    Collect(Arc<Batch>),
    /// Close it gracefully after the idle grace.
    WindDown,
}

/// The client's first bytes tell HTTP/2 (with prior knowledge) from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

fn protocol_of(read: &[u8]) -> Option<Protocol> {
    let n = read.len().min(H2_PREFACE.len());
    if read[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// The next event for a connection: a handover collecting (if it can move),
/// or its generation winding down while no handover holds it.
async fn next_event(
    watch: &Watch,
    phase: Option<&mut watch::Receiver<Phase>>,
    movable: bool,
) -> Event {
    let Some(phase) = phase else {
        watch.winding_down().await;
        return Event::WindDown;
    };
    loop {
        let current = phase.borrow_and_update().clone();
        match current {
            Phase::Collecting(batch) if movable => return Event::Collect(batch),
            Phase::Holding | Phase::Collecting(_) if movable => {
                // Kept open for the handover to come.
                if phase.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ => {
                if watch.is_winding_down() {
                    return Event::WindDown;
                }
                tokio::select! {
                    changed = phase.changed() => {
                        if changed.is_err() {
                            watch.winding_down().await;
                            return Event::WindDown;
                        }
                    }
                    () = watch.winding_down() => {}
                }
            }
        }
    }
}

/// Whether responses of a connection in this phase may go without
/// `Connection: close` while the generation winds down: it is kept for a
/// handover.
fn held(phase: &Option<watch::Receiver<Phase>>) -> bool {
    phase
        .as_ref()
        .is_some_and(|p| matches!(*p.borrow(), Phase::Holding | Phase::Collecting(_)))
}

impl<I, S, B> Conn<I, S>
where
    I: Movable,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn serve_once(mut self) -> Next<I, S> {
        let watch = self.settings.stopping.watch.clone();
        // Which protocol: from the bytes already there, or the first read.
        let protocol = loop {
            if let Some(p) = protocol_of(&self.prefix) {
                break p;
            }
            let movable = self.ticket.is_some();
            let read = tokio::select! {
                read = self.io.read_buf(&mut self.prefix) => read,
                event = next_event(&watch, self.phase.as_mut(), movable) => match event {
                    Event::Collect(batch) => return self.submit(&batch).await,
                    Event::WindDown => {
                        // Nothing asked yet: close after the grace unless a
                        // request starts meanwhile.
                        tokio::select! {
                            read = self.io.read_buf(&mut self.prefix) => read,
                            () = tokio::time::sleep(self.settings.idle_grace) => return Next::Done,
                        }
                    }
                },
            };
            match read {
                Ok(0) | Err(_) => return Next::Done,
                Ok(_) => {}
            }
        };
        match protocol {
            Protocol::Http2 => {
                // HTTP/2 does not move (HPACK state): GOAWAY at the stop.
                self.ticket = None;
                self.serve_http2().await;
                Next::Done
            }
            Protocol::Http1 => self.serve_http1().await,
        }
    }

    /// Hands the connection to `batch`, with the bytes read from it; serves
    /// it on if the handover gives it back.
    async fn submit(self, batch: &Batch) -> Next<I, S> {
        let Conn {
            io,
            prefix,
            guard,
            ticket,
            phase,
            settings,
        } = self;
        let fd = match io.into_fd() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "cannot take a connection out of the runtime");
                return Next::Done;
            }
        };
        tracing::debug!(unparsed = prefix.len(), "connection submitted for handover");
        let (outcome, rx) = oneshot::channel();
        let submission = Submission {
            fd,
            bytes: prefix,
            outcome,
        };
        let (fd, prefix) = match batch.submit(submission) {
            Ok(()) => {
                // Submitted: the handover no longer waits for it.
                drop(ticket);
                match rx.await {
                    // The new generation has it: the guard drops, our copy
                    // of the socket is closed, the client sees nothing.
                    Ok(Ok(())) => return Next::Done,
                    Ok(Err(back)) => back,
                    Err(_) => return Next::Done,
                }
            }
            // Too late for this handover.
            Err(submission) => (submission.fd, submission.bytes),
        };
        match I::from_fd(fd) {
            Ok(io) => {
                let ticket = settings.handoff.as_ref().map(|h| h.inner.moves.ticket());
                Next::Again(Box::new(Conn {
                    io,
                    prefix,
                    guard,
                    ticket,
                    phase,
                    settings,
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve on a connection given back by a handover");
                Next::Done
            }
        }
    }

    async fn serve_http1(self) -> Next<I, S> {
        let Conn {
            io,
            prefix,
            guard,
            ticket,
            mut phase,
            settings,
        } = self;
        let watch = settings.stopping.watch.clone();
        let keep_open = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let io = ConnIo {
            prefix,
            pos: 0,
            inner: io,
            guard,
            keep_open: keep_open.clone(),
        };
        let service = Closing {
            inner: settings.service.clone(),
            stopping: settings.stopping.clone(),
            busy: ticket.as_ref().map(|_| busy.clone()),
            phase: phase.clone(),
        };
        let mut conn = settings
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let movable = ticket.is_some();
        let batch = loop {
            let event = tokio::select! {
                result = &mut conn => {
                    ended(result);
                    return Next::Done;
                }
                event = next_event(&watch, phase.as_mut(), movable) => event,
            };
            let (batch, phase_rx) = match (event, phase.as_mut()) {
                (Event::Collect(batch), Some(phase_rx)) => (batch, phase_rx),
                _ => {
                    wind_down(&mut conn, settings.idle_grace).await;
                    return Next::Done;
                }
            };
            match detach(&mut conn, &busy, &keep_open, phase_rx).await {
                Detached::Idle => break batch,
                Detached::Ended(result) => {
                    ended(result);
                    return Next::Done;
                }
                // Still answering when the handover stopped collecting (a
                // slow response, a stream, or the new generation went away):
                // served on, as the generation's state now says.
                Detached::Busy => {}
            }
        };
        // Upgraded (a WebSocket): the socket is the app's now.
        let Some(parts) = conn.into_parts() else {
            return Next::Done;
        };
        let ConnIo {
            prefix,
            pos,
            inner,
            guard,
            ..
        } = parts.io.into_inner();
        // The bytes hyper read but did not parse, after any we had read.
        let mut bytes = prefix[pos..].to_vec();
        bytes.extend_from_slice(&parts.read_buf);
        Conn {
            io: inner,
            prefix: bytes,
            guard,
            ticket,
            phase,
            settings,
        }
        .submit(&batch)
        .await
    }

    async fn serve_http2(self) {
        let Conn {
            io,
            prefix,
            guard,
            settings,
            ..
        } = self;
        let io = ConnIo {
            prefix,
            pos: 0,
            inner: io,
            guard,
            keep_open: Arc::new(AtomicBool::new(false)),
        };
        let service = Closing {
            inner: settings.service.clone(),
            stopping: settings.stopping.clone(),
            busy: None,
            phase: None,
        };
        let conn = settings.http2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let watch = settings.stopping.watch.clone();
        let winding_down = async {
            watch.winding_down().await;
            tokio::time::sleep(settings.idle_grace).await;
        };
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = winding_down => {
                // GOAWAY, then the streams in flight complete.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        ended(result);
    }
}

fn ended(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Lets an HTTP/1 connection go idle gracefully: after the idle grace, or
/// at its own end, whichever is first; hyper's graceful shutdown closes it
/// once the exchange in progress, if any, is done.
async fn wind_down<C>(conn: &mut C, grace: Duration)
where
    C: Future<Output = hyper::Result<()>> + Unpin + GracefulShutdown,
{
    let result = tokio::select! {
        result = &mut *conn => result,
        () = tokio::time::sleep(grace) => {
            conn.shut_down_gracefully();
            conn.await
        }
    };
    ended(result);
}

/// The graceful shutdown of an HTTP/1 connection, through a `&mut`.
trait GracefulShutdown {
    fn shut_down_gracefully(&mut self);
}

impl<I, S, B> GracefulShutdown for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down_gracefully(&mut self) {
        Pin::new(self).graceful_shutdown();
    }
}

/// How waiting for an HTTP/1 connection to go idle ended.
enum Detached {
    /// It is idle, its HTTP/1 state done, its socket open: to hand over.
    Idle,
    /// It ended by itself (the client closed it, or asked to).
    Ended(hyper::Result<()>),
    /// The handover stopped collecting first.
    Busy,
}

/// Waits until no request of `conn` is being answered (`busy`: from the
/// request's head to the end of its response body), ends its HTTP/1 state
/// there without shutting the socket down, and drives it to that end; or
/// until the handover stops collecting.
async fn detach<C>(
    conn: &mut C,
    busy: &AtomicUsize,
    keep_open: &AtomicBool,
    phase: &mut watch::Receiver<Phase>,
) -> Detached
where
    C: Future<Output = hyper::Result<()>> + Unpin + GracefulShutdown,
{
    let mut asked = false;
    let finished = poll_fn(|cx: &mut Context<'_>| {
        // Idle between requests: every response is produced whole (hyper
        // would say `Connection: close` on a head written after a graceful
        // shutdown), at most its last bytes are still to be flushed; hyper
        // closes its HTTP/1 state once they are.
        if !asked && busy.load(Ordering::SeqCst) == 0 {
            keep_open.store(true, Ordering::SeqCst);
            conn.shut_down_gracefully();
            asked = true;
        }
        match Pin::new(&mut *conn).poll(cx) {
            Poll::Ready(result) => Poll::Ready((result, asked)),
            Poll::Pending => {
                if !asked && busy.load(Ordering::SeqCst) == 0 {
                    // A response just went out: poll again to end there.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    });
    let stopped_collecting = async {
        loop {
            if !matches!(*phase.borrow_and_update(), Phase::Collecting(_)) {
                return;
            }
            if phase.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        (result, asked) = finished => match result {
            Ok(()) if asked => Detached::Idle,
            other => Detached::Ended(other),
        },
        () = stopped_collecting => Detached::Busy,
    }
}

/// The socket as hyper sees it: the bytes already read first, counted as
/// in-flight work until dropped, and not shut down when its HTTP/1
/// connection ends for a handover.
#[pin_project]
struct ConnIo<I> {
    prefix: Vec<u8>,
    pos: usize,
    #[pin]
    inner: I,
    guard: Guard,
    keep_open: Arc<AtomicBool>,
}

impl<I: AsyncRead> AsyncRead for ConnIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.pos < this.prefix.len() {
            let rest = &this.prefix[*this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            *this.pos += n;
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for ConnIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.keep_open.load(Ordering::SeqCst) {
            // Handed over next: a FIN would reach the client.
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request being answered: counted from the service's call until its
/// response body has been produced whole (or the call or body is dropped).
struct BusyToken(Arc<AtomicUsize>);

impl Drop for BusyToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The app's service, plus [`Stopping`] in each request's extensions and
/// `Connection: close` on HTTP/1 responses while winding down (unless the
/// connection is kept for a handover).
struct Closing<S> {
    inner: S,
    stopping: Stopping,
    busy: Option<Arc<AtomicUsize>>,
    phase: Option<watch::Receiver<Phase>>,
}

impl<S, B> Service<Request<Incoming>> for Closing<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = ClosingFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() <= Version::HTTP_11;
        req.extensions_mut().insert(self.stopping.clone());
        let token = self.busy.as_ref().map(|busy| {
            busy.fetch_add(1, Ordering::SeqCst);
            BusyToken(busy.clone())
        });
        ClosingFuture {
            inner: self.inner.call(req),
            http1,
            stopping: self.stopping.clone(),
            phase: self.phase.clone(),
            token,
        }
    }
}

#[pin_project]
pub(super) struct ClosingFuture<F> {
    #[pin]
    inner: F,
    http1: bool,
    stopping: Stopping,
    phase: Option<watch::Receiver<Phase>>,
    token: Option<BusyToken>,
}

impl<F, B, E> Future for ClosingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &mut result {
            // Decided when the response is ready, not when the request came:
            // a slow request that started before the stop still tells its
            // client to reconnect. Never on a protocol switch (WebSocket),
            // nor on a connection kept for a handover.
            if *this.http1
                && this.stopping.is_winding_down()
                && !held(this.phase)
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        // Busy until its body is produced whole: a graceful shutdown before
        // then would end the connection after this response, with or without
        // `Connection: close` depending on whether its head is written.
        let token = this.token.take();
        Poll::Ready(result.map(|response| response.map(|inner| TrackedBody { inner, token })))
    }
}

/// A response body that keeps its request counted as busy until it ends.
#[pin_project]
pub(super) struct TrackedBody<B> {
    #[pin]
    inner: B,
    token: Option<BusyToken>,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.token.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
