//! Zero-downtime upgrades for network servers.
//!
//! `handover` lets a server replace itself with the version now on disk
//! without refusing or resetting a single connection. On SIGHUP it starts the
//! new binary beside the running one and hands it the very same listening
//! sockets (fd inheritance, so the kernel's accept queue is shared and
//! nothing queued is lost). Traffic moves once the new generation says it is
//! ready; the old one then stops accepting, finishes its in-flight work and
//! exits. If the new one crashes, hangs or cannot start, the old one simply
//! keeps serving.
//!
//! ```
//! use handover::{Handover, Options};
//! use tokio::io::AsyncWriteExt;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let handover = Handover::new(Options::default())?; // what a previous generation passed
//!     let listener = handover.tcp("echo", "127.0.0.1:0".parse()?)?; // inherited or bound
//!     handover.ready()?; // the previous generation, if any, now drains
//!     # handover.shutdown(); // (so that this doc test ends at once)
//!     let watch = handover.watch();
//!     // `accept` ends once this generation stops (upgraded, or SIGTERM).
//!     while let Some(conn) = listener.accept().await {
//!         let (mut stream, _) = conn?;
//!         tokio::spawn(watch.track(async move {
//!             let _ = stream.write_all(b"hello\n").await;
//!         }));
//!     }
//!     let report = handover.drain().await; // in-flight work, up to the drain timeout
//!     assert!(report.completed);
//!     Ok(())
//! }
//! ```
//!
//! The crate speaks systemd's socket activation (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`) and `sd_notify` (`READY=1`, `MAINPID=`,
//! `STOPPING=1`), so the same binary also runs under systemd socket units and
//! under the `handover run` container entrypoint. See the README for the
//! protocol, systemd unit files and limitations.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_os = "linux"))]
compile_error!("handover supports Linux only (it relies on pidfds, SCM_CREDENTIALS and /proc)");

mod channel;
mod drain;
mod environment;
mod error;
mod handoff;
mod handover;
mod health;
mod lifecycle;
mod listen;
mod listener;
mod metrics;
mod notify;
mod options;
mod pidfile;
mod probation;
mod protocol;
#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub mod serve;
mod signals;
mod state;
mod supervisor;
mod sys;
#[cfg(feature = "testkit")]
pub mod testkit;
mod upgrade;

pub use crate::drain::{DrainReport, Graceful, Guard, Stop, Tracked, TrackedStream, Watch};
pub use crate::error::{Error, Result};
pub use crate::handover::Handover;
pub use crate::listener::{Accept, Listener};
pub use crate::metrics::{Metrics, Summary};
pub use crate::options::Options;
pub use crate::upgrade::Upgraded;
/// The signal type of the API ([`Options::upgrade_signal`],
/// [`Options::stop_signals`], the test kit): nix's, re-exported.
pub use nix::sys::signal::Signal;

/// The `handover` binary's entry point (`src/bin/handover.rs` calls it with
/// the arguments after the program name). Not an API.
#[doc(hidden)]
pub use crate::supervisor::main as __main;
