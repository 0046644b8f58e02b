//! `handover run --admin`, run directly (no container): `/readyz` flips to 503 within 10 ms
//! of SIGTERM and stays 503 through the shutdown delay while the app still serves;
//! `handover status --check` agrees; `/metrics` parses with `prometheus_client` and its
//! counters move with upgrades, a rollback, a crash restart and drains.

mod admin_kit;
mod common;
mod support;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use admin_kit::{http_get, parse_metrics, status_of};
use common::{wait_for, Signal};
use support::{http_server, wait_ready_in, Supervised, TempDir, Tier};

const T: Duration = Duration::from_secs(20);
/// How fast `/readyz` must flip after SIGTERM.
const FLIP: Duration = Duration::from_millis(10);

/// The `--admin` address the supervisor logged (it was given port 0).
fn admin_addr(sv: &Supervised) -> SocketAddr {
    wait_for("the admin listener's address in the log", T, || {
        let err = sv.server.stderr();
        err.lines()
            .find(|l| l.contains("admin listener"))
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{} bytes of stderr", err.len()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()))
}

fn check(sv: &Supervised) -> (Option<i32>, String) {
    let out = sv.client(&["status", "--check"], Duration::from_secs(10));
    (out.code, out.stdout)
}

/// The app as a script, so that a flag file can break the next release: with `<dir>/broken`
/// present it exits 3 before it is ready.
fn start(dir: &TempDir, extra: &[&str]) -> (Supervised, std::path::PathBuf) {
    let log = dir.join("ready.log");
    let script = format!(
        "if [ -e '{}' ]; then echo broken >&2; exit 3; fi; exec \"$0\" \"$@\" >>'{}'",
        dir.join("broken").display(),
        log.display()
    );
    let server = http_server();
    let mut options = vec![
        "--listen",
        "http=tcp://127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--ready-timeout",
        "10s",
        "--drain-timeout",
        "10s",
    ];
    options.extend_from_slice(extra);
    let sv = Supervised::start(
        Tier::Subreaper,
        dir,
        &options,
        &[
            OsStr::new("/bin/sh"),
            OsStr::new("-c"),
            OsStr::new(&script),
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    (sv, log)
}

#[test]
fn readyz_flips_within_10ms_of_sigterm_and_stays_503_through_the_shutdown_delay() {
    let dir = TempDir::new("admin-readyz");
    let (sv, log) = start(&dir, &["--shutdown-delay", "2s"]);
    let admin = admin_addr(&sv);
    let first = wait_ready_in(&log, 1, T).unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    wait_for("/readyz 200", T, || match http_get(admin, "/readyz", T) {
        Ok((200, body)) => Ok(body),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
    assert_eq!(status_of(admin, "/livez"), 200);
    assert_eq!(status_of(admin, "/nope"), 404);
    let (code, line) = check(&sv);
    assert_eq!(code, Some(0), "status --check while serving: {line}");
    assert!(line.starts_with("healthy: generation 1"), "{line}");

    // Just before the signal, it is still 200: what follows measures the flip.
    assert_eq!(status_of(admin, "/readyz"), 200);
    let sent = Instant::now();
    sv.signal(Signal::SIGTERM);
    let mut polls = 0;
    let flipped = loop {
        polls += 1;
        let status = status_of(admin, "/readyz");
        if status == 503 {
            break sent.elapsed();
        }
        assert_eq!(status, 200, "/readyz answered {status} after SIGTERM");
        assert!(sent.elapsed() < T, "/readyz never flipped to 503");
    };
    eprintln!("/readyz flipped to 503 {flipped:?} after SIGTERM ({polls} polls)");
    assert!(
        flipped <= FLIP,
        "/readyz flipped after {flipped:?} (more than {FLIP:?})"
    );

    // Through the shutdown delay: 503 on every poll, the app still serves, and `status
    // --check` says unhealthy; until the supervisor logs the end of the delay.
    let (code, line) = check(&sv);
    assert_eq!(
        code,
        Some(1),
        "status --check during the shutdown delay: {line}"
    );
    assert!(line.contains("shutting-down"), "{line}");
    let mut served = 0;
    let mut readyz_polls = 0;
    // The log is read by a thread and may lag: the supervisor may already be gone (its
    // admin listener with it) when the line shows; that ends the polls too.
    while !sv.server.stderr().contains("shutdown delay over") {
        let Ok((status, body)) = http_get(admin, "/readyz", T) else {
            break;
        };
        assert_eq!((status, body.as_str()), (503, "not ready: stopping\n"));
        readyz_polls += 1;
        if served < 20 {
            let (status, _) = http_get(first.addr, "/", T).expect("the app during the delay");
            assert_eq!(status, 200, "the app must serve through the shutdown delay");
            served += 1;
        }
        assert!(sent.elapsed() < T, "the shutdown delay never ended");
    }
    let delay_seen = sent.elapsed();
    support::wait_stderr(&sv, "shutdown delay over", T);
    eprintln!("503 on {readyz_polls} polls over {delay_seen:?}; the app served {served}");
    assert!(
        delay_seen >= Duration::from_millis(1900),
        "the delay ended after {delay_seen:?}"
    );
    assert!(served > 0 && readyz_polls > 10);
    let exit = sv.wait_exit(T);
    assert!(exit.success(), "{exit:?}\n{}", sv.server.dump());
}

/// `/metrics`, parsed by `prometheus_client`.
fn metrics(admin: SocketAddr) -> admin_kit::Parsed {
    let (status, body) = http_get(admin, "/metrics", T).expect("/metrics");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_upgrades_rollbacks_restarts_and_drains() {
    let dir = TempDir::new("admin-metrics");
    let (sv, log) = start(&dir, &[]);
    let admin = admin_addr(&sv);
    wait_ready_in(&log, 1, T).unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    let m = wait_for("generation 1 ready in /metrics", T, || {
        let m = metrics(admin);
        (m.get("handover_ready") == 1.0)
            .then_some(m)
            .ok_or("not ready".to_owned())
    })
    .unwrap();
    for (family, kind) in [
        ("handover_upgrades", "counter"),
        ("handover_rollbacks", "counter"),
        ("handover_crash_restarts", "counter"),
        ("handover_generation", "gauge"),
        ("handover_generation_start_time_seconds", "gauge"),
        ("handover_draining_generations", "gauge"),
        ("handover_time_to_ready_seconds", "histogram"),
        ("handover_drain_duration_seconds", "histogram"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "{family}: {:?}",
            m.types
        );
    }
    assert_eq!(m.get("handover_generation"), 1.0);
    assert_eq!(m.get("handover_upgrades_total{outcome=\"succeeded\"}"), 0.0);
    assert_eq!(m.get("handover_time_to_ready_seconds_count"), 1.0);
    let started_1 = m.get("handover_generation_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now).contains(&started_1),
        "start time {started_1} vs now {now}"
    );

    // Two upgrades that succeed, one that fails (the release exits before it is ready).
    for generation in [2, 3] {
        let out = sv.upgrade();
        assert_eq!(out.code, Some(0), "{out:?}");
        wait_ready_in(&log, generation, T).unwrap();
    }
    std::fs::write(dir.join("broken"), "").unwrap();
    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}");
    std::fs::remove_file(dir.join("broken")).unwrap();
    let m = wait_for("both old generations drained", T, || {
        let m = metrics(admin);
        (m.get("handover_drain_duration_seconds_count") == 2.0)
            .then_some(m)
            .ok_or("draining".to_owned())
    })
    .unwrap();
    assert_eq!(m.get("handover_upgrades_total{outcome=\"succeeded\"}"), 2.0);
    assert_eq!(m.get("handover_upgrades_total{outcome=\"failed\"}"), 1.0);
    assert_eq!(
        m.get("handover_rollbacks_total{reason=\"exited_before_ready\"}"),
        1.0
    );
    assert_eq!(
        m.get("handover_rollbacks_total{reason=\"ready_timeout\"}"),
        0.0
    );
    assert_eq!(m.get("handover_generation"), 3.0);
    assert!(m.get("handover_generation_start_time_seconds") > started_1);
    assert_eq!(m.get("handover_draining_generations"), 0.0);
    assert_eq!(m.get("handover_time_to_ready_seconds_count"), 3.0);
    assert_eq!(
        m.get("handover_time_to_ready_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    assert_eq!(m.get("handover_crash_restarts_total"), 0.0);
    assert_eq!(m.get("handover_ready"), 1.0);

    // A crash of the current generation: restarted, counted.
    let current = wait_ready_in(&log, 3, T).unwrap();
    nix::sys::signal::kill(current.pid, Signal::SIGKILL).unwrap();
    let m = wait_for("the crash restart in /metrics", T, || {
        let m = metrics(admin);
        let (restarts, ready) = (
            m.get("handover_crash_restarts_total"),
            m.get("handover_ready"),
        );
        (restarts == 1.0 && ready == 1.0)
            .then_some(m)
            .ok_or(format!("restarts {restarts} ready {ready}"))
    })
    .unwrap();
    assert_eq!(
        m.get("handover_generation"),
        5.0,
        "1, 2, 3, failed 4, restarted 5"
    );
    assert_eq!(m.get("handover_time_to_ready_seconds_count"), 4.0);
    sv.signal(Signal::SIGTERM);
    let exit = sv.wait_exit(T);
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn status_check_is_1_without_a_supervisor_and_a_bad_admin_address_fails_before_the_app_starts() {
    let dir = TempDir::new("admin-check");
    let out = support::run_with_deadline(
        {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["status", "--check", "--control"])
                .arg(dir.join("none.sock"));
            cmd
        },
        T,
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.starts_with("unhealthy: cannot reach"), "{out:?}");

    // The admin port is taken: the supervisor refuses to start, and the app never ran.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let marker = dir.join("app-ran");
    let out = support::run_with_deadline(
        {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["run", "--admin", &port, "--control"])
                .arg(dir.join("c.sock"))
                .args(["--", "/bin/sh", "-c"])
                .arg(format!("touch '{}'", marker.display()));
            cmd
        },
        T,
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("binding the --admin listener failed"),
        "{out:?}"
    );
    assert!(!marker.exists(), "the app started although --admin failed");
}
