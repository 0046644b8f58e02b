//! Live connections handed to the next generation, so that their clients
//! never reconnect: idle HTTP/1 connections of [`serve`](crate::serve) at
//! every upgrade, and the connections an app registers
//! ([`Handover::hand_over`] in the old generation, [`Handover::adopt`] in the
//! new one).
//!
//! A transaction per connection over the control channel between the two
//! generations:
//!
//! 1. **prepare**: the old generation sends `offer` (or `offer-http`) with
//!    the socket's fd (`SCM_RIGHTS`) and the bytes that go with it, and keeps
//!    its own copy; the new one answers `adopted` (it holds the connection
//!    and reads nothing from it yet) or `declined`;
//! 2. **commit**: the old generation sends `commit` and closes its copy; the
//!    new one serves the connection from then on;
//! 3. or **abort**: the old generation serves on, the new one drops its copy.
//!
//! `serve` offers every idle HTTP/1 connection of the generation, then
//! commits them together, as the last step of an upgrade before the old
//! generation stops ([`Moves::transfer`]). A new generation that dies before
//! the commit is a failed upgrade: the old one resumes and serves every
//! connection on, none of which the new one has read a byte from, so a
//! failure in the middle loses nothing. Should the old generation die after a
//! prepare, the new one holds the only copy and serves it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::channel::{self, Message};
use crate::handover::{lock, Handover};

/// How long the old generation waits for the new one to answer an offer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an HTTP offer waits, in the new generation, for a `serve` on the
/// connection's listener to start (it usually starts right after `ready`).
const SERVE_START_WAIT: Duration = Duration::from_secs(2);

/// The old generation's channel to the generation that replaced it, and its
/// offers waiting for an answer.
pub(crate) struct Link {
    channel: channel::Receiver,
    waiting: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    next_id: AtomicU64,
    gone: watch::Sender<bool>,
}

/// What became of an offer.
pub(crate) enum Offered {
    /// The new generation holds it (prepared): commit or abort it.
    Prepared(u64),
    /// It does not take it.
    Declined,
    /// No answer: it died, or did not answer in time.
    Lost,
}

impl Link {
    /// Keeps the channel to the generation that just took over, and reads
    /// its answers.
    pub(crate) fn attach(channel: channel::Receiver) -> Arc<Link> {
        let link = Arc::new(Link {
            channel,
            waiting: Mutex::default(),
            next_id: AtomicU64::new(1),
            gone: watch::Sender::new(false),
        });
        let reader = link.clone();
        tokio::spawn(async move {
            loop {
                match reader.channel.recv().await {
                    Ok(Some(Message::Adopted(id))) => reader.answer(id, true),
                    Ok(Some(Message::Declined(id))) => reader.answer(id, false),
                    Ok(Some(other)) => debug!(?other, "message from the new generation"),
                    Ok(None) | Err(_) => {
                        // Gone: every offer still open stays ours.
                        reader.gone.send_replace(true);
                        lock(&reader.waiting).clear();
                        return;
                    }
                }
            }
        });
        link
    }

    fn answer(&self, id: u64, adopted: bool) {
        if let Some(tx) = lock(&self.waiting).remove(&id) {
            let _ = tx.send(adopted);
        }
    }

    /// Whether the new generation is gone (its end of the channel closed).
    pub(crate) fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Resolves once the new generation is gone.
    pub(crate) async fn gone(&self) {
        let mut rx = self.gone.subscribe();
        let _ = rx.wait_for(|gone| *gone).await;
    }

    /// Prepares a handover: offers the connection `fd` with `bytes`.
    pub(crate) async fn offer(&self, http: bool, fd: &OwnedFd, bytes: &[u8]) -> Offered {
        if self.is_gone() {
            return Offered::Lost;
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        let offer = if http {
            Message::OfferHttp(id, bytes.to_vec())
        } else {
            Message::Offer(id, bytes.to_vec())
        };
        if let Err(e) = self.channel.send_with_fd(&offer, fd.as_fd()).await {
            lock(&self.waiting).remove(&id);
            debug!(error = %e, "cannot offer the connection to the new generation");
            return Offered::Lost;
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(true)) => Offered::Prepared(id),
            Ok(Ok(false)) => Offered::Declined,
            Ok(Err(_)) => Offered::Lost,
            Err(_) => {
                lock(&self.waiting).remove(&id);
                // It may still take it: tell it not to.
                let _ = self.channel.send(&Message::Abort(id)).await;
                warn!(
                    id,
                    "the new generation did not answer a connection offer in time"
                );
                Offered::Lost
            }
        }
    }

