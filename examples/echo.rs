//! A line echo server over raw TCP that upgrades itself on SIGHUP.
//!
//! ```text
//! cargo run --example echo -- 127.0.0.1:7000   # or a path: /run/echo.sock
//! nc 127.0.0.1 7000     # each line comes back, prefixed by the serving pid
//! kill -HUP <pid>       # new generation; open sessions finish their line and close
//! ```
//!
//! Long-lived connections never end by themselves, so on stop each session
//! answers the line it is reading, says `bye`, and closes: a client then
//! reconnects and lands on the new generation.

use std::net::SocketAddr;

use handover::{Handover, Options};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where to listen: `IP:PORT`, or a path for a Unix socket.
enum Listen {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned());
    let listen = if arg.starts_with('/') {
        Listen::Unix(arg.into())
    } else {
        Listen::Tcp(arg.parse()?)
    };
    let handover = Handover::new(Options::default())?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = match &listen {
            Listen::Tcp(addr) => Either::Tcp(handover.tcp("echo", *addr)?),
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
        let watch = handover.watch();
        while let Some(accepted) = listener.accept().await {
            let Ok(stream) = accepted else { continue };
            tokio::spawn(watch.track(session(stream, watch.clone())));
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

type Stream = Box<dyn AsyncReadWrite>;
trait AsyncReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

impl Either {
    /// The next connection; `None` once this generation stops.
    async fn accept(&self) -> Option<std::io::Result<Stream>> {
        Some(match self {
            Either::Tcp(l) => l.accept().await?.map(|(s, _)| Box::new(s) as Stream),
            Either::Unix(l) => l.accept().await?.map(|(s, _)| Box::new(s) as Stream),
        })
    }

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

/// Echoes lines, prefixed by our pid, until EOF or the stop signal.
async fn session(stream: Stream, watch: handover::Watch) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let pid = std::process::id();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    let reply = format!("{pid}: {line}\n");
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            _ = watch.stopping() => {
                let _ = write.write_all(b"bye\n").await;
                return;
            }
        }
    }
}
