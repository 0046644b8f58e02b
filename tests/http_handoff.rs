//! `serve` hands its idle HTTP/1 keep-alive connections to the new generation at every
//! upgrade, with no app code (`http_server`): the clients keep their TCP connections, and
//! see no error, including when the new generation dies in the middle of adopting them.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::load::{Load, LoadConfig, Mode};
use common::{deploy, wait_for, Deploy, Exit, Ready, ServerProcess, Signal, TempDir};

const WAIT: Duration = Duration::from_secs(20);

/// `GET path` on `stream`: (head, lowercase; body, trimmed).
fn get(stream: &mut TcpStream, path: &str) -> (String, String) {
    let (head, body) = common::http::get(stream, path);
    (head, body.trim().to_owned())
}

/// One response on `stream`: (head, lowercase; body, trimmed).
fn read_response(stream: &mut TcpStream) -> (String, String) {
    let (head, body) = common::http::read_response(stream);
    (head, body.trim().to_owned())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

fn body_of(ready: &Ready) -> String {
    format!("pid={} generation={}", ready.pid, ready.generation)
}

/// `http_server` run from a copy at a path of its own, so that a test can deploy other
/// releases over it.
struct App {
    _dir: TempDir,
    exe: std::path::PathBuf,
    real: std::path::PathBuf,
}

impl App {
    fn new(tag: &str) -> App {
        let dir = TempDir::new(tag);
        let exe = dir.path().join("app");
        let real = common::example_path("http_server");
        deploy(&exe, Deploy::Binary(&real));
        App {
            _dir: dir,
            exe,
            real,
        }
    }

    fn command(&self) -> Command {
        Command::new(&self.exe)
    }

    /// A release at the app's path that runs the real binary with `extra`.
    fn deploy_release(&self, extra: &str) {
        deploy(
            &self.exe,
            Deploy::Script(&format!("exec {} \"$@\" {extra}", self.real.display())),
        );
    }

    /// The real binary again.
    fn deploy_real(&self) {
        deploy(&self.exe, Deploy::Binary(&self.real));
    }
}

/// Keep-alive load with `connections` connections on `addr`, flowing.
fn keep_alive(addr: SocketAddr, connections: usize) -> Load {
    let load = Load::start(
        LoadConfig::new(addr, Mode::KeepAlive { connections })
            .max_duration(Duration::from_secs(300)),
    );
    load.wait_for_ok(connections as u64 * 4, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    load
}

/// A `key=N` field of a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// The `drain complete` line of `generation`: its connection counts.
fn connections_of(stderr: &str, generation: u64) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains(&format!("drain complete generation={generation} ")))
        .unwrap_or_else(|| panic!("no drain line for generation {generation}:\n{stderr}"));
    let get = |key| field(line, key).unwrap_or_else(|| panic!("no {key} in {line}"));
    (
        get("connections_accepted"),
        get("connections_adopted"),
        get("connections_handed_over"),
    )
}

