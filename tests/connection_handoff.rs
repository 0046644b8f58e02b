//! Live connections handed to the new generation (`Handover::hand_over` /
//! `Handover::adopt`): the echo example's sessions move at each upgrade with
//! their line counter, on the same TCP connection, which the client never
//! reopens.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{deploy, Deploy, Exit, ServerProcess, Signal, TempDir};

const WAIT: Duration = Duration::from_secs(20);

fn ask(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, line: &str) -> String {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send a line");
    let mut answer = String::new();
    reader.read_line(&mut answer).expect("read the answer");
    answer.trim_end().to_owned()
}

#[test]
fn sessions_keep_their_connection_and_counter_across_ten_upgrades() {
    let server = ServerProcess::example("echo", &["127.0.0.1:0"]);
    let gen1 = server.wait_ready(1);
    let addr = gen1.addr;
    // Three clients, each on one connection for the whole test.
    let mut clients: Vec<(TcpStream, BufReader<TcpStream>)> = (0..3)
        .map(|_| {
            let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            let reader = BufReader::new(stream.try_clone().expect("clone"));
            (stream, reader)
        })
        .collect();
    let local: Vec<_> = clients
        .iter()
        .map(|(s, _)| s.local_addr().expect("local address"))
        .collect();
    let mut serving = gen1;
    let mut n = 0;
    for generation in 2..=11u64 {
        n += 1;
        for (stream, reader) in &mut clients {
            assert_eq!(
                ask(stream, reader, &format!("line {n}")),
                format!("{} {n}: line {n}", serving.pid)
            );
        }
        server
            .signal_pid(serving.pid, Signal::SIGHUP)
            .expect("SIGHUP");
        let next = server.wait_ready(generation);
        // The old generation handed every session over and exits.
        assert_eq!(server.wait_exit(serving.pid, WAIT), Ok(Exit::Code(0)));
        serving = next;
    }
    n += 1;
    for (i, (stream, reader)) in clients.iter_mut().enumerate() {
        assert_eq!(
            ask(stream, reader, "last"),
            format!("{} {n}: last", serving.pid),
            "the session moved to generation 11 with its count"
        );
        // The same connection throughout: the client never reconnected.
        assert_eq!(stream.local_addr().expect("local"), local[i]);
    }
    let adopted = server
        .stderr()
        .matches("connection adopted from the previous generation")
        .count();
    assert_eq!(adopted, 3 * 10, "every session moved at every upgrade");
}

#[test]
fn a_release_that_declines_leaves_the_sessions_with_the_old_generation() {
    let dir = TempDir::new("handoff-declined");
    let exe = dir.path().join("echo");
    let real = dir.path().join("real");
    deploy(&exe, Deploy::Binary(&common::example_path("echo")));
    deploy(&real, Deploy::Binary(&common::example_path("echo")));
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("127.0.0.1:0");
    let server = ServerProcess::spawn(cmd);
    let gen1 = server.wait_ready(1);
    let stream = TcpStream::connect_timeout(&gen1.addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    assert_eq!(
        ask(&mut stream, &mut reader, "one"),
        format!("{} 1: one", gen1.pid)
    );
    // The next release takes no session: the offer is declined, and the old
    // generation, which kept the connection, ends it gracefully.
    deploy(
        &exe,
        Deploy::Script(&format!("exec {} \"$@\" --no-adopt", real.display())),
    );
    server.signal(Signal::SIGHUP).expect("SIGHUP");
    let gen2 = server.wait_ready(2);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    assert_eq!(
        line, "bye\n",
        "the old generation kept the session and closed it"
    );
    assert_eq!(server.wait_exit(gen1.pid, WAIT), Ok(Exit::Code(0)));
    // A new connection reaches the new generation.
    let stream = TcpStream::connect_timeout(&gen1.addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    assert_eq!(
        ask(&mut stream, &mut reader, "two"),
        format!("{} 1: two", gen2.pid)
    );
}
