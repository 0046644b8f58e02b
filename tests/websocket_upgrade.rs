//! 50 WebSocket clients of `axum_server` (`GET /ws`, an echo) across an upgrade.
//!
//! - With `--websocket-going-away`: each gets a close frame 1001 "going away" from the old
//!   generation when it stops, reconnects, and lands on the new one; the old generation then
//!   drains at once (nothing left to cut) and exits 0.
//! - Without it: each stays on the old generation, which keeps echoing after the new one is
//!   ready, until the drain timeout cuts it; the cut is counted by the clients and in the old
//!   generation's drain report; the clients then reconnect to the new one.
//!
//! Each client sends a message, waits for its echo, then idles a little while still reading,
//! so that a close frame is seen as soon as it comes. Every way a connection ends is counted:
//! a close frame (with its code), a close frame that crossed a message in flight, a cut (no
//! close frame), and errors (a reset, a wrong echo, a timeout, a failed reconnect).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const CLIENTS: usize = 50;
/// Idle time between two messages of a client.
const PACE: Duration = Duration::from_millis(20);
/// Budget of one echo, and of one connect.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// What one client saw.
#[derive(Debug, Default, Clone)]
struct ClientLog {
    /// The generation (`x-generation`) of each connection, in order.
    generations: Vec<u64>,
    /// Echoes received, per connection.
    echoed: Vec<u64>,
    /// Close codes received from the server.
    close_codes: Vec<u16>,
    /// Close frames that came while a message was in flight (it is resent on the next
    /// connection, so no message is lost).
    closed_in_flight: u32,
    /// Connections that ended without a close frame (EOF or reset), and when.
    cuts: Vec<Instant>,
    /// Of those, the ones with a message in flight.
    cut_in_flight: u32,
    /// Anything else: a wrong echo, a timeout, a failed connect, a protocol error.
    errors: Vec<String>,
}

impl ClientLog {
    fn echoed_on(&self, generation: u64) -> u64 {
        self.generations
            .iter()
            .zip(&self.echoed)
            .filter(|(g, _)| **g == generation)
            .map(|(_, n)| n)
            .sum()
    }
}

type Logs = Arc<Vec<Mutex<ClientLog>>>;

/// A connection that ended with an error instead of a close frame (a reset, or EOF without
/// a close frame): a cut. Only the drain timeout may cut; the tests check when it happened.
fn cut(e: &WsError, in_flight: bool) -> Ended {
    print_cut_when_echoing(e);
    Ended::Cut(in_flight)
}

fn print_cut_when_echoing(e: &WsError) {
    if std::env::var_os(common::proc::ECHO_ENV).is_some() {
        eprintln!("WebSocket client: connection cut: {e}");
    }
}

enum Ended {
    /// A close frame with this code; whether a message was in flight.
    Closed(u16, bool),
    /// No close frame; whether a message was in flight.
    Cut(bool),
    /// The test is over.
    Stopped,
}

async fn client(id: usize, url: String, logs: Logs, stop: Arc<AtomicBool>) {
    let log = |f: &mut dyn FnMut(&mut ClientLog)| f(&mut logs[id].lock().expect("lock"));
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let connected =
            tokio::time::timeout(ECHO_TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
                .await;
        let (mut ws, response) = match connected {
            Ok(Ok(c)) => c,
            other => {
                let e = format!("connect: {other:?}");
                log(&mut |l| l.errors.push(e.clone()));
                return;
            }
        };
        let generation = response
            .headers()
            .get("x-generation")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        log(&mut |l| {
            l.generations.push(generation);
            l.echoed.push(0);
        });
        let ended = loop {
            if stop.load(Ordering::SeqCst) {
                let _ = ws.close(None).await;
                break Ended::Stopped;
            }
            let text = format!("client {id} message {seq}");
            if let Err(e) = ws.send(Message::text(text.clone())).await {
                break cut(&e, true);
            }
            // The echo.
            match tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => {
                    seq += 1;
                    log(&mut |l| *l.echoed.last_mut().expect("a connection") += 1);
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    break Ended::Closed(frame.map_or(0, |f| u16::from(f.code)), true)
                }
                Ok(Some(Ok(other))) => {
                    let e = format!("expected the echo of {text:?}, got {other:?}");
                    log(&mut |l| l.errors.push(e.clone()));
                    return;
                }
                Ok(Some(Err(e))) => break cut(&e, true),
                Ok(None) => break Ended::Cut(true),
                Err(_) => {
                    log(&mut |l| l.errors.push(format!("no echo of {text:?} in time")));
                    return;
                }
            }
            // Idle, but reading: a close frame is seen when it comes.
            tokio::select! {
                () = tokio::time::sleep(PACE) => {}
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(frame))) => {
                        break Ended::Closed(frame.map_or(0, |f| u16::from(f.code)), false)
                    }
                    Some(Ok(other)) => {
                        let e = format!("unexpected message while idle: {other:?}");
                        log(&mut |l| l.errors.push(e.clone()));
                        return;
                    }
                    Some(Err(e)) => break cut(&e, false),
                    None => break Ended::Cut(false),
                }
            }
        };
        match ended {
            Ended::Stopped => return,
            Ended::Closed(code, in_flight) => {
                // Complete the closing handshake: tungstenite sends our close frame and
                // reports the end of the stream.
                while let Ok(Some(Ok(_))) = tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {}
                log(&mut |l| {
                    l.close_codes.push(code);
                    l.closed_in_flight += u32::from(in_flight);
                });
            }
            Ended::Cut(in_flight) => log(&mut |l| {
                l.cuts.push(Instant::now());
                l.cut_in_flight += u32::from(in_flight);
            }),
        }
    }
}

