//! Failed requests during 20 upgrades, under keep-alive and connection-per-request load, for
//! an axum app done the usual way (`examples/axum_naive`: `listenfd` +
//! `axum::serve(..).with_graceful_shutdown(sigterm)`, under `handover run`, which passes the
//! socket and upgrades on SIGHUP) and the same routes served by `handover::serve::axum`
//! (`examples/axum_server`, SIGHUP).
//!
//! `cargo bench --bench axum_failures`. Each configuration runs RUNS times, interleaved
//! (run 1 of every row, then run 2, ...), so that the rows are compared side by side in one
//! run; the table shows the median run (by failed requests) of each row.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{check_upgrades, Failures, Mode, Target, UpgradeCheck};

/// Upgrades per run.
const K: u32 = 20;
/// Runs per row.
const RUNS: usize = 3;
/// Successful requests before the first upgrade and between two upgrades.
const BETWEEN: u64 = 1000;
/// Budget of each wait.
const WAIT: Duration = Duration::from_secs(20);

const MODES: [Mode; 2] = [
    Mode::KeepAlive { connections: 8 },
    Mode::PerRequest { concurrency: 4 },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    Naive,
    Serve,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Naive => "axum_naive under handover run",
            Row::Serve => "axum_server (handover::serve::axum)",
        }
    }
}

#[derive(Clone, Default)]
struct RunResult {
    requests: u64,
    failures: Failures,
    upgrades_ok: usize,
}

fn main() {
    common::main("axum_failures", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["axum_naive", "axum_server"])?;
    let (naive, serve) = (built[0].clone(), built[1].clone());
    let Some(handover_bin) = common::build_handover_bin()? else {
        return Err("the handover binary is needed for axum_naive".into());
    };
    let rows = [Row::Naive, Row::Serve];
    println!(
        "\nfailed requests during {K} upgrades ({RUNS} runs each, median run shown; \
         {BETWEEN} successful requests before the first upgrade and after each)"
    );
    println!("machine: {}", common::machine());
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); rows.len() * MODES.len()];
    for run in 0..RUNS {
        for (r, row) in rows.iter().enumerate() {
            for (m, mode) in MODES.iter().enumerate() {
                if progress {
                    eprint!(
                        "\r  run {}/{RUNS}: {:<38} {:<16}",
                        run + 1,
                        row.name(),
                        mode
                    );
                }
                let result = match row {
                    Row::Naive => under_handover_run(&handover_bin, &naive, *mode)?,
                    Row::Serve => self_upgrading(&serve, *mode)?,
                };
                results[r * MODES.len() + m].push(result);
            }
        }
    }
    if progress {
        eprint!("\r{:<80}\r", "");
    }
    println!(
        "\n| {:<36} | {:<15} | {:>8} | {:>6} | {:>7} | {:>5} | {:>4} | {:>7} | {:>6} | {:>5} | {:>11} | {:>15} |",
        "server", "load", "requests", "failed", "refused", "reset", "eof", "timeout", "status",
        "other", "upgrades ok", format!("failed, {RUNS} runs")
    );
    println!(
        "|{:-<38}|{:-<17}|{:->10}|{:->8}|{:->9}|{:->7}|{:->6}|{:->9}|{:->8}|{:->7}|{:->13}|{:->17}|",
        "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for (r, row) in rows.iter().enumerate() {
        for (m, mode) in MODES.iter().enumerate() {
            let runs = &results[r * MODES.len() + m];
            let mut sorted = runs.clone();
            sorted.sort_by_key(|x| x.failures.total());
            let med = &sorted[sorted.len() / 2];
            let all: Vec<String> = runs
                .iter()
                .map(|x| x.failures.total().to_string())
                .collect();
            let f = &med.failures;
            println!(
                "| {:<36} | {:<15} | {:>8} | {:>6} | {:>7} | {:>5} | {:>4} | {:>7} | {:>6} | {:>5} | {:>8}/{K:<2} | {:>15} |",
                row.name(),
                mode.to_string(),
                common::thousands(med.requests),
                f.total(),
                f.refused,
                f.reset,
                f.eof_before_response,
                f.timeout,
                f.bad_status,
                f.other,
                med.upgrades_ok,
                all.join(",")
            );
        }
    }
    println!("axum_failures took {:.0?}", started.elapsed());
    Ok(())
}

fn check(mode: Mode) -> UpgradeCheck {
    UpgradeCheck::new(K)
        .loads(vec![mode])
        .requests_between(BETWEEN)
        .start_timeout(WAIT)
        .upgrade_timeout(WAIT)
        .exit_timeout(WAIT)
        .max_duration(Duration::from_secs(180))
}

fn result(report: handover::testkit::UpgradeReport) -> RunResult {
    RunResult {
        requests: report.requests(),
        failures: report.failures(),
        upgrades_ok: report.upgrades_ok(),
    }
}

/// `handover run` binds the socket and runs `axum_naive` with it; SIGHUP to the supervisor.
fn under_handover_run(handover: &Path, naive: &Path, mode: Mode) -> Result<RunResult, String> {
    let dir = common::TempDir::new("bench-axum-naive")?;
    let mut cmd = Command::new(handover);
    cmd.args(["run", "--listen", "http=tcp://127.0.0.1:0", "--control"])
        .arg(dir.path().join("control.sock"))
        .arg("--")
        .arg(naive);
    let report =
        check_upgrades(cmd, check(mode).target(Target::Started)).map_err(|e| e.to_string())?;
    Ok(result(report))
}

/// `axum_server` upgrades itself on SIGHUP.
fn self_upgrading(serve: &Path, mode: Mode) -> Result<RunResult, String> {
    let mut cmd = Command::new(serve);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let report = check_upgrades(cmd, check(mode)).map_err(|e| e.to_string())?;
    Ok(result(report))
}
