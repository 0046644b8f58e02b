//! The control socket of `handover run`, and attacks on it:
//!
//! - mode 0600, other users refused by `SO_PEERCRED`, one supervisor per path, a stale socket
//!   replaced, the socket removed on exit;
//! - the supervisor creates its directory without following a symbolic link and refuses one
//!   that it does not own or that group or others can write;
//! - the clients refuse a socket that another user could have planted (a directory of another
//!   user, one that others can write, a symbolic link, a socket of another user, a server
//!   running as another user), exit 2 and print nothing of it; what they print of a trusted
//!   server has its control characters replaced.
//!
//! The attacks need root (`chown`, a fake server as uid 65534).

mod common;
mod support;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Exit, ServerProcess, Signal};
use support::{http_server, run_with_deadline, wait_stderr, Output, Supervised, TempDir, Tier};

const T: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

fn http(tier: Tier, dir: &TempDir, options: &[&str]) -> Supervised {
    let server = http_server();
    let mut all = vec!["--listen", "http=tcp://127.0.0.1:0"];
    all.extend_from_slice(options);
    Supervised::start(
        tier,
        dir,
        &all,
        &[
            server.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    )
}

/// A fake supervisor: listens at `path` and answers every request with a line holding
/// `ATTACKER` and terminal escapes. With `drop_to_nobody`, it binds as whoever starts it, then
/// becomes uid 65534 before `listen` (so the socket file is that user's, `SO_PEERCRED` says
/// 65534). Its pid, as the kernel sees it, is that of its process.
const FAKE_SERVER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
if sys.argv[2] == "drop":
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
s.listen(8)
print("listening uid=%d" % os.getuid(), flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(256)
        c.sendall(b"ok: ATTACKER \x1b]0;owned\x07 \x1b[2J text\n")
    except OSError:
        pass  # a client that refused us and left
    c.close()
"#;

fn fake_server(path: &Path, uid: Option<u32>, drop_to_nobody: bool) -> ServerProcess {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", FAKE_SERVER])
        .arg(path)
        .arg(if drop_to_nobody { "drop" } else { "stay" });
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let server = ServerProcess::spawn(cmd);
    server
        .wait_line(|l| l.starts_with("listening"), T)
        .unwrap_or_else(|e| panic!("fake server: {e}"));
    server
}

/// `handover SUBCOMMAND --control PATH` as this (root) user.
fn client(subcommand: &str, path: &Path) -> Output {
    let mut cmd = Command::new(support::handover());
    cmd.arg(subcommand).arg("--control").arg(path);
    run_with_deadline(cmd, T)
}

/// Both clients refuse `path` with exit 2 and a message containing `why`, and print nothing
/// the server sent.
fn assert_refused(path: &Path, why: &str) {
    for subcommand in ["upgrade", "status"] {
        let out = client(subcommand, path);
        assert_eq!(
            out.code,
            Some(2),
            "{subcommand} {}: {out:?}",
            path.display()
        );
        assert!(
            out.stderr.contains("refusing the control socket") && out.stderr.contains(why),
            "{subcommand}: {out:?}"
        );
        assert!(
            !out.stdout.contains("ATTACKER") && !out.stderr.contains("ATTACKER"),
            "{subcommand} printed the attacker's text: {out:?}"
        );
    }
}

/// `handover run --control PATH -- true` refuses to start (exit 1) with `why`, creating nothing.
fn assert_supervisor_refuses(dir: &TempDir, path: &Path, why: &str, uid: Option<u32>) {
    let binary = support::handover_for_everyone(dir);
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .arg("--control")
        .arg(path)
        .args(["--", "true"])
        .env("HANDOVER_LOG", "off");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = run_with_deadline(cmd, T);
    assert_eq!(out.code, Some(1), "{}: {out:?}", path.display());
    assert!(out.stderr.contains(why), "{out:?}");
    assert!(
        std::fs::symlink_metadata(path).is_err(),
        "{} was created",
        path.display()
    );
}

#[test]
fn control_socket_is_for_the_supervisors_user_only() {
    if !support::require_root("running a client as another user") {
        return;
    }
    let dir = TempDir::new("control");
    // Whatever the clone's location, uid 65534 can run this copy.
    let binary = support::handover_for_everyone(&dir);
    let sv = http(Tier::Subreaper, &dir, &[]);
    sv.server.wait_ready(1);
    let mode = std::fs::metadata(&sv.control)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let out = sv.client(&["status"], T);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("current: generation 1 pid "), "{out:?}");

    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(args).arg("--control").arg(&sv.control);
        cmd.uid(65534).gid(65534);
        run_with_deadline(cmd, T)
    };
    // The file mode keeps others out...
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let out = as_nobody(&["status"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    // ...and with the mode opened up, SO_PEERCRED still does.
    std::fs::set_permissions(&sv.control, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for args in [&["status"][..], &["upgrade"][..]] {
        let out = as_nobody(args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains("uid 65534 may not use this control socket"),
            "{args:?}: {out:?}"
        );
    }
    wait_stderr(
        &sv,
        "control connection refused: not the supervisor's user",
        T,
    );
    assert!(!sv.server.stderr().contains("upgrade requested"));

    // One supervisor per control path.
    let mut cmd = support::run_command(Tier::Subreaper, &sv.control, &[], &[OsStr::new("true")]);
    cmd.env("HANDOVER_LOG", "off");
    let second = ServerProcess::spawn(cmd);
    assert_eq!(
        second.wait_exit(second.pid(), T),
        Ok(Exit::Code(1)),
        "{}",
        second.dump()
    );
    support::wait_server_stderr(&second, "another handover supervisor is listening there", T);
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(0), "{}", sv.server.dump());
    assert!(
        !sv.control.exists(),
        "the control socket is removed on exit"
    );
}

#[test]
fn a_stale_control_socket_is_replaced() {
    let dir = TempDir::new("stale");
    let path = dir.join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let sv = Supervised::start(
        Tier::Subreaper,
        &dir,
        &["--ready", "delay:0s"],
        &[OsStr::new("sleep"), OsStr::new("30")],
    );
    wait_stderr(&sv, "removing the stale control socket", T);
    wait_stderr(&sv, "supervisor started", T);
    let out = sv.client(&["status", "--json"], T);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("{\"supervisor\":"), "{out:?}");
    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(T), Exit::Code(143), "{}", sv.server.dump());
}

