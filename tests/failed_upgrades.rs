//! A failed upgrade leaves nothing behind: a never-ready generation drains
//! the requests it accepted before it is stopped, whatever it started dies
//! with it, a final stop during an upgrade stops the new generation too, the
//! PID file always names the serving generation, and old generations that
//! still drain cap further upgrades.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::load::{Load, LoadConfig, Mode};
use common::{deploy, proc_stat, wait_until, Deploy, Exit, Pid, ServerProcess, Signal, TempDir};

const WAIT: Duration = Duration::from_secs(20);

/// A server started from `dir/app`, a copy of `http_server`, with a tag in
/// its environment that every process it starts inherits.
struct Tagged {
    server: ServerProcess,
    exe: PathBuf,
    real: PathBuf,
    tag: String,
}

fn start(dir: &TempDir, extra: &[&str]) -> Tagged {
    let exe = dir.path().join("app");
    let real = dir.path().join("real");
    let binary = common::example_path("http_server");
    deploy(&exe, Deploy::Binary(&binary));
    deploy(&real, Deploy::Binary(&binary));
    let tag = format!("{}", dir.path().display());
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("HANDOVER_TEST_TAG", &tag);
    Tagged {
        server: ServerProcess::spawn(cmd),
        exe,
        real,
        tag,
    }
}