struct Run {
    server: ServerProcess,
    logs: Logs,
    stop: Arc<AtomicBool>,
    rt: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let server = ServerProcess::example("axum_server", &all);
        let ready = server.wait_ready(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let logs: Logs = Arc::new((0..CLIENTS).map(|_| Mutex::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("ws://{}/ws", ready.addr);
        let tasks = (0..CLIENTS)
            .map(|id| rt.spawn(client(id, url.clone(), logs.clone(), stop.clone())))
            .collect();
        Run {
            server,
            logs,
            stop,
            rt,
            tasks,
        }
    }

    fn snapshot(&self) -> Vec<ClientLog> {
        self.logs
            .iter()
            .map(|l| l.lock().expect("lock").clone())
            .collect()
    }

    /// Waits until `pred` holds for every client (and no client has an error).
    fn wait_all(&self, what: &str, timeout: Duration, pred: impl Fn(&ClientLog) -> bool) {
        common::wait_until(
            what.to_string(),
            timeout,
            || {
                let logs = self.snapshot();
                logs.iter().any(|l| !l.errors.is_empty()) || logs.iter().all(&pred)
            },
            || format!("{:#?}", self.snapshot()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.server.dump()));
        let errors: Vec<_> = self
            .snapshot()
            .into_iter()
            .enumerate()
            .filter(|(_, l)| !l.errors.is_empty())
            .map(|(i, l)| (i, l.errors))
            .collect();
        assert!(
            errors.is_empty(),
            "client errors while waiting for {what}: {errors:?}"
        );
    }

    fn finish(self) -> Vec<ClientLog> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            self.rt.block_on(task).expect("client task");
        }
        self.logs
            .iter()
            .map(|l| l.lock().expect("lock").clone())
            .collect()
    }
}

fn upgrade(run: &Run) -> (common::Ready, common::Ready, Instant) {
    let first = run.server.readies()[0].clone();
    run.server
        .signal_pid(first.pid, Signal::SIGHUP)
        .expect("SIGHUP");
    let second = run.server.wait_ready(2);
    (first, second, Instant::now())
}

