//! Proves that the shared harness (tests/common) can both pass and fail: the load client
//! against small in-test servers that misbehave in one known way each, and the process
//! harness against shell scripts.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::load::{
    self, BlockingConn, FailureClass, IdleState, Load, LoadConfig, Mode, StopReason,
};
use common::{
    fd_count, is_alive, proc_stat, wait_for, zombies, Exit, Pid, Ready, ServerProcess, Signal,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SHORT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// In-test HTTP server with one behaviour each.

#[derive(Clone, Copy, Debug)]
enum Behavior {
    /// 200 `hello`, keep-alive.
    Ok,
    /// Like `Ok`, but every n-th response on a connection carries `Connection: close`, and the
    /// server closes after it.
    CloseEvery(u64),
    /// 200 with a chunked body `hello`.
    Chunked,
    /// 200 with a close-delimited body `hello`.
    CloseDelimited,
    /// Reads the request, then resets the connection (SO_LINGER 0).
    Reset,
    /// Reads the request, then closes without answering.
    CloseBeforeResponse,
    /// Reads the request, sends half a response, closes.
    Partial,
    /// Answers with this status.
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

struct TestServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    // Dropped last: cancels every connection task and closes the listener.
    _rt: tokio::runtime::Runtime,
}

impl TestServer {
    fn start(behavior: Behavior) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test server runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind test server");
        let addr = listener.local_addr().expect("test server addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, behavior, counter.clone()));
            }
        });
        TestServer {
            addr,
            requests,
            _rt: rt,
        }
    }
}

/// Reads one request head into nothing; false at EOF or error.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..i + 4);
            return true;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve(mut stream: TcpStream, behavior: Behavior, requests: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    let mut served = 0u64;
    while read_request(&mut stream, &mut buf).await {
        served += 1;
        requests.fetch_add(1, Ordering::SeqCst);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".as_slice();
        let reply: Vec<u8> = match behavior {
            Behavior::Ok => ok.to_vec(),
            Behavior::CloseEvery(n) if served % n == 0 => {
                let reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
                let _ = stream.write_all(reply).await;
                return;
            }
            Behavior::CloseEvery(_) => ok.to_vec(),
            Behavior::Chunked => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: 1\r\n\r\n".to_vec(),
            Behavior::CloseDelimited => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nhello").await;
                return;
            }
            Behavior::Reset => {
                let linger = nix::sys::socket::sockopt::Linger;
                let zero = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(&stream, linger, &zero).expect("SO_LINGER 0");
                return; // drop: RST
            }
            Behavior::CloseBeforeResponse => return,
            Behavior::Partial => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
                    .await;
                return;
            }
            Behavior::Status(code) => {
                format!("HTTP/1.1 {code} Oops\r\nContent-Length: 4\r\n\r\nnope").into_bytes()
            }
            Behavior::Hang => {
                std::future::pending::<()>().await;
                return;
            }
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// A port nobody listens on: bound, then closed.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    listener.local_addr().expect("probe addr")
}

fn cfg(addr: SocketAddr, mode: Mode, requests: u64) -> LoadConfig {
    LoadConfig::new(addr, mode)
        .max_requests(requests)
        .max_duration(SHORT)
        .request_timeout(SHORT)
        .pause_after_failure(Duration::from_millis(1))
}

/// Runs a bounded load to its end and returns the report.
fn run_load(cfg: LoadConfig) -> load::Report {
    let load = Load::start(cfg);
    load.wait_finished(Duration::from_secs(5))
        .expect("bounded load finishes by itself");
    load.stop()
}

