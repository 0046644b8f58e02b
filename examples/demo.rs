//! One command to see it work: `cargo run --release --example demo`.
//!
//! Builds the `http_server` example, copies it to a temporary directory (so that a release
//! can be deployed at its path), starts it, drives HTTP load at it (persistent connections and
//! a connection per request, side by side), and upgrades it 12 times while the load runs: 10
//! healthy releases, one broken release that never becomes ready (stopped at the ready
//! timeout while the running generation keeps serving), and one that says ready but answers
//! 503 on `/healthz`, caught on probation: every upgrade has a 500 ms probation with a health
//! check every 100 ms, during which the old generation stays parked, and it resumes at once
//! when the check fails three times (the rollback after ready). Then it prints
//! what the load saw: requests sent, failed requests by class, latency, and the time from
//! each trigger to the new generation being ready. About 20 seconds.
//!
//! Everything it starts runs in a process group of its own and is killed and reaped at the
//! end, on a panic, and on Ctrl-C. Exit status 0 when no request failed and every healthy
//! upgrade succeeded.

#[path = "../benches/common/mod.rs"]
mod common;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{deploy, ms, thousands, Deploy, TempDir};
use handover::testkit::{Counters, Exit, Load, LoadConfig, Mode, Report, Server};

/// Upgrades triggered.
const UPGRADES: u64 = 12;
/// Which of them deploys the release that never becomes ready.
const BAD_UPGRADE: u64 = 6;
/// Which of them deploys the release that is ready but unhealthy (caught on probation).
const UNHEALTHY_UPGRADE: u64 = 9;
/// The probation of every upgrade.
const PROBATION: Duration = Duration::from_millis(500);
/// The server's ready timeout: how long the broken release gets before it is killed.
const READY_TIMEOUT: Duration = Duration::from_millis(1000);
/// Load runs at least this long on each generation before the next trigger (pacing, so the
/// demo is watchable; nothing waits on it for correctness).
const PACE: Duration = Duration::from_millis(1200);
/// Budget of every wait of the demo.
const WAIT: Duration = Duration::from_secs(10);

fn main() {
    common::cleanup_on_signals();
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("\ndemo: {e}");
            std::process::exit(2);
        }
    }
}

/// What the progress line shows, updated by the main thread.
#[derive(Default)]
struct Progress {
    upgrade: AtomicU64,
    generation: AtomicU64,
    pid: AtomicU64,
}

/// One trigger and what came of it.
struct Outcome {
    bad: bool,
    ok: bool,
    ready_after: Option<Duration>,
    old_exit_after_ready: Option<Duration>,
    note: String,
}

