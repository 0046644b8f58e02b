//! Probation under `handover run` (issue 8), with real processes, sockets and load:
//!
//! - canary (`plain_server`, an unmodified app): a good release is promoted only after the
//!   window, with the old pid alive meanwhile and 0 failed requests; a release that crashes
//!   300 ms after ready is rolled back with 0 refused connections (the failures, at most the
//!   connections the crashed process held, are counted and printed); an exec-probe failure is
//!   rolled back with 0 failed requests; `handover upgrade` exits 0 or 1 accordingly, the PID
//!   file names the old generation again and a later upgrade works;
//! - parked (a Python app that speaks the control channel, `tests/support/parkable_app.py`):
//!   the old generation is told to park, takes no new connection during the window, and is
//!   told to resume when the new one says `unhealthy`;
//! - a liveness restart after promotion, and a crash-loop fallback to the previous release
//!   after the file on disk was replaced by one that crashes every time;
//! - gunicorn whose new release exits 1 s after its READY=1;
//! - SIGTERM during probation stops both generations.
//!
//! The health check needs the listener's address on the command line: the tests take a port
//! from :0 (bound and closed) and give it to both `--listen` and `--health`.

mod common;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{get, FailureClass, Load, LoadConfig, Mode};
use common::{is_alive, wait_for, Exit, Signal};
use support::{
    free_port, handover, python, run_with_deadline, wait_stderr, Output, Supervised, TempDir, Tier,
};

const T: Duration = Duration::from_secs(20);

fn plain_server() -> PathBuf {
    common::example_path("plain_server")
}

/// Deploys a release at `path`: a bash script that runs `plain_server` with `extra`
/// arguments, written beside it and renamed over it (a new file, as a deploy makes).
fn release(path: &Path, extra: &str) {
    let tmp = path.with_extension("new");
    let body = format!(
        "#!/bin/bash\nexec -a \"$0\" '{}' \"$@\" {extra}\n",
        plain_server().display()
    );
    std::fs::write(&tmp, body).expect("write the release");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename the release into place");
}

