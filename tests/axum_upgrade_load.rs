//! `axum_server` (an axum `Router` served by `handover::serve::axum`): 20 upgrades in a row
//! under keep-alive and connection-per-request load side by side, with zero failed requests
//! of any class, every generation serving, and every replaced one exiting 0.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::load::{Load, LoadConfig, Mode};
use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT, READY_TIMEOUT};

const UPGRADES: u64 = 20;

#[test]
fn axum_server_keep_alive_and_per_request_load_during_upgrades_in_a_row() {
    let server = ServerProcess::example("axum_server", &["--listen", "127.0.0.1:0"]);
    let first = server.wait_ready(1);
    let start = |mode| {
        Load::start(
            LoadConfig::new(first.addr, mode)
                .request_timeout(Duration::from_secs(5))
                .max_duration(Duration::from_secs(120)),
        )
    };
    let keep_alive = start(Mode::KeepAlive { connections: 16 });
    let per_request = start(Mode::PerRequest { concurrency: 8 });
    let loads = [&keep_alive, &per_request];
    for load in loads {
        load.wait_for_ok(100, Duration::from_secs(10))
            .expect("load flowing before the first upgrade");
    }

    let mut pids = vec![first.pid];
    for generation in 2..=UPGRADES + 1 {
        server
            .signal_latest(Signal::SIGHUP)
            .expect("SIGHUP to the serving generation");
        let ready = server.wait_ready(generation);
        assert_eq!(ready.addr, first.addr, "same socket in every generation");
        assert!(
            !pids.contains(&ready.pid),
            "generation {generation} has a new pid"
        );
        pids.push(ready.pid);
        let tag = format!("pid={} generation={generation}", ready.pid);
        for load in loads {
            load.wait_for_body(|b| b == tag, READY_TIMEOUT)
                .unwrap_or_else(|e| panic!("generation {generation} serves: {e}"));
            load.wait_for_more_ok(100, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("load after generation {generation}: {e}"));
        }
    }
    for (i, pid) in pids[..pids.len() - 1].iter().enumerate() {
        match server.wait_exit(*pid, EXIT_TIMEOUT) {
            Ok(Exit::Code(0)) => {}
            other => panic!(
                "generation {} (pid {pid}) exit: {other:?}\n{}",
                i + 1,
                server.dump()
            ),
        }
    }
    for load in loads {
        load.wait_for_more_ok(100, Duration::from_secs(10))
            .expect("the last generation keeps serving");
    }
    for (name, load) in [("keep-alive", keep_alive), ("per-request", per_request)] {
        let report = load.stop();
        eprintln!("axum_server, {name}: {report}");
        report.assert_no_failures();
        let served: BTreeSet<&str> = report
            .bodies
            .keys()
            .filter_map(|b| b.split(' ').nth(1))
            .collect();
        assert_eq!(
            served.len() as u64,
            UPGRADES + 1,
            "{name}: every generation served: {served:?}"
        );
    }
    assert!(
        server.zombies().is_empty(),
        "no zombies: {:?}",
        server.zombies()
    );
}
