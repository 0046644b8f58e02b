//! HTTP/2 (h2c) clients across upgrades: the old generation's connections
//! end with a graceful GOAWAY, and requests continue on a new connection.
//!
//! A request the client sends on a connection whose GOAWAY it has already
//! received is refused *unprocessed* (RFC 9113 §6.8: safe to retry on a new
//! connection). Browsers and Go's client retry those by themselves; hyper's
//! legacy client reports them as `GoAway(NO_ERROR)`, so this test retries
//! exactly those, once, counts them, and fails on anything else.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Exit, ServerProcess, Signal, EXIT_TIMEOUT};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[test]
fn http2_requests_across_upgrades_under_load() {
    let server = ServerProcess::example("http_server", &["--listen", "127.0.0.1:0"]);
    let gen1 = server.wait_ready(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let goaway_retries = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let bodies = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: hyper::Uri = format!("http://{}/", gen1.addr).parse().expect("uri");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, uri, stop, ok, failures, bodies, retries) = (
            client.clone(),
            uri.clone(),
            stop.clone(),
            ok.clone(),
            failures.clone(),
            bodies.clone(),
            goaway_retries.clone(),
        );
        tasks.push(rt.spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut retrying = false;
            while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                let request = client.get(uri.clone());
                let result = tokio::time::timeout(Duration::from_secs(5), request).await;
                if let Ok(Err(e)) = &result {
                    let text = format!("{e:?}");
                    if !retrying && text.contains("GoAway") && text.contains("NO_ERROR") {
                        retries.fetch_add(1, Ordering::SeqCst);
                        retrying = true;
                        continue;
                    }
                }
                retrying = false;
                match result {
                    Ok(Ok(response)) if response.status() == 200 => {
                        let body = response.into_body().collect().await;
                        match body {
                            Ok(b) => {
                                let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                                bodies.lock().expect("lock").insert(text);
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => failures.lock().expect("lock").push(format!("body: {e}")),
                        }
                    }
                    Ok(Ok(response)) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("status {}", response.status())),
                    Ok(Err(e)) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("request: {e:?}")),
                    Err(_) => failures.lock().expect("lock").push("timeout".into()),
                }
            }
        }));
    }
    let wait_ok = |n: u64| {
        let target = ok.load(Ordering::SeqCst) + n;
        common::wait_until(
            format!("{n} more HTTP/2 responses"),
            Duration::from_secs(20),
            || ok.load(Ordering::SeqCst) >= target,
            || format!("failures: {:?}", failures.lock().expect("lock")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    wait_ok(200);
    let mut previous = gen1.pid;
    for generation in 2..=6 {
        server.signal_pid(previous, Signal::SIGHUP).expect("SIGHUP");
        let ready = server.wait_ready(generation);
        assert_eq!(server.wait_exit(previous, EXIT_TIMEOUT), Ok(Exit::Code(0)));
        wait_ok(200);
        previous = ready.pid;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        rt.block_on(task).expect("client task");
    }
    let failures = failures.lock().expect("lock");
    eprintln!(
        "HTTP/2: {} ok, {} refused unprocessed by GOAWAY and retried, {} failed",
        ok.load(Ordering::SeqCst),
        goaway_retries.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(failures.is_empty(), "HTTP/2 failures: {failures:?}");
    let generations: std::collections::BTreeSet<_> = bodies
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|b| b.split(' ').nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        generations.len(),
        6,
        "every generation served HTTP/2: {generations:?}"
    );
}
