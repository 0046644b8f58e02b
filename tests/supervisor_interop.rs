//! S8 interop: programs we did not write, under `handover run`.
//!
//! The app is a Python script (`tests/support/interop_app.py`) that takes its sockets by
//! systemd socket activation (it checks that `LISTEN_PID` is its own pid, as libsystemd,
//! gunicorn and go-systemd do) and says ready with Debian's `systemd-notify --ready`, which
//! sends `READY=1` from its own pid, then `BARRIER=1` with an fd, and waits until the receiver
//! closes that fd. Also: TCP, Unix and UDP sockets by name, `--ready exec:CMD` for an app
//! that does not notify, and gunicorn (when installed: `pip install gunicorn`), which ignores
//! `LISTEN_FDS` unless `LISTEN_PID` is its own pid and says `READY=1` itself.

mod common;
mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::load::{get, Load, LoadConfig, Mode};
use common::{wait_for, Exit, Ready, Signal};
use support::{python, wait_stderr, Supervised, TempDir, Tier};

const T: Duration = Duration::from_secs(20);

fn prerequisites() -> Option<PathBuf> {
    let python = python()?;
    if !Path::new("/usr/bin/systemd-notify").exists()
        && Command::new("systemd-notify")
            .arg("--version")
            .output()
            .is_err()
    {
        // CI runs as root with every tool installed by .ci/run: there a skip is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "skipping: no systemd-notify (in CI)"
        );
        eprintln!("skipping: no systemd-notify");
        return None;
    }
    Some(python)
}

fn app_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/interop_app.py")
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// The ready line of `generation`, whole.
fn ready_line(sv: &Supervised, generation: u64) -> String {
    let ready: Ready = sv.server.wait_ready(generation);
    sv.server
        .stdout_lines()
        .into_iter()
        .find(|l| Ready::parse(l).is_some_and(|r| r == ready))
        .expect("the ready line")
}

fn body(addr: std::net::SocketAddr) -> String {
    let response = get(addr, "/", T).unwrap_or_else(|e| panic!("GET /: {e}"));
    assert!(response.is_success(), "{response:?}");
    response.body_str()
}

#[test]
fn python_app_with_systemd_notify_gets_sockets_and_is_seen_ready() {
    let Some(python) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("python");
    let script = app_script();
    let sv = Supervised::start_with(
        Tier::Subreaper,
        &dir,
        // Unnamed: systemd's default name.
        &["--listen", "tcp://127.0.0.1:0", "--ready-timeout", "10s"],
        &[python.as_os_str(), script.as_os_str(), OsStr::new("notify")],
        |cmd| {
            cmd.env("HANDOVER_LOG", "debug");
        },
    );
    let line = ready_line(&sv, 1);
    let first = Ready::parse(&line).expect("ready");
    assert_eq!(field(&line, "names"), Some("unknown"), "{line}");
    // systemd-notify returned at once with success: its BARRIER fd was closed.
    assert_eq!(field(&line, "notify_rc"), Some("0"), "{line}");
    let notify_ms: u64 = field(&line, "notify_ms")
        .and_then(|m| m.parse().ok())
        .expect("ms");
    assert!(
        notify_ms < 3000,
        "systemd-notify waited {notify_ms} ms: {line}"
    );
    wait_stderr(&sv, "generation ready generation=1", T);
    wait_stderr(&sv, "closed the fds passed with a notification", T);
    assert_eq!(body(first.addr), format!("pid={} generation=1", first.pid));

    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    assert!(out.stdout.contains("ok: generation 2"), "{out:?}");
    let second = Ready::parse(&ready_line(&sv, 2)).expect("ready");
    assert_ne!(second.pid, first.pid);
    assert_eq!(second.addr, first.addr, "the same socket");
    // Generation 1 answers what it accepts until it sees its SIGTERM, then traffic moves.
    let want = format!("pid={} generation=2", second.pid);
    wait_for("generation 2 serves", T, || {
        let b = body(first.addr);
        if b == want {
            Ok(())
        } else {
            Err(b)
        }
    })
    .expect("served by generation 2");
    // The old one got SIGTERM and exited 0; its STATUS= is shown for the new one.
    wait_stderr(&sv, "old generation exited generation=1", T);
    let status = sv.status_json();
    assert!(
        status.contains(&format!(
            "\"current\":{{\"generation\":2,\"pid\":{},",
            second.pid
        )),
        "{status}"
    );
    assert!(status.contains("\"status\":\"python serving\""), "{status}");
    assert!(!sv
        .server
        .stdout_lines()
        .iter()
        .any(|l| l.starts_with("protocol-error")));
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn tcp_unix_and_udp_sockets_by_name() {
    let Some(python) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("kinds");
    let unix = dir.join("admin.sock");
    let admin = format!("admin=unix://{}", unix.display());
    let script = app_script();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--listen",
            &admin,
            "--listen",
            "dns=udp://127.0.0.1:0",
        ],
        &[python.as_os_str(), script.as_os_str(), OsStr::new("multi")],
    );
    let kinds = sv
        .server
        .wait_line(|l| l.starts_with("kinds "), T)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kinds, "kinds web=tcp admin=unix dns=udp");
    let line = ready_line(&sv, 1);
    assert_eq!(field(&line, "names"), Some("web:admin:dns"), "{line}");
    assert!(unix.exists());
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    assert!(
        !unix.exists(),
        "the unix socket path is removed on the final stop"
    );
}

