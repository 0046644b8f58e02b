//! Live connection handoff (`handover::serve`, `examples/http_server`): what an upgrade costs
//! keep-alive clients with handoff (idle HTTP/1 connections move to the new generation) and
//! without (`--no-handoff`: each connection is closed gracefully and its client reconnects,
//! today's path before handoff).
//!
//! `cargo bench --bench handoff`. Two tables, both rows of each measured in the same run,
//! interleaved (run 1 of every row, then run 2, ...):
//! 1. keep-alive load (64 connections), 20 upgrades: new connections per upgrade per client
//!    connection, failed requests, trigger to the old generation's exit;
//! 2. 1 000 idle keep-alive connections, one upgrade: the time to hand them all over (the
//!    old generation's own figure), trigger to the old generation's exit (by its log clock),
//!    and what their clients had to do for their next request.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{check_upgrades, Mode, Server, UpgradeCheck};
use handover::Signal;

const K: u32 = 20;
const CONNECTIONS: usize = 64;
const RUNS: usize = 3;
const IDLE: usize = 1000;
const IDLE_RUNS: usize = 5;
const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Row {
    Close,
    Handoff,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Close => "graceful close (--no-handoff)",
            Row::Handoff => "handoff (default)",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Row::Close => &["--listen", "127.0.0.1:0", "--no-handoff"],
            Row::Handoff => &["--listen", "127.0.0.1:0"],
        }
    }
}

const ROWS: [Row; 2] = [Row::Close, Row::Handoff];

fn main() {
    common::main("handoff", run);
}

struct LoadRun {
    requests: u64,
    failed: u64,
    new_connections: u64,
    old_exit: Duration,
}

struct IdleRun {
    handed_over_in: Option<Duration>,
    old_exit: Duration,
    reconnected: usize,
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["http_server"])?;
    let server = &built[0];
    println!("\nkeep-alive x{CONNECTIONS}, {K} upgrades ({RUNS} runs each, medians)");
    println!("machine: {}", common::machine());
    let mut loads: Vec<Vec<LoadRun>> = vec![Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (r, row) in ROWS.iter().enumerate() {
            loads[r].push(under_load(server, *row)?);
        }
    }
    println!(
        "\n| {:<30} | {:>9} | {:>6} | {:>15} | {:>32} | {:>18} |",
        "path",
        "requests",
        "failed",
        "new connections",
        "per upgrade per client connection",
        "trigger to old exit"
    );
    println!(
        "|{:-<32}|{:->11}|{:->8}|{:->17}|{:->34}|{:->20}|",
        "", "", "", "", "", ""
    );
    for (r, row) in ROWS.iter().enumerate() {
        let runs = &loads[r];
        let med = |f: &dyn Fn(&LoadRun) -> f64| {
            let v: Vec<f64> = runs.iter().map(f).collect();
            common::median(&v).unwrap_or(0.0)
        };
        let new = med(&|x| x.new_connections as f64);
        println!(
            "| {:<30} | {:>9} | {:>6} | {:>15} | {:>32.3} | {:>18} |",
            row.name(),
            common::thousands(med(&|x| x.requests as f64) as u64),
            med(&|x| x.failed as f64),
            new,
            new / (f64::from(K) * CONNECTIONS as f64),
            common::ms(Duration::from_secs_f64(med(&|x| x.old_exit.as_secs_f64()))),
        );
    }

    println!("\n{IDLE} idle keep-alive connections, one upgrade ({IDLE_RUNS} runs each, medians)");
    let mut idles: Vec<Vec<IdleRun>> = vec![Vec::new(), Vec::new()];
    for _ in 0..IDLE_RUNS {
        for (r, row) in ROWS.iter().enumerate() {
            idles[r].push(idle(server, *row)?);
        }
    }
    println!(
        "\n| {:<30} | {:>18} | {:>19} | {:>34} |",
        "path", "all handed over in", "trigger to old exit", "clients that had to reconnect"
    );
    println!("|{:-<32}|{:->20}|{:->21}|{:->36}|", "", "", "", "");
    for (r, row) in ROWS.iter().enumerate() {
        let runs = &idles[r];
        let handed: Vec<Duration> = runs.iter().filter_map(|x| x.handed_over_in).collect();
        let exits: Vec<Duration> = runs.iter().map(|x| x.old_exit).collect();
        let reconnected: Vec<usize> = runs.iter().map(|x| x.reconnected).collect();
        println!(
            "| {:<30} | {:>18} | {:>19} | {:>34} |",
            row.name(),
            if handed.is_empty() {
                "-".to_owned()
            } else {
                common::ms(common::median_d(&handed))
            },
            common::ms(common::median_d(&exits)),
            format!(
                "{} of {IDLE}",
                common::median(&reconnected).unwrap_or_default()
            ),
        );
    }
    println!("\nhandoff took {:.0?}", started.elapsed());
    Ok(())
}