#[test]
fn websocket_clients_under_load_get_going_away_and_reconnect_across_an_upgrade() {
    let run = Run::start(&["--websocket-going-away", "--drain-timeout-ms", "20000"]);
    run.wait_all(
        "every client echoing on generation 1",
        Duration::from_secs(20),
        |l| l.echoed_on(1) >= 3,
    );
    let (first, _second, upgraded_at) = upgrade(&run);
    run.wait_all(
        "every client closed with 1001 and echoing on generation 2",
        Duration::from_secs(20),
        |l| l.echoed_on(2) >= 3,
    );
    // Nothing was left to cut: the old generation drained at once and exited 0.
    assert_eq!(
        run.server.wait_exit(first.pid, EXIT_TIMEOUT),
        Ok(Exit::Code(0))
    );
    let drained_in = upgraded_at.elapsed();
    assert!(
        drained_in < Duration::from_secs(10),
        "the old generation exited {drained_in:?} after the upgrade, not at the drain timeout"
    );
    let stderr = run.server.stderr();
    assert!(
        stderr.contains("drain complete generation=1 in_flight=0"),
        "generation 1 drained with nothing cut:\n{}",
        run.server.dump()
    );
    let logs = run.finish();
    let closed_in_flight: u32 = logs.iter().map(|l| l.closed_in_flight).sum();
    let codes: Vec<u16> = logs.iter().flat_map(|l| l.close_codes.clone()).collect();
    let cuts: usize = logs.iter().map(|l| l.cuts.len()).sum();
    eprintln!(
        "WebSocket, going away on: {CLIENTS} clients, {} close frames ({} with code 1001), \
         {closed_in_flight} of them crossing a message in flight (resent on the new \
         connection), {cuts} cut; echoes on generation 1: {}, on generation 2: {}",
        codes.len(),
        codes.iter().filter(|c| **c == 1001).count(),
        logs.iter().map(|l| l.echoed_on(1)).sum::<u64>(),
        logs.iter().map(|l| l.echoed_on(2)).sum::<u64>(),
    );
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(
            l.generations,
            [1, 2],
            "client {i}: one reconnect, to generation 2: {l:?}"
        );
        assert_eq!(
            l.close_codes,
            [1001],
            "client {i}: closed once with 1001: {l:?}"
        );
        assert!(l.cuts.is_empty(), "client {i}: never cut or reset: {l:?}");
        assert!(l.errors.is_empty(), "client {i}: {l:?}");
    }
}

#[test]
fn websocket_clients_under_load_stay_until_the_drain_timeout_cuts_them() {
    const DRAIN: Duration = Duration::from_millis(1500);
    let run = Run::start(&["--drain-timeout-ms", "1500"]);
    run.wait_all(
        "every client echoing on generation 1",
        Duration::from_secs(20),
        |l| l.echoed_on(1) >= 3,
    );
    let (first, _second, upgraded_at) = upgrade(&run);
    // The old generation keeps serving its WebSockets after the new one is ready.
    let before: Vec<u64> = run.snapshot().iter().map(|l| l.echoed_on(1)).collect();
    run.wait_all(
        "every client still echoing on generation 1 after the upgrade",
        DRAIN,
        |l| {
            l.generations.len() == 1
                && l.echoed_on(1) >= before.iter().max().copied().unwrap_or(0) + 3
        },
    );
    // Then the drain timeout cuts them, and they reconnect to generation 2.
    run.wait_all(
        "every client cut and echoing on generation 2",
        DRAIN + Duration::from_secs(20),
        |l| l.echoed_on(2) >= 3,
    );
    assert_eq!(
        run.server.wait_exit(first.pid, EXIT_TIMEOUT),
        Ok(Exit::Code(0))
    );
    let stderr = run.server.stderr();
    let cut_line = format!(
        "drain timeout reached; cutting the remaining work generation=1 in_flight={CLIENTS}"
    );
    assert!(
        stderr.contains(&cut_line),
        "generation 1's drain report counts the {CLIENTS} cut WebSockets:\n{}",
        run.server.dump()
    );
    assert!(
        stderr.contains(&format!(
            "serve: {CLIENTS} connection(s) still open at the drain timeout"
        )),
        "serve logs the cut:\n{}",
        run.server.dump()
    );
    let logs = run.finish();
    let cut_in_flight: u32 = logs.iter().map(|l| l.cut_in_flight).sum();
    eprintln!(
        "WebSocket, going away off: {CLIENTS} clients stayed on generation 1 until the drain \
         timeout ({DRAIN:?}) cut them: {} cuts ({cut_in_flight} with a message in flight), \
         {} close frames; echoes on generation 1: {}, on generation 2: {}",
        logs.iter().map(|l| l.cuts.len()).sum::<usize>(),
        logs.iter().map(|l| l.close_codes.len()).sum::<usize>(),
        logs.iter().map(|l| l.echoed_on(1)).sum::<u64>(),
        logs.iter().map(|l| l.echoed_on(2)).sum::<u64>(),
    );
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(
            l.generations,
            [1, 2],
            "client {i}: one reconnect, to generation 2: {l:?}"
        );
        assert!(
            l.close_codes.is_empty(),
            "client {i}: no close frame without the policy: {l:?}"
        );
        assert_eq!(l.cuts.len(), 1, "client {i}: cut once: {l:?}");
        let at = l.cuts[0].duration_since(upgraded_at);
        assert!(
            at + Duration::from_millis(100) >= DRAIN,
            "client {i}: cut {at:?} after the upgrade, before the drain timeout {DRAIN:?}"
        );
        assert!(l.errors.is_empty(), "client {i}: {l:?}");
    }
}
