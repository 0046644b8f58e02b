//! One connection: its socket counted as in-flight work for as long as it is
//! open, `Connection: close` on HTTP/1 responses while winding down, and
//! hyper's graceful shutdown after the idle grace.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::{self, UpgradeableConnection};
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Stopping;
use crate::{Guard, Watch};

/// Serves one connection to its end. Not an `async fn`: the connection is
/// counted as in-flight work from now, not from when its task first runs,
/// so that a drain that starts in between waits for it.
pub(super) fn serve<I, S, B>(
    io: I,
    service: S,
    builder: auto::Builder<TokioExecutor>,
    stopping: Stopping,
    idle_grace: Duration,
) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let watch = stopping.watch.clone();
    // The guard lives in the socket: it moves with an upgraded connection
    // (a WebSocket) into the app's handler and ends when the socket closes.
    let io = TrackedIo {
        inner: io,
        _guard: watch.guard(),
    };
    let service = Closing {
        inner: service,
        stopping,
    };
    async move {
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        serve_until_closed(conn, watch, idle_grace).await;
    }
}

async fn serve_until_closed<I, S, B>(
    conn: UpgradeableConnection<'_, I, S, TokioExecutor>,
    watch: Watch,
    idle_grace: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let winding_down = async {
        watch.winding_down().await;
        tokio::time::sleep(idle_grace).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = winding_down => {
            // HTTP/1: closes once the exchange in progress, if any, is done;
            // HTTP/2: GOAWAY, then the streams in flight complete.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The app's service, plus [`Stopping`] in each request's extensions and
/// `Connection: close` on HTTP/1 responses while winding down.
struct Closing<S> {
    inner: S,
    stopping: Stopping,
}

impl<S, B> Service<Request<Incoming>> for Closing<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ClosingFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() <= Version::HTTP_11;
        req.extensions_mut().insert(self.stopping.clone());
        ClosingFuture {
            inner: self.inner.call(req),
            http1,
            stopping: self.stopping.clone(),
        }
    }
}

#[pin_project]
pub(super) struct ClosingFuture<F> {
    #[pin]
    inner: F,
    http1: bool,
    stopping: Stopping,
}

impl<F, B, E> Future for ClosingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &mut result {
            // Decided when the response is ready, not when the request came:
            // a slow request that started before the stop still tells its
            // client to reconnect. Never on a protocol switch (WebSocket).
            if *this.http1
                && this.stopping.is_winding_down()
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(result)
    }
}

/// A socket that counts as in-flight work until it is dropped.
#[pin_project]
struct TrackedIo<I> {
    #[pin]
    inner: I,
    _guard: Guard,
}

impl<I: AsyncRead> AsyncRead for TrackedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for TrackedIo<I> {
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
        self.project().inner.poll_shutdown(cx)
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
