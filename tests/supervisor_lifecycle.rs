//! The life of `handover run` apart from upgrades:
//!
//! - crash restart: `kill -9` of the app under load refuses no connection (the sockets stay
//!   open, clients wait in the backlog) and the restarted app serves;
//! - a crash loop ends with the app's status; an app that exits 0 unasked ends the supervisor
//!   with 0, without a restart;
//! - SIGTERM with `--shutdown-delay` keeps serving during the delay, refuses upgrades, then
//!   drains and exits 0;
//! - a stop during an upgrade tells the client the truth; `--ready exec:` probes are killed
//!   with their process tree; `--pid-file` follows the current generation.
//!
//! The control socket has its own file, `supervisor_control.rs`.

mod common;
mod support;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::load::{Load, LoadConfig, Mode};
use common::{Exit, Signal};
use support::{http_server, run_with_deadline, wait_stderr, Supervised, TempDir, Tier};

const T: Duration = Duration::from_secs(20);

fn http(tier: Tier, dir: &TempDir, options: &[&str]) -> Supervised {
    let server = http_server();
    let mut all = vec!["--listen", "http=tcp://127.0.0.1:0"];
    all.extend_from_slice(options);
    Supervised::start(
        tier,
        dir,
        &all,
        &[
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    )
}

#[test]
fn crash_restart_under_load_refuses_nothing() {
    let dir = TempDir::new("crash");
    let sv = http(Tier::Subreaper, &dir, &[]);
    let first = sv.server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(100, T).expect("load flowing");
    sv.server
        .signal_pid(first.pid, Signal::SIGKILL)
        .expect("kill -9");
    let second = sv.server.wait_ready(2);
    assert_ne!(second.pid, first.pid);
    let body = format!("pid={} generation=2", second.pid);
    load.wait_for_body(|b| b == body, T)
        .expect("the restarted app serves");
    load.wait_for_more_ok(100, T).expect("load flowing again");
    let report = load.stop();
    eprintln!("{report}");
    // Requests the killed process had accepted die with it (reset or EOF); nothing is refused
    // and nothing waits past its timeout: queued connections are served by the restart.
    assert_eq!(report.failures.refused, 0, "{report}");
    assert_eq!(report.failures.timeout, 0, "{report}");
    assert!(report.ok_matching(|b| b == body) > 0, "{report}");
    wait_stderr(&sv, "the app failed; restarting it", T);
    let status = sv.status_json();
    assert!(status.contains("\"restarts\":1"), "{status}");
    assert!(
        status.contains(&format!(
            "\"current\":{{\"generation\":2,\"pid\":{}",
            second.pid
        )),
        "{status}"
    );
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn crash_loop_gives_up_with_the_status() {
    let dir = TempDir::new("crashloop");
    let started = Instant::now();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[],
        &[OsStr::new("sh"), OsStr::new("-c"), OsStr::new("exit 3")],
    );
    assert_eq!(sv.wait_exit(T), Exit::Code(3), "{}", sv.server.dump());
    let log = support::final_log(&sv);
    assert_eq!(
        log.matches("the app failed; restarting it").count(),
        5,
        "{log}"
    );
    // Six generations, five restarts, and the log counts them as they are (the help and the
    // README say the same: the 6th quick crash gives up).
    assert_eq!(log.matches("generation started").count(), 6, "{log}");
    for n in 1..=5 {
        assert!(
            log.contains(&format!(" crash={n} restart={n} max_restarts=5")),
            "{log}"
        );
    }
    let give_up = log
        .lines()
        .find(|l| l.contains("crash loop"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(give_up.contains(" crashes=6 restarts=5 "), "{give_up}");
    // Back-off: 100 ms doubling, 5 restarts.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_app_that_exits_0_unasked_ends_the_supervisor() {
    let dir = TempDir::new("exit0");
    let sv = Supervised::start(Tier::Subreaper, &dir, &[], &[OsStr::new("true")]);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    let log = support::final_log(&sv);
    assert!(
        log.contains("exited with status 0 without being asked"),
        "{log}"
    );
    assert!(!log.contains("restarting"), "{log}");
}

#[test]
fn shutdown_delay_keeps_serving_then_drains() {
    let dir = TempDir::new("delay");
    let sv = http(Tier::Subreaper, &dir, &["--shutdown-delay", "1s"]);
    let addr = sv.server.wait_ready(1).addr;
    let load = Load::start(
        LoadConfig::new(addr, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(50, T).expect("load flowing");
    let sent = Instant::now();
    sv.signal(Signal::SIGTERM);
    wait_stderr(&sv, "still serving during the shutdown delay", T);
    // Upgrades are refused once a stop began.
    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("refused: the supervisor is stopping"),
        "{out:?}"
    );
    // Still serving, well into the delay.
    load.wait_for_more_ok(200, T)
        .expect("serving during the delay");
    let report = load.stop();
    assert!(
        sent.elapsed() < Duration::from_millis(1000),
        "the check ran past the delay: {:?}",
        sent.elapsed()
    );
    report.assert_no_failures();
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    assert!(
        sent.elapsed() >= Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    let log = support::final_log(&sv);
    let over = log.find("shutdown delay over").expect("delay over");
    let told = log.find("generation told to stop").expect("stop sent");
    assert!(over < told, "{log}");
}

#[test]
fn a_stop_during_an_upgrade_fails_it_and_tells_the_client() {
    let dir = TempDir::new("stop-upgrade");
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--ready", "delay:10s", "--ready-timeout", "15s"],
        &[OsStr::new("sleep"), OsStr::new("60")],
    );
    wait_stderr(&sv, "supervisor started", T);
    let client = {
        let control = sv.control.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["upgrade", "--timeout", "20s", "--control"])
                .arg(control);
            run_with_deadline(cmd, Duration::from_secs(30))
        })
    };
    wait_stderr(&sv, "upgrade started generation=2", T);
    sv.signal(Signal::SIGTERM);
    let out = client.join().expect("client thread");
    assert_eq!(out.code, Some(1), "{out:?}\n{}", sv.server.dump());
    assert!(
        out.stdout.contains("failed: the supervisor is stopping"),
        "{out:?}"
    );
    // The truth about generation 1: it is stopping too (or has stopped already, when it was
    // reaped before the candidate), it does not keep serving.
    let last = out.stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains("; generation 1 (pid ")
            && last.ends_with(") is being stopped: the supervisor is stopping")
            || last.ends_with("; no generation is serving: the supervisor is stopping"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("keeps serving"), "{out:?}");
    // The abandoned candidate gets the stop signal, not SIGKILL.
    assert!(
        out.stdout.contains("step: stopping generation 2 (pid ")
            && out
                .stdout
                .contains(") with SIGTERM, SIGKILL in 30s (--failed-drain-timeout)"),
        "{out:?}"
    );
    // `sleep` dies of SIGTERM.
    assert_eq!(sv.wait_exit(T), Exit::Code(143), "{}", sv.server.dump());
    let log = support::final_log(&sv);
    assert!(!log.contains("SIGKILL"), "{log}");
    assert!(
        log.contains("failed generation reaped generation=2 pid=")
            && log.contains("status=\"was killed by SIGTERM\""),
        "{log}"
    );
}

/// Pids written to `path`, one a line.
fn pids_in(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether `pid` is running (a zombie runs nothing: it only waits to be reaped).
fn running(pid: i32) -> bool {
    support::stat_in(std::path::Path::new("/proc"), pid).is_some_and(|(state, _)| state != 'Z')
}

/// Kills, on drop, whatever of the recorded probes still runs: a failing test leaks nothing.
struct KillOnDrop(Vec<std::path::PathBuf>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            for pid in pids_in(path) {
                if running(pid) {
                    let _ = nix::sys::signal::kill(common::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

/// Waits until `n` pids are in `path`, then until none of them runs.
fn wait_probe_gone(sv: &Supervised, path: &std::path::Path, what: &str) -> Vec<i32> {
    let pids = common::wait_for(format!("two pids in {}", path.display()), T, || {
        let pids = pids_in(path);
        if pids.len() >= 2 {
            Ok(pids)
        } else {
            Err(format!("{pids:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    common::wait_for(format!("the probe gone: {what}"), T, || {
        let left: Vec<i32> = pids.iter().copied().filter(|p| running(*p)).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {left:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    pids
}

#[test]
fn ready_probes_are_killed_with_their_tree_once_their_answer_no_longer_matters() {
    let dir = TempDir::new("probes");
    let file = |generation: u64| dir.join(&format!("probe-{generation}"));
    let _cleanup = KillOnDrop((1..=4).map(file).collect());
    // Each probe writes its own pid and that of a background child, then waits for it
    // (never answers), except the probe of generation 2, which says ready at once and leaves
    // its child behind.
    let probe = format!(
        "exec:f='{}'/probe-$HANDOVER_GENERATION; echo $$ >>\"$f\"; sleep 1000 & echo $! >>\"$f\"; \
         test \"$HANDOVER_GENERATION\" = 2 && exit 0; wait",
        dir.path().display()
    );
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--ready", &probe, "--ready-timeout", "1s"],
        &[OsStr::new("sleep"), OsStr::new("1000")],
    );
    // 1. The first generation's ready timeout passes: it is treated as serving, the probe goes.
    wait_stderr(&sv, "generation not ready in time", T);
    wait_probe_gone(&sv, &file(1), "ready timeout of the first generation");
    // 2. A generation that is ready: what its probe left running goes.
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_probe_gone(&sv, &file(2), "generation ready");
    // 3. A failed upgrade: the probe goes with the candidate.
    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("was not ready within 1s"), "{out:?}");
    wait_probe_gone(&sv, &file(3), "failed upgrade");
    // 4. The supervisor stops during an upgrade whose probe runs: nothing outlives it.
    let client = {
        let control = sv.control.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["upgrade", "--timeout", "20s", "--control"])
                .arg(control);
            run_with_deadline(cmd, Duration::from_secs(30))
        })
    };
    let pids = common::wait_for("generation 4's probe running", T, || {
        let pids = pids_in(&file(4));
        if pids.len() >= 2 {
            Ok(pids)
        } else {
            Err(format!("{pids:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    sv.signal(Signal::SIGTERM);
    let out = client.join().expect("client thread");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(sv.wait_exit(T), Exit::Code(143), "{}", sv.server.dump());
    // (SIGKILLed before the supervisor exited; dying may take the kernel a moment.)
    wait_probe_gone(&sv, &file(4), "the supervisor exited");
    assert_eq!(pids_in(&file(4)), pids);
}

/// The pid in the pid file, when it holds one.
fn pid_file_value(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .strip_suffix('\n')?
        .parse()
        .ok()
}

fn wait_pid_file(sv: &Supervised, path: &std::path::Path, pid: common::Pid) {
    common::wait_for(
        format!("{} to hold {pid}", path.display()),
        T,
        || match pid_file_value(path) {
            Some(p) if p == pid.as_raw() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
}

#[test]
fn pid_file_follows_the_current_generation() {
    let dir = TempDir::new("pidfile");
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("mkdir");
    let pid_file = run.join("app.pid");
    let app = dir.join("app.sh");
    let good = format!(
        "#!/bin/sh\nexec '{}' --listen 127.0.0.1:0\n",
        http_server().display()
    );
    let write_app = |body: &str| {
        let tmp = dir.join("app.tmp");
        std::fs::write(&tmp, body).expect("write app");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &app).expect("rename app");
    };
    write_app(&good);
    // A reader that never sees a half-written file: missing (before the first write, after
    // the last) or one whole pid.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, path) = (stop.clone(), pid_file.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let whole = text
                            .strip_suffix('\n')
                            .is_some_and(|t| t.parse::<i32>().is_ok());
                        assert!(whole, "a reader saw {text:?}");
                        reads += 1;
                    }
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
                }
                std::thread::yield_now();
            }
            reads
        })
    };
    let pid_file_arg = pid_file.to_str().expect("utf-8").to_owned();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--pid-file",
            &pid_file_arg,
            "--ready-timeout",
            "5s",
        ],
        &[app.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    wait_pid_file(&sv, &pid_file, first.pid);
    // Not the supervisor's pid: the app's.
    assert_ne!(first.pid, sv.pid());

    // An upgrade that succeeds: the new pid.
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    let second = sv.server.wait_ready(2);
    wait_pid_file(&sv, &pid_file, second.pid);

    // An upgrade that fails: still the old generation's pid.
    write_app("#!/bin/sh\nexit 3\n");
    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(pid_file_value(&pid_file), Some(second.pid.as_raw()));

    // A crash restart: the restarted pid.
    write_app(&good);
    sv.server
        .signal_pid(second.pid, Signal::SIGKILL)
        .expect("kill -9");
    let restarted = sv.server.wait_ready(4);
    wait_pid_file(&sv, &pid_file, restarted.pid);

    // Nothing else in the directory: no temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(&run)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["app.pid"], "{names:?}");

    // The final exit removes it.
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    assert!(!pid_file.exists(), "the pid file is removed on exit");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.join().expect("the reader saw only whole pids");
    assert!(reads > 0);

    // A pid file in a directory that does not exist: refused before anything starts.
    let out = run_with_deadline(
        {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["run", "--pid-file"])
                .arg(dir.join("missing/app.pid"))
                .arg("--control")
                .arg(dir.join("c2.sock"))
                .args(["--", "true"]);
            cmd
        },
        T,
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("--pid-file "), "{out:?}");
}
