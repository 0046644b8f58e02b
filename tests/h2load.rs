//! HTTP/2 from a client nobody here wrote: `h2load` (Debian's `nghttp2-client`) against
//! `axum_server` across upgrades.
//!
//! - Many short runs across 10 upgrades, each on fresh connections: 0 failed, 0 errored,
//!   0 timed out. A run that started on the old generation sends all its requests before
//!   that generation's GOAWAY, which comes after the idle grace; the next run connects to the
//!   new one. A run lasts 20-100 ms here, but up to a second when the machine is busy, so the
//!   server gets an idle grace of 3 s (`--idle-grace-ms`): a run that outlasts the grace
//!   would stop sending at the GOAWAY, as the long run below does.
//! - One long run across one upgrade: h2load stops sending on a connection after its GOAWAY
//!   and does not open another, so what it had not sent yet is never sent (it counts those as
//!   failed and errored). This test reports them separately from the requests that were sent,
//!   which all succeed: the client refused them without sending, and no server can change that
//!   short of handing the connection over.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT};

/// The counts of h2load's `requests:` line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    total: u64,
    started: u64,
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
    status_2xx: u64,
}

impl Counts {
    /// Parses h2load's summary: `requests: 200 total, 200 started, 200 done, 200 succeeded,
    /// 0 failed, 0 errored, 0 timeout` and `status codes: 200 2xx, ...`.
    fn parse(output: &str) -> Option<Counts> {
        let field = |line: &str, name: &str| -> Option<u64> {
            line.split(',')
                .map(str::trim)
                .find_map(|part| part.strip_suffix(name)?.trim().parse().ok())
        };
        let requests = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("requests:"))?;
        let statuses = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("status codes:"))?;
        Some(Counts {
            total: field(requests, "total")?,
            started: field(requests, "started")?,
            done: field(requests, "done")?,
            succeeded: field(requests, "succeeded")?,
            failed: field(requests, "failed")?,
            errored: field(requests, "errored")?,
            timeout: field(requests, "timeout")?,
            status_2xx: field(statuses, "2xx")?,
        })
    }

    fn add(&mut self, o: Counts) {
        self.total += o.total;
        self.started += o.started;
        self.done += o.done;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.errored += o.errored;
        self.timeout += o.timeout;
        self.status_2xx += o.status_2xx;
    }
}

/// An h2load process, killed and reaped on drop.
struct H2load(Child);

impl H2load {
    fn spawn(args: &[String]) -> Option<H2load> {
        let spawned = Command::new("h2load")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => Some(H2load(child)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "h2load not found (nghttp2-client; .ci/run installs it)"
                );
                eprintln!("skipping: h2load not found (apt-get install nghttp2-client)");
                None
            }
            Err(e) => panic!("h2load: {e}"),
        }
    }

    /// Waits for the exit, at most `timeout`; returns stdout and stderr.
    fn output(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            // h2load writes its summary and exits; the pipe's EOF comes with the exit.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
                let _ = tx.send(text);
            });
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(text) => out = text,
                Err(_) => panic!("h2load did not finish within {timeout:?}"),
            }
        }
        let _ = self.0.wait();
        if let Some(mut stderr) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut out);
        }
        out
    }
}

impl Drop for H2load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn h2load_args(addr: std::net::SocketAddr, requests: u32, connections: u32) -> Vec<String> {
    vec![
        "-n".into(),
        requests.to_string(),
        "-c".into(),
        connections.to_string(),
        "-m".into(),
        "4".into(),
        format!("http://{addr}/"),
    ]
}

/// Requests per short run: it takes 20-100 ms here (debug build, 2 busy cores), at most a
/// second seen, within the idle grace the server is given.
const RUN_REQUESTS: u32 = 50;