fn run() -> Result<bool, String> {
    eprintln!("handover demo: building examples/http_server (release) ...");
    let built = common::build_examples(&["http_server"])?;
    let original = &built[0];
    let dir = TempDir::new("demo")?;
    let exe = dir.path().join("http_server");
    deploy(&exe, Deploy::Binary(original))?;

    let mut cmd = Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0", "--drain-timeout-ms", "5000"])
        .arg("--ready-timeout-ms")
        .arg(READY_TIMEOUT.as_millis().to_string())
        .arg("--probation-ms")
        .arg(PROBATION.as_millis().to_string())
        .args(["--health-path", "/healthz", "--health-interval-ms", "100"])
        .args([
            "--health-threshold",
            "3",
            "--failed-drain-timeout-ms",
            "2000",
        ]);
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    let first = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let addr = first.addr.ok_or("the ready line has no addr=")?;
    eprintln!(
        "started {} (pid {}, generation 1) on {addr}\n",
        exe.display(),
        first.pid
    );

    let stop = Arc::new(AtomicBool::new(false));
    let modes = [
        Mode::KeepAlive { connections: 8 },
        Mode::PerRequest { concurrency: 4 },
    ];
    let loads: Vec<Load> = modes
        .into_iter()
        .map(|mode| {
            Load::start(
                LoadConfig::new(addr, mode)
                    .request_timeout(Duration::from_secs(5))
                    .max_duration(Duration::from_secs(55))
                    .stop_flag(stop.clone()),
            )
        })
        .collect();
    for load in &loads {
        load.wait_for_ok(100, WAIT).map_err(|e| e.to_string())?;
    }

    let progress = Arc::new(Progress::default());
    progress.generation.store(1, Ordering::SeqCst);
    progress.pid.store(first.pid as u64, Ordering::SeqCst);
    let started = Instant::now();
    let ticker = Ticker::start(progress.clone(), &loads, started);

    let mut outcomes = Vec::new();
    let mut current = first;
    for n in 1..=UPGRADES {
        progress.upgrade.store(n, Ordering::SeqCst);
        let step = Instant::now();
        let outcome = if n == BAD_UPGRADE {
            bad_upgrade(
                &server,
                &exe,
                original,
                &current,
                "# a broken release: hangs at start-up, never ready\nexec sleep 30",
                &format!("never ready: stopped at the {READY_TIMEOUT:?} ready timeout"),
            )?
        } else if n == UNHEALTHY_UPGRADE {
            bad_upgrade(
                &server,
                &exe,
                original,
                &current,
                &format!(
                    "# ready, but /healthz answers 503\nexec {} \"$@\" --unhealthy",
                    original.display()
                ),
                "ready but unhealthy: caught on probation, rolled back",
            )?
        } else {
            let (outcome, next) = good_upgrade(&server, &loads, &current)?;
            if let Some(next) = next {
                progress.generation.store(next.generation, Ordering::SeqCst);
                progress.pid.store(next.pid as u64, Ordering::SeqCst);
                current = next;
            }
            outcome
        };
        outcomes.push(outcome);
        // Pacing only: the load keeps running on the new generation for a while.
        thread::sleep(PACE.saturating_sub(step.elapsed()));
    }

    stop.store(true, Ordering::SeqCst);
    let reports: Vec<(Mode, Report)> = modes
        .into_iter()
        .zip(loads.into_iter().map(Load::stop))
        .collect();
    let elapsed = started.elapsed();
    drop(ticker);
    server
        .signal(current.pid, handover::Signal::SIGTERM)
        .map_err(|e| e.to_string())?;
    let final_exit = server.wait_exit(current.pid, WAIT).ok();
    let _ = server.stop(handover::Signal::SIGTERM, WAIT);
    Ok(print_table(&reports, &outcomes, elapsed, final_exit))
}

/// SIGHUP to the serving generation; waits for the next one to be ready and serve, and for
/// the replaced one to exit.
fn good_upgrade(
    server: &Server,
    loads: &[Load],
    current: &handover::testkit::Ready,
) -> Result<(Outcome, Option<handover::testkit::Ready>), String> {
    let trigger = Instant::now();
    server
        .signal(current.pid, handover::Signal::SIGHUP)
        .map_err(|e| e.to_string())?;
    // The first ready line of the next generation that no rolled-back
    // release printed before this trigger.
    let wanted = current.generation + 1;
    let seen: Vec<i32> = server
        .readies()
        .iter()
        .filter(|r| r.generation == wanted)
        .map(|r| r.pid)
        .collect();
    let next = server
        .wait_line(
            |line| {
                handover::testkit::Ready::parse(line)
                    .is_some_and(|r| r.generation == wanted && !seen.contains(&r.pid))
            },
            WAIT,
        )
        .map(|line| handover::testkit::Ready::parse(&line));
    let next = match next {
        Ok(Some(next)) => next,
        Ok(None) => return Err("a ready line that does not parse".to_owned()),
        Err(e) => {
            return Ok((
                Outcome {
                    bad: false,
                    ok: false,
                    ready_after: None,
                    old_exit_after_ready: None,
                    note: e.to_string(),
                },
                None,
            ))
        }
    };
    let ready_after = next.at.saturating_duration_since(trigger);
    // Traffic really moved: the new generation answers the load.
    let tag = format!("pid={} generation={}", next.pid, next.generation);
    loads[0]
        .wait_for_body(|b| b == tag, WAIT)
        .map_err(|e| e.to_string())?;
    let exit = server.wait_exit(current.pid, WAIT);
    let exited_at = Instant::now();
    let (ok, note) = match exit {
        Ok(Exit::Code(0)) | Ok(Exit::ReapedElsewhere) => (true, String::new()),
        Ok(other) => (false, format!("the old generation ended by {other}")),
        Err(e) => (false, format!("the old generation did not exit: {e}")),
    };
    Ok((
        Outcome {
            bad: false,
            ok,
            ready_after: Some(ready_after),
            old_exit_after_ready: Some(exited_at.saturating_duration_since(next.at)),
            note,
        },
        Some(next),
    ))
}

