//! Draining: the stop signal, in-flight tracking, and the wait with a cap.
//!
//! The stop signal is a watch channel. In-flight work is counted by guards,
//! each a receiver of a second watch channel, so "all work done" is simply
//! that channel having no receivers left. [`Tracked`], [`TrackedStream`] and
//! [`Graceful`] hold a guard for as long as the wrapped future or stream
//! lives.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::Stream;
use pin_project::pin_project;
use tokio::sync::watch;

use crate::Upgraded;

/// Why this generation is stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// A new generation is ready and serving on the same sockets: stop
    /// accepting and finish in-flight work.
    Upgraded(Upgraded),
    /// A final stop (SIGTERM, SIGINT, or [`Handover::shutdown`](crate::Handover::shutdown)):
    /// stop accepting and finish in-flight work; nobody takes over.
    Shutdown,
}

/// Whether this generation takes new work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Gate {
    /// Paused while a new generation is on probation: no accepting, but
    /// listeners and state are kept, and it may resume.
    parked: bool,
    /// Stopped for good, and why.
    stop: Option<Stop>,
}

impl Gate {
    fn accepting(&self) -> bool {
        !self.parked && self.stop.is_none()
    }
}

/// The sending side; owned by the [`Handover`](crate::Handover).
pub(crate) struct Drain {
    stop: watch::Sender<Gate>,
    guards: Arc<watch::Sender<()>>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        let (stop, _) = watch::channel(Gate::default());
        let (guards, _) = watch::channel(());
        Drain {
            stop,
            guards: Arc::new(guards),
        }
    }

    /// Sets the stop reason, unless one is set already; returns whether it was
    /// this call that set it.
    pub(crate) fn stop(&self, reason: Stop) -> bool {
        self.stop.send_if_modified(|gate| {
            if gate.stop.is_some() {
                return false;
            }
            gate.stop = Some(reason);
            true
        })
    }

    /// Parks (`true`) or resumes (`false`) accepting; returns whether that
    /// changed anything.
    pub(crate) fn park(&self, parked: bool) -> bool {
        self.stop.send_if_modified(|gate| {
            let changed = gate.parked != parked;
            gate.parked = parked;
            changed
        })
    }

    pub(crate) fn watch(&self) -> Watch {
        Watch {
            stop: self.stop.subscribe(),
            guards: self.guards.clone(),
        }
    }

    /// Waits until no guard is left, or `cap` has passed.
    pub(crate) async fn wait(&self, cap: Duration) -> DrainReport {
        let started = Instant::now();
        let in_flight_at_start = self.guards.receiver_count();
        let completed = tokio::time::timeout(cap, self.guards.closed())
            .await
            .is_ok();
        DrainReport {
            in_flight_at_start,
            cut: self.guards.receiver_count(),
            completed,
            elapsed: started.elapsed(),
        }
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Guards alive when the drain started.
    pub in_flight_at_start: usize,
    /// Guards still alive when it ended: work cut at the drain timeout.
    pub cut: usize,
    /// Whether all work finished before the drain timeout.
    pub completed: bool,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// A cheap, cloneable view of the stop signal, which also tracks in-flight
/// work. Get one from [`Handover::watch`](crate::Handover::watch).
#[derive(Clone)]
pub struct Watch {
    stop: watch::Receiver<Gate>,
    guards: Arc<watch::Sender<()>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("stopping", &self.is_stopping())
            .field("parked", &self.is_parked())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Watch {
    /// Whether this generation has been told to stop for good (replaced,
    /// or a final stop).
    pub fn is_stopping(&self) -> bool {
        self.stop.borrow().stop.is_some()
    }

    /// Whether this generation is parked: a new generation is on probation
    /// beside it, so it accepts nothing new for now, but keeps its
    /// listeners and state and may resume (a rollback).
    pub fn is_parked(&self) -> bool {
        self.stop.borrow().parked
    }

    /// Whether connections should wind down: this generation is parked or
    /// stopping. An HTTP/1 server answers with `Connection: close` then, so
    /// that clients reconnect (to the generation that accepts) between
    /// requests; [`Watch::graceful`] closes idle connections then.
    pub fn is_winding_down(&self) -> bool {
        !self.stop.borrow().accepting()
    }

    /// Resolves when this generation is told to stop for good, with the
    /// reason. Cancel-safe.
    pub async fn stopping(&self) -> Stop {
        let mut rx = self.stop.clone();
        loop {
            if let Some(stop) = rx.borrow_and_update().stop.clone() {
                return stop;
            }
            if rx.changed().await.is_err() {
                // The Handover is gone; nothing will ever stop us but
                // process exit. Wait forever rather than invent a reason.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until this generation may accept: `true` at once when it may,
    /// `true` later when it resumes from being parked, `false` once it
    /// stops for good. Cancel-safe.
    pub(crate) async fn accepting(&self) -> bool {
        let mut rx = self.stop.clone();
        let accepting = match rx.wait_for(|g| g.accepting() || g.stop.is_some()).await {
            Ok(gate) => Some(gate.stop.is_none()),
            Err(_) => None,
        };
        match accepting {
            Some(accepting) => accepting,
            None => std::future::pending().await,
        }
    }

    /// Resolves when this generation stops accepting (parked or stopping).
    /// Cancel-safe.
    pub(crate) async fn winding_down(&self) {
        let mut rx = self.stop.clone();
        if rx.wait_for(|g| !g.accepting()).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// A guard that counts as one piece of in-flight work until dropped.
    pub fn guard(&self) -> Guard {
        Guard {
            _rx: self.guards.subscribe(),
        }
    }

    /// How many guards are alive now.
    pub fn in_flight(&self) -> usize {
        self.guards.receiver_count()
    }

    /// Wraps a future so that it counts as in-flight work until it completes
    /// or is dropped.
    pub fn track<F: Future>(&self, future: F) -> Tracked<F> {
        Tracked {
            inner: future,
            _guard: self.guard(),
        }
    }

    /// Wraps a stream so that it counts as in-flight work until it ends or is
    /// dropped.
    pub fn track_stream<S: Stream>(&self, stream: S) -> TrackedStream<S> {
        TrackedStream {
            inner: stream,
            guard: Some(self.guard()),
        }
    }

    /// Wraps a connection future: tracked like [`Watch::track`], and once
    /// this generation winds down (stopping, or parked while a new
    /// generation is on probation) and `grace` has passed, `on_stop` is
    /// called once with the pinned connection (for hyper, `|conn| conn.graceful_shutdown()`),
    /// after which the future is polled to completion as usual.
    ///
    /// The grace lets an HTTP/1 connection finish the exchange it is in and
    /// answer its next request with `Connection: close` before it is closed as
    /// idle, so that a client never sends a request into a connection that is
    /// being closed. Use `Duration::ZERO` for protocols with their own
    /// graceful close (HTTP/2 GOAWAY).
    pub fn graceful<F, C>(&self, connection: F, grace: Duration, on_stop: C) -> Graceful<F, C>
    where
        F: Future,
        C: FnOnce(Pin<&mut F>),
    {
        let watch = self.clone();
        let signal: BoxFuture<'static, ()> = Box::pin(async move {
            watch.winding_down().await;
            tokio::time::sleep(grace).await;
        });
        Graceful {
            inner: connection,
            signal: Some(signal),
            on_stop: Some(on_stop),
            _guard: self.guard(),
        }
    }
}

/// Counts as in-flight work until dropped. See [`Watch::guard`].
#[derive(Debug)]
#[must_use = "a guard counts as in-flight work only while it is alive"]
pub struct Guard {
    _rx: watch::Receiver<()>,
}

/// A future tracked as in-flight work. See [`Watch::track`].
#[pin_project]
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Tracked<F> {
    #[pin]
    inner: F,
    _guard: Guard,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// A stream tracked as in-flight work until it ends. See [`Watch::track_stream`].
#[pin_project]
#[derive(Debug)]
#[must_use = "streams do nothing unless polled"]
pub struct TrackedStream<S> {
    #[pin]
    inner: S,
    guard: Option<Guard>,
}

impl<S: Stream> Stream for TrackedStream<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        let item = this.inner.poll_next(cx);
        if let Poll::Ready(None) = item {
            this.guard.take();
        }
        item
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// A connection tracked as in-flight work that is told to close gracefully on
/// stop. See [`Watch::graceful`].
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct Graceful<F, C> {
    #[pin]
    inner: F,
    signal: Option<BoxFuture<'static, ()>>,
    on_stop: Option<C>,
    _guard: Guard,
}

impl<F: Future, C: FnOnce(Pin<&mut F>)> Future for Graceful<F, C> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        if let Some(signal) = this.signal.as_mut() {
            if signal.as_mut().poll(cx).is_ready() {
                *this.signal = None;
                if let Some(on_stop) = this.on_stop.take() {
                    on_stop(this.inner.as_mut());
                }
            }
        }
        this.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_guards_up_to_the_cap() {
        let drain = Drain::new();
        let watch = drain.watch();
        let quick = watch.track(tokio::time::sleep(Duration::from_secs(1)));
        let slow = watch.track(tokio::time::sleep(Duration::from_secs(100)));
        tokio::spawn(quick);
        tokio::spawn(slow);
        assert_eq!(watch.in_flight(), 2);
        assert!(drain.stop(Stop::Shutdown));
        assert!(!drain.stop(Stop::Shutdown), "the first reason stays");
        let report = drain.wait(Duration::from_secs(10)).await;
        assert_eq!(report.in_flight_at_start, 2);
        assert_eq!(report.cut, 1);
        assert!(!report.completed);
        assert_eq!(report.elapsed, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_as_soon_as_work_is_done() {
        let drain = Drain::new();
        let watch = drain.watch();
        tokio::spawn(watch.track(tokio::time::sleep(Duration::from_secs(2))));
        let report = drain.wait(Duration::from_secs(30)).await;
        assert!(report.completed);
        assert_eq!(report.cut, 0);
        assert_eq!(report.elapsed, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn graceful_calls_on_stop_after_the_grace() {
        let drain = Drain::new();
        let watch = drain.watch();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = called.clone();
        let conn = watch.graceful(rx, Duration::from_millis(500), move |_rx| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(tx);
        });
        let task = tokio::spawn(conn);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
        let stopped_at = tokio::time::Instant::now();
        drain.stop(Stop::Shutdown);
        let report = drain.wait(Duration::from_secs(30)).await;
        assert!(called.load(std::sync::atomic::Ordering::SeqCst));
        assert!(report.completed);
        assert_eq!(stopped_at.elapsed(), Duration::from_millis(500));
        assert!(task.await.unwrap().is_err(), "sender dropped by on_stop");
    }

    #[tokio::test]
    async fn tracked_stream_releases_at_end() {
        let drain = Drain::new();
        let watch = drain.watch();
        let mut s = watch.track_stream(futures::stream::iter([1, 2]));
        use futures::StreamExt;
        assert_eq!(watch.in_flight(), 1);
        assert_eq!(s.next().await, Some(1));
        assert_eq!(s.next().await, Some(2));
        assert_eq!(s.next().await, None);
        assert_eq!(watch.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn parking_winds_down_without_stopping_and_resumes() {
        let drain = Drain::new();
        let watch = drain.watch();
        assert!(watch.accepting().await);
        assert!(drain.park(true));
        assert!(!drain.park(true), "already parked");
        assert!(watch.is_parked() && watch.is_winding_down() && !watch.is_stopping());
        // Connections wind down on park, like on stop.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let conn = watch.graceful(rx, Duration::from_millis(10), move |_| drop(tx));
        assert!(conn.await.is_err(), "closed by on_stop");
        // Accepting waits for the resume.
        let waiter = tokio::spawn({
            let watch = watch.clone();
            async move { watch.accepting().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drain.park(false);
        assert!(waiter.await.unwrap(), "resumed");
        // A stop ends accepting for good, parked or not.
        drain.park(true);
        drain.stop(Stop::Shutdown);
        assert!(!watch.accepting().await);
    }

    #[tokio::test]
    async fn stopping_resolves_with_the_reason() {
        let drain = Drain::new();
        let watch = drain.watch();
        assert!(!watch.is_stopping());
        let waiter = tokio::spawn({
            let watch = watch.clone();
            async move { watch.stopping().await }
        });
        drain.stop(Stop::Shutdown);
        assert_eq!(waiter.await.unwrap(), Stop::Shutdown);
        assert!(watch.is_stopping());
    }
}
