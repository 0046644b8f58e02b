//! The README's first example, verbatim below this comment (`tests/readme.rs` checks that the
//! two are the same and counts the lines that are handover's): an axum app served by
//! `handover::serve::axum`, which upgrades itself on SIGHUP and drains on SIGTERM.
//!
//! ```text
//! cargo run --example hello_axum
//! curl localhost:8080/   # hello
//! ```

use axum::{routing::get, Router};
use handover::{Handover, Options};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = Router::new().route("/", get(|| async { "hello\n" }));
    let handover = Handover::new(Options::default())?; // reads LISTEN_FDS & co.
    let listener = handover.tcp("http", "127.0.0.1:8080".parse()?)?; // inherited or bound
    handover.ready()?; // the previous generation, if any, now stops accepting
    handover::serve::axum(&handover, listener, app).await; // until replaced or SIGTERM, then drains
    Ok(())
}