/// `handover upgrade` in a thread, so that the test can look at the window meanwhile.
fn upgrade_in_background(sv: &Supervised) -> std::thread::JoinHandle<Output> {
    let mut cmd = Command::new(handover());
    cmd.arg("upgrade")
        .arg("--control")
        .arg(&sv.control)
        .args(["--timeout", "30s"]);
    std::thread::spawn(move || run_with_deadline(cmd, Duration::from_secs(40)))
}

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Waits until `status --json` contains every one of `needles`; returns it.
fn wait_status(sv: &Supervised, needles: &[&str]) -> String {
    wait_for(format!("status with {needles:?}"), T, || {
        let status = sv.status_json();
        if needles.iter().all(|n| status.contains(n)) {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()))
}

struct Canary {
    dir: TempDir,
    app: PathBuf,
    pid_file: PathBuf,
    sv: Supervised,
}

/// `handover run` of a `plain_server` release with `--probation` and `options`.
fn canary(tag: &str, probation: &str, options: &[&str]) -> Canary {
    let dir = TempDir::new(tag);
    let app = dir.join("app");
    release(&app, "");
    let pid_file = dir.join("app.pid");
    let port = free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--probation",
        probation,
        "--drain-timeout",
        "5s",
        "--failed-drain-timeout",
        "5s",
        "--pid-file",
        pid_file.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(options);
    let sv = Supervised::start(Tier::Subreaper, &dir, &args, &[app.as_os_str()]);
    Canary {
        dir,
        app,
        pid_file,
        sv,
    }
}

/// Keep-alive and per-request load on `addr`, flowing.
fn loads(addr: std::net::SocketAddr) -> [Load; 2] {
    let loads = [
        Load::start(
            LoadConfig::new(addr, Mode::KeepAlive { connections: 4 })
                .max_duration(Duration::from_secs(60)),
        ),
        Load::start(
            LoadConfig::new(addr, Mode::PerRequest { concurrency: 4 })
                .max_duration(Duration::from_secs(60)),
        ),
    ];
    for load in &loads {
        load.wait_for_ok(30, T).expect("load flowing");
    }
    loads
}

#[test]
fn canary_good_release_is_promoted_after_probation_under_load() {
    // The health check probes the listener's own address.
    let port = free_port();
    let health = format!("http://127.0.0.1:{port}/healthz");
    let dir = TempDir::new("promote");
    let app = dir.join("app");
    release(&app, "");
    let pid_file = dir.join("app.pid");
    let listen = format!("tcp://127.0.0.1:{port}");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            &listen,
            "--probation",
            "1500ms",
            "--health",
            &health,
            "--health-interval",
            "100ms",
            "--drain-timeout",
            "5s",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        &[app.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    let loads = loads(first.addr);
    release(&app, "");
    let upgrade = upgrade_in_background(&sv);
    let second = sv.server.wait_ready(2);
    let ready_seen = Instant::now();
    let status = wait_status(&sv, &["\"state\":\"probation\"", "\"mode\":\"canary\""]);
    assert!(
        status.contains(&format!("\"old_pid\":{}", first.pid)),
        "{status}"
    );
    // Canary: both accept (new connections reach the new one too; keep-alive connections
    // stay where they are); the old one is alive through the window.
    assert!(
        is_alive(first.pid),
        "the old generation left during the window"
    );
    loads[1]
        .wait_for_body(|b| b.starts_with(&format!("pid={} ", second.pid)), T)
        .expect("the new generation serves");
    let before_end = ready_seen.elapsed() < Duration::from_millis(1500);
    assert!(
        !before_end || is_alive(first.pid),
        "the old generation left during the window"
    );
    assert_eq!(pid_in(&pid_file), Some(second.pid.as_raw()));
    let out = upgrade.join().expect("the client thread");
    let took = ready_seen.elapsed();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    assert!(out.stdout.contains("on probation for 1.50s"), "{out:?}");
    assert!(
        out.stdout.contains("promoted after 1.5") && out.stdout.contains("on probation (canary;"),
        "{out:?}"
    );
    assert!(
        took >= Duration::from_millis(1300),
        "the outcome came {took:?} after ready, before the window ended"
    );
    wait_stderr(&sv, "old generation exited generation=1", T);
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        report.assert_no_failures();
    }
    let status = sv.status_json();
    assert!(status.contains("\"probation\":null"), "{status}");
    assert!(status.contains("\"check\":\"http://127.0.0.1:"), "{status}");
    assert!(status.contains("\"last_rollback\":null"), "{status}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn canary_release_crashing_after_ready_is_rolled_back_under_load() {
    let c = canary("crash", "3s", &[]);
    let first = c.sv.server.wait_ready(1);
    let loads = loads(first.addr);
    release(&c.app, "--crash-after-ready-ms 300");
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    let second = c.sv.server.wait_ready(2);
    assert!(
        out.stdout.contains(&format!(
            "failed: generation 2 (pid {}) exited with status 1 during its probation, ",
            second.pid
        )),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("generation 1 (pid {}) keeps serving", first.pid)),
        "{out:?}"
    );
    assert!(!is_alive(second.pid) || common::proc_stat(second.pid).is_none());
    assert_eq!(pid_in(&c.pid_file), Some(first.pid.as_raw()));
    let status = c.sv.status_json();
    assert!(
        status.contains("\"last_rollback\":{\"generation\":2,")
            && status.contains("during its probation"),
        "{status}"
    );
    // The old generation serves on, and a later (good) upgrade works.
    for load in &loads {
        load.wait_for_more_ok(30, T).expect("generation 1 serves");
    }
    release(&c.app, "");
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", c.sv.server.dump());
    let third = c.sv.server.wait_ready(3);
    for load in &loads {
        load.wait_for_body(|b| b.starts_with(&format!("pid={} ", third.pid)), T)
            .expect("generation 3 serves");
    }
    let mut failed = 0;
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
        failed += report.failure_total();
    }
    // At most the connections the crashed process held: 4 keep-alive connections and 4
    // requests in flight.
    eprintln!("failed requests in the crash rollback: {failed}");
    assert!(failed <= 8, "{failed} failed requests");
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
    drop(c.dir);
}