#[test]
fn h2load_short_runs_under_load_across_10_upgrades() {
    let server = ServerProcess::example(
        "axum_server",
        &["--listen", "127.0.0.1:0", "--idle-grace-ms", "3000"],
    );
    let first = server.wait_ready(1);
    // Skip (outside CI) without h2load.
    let Some(probe) = H2load::spawn(&h2load_args(first.addr, 10, 1)) else {
        return;
    };
    assert!(
        Counts::parse(&probe.output(Duration::from_secs(20))).is_some_and(|c| c.succeeded == 10),
        "h2load works"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new((
        0u64,
        Counts::default(),
        Duration::ZERO,
        Vec::new(),
    )));
    let runner = std::thread::spawn({
        let (stop, results, addr) = (stop.clone(), results.clone(), first.addr);
        move || {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let run = H2load::spawn(&h2load_args(addr, RUN_REQUESTS, 2)).expect("h2load");
                let output = run.output(Duration::from_secs(20));
                let took = started.elapsed();
                let mut r = results.lock().expect("lock");
                match Counts::parse(&output) {
                    Some(c) => {
                        r.0 += 1;
                        r.1.add(c);
                        r.2 = r.2.max(took);
                        if c.succeeded != c.total {
                            r.3.push(output);
                        }
                    }
                    None => r.3.push(format!("unparsable h2load output:\n{output}")),
                }
            }
        }
    });
    let runs = || results.lock().expect("lock").0;
    let wait_runs = |n: u64| {
        let target = runs() + n;
        common::wait_until(
            format!("{n} more h2load runs"),
            Duration::from_secs(30),
            || runs() >= target,
            || format!("{:?}", results.lock().expect("lock")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    wait_runs(3);
    let mut previous = first.pid;
    for generation in 2..=11 {
        server.signal_pid(previous, Signal::SIGHUP).expect("SIGHUP");
        let ready = server.wait_ready(generation);
        // Runs across the old generation's drain, and on the new one.
        wait_runs(3);
        assert_eq!(server.wait_exit(previous, EXIT_TIMEOUT), Ok(Exit::Code(0)));
        previous = ready.pid;
    }
    stop.store(true, Ordering::SeqCst);
    runner.join().expect("h2load runner");
    let (n, totals, slowest, bad) = results.lock().expect("lock").clone();
    eprintln!(
        "h2load, {n} short runs ({RUN_REQUESTS} requests on 2 fresh connections each) across 10 \
         upgrades: {} requests, {} succeeded, {} failed, {} errored, {} timeout, {} 2xx; \
         slowest run {slowest:?}",
        totals.total,
        totals.succeeded,
        totals.failed,
        totals.errored,
        totals.timeout,
        totals.status_2xx
    );
    assert!(
        bad.is_empty(),
        "runs with failures:\n{}",
        bad.join("\n---\n")
    );
    assert_eq!(totals.failed, 0, "failed");
    assert_eq!(totals.errored, 0, "errored");
    assert_eq!(totals.timeout, 0, "timed out");
    assert_eq!(totals.succeeded, totals.total, "every request succeeded");
    assert_eq!(totals.status_2xx, totals.total, "every status 2xx");
}

#[test]
fn h2load_one_long_run_under_load_stops_sending_after_goaway() {
    let server = ServerProcess::example("axum_server", &["--listen", "127.0.0.1:0"]);
    let first = server.wait_ready(1);
    let Some(mut run) = H2load::spawn(&h2load_args(first.addr, 1_000_000, 4)) else {
        return;
    };
    // h2load prints `progress: 10% done` and so on; wait for the first line of progress or
    // of anything, so that requests are flowing before the upgrade.
    let stdout = run.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("h2load starts");
        output.push_str(&line);
        output.push('\n');
        if line.contains("Application protocol: h2c") {
            break;
        }
    }
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    server.wait_ready(2);
    assert_eq!(server.wait_exit(first.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    // The GOAWAYs ended h2load's connections: it finishes by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        output.push_str(&line);
        output.push('\n');
    }
    reader.join().expect("reader");
    let counts = Counts::parse(&output).unwrap_or_else(|| panic!("h2load summary:\n{output}"));
    let not_sent = counts.total - counts.started;
    let refused = counts.started - counts.succeeded;
    eprintln!(
        "h2load, one long run across an upgrade: {} requests asked for, {} sent: {} \
         succeeded, {refused} refused unprocessed (sent as the final GOAWAY crossed them); \
         {not_sent} never sent after the GOAWAYs (h2load counts both as failed and errored: \
         {} failed, {} errored, {} timeout)",
        counts.total,
        counts.started,
        counts.succeeded,
        counts.failed,
        counts.errored,
        counts.timeout,
    );
    assert_eq!(
        counts.status_2xx, counts.succeeded,
        "every answer 2xx:\n{output}"
    );
    assert_eq!(counts.timeout, 0, "none timed out:\n{output}");
    // A stream the client opened after the last one the final GOAWAY admits is refused
    // unprocessed (RFC 9113 §6.8; safe to retry, which h2load does not do): at most what can
    // be in flight, 4 connections x 4 streams.
    assert!(
        refused <= 16,
        "at most the streams in flight are refused:\n{output}"
    );
    assert!(
        not_sent > 0 && counts.failed == not_sent + refused,
        "h2load stops sending after a GOAWAY and counts the rest as failed:\n{output}"
    );
}
