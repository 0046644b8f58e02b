//! Failed requests during K upgrades, under keep-alive and connection-per-request load, for:
//! the library (`examples/http_server`, SIGHUP), the entrypoint (`handover run` wrapping
//! `examples/plain_server`, a plain socket-activation server), and a naive stop-and-start
//! restart of `http_server` (SIGTERM, wait for the exit, start it again): the baseline.
//!
//! `cargo bench --bench upgrade_failures`. Every configuration runs RUNS times, interleaved
//! (run 1 of every row, then run 2, ...), so rows are compared side by side in one run; the
//! table shows the median run (by failed requests) of each row.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{
    check_upgrades, Failures, Load, LoadConfig, Mode, Server, Target, UpgradeCheck,
};

/// Upgrades (or restarts) per run.
const K: u32 = 10;
/// Runs per row.
const RUNS: usize = 5;
/// Successful requests before the first upgrade and between two upgrades.
const BETWEEN: u64 = 2000;
/// Budget of each wait.
const WAIT: Duration = Duration::from_secs(20);

const MODES: [Mode; 2] = [
    Mode::KeepAlive { connections: 8 },
    Mode::PerRequest { concurrency: 4 },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    Library,
    Entrypoint,
    Naive,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Library => "library: http_server, SIGHUP",
            Row::Entrypoint => "entrypoint: handover run + plain_server",
            Row::Naive => "naive restart: SIGTERM, start again",
        }
    }
}

/// One run of one row.
#[derive(Clone, Default)]
struct RunResult {
    requests: u64,
    failures: Failures,
    upgrades_ok: u32,
}

fn main() {
    common::main("upgrade_failures", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["http_server", "plain_server"])?;
    let (http_server, plain_server) = (built[0].clone(), built[1].clone());
    let handover_bin = common::build_handover_bin()?;
    let mut rows = vec![Row::Library];
    if handover_bin.is_some() {
        rows.push(Row::Entrypoint);
    }
    rows.push(Row::Naive);

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
                        "\r  run {}/{RUNS}: {:<42} {:<16}",
                        run + 1,
                        row.name(),
                        mode
                    );
                }
                let result = match row {
                    Row::Library => library(&http_server, *mode)?,
                    Row::Entrypoint => match &handover_bin {
                        Some(bin) => entrypoint(bin, &plain_server, *mode)?,
                        None => RunResult::default(),
                    },
                    Row::Naive => naive(&http_server, *mode)?,
                };
                results[r * MODES.len() + m].push(result);
            }
        }
    }
    if progress {
        eprint!("\r{:<80}\r", "");
    }

    println!(
        "\n| {:<40} | {:<15} | {:>9} | {:>6} | {:>7} | {:>5} | {:>4} | {:>7} | {:>6} | {:>5} | {:>11} | {:>15} |",
        "server", "load", "requests", "failed", "refused", "reset", "eof", "timeout", "status",
        "other", "upgrades ok", format!("failed, {RUNS} runs")
    );
    println!("|{:-<42}|{:-<17}|{:->11}|{:->8}|{:->9}|{:->7}|{:->6}|{:->9}|{:->8}|{:->7}|{:->13}|{:->17}|", "", "", "", "", "", "", "", "", "", "", "", "");
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
                "| {:<40} | {:<15} | {:>9} | {:>6} | {:>7} | {:>5} | {:>4} | {:>7} | {:>6} | {:>5} | {:>8}/{K:<2} | {:>15} |",
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
    if handover_bin.is_none() {
        println!(
            "| {:<40} | {:<15} | n/a: `handover run` is not in this tree yet (src/bin/handover.rs) |",
            Row::Entrypoint.name(),
            "both"
        );
    }
    let total = |row: Row| -> u64 {
        rows.iter()
            .position(|r| *r == row)
            .map(|r| {
                (0..MODES.len())
                    .flat_map(|m| results[r * MODES.len() + m].iter())
                    .map(|x| x.failures.total())
                    .sum()
            })
            .unwrap_or(0)
    };
    println!(
        "\nin this run: library {} failed requests in total, naive restart {}{}",
        total(Row::Library),
        total(Row::Naive),
        if handover_bin.is_some() {
            format!(", entrypoint {}", total(Row::Entrypoint))
        } else {
            String::new()
        }
    );
    println!("upgrade_failures took {:.0?}", started.elapsed());
    Ok(())
}

fn check(mode: Mode) -> UpgradeCheck {
    UpgradeCheck::new(K)
        .loads(vec![mode])
        .requests_between(BETWEEN)
        .start_timeout(WAIT)
        .upgrade_timeout(WAIT)
        .exit_timeout(WAIT)
        .max_duration(Duration::from_secs(120))
}

/// The library: `http_server` upgrades itself on SIGHUP, checked with the test kit.
fn library(http_server: &Path, mode: Mode) -> Result<RunResult, String> {
    let mut cmd = Command::new(http_server);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let report = check_upgrades(cmd, check(mode)).map_err(|e| e.to_string())?;
    Ok(RunResult {
        requests: report.requests(),
        failures: report.failures(),
        upgrades_ok: report.upgrades_ok() as u32,
    })
}

/// The entrypoint: `handover run` binds the socket, runs `plain_server` with it (socket
/// activation; it prints ready lines with the generation `handover run` gives it) and
/// upgrades it on SIGHUP, sent to the supervisor.
fn entrypoint(handover: &Path, plain_server: &Path, mode: Mode) -> Result<RunResult, String> {
    let dir = common::TempDir::new("bench-entrypoint")?;
    let mut cmd = Command::new(handover);
    cmd.args(["run", "--listen", "http=tcp://127.0.0.1:0", "--control"])
        .arg(dir.path().join("control.sock"))
        .arg("--")
        .arg(plain_server);
    let report =
        check_upgrades(cmd, check(mode).target(Target::Started)).map_err(|e| e.to_string())?;
    Ok(RunResult {
        requests: report.requests(),
        failures: report.failures(),
        upgrades_ok: report.upgrades_ok() as u32,
    })
}

/// The baseline: SIGTERM (the server drains and exits), then start the same binary again on
/// the same port.
fn naive(http_server: &Path, mode: Mode) -> Result<RunResult, String> {
    let port = common::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = || -> Result<Server, String> {
        let mut cmd = Command::new(http_server);
        cmd.args(["--listen", &addr.to_string()]);
        let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
        common::register_group(server.pid());
        server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
        Ok(server)
    };
    let mut server = start()?;
    let load = Load::start(
        LoadConfig::new(addr, mode)
            .request_timeout(Duration::from_secs(5))
            .max_duration(Duration::from_secs(120)),
    );
    load.wait_for_ok(BETWEEN, WAIT).map_err(|e| e.to_string())?;
    let mut restarts = 0;
    for _ in 0..K {
        server
            .signal(server.pid(), handover::Signal::SIGTERM)
            .map_err(|e| e.to_string())?;
        server
            .wait_exit(server.pid(), WAIT)
            .map_err(|e| e.to_string())?;
        drop(server);
        server = start()?;
        restarts += 1;
        load.wait_for_more_ok(BETWEEN, WAIT)
            .map_err(|e| e.to_string())?;
    }
    let report = load.stop();
    drop(server);
    Ok(RunResult {
        requests: report.requests(),
        failures: report.failures.clone(),
        upgrades_ok: restarts,
    })
}
