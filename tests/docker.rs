//! `handover run` as the ENTRYPOINT of a real Docker container (image built by
//! `docker/Dockerfile`, `FROM scratch`), its ports published on 127.0.0.1:
//!
//! - 20 upgrades by `docker kill --signal HUP` under keep-alive and connection-per-request
//!   load, 0 failed requests; `/metrics` (parsed by `prometheus_client`) counts them; the
//!   supervisor's JSON log lines parse;
//! - `docker exec <c> handover upgrade` exits 0 for a good release and 1 for a broken one, the
//!   release swapped through a bind-mounted volume;
//! - `docker stop` under load with a shutdown delay: every request sent before the stop
//!   completes, and the container exits 0;
//! - `/readyz` is 503 right after `docker kill --signal TERM`, through the shutdown delay;
//! - `docker wait` is the app's status; orphans are reaped (no zombie in `docker top`, with a
//!   negative control); a `HEALTHCHECK` on `handover status --check` goes healthy, and
//!   unhealthy when the app crash-loops.
//!
//! Skipped without a Docker daemon, except under CI where that fails.

mod admin_kit;
mod common;
mod docker_kit;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use admin_kit::{http_get, parse_metrics, status_of};
use common::load::{Load, LoadConfig, Mode};
use common::{deploy, wait_for, Deploy};
use docker_kit::{available, Container};
use support::TempDir;

const T: Duration = Duration::from_secs(30);
const UPGRADES: u64 = 20;

/// `handover run` options and the app, as the container's arguments.
fn args<'a>(options: &[&'a str], app: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--listen", "tcp://0.0.0.0:8080", "--admin", "0.0.0.0:9090"];
    all.extend_from_slice(options);
    all.push("--");
    all.extend_from_slice(app);
    all
}

const APP: [&str; 3] = ["/app/http_server", "--listen", "0.0.0.0:8080"];

/// Waits until `/readyz` answers 200 through the published admin port.
fn wait_ready(c: &Container) {
    let admin = c.addr(9090);
    wait_for("/readyz 200 through Docker", T, || {
        match http_get(admin, "/readyz", Duration::from_secs(2)) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.dump()));
}

#[test]
fn docker_20_sighup_upgrades_under_load_lose_nothing_and_metrics_count_them() {
    if !available() {
        return;
    }
    let c = Container::run(
        &["-e", "HANDOVER_LOG_FORMAT=json"],
        &args(&["--drain-timeout", "10s"], &APP),
    );
    wait_ready(&c);
    let (app, admin) = (c.addr(8080), c.addr(9090));
    let keep_alive = Load::start(
        LoadConfig::new(app, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(180)),
    );
    let per_request = Load::start(
        LoadConfig::new(app, Mode::PerRequest { concurrency: 2 })
            .max_duration(Duration::from_secs(180)),
    );
    keep_alive
        .wait_for_ok(50, T)
        .expect("keep-alive load flowing");
    per_request
        .wait_for_ok(20, T)
        .expect("per-request load flowing");
    let started = Instant::now();
    for generation in 2..=UPGRADES + 1 {
        c.kill("HUP");
        let suffix = format!(" generation={generation}");
        for load in [&keep_alive, &per_request] {
            load.wait_for_body(|b| b.ends_with(&suffix), T)
                .unwrap_or_else(|e| {
                    panic!("traffic did not move to {generation}: {e}\n{}", c.dump())
                });
        }
        keep_alive.wait_for_more_ok(30, T).expect("load flowing");
    }
    let took = started.elapsed();
    let (keep_alive, per_request) = (keep_alive.stop(), per_request.stop());
    eprintln!("{UPGRADES} upgrades by docker kill --signal HUP in {took:?}");
    eprintln!("keep-alive: {keep_alive}\nper-request: {per_request}");
    keep_alive.assert_no_failures();
    per_request.assert_no_failures();

    // /metrics through the published admin port, judged by prometheus_client.
    let m = wait_for("every old generation drained", T, || {
        let (_, body) = http_get(admin, "/metrics", T)?;
        let m = parse_metrics(&body);
        (m.get("handover_draining_generations") == 0.0)
            .then_some(m)
            .ok_or("draining".to_owned())
    })
    .unwrap();
    assert_eq!(
        m.get("handover_upgrades_total{outcome=\"succeeded\"}"),
        UPGRADES as f64
    );
    assert_eq!(m.get("handover_upgrades_total{outcome=\"failed\"}"), 0.0);
    assert_eq!(m.get("handover_generation"), (UPGRADES + 1) as f64);
    assert_eq!(
        m.get("handover_time_to_ready_seconds_count"),
        (UPGRADES + 1) as f64
    );
    assert_eq!(
        m.get("handover_drain_duration_seconds_count"),
        UPGRADES as f64
    );
    assert_eq!(m.get("handover_drains_killed_total"), 0.0);

    // The supervisor's log lines are JSON objects (the app's own lines are text).
    let logs = c.logs();
    let json: Vec<&str> = logs.lines().filter(|l| l.starts_with('{')).collect();
    assert!(
        !logs.contains(" INFO handover: "),
        "a text line from the supervisor:\n{logs}"
    );
    let succeeded = json
        .iter()
        .filter(|l| l.contains("\"message\":\"upgrade succeeded\""))
        .count();
    assert_eq!(succeeded as u64, UPGRADES, "{logs}");
    let checked = python_json_check(&json.join("\n"));
    assert_eq!(checked, json.len(), "every JSON line parses");
}