#[test]
fn canary_exec_probe_failure_is_rolled_back_under_load() {
    let c = canary(
        "exec",
        "5s",
        &[
            "--health",
            "exec:test \"$HANDOVER_GENERATION\" != 2",
            "--health-interval",
            "100ms",
            "--health-threshold",
            "3",
        ],
    );
    let first = c.sv.server.wait_ready(1);
    let loads = loads(first.addr);
    release(&c.app, "");
    let upgrade = upgrade_in_background(&c.sv);
    let second = c.sv.server.wait_ready(2);
    let ready_seen = Instant::now();
    assert!(is_alive(first.pid));
    let out = upgrade.join().expect("the client thread");
    let took = ready_seen.elapsed();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    assert!(
        out.stdout.contains(&format!(
            "failed: generation 2 (pid {}) failed its probation",
            second.pid
        )) && out
            .stdout
            .contains("3 health checks failed in a row, the last: `test \"$HANDOVER_GENERATION\" != 2` exited with status 1"),
        "{out:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "rolled back {took:?} after ready: not before the window's end"
    );
    assert!(is_alive(first.pid), "the old generation must serve on");
    assert_eq!(pid_in(&c.pid_file), Some(first.pid.as_raw()));
    // A later upgrade passes its probation (generation 3 is healthy).
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", c.sv.server.dump());
    assert!(out.stdout.contains("health checks passed"), "{out:?}");
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        report.assert_no_failures();
    }
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
}

#[test]
fn sigterm_during_probation_stops_both_generations() {
    let c = canary("sigterm", "30s", &[]);
    let first = c.sv.server.wait_ready(1);
    let upgrade = upgrade_in_background(&c.sv);
    let second = c.sv.server.wait_ready(2);
    wait_status(&c.sv, &["\"state\":\"probation\""]);
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("the supervisor is stopping"), "{out:?}");
    for pid in [first.pid, second.pid] {
        assert!(
            common::proc_stat(pid).is_none(),
            "{pid} outlived the supervisor"
        );
    }
}

