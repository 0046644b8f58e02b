//! Upgrades under `handover run`, with the library's `http_server` example as the app:
//!
//! - 20 SIGHUP upgrades under keep-alive load (as PID 1 of a PID namespace) and under
//!   connection-per-request load (as a subreaper), with zero failed requests, each moving
//!   traffic to a new pid, and no zombie or old generation left afterwards;
//! - `handover upgrade` exit codes for success and each failure (the new generation exits
//!   during init, is never ready, its binary is missing or not executable), while the old
//!   generation keeps serving without a failed request, and the failed process is reaped
//!   before the outcome is reported;
//! - triggers during an upgrade are coalesced into one more upgrade, never lost or run in
//!   parallel; upgrades wait for a draining slot (`--max-draining`), shown by `status`.

mod common;
mod support;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::load::{Load, LoadConfig, Mode};
use common::{fd_targets, wait_for, Exit, Signal};
use support::{http_server, probe, wait_ready_in, wait_stderr, Supervised, TempDir, Tier};

const T: Duration = Duration::from_secs(20);
const UPGRADES: u64 = 20;

fn upgrades_under_load(tier: Tier, mode: Mode) {
    let dir = TempDir::new("load");
    let log = dir.join("ready.log");
    let server = http_server();
    // The app's stdout goes to a file: in a PID namespace its ready lines carry namespace
    // pids, which the harness must not take for pids of its own.
    let script = format!("exec \"$0\" \"$@\" >>'{}'", log.display());
    let sv = Supervised::start(
        tier,
        &dir,
        &[
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "10s",
            "--drain-timeout",
            "10s",
        ],
        &[
            OsStr::new("/bin/sh"),
            OsStr::new("-c"),
            OsStr::new(&script),
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    let first = wait_ready_in(&log, 1, T).unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    let fds_at_start = fd_targets(sv.pid()).expect("supervisor fds");
    let load = Load::start(LoadConfig::new(first.addr, mode).max_duration(Duration::from_secs(90)));
    load.wait_for_ok(50, T).expect("load flowing");
    let mut pids = vec![first.pid];
    let started = Instant::now();
    for generation in 2..=UPGRADES + 1 {
        sv.signal(Signal::SIGHUP);
        let ready = wait_ready_in(&log, generation, T)
            .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
        let body = format!("pid={} generation={generation}", ready.pid);
        load.wait_for_body(|b| b == body, T)
            .unwrap_or_else(|e| panic!("traffic did not move to generation {generation}: {e}"));
        // Some load on this generation before the next upgrade.
        load.wait_for_more_ok(50, T).expect("load flowing");
        pids.push(ready.pid);
    }
    let took = started.elapsed();
    let report = load.stop();
    eprintln!("{tier:?} {mode:?}: {UPGRADES} upgrades in {took:?}\n{report}");
    report.assert_no_failures();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        pids.len(),
        "every upgrade changes the pid: {pids:?}"
    );

    // Every old generation drains and is reaped: the newest is the only child left.
    let left = sv.wait_single_child(T);
    assert!(left.state != 'Z');
    // S9: nothing accumulates in the supervisor (notification sockets, pidfds, pipes).
    let fds_now = fd_targets(sv.pid()).expect("supervisor fds");
    assert_eq!(
        fds_now.len(),
        fds_at_start.len(),
        "supervisor fds after {UPGRADES} upgrades: {fds_now:?}, at the start: {fds_at_start:?}"
    );
    let status = sv.status_json();
    assert!(
        status.contains(&format!(
            "\"upgrades\":{{\"succeeded\":{UPGRADES},\"failed\":0}}"
        )),
        "{status}"
    );
    assert!(status.contains("\"draining\":[]"), "{status}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn sighup_upgrades_under_keepalive_load_as_pid1() {
    upgrades_under_load(Tier::PidNamespace, Mode::KeepAlive { connections: 8 });
}

#[test]
fn sighup_upgrades_under_per_request_load_as_subreaper() {
    upgrades_under_load(Tier::Subreaper, Mode::PerRequest { concurrency: 8 });
}

/// Replaces the app script atomically (a reader never sees half of it).
fn write_script(path: &Path, body: &str, mode: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename script");
}

/// The supervisor's children are alive (no zombie), and `pid` is not among them.
fn assert_reaped(sv: &Supervised, pid: Option<i32>) {
    let kids = sv.children();
    assert!(
        kids.iter().all(|k| k.state != 'Z'),
        "zombie among the supervisor's children: {kids:?}"
    );
    if let Some(pid) = pid {
        assert!(
            kids.iter().all(|k| k.pid.as_raw() != pid),
            "the failed generation {pid} is still there: {kids:?}"
        );
    }
}

/// The pid in `failed: generation N (pid P) ...`, when the failed generation had one.
fn failed_pid(line: &str, generation: u64) -> Option<i32> {
    let rest = line.strip_prefix(&format!("failed: generation {generation} (pid "))?;
    rest.split(')').next()?.parse().ok()
}

#[test]
fn upgrade_command_reports_success_and_each_failure() {
    let dir = TempDir::new("failures");
    let app = dir.join("app.sh");
    let good = format!("exec '{}' --listen 127.0.0.1:0", http_server().display());
    write_script(&app, &good, 0o755);
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "2s",
            "--drain-timeout",
            "5s",
        ],
        &[app.as_os_str()],
    );
    let first = sv.server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(first.addr, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(90)),
    );
    load.wait_for_ok(20, T).expect("load flowing");

    // Success.
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("step: starting generation 2"),
        "{out:?}"
    );
    assert!(out.stdout.contains("ok: generation 2 (pid "), "{out:?}");
    let second = sv.server.wait_ready(2);
    load.wait_for_body(|b| b.starts_with(&format!("pid={} ", second.pid)), T)
        .expect("generation 2 serves");
    let keeps = format!("generation 2 (pid {}) keeps serving", second.pid);

    // Each failure: exit 1, the reason, generation 2 keeps serving, the failed process reaped
    // before the answer.
    // (script, mode (0: no file), reason, whether the failed generation had a pid)
    let cases: [(&str, u32, &str, bool); 4] = [
        (
            "echo failing on purpose >&2; exit 3",
            0o755,
            "exited with status 3 before it was ready",
            true,
        ),
        (
            // Not exec: the shell's own child must be killed with it.
            "sleep 1000; exit 0",
            0o755,
            "was not ready within 2s (--ready-timeout)",
            true,
        ),
        ("", 0, "No such file or directory", false),
        (good.as_str(), 0o644, "Permission denied", false),
    ];
    for (i, (body, mode, reason, had_pid)) in cases.iter().enumerate() {
        let generation = 3 + i as u64;
        if *mode == 0 {
            std::fs::remove_file(&app).expect("remove the app");
        } else {
            write_script(&app, body, *mode);
        }
        let served_before = load.ok_count();
        let out = sv.upgrade();
        assert_eq!(out.code, Some(1), "case {reason:?}: {out:?}");
        let last = out.stdout.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("failed: "), "case {reason:?}: {out:?}");
        assert!(last.contains(reason), "case {reason:?}: {last}");
        assert!(last.contains(&format!("generation {generation}")), "{last}");
        assert!(last.ends_with(&keeps), "case {reason:?}: {last}");
        let pid = failed_pid(&last, generation);
        assert_eq!(pid.is_some(), *had_pid, "{last}");
        assert_reaped(&sv, pid);
        let sleeping: Vec<_> = sv
            .server
            .group_members()
            .into_iter()
            .filter(|p| p.comm == "sleep")
            .collect();
        assert!(
            sleeping.is_empty(),
            "left behind by generation {generation}: {sleeping:?}"
        );
        load.wait_for_ok(served_before + 10, T)
            .expect("generation 2 keeps serving");
    }
    wait_stderr(&sv, "failing on purpose", T);

    // Fixed: the next upgrade works, numbering goes on.
    write_script(&app, &good, 0o755);
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("ok: generation 7 (pid "), "{out:?}");
    let seventh = sv.server.wait_ready(7);
    load.wait_for_body(|b| b.starts_with(&format!("pid={} ", seventh.pid)), T)
        .expect("generation 7 serves");

    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();
    let served_by_known = report.ok_matching(|b| {
        [first.pid, second.pid, seventh.pid]
            .iter()
            .any(|p| b.starts_with(&format!("pid={p} ")))
    });
    assert_eq!(
        served_by_known, report.ok,
        "only good generations served: {report}"
    );
    let status = sv.status_json();
    assert!(
        status.contains("\"upgrades\":{\"succeeded\":2,\"failed\":4}"),
        "{status}"
    );
    assert!(
        status.contains("\"last_upgrade\":{\"outcome\":\"succeeded\",\"generation\":7"),
        "{status}"
    );
    sv.wait_single_child(T);

    // Could not ask: no supervisor there, or bad arguments.
    let mut cmd = std::process::Command::new(support::handover());
    cmd.args(["upgrade", "--control"])
        .arg(dir.join("nobody.sock"));
    let out = support::run_with_deadline(cmd, T);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("cannot reach the supervisor"),
        "{out:?}"
    );
    let out = sv.client(&["upgrade", "--timeout", "soon"], T);
    assert_eq!(out.code, Some(2), "{out:?}");

    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn triggers_during_an_upgrade_are_coalesced_not_lost() {
    let dir = TempDir::new("coalesce");
    let server = http_server();
    // Each upgrade takes 700 ms (fixed readiness delay): time to pile triggers on it.
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready",
            "delay:700ms",
        ],
        &[
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    wait_stderr(&sv, "generation ready generation=1", T);
    sv.signal(Signal::SIGHUP);
    wait_stderr(&sv, "upgrade started generation=2", T);
    // While generation 2 starts: a client, then a burst of SIGHUPs.
    let client = {
        let control = sv.control.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["upgrade", "--timeout", "20s", "--control"])
                .arg(control);
            support::run_with_deadline(cmd, Duration::from_secs(30))
        })
    };
    wait_stderr(
        &sv,
        "upgrade already in progress; another one will follow it",
        T,
    );
    for _ in 0..5 {
        sv.signal(Signal::SIGHUP);
    }
    let out = client.join().expect("client thread");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("waiting: generation 2 is being started by an earlier trigger"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("ok: generation 3 (pid "),
        "the client got the upgrade after its request: {out:?}"
    );
    wait_stderr(&sv, "upgrade succeeded generation=3", T);
    // Nothing else is pending: exactly two upgrades ran, one after the other.
    let status = sv.status_json();
    assert!(
        status.contains("\"upgrading\":null,\"upgrade_pending\":false"),
        "{status}"
    );
    assert!(
        status.contains("\"upgrades\":{\"succeeded\":2,\"failed\":0}"),
        "{status}"
    );
    let log = sv.server.stderr();
    assert_eq!(log.matches("upgrade started").count(), 2, "{log}");
    let first_done = log
        .find("upgrade succeeded generation=2")
        .expect("gen 2 done");
    let second_start = log
        .find("upgrade started generation=3")
        .expect("gen 3 started");
    assert!(first_done < second_start, "one upgrade at a time:\n{log}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn upgrades_wait_for_a_draining_slot() {
    let dir = TempDir::new("drain-cap");
    let probe = probe();
    // Old generations ignore SIGTERM, so they drain until SIGKILL at 1 s; one may drain.
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--ready",
            "delay:50ms",
            "--drain-timeout",
            "1s",
            "--max-draining",
            "1",
        ],
        &[
            probe.as_os_str(),
            OsStr::new("signals"),
            OsStr::new("--ignore-term"),
        ],
    );
    wait_stderr(&sv, "generation ready generation=1", T);
    let out = sv.upgrade();
    assert_eq!(out.code, Some(0), "{out:?}");
    let started = Instant::now();
    let client = {
        let control = sv.control.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new(support::handover());
            cmd.args(["upgrade", "--timeout", "20s", "--control"])
                .arg(control);
            support::run_with_deadline(cmd, Duration::from_secs(30))
        })
    };
    // Meanwhile `status` shows the draining generation and the waiting upgrade.
    wait_for(
        "status to show generation 1 draining and an upgrade pending",
        T,
        || {
            let status = sv.status_json();
            if status.contains("\"upgrade_pending\":true,\"draining\":[{\"generation\":1,") {
                Ok(())
            } else {
                Err(status)
            }
        },
    )
    .expect("draining shown");
    let out = client.join().expect("client thread");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("waiting: 1 old generations are still draining (--max-draining 1)"),
        "{out:?}"
    );
    assert!(out.stdout.contains("ok: generation 3"), "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the upgrade did not wait for generation 1 to go: {:?}",
        started.elapsed()
    );
    wait_stderr(&sv, "drain timeout: SIGKILL", T);
    // The app ignores SIGTERM: a stop ends in SIGKILL after the drain timeout.
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(128 + 9), "{}", sv.server.dump());
}