#[test]
fn keep_alive_clients_keep_their_connections_across_twenty_upgrades() {
    const CONNECTIONS: usize = 64;
    const UPGRADES: u64 = 20;
    // Only the lifecycle's lines: 21 generations' worth must fit the captured stderr.
    let mut cmd = Command::new(common::example_path("http_server"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,handover::handover=info");
    let server = ServerProcess::spawn(cmd);
    let first = server.wait_ready(1);
    let load = keep_alive(first.addr, CONNECTIONS);
    let mut generations = vec![first.clone()];
    for generation in 2..=UPGRADES + 1 {
        let serving = generations.last().expect("a generation").clone();
        server
            .signal_pid(serving.pid, Signal::SIGHUP)
            .expect("SIGHUP");
        let next = server.wait_ready(generation);
        assert_eq!(server.wait_exit(serving.pid, WAIT), Ok(Exit::Code(0)));
        // The new generation answers on the connections it took over.
        let body = body_of(&next);
        load.wait_for_body(|b| b == body, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        generations.push(next);
    }
    load.wait_for_more_ok(CONNECTIONS as u64, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let report = load.stop();
    let last = generations.last().expect("a generation").clone();
    server
        .signal_pid(last.pid, Signal::SIGTERM)
        .expect("SIGTERM");
    assert_eq!(server.wait_exit(last.pid, WAIT), Ok(Exit::Code(0)));

    assert_eq!(report.failure_total(), 0, "{report}");
    // Client side: the test kit's connections are the first 64, never reopened.
    assert_eq!(
        report.connections, CONNECTIONS as u64,
        "new connections during {UPGRADES} upgrades:\n{report}"
    );
    assert_eq!(report.server_closes, 0, "{report}");
    assert_eq!(report.idle_closes, 0, "{report}");
    // Server side: generation 1 accepted them all, and each later one accepted none and
    // adopted all 64 from its predecessor, which handed over all 64.
    let stderr = server.stderr();
    for ready in &generations {
        let (accepted, adopted, handed_over) = connections_of(&stderr, ready.generation);
        let g = ready.generation;
        let first = g == 1;
        let last = g == UPGRADES + 1;
        assert_eq!(
            accepted,
            if first { CONNECTIONS as u64 } else { 0 },
            "accepted by generation {g}"
        );
        assert_eq!(
            adopted,
            if first { 0 } else { CONNECTIONS as u64 },
            "adopted by generation {g}"
        );
        assert_eq!(
            handed_over,
            if last { 0 } else { CONNECTIONS as u64 },
            "handed over by generation {g}"
        );
        assert!(
            report.bodies.get(&body_of(ready)).copied().unwrap_or(0) > 0,
            "generation {g} served: {:?}",
            report.bodies
        );
    }
    eprintln!(
        "{CONNECTIONS} keep-alive connections, {UPGRADES} upgrades: {} requests, 0 failed, \
         {} connections opened (0 by the upgrades)",
        report.requests(),
        report.connections
    );
}

#[test]
fn bytes_read_but_not_parsed_travel_with_the_connection() {
    let mut cmd = Command::new(common::example_path("http_server"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info,handover::serve=debug");
    let server = ServerProcess::spawn(cmd);
    let first = server.wait_ready(1);
    let mut idle = connect(first.addr);
    assert_eq!(get(&mut idle, "/").1, body_of(&first));
    let mut partial = connect(first.addr);
    let local = partial.local_addr().expect("local address");
    // A request and the start of the next in one segment: hyper reads both, answers the
    // first, and holds the second, incomplete, in its read buffer.
    const NEXT: &[u8] = b"GET / HTTP/1.1\r\nhost: te";
    partial
        .write_all(&[&b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"[..], NEXT].concat())
        .expect("send");
    let (head, body) = read_response(&mut partial);
    assert_eq!(body, body_of(&first));
    assert!(!head.contains("connection: close"), "{head}");

    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = server.wait_ready(2);
    // Generation 1 is gone: whatever answers now is generation 2.
    assert_eq!(server.wait_exit(first.pid, WAIT), Ok(Exit::Code(0)));
    let stderr = server.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("submitted for handover")
            && field(l, "unparsed") == Some(NEXT.len() as u64)),
        "generation 1 handed the unparsed bytes over:\n{stderr}"
    );
    partial.write_all(b"st\r\n\r\n").expect("send the rest");
    let (head, body) = read_response(&mut partial);
    assert_eq!(
        body,
        body_of(&second),
        "the rest of the request reached generation 2"
    );
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(
        partial.local_addr().expect("local"),
        local,
        "the same connection"
    );
    let (head, body) = get(&mut idle, "/");
    assert_eq!(body, body_of(&second));
    assert!(!head.contains("connection: close"), "{head}");
}

#[test]
fn a_thousand_idle_keep_alive_connections_move_in_one_upgrade() {
    const CONNECTIONS: usize = 1000;
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let first = server.wait_ready(1);
    let mut connections: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let mut c = connect(first.addr);
            assert_eq!(get(&mut c, "/").1, body_of(&first));
            c
        })
        .collect();
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = server.wait_ready(2);
    assert_eq!(server.wait_exit(first.pid, WAIT), Ok(Exit::Code(0)));
    let stderr = server.stderr();
    let handed = stderr
        .lines()
        .find(|l| l.contains("connections handed to the new generation"))
        .unwrap_or_else(|| panic!("no handover line:\n{stderr}"));
    assert_eq!(field(handed, "moved"), Some(CONNECTIONS as u64), "{handed}");
    let took_us = field(handed, "took_us").expect("took_us");
    // By the processes' own clocks: the signal, and the old generation's last line.
    let trigger = common::log_timestamp(&stderr, "signal received generation=1").expect("trigger");
    let exited = common::log_timestamp(&stderr, "exiting report").expect("exit line");
    for c in &mut connections {
        let (head, body) = get(c, "/");
        assert_eq!(body, body_of(&second));
        assert!(!head.contains("connection: close"), "{head}");
    }
    eprintln!(
        "{CONNECTIONS} idle keep-alive connections: handed over in {:.1} ms; trigger to the \
         old generation's exit {:.1} ms",
        took_us as f64 / 1000.0,
        (exited - trigger) * 1000.0
    );
}

/// A new generation that dies (killed, or crashing by itself) after it has prepared the
/// adoption of the old generation's idle connections, before their commit: the upgrade
/// fails, the old generation resumes with every connection, the clients see nothing.
fn dies_mid_adoption(kill: bool) {
    const IDLE: usize = 8;
    let app = App::new("handoff-mid-adoption");
    let mut cmd = app.command();
    // A 3 s window for busy connections to become idle keeps the handover open while a
    // 4 s request is answered; the new generation dies inside it.
    cmd.args(["--listen", "127.0.0.1:0", "--idle-grace-ms", "3000"])
        .env("RUST_LOG", "info,handover::handoff=debug");
    let server = ServerProcess::spawn(cmd);
    let first = server.wait_ready(1);
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| {
            let mut c = connect(first.addr);
            assert_eq!(get(&mut c, "/").1, body_of(&first));
            c
        })
        .collect();
    let mut slow = connect(first.addr);
    slow.write_all(b"GET /slow?ms=4000 HTTP/1.1\r\nhost: test\r\n\r\n")
        .expect("send");
    app.deploy_release(if kill {
        ""
    } else {
        "--crash-after-ready-ms 300"
    });
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = server.wait_ready(2);
    wait_for(
        "the new generation prepared every idle connection",
        WAIT,
        || {
            let prepared = server.stderr().matches("connection offer prepared").count();
            if prepared >= IDLE {
                Ok(())
            } else {
                Err(format!("{prepared} prepared"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.dump()));
    if kill {
        server
            .signal_pid(second.pid, Signal::SIGKILL)
            .expect("SIGKILL");
    }
    // Reaped by generation 1, its parent: gone is what can be seen from here.
    assert!(
        server.wait_exit(second.pid, WAIT).is_ok(),
        "generation 2 is gone"
    );
    server
        .wait_stderr("handover failed: rolled back", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = server.stderr();
    assert!(
        !stderr.contains("connections handed to the new generation"),
        "nothing was committed:\n{stderr}"
    );
    // Every connection is generation 1's, on the same socket, with nothing said.
    for c in &mut idle {
        let (head, body) = get(c, "/");
        assert_eq!(body, body_of(&first));
        assert!(!head.contains("connection: close"), "{head}");
    }
    let (_, body) = read_response(&mut slow);
    assert_eq!(body, body_of(&first), "the slow request completed");
    let mut fresh = connect(first.addr);
    assert_eq!(
        get(&mut fresh, "/").1,
        body_of(&first),
        "and it accepts again"
    );
    assert!(common::is_alive(first.pid));
}

#[test]
fn a_new_generation_killed_mid_adoption_loses_nothing() {
    dies_mid_adoption(true);
}

#[test]
fn a_new_generation_crashing_mid_adoption_loses_nothing() {
    dies_mid_adoption(false);
}

#[test]
fn on_probation_connections_stay_and_move_only_at_promotion() {
    const CONNECTIONS: usize = 16;
    let app = App::new("handoff-probation");
    let mut cmd = app.command();
    cmd.args(["--listen", "127.0.0.1:0", "--probation-ms", "1000"])
        .args(["--health-path", "/healthz", "--health-interval-ms", "100"])
        .args([
            "--health-threshold",
            "3",
            "--failed-drain-timeout-ms",
            "3000",
        ]);
    let server = ServerProcess::spawn(cmd);
    let first = server.wait_ready(1);
    let load = keep_alive(first.addr, CONNECTIONS);

    // An unhealthy release: rolled back, and the keep-alive clients never left
    // generation 1 (the canary saw its health checks and new connections only).
    app.deploy_release("--unhealthy");
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let canary = server.wait_ready(2);
    server
        .wait_stderr("probation failed: rolled back", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(server.wait_exit(canary.pid, WAIT).is_ok());
    load.wait_for_more_ok(CONNECTIONS as u64 * 4, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let during = load.snapshot();
    assert_eq!(during.connections, CONNECTIONS as u64, "{during}");
    assert_eq!(
        during.bodies.get(&body_of(&canary)).copied().unwrap_or(0),
        0,
        "a keep-alive client reached the canary: {:?}",
        during.bodies
    );

    // A good release: promoted after its window, then every connection moves.
    app.deploy_real();
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let promoted = wait_for("a second generation 2 ready", WAIT, || {
        server
            .readies()
            .into_iter()
            .find(|r| r.generation == 2 && r.pid != canary.pid)
            .ok_or_else(|| format!("{:?}", server.readies()))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.wait_exit(first.pid, WAIT), Ok(Exit::Code(0)));
    let body = body_of(&promoted);
    load.wait_for_body(|b| b == body, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    load.wait_for_more_ok(CONNECTIONS as u64 * 4, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let report = load.stop();
    assert_eq!(report.failure_total(), 0, "{report}");
    assert_eq!(
        report.connections, CONNECTIONS as u64,
        "new connections through a rollback and a promotion:\n{report}"
    );
    let stderr = server.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("connections handed to the new generation")
                && field(l, "moved") == Some(CONNECTIONS as u64)),
        "the {CONNECTIONS} connections moved at the promotion:\n{stderr}"
    );
}

#[test]
fn a_release_with_handoff_off_declines_and_the_clients_reconnect_without_error() {
    const CONNECTIONS: usize = 16;
    let app = App::new("handoff-declined-http");
    let mut cmd = app.command();
    cmd.args(["--listen", "127.0.0.1:0"]);
    let server = ServerProcess::spawn(cmd);
    let first = server.wait_ready(1);
    let load = keep_alive(first.addr, CONNECTIONS);
    app.deploy_release("--no-handoff");
    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = server.wait_ready(2);
    assert_eq!(server.wait_exit(first.pid, WAIT), Ok(Exit::Code(0)));
    let body = body_of(&second);
    load.wait_for_body(|b| b == body, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    load.wait_for_more_ok(CONNECTIONS as u64 * 4, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let report = load.stop();
    assert_eq!(report.failure_total(), 0, "{report}");
    // Declined at once (not after waiting for a taker), then closed gracefully: each
    // client reconnected, to generation 2.
    let stderr = server.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("connections handed to the new generation"))
        .unwrap_or_else(|| panic!("no handover line:\n{stderr}"));
    assert_eq!(field(line, "moved"), Some(0), "{line}");
    assert_eq!(field(line, "declined"), Some(CONNECTIONS as u64), "{line}");
    assert!(
        field(line, "took_us").expect("took_us") < 1_000_000,
        "the offers were declined at once: {line}"
    );
    assert!(
        report.connections > CONNECTIONS as u64,
        "the clients reconnected: {report}"
    );
}