/// Parses each line with Python's `json`; returns how many parsed to an object with the
/// text format's keys.
fn python_json_check(lines: &str) -> usize {
    let script = "import json, sys\n\
        n = 0\n\
        for line in sys.stdin:\n\
        \x20   o = json.loads(line)\n\
        \x20   assert {'timestamp', 'level', 'target', 'message'} <= o.keys(), o\n\
        \x20   n += 1\n\
        print(n)\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn docker_exec_handover_upgrade_exits_0_for_a_good_release_and_1_for_a_broken_one() {
    if !available() {
        return;
    }
    let dir = TempDir::new("docker-releases");
    let release = dir.join("app");
    let good = "exec /app/http_server --listen 0.0.0.0:8080";
    deploy(&release, Deploy::Script(good));
    let volume = format!("{}:/releases:ro", dir.path().display());
    let c = Container::run(
        &["-v", &volume],
        &args(&["--drain-timeout", "10s"], &["/releases/app"]),
    );
    wait_ready(&c);
    let load = Load::start(
        LoadConfig::new(c.addr(8080), Mode::KeepAlive { connections: 2 })
            .max_duration(Duration::from_secs(120)),
    );
    load.wait_for_ok(20, T).expect("load flowing");

    let out = c.exec(&["handover", "upgrade", "--timeout", "30s"]);
    assert_eq!(out.code, Some(0), "good release: {out:?}\n{}", c.dump());
    assert!(out.stdout.contains("ok: generation 2"), "{out:?}");
    load.wait_for_body(|b| b.ends_with(" generation=2"), T)
        .unwrap();

    deploy(
        &release,
        Deploy::Script("echo 'release 3 is broken' >&2\nexit 3"),
    );
    let out = c.exec(&["handover", "upgrade", "--timeout", "30s"]);
    assert_eq!(out.code, Some(1), "broken release: {out:?}\n{}", c.dump());
    assert!(
        out.stdout.contains("failed: generation 3") && out.stdout.contains("exited with status 3"),
        "{out:?}"
    );
    assert!(out.stdout.contains("generation 2 (pid"), "{out:?}");
    load.wait_for_more_ok(20, T)
        .expect("generation 2 still serving");
    assert!(
        load.snapshot()
            .ok_matching(|b| b.ends_with(" generation=3"))
            == 0
    );

    deploy(&release, Deploy::Script(good));
    let out = c.exec(&["handover", "upgrade", "--timeout", "30s"]);
    assert_eq!(out.code, Some(0), "good again: {out:?}\n{}", c.dump());
    load.wait_for_body(|b| b.ends_with(" generation=4"), T)
        .unwrap();
    let status = c.exec(&["handover", "status"]);
    assert!(
        status.stdout.contains("upgrades: 2 succeeded, 1 failed"),
        "{status:?}"
    );
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_failures();
}

