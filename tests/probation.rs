//! Probation in library mode: the old generation stays, parked, until the
//! new one has run normally for the window, and serves again at once when it
//! does not (it exits, fails its health check, or crashes after ready).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::load::{self, FailureClass, Load, LoadConfig, Mode};
use common::{deploy, is_alive, Deploy, Exit, ServerProcess, Signal, TempDir};

const WAIT: Duration = Duration::from_secs(20);
const KEEP_ALIVE: usize = 8;
const PER_REQUEST: usize = 4;

struct App {
    server: ServerProcess,
    exe: PathBuf,
    real: PathBuf,
    pid_file: PathBuf,
}

/// `http_server` started from `dir/app` (a copy) with probation options.
fn start(dir: &TempDir, probation_ms: &str) -> App {
    let exe = dir.path().join("app");
    let real = dir.path().join("real");
    let binary = common::example_path("http_server");
    deploy(&exe, Deploy::Binary(&binary));
    deploy(&real, Deploy::Binary(&binary));
    let pid_file = dir.path().join("app.pid");
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0", "--probation-ms", probation_ms])
        .args(["--health-path", "/healthz", "--health-interval-ms", "100"])
        .args(["--health-threshold", "3", "--drain-timeout-ms", "3000"])
        .args(["--failed-drain-timeout-ms", "3000"])
        .arg("--pid-file")
        .arg(&pid_file);
    App {
        server: ServerProcess::spawn(cmd),
        exe,
        real,
        pid_file,
    }
}

impl App {
    /// A release at the app's path that runs the real binary with `extra`.
    fn deploy_release(&self, extra: &str) {
        deploy(
            &self.exe,
            Deploy::Script(&format!("exec {} \"$@\" {extra}", self.real.display())),
        );
    }

