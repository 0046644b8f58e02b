//! Throughput and latency of `examples/http_server` (the handler behind `handover`) against
//! `examples/plain_server` (the same handler on a plain tokio/hyper listener), side by side.
//!
//! `cargo bench --bench throughput`. The server is pinned to CPU 1 and the load client (one
//! thread) to CPU 0, and both sides' CPU use is measured, so the table says which side was
//! saturated. When the client is the bottleneck the two throughputs converge whatever the
//! servers cost, so the table also shows the server's CPU time per request, which compares
//! the servers in every case. Ratios are http_server / plain_server, the median of the ratios
//! of runs done back to back; they are reported, not asserted.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{Load, LoadConfig, Mode, Server};

/// Runs per server and mode (alternating between the servers).
const RUNS: usize = 9;
/// Length of one measured run.
const RUN: Duration = Duration::from_millis(1500);
/// Unmeasured load before each run.
const WARMUP: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(20);

const MODES: [Mode; 2] = [
    Mode::KeepAlive { connections: 16 },
    Mode::PerRequest { concurrency: 16 },
];

/// CPUs of the server and of the client.
const SERVER_CPU: usize = 1;
const CLIENT_CPU: usize = 0;

#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50: Duration,
    p99: Duration,
    failed: u64,
    server_cpu: f64,
    client_cpu: f64,
    server_cpu_busy: f64,
    client_cpu_busy: f64,
    server_us_per_request: f64,
}

