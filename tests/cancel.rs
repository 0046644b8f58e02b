//! Dropping the future of `Handover::upgrade` does not abandon a
//! half-started generation: the upgrade runs to its outcome. (In-process:
//! this test binary is itself the first generation; the next one is the
//! `http_server` example, started through a script that stands for a
//! version with a slow start-up.)

mod common;

use std::time::Duration;

use common::{deploy, Deploy, TempDir};
use handover::{Handover, Options, Stop};

#[test]
fn dropping_the_upgrade_future_does_not_cancel_the_upgrade() {
    let dir = TempDir::new("cancel");
    let next = dir.path().join("next");
    deploy(
        &next,
        Deploy::Script(&format!(
            "sleep 0.3; exec {} --listen 127.0.0.1:0",
            common::example_path("http_server").display()
        )),
    );
    let handover = Handover::new(
        Options::default()
            .executable(&next)
            .upgrade_signal(None)
            .stop_signals(Vec::new()),
    )
    .expect("handover");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let upgraded = rt.block_on(async {
        let listener = handover
            .tcp("http", "127.0.0.1:0".parse().expect("address"))
            .expect("listener");
        handover.ready().expect("ready");
        let addr = listener.local_addr().expect("address");
        // The caller gives up long before the new version is ready.
        let given_up = tokio::time::timeout(Duration::from_millis(20), handover.upgrade()).await;
        assert!(
            given_up.is_err(),
            "the caller stopped waiting: {given_up:?}"
        );
        // The upgrade still completes, and the generation it started serves.
        let stop = tokio::time::timeout(Duration::from_secs(20), handover.stopping())
            .await
            .expect("the upgrade completes although its future was dropped");
        let Stop::Upgraded(up) = stop else {
            panic!("expected an upgrade, got {stop:?}")
        };
        (up, addr)
    });
    let (up, addr) = upgraded;
    let child = nix::unistd::Pid::from_raw(up.pid);
    let response = common::load::get(addr, "/", Duration::from_secs(20));
    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(child, None);
    let response = response.expect("the new generation serves");
    assert_eq!(response.body_str(), format!("pid={} generation=2", up.pid));
}
