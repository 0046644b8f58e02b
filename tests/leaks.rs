//! S9: no fd accumulates across upgrades, and the app's own children
//! inherit none of our fds or variables.

mod common;

use std::time::Duration;

use common::load;
use common::{fd_count, fd_targets, Exit, ServerProcess, Signal, EXIT_TIMEOUT};

const WAIT: Duration = Duration::from_secs(20);

/// What `/child` reports: the child's fds and environment.
fn child_report(addr: std::net::SocketAddr) -> String {
    let response = load::get(addr, "/child", WAIT).expect("GET /child");
    assert_eq!(response.status, 200);
    response.body_str()
}

fn assert_clean_child(report: &str, generation: u64) {
    for line in report.lines() {
        assert!(
            !line.contains("socket:") && !line.contains("anon_inode:"),
            "generation {generation}: the app's child inherited an fd: {line}\n{report}"
        );
        for var in [
            "LISTEN_FDS=",
            "LISTEN_PID=",
            "LISTEN_FDNAMES=",
            "HANDOVER_",
            "NOTIFY_SOCKET=",
        ] {
            assert!(
                !line.starts_with(var),
                "generation {generation}: the app's child inherited {line}"
            );
        }
    }
    assert!(
        report.contains("PATH="),
        "the probe printed its environment:\n{report}"
    );
}

#[test]
fn fd_count_is_stable_across_upgrades_and_children_inherit_nothing() {
    let server =
        ServerProcess::example("http_server", &["--listen", "127.0.0.1:0", "--child-probe"]);
    let gen1 = server.wait_ready(1);
    assert_clean_child(&child_report(gen1.addr), 1);

    // Generation 1 may hold strays of whoever started it (fds inherited
    // without close-on-exec); no later generation receives them, so the
    // baseline is generation 2's.
    let mut baseline: Option<Vec<(i32, String)>> = None;
    let mut previous = gen1.pid;
    for generation in 2..=21 {
        server.signal_pid(previous, Signal::SIGHUP).expect("SIGHUP");
        let ready = server.wait_ready(generation);
        assert_eq!(server.wait_exit(previous, EXIT_TIMEOUT), Ok(Exit::Code(0)));
        let count = fd_count(ready.pid).expect("fd count");
        let baseline =
            baseline.get_or_insert_with(|| fd_targets(ready.pid).expect("fds of generation 2"));
        assert_eq!(
            count,
            baseline.len(),
            "generation {generation} has {count} fds, generation 2 had {}: {:?} vs {baseline:?}",
            baseline.len(),
            fd_targets(ready.pid)
        );
        if generation == 2 || generation == 21 {
            assert_clean_child(&child_report(ready.addr), generation);
        }
        previous = ready.pid;
    }
    assert!(server.zombies().is_empty(), "{:?}", server.zombies());
}

#[test]
fn fds_the_first_generation_inherited_by_accident_do_not_reach_the_next() {
    let dir = std::env::temp_dir().join(format!("handover-stray-fd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let stray = dir.join("stray-file");
    std::fs::write(&stray, "").expect("stray file");
    // Whoever started generation 1 leaked fd 7 to it (not close-on-exec).
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "exec 7<'{}'; exec \"$0\" --listen 127.0.0.1:0",
            stray.display()
        ))
        .arg(common::example_path("http_server"));
    let server = ServerProcess::spawn(cmd);
    let gen1 = server.wait_ready(1);
    let has_stray = |pid| {
        fd_targets(pid)
            .expect("fds")
            .iter()
            .any(|(_, target)| target.contains("stray-file"))
    };
    assert!(has_stray(gen1.pid), "generation 1 holds the stray fd");
    server.signal_pid(gen1.pid, Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    assert!(
        !has_stray(gen2.pid),
        "generation 2 inherited the stray fd: {:?}",
        fd_targets(gen2.pid)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