    /// Commits a prepared handover: the connection is the new generation's.
    pub(crate) async fn commit(&self, id: u64) -> std::io::Result<()> {
        self.channel.send(&Message::Commit(id)).await
    }

    /// Aborts a prepared handover: this generation serves the connection on.
    pub(crate) async fn abort(&self, id: u64) {
        if let Err(e) = self.channel.send(&Message::Abort(id)).await {
            debug!(id, error = %e, "cannot abort a connection offer");
        }
    }

    /// The fd of the channel (for `promoted`).
    pub(crate) fn channel(&self) -> &channel::Receiver {
        &self.channel
    }
}

/// The old generation's side: the link to its successor, once there is one.
#[derive(Default)]
pub(crate) struct Successor {
    link: Mutex<Option<Arc<Link>>>,
}

impl Successor {
    pub(crate) fn set(&self, link: Arc<Link>) {
        *lock(&self.link) = Some(link);
    }

    pub(crate) fn get(&self) -> Option<Arc<Link>> {
        lock(&self.link).clone()
    }
}

// ---------------------------------------------------------------------------
// The new generation's side.

/// A connection handed over: its socket and the bytes that go with it.
pub(crate) type Adopted = (OwnedFd, Vec<u8>);

/// A `serve` on a listener: where the HTTP connections handed over on it go
/// (`None`: it runs with handoff off, and declines them).
struct Taker {
    addr: SocketAddr,
    tx: Option<mpsc::UnboundedSender<Adopted>>,
}

impl Taker {
    fn is_gone(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.is_closed())
    }
}

/// The new generation's side: connections offered, prepared and committed,
/// until the app (or `serve`) takes them.
pub(crate) struct Adoptions {
    app_tx: mpsc::UnboundedSender<Adopted>,
    app_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Adopted>>,
    /// The app asked for adoptions: its offers are prepared from then on.
    wanted: std::sync::atomic::AtomicBool,
    /// The `serve`s that take HTTP connections, by listener; bumped at each
    /// change so that a waiting offer looks again.
    takers: watch::Sender<Vec<Arc<Taker>>>,
    /// Prepared, not yet committed: where each goes once committed.
    pending: Mutex<HashMap<u64, (Adopted, mpsc::UnboundedSender<Adopted>)>>,
}

impl Default for Adoptions {
    fn default() -> Self {
        let (app_tx, app_rx) = mpsc::unbounded_channel();
        Adoptions {
            app_tx,
            app_rx: tokio::sync::Mutex::new(app_rx),
            wanted: std::sync::atomic::AtomicBool::new(false),
            takers: watch::Sender::new(Vec::new()),
            pending: Mutex::default(),
        }
    }
}

/// Whether a connection whose local address is `local` came through the
/// listener bound to `listener`.
fn same_listener(listener: SocketAddr, local: SocketAddr) -> bool {
    listener.port() == local.port()
        && (listener.ip().is_unspecified() || listener.ip() == local.ip())
}

