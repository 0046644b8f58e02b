//! The rest of the example's contract and the library's lifecycle: final
//! stop on SIGTERM/SIGINT, sd_notify messages, programmatic upgrades with
//! their outcome, and the PID 1 warning.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::load;
use common::{
    deploy, fd_count, wait_until, Deploy, Exit, ServerProcess, Signal, TempDir, EXIT_TIMEOUT,
};

const WAIT: Duration = Duration::from_secs(20);

fn final_stop_drains(signal: Signal) {
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let gen1 = server.wait_ready(1);
    let base = fd_count(gen1.pid).expect("fd count");
    let addr = gen1.addr;
    let slow = thread::spawn(move || load::get(addr, "/slow?ms=700", WAIT));
    wait_until(
        "the slow request to be accepted",
        WAIT,
        || fd_count(gen1.pid).map(|c| c > base).unwrap_or(false),
        || server.dump(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    server.signal(signal).expect("stop signal");
    assert_eq!(
        server.wait_exit(gen1.pid, EXIT_TIMEOUT),
        Ok(Exit::Code(0)),
        "{}",
        server.dump()
    );
    let response = slow
        .join()
        .expect("thread")
        .expect("in-flight request completes");
    assert_eq!(response.status, 200);
    server
        .wait_stderr("final stop requested", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    final_stop_drains(Signal::SIGTERM);
}

#[test]
fn sigint_drains_and_exits_zero() {
    final_stop_drains(Signal::SIGINT);
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the read timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn sd_notify_ready_mainpid_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut cmd = Command::new(common::example_path("http_server"));
    cmd.args(["--listen", "127.0.0.1:0", "--child-probe"])
        .env("NOTIFY_SOCKET", &path);
    let server = ServerProcess::spawn(cmd);
    let gen1 = server.wait_ready(1);
    let first = recv(&socket);
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert!(
        !first.contains("MAINPID="),
        "the first process is systemd's main pid already: {first:?}"
    );

    server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    let second = recv(&socket);
    assert!(
        second.starts_with("READY=1\n") && second.contains(&format!("MAINPID={}\n", gen2.pid)),
        "the re-exec'd generation names itself the main pid: {second:?}"
    );
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    // An upgrade is no stop: generation 1 sent nothing more.
    let child = load::get(gen2.addr, "/child", WAIT).expect("GET /child");
    assert!(
        !child.body_str().contains("NOTIFY_SOCKET="),
        "the app's child does not get NOTIFY_SOCKET"
    );

    server
        .signal_pid(gen2.pid, Signal::SIGTERM)
        .expect("SIGTERM");
    assert_eq!(recv(&socket), "STOPPING=1");
    assert_eq!(server.wait_exit(gen2.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
}

/// `POST path` on a new connection; returns (status, body).
fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the response");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn programmatic_upgrade_returns_its_outcome() {
    let dir = TempDir::new("programmatic");
    let exe = dir.path().join("http_server");
    deploy(&exe, Deploy::Binary(&common::example_path("http_server")));
    let mut cmd = Command::new(&exe);
    cmd.args(["--listen", "127.0.0.1:0", "--upgrade-endpoint"]);
    let server = ServerProcess::spawn(cmd);
    let gen1 = server.wait_ready(1);

    let (status, body) = post(gen1.addr, "/upgrade");
    let gen2 = server.wait_ready(2);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("upgraded pid={} generation=2 ready_ms=", gen2.pid)),
        "{body}"
    );

    // Generation 1 must have stopped accepting, or it could take the next
    // request from the shared queue (and refuse it: it is stopping).
    server
        .wait_stderr("no longer accepting", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    deploy(&exe, Deploy::Missing);
    let (status, body) = post(gen2.addr, "/upgrade");
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("cannot start the new generation")
            && body.contains("No such file or directory"),
        "{body}"
    );
    let still = load::get(gen2.addr, "/", WAIT).expect("generation 2 keeps serving");
    assert_eq!(still.body_str(), format!("pid={} generation=2", gen2.pid));
}

#[test]
fn pid_1_without_supervisor_warns() {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(common::example_path("http_server"))
        .args(["--listen", "127.0.0.1:0"]);
    let server = ServerProcess::spawn(cmd);
    let ready = server.wait_ready(1);
    assert_eq!(
        ready.pid.as_raw(),
        1,
        "the example is PID 1 in its namespace"
    );
    let stderr = server.stderr();
    assert!(
        stderr.contains("running as PID 1 without the handover supervisor")
            && stderr.contains("handover run"),
        "{stderr}"
    );
}
