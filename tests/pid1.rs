//! S7: the PID-1 duties of `handover run`, in two tiers: as PID 1 of a real PID namespace
//! (`unshare --pid --fork --mount-proc`, needs root) and as a child subreaper outside one.
//!
//! - exit codes 0..=255 and 128+signal pass through;
//! - an orphaned grandchild is reaped, with a negative control (`--debug-no-reap`, a test-only
//!   switch) proving the check fails when the supervisor does not reap;
//! - signals the supervisor does not handle (USR1, USR2, WINCH, QUIT) reach the child;
//! - the child starts with empty SigBlk and SigIgn although the supervisor blocks and ignores
//!   signals itself;
//! - the stop signal, the drain timeout's SIGKILL and the exit status of a stop.

mod common;
mod support;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::{wait_for, Exit, ServerProcess, Signal};
use support::{probe, run_command, signal_masks, stat_in, Supervised, TempDir, Tier, TIERS};

const T: Duration = Duration::from_secs(20);
const ZEROS: &str = "0000000000000000";

fn require_namespaces(tier: Tier) -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if tier == Tier::PidNamespace && !root {
        // CI runs as root with every tool installed by .ci/run: there a skip is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "skipping the PID-namespace tier: unshare --pid needs root (in CI)"
        );
        eprintln!("skipping the PID-namespace tier: unshare --pid needs root");
        return false;
    }
    true
}

/// Runs the probe with `args` under the supervisor, 32 at a time, and checks each exit code.
fn check_exit_codes(tier: Tier) {
    if !require_namespaces(tier) {
        return;
    }
    let dir = TempDir::new("exit");
    let probe = probe();
    let mut cases: Vec<(Vec<String>, i32)> = (0..=255)
        .map(|n| (vec!["exit".to_string(), n.to_string()], n))
        .collect();
    for signal in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGABRT,
        Signal::SIGKILL,
        Signal::SIGUSR1,
        Signal::SIGSEGV,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
        Signal::SIGALRM,
        Signal::SIGTERM,
    ] {
        let n = signal as i32;
        cases.push((vec!["kill".to_string(), n.to_string()], 128 + n));
    }
    let started = Instant::now();
    for (chunk_no, chunk) in cases.chunks(32).enumerate() {
        let running: Vec<(ServerProcess, i32, String)> = chunk
            .iter()
            .enumerate()
            .map(|(i, (args, expected))| {
                let control = dir.join(&format!("c{chunk_no}-{i}.sock"));
                let mut command: Vec<&OsStr> = vec![probe.as_os_str()];
                command.extend(args.iter().map(OsStr::new));
                let cmd = run_command(tier, &control, &["--restart", "never"], &command);
                (ServerProcess::spawn(cmd), *expected, args.join(" "))
            })
            .collect();
        for (server, expected, what) in &running {
            let exit = server
                .wait_exit(server.pid(), T)
                .unwrap_or_else(|e| panic!("{tier:?} probe {what}: {e}"));
            assert_eq!(
                exit,
                Exit::Code(*expected),
                "{tier:?}: probe {what} should make the supervisor exit {expected}\n{}",
                server.dump()
            );
        }
    }
    eprintln!(
        "{tier:?}: {} exit codes checked in {:?}",
        cases.len(),
        started.elapsed()
    );
}

#[test]
fn exit_codes_pass_through_as_subreaper() {
    check_exit_codes(Tier::Subreaper);
}

#[test]
fn exit_codes_pass_through_as_pid1() {
    check_exit_codes(Tier::PidNamespace);
}

