//! Rolling upgrades of `handover run --workers N` (`examples/plain_server`): the time of a
//! roll (`handover upgrade`, from the request to its `ok:` line) against N = 1, 2, 4, 8,
//! without and with `--probation 200ms`, and the supervisor's own memory (VmRSS) with 8
//! workers against 1.
//!
//! `cargo bench --bench workers`.
//!
//! Each configuration runs `ROLLS` rolls one after the other on one supervisor, under a
//! keep-alive load of 8 connections (its failed requests are counted and printed: 0 is the
//! promise). A roll is sequential (`--max-surge 1`): N single-worker upgrades, each waiting
//! for the new worker's `READY=1` (and its probation) before the old one is told to stop.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{Load, LoadConfig, Mode, Server};
use handover::Signal;

const ROLLS: usize = 5;
const WAIT: Duration = Duration::from_secs(60);
const CONNECTIONS: usize = 8;
const NS: [usize; 4] = [1, 2, 4, 8];
const PROBATION: &str = "200ms";

fn main() {
    common::main("workers", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let Some(handover) = common::build_handover_bin()? else {
        return Err("no src/bin/handover.rs in this tree".to_owned());
    };
    let built = common::build_examples(&["plain_server"])?;
    println!("\nrolling upgrades, plain_server ({ROLLS} rolls each, keep-alive x{CONNECTIONS})");
    println!("machine: {}", common::machine());
    println!(
        "\n| {:>7} | {:>9} | {:>12} | {:>10} | {:>15} | {:>16} |",
        "workers", "probation", "roll, median", "roll, max", "per worker, med", "failed requests"
    );
    println!(
        "|{:->9}|{:->11}|{:->14}|{:->12}|{:->17}|{:->18}|",
        "", "", "", "", "", ""
    );
    let mut rss = Vec::new();
    for probation in [None, Some(PROBATION)] {
        for n in NS {
            let r = rolls(&handover, &built[0], n, probation)?;
            let max = r.times.iter().max().copied().unwrap_or_default();
            let median = common::median_d(&r.times);
            println!(
                "| {:>7} | {:>9} | {:>12} | {:>10} | {:>15} | {:>16} |",
                n,
                probation.unwrap_or("off"),
                common::ms(median),
                common::ms(max),
                common::ms(median / n as u32),
                r.failed
            );
            if probation.is_none() {
                rss.push((n, r.rss_kb));
            }
        }
    }
    println!("\nsupervisor memory (VmRSS after the rolls, no probation)");
    println!("\n| {:>7} | {:>13} |", "workers", "VmRSS");
    println!("|{:->9}|{:->15}|", "", "");
    for (n, kb) in rss {
        println!("| {:>7} | {:>10} kB |", n, kb);
    }
    println!("\n({:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}

struct Rolls {
    times: Vec<Duration>,
    failed: u64,
    rss_kb: u64,
}

/// `status json` over the control socket.
fn status(control: &Path) -> Result<String, String> {
    let mut s = std::os::unix::net::UnixStream::connect(control).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"status json\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply)
}

/// Waits until `n` workers are ready and none is stopping (the old ones have exited).
fn wait_settled(control: &Path, n: usize) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let json = status(control).unwrap_or_default();
        let ready = json.matches("\"ready\":true,\"stopping\":false").count();
        let all = json.matches("\"stopping\":").count();
        if ready == n && all == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{n} workers not settled: {json}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rolls(
    handover: &Path,
    plain_server: &Path,
    n: usize,
    probation: Option<&str>,
) -> Result<Rolls, String> {
    let dir = common::TempDir::new("workers-bench")?;
    let control = dir.path().join("control.sock");
    let port = common::free_port()?;
    let workers = n.to_string();
    let mut cmd = Command::new(handover);
    cmd.arg("run")
        .arg("--control")
        .arg(&control)
        .args(["--listen", &format!("tcp://127.0.0.1:{port}")])
        .args(["--workers", &workers, "--drain-timeout", "10s"]);
    if let Some(p) = probation {
        cmd.args(["--probation", p]);
    }
    cmd.arg("--").arg(plain_server);
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    wait_settled(&control, n)?;
    let load = Load::start(
        LoadConfig::new(
            ([127, 0, 0, 1], port).into(),
            Mode::KeepAlive {
                connections: CONNECTIONS,
            },
        )
        .max_duration(Duration::from_secs(600)),
    );
    load.wait_for_ok(100, WAIT).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for _ in 0..ROLLS {
        let t = Instant::now();
        let out = Command::new(handover)
            .arg("upgrade")
            .arg("--control")
            .arg(&control)
            .args(["--timeout", "60s"])
            .output()
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed());
        if !out.status.success() {
            return Err(format!(
                "roll failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        // The next roll starts from a settled pool (the old workers have drained).
        wait_settled(&control, n)?;
    }
    let rss_kb = handover::testkit::status_kb(server.pid(), "VmRSS").unwrap_or(0);
    let report = load.stop();
    let _ = server.stop(Signal::SIGTERM, WAIT);
    Ok(Rolls {
        times,
        failed: report.failure_total(),
        rss_kb,
    })
}
