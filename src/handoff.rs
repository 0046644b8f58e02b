//! Live connections handed to the next generation, so that their clients
//! never reconnect: [`Handover::hand_over`] in the old generation,
//! [`Handover::adopt`] in the new one.
//!
//! A transaction per connection over the control channel between the two
//! generations: the old one sends `offer <id> <state>` with the socket's fd
//! (`SCM_RIGHTS`) and keeps its own copy; the new one answers `adopted <id>`
//! once the connection is in its hands (commit: the old one lets go) or
//! `declined <id>` (abort: the old one serves on). Without an answer (the new
//! generation died mid-way, or never adopts) the old one keeps the
//! connection, so a failure in the middle loses nothing.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::channel::{self, Message};
use crate::handover::{lock, Handover};

/// How long the old generation waits for the new one to answer an offer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The old generation's side: the channel to its successor, and the offers
/// waiting for an answer.
#[derive(Default)]
pub(crate) struct Successor {
    channel: Mutex<Option<Arc<channel::Receiver>>>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>>,
    next_id: AtomicU64,
}

/// The new generation's side: connections offered and committed, until the
/// app adopts them.
pub(crate) struct Adoptions {
    tx: mpsc::UnboundedSender<(OwnedFd, Vec<u8>)>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(OwnedFd, Vec<u8>)>>,
    /// The app asked for adoptions: offers are accepted from then on.
    wanted: std::sync::atomic::AtomicBool,
}

impl Default for Adoptions {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Adoptions {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            wanted: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Successor {
    /// Keeps the channel to the generation that just took over, and reads
    /// its answers.
    pub(crate) fn attach(&self, channel: channel::Receiver) {
        let channel = Arc::new(channel);
        *lock(&self.channel) = Some(channel.clone());
        let waiting = self.waiting.clone();
        tokio::spawn(async move {
            loop {
                match channel.recv().await {
                    Ok(Some(Message::Adopted(id))) => answer(&waiting, id, true),
                    Ok(Some(Message::Declined(id))) => answer(&waiting, id, false),
                    Ok(Some(other)) => debug!(?other, "message from the new generation"),
                    Ok(None) | Err(_) => {
                        // Gone: every offer still open stays ours.
                        lock(&waiting).clear();
                        return;
                    }
                }
            }
        });
    }
}

fn answer(waiting: &Mutex<HashMap<u64, oneshot::Sender<bool>>>, id: u64, adopted: bool) {
    if let Some(tx) = lock(waiting).remove(&id) {
        let _ = tx.send(adopted);
    }
}

impl Adoptions {
    /// An offer from the previous generation: committed when the app adopts
    /// connections, declined otherwise. Returns the answer to send.
    pub(crate) fn offer(&self, id: u64, fd: Option<OwnedFd>, state: Vec<u8>) -> Message {
        match fd {
            Some(fd) if self.wanted.load(Ordering::SeqCst) => {
                if self.tx.send((fd, state)).is_ok() {
                    Message::Adopted(id)
                } else {
                    Message::Declined(id)
                }
            }
            _ => Message::Declined(id),
        }
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
    /// `Ok` once the new generation has it: this generation must forget the
    /// connection (the stream is closed here; the client sees nothing).
    /// `Err` gives the stream back when nobody took it (no new generation,
    /// it does not [`adopt`](Handover::adopt), it declined, it died, or it
    /// did not answer in 5 s): serve it on, or close it as usual.
    pub async fn hand_over(
        &self,
        stream: tokio::net::TcpStream,
        state: &[u8],
    ) -> Result<(), tokio::net::TcpStream> {
        let successor = &self.inner.successor;
        let Some(channel) = lock(&successor.channel).clone() else {
            return Err(stream);
        };
        let id = successor.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        lock(&successor.waiting).insert(id, tx);
        let offer = Message::Offer(id, state.to_vec());
        if let Err(e) = channel::send_with_fd(channel.as_fd(), &offer, stream.as_fd()) {
            lock(&successor.waiting).remove(&id);
            debug!(error = %e, "cannot offer the connection to the new generation");
            return Err(stream);
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(true)) => {
                debug!(id, "connection handed over");
                Ok(())
            }
            Ok(Ok(false)) => Err(stream),
            Ok(Err(_)) => {
                warn!(
                    id,
                    "the new generation went away during a handover: serving the connection on"
                );
                Err(stream)
            }
            Err(_) => {
                lock(&successor.waiting).remove(&id);
                warn!(
                    id,
                    "the new generation did not answer a handover: serving the connection on"
                );
                Err(stream)
            }
        }
    }

    /// Says that this generation takes the live connections the previous
    /// one hands over. Call it before [`ready`](Handover::ready): offers
    /// come as soon as this generation is promoted, and until this is called
    /// they are declined (the previous generation then keeps them).
    /// [`adopt`](Handover::adopt) calls it too.
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
        let mut rx = adoptions.rx.lock().await;
        tokio::select! {
            taken = rx.recv() => {
                let (fd, state) = taken?;
                Some(adopt_fd(fd).map(|stream| (stream, state)))
            }
            _ = watch.stopping() => None,
        }
    }
}

/// A received socket as a Tokio stream (checked, non-blocking).
fn adopt_fd(fd: OwnedFd) -> std::io::Result<tokio::net::TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    std.peer_addr()?;
    let stream = tokio::net::TcpStream::from_std(std)?;
    info!(peer = ?stream.peer_addr().ok(), "connection adopted from the previous generation");
    Ok(stream)
}
