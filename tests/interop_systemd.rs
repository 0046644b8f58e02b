//! S8, library side: sockets from systemd socket activation
//! (`systemd-socket-activate`, Debian's systemd package) are adopted, served
//! and passed on; a generation we start sees `LISTEN_PID` equal to its own
//! pid.

mod common;

use std::process::Command;
use std::thread;
use std::time::Duration;

use common::load;
use common::{wait_until, Exit, ServerProcess, Signal, EXIT_TIMEOUT};

const WAIT: Duration = Duration::from_secs(20);

/// Starts `systemd-socket-activate -l 127.0.0.1:PORT [--fdname=NAME] http_server ARGS`
/// on a free port; returns it once the activator listens.
fn activate(fdname: Option<&str>, app_listen: impl Fn(u16) -> String) -> (ServerProcess, u16) {
    let mut last_error = String::new();
    for _ in 0..3 {
        // A free port: systemd-socket-activate refuses port 0. Another
        // process may take it in between; then try again.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
        if let Some(name) = fdname {
            cmd.arg(format!("--fdname={name}"));
        }
        cmd.arg(common::example_path("http_server"))
            .args(["--listen", &app_listen(port)]);
        let server = ServerProcess::spawn(cmd);
        let listening = wait_until(
            "systemd-socket-activate to listen",
            WAIT,
            || server.stderr().contains("Listening on") || !common::is_alive(server.pid()),
            || server.dump(),
        );
        if listening.is_ok() && server.stderr().contains("Listening on") {
            return (server, port);
        }
        last_error = server.dump();
    }
    panic!("systemd-socket-activate did not start:\n{last_error}");
}

/// The value of `var` in the environment `pid` was started with.
fn initial_env(pid: common::Pid, var: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    raw.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{var}=")).map(str::to_owned))
}

#[test]
fn named_socket_from_systemd_is_served_and_passed_on() {
    let (server, port) = activate(Some("http"), |port| format!("127.0.0.1:{port}"));
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    // The app starts on the first connection, which waits in the queue of a
    // socket the app did not bind.
    let first = thread::spawn(move || load::get(addr, "/", WAIT));
    let gen1 = server.wait_ready(1);
    assert_eq!(gen1.addr, addr);
    let first = first
        .join()
        .expect("thread")
        .expect("queued request served");
    assert_eq!(first.body_str(), format!("pid={} generation=1", gen1.pid));
    server
        .wait_stderr("listener inherited name=\"http\"", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        initial_env(gen1.pid, "LISTEN_PID"),
        Some(gen1.pid.to_string())
    );

    // Upgrade: the activated socket moves on to a generation we start.
    server.signal_pid(gen1.pid, Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    assert_eq!(gen2.addr, addr);
    assert_eq!(
        initial_env(gen2.pid, "LISTEN_PID"),
        Some(gen2.pid.to_string()),
        "LISTEN_PID is the new generation's own pid"
    );
    assert_eq!(
        initial_env(gen2.pid, "LISTEN_FDNAMES").as_deref(),
        Some("http")
    );
    assert_eq!(server.wait_exit(gen1.pid, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    let after = load::get(addr, "/", WAIT).expect("served after the upgrade");
    assert_eq!(after.body_str(), format!("pid={} generation=2", gen2.pid));
}

#[test]
fn unnamed_socket_is_adopted_by_address() {
    // Without --fdname there is no LISTEN_FDNAMES: the socket is "unknown".
    let (server, port) = activate(None, |port| format!("127.0.0.1:{port}"));
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let first = thread::spawn(move || load::get(addr, "/", WAIT));
    let gen1 = server.wait_ready(1);
    assert_eq!(gen1.addr, addr);
    first
        .join()
        .expect("thread")
        .expect("queued request served");
    server
        .wait_stderr("listener inherited", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn named_socket_with_another_address_is_an_error_not_a_rebind() {
    let (server, port) = activate(Some("http"), |port| format!("127.0.0.1:{}", port ^ 1));
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    // Trigger activation; the app refuses the socket and exits.
    let _ = thread::spawn(move || load::get(addr, "/", Duration::from_secs(5)));
    let exit = server
        .wait_exit(server.pid(), EXIT_TIMEOUT)
        .expect("app exits");
    assert_eq!(exit, Exit::Code(1), "{}", server.dump());
    server
        .wait_stderr("needs a full restart", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = server.stderr();
    assert!(
        stderr.contains("listener \"http\" was inherited as a stream socket on")
            && stderr.contains("needs a full restart"),
        "{stderr}"
    );
}