/// Sends `GET /slow?ms=N` on a new connection now, and reads the answer on a thread.
fn slow_request(
    addr: std::net::SocketAddr,
    ms: u64,
) -> std::thread::JoinHandle<Result<u16, String>> {
    let mut s = TcpStream::connect(addr).expect("connect for a slow request");
    s.write_all(
        format!("GET /slow?ms={ms} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send a slow request");
    std::thread::spawn(move || {
        s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
        raw.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(format!("no status in {raw:?}"))
    })
}

#[test]
fn docker_stop_under_load_with_a_shutdown_delay_completes_every_request_sent_before() {
    if !available() {
        return;
    }
    let c = Container::run(
        &[],
        &args(&["--shutdown-delay", "2s", "--drain-timeout", "10s"], &APP),
    );
    wait_ready(&c);
    let (app, admin) = (c.addr(8080), c.addr(9090));
    let keep_alive = Load::start(
        LoadConfig::new(app, Mode::KeepAlive { connections: 4 })
            .max_duration(Duration::from_secs(60)),
    );
    let per_request = Load::start(
        LoadConfig::new(app, Mode::PerRequest { concurrency: 2 })
            .max_duration(Duration::from_secs(60)),
    );
    keep_alive.wait_for_ok(50, T).expect("load flowing");
    per_request.wait_for_ok(20, T).expect("load flowing");
    // In flight when the stop comes: sent, answered only after the shutdown delay began.
    let slow: Vec<_> = (0..3).map(|_| slow_request(app, 1500)).collect();
    let name = c.name.clone();
    let started = Instant::now();
    let stop = std::thread::spawn(move || docker_kit::docker(&["stop", "-t", "30", &name]));
    // A load balancer stops sending once /readyz says 503; so does this load.
    wait_for("/readyz 503 after docker stop", T, || {
        match status_of(admin, "/readyz") {
            503 => Ok(()),
            other => Err(format!("{other}")),
        }
    })
    .unwrap();
    let flipped = started.elapsed();
    // A load balancer that is slow to notice keeps sending during the shutdown delay: those
    // requests are served too.
    keep_alive
        .wait_for_more_ok(300, T)
        .expect("served during the delay");
    per_request
        .wait_for_more_ok(50, T)
        .expect("served during the delay");
    assert!(
        !stop.is_finished(),
        "the container stopped before the delay ended"
    );
    let (keep_alive, per_request) = (keep_alive.stop(), per_request.stop());
    for s in slow {
        assert_eq!(
            s.join().unwrap(),
            Ok(200),
            "a slow request sent before the stop"
        );
    }
    let stop = stop.join().unwrap();
    assert_eq!(stop.code, Some(0), "{stop:?}");
    let stopped = started.elapsed();
    eprintln!(
        "docker stop: /readyz 503 after {flipped:?} (docker CLI included), container gone \
         after {stopped:?}\nkeep-alive: {keep_alive}\nper-request: {per_request}"
    );
    keep_alive.assert_no_failures();
    per_request.assert_no_failures();
    assert!(
        stopped >= Duration::from_secs(2),
        "the shutdown delay was skipped"
    );
    assert_eq!(c.wait(), 0, "exit code of a drained app\n{}", c.dump());
}

#[test]
fn docker_readyz_is_503_right_after_sigterm_and_through_the_shutdown_delay() {
    if !available() {
        return;
    }
    let c = Container::run(&[], &args(&["--shutdown-delay", "3s"], &APP));
    wait_ready(&c);
    let (app, admin) = (c.addr(8080), c.addr(9090));
    // The flip is timed on the container's bridge address: through the published port, the
    // userland proxy's own latency (over 10 ms on a busy machine) would be measured too.
    let direct = c.bridge_addr(9090);
    assert_eq!(c.exec(&["handover", "status", "--check"]).code, Some(0));
    assert_eq!(status_of(admin, "/readyz"), 200);
    assert_eq!(status_of(direct, "/readyz"), 200);
    let sent = Instant::now();
    c.kill("TERM");
    // `docker kill` returns once the signal is delivered: the next answer must be 503.
    let kill_returned = sent.elapsed();
    let t0 = Instant::now();
    let first = status_of(direct, "/readyz");
    let first_after = t0.elapsed();
    let proxied = status_of(admin, "/readyz");
    eprintln!(
        "docker kill --signal TERM returned after {kill_returned:?}; the next /readyz \
         answered {first} {first_after:?} later (through the published port: {proxied})"
    );
    assert_eq!(proxied, 503, "/readyz through the published port");
    assert_eq!(first, 503, "/readyz right after SIGTERM");
    assert!(first_after <= Duration::from_millis(10), "{first_after:?}");
    let check = c.exec(&["handover", "status", "--check"]);
    assert_eq!(
        check.code,
        Some(1),
        "status --check during the delay: {check:?}"
    );
    // 503 on every poll until the listener goes with the container; meanwhile the app
    // serves; the delay lasts.
    let mut polls = 0;
    let mut served = 0;
    while let Ok((status, _)) = http_get(admin, "/readyz", Duration::from_secs(2)) {
        assert_eq!(status, 503, "after {:?}", sent.elapsed());
        polls += 1;
        if served < 10 && sent.elapsed() < Duration::from_secs(2) {
            let (status, _) = http_get(app, "/", Duration::from_secs(2)).expect("the app");
            assert_eq!(status, 200);
            served += 1;
        }
        assert!(sent.elapsed() < T, "the container did not stop");
    }
    let gone = sent.elapsed();
    eprintln!("/readyz 503 on {polls} polls; admin listener gone after {gone:?}");
    assert!(gone >= Duration::from_secs(3), "{gone:?}");
    assert!(served > 0);
    assert_eq!(c.wait(), 0, "{}", c.dump());
}

#[test]
fn docker_wait_is_the_apps_exit_status() {
    if !available() {
        return;
    }
    for (app, code) in [("exit 7", 7), ("kill -KILL $$", 137), ("exit 0", 0)] {
        let c = Container::run(&[], &args(&["--restart", "never"], &["/bin/sh", "-c", app]));
        assert_eq!(c.wait(), code, "{app}\n{}", c.dump());
    }
}

/// Waits until the orphan (its pid in the container's /tmp/orphan) is gone (reaped) or a
/// zombie, as the container's /proc shows it.
fn orphan_fate(c: &Container) -> Result<&'static str, String> {
    wait_for("the orphan to be reaped or to become a zombie", T, || {
        let out = c.exec(&[
            "sh",
            "-c",
            "p=$(cat /tmp/orphan) && { cat /proc/$p/stat 2>/dev/null || echo gone; }",
        ]);
        let text = out.stdout.trim();
        if text == "gone" {
            return Ok("reaped");
        }
        // `pid (comm) S ...`
        match text.rsplit_once(") ").map(|(_, rest)| rest.chars().next()) {
            Some(Some('Z')) => Ok("zombie"),
            _ => Err(format!("{out:?}")),
        }
    })
}

