//! `handover run --workers N` (issue 9), with real processes, sockets and load:
//!
//! - 4 workers of `plain_server` share the socket: `GET /` reaches 4 distinct pids, each with
//!   its own `HANDOVER_WORKER` (0..3);
//! - 10 rolling upgrades under keep-alive and per-request load: 0 failed requests, all 4 pids
//!   new after each roll, and `status --json` polled every 20 ms over the control socket never
//!   shows fewer than 4 workers ready and not stopping;
//! - `kill -9` of one worker: it is restarted, 0 refused connections, the failures at most the
//!   connections the load holds at once;
//! - a bad release at worker 2 of 4 (crashes after ready; never ready; unhealthy): the binary
//!   on disk is replaced by it before the roll, the roll rolls back, `handover upgrade` exits 1
//!   with "rolled back at worker 2 of 4", and the 4 workers serving at the end run the previous
//!   release (its marker, `RELEASE=v1`, in `/proc/<pid>/environ`), started from the kept
//!   executable; a release that cannot be started fails the roll at worker 1 with nothing
//!   stopped;
//! - `--max-surge 2` puts two new workers on probation at once; triggers during a roll make
//!   one more roll; library workers are parked one at a time and resumed on a rollback;
//! - SIGTERM during a roll stops every worker; the exit status is the one of the worker
//!   current the longest.
//!
//! A release is a bash script beside the test's temp dir that exports `RELEASE=<tag>` and execs
//! `plain_server`; a deploy writes a new file and renames it over the old one.

mod common;
mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::load::{get, FailureClass, Load, LoadConfig, Mode};
use common::{wait_for, Exit, Signal};
use support::{
    free_port, handover, python, run_with_deadline, serving, status_over_socket, workers_of,
    Output, Supervised, TempDir, Tier, WorkerRow,
};

const T: Duration = Duration::from_secs(20);

fn plain_server() -> PathBuf {
    common::example_path("plain_server")
}

/// Deploys release `tag` at `path`: a bash script that exports `RELEASE=tag` and runs
/// `plain_server`, with `bad` arguments added in worker 1 (the second) only.
fn release(path: &Path, tag: &str, bad: &str) {
    let tmp = path.with_extension("new");
    let body = format!(
        "#!/bin/bash\nexport RELEASE={tag}\nextra=()\nif [ \"$HANDOVER_WORKER\" = 1 ]; then \
         extra=({bad}); fi\nexec -a \"$0\" '{}' \"$@\" \"${{extra[@]}}\"\n",
        plain_server().display()
    );
    std::fs::write(&tmp, body).expect("write the release");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename the release into place");
}

/// A variable of a process's environment.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|b| *b == 0)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| v.strip_prefix(&prefix).map(str::to_owned))
}

struct Pool {
    _dir: TempDir,
    app: PathBuf,
    addr: std::net::SocketAddr,
    sv: Supervised,
}

/// `handover run --workers 4` of release v1, waited for until 4 workers serve.
fn pool(tag: &str, options: &[&str]) -> Pool {
    let dir = TempDir::new(tag);
    let app = dir.join("app");
    release(&app, "v1", "");
    let port = free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--workers",
        "4",
        "--drain-timeout",
        "5s",
        "--failed-drain-timeout",
        "5s",
    ];
    args.extend_from_slice(options);
    let sv = Supervised::start(Tier::Subreaper, &dir, &args, &[app.as_os_str()]);
    let pool = Pool {
        _dir: dir,
        app,
        addr: ([127, 0, 0, 1], port).into(),
        sv,
    };
    pool.wait_serving(|rows| rows.len() == 4, "4 workers serving");
    pool
}

impl Pool {
    fn status(&self) -> Result<Vec<WorkerRow>, String> {
        status_over_socket(&self.sv.control, Duration::from_secs(5)).map(|j| workers_of(&j))
    }