impl Tagged {
    /// Live processes (zombies excluded) started with this server's tag,
    /// but for `except`.
    fn others(&self, except: Pid) -> Vec<(i32, String)> {
        let needle = format!("HANDOVER_TEST_TAG={}", self.tag);
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == except.as_raw() {
                continue;
            }
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let tagged = environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes());
            let live = proc_stat(Pid::from_raw(pid)).is_some_and(|p| p.state != 'Z');
            if tagged && live {
                let comm = proc_stat(Pid::from_raw(pid)).map_or_else(String::new, |p| p.comm);
                found.push((pid, comm));
            }
        }
        found
    }

    fn wait_stderr(&self, needle: &str) {
        self.server
            .wait_stderr(needle, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Deploys a release that runs the real binary with `extra` arguments.
    fn deploy_wrapper(&self, before: &str, extra: &str) {
        deploy(
            &self.exe,
            Deploy::Script(&format!(
                "{before}\nexec {} \"$@\" {extra}",
                self.real.display()
            )),
        );
    }
}

fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_never_ready_generation_drains_what_it_accepted_before_it_is_stopped() {
    let dir = TempDir::new("never-ready");
    let app = start(
        &dir,
        &[
            "--ready-timeout-ms",
            "1500",
            "--failed-drain-timeout-ms",
            "10000",
        ],
    );
    let gen1 = app.server.wait_ready(1);
    // Slow requests, a new connection each: some are accepted by the new
    // generation from the shared queue while it is not ready.
    let load = Load::start(
        LoadConfig::new(gen1.addr, Mode::PerRequest { concurrency: 8 })
            .path("/slow?ms=300")
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(8, WAIT).expect("load flowing");
    app.deploy_wrapper("", "--never-ready");
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    app.wait_stderr("upgrade failed; this generation keeps serving");
    let stderr = app.server.stderr();
    assert!(
        stderr.contains("was not ready within 1.5s"),
        "the outcome says why:\n{stderr}"
    );
    assert!(
        stderr.contains("stopping the failed new generation"),
        "it was told to stop, not killed:\n{stderr}"
    );
    assert!(
        stderr.contains("failed new generation exited pid="),
        "it exited by itself:\n{stderr}"
    );
    assert!(
        !stderr.contains("did not exit in time: SIGKILL"),
        "no SIGKILL:\n{stderr}"
    );
    load.wait_for_more_ok(16, WAIT)
        .expect("generation 1 keeps serving");
    let report = load.stop();
    let served_by_2 = report.ok_matching(|b| b.contains("generation=2"));
    assert!(
        served_by_2 > 0,
        "the never-ready generation served some requests (else this test proves nothing): {report}"
    );
    report.assert_no_failures();
    assert!(
        app.others(gen1.pid).is_empty(),
        "{:?}",
        app.others(gen1.pid)
    );
}

#[test]
fn what_a_failed_generation_started_dies_with_it() {
    let dir = TempDir::new("orphans");
    let app = start(
        &dir,
        &[
            "--ready-timeout-ms",
            "1000",
            "--failed-drain-timeout-ms",
            "500",
        ],
    );
    let gen1 = app.server.wait_ready(1);
    // A release that starts a child and never becomes ready; neither
    // process minds the stop signal.
    deploy(
        &app.exe,
        Deploy::Script("trap '' TERM\necho release-started >&2\nsleep 300\n"),
    );
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    app.wait_stderr("release-started");
    app.wait_stderr("upgrade failed; this generation keeps serving");
    wait_until(
        "every process of the failed release to be gone",
        WAIT,
        || app.others(gen1.pid).is_empty(),
        || format!("{:?}\n{}", app.others(gen1.pid), app.server.dump()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Nothing holds the listener once generation 1 is gone: connections are
    // refused, not left hanging in a queue nobody serves.
    app.server.signal(Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    let refused = std::net::TcpStream::connect_timeout(&gen1.addr, Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "the port still accepts connections: {refused:?}"
    );
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_generation_before_exiting() {
    let dir = TempDir::new("stop-during-upgrade");
    let app = start(&dir, &["--failed-drain-timeout-ms", "500"]);
    let gen1 = app.server.wait_ready(1);
    // A release that is slow to start, and that ignores the stop signal
    // meanwhile (the wait is the release's own, not the test's).
    app.deploy_wrapper("trap '' TERM\necho release-starting >&2\nsleep 30", "");
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    app.wait_stderr("release-starting");
    assert!(
        !app.others(gen1.pid).is_empty(),
        "the new generation runs beside generation 1"
    );
    app.server.signal(Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    // Generation 1 waited for the upgrade's outcome: nothing it started
    // outlives it.
    assert!(
        app.others(gen1.pid).is_empty(),
        "left running after generation 1 exited: {:?}\n{}",
        app.others(gen1.pid),
        app.server.dump()
    );
}

#[test]
fn the_pid_file_names_the_serving_generation() {
    let dir = TempDir::new("pid-file");
    let pid_file = dir.path().join("app.pid");
    let pid_arg = pid_file.display().to_string();
    let app = start(
        &dir,
        &["--pid-file", &pid_arg, "--failed-drain-timeout-ms", "500"],
    );
    let gen1 = app.server.wait_ready(1);
    assert_eq!(read_pid_file(&pid_file), Some(gen1.pid.as_raw()));

    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    assert_eq!(read_pid_file(&pid_file), Some(gen2.pid.as_raw()));

    // `kill -HUP $(cat app.pid)` reaches the serving generation; this
    // release fails, and the file still names generation 2.
    deploy(&app.exe, Deploy::Script("exit 3"));
    let pid = read_pid_file(&pid_file).expect("pid file");
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGHUP).expect("kill -HUP");
    app.wait_stderr("upgrade failed; this generation keeps serving");
    assert_eq!(read_pid_file(&pid_file), Some(gen2.pid.as_raw()));

    app.server
        .signal_pid(gen2.pid, Signal::SIGTERM)
        .expect("SIGTERM");
    assert_eq!(app.server.wait_exit(gen2.pid, WAIT), Ok(Exit::Code(0)));
    assert!(!pid_file.exists(), "a final stop removes the PID file");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn upgrades_wait_for_draining_generations_beyond_the_cap() {
    let dir = TempDir::new("max-draining");
    let app = start(&dir, &["--max-draining", "1"]);
    let gen1 = app.server.wait_ready(1);
    // A long request keeps generation 1 draining.
    let addr = gen1.addr;
    let slow = std::thread::spawn(move || common::load::get(addr, "/slow?ms=4000", WAIT));
    wait_until(
        "the slow request to be accepted",
        WAIT,
        || common::fd_count(gen1.pid).is_ok_and(|n| n > 8),
        || app.server.dump(),
    )
    .ok();
    app.server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = app.server.wait_ready(2);
    app.server
        .signal_pid(gen2.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    app.wait_stderr("earlier generations are still draining (at most 1");
    assert!(
        app.server.readies().iter().all(|r| r.generation <= 2),
        "no third generation started"
    );
    // Once generation 1 has finished its request and exited, the next
    // upgrade goes through.
    let response = slow.join().expect("thread").expect("the slow request");
    assert_eq!(
        response.body_str(),
        format!("pid={} generation=1", gen1.pid)
    );
    assert_eq!(app.server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    app.server
        .signal_pid(gen2.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    app.server.wait_ready(3);
}
