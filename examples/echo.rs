//! A line echo server over raw TCP that upgrades itself on SIGHUP.
//!
//! ```text
//! cargo run --example echo -- 127.0.0.1:7000
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned())
        .parse()?;
    let handover = Handover::new(Options::default())?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = handover.tcp("echo", addr)?;
        handover.ready()?;
        println!(
            "ready pid={} generation={} addr={}",
            std::process::id(),
            handover.generation(),
            listener.local_addr()?
        );
        let watch = handover.watch();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let session_watch = watch.clone();
                    tokio::spawn(watch.track(async move {
                        let (read, mut write) = stream.into_split();
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
                                _ = session_watch.stopping() => {
                                    let _ = write.write_all(b"bye\n").await;
                                    return;
                                }
                            }
                        }
                    }));
                }
                _ = handover.stopping() => break,
            }
        }
        drop(listener);
        handover.drain().await;
        Ok(())
    })
}