/// Zombies as `docker top` shows them. Under cgroup v1 a process leaves its cgroup when it
/// exits, so `docker top` (which lists the cgroup) cannot show a zombie at all; the container's
/// own `ps` can.
fn zombies_in_top(c: &Container) -> Vec<(String, String, String)> {
    c.top()
        .into_iter()
        .filter(|(_, stat, _)| stat.starts_with('Z'))
        .collect()
}

/// Zombies as the container's `ps` (busybox) shows them: `pid stat comm` lines.
fn zombies_in_ps(c: &Container) -> Vec<String> {
    let out = c.exec(&["ps", "-o", "pid,stat,comm"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('Z'))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn docker_orphans_are_reaped_with_a_negative_control() {
    if !available() {
        return;
    }
    // The app leaves an orphan: a background job whose parent shell exited, reparented to
    // PID 1 (busybox runs `sleep` inside the forked shell: the orphan is found by its pid).
    let app = "sh -c 'sleep 0.5 & echo $! >/tmp/orphan; exit 0'; \
               exec /app/http_server --listen 0.0.0.0:8080";
    let c = Container::run(&[], &args(&[], &["/bin/sh", "-c", app]));
    wait_ready(&c);
    assert_eq!(orphan_fate(&c), Ok("reaped"), "{:?}", c.top());
    assert_eq!(zombies_in_top(&c), vec![], "zombies in docker top");
    assert_eq!(
        zombies_in_ps(&c),
        Vec::<String>::new(),
        "zombies in the container"
    );
    // The same under a supervisor that does not reap orphans: the test sees the zombie in
    // the container's /proc and `ps`.
    let bad = Container::run(&[], &args(&["--debug-no-reap"], &["/bin/sh", "-c", app]));
    wait_ready(&bad);
    assert_eq!(orphan_fate(&bad), Ok("zombie"), "{:?}", bad.top());
    assert_eq!(zombies_in_ps(&bad).len(), 1, "{:?}", zombies_in_ps(&bad));
}

#[test]
fn docker_healthcheck_goes_healthy_then_unhealthy_when_the_app_crash_loops() {
    if !available() {
        return;
    }
    let dir = TempDir::new("docker-health");
    let volume = format!("{}:/releases", dir.path().display());
    // With /releases/crash present every start crashes (after 300 ms, still a quick crash).
    let app = "if [ -e /releases/crash ]; then sleep 0.3; exit 3; fi; \
               exec /app/http_server --listen 0.0.0.0:8080";
    // The image's HEALTHCHECK (`handover status --check`), checked more often.
    let c = Container::run(
        &[
            "-v",
            &volume,
            "--health-interval",
            "300ms",
            "--health-retries",
            "2",
            "--health-start-period",
            "0s",
        ],
        &args(&[], &["/bin/sh", "-c", app]),
    );
    let health = c.inspect("{{json .Config.Healthcheck.Test}}");
    assert!(
        health.contains("status") && health.contains("--check"),
        "{health}"
    );
    wait_for("healthy", T, || match c.health().as_str() {
        "healthy" => Ok(()),
        other => Err(other.to_owned()),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.dump()));
    std::fs::write(dir.join("crash"), "").unwrap();
    let status = c.exec(&["handover", "status", "--json"]);
    let pid = status
        .stdout
        .split_once("\"current\":{\"generation\":1,\"pid\":")
        .and_then(|(_, rest)| rest.split(',').next())
        .unwrap_or_else(|| panic!("no current pid in {status:?}"))
        .to_owned();
    assert_eq!(c.exec(&["kill", "-KILL", &pid]).code, Some(0));
    wait_for("unhealthy while the app crash-loops", T, || {
        match c.health().as_str() {
            "unhealthy" => Ok(()),
            other => Err(other.to_owned()),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.dump()));
    let log = c.inspect("{{json .State.Health.Log}}");
    assert!(log.contains("unhealthy: "), "{log}");
    // The supervisor gives up on the crash loop: the container ends with the app's status.
    assert_eq!(c.wait(), 3, "{}", c.dump());
}

/// Leaves the swarm on drop, if this test made the node join one, and removes the
/// `docker_gwbridge` network that `swarm init` creates (and `leave` keeps) if it made it.
struct SwarmGuard {
    joined_here: bool,
    made_gwbridge: bool,
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        if self.joined_here {
            let _ = docker_kit::docker(&["swarm", "leave", "--force"]);
        }
        if self.made_gwbridge {
            let _ = docker_kit::docker(&["network", "rm", "docker_gwbridge"]);
        }
    }
}

/// A Swarm service, removed on drop.
struct ServiceGuard(String);

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        let _ = docker_kit::docker(&["service", "rm", &self.0]);
        // Its containers go asynchronously; wait for them so that the images can go too.
        let label = format!("label=com.docker.swarm.service.name={}", self.0);
        let _ = wait_for("the service's containers to be removed", T, || {
            let out = docker_kit::docker(&["ps", "-aq", "--filter", &label]);
            if out.stdout.trim().is_empty() {
                Ok(())
            } else {
                Err(out.stdout)
            }
        });
    }
}

