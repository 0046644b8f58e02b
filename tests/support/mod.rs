//! Helpers of the supervisor tests (`tests/supervisor*.rs`, `tests/pid1*.rs`), on top of the
//! shared harness in `tests/common`: start `handover run` as a subreaper or as PID 1 of a real
//! PID namespace, find its processes, run the `handover` clients with a deadline.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::common::{
    children_of, poll_until, wait_for, Exit, Pid, Poll, ProcStat, Ready, ServerProcess, Signal,
};

/// The `handover` binary under test.
pub fn handover() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handover"))
}

/// A copy of the `handover` binary in `dir`, mode 0755, for running it as another user: the
/// build's own copy may sit in a directory other users cannot enter (a clone under /root).
/// `dir` (a [`TempDir`]: under the system temp dir, mode 0755) stays enterable.
pub fn handover_for_everyone(dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("handover-bin");
    if !copy.exists() {
        std::fs::copy(handover(), &copy).expect("copy the handover binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the handover copy");
    }
    copy
}

/// Whether the tests run as root; when not, `what` is skipped (a failure in CI, where they
/// run as root with every tool installed by .ci/run).
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "skipping: {what} needs root (in CI)"
    );
    eprintln!("skipping: {what} needs root");
    false
}

/// The `sv_probe` example (built once per test binary).
pub fn probe() -> PathBuf {
    crate::common::example_path("sv_probe")
}

/// The `http_server` example.
pub fn http_server() -> PathBuf {
    crate::common::example_path("http_server")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `handover-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "hsv-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the supervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// A normal process: it must make itself a child subreaper.
    Subreaper,
    /// PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`).
    PidNamespace,
}

pub const TIERS: [Tier; 2] = [Tier::Subreaper, Tier::PidNamespace];

/// The command line that starts `handover run` in `tier`.
pub fn run_command(tier: Tier, control: &Path, options: &[&str], command: &[&OsStr]) -> Command {
    let mut args: Vec<OsString> = vec!["run".into(), "--control".into(), control.into()];
    args.extend(options.iter().map(OsString::from));
    args.push("--".into());
    args.extend(command.iter().map(|a| a.to_os_string()));
    match tier {
        Tier::Subreaper => {
            let mut cmd = Command::new(handover());
            cmd.args(args);
            cmd
        }
        Tier::PidNamespace => {
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .arg(handover())
                .args(args);
            cmd
        }
    }
}

/// A running `handover run`, with its process group cleaned up on drop.
pub struct Supervised {
    /// The first process: the supervisor, or `unshare` in a namespace.
    pub server: ServerProcess,
    pub tier: Tier,
    pub control: PathBuf,
    supervisor: Pid,
}

impl Supervised {
    /// Starts `handover run --control <dir>/control.sock OPTIONS -- COMMAND`.
    pub fn start(tier: Tier, dir: &TempDir, options: &[&str], command: &[&OsStr]) -> Supervised {
        Self::start_with(tier, dir, options, command, |_| {})
    }

    /// Like [`Supervised::start`], with a chance to adjust the command (environment).
    pub fn start_with(
        tier: Tier,
        dir: &TempDir,
        options: &[&str],
        command: &[&OsStr],
        adjust: impl FnOnce(&mut Command),
    ) -> Supervised {
        let control = dir.join("control.sock");
        let mut cmd = run_command(tier, &control, options, command);
        adjust(&mut cmd);
        let server = ServerProcess::spawn(cmd);
        let supervisor = match tier {
            Tier::Subreaper => server.pid(),
            Tier::PidNamespace => {
                let unshare = server.pid();
                wait_for(
                    "the supervisor forked by unshare",
                    Duration::from_secs(10),
                    || {
                        let kids = children_of(unshare);
                        kids.first()
                            .map(|p| p.pid)
                            .ok_or_else(|| format!("unshare {unshare} has no child yet"))
                    },
                )
                .unwrap_or_else(|e| panic!("{e}\n{}", server.dump()))
            }
        };
        Supervised {
            server,
            tier,
            control,
            supervisor,
        }
    }

    /// The supervisor's pid, as the test sees it.
    pub fn pid(&self) -> Pid {
        self.supervisor
    }

