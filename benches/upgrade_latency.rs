//! Time from the upgrade trigger to the new generation being ready and to the old
//! generation's exit, split into our overhead and the app's own start-up, for 1, 16 and 256
//! listeners; for the library (`examples/bench_listeners`) and for the entrypoint
//! (`handover run` wrapping `examples/plain_server`).
//!
//! `cargo bench --bench upgrade_latency`. No load runs: this measures the handover itself.
//!
//! - *app startup*: time the app spends initialising before it says it is ready
//!   (`--startup-delay-ms`: 0, or 100 ms to stand for a real app's start-up).
//! - *cold start*: the app started alone, from `spawn` to its ready line, binding its own
//!   sockets: what any restart pays.
//! - *trigger -> ready*: from SIGHUP to the ready line of the next generation.
//! - *ready - app*: trigger -> ready minus the app's start-up: what an upgrade adds (fork and
//!   exec from the old generation or the supervisor, runtime start, passing and validating
//!   the sockets, the ready signal).
//! - *ready - cold*: trigger -> ready minus the cold start: the upgrade against a plain start
//!   (negative when inheriting the sockets is cheaper than binding them).
//! - *trigger -> old exit*: until the replaced generation has exited (it drains nothing here).
//!
//! With `--startup-delay-ms 100` the app spends 100 ms initialising before it is ready: the
//! trigger -> ready time grows by the same 100 ms, while the old generation serves meanwhile.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{Ready, Server};

/// Samples (cold starts, and upgrades) per configuration.
const SAMPLES: usize = 15;
const WAIT: Duration = Duration::from_secs(20);
const LISTENERS: [usize; 3] = [1, 16, 256];
const DELAY_MS: u64 = 100;

struct Row {
    app: String,
    listeners: usize,
    delay_ms: u64,
    cold: Vec<Duration>,
    ready: Vec<Duration>,
    old_exit: Vec<Duration>,
}

fn main() {
    common::main("upgrade_latency", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["bench_listeners", "plain_server"])?;
    let (bench_listeners, plain_server) = (&built[0], &built[1]);
    let handover = common::build_handover_bin()?;
    println!("\nupgrade latency, no load ({SAMPLES} samples each, medians)");
    println!("machine: {}", common::machine());

    let mut rows = Vec::new();
    let mut configs: Vec<(usize, u64)> = LISTENERS.iter().map(|n| (*n, 0)).collect();
    configs.push((1, DELAY_MS));
    for (n, delay) in &configs {
        let app = || {
            let mut cmd = Command::new(bench_listeners);
            cmd.args(["--listeners", &n.to_string()])
                .args(["--startup-delay-ms", &delay.to_string()]);
            cmd
        };
        let cold = cold_starts(app)?;
        let (ready, old_exit) = upgrades(app(), false)?;
        rows.push(Row {
            app: "library: bench_listeners".into(),
            listeners: *n,
            delay_ms: *delay,
            cold,
            ready,
            old_exit,
        });
    }
    if let Some(handover) = &handover {
        for (n, delay) in &configs {
            let app = || {
                let mut cmd = Command::new(plain_server);
                cmd.args(["--listen", "127.0.0.1:0"])
                    .args(["--startup-delay-ms", &delay.to_string()]);
                cmd
            };
            let cold = cold_starts(app)?;
            let dir = common::TempDir::new("bench-latency")?;
            let mut cmd = Command::new(handover);
            cmd.arg("run");
            for i in 0..*n {
                cmd.args(["--listen", &format!("l{i}=tcp://127.0.0.1:0")]);
            }
            cmd.arg("--control")
                .arg(dir.path().join("control.sock"))
                .arg("--")
                .arg(plain_server)
                .args(["--startup-delay-ms", &delay.to_string()]);
            let (ready, old_exit) = upgrades(cmd, true)?;
            rows.push(Row {
                app: "entrypoint: handover run + plain_server".into(),
                listeners: *n,
                delay_ms: *delay,
                cold,
                ready,
                old_exit,
            });
        }
    }

    println!(
        "\n| {:<40} | {:>9} | {:>11} | {:>10} | {:>16} | {:>13} | {:>13} | {:>19} |",
        "app",
        "listeners",
        "app startup",
        "cold start",
        "trigger -> ready",
        "ready - app",
        "ready - cold",
        "trigger -> old exit"
    );
    println!(
        "|{:-<42}|{:->11}|{:->13}|{:->12}|{:->18}|{:->15}|{:->15}|{:->21}|",
        "", "", "", "", "", "", "", ""
    );
    for row in &rows {
        let cold = common::median_d(&row.cold);
        let ready = common::median_d(&row.ready);
        let signed = |a: Duration, b: Duration| {
            let ms = (a.as_secs_f64() - b.as_secs_f64()) * 1e3;
            format!("{ms:+.2} ms")
        };
        println!(
            "| {:<40} | {:>9} | {:>8} ms | {:>10} | {:>16} | {:>13} | {:>13} | {:>19} |",
            row.app,
            row.listeners,
            row.delay_ms,
            common::ms(cold),
            common::ms(ready),
            signed(ready, Duration::from_millis(row.delay_ms)),
            signed(ready, cold),
            common::ms(common::median_d(&row.old_exit))
        );
    }
    println!(
        "\napp startup: time the app spends initialising (--startup-delay-ms); cold start: the app \
         alone, spawn -> ready, binding its own sockets;\nready - app: what an upgrade adds to the \
         app's initialisation (fork/exec, runtime start, passing and validating the sockets, the \
         ready signal);\nready - cold: the same compared with a plain start of the app \
         (negative when inheriting sockets is cheaper than binding them)."
    );
    if handover.is_none() {
        println!(
            "| entrypoint: n/a, `handover run` is not in this tree yet (src/bin/handover.rs) |"
        );
    }
    println!("upgrade_latency took {:.0?}", started.elapsed());
    Ok(())
}

/// Starts the app alone SAMPLES times: spawn -> ready line, each time.
fn cold_starts(app: impl Fn() -> Command) -> Result<Vec<Duration>, String> {
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        let t0 = Instant::now();
        let server = Server::spawn(app()).map_err(|e| e.to_string())?;
        common::register_group(server.pid());
        let ready = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
        times.push(ready.at.saturating_duration_since(t0));
        let _ = server.stop(handover::Signal::SIGTERM, WAIT);
    }
    Ok(times)
}

/// Starts `cmd` and upgrades it SAMPLES times, one after another: SIGHUP to the serving
/// generation (or to the supervisor, the process started, if `to_started`), then the next
/// ready line, then the replaced generation's exit.
fn upgrades(cmd: Command, to_started: bool) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    let mut current: Ready = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let (mut ready, mut old_exit) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let target = if to_started {
            server.pid()
        } else {
            current.pid
        };
        let trigger = Instant::now();
        server
            .signal(target, handover::Signal::SIGHUP)
            .map_err(|e| e.to_string())?;
        let next = server
            .wait_ready(current.generation + 1, WAIT)
            .map_err(|e| e.to_string())?;
        ready.push(next.at.saturating_duration_since(trigger));
        server
            .wait_exit(current.pid, WAIT)
            .map_err(|e| e.to_string())?;
        old_exit.push(trigger.elapsed());
        current = next;
    }
    let _ = server.stop(handover::Signal::SIGTERM, WAIT);
    Ok((ready, old_exit))
}