impl Adoptions {
    /// Where an offer goes: `None` to decline it. An HTTP offer waits a
    /// little for the `serve` of its listener to start.
    async fn destination(
        &self,
        http: bool,
        fd: &OwnedFd,
    ) -> Option<mpsc::UnboundedSender<Adopted>> {
        if !http {
            return self
                .wanted
                .load(Ordering::SeqCst)
                .then(|| self.app_tx.clone());
        }
        let local = socket2::SockRef::from(fd).local_addr().ok()?.as_socket()?;
        let mut rx = self.takers.subscribe();
        let find = |takers: &Vec<Arc<Taker>>| {
            takers
                .iter()
                .find(|t| same_listener(t.addr, local) && !t.is_gone())
                .map(|t| t.tx.clone())
        };
        let wait = async {
            loop {
                if let Some(tx) = find(&rx.borrow_and_update()) {
                    return tx;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(SERVE_START_WAIT, wait)
            .await
            .ok()
            .flatten()
    }

    /// An offer from the previous generation: prepared (held until its
    /// commit) or declined. Returns the answer to send.
    pub(crate) async fn offer(
        &self,
        id: u64,
        http: bool,
        fd: Option<OwnedFd>,
        bytes: Vec<u8>,
    ) -> Message {
        let Some(fd) = fd else {
            return Message::Declined(id);
        };
        match self.destination(http, &fd).await {
            Some(tx) => {
                lock(&self.pending).insert(id, ((fd, bytes), tx));
                debug!(id, http, "connection offer prepared");
                Message::Adopted(id)
            }
            None => {
                debug!(id, http, "connection offer declined: nothing here takes it");
                Message::Declined(id)
            }
        }
    }

    /// The previous generation let go of `id`: it is ours to serve.
    pub(crate) fn commit(&self, id: u64) {
        if let Some((adopted, tx)) = lock(&self.pending).remove(&id) {
            // A taker that is gone (its `serve` ended) drops it: closed.
            let _ = tx.send(adopted);
        }
    }

    /// The previous generation serves `id` on: our copy closes.
    pub(crate) fn abort(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    /// The previous generation is gone: what it prepared and did not commit
    /// is only here now, so it is served here.
    pub(crate) fn orphaned(&self) {
        let pending: Vec<_> = lock(&self.pending).drain().collect();
        if !pending.is_empty() {
            warn!(
                connections = pending.len(),
                "the previous generation went away during a handover: serving its connections here"
            );
        }
        for (_, (adopted, tx)) in pending {
            let _ = tx.send(adopted);
        }
    }

    /// Registers a `serve` on the listener bound to `addr`: HTTP offers for
    /// it are prepared from now on, and committed ones come out of the
    /// receiver.
    pub(crate) fn take_http(&self, addr: SocketAddr) -> mpsc::UnboundedReceiver<Adopted> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.register(addr, Some(tx));
        rx
    }

    /// Registers a `serve` with handoff off on the listener bound to `addr`:
    /// HTTP offers for it are declined at once.
    pub(crate) fn decline_http(&self, addr: SocketAddr) {
        self.register(addr, None);
    }

    fn register(&self, addr: SocketAddr, tx: Option<mpsc::UnboundedSender<Adopted>>) {
        self.takers.send_modify(|takers| {
            takers.retain(|t| !t.is_gone());
            takers.push(Arc::new(Taker { addr, tx }));
        });
    }
}

impl Handover {
    /// Hands a live TCP connection, with `state` (the app's bytes for it: a
    /// counter, a session, bytes read but not parsed yet; up to about
    /// 60 KiB), to the generation that replaced this one. Call it at a
    /// message boundary, once [`stopping`](Handover::stopping) said
    /// [`Stop::Upgraded`](crate::Stop::Upgraded), and do not read from the
    /// stream meanwhile.
    ///
    /// `Ok` once the new generation has it (prepared, then committed): this
    /// generation must forget the connection (the stream is closed here; the
    /// client sees nothing). `Err` gives the stream back when nobody took it
    /// (no new generation, it does not [`adopt`](Handover::adopt), it
    /// declined, it died, or it did not answer in 5 s): serve it on, or close
    /// it as usual.
    pub async fn hand_over(
        &self,
        stream: tokio::net::TcpStream,
        state: &[u8],
    ) -> Result<(), tokio::net::TcpStream> {
        let Some(link) = self.inner.successor.get() else {
            return Err(stream);
        };
        let Ok(std) = stream.into_std() else {
            // into_std fails only when deregistering fails: nothing to give back.
            warn!("cannot take the connection out of the runtime to hand it over");
            return Ok(());
        };
        let fd = OwnedFd::from(std);
        let back = |fd: OwnedFd| {
            let std = std::net::TcpStream::from(fd);
            tokio::net::TcpStream::from_std(std).map_err(|e| {
                warn!(error = %e, "cannot serve a connection that was not handed over");
            })
        };
        match link.offer(false, &fd, state).await {
            Offered::Prepared(id) => match link.commit(id).await {
                Ok(()) => {
                    debug!(id, "connection handed over");
                    Ok(())
                }
                Err(e) => {
                    debug!(id, error = %e, "cannot commit a handover: serving the connection on");
                    back(fd).map_or(Ok(()), Err)
                }
            },
            Offered::Declined => back(fd).map_or(Ok(()), Err),
            Offered::Lost => {
                warn!("the new generation did not take the connection: serving it on");
                back(fd).map_or(Ok(()), Err)
            }
        }
    }

    /// Says that this generation takes the live connections the previous
    /// one hands over with [`hand_over`](Handover::hand_over). Call it before
    /// [`ready`](Handover::ready): offers come as soon as this generation is
    /// promoted, and until this is called they are declined (the previous
    /// generation then keeps them). [`adopt`](Handover::adopt) calls it too.
    /// (`serve` takes its HTTP connections by itself.)
    pub fn adopt_connections(&self) {
        self.inner.adoptions.wanted.store(true, Ordering::SeqCst);
    }

    /// The next live connection the previous generation handed over (see
    /// [`hand_over`](Handover::hand_over)), with its state; `None` once this
    /// generation stops. Offers are taken only once the app has said it
    /// takes them ([`adopt_connections`](Handover::adopt_connections), or
    /// this call): an app that never adopts declines them, and the previous
    /// generation keeps its connections. Cancel-safe.
    pub async fn adopt(&self) -> Option<std::io::Result<(tokio::net::TcpStream, Vec<u8>)>> {
        let adoptions = &self.inner.adoptions;
        adoptions.wanted.store(true, Ordering::SeqCst);
        let watch = self.watch();
        let mut rx = adoptions.app_rx.lock().await;
        tokio::select! {
            taken = rx.recv() => {
                let (fd, state) = taken?;
                let adopted = adopt_fd(fd);
                if let Ok(stream) = &adopted {
                    self.inner.counters.adopted();
                    info!(peer = ?stream.peer_addr().ok(), "connection adopted from the previous generation");
                }
                Some(adopted.map(|stream| (stream, state)))
            }
            _ = watch.stopping() => None,
        }
    }
}

/// A received socket as a Tokio stream (checked, non-blocking).
pub(crate) fn adopt_fd(fd: OwnedFd) -> std::io::Result<tokio::net::TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    std.peer_addr()?;
    tokio::net::TcpStream::from_std(std)
}

// ---------------------------------------------------------------------------
// The old generation's `serve` connections, collected for a handover.

/// Where the connections of `serve` are in an upgrade.
#[derive(Clone, Default)]
pub(crate) enum Phase {
    /// No upgrade wants them.
    #[default]
    Idle,
    /// A new generation is ready (maybe on probation): connections are kept
    /// open for the handover to come, not wound down.
    Holding,
    /// Handing over: each connection, once idle, submits itself.
    Collecting(Arc<Batch>),
}

/// A connection submitted for the handover, and where its outcome goes:
/// `Ok` once the new generation has it, its socket back otherwise.
pub(crate) struct Submission {
    pub(crate) fd: OwnedFd,
    pub(crate) bytes: Vec<u8>,
    pub(crate) outcome: oneshot::Sender<Result<(), Adopted>>,
}

/// One handover of `serve` connections.
pub(crate) struct Batch {
    tx: mpsc::UnboundedSender<Submission>,
}

impl Batch {
    /// Submits a connection; gives it back when the batch is closed.
    pub(crate) fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.tx.send(submission).map_err(|e| e.0)
    }
}

/// The movable connections of this generation's `serve`s, and the handover
/// they take part in.
pub(crate) struct Moves {
    phase: watch::Sender<Phase>,
    /// Movable connections open (an HTTP/1 connection, or one whose protocol
    /// is not known yet) that have not submitted themselves.
    tickets: watch::Sender<usize>,
    /// `serve`s running with handoff on.
    serves: watch::Sender<usize>,
    /// How long a handover waits for busy connections to become idle before
    /// it commits what it has: the longest idle grace of the `serve`s (a
    /// connection busy for longer, a slow response or a stream, stays and is
    /// wound down as without handoff).
    window: Mutex<Duration>,
}

impl Default for Moves {
    fn default() -> Self {
        Moves {
            phase: watch::Sender::new(Phase::Idle),
            tickets: watch::Sender::new(0),
            serves: watch::Sender::new(0),
            window: Mutex::new(Duration::ZERO),
        }
    }
}

/// A movable connection, counted until it submits itself or ends.
pub(crate) struct Ticket {
    tickets: watch::Sender<usize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.tickets.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A `serve` with handoff on, counted while it runs.
pub(crate) struct ServeRegistration {
    serves: watch::Sender<usize>,
}

impl Drop for ServeRegistration {
    fn drop(&mut self) {
        self.serves.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Ends the holding of connections when dropped (the upgrade is over, or
/// failed before the handover).
pub(crate) struct Hold<'a> {
    moves: &'a Moves,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.moves.phase.send_replace(Phase::Idle);
    }
}

/// Resolves once no movable connection is left to submit itself.
async fn all_submitted(tickets: &mut watch::Receiver<usize>) {
    loop {
        let left = *tickets.borrow_and_update();
        if left == 0 || tickets.changed().await.is_err() {
            return;
        }
    }
}

/// What a handover of `serve` connections came to.
#[derive(Debug, Default)]
pub(crate) struct Transferred {
    pub(crate) moved: usize,
    pub(crate) declined: usize,
    /// Submitted, but the new generation went away or did not answer: back
    /// with this generation.
    pub(crate) lost: usize,
    /// Still busy at the end of the collection window.
    pub(crate) busy: usize,
    pub(crate) took: Duration,
}

impl Moves {
    /// The phase, for connections to follow.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A movable connection opens.
    pub(crate) fn ticket(&self) -> Ticket {
        self.tickets.send_modify(|n| *n += 1);
        Ticket {
            tickets: self.tickets.clone(),
        }
    }

