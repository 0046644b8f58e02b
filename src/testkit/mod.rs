//! A test kit to check "zero failed requests across N upgrades" in a server's own CI
//! (cargo feature `testkit`).
//!
//! [`check_upgrades`] starts a server command, runs HTTP/1.1 load against it (persistent
//! connections and a connection per request, side by side), sends it N upgrade signals one
//! after another, and reports every failed request by class: refused, reset, EOF before the
//! response, timeout, non-2xx status, other. Nothing is retried, so one dropped request shows.
//!
//! ```no_run
//! use std::process::Command;
//! use handover::testkit::{check_upgrades, UpgradeCheck};
//!
//! #[test]
//! fn zero_failed_requests_across_upgrades() -> Result<(), handover::testkit::Error> {
//!     let mut server = Command::new(env!("CARGO_BIN_EXE_my_server"));
//!     server.args(["--listen", "127.0.0.1:0"]);
//!     let report = check_upgrades(server, UpgradeCheck::new(10))?;
//!     assert!(report.passed(), "{report}");
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! The server says it is ready by printing `ready pid=<pid> generation=<n> addr=<ip:port>` on
//! stdout (each generation; the crate's examples do), or, with [`Readiness::Connect`], it is
//! probed by connecting. A supervisor (`handover run`) is checked with [`Target::Started`].
//!
//! The parts are usable on their own: [`Load`] (the load client), [`Server`] (a process
//! group with its ready lines, killed and reaped on drop), [`get`] (one request), the `/proc`
//! helpers ([`zombies`], [`fd_count`], [`all_processes`], ...) and [`poll_until`] (a bounded
//! wait that says what it waited for).
//!
//! ```toml
//! [dev-dependencies]
//! handover = { version = "0.1", features = ["testkit"] }
//! ```
//!
//! Only loopback addresses should be loaded: the client has no rate limit.

#![cfg_attr(docsrs, doc(cfg(feature = "testkit")))]

mod check;
mod error;
pub mod load;
mod server;
mod wait;

pub use self::check::{
    check_upgrades, Readiness, Target, UpgradeCheck, UpgradeOutcome, UpgradeReport,
};
pub use self::error::Error;
pub use self::load::{
    get, get_async, BlockingConn, Conn, Counters, Failure, FailureClass, Failures, IdleState, Load,
    LoadConfig, Mode, Report, Response, StopReason,
};
pub use self::server::{
    all_processes, become_subreaper, children_of, fd_count, fd_targets, is_alive, proc_stat,
    status_kb, zombies, Exit, ProcStat, Ready, Server, SpawnOptions,
};
pub use self::wait::{poll_until, Deadline, Poll};