/// How the orphaned grandchild ended up: reaped, or still there with `(state, ppid)`.
fn orphan_outcome(tier: Tier, reap: bool) -> Result<(), (char, i32)> {
    let dir = TempDir::new("orphan");
    let probe = probe();
    let mut options = vec!["--restart", "never", "--ready", "delay:0s"];
    if !reap {
        options.push("--debug-no-reap");
    }
    let sv = Supervised::start(
        tier,
        &dir,
        &options,
        &[probe.as_os_str(), OsStr::new("orphan")],
    );
    // Three lines in any order: the orphan's pid (from its dead parent), the probe's own
    // (its signal handling is in place), and the orphan's last words.
    let grandchild: i32 = wait_for("the probe's lines", T, || {
        let lines = sv.server.stdout_lines();
        let orphan = lines
            .iter()
            .find_map(|l| l.strip_prefix("orphaned pid="))
            .and_then(|p| p.parse().ok());
        let done = lines.iter().any(|l| l.starts_with("grandchild exiting"))
            && lines.iter().any(|l| l.starts_with("signals pid="));
        orphan.filter(|_| done).ok_or_else(|| format!("{lines:?}"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sv.server.dump()));
    let root = sv.proc_root();
    // It exits right after that line; reaped, it disappears from /proc.
    let outcome = wait_for(
        format!("orphaned grandchild {grandchild} to be reaped ({tier:?})"),
        Duration::from_secs(2),
        || match stat_in(&root, grandchild) {
            None => Ok(()),
            Some(state) => Err(format!("{state:?}")),
        },
    );
    let result = match outcome {
        Ok(()) => Ok(()),
        Err(_) => Err(stat_in(&root, grandchild).unwrap_or(('?', 0))),
    };
    // The probe exits 0 on SIGTERM, so does the supervisor.
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    result
}

fn check_orphans(tier: Tier) {
    if !require_namespaces(tier) {
        return;
    }
    orphan_outcome(tier, true).unwrap_or_else(|state| {
        panic!("{tier:?}: the orphaned grandchild was not reaped: state {state:?}")
    });
    // Negative control: the same check fails when the supervisor does not reap orphans, and
    // the grandchild is then a zombie parented to the supervisor (PID 1 in its namespace).
    match orphan_outcome(tier, false) {
        Ok(()) => panic!("{tier:?}: the check passed with reaping off: it proves nothing"),
        Err((state, ppid)) => {
            assert_eq!(state, 'Z', "{tier:?}: expected a zombie");
            if tier == Tier::PidNamespace {
                assert_eq!(ppid, 1, "reparented to PID 1 of the namespace");
            }
        }
    }
}

#[test]
fn orphans_are_reaped_as_subreaper() {
    check_orphans(Tier::Subreaper);
}

#[test]
fn orphans_are_reaped_as_pid1() {
    check_orphans(Tier::PidNamespace);
}

#[test]
fn orphans_are_reparented_to_the_subreaper() {
    // Outside a namespace, the orphan goes to the supervisor (the nearest subreaper), not to
    // the test process (also a subreaper) or init.
    let dir = TempDir::new("reparent");
    let probe = probe();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &[
            "--restart",
            "never",
            "--ready",
            "delay:0s",
            "--debug-no-reap",
        ],
        &[probe.as_os_str(), OsStr::new("orphan")],
    );
    let line = sv
        .server
        .wait_line(|l| l.starts_with("orphaned pid="), T)
        .unwrap_or_else(|e| panic!("{e}"));
    let grandchild: i32 = line["orphaned pid=".len()..].parse().expect("pid");
    let parent = wait_for("the orphan's new parent", T, || {
        match stat_in(std::path::Path::new("/proc"), grandchild) {
            Some(('Z', ppid)) => Ok(ppid),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parent, sv.pid().as_raw());
}

fn check_signals_forwarded(tier: Tier) {
    if !require_namespaces(tier) {
        return;
    }
    let dir = TempDir::new("signals");
    let probe = probe();
    let sv = Supervised::start(
        tier,
        &dir,
        &["--ready", "delay:0s"],
        &[probe.as_os_str(), OsStr::new("signals")],
    );
    sv.server
        .wait_line(|l| l.starts_with("signals pid="), T)
        .unwrap_or_else(|e| panic!("{e}"));
    for signal in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ] {
        sv.signal(signal);
        let want = format!("got {}", signal.as_str());
        sv.server
            .wait_line(|l| l == want, T)
            .unwrap_or_else(|e| panic!("{tier:?}: {signal} was not forwarded: {e}"));
    }
    sv.signal(Signal::SIGTERM);
    sv.server
        .wait_line(|l| l == "got SIGTERM", T)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn signals_reach_the_child_as_subreaper() {
    check_signals_forwarded(Tier::Subreaper);
}

#[test]
fn signals_reach_the_child_as_pid1() {
    check_signals_forwarded(Tier::PidNamespace);
}

fn check_clean_signal_state(tier: Tier) {
    if !require_namespaces(tier) {
        return;
    }
    let dir = TempDir::new("mask");
    let sv = Supervised::start(
        tier,
        &dir,
        &["--ready", "delay:0s"],
        &[OsStr::new("sleep"), OsStr::new("30")],
    );
    // Once it has exec'd (between fork and exec it still has the supervisor's mask).
    let child = wait_for("the child to exec sleep", T, || {
        let kids = sv.children();
        match kids.as_slice() {
            [only] if only.comm == "sleep" => Ok(only.clone()),
            _ => Err(format!("{kids:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (blocked, ignored) = signal_masks(child.pid);
    assert_eq!(blocked, ZEROS, "{tier:?}: the child's SigBlk");
    assert_eq!(ignored, ZEROS, "{tier:?}: the child's SigIgn");
    // Control: the supervisor itself blocks signals (signalfd) and ignores SIGPIPE (Rust's
    // runtime, inherited from the test process too), so the clean state is its doing.
    let (blocked, ignored) = signal_masks(sv.pid());
    assert_ne!(blocked, ZEROS, "the supervisor's SigBlk");
    assert_ne!(ignored, ZEROS, "the supervisor's SigIgn");
    // `sleep` dies of the stop signal: the supervisor exits 128 + SIGTERM.
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(143), "{}", sv.server.dump());
}

#[test]
fn child_signal_mask_and_dispositions_are_clean() {
    for tier in TIERS {
        check_clean_signal_state(tier);
    }
}

#[test]
fn stop_kills_after_the_drain_timeout() {
    let dir = TempDir::new("drainkill");
    let probe = probe();
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--ready", "delay:0s", "--drain-timeout", "300ms"],
        &[
            probe.as_os_str(),
            OsStr::new("signals"),
            OsStr::new("--ignore-term"),
        ],
    );
    sv.server
        .wait_line(|l| l.starts_with("signals pid="), T)
        .unwrap_or_else(|e| panic!("{e}"));
    let sent = Instant::now();
    sv.signal(Signal::SIGTERM);
    sv.server
        .wait_line(|l| l == "got SIGTERM", T)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sv.wait_exit(T), Exit::Code(128 + 9), "{}", sv.server.dump());
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "SIGKILL came before the drain timeout: {:?}",
        sent.elapsed()
    );
    support::wait_stderr(&sv, "drain timeout: SIGKILL", T);
}

#[test]
fn sigint_stops_with_the_configured_stop_signal() {
    if !require_namespaces(Tier::PidNamespace) {
        return;
    }
    let dir = TempDir::new("stopsig");
    let probe = probe();
    let sv = Supervised::start(
        Tier::PidNamespace,
        &dir,
        &["--ready", "delay:0s", "--stop-signal", "INT"],
        &[probe.as_os_str(), OsStr::new("signals")],
    );
    sv.server
        .wait_line(|l| l.starts_with("signals pid="), T)
        .unwrap_or_else(|e| panic!("{e}"));
    sv.signal(Signal::SIGINT);
    sv.server
        .wait_line(|l| l == "got SIGINT", T)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
}

#[test]
fn the_child_inherits_only_stdio_and_the_sockets() {
    // S9: nothing of the supervisor's (signalfd, epoll, control and notification sockets,
    // pipes) leaks into the app, which gets fds 0-2, its listeners at 3.. and its end of the
    // control channel right after them (HANDOVER_CONTROL_FD, not counted in LISTEN_FDS).
    for tier in TIERS {
        if !require_namespaces(tier) {
            continue;
        }
        let dir = TempDir::new("fds");
        let sv = Supervised::start(
            tier,
            &dir,
            &[
                "--ready",
                "delay:0s",
                "--listen",
                "a=tcp://127.0.0.1:0",
                "--listen",
                "b=udp://127.0.0.1:0",
            ],
            &[OsStr::new("sleep"), OsStr::new("30")],
        );
        let child = wait_for("the child to exec sleep", T, || {
            let kids = sv.children();
            match kids.as_slice() {
                [only] if only.comm == "sleep" => Ok(only.clone()),
                _ => Err(format!("{kids:?}")),
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        // Right after exec, `sleep` itself may hold a file open for a moment
        // (the dynamic loader, locale data): wait for its own start-up to
        // settle. An inherited fd never goes away, so a leak still fails here.
        let fds = wait_for("the child's fds to be stdio and its sockets", T, || {
            let fds = common::fd_targets(child.pid).map_err(|e| e.to_string())?;
            let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
            if numbers == [0, 1, 2, 3, 4, 5] {
                Ok(fds)
            } else {
                Err(format!("{tier:?}: {fds:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            fds[3..]
                .iter()
                .all(|(_, target)| target.starts_with("socket:")),
            "{fds:?}"
        );
        let environ = std::fs::read(format!("/proc/{}/environ", child.pid)).expect("environ");
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        for var in [&b"LISTEN_FDS=2"[..], b"HANDOVER_CONTROL_FD=5"] {
            assert!(
                vars.contains(&var),
                "{tier:?}: no {} in {:?}",
                String::from_utf8_lossy(var),
                String::from_utf8_lossy(&environ)
            );
        }
        sv.signal(Signal::SIGTERM);
        assert_eq!(sv.wait_exit(T), Exit::Code(143), "{}", sv.server.dump());
    }
}