/// Deploys a broken release (`script`), SIGHUPs, and waits for the server to report the
/// failed upgrade; then deploys the good release back.
fn bad_upgrade(
    server: &Server,
    exe: &Path,
    good: &Path,
    current: &handover::testkit::Ready,
    script: &str,
    what: &str,
) -> Result<Outcome, String> {
    deploy(exe, Deploy::Script(script))?;
    let failures_before = server
        .stderr()
        .matches("upgrade failed; this generation keeps serving")
        .count();
    server
        .signal(current.pid, handover::Signal::SIGHUP)
        .map_err(|e| e.to_string())?;
    let result = server.wait_stderr(
        "upgrade failed; this generation keeps serving",
        failures_before + 1,
        READY_TIMEOUT + WAIT,
    );
    deploy(exe, Deploy::Binary(good))?;
    // The serving generation is the same one, alive, answering.
    let rolled_back = result.is_ok()
        && handover::testkit::is_alive(current.pid)
        && server
            .stderr()
            .lines()
            .rev()
            .find(|l| l.contains("resumed: accepting again") || l.contains("upgrade failed"))
            .is_some();
    Ok(Outcome {
        bad: true,
        ok: false,
        ready_after: None,
        old_exit_after_ready: None,
        note: if rolled_back {
            format!(
                "broken release ({what}); generation {} (pid {}) kept serving",
                current.generation, current.pid
            )
        } else {
            format!(
                "broken release: no rollback seen: {}",
                result.err().map_or_else(String::new, |e| e.to_string())
            )
        },
    })
}