    /// Sends `sig` to the supervisor.
    pub fn signal(&self, sig: Signal) {
        self.server
            .signal_pid(self.supervisor, sig)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The `/proc` of the supervisor's PID namespace, as the test can read it.
    pub fn proc_root(&self) -> PathBuf {
        match self.tier {
            Tier::Subreaper => PathBuf::from("/proc"),
            Tier::PidNamespace => PathBuf::from(format!("/proc/{}/root/proc", self.supervisor)),
        }
    }

    /// The supervisor's children (host pids), zombies included.
    pub fn children(&self) -> Vec<ProcStat> {
        children_of(self.supervisor)
    }

    /// Waits until the supervisor has exactly one child and it is alive; returns it.
    pub fn wait_single_child(&self, timeout: Duration) -> ProcStat {
        wait_for("exactly one live child of the supervisor", timeout, || {
            let kids = self.children();
            match kids.as_slice() {
                [only] if only.state != 'Z' => Ok(only.clone()),
                _ => Err(format!("{kids:?}")),
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.server.dump()))
    }

    /// Waits for the first process (supervisor or unshare) to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Exit {
        self.server
            .wait_exit(self.server.pid(), timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a `handover` client subcommand against this supervisor.
    pub fn client(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(handover());
        cmd.arg(args[0])
            .arg("--control")
            .arg(&self.control)
            .args(&args[1..]);
        run_with_deadline(cmd, timeout)
    }

    /// `handover upgrade` with a 30 s deadline.
    pub fn upgrade(&self) -> Output {
        self.client(&["upgrade", "--timeout", "30s"], Duration::from_secs(40))
    }

    /// `handover status --json`.
    pub fn status_json(&self) -> String {
        let out = self.client(&["status", "--json"], Duration::from_secs(10));
        assert_eq!(out.code, Some(0), "status failed: {out:?}");
        out.stdout
    }
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end, killing it if it takes longer than `timeout`.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {line}: {e}"));
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = poll_until(format!("{line} to exit"), timeout, || {
        match child.try_wait() {
            Ok(Some(status)) => Poll::Ready(status),
            Ok(None) => Poll::Pending("running".to_string()),
            Err(e) => Poll::Failed(e.to_string()),
        }
    });
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}");
        }
    };
    Output {
        code: status.code(),
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

/// The ready lines (`ready pid=.. generation=.. addr=..`) in a file that apps append to.
pub fn readies_in(path: &Path) -> Vec<Ready> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(Ready::parse)
        .collect()
}

/// Waits for the ready line of `generation` in `path`.
pub fn wait_ready_in(path: &Path, generation: u64, timeout: Duration) -> Result<Ready, String> {
    wait_for(
        format!("generation {generation} ready in {}", path.display()),
        timeout,
        || {
            let all = readies_in(path);
            all.iter()
                .find(|r| r.generation == generation)
                .cloned()
                .ok_or_else(|| format!("{all:?}"))
        },
    )
}

/// Reads `<proc_root>/<pid>/stat`: `(state, ppid)`, or `None` when there is no such process.
pub fn stat_in(proc_root: &Path, pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let close = text.rfind(')')?;
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The `SigBlk` and `SigIgn` lines of `/proc/<pid>/status`.
pub fn signal_masks(pid: Pid) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("SigBlk:"), field("SigIgn:"))
}

/// Waits until the supervisor's stderr contains `needle`.
pub fn wait_stderr(sv: &Supervised, needle: &str, timeout: Duration) {
    wait_server_stderr(&sv.server, needle, timeout);
}

/// Waits until `server`'s stderr contains `needle` (output is read by threads: it may lag
/// behind the process, even after it exited), and returns the stderr seen.
pub fn wait_server_stderr(server: &ServerProcess, needle: &str, timeout: Duration) -> String {
    wait_for(format!("{needle:?} on stderr"), timeout, || {
        let err = server.stderr();
        if err.contains(needle) {
            Ok(err)
        } else {
            Err(format!("{} bytes of stderr", err.len()))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", server.dump()))
}

/// The supervisor's whole log, once it has logged its exit.
pub fn final_log(sv: &Supervised) -> String {
    wait_server_stderr(&sv.server, "supervisor exiting", Duration::from_secs(20))
}

/// `status json` asked on the control socket directly (no client process): the reply, or
/// why there is none. Cheap enough to poll every few milliseconds.
pub fn status_over_socket(control: &Path, timeout: Duration) -> Result<String, String> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("connect {}: {e}", control.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"status json\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

/// One object of the `"workers"` array of `status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub worker: usize,
    pub generation: u64,
    pub pid: i32,
    pub state: String,
    pub ready: bool,
    pub stopping: bool,
    pub release: Option<String>,
}

/// The value of `"key":` in a flat JSON object's text (numbers, booleans, strings without
/// escapes, null).
fn json_field<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\":");
    let start = object.find(&needle)? + needle.len();
    let rest = &object[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.find('"').map(|end| &quoted[..end]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// The `"workers"` array of a `status --json` reply.
pub fn workers_of(json: &str) -> Vec<WorkerRow> {
    let Some(start) = json.find("\"workers\":[") else {
        return Vec::new();
    };
    let body = &json[start + "\"workers\":[".len()..];
    let Some(end) = body.find(']') else {
        return Vec::new();
    };
    body[..end]
        .split("},{")
        .filter(|o| !o.trim().is_empty())
        .filter_map(|o| {
            Some(WorkerRow {
                worker: json_field(o, "worker")?.parse().ok()?,
                generation: json_field(o, "generation")?.parse().ok()?,
                pid: json_field(o, "pid")?.parse().ok()?,
                state: json_field(o, "state")?.to_owned(),
                ready: json_field(o, "ready")? == "true",
                stopping: json_field(o, "stopping")? == "true",
                release: json_field(o, "release")
                    .filter(|r| *r != "null")
                    .map(str::to_owned),
            })
        })
        .collect()
}

/// The workers serving: ready and not told to stop.
pub fn serving(rows: &[WorkerRow]) -> Vec<&WorkerRow> {
    rows.iter().filter(|w| w.ready && !w.stopping).collect()
}

/// The real python3 (not a shim script), or `None` with the reason the test
/// is skipped; under CI (`CI` set) a missing python3 is a failure.
pub fn python() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "skipping: no python3 (in CI)"
    );
    eprintln!("skipping: no python3");
    None
}

/// A port of 127.0.0.1 that was free a moment ago (from :0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port from :0")
        .port()
}
