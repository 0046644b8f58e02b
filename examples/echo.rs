//! A line echo server over raw TCP (or a Unix socket) that upgrades itself on SIGHUP and
//! hands its open TCP sessions to the new generation: clients never reconnect.
//!
//! ```text
//! cargo run --example echo -- 127.0.0.1:7000   # or a path: /run/echo.sock
//! nc 127.0.0.1 7000     # each line comes back as "<pid> <n>: <line>"
//! kill -HUP <pid>       # new generation: the same connection goes on, <pid> changes, <n> counts on
//! ```
//!
//! `<n>` counts the lines of the session since it opened, across generations: at an upgrade,
//! each TCP session, at a line boundary, is handed to the new generation
//! (`Handover::hand_over`) with its count and the bytes it had read but not answered yet, and
//! the new generation adopts it (`Handover::adopt`). A session the new generation does not
//! take (`--no-adopt` makes a release that takes none), and every Unix session, says `bye`
//! and closes: its client reconnects and lands on the
//! new generation.

use std::net::SocketAddr;

use handover::{Handover, Options, Stop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where to listen: `IP:PORT`, or a path for a Unix socket.
enum Listen {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `--no-adopt` (anywhere): take no session over (a release that declines
    // them: the previous generation then keeps its sessions, says bye).
    let no_adopt = std::env::args().any(|a| a == "--no-adopt");
    let arg = std::env::args()
        .skip(1)
        .find(|a| a != "--no-adopt")
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned());
    let listen = if arg.starts_with('/') {
        Listen::Unix(arg.into())
    } else {
        Listen::Tcp(arg.parse()?)
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let handover = Handover::new(Options::default())?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let watch = handover.watch();
        let listener = match &listen {
            Listen::Tcp(addr) => {
                let listener = handover.tcp("echo", *addr)?;
                if !no_adopt {
                    // Before ready: offers come as soon as we are promoted.
                    handover.adopt_connections();
                }
                // Sessions the previous generation hands over.
                let h = handover.clone();
                tokio::spawn(async move {
                    if no_adopt {
                        return;
                    }
                    while let Some(adopted) = h.adopt().await {
                        let Ok((stream, state)) = adopted else {
                            continue;
                        };
                        let (count, pending) = Session::<tokio::net::TcpStream>::decode(&state);
                        let session = Session {
                            stream,
                            count,
                            pending,
                        };
                        tokio::spawn(h.watch().track(session.run(h.clone())));
                    }
                });
                Either::Tcp(listener)
            }
            // The path survives upgrades and is removed on a final stop.
            Listen::Unix(path) => Either::Unix(handover.unix("echo", path)?),
        };
        handover.ready()?;
        println!(
            "ready pid={} generation={} addr={}",
            std::process::id(),
            handover.generation(),
            listener.describe()
        );
        loop {
            match &listener {
                Either::Tcp(l) => match l.accept().await {
                    Some(Ok((stream, _))) => {
                        let session = Session::new(stream);
                        tokio::spawn(watch.track(session.run(handover.clone())));
                    }
                    Some(Err(_)) => continue,
                    None => break,
                },
                Either::Unix(l) => match l.accept().await {
                    Some(Ok((stream, _))) => {
                        let session = Session::new(stream);
                        tokio::spawn(watch.track(session.run(handover.clone())));
                    }
                    Some(Err(_)) => continue,
                    None => break,
                },
            }
        }
        drop(listener);
        handover.drain().await;
        Ok(())
    })
}

enum Either {
    Tcp(handover::Listener<tokio::net::TcpListener>),
    Unix(handover::Listener<tokio::net::UnixListener>),
}

impl Either {
    fn describe(&self) -> String {
        match self {
            Either::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Either::Unix(l) => l.local_addr().map(|a| {
                a.as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            }),
        }
        .unwrap_or_default()
    }
}

/// A stream a session runs on, and whether it can move to the next generation.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sized + 'static {
    /// Hands the stream to the next generation; gives it back if nobody took it.
    fn hand_over(
        self,
        handover: &Handover,
        state: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), Self>> + Send;
}

impl Conn for tokio::net::TcpStream {
    async fn hand_over(self, handover: &Handover, state: Vec<u8>) -> Result<(), Self> {
        handover.hand_over(self, &state).await
    }
}

impl Conn for tokio::net::UnixStream {
    async fn hand_over(self, _: &Handover, _: Vec<u8>) -> Result<(), Self> {
        Err(self)
    }
}

/// One client: its stream, the lines answered so far, the bytes read but not answered.
struct Session<C> {
    stream: C,
    count: u64,
    pending: Vec<u8>,
}

impl<C: Conn> Session<C> {
    fn new(stream: C) -> Self {
        Session {
            stream,
            count: 0,
            pending: Vec::new(),
        }
    }

    /// What travels with the session: the count, then the pending bytes.
    fn encode(&self) -> Vec<u8> {
        let mut state = self.count.to_be_bytes().to_vec();
        state.extend_from_slice(&self.pending);
        state
    }

    fn decode(state: &[u8]) -> (u64, Vec<u8>) {
        match state.split_first_chunk::<8>() {
            Some((count, pending)) => (u64::from_be_bytes(*count), pending.to_vec()),
            None => (0, Vec::new()),
        }
    }

    /// Echoes lines as `<pid> <n>: <line>` until EOF; on an upgrade, at a line boundary,
    /// moves to the new generation, or says `bye` and closes.
    async fn run(mut self, handover: Handover) {
        let pid = std::process::id();
        let watch = handover.watch();
        let mut buf = [0u8; 4096];
        loop {
            // Answer every complete line already read.
            while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                self.count += 1;
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                let reply = format!("{pid} {}: {text}\n", self.count);
                if self.stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                read = self.stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                },
                stop = watch.stopping() => {
                    let state = self.encode();
                    let mut stream = self.stream;
                    if matches!(stop, Stop::Upgraded(_)) {
                        match stream.hand_over(&handover, state).await {
                            Ok(()) => return,
                            Err(back) => stream = back,
                        }
                    }
                    let _ = stream.write_all(b"bye\n").await;
                    return;
                }
            }
        }
    }
}