fn main() {
    common::main("throughput", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["http_server", "plain_server"])?;
    let cpus = common::cpus();
    let pinned = cpus >= 2;
    println!(
        "\nthroughput and latency: http_server (handover) vs plain_server (no handover), \
         same handler; {RUNS} runs of {RUN:?} each, alternating, medians"
    );
    println!("machine: {}", common::machine());
    if pinned {
        println!(
            "server pinned to CPU {SERVER_CPU} (one tokio worker), load client to CPU {CLIENT_CPU} (one thread)"
        );
    } else {
        println!("one CPU only: server and client share it (not pinned); the ratio is still side by side");
    }
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    println!(
        "CPU columns: the process's own use / how busy its CPU was (with anything: other \
         processes on the machine count); a side is saturated when its CPU was >= 95% busy"
    );
    println!(
        "\n| {:<14} | {:<16} | {:>9} | {:>8} | {:>8} | {:>6} | {:>11} | {:>11} | {:>13} | {:<16} |",
        "server",
        "load",
        "req/s",
        "p50",
        "p99",
        "failed",
        "server CPU",
        "client CPU",
        "server µs/req",
        "saturated"
    );
    println!(
        "|{:-<16}|{:-<18}|{:->11}|{:->10}|{:->10}|{:->8}|{:->13}|{:->13}|{:->15}|{:-<18}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    let mut ratios = Vec::new();
    for mode in MODES {
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for run in 0..RUNS {
            // Alternate which server goes first, so that drift hits both alike.
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                if progress {
                    eprint!(
                        "\r  {mode} run {}/{RUNS}: {}        ",
                        run + 1,
                        ["http_server", "plain_server"][i]
                    );
                }
                samples[i].push(measure(&built[i], mode, pinned)?);
            }
        }
        if progress {
            eprint!("\r{:<60}\r", "");
        }
        for (i, name) in ["http_server", "plain_server"].iter().enumerate() {
            let s = &samples[i];
            let med = |f: fn(&Sample) -> f64| {
                common::median(&s.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
            };
            let server_cpu = med(|x| x.server_cpu);
            let client_cpu = med(|x| x.client_cpu);
            let server_busy = med(|x| x.server_cpu_busy);
            let client_busy = med(|x| x.client_cpu_busy);
            let side = |own: f64, busy: f64, name: &str| {
                if busy < 0.95 {
                    None
                } else if own < busy - 0.1 {
                    Some(format!("{name} (shared)"))
                } else {
                    Some(name.to_string())
                }
            };
            let saturated = match (
                side(server_cpu, server_busy, "server"),
                side(client_cpu, client_busy, "client"),
            ) {
                (Some(a), Some(b)) => format!("{a}, {b}"),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => "neither".to_string(),
            };
            let pct = |own: f64, busy: f64| format!("{:.0}/{:.0}%", own * 100.0, busy * 100.0);
            println!(
                "| {:<14} | {:<16} | {:>9.0} | {:>8} | {:>8} | {:>6} | {:>11} | {:>11} | {:>13.1} | {:<16} |",
                name,
                mode.to_string(),
                med(|x| x.rps),
                common::ms(common::median_d(&s.iter().map(|x| x.p50).collect::<Vec<_>>())),
                common::ms(common::median_d(&s.iter().map(|x| x.p99).collect::<Vec<_>>())),
                s.iter().map(|x| x.failed).sum::<u64>(),
                pct(server_cpu, server_busy),
                pct(client_cpu, client_busy),
                med(|x| x.server_us_per_request),
                saturated
            );
        }
        let pair = |f: fn(&Sample) -> f64| {
            let mut r: Vec<f64> = samples[0]
                .iter()
                .zip(&samples[1])
                .map(|(a, b)| f(a) / f(b))
                .collect();
            r.sort_by(f64::total_cmp);
            let median = common::median(&r).unwrap_or(0.0);
            // The middle half of the run pairs: the noise of this machine.
            let (lo, hi) = (r[r.len() / 4], r[(r.len() * 3) / 4]);
            format!("{median:.3} ({lo:.2}-{hi:.2})")
        };
        ratios.push((
            mode,
            pair(|x| x.rps),
            pair(|x| x.p99.as_secs_f64()),
            pair(|x| x.server_us_per_request),
        ));
    }
    println!(
        "\nratios http_server / plain_server: median of the ratios of runs done back to back \
         (interquartile range of those ratios); 1.000 = same"
    );
    for (mode, rps, p99, cpu) in ratios {
        println!(
            "  {:<16} throughput {rps}   p99 {p99}   server CPU per request {cpu}",
            mode.to_string()
        );
    }
    println!("throughput took {:.0?}", started.elapsed());
    Ok(())
}

/// One run: start the server on its CPU, warm up, measure, stop.
fn measure(exe: &Path, mode: Mode, pinned: bool) -> Result<Sample, String> {
    if pinned {
        common::pin_to(SERVER_CPU)?;
    }
    let mut cmd = Command::new(exe);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let spawned = Server::spawn(cmd).map_err(|e| e.to_string());
    if pinned {
        // The load's threads, started from this thread, inherit this.
        common::pin_to(CLIENT_CPU)?;
    }
    let server = spawned?;
    common::register_group(server.pid());
    let ready = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let addr = ready.addr.ok_or("no addr= in the ready line")?;
    let config = |bound: Duration| {
        LoadConfig::new(addr, mode)
            .threads(1)
            .request_timeout(Duration::from_secs(5))
            .max_duration(bound)
    };
    let warmup = Load::start(config(WARMUP));
    warmup
        .wait_finished(WARMUP + WAIT)
        .map_err(|e| e.to_string())?;
    drop(warmup);

    let jiffies0 = common::cpu_jiffies();
    let server_cpu0 = common::cpu_time_of(ready.pid).unwrap_or_default();
    let client_cpu0 = common::own_cpu_time();
    let wall = Instant::now();
    let load = Load::start(config(RUN));
    load.wait_finished(RUN + WAIT).map_err(|e| e.to_string())?;
    let report = load.stop();
    let wall = wall.elapsed();
    let server_cpu = common::cpu_time_of(ready.pid)
        .unwrap_or_default()
        .saturating_sub(server_cpu0);
    let client_cpu = common::own_cpu_time().saturating_sub(client_cpu0);
    let jiffies1 = common::cpu_jiffies();
    let _ = server.stop(handover::Signal::SIGTERM, WAIT);
    let elapsed = report.elapsed.as_secs_f64().max(1e-9);
    Ok(Sample {
        rps: report.ok as f64 / elapsed,
        p50: report.p50().unwrap_or_default(),
        p99: report.p99().unwrap_or_default(),
        failed: report.failures.total(),
        server_cpu: server_cpu.as_secs_f64() / wall.as_secs_f64(),
        client_cpu: client_cpu.as_secs_f64() / wall.as_secs_f64(),
        server_cpu_busy: common::cpu_busy(&jiffies0, &jiffies1, SERVER_CPU),
        client_cpu_busy: common::cpu_busy(&jiffies0, &jiffies1, CLIENT_CPU),
        server_us_per_request: server_cpu.as_secs_f64() * 1e6 / (report.ok.max(1) as f64),
    })
}
