//! App state handed over across upgrades (`Options::handoff_state`).
//!
//! ```text
//! cargo run --example state_counter -- --listen 127.0.0.1:7100
//! nc 127.0.0.1 7100     # count=1 generation=1
//! kill -HUP <pid>       # the counter moves to the new generation
//! nc 127.0.0.1 7100     # count=2 generation=2
//! ```
//!
//! Every connection gets `count=<n> generation=<g> state_bytes=<b>` and is closed; `n`
//! counts connections since the first generation. At an upgrade the counter (and
//! `--pad-mib N` MiB of padding, to show a large state) goes to the new generation as
//! `v1 <count>\n<padding>`: the version first, so that a later release can tell the layout.
//! Prints `ready pid=<pid> generation=<n> addr=<addr>` once ready.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use handover::{Handover, Options};
use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (mut listen, mut pad_mib) = ("127.0.0.1:7100".to_owned(), 0usize);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs a value")?,
            "--pad-mib" => pad_mib = args.next().ok_or("--pad-mib needs a value")?.parse()?,
            other => return Err(format!("unknown option {other:?}").into()),
        }
    }
    let count = Arc::new(AtomicU64::new(0));
    let provided = count.clone();
    let handover = Handover::new(Options::default().handoff_state(move || {
        let mut blob = format!("v1 {}\n", provided.load(Ordering::SeqCst)).into_bytes();
        blob.resize(blob.len() + pad_mib * (1 << 20), b'.');
        blob
    }))?;
    // Version 1 of our own layout: "v1 <count>\n" and padding.
    let taken = handover.take_state();
    let state_bytes = taken.as_ref().map_or(0, Vec::len);
    if let Some(n) = taken.as_deref().and_then(|blob| {
        let line = blob.split(|b| *b == b'\n').next()?;
        std::str::from_utf8(line)
            .ok()?
            .strip_prefix("v1 ")?
            .parse()
            .ok()
    }) {
        count.store(n, Ordering::SeqCst);
    }
    let listener = handover.tcp("counter", listen.parse()?)?;
    handover.ready()?;
    println!(
        "ready pid={} generation={} addr={}",
        std::process::id(),
        handover.generation(),
        listener.local_addr()?
    );
    let generation = handover.generation();
    while let Some(conn) = listener.accept().await {
        let Ok((mut stream, _)) = conn else { continue };
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        let line = format!("count={n} generation={generation} state_bytes={state_bytes}\n");
        let _ = stream.write_all(line.as_bytes()).await;
    }
    handover.drain().await;
    Ok(())
}
