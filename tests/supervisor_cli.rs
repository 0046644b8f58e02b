//! The `handover` command line: each malformed option and listen URL gives a one-line error
//! naming it and exit code 2, before anything is started (no control socket, no command run);
//! start-up failures say what failed; `--help` states the defaults.

mod common;
mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use support::{handover, run_with_deadline, Output, TempDir};

const T: Duration = Duration::from_secs(20);

fn handover_with(dir: &TempDir, args: &[&str]) -> Output {
    let mut cmd = Command::new(handover());
    cmd.args(args);
    cmd.env("HANDOVER_LOG", "off").current_dir(dir.path());
    run_with_deadline(cmd, T)
}

#[test]
fn bad_input_is_a_one_line_error_naming_the_option_and_exit_2() {
    let dir = TempDir::new("cli");
    let marker = dir.join("started");
    let control = dir.join("control.sock");
    let control = control.to_str().expect("utf-8 path");
    let touch = format!("touch '{}'", marker.display());
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", "tcp://localhost:8080"], "--listen"),
        (&["--listen", "tcp://127.0.0.1:99999"], "--listen"),
        (&["--listen", "tcp://127.0.0.1"], "--listen"),
        (&["--listen", "tcp://:8080"], "--listen"),
        (&["--listen", "tcp://::1:8080"], "--listen"),
        (&["--listen", "http://127.0.0.1:80"], "--listen"),
        (&["--listen", "127.0.0.1:80"], "--listen"),
        (&["--listen", "unix://relative.sock"], "--listen"),
        (&["--listen", "bad:name=tcp://127.0.0.1:1"], "--listen"),
        (
            &[
                "--listen",
                "tcp://127.0.0.1:1",
                "--listen",
                "tcp://127.0.0.1:2",
            ],
            "--listen",
        ),
        (
            &[
                "--listen",
                "a=tcp://127.0.0.1:1",
                "--listen",
                "a=udp://127.0.0.1:2",
            ],
            "--listen",
        ),
        (&["--ready", "sometimes"], "--ready"),
        (&["--ready", "exec:"], "--ready"),
        (&["--ready", "delay:5"], "--ready"),
        (&["--ready-timeout", "5"], "--ready-timeout"),
        (&["--ready-timeout", "0s"], "--ready-timeout"),
        (&["--drain-timeout", "1.5s"], "--drain-timeout"),
        (&["--shutdown-delay", "soon"], "--shutdown-delay"),
        (&["--stop-signal", "NOPE"], "--stop-signal"),
        (&["--stop-signal", "KILL"], "--stop-signal"),
        (&["--stop-signal", "9"], "--stop-signal"),
        (&["--failed-drain-timeout", "2"], "--failed-drain-timeout"),
        (&["--pid-file", ""], "--pid-file"),
        (&["--pid-file", "/tmp/dir/"], "--pid-file"),
        (&["--restart", "always"], "--restart"),
        (&["--max-draining", "0"], "--max-draining"),
        (&["--max-draining", "1001"], "--max-draining"),
        (&["--backlog", "0"], "--backlog"),
        (&["--backlog", "2147483648"], "--backlog"),
        (&["--backlog", "-1"], "--backlog"),
        (&["--bogus"], "--bogus"),
    ];
    for (options, option) in cases {
        let mut args = vec!["run", "--control", control];
        args.extend_from_slice(options);
        args.extend_from_slice(&["--", "sh", "-c", &touch]);
        let out = handover_with(&dir, &args);
        assert_eq!(out.code, Some(2), "{options:?}: {out:?}");
        assert_eq!(out.stdout, "", "{options:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{options:?}: {out:?}");
        assert!(
            out.stderr.starts_with(&format!("handover: {option}: ")),
            "{options:?}: {out:?}"
        );
        assert!(!marker.exists(), "{options:?} started the command");
        assert!(
            !dir.join("control.sock").exists(),
            "{options:?} created the control socket"
        );
    }
    for (args, option) in [
        (&["run", "--control", control][..], "run"),
        (&["run", "--control", "", "--", "true"][..], "--control"),
        (&["run", "--listen"][..], "--listen"),
        (&["upgrade", "--timeout", "x"][..], "--timeout"),
        (&["upgrade", "now"][..], "upgrade"),
        (&["status", "--timeout", "1s"][..], "--timeout"),
    ] {
        let out = handover_with(&dir, args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:?}");
        assert!(
            out.stderr.starts_with(&format!("handover: {option}: ")),
            "{args:?}: {out:?}"
        );
    }
    // A missing or unknown subcommand: one prefix, not "handover: handover:".
    for (args, problem) in [
        (&["bogus"][..], "unknown subcommand \"bogus\""),
        (&[""][..], "unknown subcommand \"\""),
        (&[][..], "missing subcommand"),
    ] {
        let out = handover_with(&dir, args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:?}");
        assert!(
            out.stderr.starts_with(&format!("handover: {problem}")),
            "{args:?}: {out:?}"
        );
    }
}