/// Asserts that every one of `n` requests failed with `class`, and nothing else happened.
fn assert_all_failed_as(report: &load::Report, n: u64, class: FailureClass) {
    assert_eq!(report.ok, 0, "{report}");
    assert_eq!(report.failures.get(class), n, "{report}");
    assert_eq!(report.failures.total(), n, "{report}");
    assert!(
        report.samples.get(&class).is_some_and(|s| !s.is_empty()),
        "{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// Load client: success paths.

#[test]
fn load_keepalive_against_good_server_has_no_failures() {
    let server = TestServer::start(Behavior::Ok);
    let report = run_load(cfg(server.addr, Mode::KeepAlive { connections: 4 }, 200));
    report.assert_no_failures();
    assert_eq!(report.ok, 200, "{report}");
    assert_eq!(report.stopped_by, Some(StopReason::Count), "{report}");
    assert_eq!(
        report.connections, 4,
        "keep-alive reuses connections: {report}"
    );
    assert_eq!(report.bodies.get("hello"), Some(&200), "{report}");
    assert_eq!(report.statuses.get(&200), Some(&200), "{report}");
    assert_eq!(report.latencies.len(), 200);
    assert!(report.p50().expect("p50") <= report.p99().expect("p99"));
    assert_eq!(server.requests.load(Ordering::SeqCst), 200);
}

#[test]
fn load_per_request_opens_one_connection_per_request() {
    let server = TestServer::start(Behavior::Ok);
    let report = run_load(cfg(server.addr, Mode::PerRequest { concurrency: 4 }, 100));
    report.assert_no_failures();
    assert_eq!(report.ok, 100, "{report}");
    assert_eq!(report.connections, 100, "{report}");
}

#[test]
fn load_reconnects_after_connection_close_without_failure() {
    let server = TestServer::start(Behavior::CloseEvery(3));
    let report = run_load(cfg(server.addr, Mode::KeepAlive { connections: 2 }, 60));
    report.assert_no_failures();
    assert_eq!(report.ok, 60, "{report}");
    assert!(report.connection_close_headers >= 18, "{report}");
    assert!(report.connections >= 20, "{report}");
}

#[test]
fn load_parses_chunked_and_close_delimited_bodies() {
    for behavior in [Behavior::Chunked, Behavior::CloseDelimited] {
        let server = TestServer::start(behavior);
        let report = run_load(cfg(server.addr, Mode::KeepAlive { connections: 2 }, 20));
        report.assert_no_failures();
        assert_eq!(
            report.bodies.get("hello"),
            Some(&20),
            "{behavior:?}: {report}"
        );
    }
}

#[test]
fn load_stops_by_flag_and_by_time() {
    let server = TestServer::start(Behavior::Ok);
    let load = Load::start(
        LoadConfig::new(server.addr, Mode::KeepAlive { connections: 2 })
            .max_duration(Duration::from_secs(30)),
    );
    load.wait_for_ok(50, SHORT).expect("load flowing");
    load.wait_for_more_ok(50, SHORT)
        .expect("load still flowing");
    load.wait_for_body(|b| b == "hello", SHORT)
        .expect("body seen");
    let report = load.stop();
    report.assert_no_failures();
    assert!(report.ok >= 100, "{report}");
    assert_eq!(report.stopped_by, Some(StopReason::Flag), "{report}");

    let load = Load::start(
        LoadConfig::new(server.addr, Mode::PerRequest { concurrency: 2 })
            .max_duration(Duration::from_millis(100)),
    );
    load.wait_finished(SHORT).expect("stops by itself");
    let report = load.stop();
    assert_eq!(report.stopped_by, Some(StopReason::Duration), "{report}");
    report.assert_no_failures();
}

// ---------------------------------------------------------------------------------------------
// Load client: every failure class is seen, and only it.

#[test]
fn load_counts_resets() {
    let server = TestServer::start(Behavior::Reset);
    for mode in [
        Mode::KeepAlive { connections: 2 },
        Mode::PerRequest { concurrency: 2 },
    ] {
        let report = run_load(cfg(server.addr, mode, 10));
        assert_all_failed_as(&report, 10, FailureClass::Reset);
    }
}

#[test]
fn load_counts_eof_before_response() {
    for behavior in [Behavior::CloseBeforeResponse, Behavior::Partial] {
        let server = TestServer::start(behavior);
        let report = run_load(cfg(server.addr, Mode::KeepAlive { connections: 2 }, 10));
        assert_all_failed_as(&report, 10, FailureClass::EofBeforeResponse);
    }
}

#[test]
fn load_counts_bad_status_and_keeps_the_connection() {
    let server = TestServer::start(Behavior::Status(500));
    let report = run_load(cfg(server.addr, Mode::KeepAlive { connections: 2 }, 10));
    assert_all_failed_as(&report, 10, FailureClass::BadStatus);
    assert_eq!(report.statuses.get(&500), Some(&10), "{report}");
    assert_eq!(report.connections, 2, "{report}");
}

#[test]
fn load_counts_timeouts() {
    let server = TestServer::start(Behavior::Hang);
    let report = run_load(
        cfg(server.addr, Mode::KeepAlive { connections: 2 }, 4)
            .request_timeout(Duration::from_millis(100)),
    );
    assert_all_failed_as(&report, 4, FailureClass::Timeout);
}

#[test]
fn load_counts_refused() {
    let addr = closed_port();
    for mode in [
        Mode::KeepAlive { connections: 2 },
        Mode::PerRequest { concurrency: 2 },
    ] {
        let report = run_load(cfg(addr, mode, 6));
        assert_all_failed_as(&report, 6, FailureClass::Refused);
        assert_eq!(report.connections, 0);
    }
}

#[test]
fn load_waits_fail_with_the_report() {
    let server = TestServer::start(Behavior::Hang);
    let load = Load::start(
        LoadConfig::new(server.addr, Mode::KeepAlive { connections: 1 })
            .request_timeout(Duration::from_millis(50))
            .max_duration(SHORT),
    );
    let err = load
        .wait_for_ok(1, Duration::from_millis(200))
        .expect_err("no response ever comes");
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("timeout"), "the report names the class: {err}");
    let report = load.stop();
    assert!(report.failures.timeout >= 1, "{report}");

    // A load that has finished short of the target fails at once, not at the deadline.
    let load = Load::start(cfg(closed_port(), Mode::PerRequest { concurrency: 1 }, 2));
    load.wait_finished(SHORT).expect("bounded load finishes");
    let err = load
        .wait_for_ok(1, Duration::from_secs(60))
        .expect_err("load is over");
    assert!(err.contains("finished"), "{err}");
}

#[test]
#[should_panic(expected = "load had 3 failed requests")]
fn report_assert_no_failures_panics_on_failures() {
    let report = run_load(cfg(closed_port(), Mode::PerRequest { concurrency: 1 }, 3));
    report.assert_no_failures();
}

#[test]
fn blocking_conn_sees_idle_close() {
    let server = TestServer::start(Behavior::Ok);
    let mut conn = BlockingConn::connect(server.addr, SHORT).expect("connect");
    let resp = conn.request("/", false, SHORT).expect("request");
    assert_eq!((resp.status, resp.body_str().as_str()), (200, "hello"));
    assert!(!resp.close);
    assert_eq!(conn.idle_state(), IdleState::Open);

    let server = TestServer::start(Behavior::CloseEvery(1));
    let mut conn = BlockingConn::connect(server.addr, SHORT).expect("connect");
    let resp = conn.request("/", false, SHORT).expect("request");
    assert!(resp.connection_close && resp.close);
    assert_eq!(resp.header("connection"), Some("close"));
    wait_for("the server's FIN", SHORT, || match conn.idle_state() {
        IdleState::Closed => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .expect("idle close seen");

    let resp = load::get(server.addr, "/", SHORT).expect("one-shot get");
    assert!(resp.is_success());
}

// ---------------------------------------------------------------------------------------------
// Process harness.

fn sh(script: &str) -> ServerProcess {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    ServerProcess::spawn(cmd)
}

#[test]
fn ready_line_parses() {
    let r = Ready::parse("ready pid=42 generation=3 addr=127.0.0.1:8080").expect("parses");
    assert_eq!(r.pid, Pid::from_raw(42));
    assert_eq!(r.generation, 3);
    assert_eq!(r.addr, "127.0.0.1:8080".parse().expect("addr"));
    assert_eq!(Ready::parse("ready pid=42 generation=3"), None);
    assert_eq!(
        Ready::parse("not ready pid=1 generation=1 addr=1.2.3.4:5"),
        None
    );
    assert_eq!(
        Ready::parse("ready pid=x generation=1 addr=1.2.3.4:5"),
        None
    );
}

#[test]
fn server_process_ready_signal_and_exit_code() {
    let server = sh(r#"trap 'exit 7' TERM
        echo "ready pid=$$ generation=1 addr=127.0.0.1:9"
        echo "log line on stderr" >&2
        while :; do sleep 0.01; done"#);
    let ready = server.wait_ready(1);
    assert_eq!(ready.pid, server.pid());
    assert_eq!(ready.addr.port(), 9);
    wait_for("stderr captured", SHORT, || {
        let err = server.stderr();
        if err.contains("log line on stderr") {
            Ok(())
        } else {
            Err(err)
        }
    })
    .expect("stderr is captured");
    assert!(fd_count(server.pid()).expect("fd count") >= 3);

    server.signal(Signal::SIGTERM).expect("SIGTERM");
    let exit = server.wait_exit(server.pid(), SHORT).expect("exits");
    assert_eq!(exit, Exit::Code(7));
    // Remembered.
    assert_eq!(server.wait_exit(server.pid(), SHORT), Ok(Exit::Code(7)));
    assert!(!is_alive(server.pid()));
}

#[test]
fn wait_line_timeout_reports_recent_output() {
    let server = sh(r#"echo first-stdout-line; echo first-stderr-line >&2; exec sleep 30"#);
    server
        .wait_line(|l| l == "first-stdout-line", SHORT)
        .expect("line arrives");
    wait_for("stderr captured", SHORT, || {
        let err = server.stderr();
        err.contains("first-stderr-line").then_some(()).ok_or(err)
    })
    .expect("stderr");
    let err = server
        .wait_line(|l| l == "never printed", Duration::from_millis(100))
        .expect_err("must time out");
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("first-stdout-line"), "{err}");
    assert!(err.contains("first-stderr-line"), "{err}");
    let err = server
        .try_wait_ready(1, Duration::from_millis(50))
        .expect_err("no ready line");
    assert!(err.contains("generation=1"), "{err}");

    let err = server
        .wait_exit(server.pid(), Duration::from_millis(100))
        .expect_err("sleep 30 does not exit");
    assert!(err.contains("timed out") && err.contains("state"), "{err}");
}

#[test]
fn wait_line_fails_fast_when_stdout_closes() {
    let server = sh("echo bye; exit 3");
    let err = server
        .wait_line(|l| l == "never", Duration::from_secs(60))
        .expect_err("stdout closes");
    assert!(err.contains("closed"), "{err}");
    assert!(err.contains("bye"), "{err}");
    assert_eq!(server.wait_exit(server.pid(), SHORT), Ok(Exit::Code(3)));
}

#[test]
fn orphaned_generation_is_reparented_and_reaped() {
    // Generation 1 starts generation 2 in the background and exits: generation 2 is orphaned
    // and must be reparented to the test process (child subreaper).
    let server = sh(
        r#"sh -c 'echo "ready pid=$$ generation=2 addr=127.0.0.1:9"; exec sleep 30' &
        echo "ready pid=$$ generation=1 addr=127.0.0.1:9"
        exit 0"#,
    );
    let gen1 = server.wait_ready(1);
    let gen2 = server.wait_ready(2);
    assert_ne!(gen1.pid, gen2.pid);
    assert_eq!(server.wait_exit(gen1.pid, SHORT), Ok(Exit::Code(0)));
    let me = nix::unistd::getpid();
    wait_for(
        "generation 2 reparented to the test process",
        SHORT,
        || match proc_stat(gen2.pid) {
            Some(p) if p.ppid == me => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .expect("reparented");
    server
        .signal_pid(gen2.pid, Signal::SIGTERM)
        .expect("SIGTERM gen 2");
    assert_eq!(
        server.wait_exit(gen2.pid, SHORT),
        Ok(Exit::Signal(Signal::SIGTERM))
    );
    assert_eq!(server.zombies(), vec![]);
}

#[test]
fn drop_kills_and_reaps_the_whole_group() {
    let server = sh(r#"sleep 30 & echo "bg $!"
        sh -c 'sleep 30 & echo "bg $!"; exec sleep 30' &
        echo "ready pid=$$ generation=1 addr=127.0.0.1:9"
        wait"#);
    server.wait_ready(1);
    let mut pids = vec![server.pid()];
    for _ in 0..2 {
        let line = server
            .wait_line(|l| l.starts_with("bg "), SHORT)
            .expect("background pid");
        pids.push(Pid::from_raw(line[3..].parse().expect("pid")));
    }
    wait_for("4 live processes in the group", SHORT, || {
        let members = server.group_members();
        (members.len() >= 4)
            .then_some(())
            .ok_or(format!("{members:?}"))
    })
    .expect("group populated");
    let pgid = server.pgid();
    drop(server);
    // Drop reaps synchronously: nothing of the group is left, not even a zombie.
    let left: Vec<_> = common::all_processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid || pids.contains(&p.pid))
        .collect();
    assert_eq!(left, vec![], "processes left after drop");
}

#[test]
fn zombies_are_detected() {
    // Negative control: a child we do not reap shows up as a zombie, then goes once reaped.
    let mut cmd = Command::new("true");
    cmd.process_group(0);
    let mut child = cmd.spawn().expect("spawn true");
    let pid = Pid::from_raw(child.id() as i32);
    wait_for("`true` to become a zombie", SHORT, || {
        let z = zombies();
        z.iter()
            .any(|p| p.pid == pid)
            .then_some(())
            .ok_or(format!("{z:?}"))
    })
    .expect("zombie seen");
    child.wait().expect("reap");
    assert!(!zombies().iter().any(|p| p.pid == pid));
}