/// The progress line, redrawn every 100 ms on a terminal (every 2 s otherwise).
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(progress: Arc<Progress>, loads: &[Load], started: Instant) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Vec<Counters> = loads.iter().map(Load::counters).collect();
        let flag = stop.clone();
        let tty = std::io::stderr().is_terminal();
        let thread = thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let period = if tty {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(2)
                };
                let ok_now = || counters.iter().map(Counters::ok).sum::<u64>();
                let mut last = (Instant::now(), ok_now());
                while !flag.load(Ordering::SeqCst) {
                    let ok = ok_now();
                    let failed: u64 = counters.iter().map(Counters::failed).sum();
                    let since = last.0.elapsed().as_secs_f64();
                    let rate = if since > 0.05 {
                        format!("{:>6.0} req/s", (ok - last.1) as f64 / since)
                    } else {
                        String::new()
                    };
                    last = (Instant::now(), ok);
                    let line = format!(
                        "[{:>4.1}s] upgrade {:>2}/{UPGRADES}  serving: generation {:>2} (pid {})  \
                         requests {:>9}  failed {}  {}",
                        started.elapsed().as_secs_f64(),
                        progress.upgrade.load(Ordering::SeqCst),
                        progress.generation.load(Ordering::SeqCst),
                        progress.pid.load(Ordering::SeqCst),
                        thousands(ok + failed),
                        failed,
                        rate
                    );
                    let mut err = std::io::stderr().lock();
                    let _ = if tty {
                        write!(err, "\r{line}\x1b[K")
                    } else {
                        writeln!(err, "{line}")
                    };
                    let _ = err.flush();
                    drop(err);
                    thread::park_timeout(period);
                }
                if tty {
                    eprintln!();
                }
            })
            .ok();
        Ticker { stop, thread }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn print_table(
    reports: &[(Mode, Report)],
    outcomes: &[Outcome],
    elapsed: Duration,
    final_exit: Option<Exit>,
) -> bool {
    let good: Vec<&Outcome> = outcomes.iter().filter(|o| !o.bad).collect();
    let good_ok = good.iter().filter(|o| o.ok).count();
    let bad_rolled_back = outcomes
        .iter()
        .filter(|o| o.bad && o.note.contains("kept serving"))
        .count();
    let mut ready: Vec<Duration> = good.iter().filter_map(|o| o.ready_after).collect();
    ready.sort_unstable();
    let mut exit: Vec<Duration> = good.iter().filter_map(|o| o.old_exit_after_ready).collect();
    exit.sort_unstable();
    let mut failures = handover::testkit::Failures::default();
    for (_, r) in reports {
        failures.add(&r.failures);
    }
    let requests: u64 = reports.iter().map(|(_, r)| r.requests()).sum();

    println!();
    println!(
        "handover demo: {UPGRADES} upgrades of examples/http_server under load, {:.1} s",
        elapsed.as_secs_f64()
    );
    println!("  machine: {}", common::machine());
    println!();
    println!(
        "  upgrades            {} ok, {} failed ({} rolled back as intended)",
        good_ok,
        outcomes.len() - good_ok,
        bad_rolled_back
    );
    for (i, o) in outcomes.iter().enumerate() {
        if o.bad || !o.ok {
            println!("    upgrade {:>2}: {}", i + 1, o.note);
        }
    }
    if let (Some(first), Some(last)) = (ready.first(), ready.last()) {
        println!(
            "  trigger -> ready    median {}, min {}, max {} ({} upgrades)",
            ms(common::median_d(&ready)),
            ms(*first),
            ms(*last),
            ready.len()
        );
    }
    if !exit.is_empty() {
        println!(
            "  ready -> old exit   median {} (probation, then the old generation drains and exits 0)",
            ms(common::median_d(&exit))
        );
    }
    println!(
        "  requests sent       {} ({} failed)",
        thousands(requests),
        failures.total()
    );
    println!();
    println!(
        "  {:<16} {:>10} {:>8} {:>6} {:>5} {:>9} {:>8} {:>10} {:>6} {:>9} {:>9}",
        "load",
        "requests",
        "refused",
        "reset",
        "eof",
        "timeout",
        "status",
        "other",
        "conns",
        "p50",
        "p99"
    );
    for (mode, r) in reports {
        row(&mode.to_string(), r);
    }
    println!();
    if let Some(exit) = final_exit {
        println!("  final SIGTERM: the last generation drained and ended by {exit}");
    }
    let passed = failures.total() == 0 && good_ok == good.len() && bad_rolled_back == 2;
    if passed {
        println!(
            "  => 0 failed requests across {} upgrades and 2 rolled-back bad releases.",
            good_ok
        );
    } else {
        println!("  => FAILED: see above.");
        for (mode, r) in reports {
            for (class, samples) in &r.samples {
                for s in samples {
                    println!("     {mode} [{class}] {s}");
                }
            }
        }
    }
    passed
}

fn row(mode: &str, r: &Report) {
    let f = &r.failures;
    let lat = |d: Option<Duration>| d.map_or_else(|| "-".to_string(), ms);
    println!(
        "  {:<16} {:>10} {:>8} {:>6} {:>5} {:>9} {:>8} {:>10} {:>6} {:>9} {:>9}",
        mode,
        thousands(r.requests()),
        f.refused,
        f.reset,
        f.eof_before_response,
        f.timeout,
        f.bad_status,
        f.other,
        thousands(r.connections),
        lat(r.p50()),
        lat(r.p99())
    );
}
