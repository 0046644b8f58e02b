//! Rollbacks on probation (library mode, `examples/http_server` with `--probation-ms`): over
//! 10 rollbacks of each kind, the time from the failure to the old generation accepting again,
//! and the failed requests per rollback, under keep-alive load.
//!
//! `cargo bench --bench rollback`.
//!
//! - *crash*: a release that exits 300 ms after it is ready (`--crash-after-ready-ms 300`).
//!   The failure is the crash (the release's own "crashing now" log line); the old generation
//!   sees the exit through its pidfd.
//! - *unhealthy*: a release whose `/healthz` answers 503 (`--unhealthy`), checked every
//!   100 ms with a threshold of 3. The failure is the third failed check.
//!
//! Both ends are log timestamps of the processes themselves (the same clock): the failure,
//! and the old generation's "resumed: accepting again". Failed requests are those of the
//! load client during each rollback: the requests in flight on connections the failed
//! release held.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{Load, LoadConfig, Mode, Server};
use handover::Signal;

const ROLLBACKS: usize = 10;
const WAIT: Duration = Duration::from_secs(20);
const CONNECTIONS: usize = 8;

struct Kind {
    name: &'static str,
    flag: &'static str,
    /// The log line of the failure, and which occurrence (1-based) belongs to rollback `i`.
    failure_line: &'static str,
    per_rollback: usize,
}

const KINDS: [Kind; 2] = [
    Kind {
        name: "crash 300 ms after ready",
        flag: "--crash-after-ready-ms 300",
        failure_line: "--crash-after-ready-ms: crashing now",
        per_rollback: 1,
    },
    Kind {
        name: "unhealthy (/healthz 503, 3 x 100 ms)",
        flag: "--unhealthy",
        failure_line: "failures=3 threshold=3",
        per_rollback: 1,
    },
];

fn main() {
    common::main("rollback", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["http_server"])?;
    println!(
        "\nrollbacks on probation, library mode ({ROLLBACKS} each, keep-alive x{CONNECTIONS})"
    );
    println!("machine: {}", common::machine());
    println!(
        "\n| {:<38} | {:>20} | {:>19} | {:>25} |",
        "failure", "to accepting, median", "to accepting, worst", "failed requests / rollback"
    );
    println!("|{:-<40}|{:->22}|{:->21}|{:->27}|", "", "", "", "");
    for kind in &KINDS {
        let (times, failed) = rollbacks(&built[0], kind)?;
        let worst = times.iter().max().copied().unwrap_or_default();
        let mut sorted = failed.clone();
        sorted.sort_unstable();
        println!(
            "| {:<38} | {:>20} | {:>19} | {:>25} |",
            kind.name,
            common::ms(common::median_d(&times)),
            common::ms(worst),
            format!(
                "median {}, max {}",
                sorted[sorted.len() / 2],
                sorted.last().copied().unwrap_or(0)
            )
        );
    }
    println!("\n({:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// `ROLLBACKS` rollbacks of one kind on one server: times from failure to accepting again,
/// and failed requests per rollback.
fn rollbacks(http_server: &Path, kind: &Kind) -> Result<(Vec<Duration>, Vec<u64>), String> {
    let dir = common::TempDir::new("rollback-bench")?;
    let exe = dir.path().join("app");
    let real = dir.path().join("real");
    common::deploy(&exe, common::Deploy::Binary(http_server))?;
    common::deploy(&real, common::Deploy::Binary(http_server))?;
    let mut cmd = Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0", "--probation-ms", "5000"])
        .args(["--health-path", "/healthz", "--health-interval-ms", "100"])
        .args([
            "--health-threshold",
            "3",
            "--failed-drain-timeout-ms",
            "2000",
        ]);
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    let gen1 = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let addr = gen1.addr.ok_or("no address in the ready line")?;
    let load = Load::start(
        LoadConfig::new(
            addr,
            Mode::KeepAlive {
                connections: CONNECTIONS,
            },
        )
        .max_duration(Duration::from_secs(600)),
    );
    load.wait_for_ok(100, WAIT).map_err(|e| e.to_string())?;
    common::deploy(
        &exe,
        common::Deploy::Script(&format!("exec {} \"$@\" {}", real.display(), kind.flag)),
    )?;
    let (mut times, mut failed) = (Vec::new(), Vec::new());
    for i in 1..=ROLLBACKS {
        let before = load.snapshot().failure_total();
        server
            .signal(gen1.pid, Signal::SIGHUP)
            .map_err(|e| e.to_string())?;
        server
            .wait_stderr("upgrade failed; this generation keeps serving", i, WAIT)
            .map_err(|e| e.to_string())?;
        load.wait_for_more_ok(50, WAIT).map_err(|e| e.to_string())?;
        failed.push(load.snapshot().failure_total() - before);
        let stderr = server.stderr();
        let failure = common::log_timestamp(&stderr, kind.failure_line, i * kind.per_rollback)
            .ok_or_else(|| format!("no {:?} line for rollback {i}", kind.failure_line))?;
        let resumed = common::log_timestamp(&stderr, "resumed: accepting again", i)
            .ok_or_else(|| format!("no resume line for rollback {i}"))?;
        times.push(Duration::from_secs_f64((resumed - failure).max(0.0)));
    }
    load.stop();
    let _ = server.stop(Signal::SIGTERM, WAIT);
    Ok((times, failed))
}
