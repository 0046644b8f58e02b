//! App state handed to the next generation (`Options::handoff_state`,
//! `Handover::take_state`): a counter that survives upgrades, with 16 MiB of
//! padding to show a large state.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Exit, ServerProcess, Signal};

const WAIT: Duration = Duration::from_secs(20);

fn hit(addr: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut line = String::new();
    stream.read_to_string(&mut line).expect("read");
    line.trim().to_owned()
}

#[test]
fn a_counter_survives_upgrades_in_the_handed_over_state() {
    let server = ServerProcess::example(
        "state_counter",
        &["--listen", "127.0.0.1:0", "--pad-mib", "16"],
    );
    let gen1 = server.wait_ready(1);
    for n in 1..=3 {
        assert_eq!(
            hit(gen1.addr),
            format!("count={n} generation=1 state_bytes=0")
        );
    }
    let mut previous = gen1;
    let state_bytes = 16 * (1 << 20) + "v1 3\n".len();
    for generation in 2..=4u64 {
        let trigger = Instant::now();
        server
            .signal_pid(previous.pid, Signal::SIGHUP)
            .expect("SIGHUP");
        let next = server.wait_ready(generation);
        eprintln!(
            "generation {generation} ready {:?} after the trigger, with ~16 MiB of state",
            trigger.elapsed()
        );
        assert_eq!(server.wait_exit(previous.pid, WAIT), Ok(Exit::Code(0)));
        let count = 3 + generation - 1;
        let expected_bytes = state_bytes + (count.to_string().len() - 1);
        assert_eq!(
            hit(next.addr),
            format!("count={count} generation={generation} state_bytes={expected_bytes}"),
            "the count went on in generation {generation}"
        );
        previous = next;
    }
}