#[test]
fn liveness_failures_restart_the_current_generation() {
    let dir = TempDir::new("liveness");
    let sick = dir.join("sick");
    let health = format!("exec:test ! -e '{}'", sick.display());
    let app = dir.join("app");
    release(&app, "");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--health",
            &health,
            "--health-interval",
            "100ms",
            "--health-threshold",
            "2",
            "--drain-timeout",
            "5s",
        ],
        &[app.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    wait_status(&sv, &["\"failures_in_a_row\":0,\"last\":\"healthy\""]);
    let load = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 2 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(20, T).expect("load flowing");
    std::fs::write(&sick, "").unwrap();
    wait_stderr(&sv, "liveness check failed: restarting the generation", T);
    std::fs::remove_file(&sick).unwrap();
    let second = sv.server.wait_ready(2);
    assert_ne!(second.pid, first.pid);
    load.wait_for_body(|b| b == format!("pid={} generation=2", second.pid), T)
        .expect("the restarted generation serves");
    let status = wait_status(&sv, &["\"restarts\":1"]);
    assert!(status.contains("\"generation\":2"), "{status}");
    let report = load.stop();
    eprintln!("{report}");
    // The sockets stayed open: nothing was refused while the generation restarted.
    assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
    report.assert_no_failures();
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn a_crash_looping_release_falls_back_to_the_previous_one() {
    let dir = TempDir::new("fallback");
    let app = dir.join("app");
    release(&app, "");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--listen", "tcp://127.0.0.1:0", "--drain-timeout", "5s"],
        &[app.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    // No probation: the broken release is promoted, then crashes every time it starts.
    release(&app, "--crash-after-ready-ms 50");
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_stderr(&sv, "crash loop: falling back to the previous release", T);
    // 1 good, 1 promoted broken one, 5 restarts of it, then the fallback: generation 8.
    let back = sv.server.wait_ready(8);
    assert_eq!(back.addr, first.addr);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", back.pid)).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        !cmdline.contains("--crash-after-ready-ms"),
        "the fallback runs the broken release: {cmdline}"
    );
    // It serves, and keeps serving (the broken one died 50 ms after ready).
    let body = get(back.addr, "/", T).expect("GET /").body_str();
    assert_eq!(body, format!("pid={} generation=8", back.pid));
    let load =
        Load::start(LoadConfig::new(back.addr, Mode::KeepAlive { connections: 2 }).max_duration(T));
    load.wait_for_ok(200, T).expect("the fallback serves");
    assert!(is_alive(back.pid), "{}", sv.server.dump());
    load.stop().assert_no_failures();
    // The file on disk is still the broken release.
    assert!(std::fs::read_to_string(&app)
        .unwrap()
        .contains("--crash-after-ready-ms"));
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn parked_old_generation_takes_no_new_connection_and_resumes_on_rollback() {
    let Some(python) = python() else {
        return;
    };
    let dir = TempDir::new("parked");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/parkable_app.py");
    let verdict = dir.join("verdict");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--probation",
            "1500ms",
            "--drain-timeout",
            "5s",
        ],
        &[python.as_os_str(), script.as_os_str(), verdict.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(30, T).expect("load flowing");

    // A good release: generation 1 parks; every new connection reaches generation 2.
    let upgrade = upgrade_in_background(&sv);
    let second = sv.server.wait_ready(2);
    sv.server
        .wait_line(|l| l == format!("parked pid={}", first.pid), T)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_status(&sv, &["\"state\":\"probation\"", "\"mode\":\"parked\""]);
    let during = load.snapshot();
    let mut fresh = 0;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let body = get(first.addr, "/", T)
            .expect("GET during the window")
            .body_str();
        assert_eq!(
            body,
            format!("pid={} generation=2", second.pid),
            "a new connection reached the parked generation"
        );
        fresh += 1;
    }
    assert!(is_alive(first.pid));
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    assert!(out.stdout.contains("on probation (parked;"), "{out:?}");
    sv.server
        .wait_line(|l| l == format!("promoted pid={}", second.pid), T)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_stderr(&sv, "old generation exited generation=1", T);
    eprintln!(
        "{fresh} fresh connections during the window, all to generation 2; load before: {}",
        during.ok
    );

    // A release that says `unhealthy` during its probation: generation 2 parks, then resumes.
    std::fs::write(&verdict, "unhealthy").unwrap();
    let upgrade = upgrade_in_background(&sv);
    let third = sv.server.wait_ready(3);
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(1), "{out:?}\n{}", sv.server.dump());
    assert!(
        out.stdout.contains(&format!(
            "failed: generation 3 (pid {}) failed its probation",
            third.pid
        )) && out.stdout.contains("the app says it is unhealthy: told to"),
        "{out:?}"
    );
    sv.server
        .wait_line(|l| l == format!("resumed pid={}", second.pid), T)
        .unwrap_or_else(|e| panic!("{e}"));
    let body = get(first.addr, "/", T)
        .expect("GET after the rollback")
        .body_str();
    assert_eq!(body, format!("pid={} generation=2", second.pid));
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn gunicorn_release_exiting_after_ready_is_rolled_back_under_load() {
    let Some(python) = python() else {
        return;
    };
    let has_gunicorn = Command::new(&python)
        .args(["-c", "import gunicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_gunicorn {
        assert!(
            std::env::var_os("CI").is_none(),
            "skipping: gunicorn is not installed (in CI)"
        );
        eprintln!("skipping: gunicorn is not installed (pip install gunicorn)");
        return;
    }
    let dir = TempDir::new("gunicorn");
    let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    // The broken release: its arbiter exits 1 s after it said READY=1 (gunicorn sends
    // READY=1, then calls when_ready).
    let crash = dir.join("crash.conf.py");
    std::fs::write(
        &crash,
        "import os, threading\n\ndef when_ready(server):\n    \
         threading.Timer(1.0, lambda: os._exit(1)).start()\n",
    )
    .unwrap();
    let app = dir.join("app");
    let deploy = |extra: &str| {
        let tmp = app.with_extension("new");
        let body = format!(
            "#!/bin/bash\nexec '{}' -m gunicorn --workers 2 --chdir '{}' {extra} wsgi_app:app\n",
            python.display(),
            support.display()
        );
        std::fs::write(&tmp, body).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &app).unwrap();
    };
    deploy("");
    let sv = Supervised::start_with(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--probation",
            "3s",
            "--drain-timeout",
            "10s",
        ],
        &[app.as_os_str()],
        |cmd| {
            cmd.env("HOME", dir.path());
        },
    );
    wait_stderr(&sv, "generation ready generation=1", T);
    let status = sv.status_json();
    let addr: std::net::SocketAddr = status
        .split("\"address\":\"tcp://")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {status}"));
    wait_for("gunicorn generation 1 serving", T, || {
        get(addr, "/", T)
            .ok()
            .filter(|r| r.is_success() && r.body_str().ends_with("generation=1"))
            .ok_or("not yet".to_owned())
    })
    .expect("generation 1 serves");
    let load = Load::start(
        LoadConfig::new(addr, Mode::PerRequest { concurrency: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(50, T).expect("load flowing");
    deploy(&format!("-c '{}'", crash.display()));
    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", sv.server.dump());
    // It exits 1 s after it sent READY=1; the supervisor saw READY=1 a moment later.
    let after_ready = out
        .stdout
        .split("exited with status 1 during its probation, ")
        .nth(1)
        .and_then(|rest| rest.split(" after ready").next())
        .and_then(|d| {
            d.strip_suffix("ms")
                .and_then(|ms| ms.parse::<f64>().ok())
                .or_else(|| d.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1000.0))
        })
        .unwrap_or_else(|| panic!("no time after ready in {out:?}"));
    assert!(
        (800.0..3000.0).contains(&after_ready),
        "failed {after_ready} ms after ready: {out:?}"
    );
    assert!(out.stdout.contains("generation 1 (pid "), "{out:?}");
    // Generation 1 serves on; a good release is promoted after its probation.
    load.wait_for_more_ok(50, T).expect("generation 1 serves");
    deploy("");
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    load.wait_for_body(|b| b.ends_with("generation=3"), T)
        .expect("generation 3 serves");
    let report = load.stop();
    eprintln!("{report}");
    // gunicorn's workers of the crashed arbiter may hold requests when it dies; nothing is
    // refused, and failures are at most the requests in flight.
    assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
    eprintln!(
        "failed requests in the gunicorn rollback: {}",
        report.failure_total()
    );
    assert!(report.failure_total() <= 4, "{report}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

// ---- parked: the library's `http_server` ---------------------------------------------------

/// Deploys a release of the library's `http_server` at `path` (a bash script, as above).
fn library_release(path: &Path, extra: &str) {
    let tmp = path.with_extension("new");
    let body = format!(
        "#!/bin/bash\nexec -a \"$0\" '{}' \"$@\" --listen 127.0.0.1:0 {extra}\n",
        support::http_server().display()
    );
    std::fs::write(&tmp, body).expect("write the release");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename the release into place");
}

/// `handover run` of an `http_server` release on a port that `--health` can name.
fn library(tag: &str, probation: &str, health: bool) -> Canary {
    let dir = TempDir::new(tag);
    let app = dir.join("app");
    library_release(&app, "");
    let pid_file = dir.join("app.pid");
    let port = free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let check = format!("http://127.0.0.1:{port}/healthz");
    let mut args = vec![
        "--listen",
        &listen,
        "--probation",
        probation,
        "--drain-timeout",
        "5s",
        "--failed-drain-timeout",
        "5s",
        "--pid-file",
        pid_file.to_str().expect("utf-8 path"),
    ];
    if health {
        args.extend_from_slice(&[
            "--health",
            &check,
            "--health-interval",
            "100ms",
            "--health-threshold",
            "3",
        ]);
    }
    let sv = Supervised::start(Tier::Subreaper, &dir, &args, &[app.as_os_str()]);
    Canary {
        dir,
        app,
        pid_file,
        sv,
    }
}

#[test]
fn parked_library_release_is_promoted_under_load_and_the_old_one_takes_no_new_connection() {
    let c = library("lib-promote", "2s", true);
    let first = c.sv.server.wait_ready(1);
    wait_stderr(&c.sv, "generation can be parked generation=1", T);
    let loads = loads(first.addr);
    library_release(&c.app, "");
    let upgrade = upgrade_in_background(&c.sv);
    let second = c.sv.server.wait_ready(2);
    let ready_seen = Instant::now();
    wait_status(&c.sv, &["\"state\":\"probation\"", "\"mode\":\"parked\""]);
    // Every new connection during the window reaches the new generation.
    let mut fresh = 0;
    while ready_seen.elapsed() < Duration::from_millis(1500) {
        let body = get(first.addr, "/", T)
            .expect("GET during the window")
            .body_str();
        assert_eq!(
            body,
            format!("pid={} generation=2", second.pid),
            "a new connection reached the parked generation"
        );
        fresh += 1;
    }
    assert!(
        is_alive(first.pid),
        "the old generation left during the window"
    );
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(0), "{out:?}\n{}", c.sv.server.dump());
    assert!(out.stdout.contains("on probation (parked;"), "{out:?}");
    wait_stderr(&c.sv, "old generation exited generation=1", T);
    eprintln!("{fresh} new connections during the window, all to generation 2");
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        report.assert_no_failures();
    }
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
}

#[test]
fn parked_unhealthy_library_release_is_rolled_back_in_time_under_load() {
    let c = library("lib-unhealthy", "5s", true);
    let first = c.sv.server.wait_ready(1);
    wait_stderr(&c.sv, "generation can be parked generation=1", T);
    let loads = loads(first.addr);
    library_release(&c.app, "--unhealthy");
    let upgrade = upgrade_in_background(&c.sv);
    let second = c.sv.server.wait_ready(2);
    let ready_seen = Instant::now();
    wait_stderr(&c.sv, "probation failed: rolling back generation=2", T);
    let took = ready_seen.elapsed();
    // threshold × interval + 0.5 s
    assert!(
        took <= Duration::from_millis(3 * 100 + 500),
        "rolled back {took:?} after ready"
    );
    eprintln!("unhealthy release rolled back {took:?} after its ready line");
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    assert!(
        out.stdout
            .contains("3 health checks failed in a row, the last: GET /healthz answered 503"),
        "{out:?}"
    );
    wait_stderr(&c.sv, "old generation told to resume generation=1", T);
    assert!(common::proc_stat(second.pid).is_none() || !is_alive(second.pid));
    assert_eq!(pid_in(&c.pid_file), Some(first.pid.as_raw()));
    for load in &loads {
        load.wait_for_more_ok(30, T)
            .expect("generation 1 serves again");
    }
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        report.assert_no_failures();
    }
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
}

#[test]
fn parked_library_release_crashing_after_ready_is_rolled_back_under_load() {
    let c = library("lib-crash", "3s", false);
    let first = c.sv.server.wait_ready(1);
    wait_stderr(&c.sv, "generation can be parked generation=1", T);
    let loads = loads(first.addr);
    library_release(&c.app, "--crash-after-ready-ms 300");
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    assert!(
        out.stdout
            .contains("exited with status 1 during its probation"),
        "{out:?}"
    );
    wait_stderr(&c.sv, "old generation told to resume generation=1", T);
    assert_eq!(pid_in(&c.pid_file), Some(first.pid.as_raw()));
    for load in &loads {
        load.wait_for_more_ok(30, T)
            .expect("generation 1 serves again");
    }
    let mut failed = 0;
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
        failed += report.failure_total();
    }
    eprintln!("failed requests in the parked crash rollback: {failed}");
    assert!(failed <= 8, "{failed} failed requests");
    c.sv.signal(Signal::SIGTERM);
    assert_eq!(c.sv.wait_exit(T), Exit::Code(0), "{}", c.sv.server.dump());
}

