//! A Unix socket listener survives upgrades at the same path, long-lived
//! sessions are told to end, and the path is removed only on a final stop.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Exit, Pid, ServerProcess, Signal, TempDir, EXIT_TIMEOUT};

const WAIT: Duration = Duration::from_secs(20);

fn wait_generation(server: &ServerProcess, generation: u64) -> Pid {
    let tag = format!(" generation={generation} ");
    let line = server
        .wait_line(|l| l.starts_with("ready pid=") && l.contains(&tag), WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {line:?}"));
    Pid::from_raw(pid)
}

fn session(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(path).expect("connect to the unix socket");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    (stream, reader)
}

fn echo(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, text: &str) -> String {
    writeln!(stream, "{text}").expect("send a line");
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the echo");
    line
}

#[test]
fn unix_listener_survives_upgrades_and_is_removed_on_final_stop() {
    let dir = TempDir::new("unix");
    let path = dir.path().join("echo.sock");
    let mut cmd = Command::new(common::example_path("echo"));
    cmd.arg(&path);
    let server = ServerProcess::spawn(cmd);
    let gen1 = wait_generation(&server, 1);

    let (mut stream, mut reader) = session(&path);
    assert_eq!(
        echo(&mut stream, &mut reader, "hi"),
        format!("{gen1} 1: hi\n")
    );

    server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = wait_generation(&server, 2);
    // The open session on generation 1 is told to end, then closed.
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    assert_eq!(line, "bye\n");
    line.clear();
    assert_eq!(reader.read_line(&mut line).expect("EOF"), 0);
    assert_eq!(server.wait_exit(gen1, EXIT_TIMEOUT), Ok(Exit::Code(0)));

    assert!(path.exists(), "the path stays across the upgrade");
    let (mut stream, mut reader) = session(&path);
    assert_eq!(
        echo(&mut stream, &mut reader, "again"),
        format!("{gen2} 1: again\n")
    );
    drop((stream, reader));

    server.signal_pid(gen2, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(server.wait_exit(gen2, EXIT_TIMEOUT), Ok(Exit::Code(0)));
    assert!(!path.exists(), "a final stop removes the path");
}

#[test]
fn supervised_upgrade_keeps_the_unix_socket_path() {
    // Under `handover run` the supervisor owns the socket: an app generation
    // stopped by an upgrade (SIGTERM, to the app) must not remove the path.
    let dir = TempDir::new("unix-supervised");
    let path = dir.path().join("echo.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.arg("run")
        .arg("--listen")
        .arg(format!("unix://{}", path.display()))
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .arg("--")
        .arg(common::example_path("echo"))
        .arg(&path);
    let server = ServerProcess::spawn(cmd);
    let gen1 = wait_generation(&server, 1);
    server
        .signal(Signal::SIGHUP)
        .expect("SIGHUP to the supervisor");
    let gen2 = wait_generation(&server, 2);
    // The supervisor reaps it; waiting until it is gone is what matters.
    let exit = server.wait_exit(gen1, EXIT_TIMEOUT);
    assert!(
        matches!(exit, Ok(Exit::Code(0) | Exit::ReapedElsewhere)),
        "{exit:?}"
    );
    assert!(path.exists(), "the path outlives the replaced generation");
    let (mut stream, mut reader) = session(&path);
    assert_eq!(
        echo(&mut stream, &mut reader, "still"),
        format!("{gen2} 1: still\n")
    );
}
