//! A server with N listeners and a known start-up cost, for the upgrade-latency benchmark.
//!
//! ```text
//! cargo run --release --example bench_listeners -- --listeners 16 --startup-delay-ms 100
//! # ready pid=<pid> generation=1 addr=127.0.0.1:<port of the first listener>
//! kill -HUP <pid>   # upgrade: the next generation inherits the 16 sockets
//! ```
//!
//! Options: `--listeners N` (1) TCP listeners on 127.0.0.1:0, named `l0`, `l1`, ...;
//! `--startup-delay-ms N` (0): time the app spends "initialising" after taking its listeners
//! and before it says it is ready, standing for the app's own start-up;
//! `--ready-timeout-ms N` (60000); `--drain-timeout-ms N` (30000).
//!
//! It accepts no connection: it only holds its sockets, becomes ready, and on stop (upgrade
//! or SIGTERM) drops them and exits, so that an upgrade measures the handover alone.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use handover::{Handover, Options};

struct Args {
    listeners: usize,
    startup_delay: Duration,
    ready_timeout: Duration,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listeners: 1,
        startup_delay: Duration::ZERO,
        ready_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{flag}: {v:?} is not a number"))?;
        match flag.as_str() {
            "--listeners" => {
                args.listeners = usize::try_from(n).map_err(|_| "--listeners: too many")?;
            }
            "--startup-delay-ms" => args.startup_delay = Duration::from_millis(n),
            "--ready-timeout-ms" => args.ready_timeout = Duration::from_millis(n),
            "--drain-timeout-ms" => args.drain_timeout = Duration::from_millis(n),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if args.listeners == 0 {
        return Err("--listeners must be at least 1".to_string());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench_listeners: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("bench_listeners: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let handover = Handover::new(
        Options::default()
            .ready_timeout(args.ready_timeout)
            .drain_timeout(args.drain_timeout),
    )?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut listeners = Vec::with_capacity(args.listeners);
        for i in 0..args.listeners {
            listeners.push(handover.tcp(&format!("l{i}"), any)?);
        }
        let addr = listeners[0].local_addr()?;
        if !args.startup_delay.is_zero() {
            tokio::time::sleep(args.startup_delay).await;
        }
        handover.ready()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "ready pid={} generation={} addr={addr}",
                std::process::id(),
                handover.generation()
            )?;
            out.flush()?;
        }
        handover.stopping().await;
        drop(listeners);
        handover.drain().await;
        Ok(())
    })
}
