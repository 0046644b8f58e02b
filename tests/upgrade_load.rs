//! S1 and S2: 20 upgrades in a row under load, with zero failed requests of
//! any class, and the serving pid changing at each upgrade.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::load::{Load, LoadConfig, Mode};
use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT, READY_TIMEOUT};

const UPGRADES: u64 = 20;

fn upgrades_under(mode: Mode) {
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let first = server.wait_ready(1);
    let load = Load::start(
        LoadConfig::new(first.addr, mode)
            .request_timeout(Duration::from_secs(5))
            .max_duration(Duration::from_secs(120)),
    );
    load.wait_for_ok(100, Duration::from_secs(10))
        .expect("load flowing before the first upgrade");

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
        // Traffic really moved: the new generation answers under load.
        let tag = format!("pid={} generation={generation}", ready.pid);
        load.wait_for_body(|b| b == tag, READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("generation {generation} serves: {e}"));
        // Let load run across the old generation's drain before the next upgrade.
        load.wait_for_more_ok(200, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("load after generation {generation}: {e}"));
    }
    // Every replaced generation drains and exits 0 while the load goes on.
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
    load.wait_for_more_ok(100, Duration::from_secs(10))
        .expect("the last generation keeps serving");
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();

    let served: BTreeSet<&str> = report
        .bodies
        .keys()
        .filter_map(|b| b.split(' ').nth(1))
        .collect();
    assert_eq!(
        served.len() as u64,
        UPGRADES + 1,
        "every generation served: {served:?}"
    );
    assert!(
        server.zombies().is_empty(),
        "no zombies: {:?}",
        server.zombies()
    );
}

#[test]
fn keep_alive_load_during_upgrades_in_a_row() {
    upgrades_under(Mode::KeepAlive { connections: 16 });
}

#[test]
fn connection_per_request_load_during_upgrades_in_a_row() {
    upgrades_under(Mode::PerRequest { concurrency: 8 });
}