    fn wait_stderr(&self, needle: &str) {
        self.server
            .wait_stderr(needle, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Keep-alive and per-request load at once.
fn loads(addr: std::net::SocketAddr) -> (Load, Load) {
    let keep = Load::start(
        LoadConfig::new(
            addr,
            Mode::KeepAlive {
                connections: KEEP_ALIVE,
            },
        )
        .max_duration(Duration::from_secs(60)),
    );
    let fresh = Load::start(
        LoadConfig::new(
            addr,
            Mode::PerRequest {
                concurrency: PER_REQUEST,
            },
        )
        .max_duration(Duration::from_secs(60)),
    );
    keep.wait_for_ok(50, WAIT).expect("keep-alive load flowing");
    fresh
        .wait_for_ok(50, WAIT)
        .expect("per-request load flowing");
    (keep, fresh)
}

#[test]
fn a_good_release_is_promoted_after_probation_under_load() {
    let dir = TempDir::new("probation-good");
    let app = start(&dir, "2000");
    let gen1 = app.server.wait_ready(1);
    let (keep, fresh) = loads(gen1.addr);
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    app.wait_stderr("this generation is parked");
    // During the window the old generation is alive and takes no new
    // connection: every new one reaches the new generation. (A connection
    // queued before the old generation's accept loop saw the park is still
    // its own, correctly: wait for the first one the new generation takes.)
    common::wait_for("a new connection reaching the new generation", WAIT, || {
        let response = load::get(gen1.addr, "/", WAIT).map_err(|e| e.to_string())?;
        let body = response.body_str();
        if body == format!("pid={} generation=2", gen2.pid) {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..20 {
        let response = load::get(gen1.addr, "/", WAIT).expect("a request during probation");
        assert_eq!(
            response.body_str(),
            format!("pid={} generation=2", gen2.pid),
            "a new connection during probation reached the new generation"
        );
    }
    assert!(
        is_alive(gen1.pid),
        "the old generation is alive during probation"
    );
    assert!(
        !app.server.stderr().contains("probation passed"),
        "still on probation after the checks above"
    );
    app.wait_stderr("probation passed");
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    // By the processes' own log clocks: promoted after the 2 s window, and
    // the old generation done by probation + drain.
    let stderr = app.server.stderr();
    let ready = common::log_timestamp(&stderr, "ready generation=2").expect("ready line");
    let passed = common::log_timestamp(&stderr, "probation passed").expect("promotion line");
    let drained =
        common::log_timestamp(&stderr, "drain complete generation=1").expect("drain line");
    assert!(
        passed - ready >= 1.99,
        "promoted {:.3} s after ready, before the 2 s probation",
        passed - ready
    );
    assert!(
        drained - ready < 2.0 + 3.0,
        "the old generation drained {:.3} s after ready: later than probation + drain",
        drained - ready
    );
    assert_eq!(pid_in(&app.pid_file), Some(gen2.pid.as_raw()));
    keep.stop().assert_no_failures();
    fresh.stop().assert_no_failures();
}

#[test]
fn an_unhealthy_release_is_rolled_back_within_the_threshold_under_load() {
    let dir = TempDir::new("probation-unhealthy");
    let app = start(&dir, "10000");
    let gen1 = app.server.wait_ready(1);
    let (keep, fresh) = loads(gen1.addr);
    app.deploy_release("--unhealthy");
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    app.wait_stderr("probation failed: rolled back");
    // threshold × interval + 0.5 s, by the processes' own log clocks (the
    // test's threads may be scheduled late on a busy machine).
    let stderr = app.server.stderr();
    let ready = common::log_timestamp(&stderr, "ready generation=2").expect("ready line");
    let rolled_back =
        common::log_timestamp(&stderr, "probation failed: rolled back").expect("rollback line");
    let detected = rolled_back - ready;
    assert!(
        detected < 0.3 + 0.5,
        "rolled back {detected:.3} s after ready"
    );
    // Stopped gracefully (by its parent, which reaps it).
    assert!(app.server.wait_exit(gen2.pid, WAIT).is_ok());
    app.wait_stderr("failed new generation exited");
    app.wait_stderr("upgrade failed; this generation keeps serving");
    let stderr = app.server.stderr();
    assert!(
        stderr.contains("failed its probation") && stderr.contains("answered 503"),
        "the outcome names the reason:\n{stderr}"
    );
    let response = load::get(gen1.addr, "/", WAIT).expect("the old generation serves");
    assert_eq!(
        response.body_str(),
        format!("pid={} generation=1", gen1.pid)
    );
    assert_eq!(pid_in(&app.pid_file), Some(gen1.pid.as_raw()));
    // The old generation counted the rollback.
    let metrics = load::get(gen1.addr, "/metrics", WAIT)
        .expect("GET /metrics")
        .body_str();
    for line in [
        "handover_generation 1",
        "handover_upgrades_total{outcome=\"probation\"} 1",
        "handover_rollbacks_total{reason=\"health_check\"} 1",
        "handover_parked 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} in:\n{metrics}"
        );
    }
    keep.wait_for_more_ok(50, WAIT).expect("load flows again");
    keep.stop().assert_no_failures();
    fresh.stop().assert_no_failures();

    // A later upgrade works (generation 2 again: numbers count from the
    // serving generation).
    deploy(&app.exe, Deploy::Binary(&app.real));
    app.server
        .signal_pid(gen1.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    common::wait_until(
        "a new generation 2",
        WAIT,
        || {
            app.server
                .readies()
                .iter()
                .any(|r| r.generation == 2 && r.pid != gen2.pid)
        },
        || app.server.dump(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_release_that_crashes_after_ready_is_rolled_back_under_load() {
    let dir = TempDir::new("probation-crash");
    let app = start(&dir, "5000");
    let gen1 = app.server.wait_ready(1);
    let (keep, fresh) = loads(gen1.addr);
    app.deploy_release("--crash-after-ready-ms 300");
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    app.wait_stderr("probation failed: rolled back");
    assert!(app.server.wait_exit(gen2.pid, WAIT).is_ok());
    let stderr = app.server.stderr();
    assert!(
        stderr.contains("exited with status 1") && stderr.contains("after it was ready"),
        "the outcome names the crash:\n{stderr}"
    );
    keep.wait_for_more_ok(50, WAIT).expect("load flows again");
    fresh.wait_for_more_ok(50, WAIT).expect("load flows again");
    let (keep, fresh) = (keep.stop(), fresh.stop());
    let mut failed = 0;
    for report in [&keep, &fresh] {
        // Nothing is refused: the socket never closed.
        assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
        failed += report.failure_total();
    }
    eprintln!(
        "crash after ready: {failed} failed requests (keep-alive {}, per-request {}), \
         at most the {} connections the crashed generation could hold",
        keep.failure_total(),
        fresh.failure_total(),
        KEEP_ALIVE + PER_REQUEST
    );
    assert!(
        failed <= (KEEP_ALIVE + PER_REQUEST) as u64,
        "{failed} failures: more than the crashed process held\n{keep}\n{fresh}"
    );
    assert_eq!(pid_in(&app.pid_file), Some(gen1.pid.as_raw()));
    let response = load::get(gen1.addr, "/", WAIT).expect("the old generation serves");
    assert_eq!(
        response.body_str(),
        format!("pid={} generation=1", gen1.pid)
    );
}

#[test]
fn a_generation_on_probation_refuses_to_upgrade_and_a_stop_ends_both() {
    let dir = TempDir::new("probation-stop");
    let app = start(&dir, "30000");
    let gen1 = app.server.wait_ready(1);
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    app.wait_stderr("this generation is parked");
    app.server
        .signal_pid(gen2.pid, Signal::SIGHUP)
        .expect("SIGHUP gen 2");
    app.wait_stderr("still on probation");
    // SIGTERM to the old generation during the window stops both.
    app.server.signal(Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    assert!(
        !is_alive(gen2.pid),
        "generation 1 waited for generation 2 to stop"
    );
    let stderr = app.server.stderr();
    assert!(
        stderr.contains("failed new generation exited") && !stderr.contains("SIGKILL"),
        "generation 2 drained and exited on the stop signal:\n{stderr}"
    );
}