#[test]
fn errors_say_the_real_limits() {
    let dir = TempDir::new("limits");
    let control = dir.join("control.sock");
    let control = control.to_str().expect("utf-8 path");
    for (options, says) in [
        (
            &["--max-draining", "0"][..],
            "--max-draining: \"0\" is not a whole number from 1 to 1000",
        ),
        (
            &["--max-draining", "5000"][..],
            "--max-draining: \"5000\" is not a whole number from 1 to 1000",
        ),
        (
            &["--backlog", "99999999999"][..],
            "--backlog: \"99999999999\" is not a whole number from 1 to 2147483647",
        ),
        (
            &["--stop-signal", "KILL"][..],
            "--stop-signal: SIGKILL cannot be the stop signal: a generation must be able to drain",
        ),
        (
            &["--stop-signal", "SIGKILL"][..],
            "--stop-signal: SIGKILL cannot be the stop signal",
        ),
    ] {
        let mut args = vec!["run", "--control", control];
        args.extend_from_slice(options);
        args.extend_from_slice(&["--", "true"]);
        let out = handover_with(&dir, &args);
        assert_eq!(out.code, Some(2), "{options:?}: {out:?}");
        assert!(
            out.stderr.starts_with(&format!("handover: {says}")),
            "{options:?}: {out:?}"
        );
    }
}

#[test]
fn start_up_failures_say_what_failed() {
    let dir = TempDir::new("startfail");
    let control = dir.join("control.sock");
    let control = control.to_str().expect("utf-8 path");
    let marker = dir.join("started");
    let touch = format!("touch '{}'", marker.display());

    // A port in use: nothing is started.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("tcp://{}", taken.local_addr().expect("addr"));
    let out = handover_with(
        &dir,
        &[
            "run",
            "--control",
            control,
            "--listen",
            &url,
            "--",
            "sh",
            "-c",
            &touch,
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!("handover: --listen {url}: ")),
        "{out:?}"
    );
    assert!(out.stderr.contains("Address already in use"), "{out:?}");
    assert!(!marker.exists());
    assert!(!dir.join("control.sock").exists());

    // A command that does not exist or cannot be executed: 127 and 126, as shells do.
    let out = handover_with(
        &dir,
        &["run", "--control", control, "--", "no-such-command-xyz"],
    );
    assert_eq!(out.code, Some(127), "{out:?}");
    assert!(
        out.stderr.contains("cannot start no-such-command-xyz"),
        "{out:?}"
    );
    let plain = dir.join("plain-file");
    std::fs::write(&plain, "not a program").expect("write");
    let plain = plain.to_str().expect("utf-8 path");
    let out = handover_with(&dir, &["run", "--control", control, "--", plain]);
    assert_eq!(out.code, Some(126), "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    assert!(!dir.join("control.sock").exists(), "control socket removed");

    // A control path whose directory belongs to someone else.
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let other = dir.join("other");
        std::fs::create_dir(&other).expect("mkdir");
        std::os::unix::fs::chown(&other, Some(65534), Some(65534)).expect("chown");
        let path = other.join("control.sock");
        let unix = dir.join("api.sock");
        let listen = format!("api=unix://{}", unix.display());
        let out = handover_with(
            &dir,
            &[
                "run",
                "--listen",
                &listen,
                "--control",
                path.to_str().expect("utf-8"),
                "--",
                "true",
            ],
        );
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("belongs to uid 65534"), "{out:?}");
        assert!(!unix.exists(), "the unix listener's path is removed again");
    }
}

#[test]
fn help_states_the_defaults() {
    let dir = TempDir::new("help");
    let out = handover_with(&dir, &["run", "--help"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for needle in [
        "--listen [NAME=]URL",
        "(default notify)",
        "(default 60s)",
        "(default 30s)",
        "(default TERM)",
        "(default 0s)",
        "(default on-failure)",
        "--failed-drain-timeout DUR",
        "(default: the --drain-timeout value)",
        "--pid-file PATH",
        "the 6th quick crash in a row",
        "/run/handover/control.sock",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            out.stdout
        );
    }
    let out = handover_with(&dir, &["--help"]);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("handover upgrade"), "{}", out.stdout);
    let out = handover_with(&dir, &["upgrade", "--help"]);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("exits\n0 when"), "{}", out.stdout);
}