/// A bash release of `plain_server` that sends sd_notify watchdog messages
/// with `systemd-notify` from a helper loop beside it: `pings` is what the
/// loop does (its own timing is the release's behaviour, not the test's).
fn watchdog_release(path: &Path, pings: &str) {
    let tmp = path.with_extension("new");
    let body = format!(
        "#!/bin/bash\n( {pings} ) &\nexec -a \"$0\" '{}' \"$@\"\n",
        plain_server().display()
    );
    std::fs::write(&tmp, body).expect("write the release");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename the release into place");
}

#[test]
fn the_watchdog_promotes_a_release_that_keeps_pinging_and_rolls_back_the_others() {
    if !Path::new("/usr/bin/systemd-notify").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "skipping: no systemd-notify (in CI)"
        );
        eprintln!("skipping: no systemd-notify");
        return;
    }
    let c = canary("watchdog", "2s", &["--watchdog", "600ms"]);
    let pinging = "while sleep 0.1; do systemd-notify WATCHDOG=1; done";
    watchdog_release(&c.app, pinging);
    let gen1 = c.sv.server.wait_ready(1);
    // Keeps pinging: promoted.
    watchdog_release(&c.app, pinging);
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", c.sv.server.dump());
    let gen2 = c.sv.server.wait_ready(2);
    // Stops pinging after a few keep-alives: rolled back for the missed one.
    watchdog_release(
        &c.app,
        "for i in 1 2 3; do sleep 0.1; systemd-notify WATCHDOG=1; done; sleep 30",
    );
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    assert!(
        out.stdout.contains("no WATCHDOG=1 within 600ms"),
        "the reason names the watchdog: {out:?}"
    );
    // Asks for it: WATCHDOG=trigger fails the probation at once.
    watchdog_release(
        &c.app,
        "sleep 0.3; systemd-notify WATCHDOG=trigger; sleep 30",
    );
    let out = c.sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", c.sv.server.dump());
    assert!(out.stdout.contains("WATCHDOG=trigger"), "{out:?}");
    let body = get(gen1.addr, "/", T)
        .expect("generation 2 serves")
        .body_str();
    assert_eq!(body, format!("pid={} generation=2", gen2.pid));
}
