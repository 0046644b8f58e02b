//! The user-facing test kit (`handover::testkit`, feature `testkit`): `check_upgrades` passes on
//! a server that upgrades without dropping requests, with either way of seeing readiness, and
//! fails (with the failed requests counted) on one that cannot upgrade: the negative control.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use handover::testkit::{
    check_upgrades, Error, Exit, Mode, Readiness, Server, Target, UpgradeCheck,
};

fn http_server() -> Command {
    let mut cmd = Command::new(common::example_path("http_server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    cmd
}

fn small(upgrades: u32) -> UpgradeCheck {
    UpgradeCheck::new(upgrades)
        .requests_between(100)
        .upgrade_timeout(Duration::from_secs(20))
        .exit_timeout(Duration::from_secs(20))
        .max_duration(Duration::from_secs(60))
}

#[test]
fn check_upgrades_passes_with_ready_lines_under_load() {
    let report = check_upgrades(http_server(), small(3)).expect("check runs");
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.upgrades_ok(), 3, "{report}");
    assert_eq!(
        report.loads.len(),
        2,
        "keep-alive and per-request by default"
    );
    assert!(report.loads.iter().all(|(_, r)| r.ok >= 100), "{report}");
    for (i, u) in report.upgrades.iter().enumerate() {
        assert_eq!(u.generation, Some(i as u64 + 2), "{report}");
        assert!(u.ready_after.is_some() && u.old_exit_after.is_some());
        assert_eq!(u.old_exit, Some(Exit::Code(0)), "{report}");
    }
    assert_eq!(
        report.final_exit,
        Some(Exit::Code(0)),
        "SIGTERM drains: {report}"
    );
    let table = report.to_string();
    assert!(table.starts_with("PASSED"), "{table}");
    assert!(
        table.contains("eof") && table.contains("refused"),
        "{table}"
    );
}

#[test]
fn check_upgrades_passes_with_a_connect_probe_under_load() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(common::example_path("http_server"));
    cmd.args(["--listen", &addr.to_string()]);
    let report = check_upgrades(
        cmd,
        small(2)
            .readiness(Readiness::Connect)
            .addr(addr)
            .loads(vec![Mode::KeepAlive { connections: 4 }]),
    )
    .expect("check runs");
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    let pids: Vec<i32> = report.upgrades.iter().filter_map(|u| u.new_pid).collect();
    assert_eq!(pids.len(), 2, "{report}");
    assert_ne!(pids[0], pids[1]);
}

#[test]
fn check_upgrades_fails_on_a_server_that_cannot_upgrade_under_load() {
    // Negative control: plain_server does not handle SIGHUP, so the first one kills it.
    let mut cmd = Command::new(common::example_path("plain_server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    let report = check_upgrades(cmd, small(3).target(Target::Latest)).expect("check runs");
    eprintln!("{report}");
    assert!(!report.passed(), "{report}");
    assert_eq!(
        report.upgrades.len(),
        1,
        "stops once the server is gone: {report}"
    );
    assert_eq!(report.upgrades_failed(), 1, "{report}");
    assert!(
        report.failures().total() > 0,
        "the load saw the server die: {report}"
    );
    assert!(report.to_string().starts_with("FAILED"), "{report}");
}

#[test]
fn check_upgrades_reports_what_kept_it_from_running() {
    let err =
        check_upgrades(Command::new("/nonexistent/server"), small(1)).expect_err("no such program");
    assert!(matches!(err, Error::Spawn { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/server"), "{err}");

    let mut never_ready = Command::new("sh");
    never_ready.args(["-c", "echo starting; exec sleep 30"]);
    let err = check_upgrades(
        never_ready,
        small(1).start_timeout(Duration::from_millis(300)),
    )
    .expect_err("never ready");
    assert!(
        matches!(
            err,
            Error::Wait {
                timed_out: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("starting"),
        "the output is shown: {err}"
    );

    let err = check_upgrades(http_server(), small(1).readiness(Readiness::Connect))
        .expect_err("Connect needs an address");
    assert!(matches!(err, Error::Config { .. }), "{err}");
}

#[test]
fn server_kills_and_reaps_its_whole_group_on_drop() {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"sleep 30 & sh -c 'sleep 30 & exec sleep 30' &
           echo "ready pid=$$ generation=1"; wait"#,
    ]);
    let server = Server::spawn(cmd).expect("spawn");
    let ready = server
        .wait_ready(1, Duration::from_secs(10))
        .expect("ready line");
    assert_eq!(ready.pid, server.pid());
    assert_eq!(ready.addr, None);
    let pgid = server.pid();
    common::wait_for("4 processes in the group", Duration::from_secs(10), || {
        let n = server.members().len();
        if n >= 4 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .expect("group populated");
    drop(server);
    let left: Vec<_> = handover::testkit::all_processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid)
        .collect();
    assert!(left.is_empty(), "left after drop: {left:?}");
}
