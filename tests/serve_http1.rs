//! `handover::serve` on HTTP/1, seen on the wire from raw sockets against `axum_server`:
//! `Connection: close` on the next response once the generation winds down, an idle
//! connection closed only after the idle grace, and the accept loop's back-off on `EMFILE`
//! logged once per episode.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::get;
use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT};

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
}

#[test]
fn serve_answers_connection_close_while_winding_down_and_closes_idle_after_the_grace() {
    let server = ServerProcess::example(
        "axum_server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--idle-grace-ms",
            "1000",
            "--no-handoff",
        ],
    );
    let first = server.wait_ready(1);
    let mut busy = connect(first.addr);
    let mut idle = connect(first.addr);
    let (head, body) = get(&mut busy, "/");
    assert!(
        !head.contains("connection: close"),
        "keep-alive while serving: {head}"
    );
    assert_eq!(body, format!("pid={} generation=1", first.pid));
    let (_, body) = get(&mut idle, "/");
    assert_eq!(body, format!("pid={} generation=1", first.pid));

    server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = server.wait_ready(2);
    let stopped = Instant::now();
    // The next request on a connection of the old generation is still served by it, and
    // its response asks the client to reconnect.
    let (head, body) = get(&mut busy, "/");
    assert!(
        head.contains("connection: close"),
        "Connection: close while draining: {head}"
    );
    assert_eq!(body, format!("pid={} generation=1", first.pid));
    let mut rest = Vec::new();
    assert_eq!(
        busy.read_to_end(&mut rest).expect("EOF"),
        0,
        "then it closes"
    );

    // The idle connection is closed after the grace, not at once.
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).expect("EOF"),
        0,
        "closed, nothing sent"
    );
    let closed_after = stopped.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "the idle connection was closed {closed_after:?} after the stop, before the grace"
    );
    assert_eq!(server.wait_exit(first.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));

    // A new connection is the new generation's.
    let (head, body) = get(&mut connect(first.addr), "/");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, format!("pid={} generation=2", second.pid));
}

#[test]
fn serve_backs_off_on_emfile_and_logs_once_per_episode() {
    const NOFILE: u64 = 64;
    let mut cmd = Command::new(common::example_path("axum_server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent; the
    // closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: NOFILE as libc::rlim_t,
                rlim_max: NOFILE as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = ServerProcess::spawn(cmd);
    let ready = server.wait_ready(1);
    // More connections than the server has fds: the first are accepted, the rest stay
    // queued in the backlog while accept fails with EMFILE.
    let held: Vec<TcpStream> = (0..NOFILE + 16).map(|_| connect(ready.addr)).collect();
    server
        .wait_stderr(
            "accept failed; retrying with back-off",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", server.dump()));
    // Not a synchronisation: the episode is made to last for several retries (5, 10, 20,
    // 40, 80, 160 ms...), none of which may log, before it is ended.
    std::thread::sleep(Duration::from_millis(300));
    drop(held);
    server
        .wait_stderr(
            "accepting again after accept errors",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", server.dump()));
    let stderr = server.stderr();
    assert_eq!(
        stderr
            .matches("accept failed; retrying with back-off")
            .count(),
        1,
        "one line for the whole episode:\n{}",
        server.dump()
    );
    let errors: u64 = stderr
        .lines()
        .find(|l| l.contains("accepting again after accept errors"))
        .and_then(|l| l.split("errors=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the episode's error count");
    assert!(
        errors > 1,
        "several failed accepts in the episode, one line: {errors}"
    );
    // And it serves again.
    let (_, body) = get(&mut connect(ready.addr), "/");
    assert_eq!(body, format!("pid={} generation=1", ready.pid));
    server
        .signal_pid(ready.pid, Signal::SIGTERM)
        .expect("SIGTERM");
    assert_eq!(server.wait_exit(ready.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
}