#[test]
fn ready_exec_command_for_an_app_that_does_not_notify() {
    let Some(python) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("exec");
    let script = app_script();
    let probe = format!(
        "exec:test -e '{}'/ready-$HANDOVER_PID && test \"$HANDOVER_GENERATION\" -ge 1",
        dir.path().display()
    );
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--listen", "tcp://127.0.0.1:0", "--ready", &probe],
        &[
            python.as_os_str(),
            script.as_os_str(),
            OsStr::new("file"),
            dir.path().as_os_str(),
        ],
    );
    sv.server.wait_ready(1);
    wait_stderr(&sv, "how=\"readiness command exited 0\"", T);
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    assert!(out.stdout.contains("waiting for `test -e"), "{out:?}");
    let second = sv.server.wait_ready(2);
    wait_for("generation 2 serves", T, || {
        let b = body(second.addr);
        if b == format!("pid={} generation=2", second.pid) {
            Ok(())
        } else {
            Err(b)
        }
    })
    .expect("served by generation 2");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

/// The interop app's own stop under load: each upgrade stops the previous generation while the
/// load's connections keep arriving, so a SIGTERM lands between `accept()` and the answer now
/// and then. (An app that exited from its SIGTERM handler when "not busy" reset such a
/// connection: 10 resets in 30 upgrades, and the flake of the test above.)
#[test]
fn python_app_upgrades_under_load() {
    let Some(python) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("exec-load");
    let script = app_script();
    let probe = format!(
        "exec:test -e '{}'/ready-$HANDOVER_PID",
        dir.path().display()
    );
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--listen", "tcp://127.0.0.1:0", "--ready", &probe],
        &[
            python.as_os_str(),
            script.as_os_str(),
            OsStr::new("file"),
            dir.path().as_os_str(),
        ],
    );
    let first = sv.server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 4 })
            .max_duration(Duration::from_secs(90)),
    );
    load.wait_for_ok(50, T).expect("load flowing");
    for generation in 2..=21 {
        let out = sv.upgrade();
        assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
        let ready = sv.server.wait_ready(generation);
        let body = format!("pid={} generation={generation}", ready.pid);
        load.wait_for_body(|b| b == body, T)
            .unwrap_or_else(|e| panic!("traffic did not move to generation {generation}: {e}"));
    }
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn gunicorn_upgrades_under_load() {
    let Some(python) = python() else {
        return;
    };
    let has_gunicorn = Command::new(&python)
        .args(["-c", "import gunicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_gunicorn {
        // CI runs as root with every tool installed by .ci/run: there a skip is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "skipping: gunicorn is not installed (pip install gunicorn) (in CI)"
        );
        eprintln!("skipping: gunicorn is not installed (pip install gunicorn)");
        return;
    }
    let dir = TempDir::new("gunicorn");
    let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    let sv = Supervised::start_with(
        Tier::Subreaper,
        &dir,
        &["--listen", "tcp://127.0.0.1:0", "--drain-timeout", "10s"],
        &[
            python.as_os_str(),
            OsStr::new("-m"),
            OsStr::new("gunicorn"),
            OsStr::new("--workers"),
            OsStr::new("2"),
            OsStr::new("--chdir"),
            support.as_os_str(),
            OsStr::new("wsgi_app:app"),
        ],
        |cmd| {
            // gunicorn keeps files under $HOME; keep them in the test's directory.
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
    // gunicorn serves on our socket: it took fd 3, so LISTEN_PID was its pid (otherwise it
    // would have bound its default 127.0.0.1:8000).
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
    for generation in 2..=4 {
        let out = sv.upgrade();
        assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
        let suffix = format!("generation={generation}");
        load.wait_for_body(|b| b.ends_with(&suffix), T)
            .unwrap_or_else(|e| panic!("traffic did not move to generation {generation}: {e}"));
        load.wait_for_more_ok(50, T).expect("load flowing");
    }
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();
    let status = sv.status_json();
    assert!(
        status.contains("\"status\":\"Gunicorn arbiter booted\""),
        "{status}"
    );
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}
