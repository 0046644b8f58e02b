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
