//! [`Listener`]: a listener of this generation whose `accept` follows the
//! lifecycle: it waits while the generation is parked (a new generation is
//! on probation) and ends once the generation stops, so that an accept loop
//! needs no `select!` on the stop signal and pauses without being rewritten.

use std::io;
use std::ops::Deref;

use crate::drain::Watch;

/// A listener handed out by [`Handover::tcp`](crate::Handover::tcp) or
/// [`Handover::unix`](crate::Handover::unix).
///
/// [`accept`](Listener::accept) returns `None` once this generation stops
/// (a new generation is serving, or a final stop), waits while it is parked,
/// and otherwise accepts as the wrapped Tokio listener does. Everything else
/// of the Tokio listener (`local_addr`, ...) is reachable through `Deref`.
///
/// ```no_run
/// # async fn f(handover: handover::Handover) -> std::io::Result<()> {
/// let listener = handover.tcp("http", "127.0.0.1:8080".parse().unwrap()).unwrap();
/// while let Some(conn) = listener.accept().await {
///     let (stream, peer) = conn?;
///     // serve `stream`
/// }
/// // stopping: drain
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Listener<L> {
    inner: L,
    watch: Watch,
}

impl<L> Listener<L> {
    pub(crate) fn new(inner: L, watch: Watch) -> Self {
        Listener { inner, watch }
    }

    /// The Tokio listener, to accept regardless of the lifecycle.
    pub fn into_inner(self) -> L {
        self.inner
    }

    /// The Tokio listener.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }
}

impl<L> Deref for Listener<L> {
    type Target = L;

    fn deref(&self) -> &L {
        &self.inner
    }
}

/// A Tokio listener that [`Listener`] can wrap.
#[allow(async_fn_in_trait)]
pub trait Accept {
    /// The accepted connection and its peer's address.
    type Conn;
    /// Accepts one connection (cancel-safe).
    async fn accept_one(&self) -> io::Result<Self::Conn>;
}

impl Accept for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);

    async fn accept_one(&self) -> io::Result<Self::Conn> {
        self.accept().await
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = (tokio::net::UnixStream, tokio::net::unix::SocketAddr);

    async fn accept_one(&self) -> io::Result<Self::Conn> {
        self.accept().await
    }
}

impl<L: Accept> Listener<L> {
    /// The next connection; `None` once this generation stops. While it is
    /// parked this waits (connections queue in the shared socket and go to
    /// the new generation); after a rollback it accepts again. Cancel-safe.
    ///
    /// An error is the listener's (`EMFILE` and the like): the connection
    /// stays queued; back off a little and call again.
    pub async fn accept(&self) -> Option<io::Result<L::Conn>> {
        loop {
            if !self.watch.accepting().await {
                return None;
            }
            tokio::select! {
                // A connection the kernel already queued is taken before a
                // park or stop that comes at the same time: it is served.
                biased;
                conn = self.inner.accept_one() => return Some(conn),
                () = self.watch.winding_down() => continue,
            }
        }
    }
}