fn under_load(server: &Path, row: Row) -> Result<LoadRun, String> {
    let mut cmd = Command::new(server);
    cmd.args(row.args());
    let check = UpgradeCheck::new(K)
        .loads(vec![Mode::KeepAlive {
            connections: CONNECTIONS,
        }])
        .requests_between(500)
        .start_timeout(WAIT)
        .upgrade_timeout(WAIT)
        .exit_timeout(WAIT)
        .max_duration(Duration::from_secs(300));
    let report = check_upgrades(cmd, check).map_err(|e| e.to_string())?;
    if report.upgrades_ok() != K as usize {
        return Err(format!("{}: upgrades failed:\n{report}", row.name()));
    }
    let (_, load) = report.loads.first().ok_or("no load")?;
    let exits: Vec<Duration> = report
        .upgrades
        .iter()
        .filter_map(|u| u.old_exit_after)
        .collect();
    Ok(LoadRun {
        requests: load.requests(),
        failed: load.failure_total(),
        new_connections: load.connections.saturating_sub(CONNECTIONS as u64),
        old_exit: common::median_d(&exits),
    })
}

fn get(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(body.to_owned());
            }
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(WAIT))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

fn idle(server_bin: &Path, row: Row) -> Result<IdleRun, String> {
    let mut cmd = Command::new(server_bin);
    cmd.args(row.args());
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    let gen1 = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let addr = gen1.addr.ok_or("no address in the ready line")?;
    let mut conns = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut c = connect(addr)?;
        get(&mut c).map_err(|e| format!("first request: {e}"))?;
        conns.push(c);
    }
    server
        .signal(gen1.pid, Signal::SIGHUP)
        .map_err(|e| e.to_string())?;
    server.wait_ready(2, WAIT).map_err(|e| e.to_string())?;
    server
        .wait_exit(gen1.pid, WAIT)
        .map_err(|e| e.to_string())?;
    let stderr = server.stderr();
    let trigger = common::log_timestamp(&stderr, "signal received generation=1", 1)
        .ok_or("no trigger line")?;
    let exited = common::log_timestamp(&stderr, "exiting report", 1).ok_or("no exit line")?;
    let handed_over_in = stderr
        .lines()
        .find(|l| l.contains("connections handed to the new generation"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("took_us="))?
                .parse::<u64>()
                .ok()
        })
        .map(Duration::from_micros);
    // Each client's next request: on its connection, or (closed by the old generation) on
    // a new one.
    let mut reconnected = 0;
    for c in &mut conns {
        if get(c).is_err() {
            reconnected += 1;
            let mut fresh = connect(addr)?;
            get(&mut fresh).map_err(|e| format!("after reconnecting: {e}"))?;
        }
    }
    drop(conns);
    let _ = server.stop(Signal::SIGTERM, WAIT);
    Ok(IdleRun {
        handed_over_in,
        old_exit: Duration::from_secs_f64((exited - trigger).max(0.0)),
        reconnected,
    })
}