    /// A `serve` with handoff on starts; `grace`: its idle grace.
    pub(crate) fn register_serve(&self, grace: Duration) -> ServeRegistration {
        {
            let mut window = lock(&self.window);
            *window = (*window).max(grace);
        }
        self.serves.send_modify(|n| *n += 1);
        ServeRegistration {
            serves: self.serves.clone(),
        }
    }

    /// Whether any `serve` here hands its connections over.
    pub(crate) fn wanted(&self) -> bool {
        *self.serves.borrow() > 0
    }

    /// Keeps connections open for a handover until the guard drops.
    pub(crate) fn hold(&self) -> Hold<'_> {
        self.phase.send_replace(Phase::Holding);
        Hold { moves: self }
    }

    /// Hands every movable connection over to the generation at the end of
    /// `link`: each submits itself once idle (within the window), is
    /// offered, and once all have been answered the prepared ones are
    /// committed. If the new generation goes away before the commit, every
    /// connection stays here and this returns `Err` (the upgrade failed).
    pub(crate) async fn transfer(&self, link: &Link) -> Result<Transferred, Transferred> {
        let started = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<Submission>();
        self.phase
            .send_replace(Phase::Collecting(Arc::new(Batch { tx })));
        let mut report = Transferred::default();
        let mut prepared: Vec<(u64, Submission)> = Vec::new();
        let mut refused: Vec<Submission> = Vec::new();
        let mut tickets = self.tickets.subscribe();
        let window = *lock(&self.window);
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        let mut lost = false;
        // Offers are answered in turn: each waits for its answer before the
        // next goes (a round trip of some 20 µs between two processes).
        let mut collecting = true;
        loop {
            let event = if collecting {
                tokio::select! {
                    biased;
                    submission = rx.recv() => submission,
                    () = all_submitted(&mut tickets) => {
                        // Every movable connection has submitted itself (or
                        // ended): take what is queued, then stop.
                        collecting = false;
                        continue;
                    }
                    () = &mut deadline => {
                        report.busy = *self.tickets.borrow();
                        collecting = false;
                        continue;
                    }
                    () = link.gone() => {
                        // No commit can come now: every connection stays.
                        lost = true;
                        collecting = false;
                        continue;
                    }
                }
            } else {
                // No more submissions: the rest of the queue, then the end.
                self.phase.send_replace(Phase::Holding);
                rx.close();
                rx.recv().await
            };
            let Some(submission) = event else { break };
            if lost {
                refused.push(submission);
                continue;
            }
            if report.declined > 0 {
                // It takes no HTTP connection (handoff off, or no `serve` on
                // this listener): each offer would wait for a `serve` to
                // start there, so the rest stay without asking.
                report.declined += 1;
                refused.push(submission);
                continue;
            }
            // Offers are answered in turn (a round trip of some tens of µs
            // between two processes).
            match link.offer(true, &submission.fd, &submission.bytes).await {
                Offered::Prepared(id) => prepared.push((id, submission)),
                Offered::Declined => {
                    report.declined += 1;
                    refused.push(submission);
                }
                Offered::Lost => {
                    lost = true;
                    refused.push(submission);
                }
            }
        }
        if !lost && link.is_gone() {
            lost = true;
        }
        if !lost {
            for (id, submission) in prepared.drain(..) {
                match link.commit(id).await {
                    Ok(()) => {
                        report.moved += 1;
                        let _ = submission.outcome.send(Ok(()));
                    }
                    Err(e) => {
                        // Gone at the commit: whatever it held stays here.
                        debug!(id, error = %e, "cannot commit a handover");
                        lost = true;
                        refused.push(submission);
                    }
                }
            }
        } else {
            for (id, submission) in prepared.drain(..) {
                link.abort(id).await;
                refused.push(submission);
            }
        }
        if lost {
            report.lost = refused.len() - report.declined;
        }
        for s in refused {
            let _ = s.outcome.send(Err((s.fd, s.bytes)));
        }
        report.took = started.elapsed();
        self.phase.send_replace(Phase::Idle);
        if lost {
            Err(report)
        } else {
            info!(
                moved = report.moved,
                declined = report.declined,
                busy = report.busy,
                took_us = report.took.as_micros() as u64,
                "connections handed to the new generation"
            );
            Ok(report)
        }
    }
}