    /// Waits until the serving workers satisfy `check`; returns every worker then.
    fn wait_serving(&self, check: impl Fn(&[&WorkerRow]) -> bool, what: &str) -> Vec<WorkerRow> {
        wait_for(what, T, || {
            let rows = self.status()?;
            if check(&serving(&rows)) {
                Ok(rows)
            } else {
                Err(format!("{rows:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.sv.server.dump()))
    }

    fn serving_pids(&self) -> BTreeSet<i32> {
        let rows = self.status().expect("status");
        serving(&rows).iter().map(|w| w.pid).collect()
    }

    fn stop(self) {
        self.sv.signal(Signal::SIGTERM);
        let exit = self.sv.wait_exit(T);
        assert_eq!(exit, Exit::Code(0), "{}", self.sv.server.dump());
    }
}

/// Keep-alive and per-request load on `addr`, flowing.
fn loads(addr: std::net::SocketAddr) -> [Load; 2] {
    let loads = [
        Load::start(
            LoadConfig::new(addr, Mode::KeepAlive { connections: 4 })
                .max_duration(Duration::from_secs(90)),
        ),
        Load::start(
            LoadConfig::new(addr, Mode::PerRequest { concurrency: 4 })
                .max_duration(Duration::from_secs(90)),
        ),
    ];
    for load in &loads {
        load.wait_for_ok(30, T).expect("load flowing");
    }
    loads
}

/// Polls `status json` over the control socket every 20 ms in a thread and keeps the fewest
/// workers seen serving (ready, not stopping), with the rows of that moment.
struct CapacityWatch {
    stop: Arc<AtomicBool>,
    fewest: Arc<Mutex<(usize, Vec<WorkerRow>, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CapacityWatch {
    fn start(control: PathBuf) -> CapacityWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let fewest = Arc::new(Mutex::new((usize::MAX, Vec::new(), 0)));
        let (s, f) = (stop.clone(), fewest.clone());
        let thread = std::thread::spawn(move || {
            // Load shape, not synchronisation: a poll every 20 ms until told to stop.
            while !s.load(Ordering::Relaxed) {
                if let Ok(json) = status_over_socket(&control, Duration::from_secs(5)) {
                    let rows = workers_of(&json);
                    let n = serving(&rows).len();
                    let mut g = f.lock().unwrap();
                    g.2 += 1;
                    if n < g.0 {
                        *g = (n, rows, g.2);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        CapacityWatch {
            stop,
            fewest,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns the fewest serving workers seen, those rows and the polls made.
    fn finish(mut self) -> (usize, Vec<WorkerRow>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the status poller");
        }
        self.fewest.lock().unwrap().clone()
    }
}

impl Drop for CapacityWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn upgrade_in_background(sv: &Supervised) -> std::thread::JoinHandle<Output> {
    let mut cmd = Command::new(handover());
    cmd.arg("upgrade")
        .arg("--control")
        .arg(&sv.control)
        .args(["--timeout", "60s"]);
    std::thread::spawn(move || run_with_deadline(cmd, Duration::from_secs(70)))
}

#[test]
fn four_workers_share_the_socket_with_distinct_pids() {
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let p = pool("workers-four", &["--admin", &admin]);
    // `--admin` sees the workers as serving.
    let readyz = get(([127, 0, 0, 1], admin_port).into(), "/readyz", T).expect("GET /readyz");
    assert_eq!(readyz.status, 200, "{}", readyz.body_str());
    let rows = p.status().expect("status");
    let expected: BTreeSet<i32> = serving(&rows).iter().map(|w| w.pid).collect();
    assert_eq!(expected.len(), 4, "{rows:?}");
    // Each worker has its index; the indexes are 0..3.
    let indexes: BTreeSet<String> = expected
        .iter()
        .map(|pid| env_of(*pid, "HANDOVER_WORKER").expect("HANDOVER_WORKER"))
        .collect();
    assert_eq!(
        indexes,
        ["0", "1", "2", "3"].iter().map(|s| s.to_string()).collect()
    );
    // New connections are spread across them by the kernel: probe until 4 pids answered.
    let mut seen = BTreeSet::new();
    wait_for("GET / answered by 4 distinct pids", T, || {
        let body = get(p.addr, "/", T).map_err(|e| e.to_string())?.body_str();
        let pid: i32 = body
            .strip_prefix("pid=")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected body {body:?}"))?;
        seen.insert(pid);
        if seen.len() == 4 {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, expected);
    let text = p.sv.client(&["status"], T);
    assert!(text.stdout.contains("workers:\n"), "{text:?}");
    for pid in &expected {
        assert!(text.stdout.contains(&format!(" pid {pid} ")), "{text:?}");
    }
    p.stop();
}

#[test]
fn ten_rolling_upgrades_under_load() {
    let p = pool("workers-roll", &["--probation", "100ms"]);
    let loads = loads(p.addr);
    let mut before = p.serving_pids();
    for roll in 1..=10 {
        release(&p.app, &format!("v{}", roll + 1), "");
        let watch = CapacityWatch::start(p.sv.control.clone());
        let out = p.sv.upgrade();
        let (fewest, rows, polls) = watch.finish();
        assert_eq!(
            out.code,
            Some(0),
            "roll {roll}: {out:?}\n{}",
            p.sv.server.dump()
        );
        assert_eq!(
            out.stdout.matches("promoted").count(),
            4,
            "roll {roll}: each step printed: {out:?}"
        );
        assert!(polls > 3, "roll {roll}: only {polls} status polls");
        assert!(
            fewest >= 4,
            "roll {roll}: {fewest} workers serving at one poll: {rows:?}"
        );
        let after = p.serving_pids();
        assert_eq!(after.len(), 4, "roll {roll}");
        assert!(
            after.is_disjoint(&before),
            "roll {roll}: old pids still serving: {before:?} -> {after:?}"
        );
        for pid in &after {
            assert_eq!(
                env_of(*pid, "RELEASE").as_deref(),
                Some(format!("v{}", roll + 1).as_str()),
                "roll {roll}: pid {pid}"
            );
        }
        before = after;
    }
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        report.assert_no_failures();
    }
    p.stop();
}

#[test]
fn kill_9_of_one_worker_restarts_it_under_load() {
    let p = pool("workers-kill", &[]);
    let loads = loads(p.addr);
    let rows = p.status().expect("status");
    let victim = rows
        .iter()
        .find(|w| w.worker == 2)
        .expect("worker 2")
        .clone();
    // The capacity poller of the rolls, as a control: it sees the gap of a crash.
    let watch = CapacityWatch::start(p.sv.control.clone());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim.pid), Signal::SIGKILL)
        .expect("kill -9");
    let rows = p.wait_serving(
        |s| s.len() == 4 && s.iter().any(|w| w.worker == 2 && w.pid != victim.pid),
        "worker 2 restarted",
    );
    let (fewest, seen, _) = watch.finish();
    assert_eq!(
        fewest, 3,
        "the restart back-off (100 ms) was not seen: {seen:?}"
    );
    let others: Vec<&WorkerRow> = rows.iter().filter(|w| w.worker != 2).collect();
    assert_eq!(others.len(), 3, "the others were not touched: {rows:?}");
    for load in &loads {
        load.wait_for_more_ok(50, T)
            .expect("load flowing after the restart");
    }
    let mut failed = 0;
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
        failed += report.failure_total();
    }
    // At most the connections the killed worker held: at most all 8 the load has open at once.
    assert!(failed <= 8, "{failed} failed requests");
    let status = p.sv.status_json();
    assert!(status.contains("\"restarts\":1"), "{status}");
    p.stop();
}

/// A release bad at worker 2 of 4 is rolled back under load: the workers serving at the end
/// all run v1, started from the kept executable (the file on disk is the bad v2).
fn bad_release_rolls_back(tag: &str, options: &[&str], bad: &str, crashes: bool) {
    let p = pool(tag, options);
    let loads = loads(p.addr);
    let v1 = p.serving_pids();
    release(&p.app, "v2", bad);
    let watch = CapacityWatch::start(p.sv.control.clone());
    let out = upgrade_in_background(&p.sv)
        .join()
        .expect("the client thread");
    let (fewest, rows, polls) = watch.finish();
    eprintln!("{}fewest serving: {fewest} in {polls} polls", out.stdout);
    assert_eq!(out.code, Some(1), "{out:?}\n{}", p.sv.server.dump());
    assert!(
        out.stdout
            .contains("failed: rolled back at worker 2 of 4: "),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("promoted"),
        "worker 1 was promoted first: {out:?}"
    );
    assert!(
        out.stdout.contains("step: rollback: worker 1/4"),
        "worker 1 was rolled back: {out:?}"
    );
    assert!(
        fewest >= 4,
        "{fewest} workers serving at one poll: {rows:?}"
    );
    // Everything of v2 is gone in the end; 4 workers of v1 serve.
    let rows = wait_for("only 4 workers of v1 left", T, || {
        let rows = p.status()?;
        let all_v1 = rows
            .iter()
            .all(|w| env_of(w.pid, "RELEASE").as_deref() == Some("v1"));
        if rows.len() == 4 && serving(&rows).len() == 4 && all_v1 {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.sv.server.dump()));
    // Three of them never stopped; worker 0 is a new process of v1 (from the kept file).
    let now: BTreeSet<i32> = rows.iter().map(|w| w.pid).collect();
    assert_eq!(now.intersection(&v1).count(), 3, "{v1:?} -> {now:?}");
    let file = std::fs::read_to_string(&p.app).expect("the release on disk");
    assert!(
        file.contains("RELEASE=v2"),
        "the file on disk is the bad release"
    );
    let status = p.sv.status_json();
    assert!(
        status.contains("\"last_rollback\":{") && status.contains("rolled back at worker 2 of 4"),
        "{status}"
    );
    let mut failed = 0;
    for load in loads {
        let report = load.stop();
        eprintln!("{report}");
        assert_eq!(report.failures.get(FailureClass::Refused), 0, "{report}");
        if !crashes {
            report.assert_no_failures();
        }
        failed += report.failure_total();
    }
    // A crashed worker's own connections, at most the 8 the load holds at once.
    assert!(failed <= 8, "{failed} failed requests");
    p.stop();
}

#[test]
fn crash_after_ready_at_worker_2_rolls_back_under_load() {
    bad_release_rolls_back(
        "workers-crash",
        &["--probation", "1s"],
        "--crash-after-ready-ms 300",
        true,
    );
}

#[test]
fn never_ready_at_worker_2_rolls_back_under_load() {
    bad_release_rolls_back(
        "workers-never",
        &["--ready-timeout", "1500ms"],
        "--never-ready",
        false,
    );
}

#[test]
fn unhealthy_at_worker_2_rolls_back_under_load() {
    // A check of each worker's own process: an HTTP check through the shared address reaches
    // any worker (service level), so the per-worker check is `exec:` with HANDOVER_PID. The
    // bad worker's configuration says `--unhealthy`.
    bad_release_rolls_back(
        "workers-unhealthy",
        &[
            "--probation",
            "600ms",
            "--health",
            "exec:! tr '\\0' ' ' < /proc/$HANDOVER_PID/cmdline | grep -q -- --unhealthy",
            "--health-interval",
            "100ms",
        ],
        "--unhealthy",
        false,
    );
}

#[test]
fn sigterm_during_a_roll_stops_every_worker() {
    let p = pool("workers-term", &["--probation", "5s"]);
    release(&p.app, "v2", "");
    let upgrade = upgrade_in_background(&p.sv);
    p.wait_serving(|s| s.len() == 5, "a new worker on probation beside the 4");
    let rows = p.status().expect("status");
    assert!(rows.iter().any(|w| w.state == "probation"), "{rows:?}");
    p.sv.signal(Signal::SIGTERM);
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("the supervisor is stopping"), "{out:?}");
    // plain_server exits 0 on SIGTERM: the status of the worker current the longest.
    let exit = p.sv.wait_exit(T);
    assert_eq!(exit, Exit::Code(0), "{}", p.sv.server.dump());
    for w in rows {
        assert!(
            !common::is_alive(common::Pid::from_raw(w.pid)),
            "pid {} left",
            w.pid
        );
    }
}

#[test]
fn triggers_during_a_roll_are_coalesced_into_one_more_roll() {
    let p = pool("workers-coalesce", &["--probation", "300ms"]);
    release(&p.app, "v2", "");
    let first = upgrade_in_background(&p.sv);
    p.wait_serving(|s| s.len() == 5, "the roll's first new worker ready");
    // Three more triggers while it rolls: one more roll after it, not three.
    for _ in 0..3 {
        p.sv.signal(Signal::SIGHUP);
    }
    let second = p.sv.upgrade();
    let first = first.join().expect("the client thread");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(second.code, Some(0), "{second:?}\n{}", p.sv.server.dump());
    assert!(
        second
            .stdout
            .contains("waiting: a rolling upgrade is in progress"),
        "{second:?}"
    );
    let status = p.sv.status_json();
    assert!(
        status.contains("\"upgrades\":{\"succeeded\":2,\"failed\":0}"),
        "{status}"
    );
    p.wait_serving(|s| s.len() == 4, "4 workers after the second roll");
    p.stop();
}

#[test]
fn max_surge_2_starts_two_new_workers_at_once_under_load() {
    let p = pool(
        "workers-surge",
        &["--probation", "300ms", "--max-surge", "2"],
    );
    let loads = loads(p.addr);
    let before = p.serving_pids();
    release(&p.app, "v2", "");
    let upgrade = upgrade_in_background(&p.sv);
    // Two new workers on probation beside the 4 old ones.
    let rows = p.wait_serving(|s| s.len() == 6, "6 workers serving (2 surging)");
    assert_eq!(
        rows.iter().filter(|w| w.state == "probation").count(),
        2,
        "{rows:?}"
    );
    let out = upgrade.join().expect("the client thread");
    assert_eq!(out.code, Some(0), "{out:?}");
    let after = p.serving_pids();
    assert_eq!(after.len(), 4);
    assert!(after.is_disjoint(&before));
    for load in loads {
        let report = load.stop();
        report.assert_no_failures();
    }
    p.stop();
}

#[test]
fn library_workers_are_parked_one_at_a_time_and_resumed_on_rollback() {
    let Some(python) = python() else {
        return;
    };
    let dir = TempDir::new("workers-parked");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/parkable_app.py");
    let verdict = dir.join("verdict");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--workers",
            "2",
            "--probation",
            "300ms",
            "--drain-timeout",
            "5s",
        ],
        &[python.as_os_str(), script.as_os_str(), verdict.as_os_str()],
    );
    let w0 = sv.server.wait_ready(1);
    let w1 = sv.server.wait_ready(2);
    // A good roll: old worker k parks while new worker k is on probation, then is replaced.
    let out = upgrade_in_background(&sv)
        .join()
        .expect("the client thread");
    assert_eq!(out.code, Some(0), "{out:?}\n{}", sv.server.dump());
    assert!(
        out.stdout.contains("on probation for 300ms (parked)"),
        "{out:?}"
    );
    let parked: Vec<String> = sv
        .server
        .stdout_lines()
        .into_iter()
        .filter(|l| l.starts_with("parked pid="))
        .collect();
    assert_eq!(
        parked,
        vec![
            format!("parked pid={}", w0.pid),
            format!("parked pid={}", w1.pid)
        ],
        "parked one at a time, in worker order"
    );
    let n3 = sv.server.wait_ready(3);
    // A release that says `unhealthy` on probation: the parked old worker resumes.
    std::fs::write(&verdict, "unhealthy").unwrap();
    let out = upgrade_in_background(&sv)
        .join()
        .expect("the client thread");
    assert_eq!(out.code, Some(1), "{out:?}\n{}", sv.server.dump());
    assert!(
        out.stdout
            .contains("failed: rolled back at worker 1 of 2: ")
            && out.stdout.contains("the app says it is unhealthy"),
        "{out:?}"
    );
    sv.server
        .wait_line(|l| l == format!("resumed pid={}", n3.pid), T)
        .unwrap_or_else(|e| panic!("{e}"));
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn the_exit_status_is_the_one_of_the_worker_current_the_longest() {
    // Workers that exit with 10 + their index on SIGTERM; ready after a delay.
    let dir = TempDir::new("workers-exit");
    let app = dir.join("app");
    std::fs::write(
        &app,
        "#!/bin/bash\ntrap 'exit $((10 + HANDOVER_WORKER))' TERM\nwhile :; do sleep 0.05; done\n",
    )
    .expect("write the app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--workers",
            "3",
            "--ready",
            "delay:50ms",
        ],
        &[app.as_os_str()],
    );
    let p = Pool {
        _dir: dir,
        app,
        addr: ([127, 0, 0, 1], 0).into(),
        sv,
    };
    let rows = p.wait_serving(|s| s.len() == 3, "3 workers ready");
    // Worker 0 was current the longest; after its crash restart, worker 1 is.
    let w0 = rows.iter().find(|w| w.worker == 0).expect("worker 0").pid;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w0), Signal::SIGKILL).expect("kill -9");
    p.wait_serving(
        |s| s.len() == 3 && s.iter().any(|w| w.worker == 0 && w.pid != w0),
        "worker 0 restarted",
    );
    p.sv.signal(Signal::SIGTERM);
    assert_eq!(p.sv.wait_exit(T), Exit::Code(11), "{}", p.sv.server.dump());
}

#[test]
fn a_release_that_cannot_start_fails_the_roll_at_worker_1_under_load() {
    let p = pool("workers-missing", &[]);
    let loads = loads(p.addr);
    let v1 = p.serving_pids();
    std::fs::remove_file(&p.app).expect("remove the release");
    let out = p.sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("failed: rolled back at worker 1 of 4: cannot start generation"),
        "{out:?}"
    );
    // Nothing was promoted, nothing stopped: the same 4 pids serve.
    assert_eq!(p.serving_pids(), v1);
    let text = p.sv.client(&["status"], T);
    assert!(
        text.stdout.contains("last upgrade: failed")
            && text.stdout.contains("rolled back at worker 1 of 4"),
        "{text:?}"
    );
    for load in loads {
        load.stop().assert_no_failures();
    }
    p.stop();
}