#[test]
fn clients_refuse_a_directory_of_another_user() {
    if !support::require_root("chown and a fake server as another user") {
        return;
    }
    let dir = TempDir::new("attack-owner");
    // What another local user does first when the victim has no XDG_RUNTIME_DIR:
    // /tmp/handover-<uid>/ made and served by them.
    let evil = dir.join("handover-1000");
    std::fs::create_dir(&evil).expect("mkdir");
    std::os::unix::fs::chown(&evil, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = evil.join("control.sock");
    let _fake = fake_server(&path, Some(NOBODY), false);
    assert_refused(&path, "belongs to uid 65534");
    // And the supervisor does not use it either.
    assert_supervisor_refuses(
        &dir,
        &path.with_file_name("other.sock"),
        "belongs to uid 65534",
        None,
    );
}

#[test]
fn directories_others_can_write_are_refused() {
    if !support::require_root("a fake server and a supervisor as another user") {
        return;
    }
    let dir = TempDir::new("attack-mode");
    let open = dir.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let path = open.join("control.sock");
    // Root's own socket, but in a directory anyone could have put it in.
    let fake = fake_server(&path, None, false);
    assert_refused(&path, "has mode 0777");
    drop(fake);
    let _ = std::fs::remove_file(&path);
    assert_supervisor_refuses(&dir, &path, "has mode 0777", None);
    // A root-owned, sticky, world-writable directory (like /tmp) for a non-root supervisor: not
    // its own.
    let sticky = dir.join("sticky");
    std::fs::create_dir(&sticky).expect("mkdir");
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    assert_supervisor_refuses(
        &dir,
        &sticky.join("control.sock"),
        "its directory belongs to uid 0, not to this user (uid 65534)",
        Some(NOBODY),
    );
    // ...whose own directory, made by it, is accepted.
    let mine = sticky.join("handover-65534");
    let binary = support::handover_for_everyone(&dir);
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .arg("--control")
        .arg(mine.join("control.sock"))
        .args(["--ready", "delay:0s", "--", "sleep", "30"])
        .uid(NOBODY)
        .gid(NOBODY);
    let server = ServerProcess::spawn(cmd);
    server
        .wait_stderr("supervisor started", T)
        .unwrap_or_else(|e| panic!("{e}"));
    let meta = std::fs::symlink_metadata(&mine).expect("its directory");
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    server.signal(Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(server.wait_exit(server.pid(), T), Ok(Exit::Code(143)));
    assert!(!mine.join("control.sock").exists(), "removed on exit");
}

#[test]
fn symbolic_links_are_not_followed() {
    if !support::require_root("a fake server") {
        return;
    }
    let dir = TempDir::new("attack-symlink");
    let real = dir.join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    // The supervisor: a symlink where its directory should be.
    assert_supervisor_refuses(&dir, &link.join("control.sock"), "is a symbolic link", None);
    assert!(
        !real.join("control.sock").exists(),
        "nothing made through the link"
    );
    // The clients: a symlink as the directory, and as the socket.
    let _fake = fake_server(&real.join("real.sock"), None, false);
    assert_refused(&link.join("real.sock"), "is a symbolic link");
    let mine = dir.join("mine");
    std::fs::create_dir(&mine).expect("mkdir");
    std::os::unix::fs::symlink(real.join("real.sock"), mine.join("control.sock")).expect("symlink");
    assert_refused(&mine.join("control.sock"), "it is not a socket");
    // The supervisor at a symlinked socket path.
    let mut cmd = Command::new(support::handover());
    cmd.arg("run")
        .arg("--control")
        .arg(mine.join("control.sock"))
        .args(["--", "true"])
        .env("HANDOVER_LOG", "off");
    let out = run_with_deadline(cmd, T);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("exists and is not a socket"), "{out:?}");
}

#[test]
fn clients_check_the_servers_credentials() {
    if !support::require_root("a fake server that drops to another user") {
        return;
    }
    let dir = TempDir::new("attack-peer");
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).expect("mkdir");
    let path = sockets.join("control.sock");
    // The socket file and its directory are root's: only SO_PEERCRED tells.
    let _fake = fake_server(&path, None, true);
    let meta = std::fs::symlink_metadata(&path).expect("socket");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    assert_refused(&path, "it is served by uid 65534");
}

#[test]
fn clients_print_no_control_characters() {
    if !support::require_root("a fake server") {
        return;
    }
    let dir = TempDir::new("escapes");
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).expect("mkdir");
    let path = sockets.join("control.sock");
    // A trusted server (root's) whose text carries terminal escapes: printed, defused.
    let _fake = fake_server(&path, None, false);
    for (subcommand, code) in [("upgrade", 0), ("status", 0)] {
        let out = client(subcommand, &path);
        assert_eq!(out.code, Some(code), "{subcommand}: {out:?}");
        assert!(out.stdout.contains("ATTACKER"), "{subcommand}: {out:?}");
        assert!(
            !out.stdout.contains(|c: char| c.is_control() && c != '\n'),
            "{subcommand} printed control characters: {out:?}"
        );
        assert!(
            out.stdout
                .contains("ATTACKER \u{fffd}]0;owned\u{fffd} \u{fffd}[2J text\n"),
            "{subcommand}: {out:?}"
        );
    }
}