/// `(image, health)` of each running container of `service`.
fn service_containers(service: &str) -> Vec<(String, String)> {
    let label = format!("label=com.docker.swarm.service.name={service}");
    docker_kit::docker_ok(&[
        "ps",
        "--filter",
        &label,
        "--format",
        "{{.Image}} {{.Status}}",
    ])
    .lines()
    .map(|l| {
        let (image, status) = l.split_once(' ').unwrap_or((l, ""));
        let health = if status.contains("(healthy)") {
            "healthy"
        } else if status.contains("(unhealthy)") {
            "unhealthy"
        } else {
            "starting"
        };
        (image.to_owned(), health.to_owned())
    })
    .collect()
}

fn wait_service(service: &str, image: &str) {
    wait_for(
        format!("2 healthy tasks of {service} on {image}"),
        Duration::from_secs(90),
        || {
            let all = service_containers(service);
            if all.len() == 2 && all.iter().all(|(i, h)| i == image && h == "healthy") {
                Ok(())
            } else {
                Err(format!("{all:?}"))
            }
        },
    )
    .unwrap();
}

#[test]
fn docker_swarm_start_first_update_and_rollback_of_a_broken_image() {
    if !available() {
        return;
    }
    let state = docker_kit::docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    let mut swarm = SwarmGuard {
        joined_here: false,
        made_gwbridge: false,
    };
    if state == "inactive" {
        swarm.made_gwbridge =
            docker_kit::docker(&["network", "inspect", "docker_gwbridge"]).code != Some(0);
        let out = docker_kit::docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert_eq!(out.code, Some(0), "docker swarm init: {out:?}");
        swarm.joined_here = true;
    }
    let v1 = docker_kit::image().to_owned();
    let v2 = docker_kit::ImageGuard(docker_kit::derived_image("v2", "LABEL release=2", &[]));
    let broken = docker_kit::ImageGuard(docker_kit::derived_image(
        "broken",
        "COPY app /app/http_server",
        &[(
            "app",
            "#!/bin/sh\necho 'this release is broken' >&2\nexit 3\n",
        )],
    ));
    // Swarm publishes on every address of the node (no host IP in --publish); the port is
    // a free one, for the length of this test.
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = docker_kit::unique_name("svc");
    let publish = format!("published={port},target=8080");
    let mut create = vec![
        "service",
        "create",
        "--detach",
        "--name",
        &name,
        "--replicas",
        "2",
        "--publish",
        &publish,
        // The image's HEALTHCHECK (handover status --check), checked more often.
        "--health-interval",
        "500ms",
        "--health-retries",
        "2",
        "--update-order",
        "start-first",
        "--update-failure-action",
        "rollback",
        "--update-monitor",
        "3s",
        "--rollback-order",
        "start-first",
        "--stop-grace-period",
        "20s",
        &v1,
    ];
    let service_args = args(&["--shutdown-delay", "2s", "--drain-timeout", "10s"], &APP);
    create.extend_from_slice(&service_args);
    docker_kit::docker_ok(&create);
    let _service = ServiceGuard(name.clone());
    wait_service(&name, &v1);

    // The routing mesh: is the published port served?
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mesh = http_get(addr, "/", Duration::from_secs(2));
    eprintln!("published port {port} through the routing mesh: {mesh:?}");
    let load = mesh.is_ok().then(|| {
        (
            Load::start(
                LoadConfig::new(addr, Mode::KeepAlive { connections: 4 })
                    .max_duration(Duration::from_secs(180)),
            ),
            Load::start(
                LoadConfig::new(addr, Mode::PerRequest { concurrency: 2 })
                    .max_duration(Duration::from_secs(180)),
            ),
        )
    });

    let started = Instant::now();
    let out = docker_kit::docker(&[
        "service",
        "update",
        "--detach=false",
        "--image",
        &v2.0,
        &name,
    ]);
    assert_eq!(out.code, Some(0), "update to v2: {out:?}");
    wait_service(&name, &v2.0);
    let updated = started.elapsed();
    let state =
        docker_kit::docker_ok(&["service", "inspect", "-f", "{{.UpdateStatus.State}}", &name]);
    assert_eq!(state, "completed");

    // A broken image: its tasks never get healthy (the app exits 3), Swarm rolls back.
    let started = Instant::now();
    let _ = docker_kit::docker(&[
        "service",
        "update",
        "--detach=false",
        "--image",
        &broken.0,
        &name,
    ]);
    wait_for(
        "Swarm's rollback of the broken image",
        Duration::from_secs(120),
        || {
            let state = docker_kit::docker_ok(&[
                "service",
                "inspect",
                "-f",
                "{{.UpdateStatus.State}}",
                &name,
            ]);
            (state == "rollback_completed").then_some(()).ok_or(state)
        },
    )
    .unwrap();
    wait_service(&name, &v2.0);
    let rolled_back = started.elapsed();
    let spec = docker_kit::docker_ok(&[
        "service",
        "inspect",
        "-f",
        "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
        &name,
    ]);
    assert!(spec.starts_with(&v2.0), "{spec}");
    eprintln!(
        "swarm: start-first update in {updated:?}, broken image rolled back in {rolled_back:?}"
    );
    match load {
        Some((keep_alive, per_request)) => {
            let (keep_alive, per_request) = (keep_alive.stop(), per_request.stop());
            eprintln!("through the mesh:\nkeep-alive: {keep_alive}\nper-request: {per_request}");
            keep_alive.assert_no_failures();
            per_request.assert_no_failures();
        }
        None => eprintln!(
            "NO LOAD through the published port: the routing mesh does not serve it here \
             ({mesh:?}; dockerd logs why, e.g. no IPVS in the kernel)"
        ),
    }
}
