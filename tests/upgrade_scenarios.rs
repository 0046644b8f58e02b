//! S3 in-flight requests survive the cutover, S4 each kind of bad new
//! version, S5 a burst of SIGHUPs, S6 the drain cap.

mod common;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::load::{self, FailureClass, Load, LoadConfig, Mode};
use common::{
    deploy, fd_count, is_alive, proc_stat, wait_until, Deploy, Exit, Pid, ServerProcess, Signal,
    TempDir, EXIT_TIMEOUT,
};

const WAIT: Duration = Duration::from_secs(20);

/// Starts `http_server` from a copy in a temp dir, so the test can deploy
/// other things at its path.
fn server_in(dir: &TempDir, extra: &[&str]) -> (ServerProcess, PathBuf) {
    let exe = dir.path().join("http_server");
    deploy(&exe, Deploy::Binary(&common::example_path("http_server")));
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
    (ServerProcess::spawn(cmd), exe)
}

/// Waits until `pid` holds `n` more fds than `base`: accepted connections.
fn wait_accepted(server: &ServerProcess, pid: Pid, base: usize, n: usize) {
    wait_until(
        format!("pid {pid} to accept {n} connections"),
        WAIT,
        || fd_count(pid).map(|c| c >= base + n).unwrap_or(false),
        || format!("fds: {:?}\n{}", fd_count(pid), server.dump()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn wait_stderr(server: &ServerProcess, needle: &str, times: usize) {
    wait_until(
        format!("{times} × {needle:?} on stderr"),
        WAIT,
        || count(&server.stderr(), needle) >= times,
        || server.dump(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn slow_requests_survive_the_cutover_and_the_next_upgrade() {
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let gen1 = server.wait_ready(1);
    let base = fd_count(gen1.pid).expect("fd count");
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let addr = gen1.addr;
            thread::spawn(move || {
                let r = load::get(addr, "/slow?ms=1500", WAIT);
                (r, Instant::now())
            })
        })
        .collect();
    wait_accepted(&server, gen1.pid, base, 4);

    server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    let gen2_ready_at = Instant::now();
    wait_stderr(&server, "no longer accepting", 1);
    // A request after the cutover lands on the new generation.
    let after = load::get(gen1.addr, "/", WAIT).expect("request after the cutover");
    assert_eq!(after.body_str(), format!("pid={} generation=2", gen2.pid));

    // The new generation can be upgraded while its predecessor still drains.
    server
        .signal_pid(gen2.pid, Signal::SIGHUP)
        .expect("SIGHUP gen 2");
    let gen3 = server.wait_ready(3);
    assert!(
        is_alive(gen1.pid),
        "generation 1 still draining its slow requests when generation 3 is ready"
    );

    for handle in slow {
        let (result, done_at) = handle.join().expect("request thread");
        let response = result.unwrap_or_else(|f| panic!("slow request failed: {f:?}"));
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body_str(),
            format!("pid={} generation=1", gen1.pid),
            "started and finished on generation 1"
        );
        assert!(done_at > gen2_ready_at, "finished after the cutover");
    }
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    let last = load::get(gen1.addr, "/", WAIT).expect("request to generation 3");
    assert_eq!(last.body_str(), format!("pid={} generation=3", gen3.pid));
}

/// S4: a bad new version, deployed at the server's path; the old generation
/// keeps serving under load with nothing leaked, then a good deploy upgrades.
fn bad_version(bad: Deploy<'_>, expected_error: &str) {
    let dir = TempDir::new("bad-version");
    let (server, exe) = server_in(&dir, &["--ready-timeout-ms", "1500"]);
    let gen1 = server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(gen1.addr, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(50, WAIT).expect("load flowing");
    let fds_before = fd_count(gen1.pid).expect("fd count");

    deploy(&exe, bad);
    server.signal(Signal::SIGHUP).expect("SIGHUP");
    wait_stderr(&server, "upgrade failed; this generation keeps serving", 1);
    let stderr = server.stderr();
    assert!(
        stderr.contains(expected_error),
        "reason {expected_error:?} in:\n{stderr}"
    );
    // The failed child, if one was started, is gone and reaped.
    if let Some(pid) = stderr
        .split("the new generation (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse::<i32>().ok())
    {
        assert!(
            proc_stat(Pid::from_raw(pid)).is_none(),
            "failed child {pid} reaped"
        );
    }
    assert!(
        server.zombies().is_empty(),
        "no zombies: {:?}",
        server.zombies()
    );
    load.wait_for_more_ok(100, WAIT)
        .expect("old generation keeps serving");
    let bodies = load.snapshot().bodies;
    assert_eq!(bodies.len(), 1, "only generation 1 served: {bodies:?}");
    assert_eq!(
        fd_count(gen1.pid).expect("fd count"),
        fds_before,
        "no fd leaked"
    );

    // A later upgrade, to a good binary, works.
    deploy(&exe, Deploy::Binary(&common::example_path("http_server")));
    server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    let tag = format!("pid={} generation=2", gen2.pid);
    load.wait_for_body(|b| b == tag, WAIT)
        .expect("generation 2 serves");
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    let report = load.stop();
    report.assert_no_failures();
}

#[test]
fn new_version_exits_during_init() {
    bad_version(
        Deploy::Script("echo 'cannot read config' >&2; exit 3"),
        "exited with status 3 before it was ready",
    );
}

#[test]
fn new_version_crashes_during_init() {
    bad_version(Deploy::Script("kill -SEGV $$"), "was killed by SIGSEGV");
}

#[test]
fn new_version_never_ready() {
    bad_version(
        Deploy::Script("exec sleep 60"),
        "was not ready within 1.5s and was killed",
    );
}

#[test]
fn new_version_missing() {
    bad_version(Deploy::Missing, "No such file or directory");
}

#[test]
fn new_version_not_executable() {
    bad_version(
        Deploy::NotExecutable(&common::example_path("http_server")),
        "Permission denied",
    );
}

#[test]
fn sighup_burst_runs_one_upgrade_at_a_time() {
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let gen1 = server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(gen1.addr, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    load.wait_for_ok(50, WAIT).expect("load flowing");
    for _ in 0..50 {
        server.signal(Signal::SIGHUP).expect("SIGHUP");
    }
    let gen2 = server.wait_ready(2);
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    // Generation 1 is gone, so any second child it had started would be
    // visible now: there is exactly one other process, generation 2.
    let members: Vec<Pid> = server.group_members().iter().map(|p| p.pid).collect();
    assert_eq!(members, vec![gen2.pid], "{}", server.dump());
    assert_eq!(
        server
            .readies()
            .iter()
            .filter(|r| r.generation == 2)
            .count(),
        1
    );
    // Nothing is stuck: generation 2 upgrades on the next SIGHUP.
    server.signal_pid(gen2.pid, Signal::SIGHUP).expect("SIGHUP");
    let gen3 = server.wait_ready(3);
    let tag = format!("pid={} generation=3", gen3.pid);
    load.wait_for_body(|b| b == tag, WAIT)
        .expect("generation 3 serves");
    load.stop().assert_no_failures();
}

#[test]
fn drain_cuts_work_at_the_cap_and_exits_on_time() {
    let server = ServerProcess::example(
        "http_server",
        &["--listen", "127.0.0.1:0", "--drain-timeout-ms", "1000"],
    );
    let gen1 = server.wait_ready(1);
    let base = fd_count(gen1.pid).expect("fd count");
    let addr = gen1.addr;
    let long = thread::spawn(move || load::get(addr, "/slow?ms=20000", WAIT));
    let short = thread::spawn(move || load::get(addr, "/slow?ms=400", WAIT));
    wait_accepted(&server, gen1.pid, base, 2);

    server.signal(Signal::SIGHUP).expect("SIGHUP");
    server.wait_ready(2);
    let ready_at = Instant::now();
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    let exited_after = ready_at.elapsed();

    let short = short
        .join()
        .expect("thread")
        .expect("the short request completes");
    assert_eq!(short.status, 200);
    let cut = long
        .join()
        .expect("thread")
        .expect_err("the long request is cut");
    assert_eq!(cut.class, FailureClass::EofBeforeResponse, "{cut:?}");
    server
        .wait_stderr("drain timeout reached", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Generous bounds: the drain waited for the cap, and not much longer.
    assert!(
        exited_after >= Duration::from_millis(900),
        "exited after {exited_after:?}, before the 1 s cap"
    );
    assert!(
        exited_after < Duration::from_secs(6),
        "exited after {exited_after:?}, long after the 1 s cap"
    );
}

#[test]
fn new_generation_serves_on_when_the_old_one_dies_during_its_startup() {
    let dir = TempDir::new("orphaned");
    let (server, exe) = server_in(&dir, &[]);
    let gen1 = server.wait_ready(1);
    // The next version waits for the test's go-ahead before it starts (the
    // wait is the deployed program's own, not the test's synchronisation).
    let real = dir.path().join("real");
    deploy(&real, Deploy::Binary(&common::example_path("http_server")));
    let go = dir.path().join("go");
    deploy(
        &exe,
        Deploy::Script(&format!(
            "echo starting >&2; while [ ! -e {go} ]; do sleep 0.01; done; exec {real} \"$@\"",
            go = go.display(),
            real = real.display()
        )),
    );
    server.signal(Signal::SIGHUP).expect("SIGHUP");
    wait_stderr(&server, "starting", 1);
    server
        .signal(Signal::SIGKILL)
        .expect("SIGKILL generation 1");
    assert_eq!(
        server.wait_exit(gen1.pid, EXIT_TIMEOUT),
        Ok(Exit::Signal(Signal::SIGKILL))
    );
    std::fs::write(&go, "").expect("go-ahead");
    let gen2 = server.wait_ready(2);
    wait_stderr(&server, "the previous generation is gone", 1);
    let response = load::get(gen1.addr, "/", WAIT).expect("generation 2 serves");
    assert_eq!(
        response.body_str(),
        format!("pid={} generation=2", gen2.pid)
    );
}

#[test]
fn upgrade_follows_a_flipped_current_symlink() {
    // A deploy that flips `current` to a new release must start the new
    // release: the path is kept as started, not resolved to the old file.
    let dir = TempDir::new("symlink");
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    std::fs::create_dir_all(&v1).expect("v1 dir");
    std::fs::create_dir_all(&v2).expect("v2 dir");
    let real = common::example_path("http_server");
    deploy(&v1.join("http_server"), Deploy::Binary(&real));
    deploy(
        &v2.join("http_server"),
        Deploy::Script(&format!(
            "echo 'release v2 starting' >&2; exec {} \"$@\"",
            real.display()
        )),
    );
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(&v1, &current).expect("current -> v1");
    let mut cmd = std::process::Command::new(current.join("http_server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    let server = ServerProcess::spawn(cmd);
    server.wait_ready(1);

    let flipped = dir.path().join("current.new");
    std::os::unix::fs::symlink(&v2, &flipped).expect("current.new -> v2");
    std::fs::rename(&flipped, &current).expect("flip current");
    server.signal(Signal::SIGHUP).expect("SIGHUP");
    server.wait_ready(2);
    wait_stderr(&server, "release v2 starting", 1);
}