/// S4 "never ready" under load, with requests in flight on the failed candidate: it took
/// connections from the shared socket (an app that cannot be told "not yet" serves as soon as
/// it starts), so it must drain them before it goes, not be SIGKILLed with them.
#[test]
fn a_never_ready_candidate_drains_under_load_before_it_is_killed() {
    let dir = TempDir::new("never-ready");
    let server = http_server();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--listen",
            "http=tcp://127.0.0.1:0",
            // Generation 1 is ready at once; every later one never is.
            "--ready",
            "exec:test \"$HANDOVER_GENERATION\" = 1",
            "--ready-timeout",
            "1s",
            // --failed-drain-timeout defaults to it.
            "--drain-timeout",
            "20s",
        ],
        &[
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    let first = sv.server.wait_ready(1);
    wait_stderr(&sv, "generation ready generation=1", T);
    let fast = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 4 })
            .max_duration(Duration::from_secs(90)),
    );
    let slow = Load::start(
        LoadConfig::new(first.addr, Mode::PerRequest { concurrency: 8 })
            .path("/slow?ms=400")
            .max_duration(Duration::from_secs(90)),
    );
    fast.wait_for_ok(50, T).expect("load flowing");
    slow.wait_for_ok(8, T).expect("slow load flowing");

    let out = sv.upgrade();
    assert_eq!(out.code, Some(1), "{out:?}\n{}", sv.server.dump());
    let second = sv.server.wait_ready(2);
    // Reaped before the outcome.
    assert_reaped(&sv, Some(second.pid.as_raw()));
    fast.wait_for_more_ok(50, T)
        .expect("generation 1 keeps serving");
    slow.wait_for_more_ok(8, T)
        .expect("generation 1 keeps serving");
    let fast = fast.stop();
    let slow = slow.stop();
    eprintln!("fast:\n{fast}\nslow:\n{slow}");
    fast.assert_no_failures();
    slow.assert_no_failures();
    let by_second = |r: &common::load::Report| {
        r.ok_matching(|b| b.starts_with(&format!("pid={} ", second.pid)))
    };
    assert!(
        by_second(&fast) + by_second(&slow) > 0,
        "generation 2 served nothing: the test proves nothing\n{fast}\n{slow}"
    );

    let last = out.stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with(&format!(
            "failed: generation 2 (pid {}) was not ready within 1s (--ready-timeout)",
            second.pid
        )),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "step: stopping generation 2 (pid {}) with SIGTERM, SIGKILL in 20s",
            second.pid
        )),
        "{out:?}"
    );
    // The candidate was told to stop, drained, and exited by itself: no SIGKILL.
    let log = sv.server.stderr();
    let failing = log
        .find("upgrade failing: stopping the new generation generation=2")
        .unwrap_or_else(|| panic!("{log}"));
    let own = log
        .find(&format!(
            "final stop requested generation=2 pid={}",
            second.pid
        ))
        .unwrap_or_else(|| panic!("generation 2 never saw the stop signal:\n{log}"));
    let reaped = log
        .find(&format!(
            "failed generation reaped generation=2 pid={} status=\"exited with status 0\"",
            second.pid
        ))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(failing < own && own < reaped, "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}
