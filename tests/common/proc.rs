//! A server under test as a process group: spawn, read its ready lines, signal it, wait for
//! each generation to exit, and kill and reap everything on drop.
//!
//! The test process makes itself a child subreaper, so a generation orphaned by the exit of its
//! parent (the previous generation) is reparented to the test process and can be waited for
//! here. Only specific pids are ever waited for (never `waitpid(-1)`), so tests running in
//! parallel in one binary do not steal each other's exit statuses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

use super::wait::{wait_for, Deadline};

/// Default budget for a generation to print its ready line (debug builds, loaded machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default budget for a process to exit after it was asked to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Drop` keeps killing and reaping before it gives up with a warning.
const DROP_REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of stderr kept; older output is dropped first.
const STDERR_CAP: usize = 4 << 20;
/// Lines of stdout and stderr shown in failure messages.
const DUMP_LINES: usize = 60;

/// Set this variable (to anything) to copy the output of servers under test to the test's
/// stderr as it arrives.
pub const ECHO_ENV: &str = "HANDOVER_TEST_ECHO";

/// A parsed `ready pid=<pid> generation=<n> addr=<ip:port>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// Pid of the generation that became ready.
    pub pid: Pid,
    /// Its generation number (the first process is generation 1).
    pub generation: u64,
    /// The address it serves on.
    pub addr: SocketAddr,
}

impl Ready {
    /// Parses a ready line; `None` if `line` is not one (unknown keys are ignored).
    pub fn parse(line: &str) -> Option<Ready> {
        let mut tokens = line.split_whitespace();
        if tokens.next()? != "ready" {
            return None;
        }
        let (mut pid, mut generation, mut addr) = (None, None, None);
        for token in tokens {
            match token.split_once('=') {
                Some(("pid", v)) => pid = Some(Pid::from_raw(v.parse().ok()?)),
                Some(("generation", v)) => generation = Some(v.parse().ok()?),
                Some(("addr", v)) => addr = Some(v.parse().ok()?),
                _ => {}
            }
        }
        Some(Ready {
            pid: pid?,
            generation: generation?,
            addr: addr?,
        })
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(Signal),
    /// Gone, but reaped by a process other than the test (its parent was still alive), so the
    /// status is unknown.
    ReapedElsewhere,
}

impl Exit {
    /// `Exit::Code(0)`.
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by {s}"),
            Exit::ReapedElsewhere => f.write_str("reaped by another process (status unknown)"),
        }
    }
}

/// One line of `/proc/<pid>/stat`, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The process.
    pub pid: Pid,
    /// Its name (`comm`).
    pub comm: String,
    /// Its state letter: `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    /// Its parent.
    pub ppid: Pid,
    /// Its process group.
    pub pgrp: Pid,
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist (any more).
pub fn proc_stat(pid: Pid) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // "pid (comm) S ppid pgrp ..."; comm may hold spaces and parentheses: split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid: Pid::from_raw(pid),
        comm,
        state,
        ppid: Pid::from_raw(ppid),
        pgrp: Pid::from_raw(pgrp),
    })
}

/// Every process visible in `/proc`.
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        proc_stat(Pid::from_raw(pid))
    })
    .collect()
}

/// Children of `pid` (any state, zombies included).
pub fn children_of(pid: Pid) -> Vec<ProcStat> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .collect()
}

/// Zombie children of the test process.
pub fn zombies() -> Vec<ProcStat> {
    let me = getpid();
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == me && p.state == 'Z')
        .collect()
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: Pid) -> bool {
    proc_stat(pid).is_some_and(|p| p.state != 'Z')
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: Pid) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The open file descriptors of `pid` and what they point to (`socket:[123]`, `pipe:[45]`, a
/// path), sorted by number: for failure messages about leaked fds.
pub fn fd_targets(pid: Pid) -> io::Result<Vec<(i32, String)>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|e| format!("<{e}>"));
        fds.push((fd, target));
    }
    fds.sort();
    Ok(fds)
}

/// Makes the test process a child subreaper (once per process), so that descendants orphaned
/// by their parent are reparented to it instead of to init.
pub fn become_subreaper() {
    static DONE: OnceLock<Result<(), Errno>> = OnceLock::new();
    let result = DONE.get_or_init(|| nix::sys::prctl::set_child_subreaper(true));
    if let Err(e) = result {
        panic!("prctl(PR_SET_CHILD_SUBREAPER) failed: {e}");
    }
}

/// Polls `waitpid(pid, WNOHANG)` once. `Ok(None)`: still running, or not (yet) our child.
fn try_reap(pid: Pid) -> Result<Option<Exit>, Errno> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(Exit::Code(code))),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(Exit::Signal(sig))),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Default)]
struct State {
    /// Every stdout line, in order.
    stdout: Vec<String>,
    /// Index of the first line `wait_line` has not consumed yet.
    cursor: usize,
    /// Every ready line seen, in order.
    readies: Vec<Ready>,
    stdout_closed: bool,
    stderr: String,
    stderr_dropped: usize,
    stderr_closed: bool,
    /// Pids that may still need to be killed and reaped: the first process and every pid named
    /// by a ready line. A pid leaves this set once its exit has been recorded.
    known: BTreeSet<Pid>,
    /// Exit statuses collected so far.
    exits: BTreeMap<Pid, Exit>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A reader thread never panics while holding the lock; if a test thread did, the
        // state is still consistent enough to dump and clean up.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A server under test: its process group, its output, and every generation it spawns.
///
/// Dropping it kills the whole process group with SIGKILL and reaps every process of it
/// (including generations reparented to the test process). If the test is panicking, the
/// captured stdout and stderr are printed first.
pub struct ServerProcess {
    name: String,
    pid: Pid,
    shared: Arc<Shared>,
}

impl ServerProcess {
    /// Spawns `cmd` with stdin from `/dev/null`, stdout and stderr piped, in a new process
    /// group. Panics with the command line if it cannot be spawned.
    pub fn spawn(cmd: Command) -> ServerProcess {
        let line = format!("{cmd:?}");
        Self::try_spawn(cmd).unwrap_or_else(|e| panic!("failed to spawn {line}: {e}"))
    }

    /// Spawns `target/<profile>/examples/<name>` with `args` (see [`super::example_path`]).
    pub fn example(name: &str, args: &[&str]) -> ServerProcess {
        let mut cmd = Command::new(super::example_path(name));
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Like [`ServerProcess::spawn`], returning the spawn error.
    pub fn try_spawn(mut cmd: Command) -> io::Result<ServerProcess> {
        become_subreaper();
        let name = Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "server".to_string());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        // The std `Child` is dropped without waiting: it neither kills nor reaps. Every wait
        // goes through `waitpid` on specific pids here.
        drop(child);

        let mut state = State::default();
        state.known.insert(pid);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        let echo = std::env::var_os(ECHO_ENV).is_some();
        spawn_reader(
            &name,
            "stdout",
            stdout,
            shared.clone(),
            echo,
            move |st, line| {
                if let Some(ready) = Ready::parse(&line) {
                    // Only a process of ours: a server in another pid namespace
                    // reports pids (1, say) that name other processes here.
                    if ready.pid.as_raw() > 1 && proc_stat(ready.pid).is_some_and(|p| p.pgrp == pid)
                    {
                        st.known.insert(ready.pid);
                    }
                    st.readies.push(ready);
                }
                st.stdout.push(line);
            },
        );
        spawn_reader(&name, "stderr", stderr, shared.clone(), echo, |st, line| {
            st.stderr.push_str(&line);
            st.stderr.push('\n');
            if st.stderr.len() > STDERR_CAP {
                let mut cut = st.stderr.len() - STDERR_CAP / 2;
                while !st.stderr.is_char_boundary(cut) {
                    cut += 1;
                }
                st.stderr.drain(..cut);
                st.stderr_dropped += cut;
            }
        });
        Ok(ServerProcess { name, pid, shared })
    }

    /// Pid of the first process (generation 1), also the process group id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The process group every generation runs in.
    pub fn pgid(&self) -> Pid {
        self.pid
    }

    /// Waits until a stdout line not yet consumed by an earlier `wait_line` satisfies `pred`;
    /// lines before it are consumed. The error says why (timeout, stdout closed) and carries
    /// the recent stdout and stderr.
    pub fn wait_line(
        &self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Deadline::after(timeout);
        let mut st = self.shared.lock();
        loop {
            while st.cursor < st.stdout.len() {
                let i = st.cursor;
                st.cursor += 1;
                if pred(&st.stdout[i]) {
                    return Ok(st.stdout[i].clone());
                }
            }
            if st.stdout_closed {
                return Err(format!(
                    "stdout of {} closed (every process holding it exited) after {:?}, before a \
                     matching line\n{}",
                    self.name,
                    deadline.elapsed(),
                    self.dump_locked(&st)
                ));
            }
            if deadline.expired() {
                return Err(format!(
                    "timed out after {:?} waiting for a matching stdout line from {}\n{}",
                    deadline.elapsed(),
                    self.name,
                    self.dump_locked(&st)
                ));
            }
            st = self.wait_change(st, &deadline);
        }
    }

    /// Waits (up to [`READY_TIMEOUT`]) for the ready line of `generation`; panics with the
    /// recent output otherwise.
    pub fn wait_ready(&self, generation: u64) -> Ready {
        self.try_wait_ready(generation, READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for the ready line of `generation`. Ready lines are recorded apart from the
    /// `wait_line` cursor: one printed earlier is found even if `wait_line` skipped it.
    pub fn try_wait_ready(&self, generation: u64, timeout: Duration) -> Result<Ready, String> {
        let deadline = Deadline::after(timeout);
        let mut st = self.shared.lock();
        loop {
            if let Some(r) = st.readies.iter().find(|r| r.generation == generation) {
                return Ok(r.clone());
            }
            if st.stdout_closed || deadline.expired() {
                let why = if st.stdout_closed {
                    "stdout closed (every process holding it exited)"
                } else {
                    "timed out"
                };
                return Err(format!(
                    "{why} after {:?} waiting for `ready ... generation={generation}` from {}; \
                     ready lines seen: {:?}\n{}",
                    deadline.elapsed(),
                    self.name,
                    st.readies,
                    self.dump_locked(&st)
                ));
            }
            st = self.wait_change(st, &deadline);
        }
    }

    /// Every ready line seen so far.
    pub fn readies(&self) -> Vec<Ready> {
        self.shared.lock().readies.clone()
    }

    /// The ready line with the highest generation seen so far: the generation serving now.
    pub fn latest_ready(&self) -> Option<Ready> {
        self.shared
            .lock()
            .readies
            .iter()
            .max_by_key(|r| r.generation)
            .cloned()
    }

    /// Sends `sig` to the latest ready generation (the first process if none is ready yet).
    pub fn signal_latest(&self, sig: Signal) -> Result<(), String> {
        let pid = self.latest_ready().map_or(self.pid, |r| r.pid);
        self.signal_pid(pid, sig)
    }

    /// Waits until stderr contains `needle`. Stdout and stderr are read by
    /// separate threads, so a line logged before a ready line may be seen
    /// after it: check stderr through this, not `stderr().contains`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        super::wait_until(
            format!("{needle:?} on stderr"),
            timeout,
            || self.stderr().contains(needle),
            || self.dump(),
        )
    }

    /// Every stdout line seen so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.shared.lock().stdout.clone()
    }

    /// The stderr captured so far (the most recent 2-4 MiB).
    pub fn stderr(&self) -> String {
        self.shared.lock().stderr.clone()
    }

    /// The recent stdout and stderr, formatted for a failure message.
    pub fn dump(&self) -> String {
        self.dump_locked(&self.shared.lock())
    }

    /// Sends `sig` to the first process.
    pub fn signal(&self, sig: Signal) -> Result<(), String> {
        self.signal_pid(self.pid, sig)
    }

    /// Sends `sig` to `pid` (any generation).
    pub fn signal_pid(&self, pid: Pid, sig: Signal) -> Result<(), String> {
        kill(pid, sig).map_err(|e| format!("kill({pid}, {sig}) failed: {e}"))
    }

    /// Sends `sig` to the whole process group.
    pub fn signal_group(&self, sig: Signal) -> Result<(), String> {
        killpg(self.pid, sig).map_err(|e| format!("killpg({}, {sig}) failed: {e}", self.pid))
    }

    /// Waits for `pid` (the first process, or a later generation) to exit, and reaps it if it
    /// is a child of the test process (the first process always is; a later generation is once
    /// its parent has exited, thanks to the subreaper). A process reaped by its own parent
    /// gives [`Exit::ReapedElsewhere`]. The status is remembered: asking again returns it.
    pub fn wait_exit(&self, pid: Pid, timeout: Duration) -> Result<Exit, String> {
        if let Some(exit) = self.shared.lock().exits.get(&pid) {
            return Ok(*exit);
        }
        let result = wait_for(format!("pid {pid} to exit"), timeout, || {
            match try_reap(pid) {
                Ok(Some(exit)) => Ok(exit),
                Ok(None) => Err(describe(pid)),
                // Not our child: either gone already, or its parent is still alive (it will be
                // reparented to us when that parent exits).
                Err(Errno::ECHILD) => match proc_stat(pid) {
                    None => Ok(Exit::ReapedElsewhere),
                    Some(_) => Err(describe(pid)),
                },
                Err(e) => Err(format!("waitpid({pid}) failed: {e}")),
            }
        });
        match result {
            Ok(exit) => {
                let mut st = self.shared.lock();
                st.exits.insert(pid, exit);
                st.known.remove(&pid);
                Ok(exit)
            }
            Err(e) => Err(format!("{e}\n{}", self.dump())),
        }
    }

    /// Exit statuses collected so far by `wait_exit` and by reaping.
    pub fn exits(&self) -> BTreeMap<Pid, Exit> {
        self.shared.lock().exits.clone()
    }

    /// Processes of this server (its process group, and any pid named by a ready line) that
    /// are zombies parented to the test process, i.e. exited and not reaped yet.
    pub fn zombies(&self) -> Vec<ProcStat> {
        let known = self.shared.lock().known.clone();
        zombies()
            .into_iter()
            .filter(|p| p.pgrp == self.pid || known.contains(&p.pid))
            .collect()
    }

    /// Live processes of the process group (zombies excluded).
    pub fn group_members(&self) -> Vec<ProcStat> {
        all_processes()
            .into_iter()
            .filter(|p| p.pgrp == self.pid && p.state != 'Z')
            .collect()
    }

    fn wait_change<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: &Deadline,
    ) -> MutexGuard<'a, State> {
        self.shared
            .changed
            .wait_timeout(st, deadline.remaining())
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn dump_locked(&self, st: &State) -> String {
        let mut out = String::new();
        let skip = st.stdout.len().saturating_sub(DUMP_LINES);
        out.push_str(&format!(
            "---- {} stdout ({} lines{}{}) ----\n",
            self.name,
            st.stdout.len(),
            if skip > 0 { ", last ones" } else { "" },
            if st.stdout_closed { ", closed" } else { "" }
        ));
        for line in &st.stdout[skip..] {
            out.push_str(line);
            out.push('\n');
        }
        let lines: Vec<&str> = st.stderr.lines().collect();
        let skip = lines.len().saturating_sub(DUMP_LINES);
        out.push_str(&format!(
            "---- {} stderr ({} lines kept{}{}) ----\n",
            self.name,
            lines.len(),
            if skip > 0 || st.stderr_dropped > 0 {
                ", last ones"
            } else {
                ""
            },
            if st.stderr_closed { ", closed" } else { "" }
        ));
        for line in &lines[skip..] {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!("---- end of {} output ----", self.name));
        out
    }

    /// SIGKILL to the group and to every known pid, then reap until nothing of ours is left.
    fn kill_and_reap(&self) -> Result<(), String> {
        let me = getpid();
        let deadline = Deadline::after(DROP_REAP_TIMEOUT);
        let _ = killpg(self.pid, Signal::SIGKILL);
        loop {
            let known = self.shared.lock().known.clone();
            let ours: Vec<ProcStat> = all_processes()
                .into_iter()
                .filter(|p| p.pgrp == self.pid || known.contains(&p.pid))
                .collect();
            let mut gone = known.clone();
            for p in &ours {
                gone.remove(&p.pid);
            }
            {
                let mut st = self.shared.lock();
                for pid in gone {
                    // Gone without us reaping it: reaped by its parent.
                    st.known.remove(&pid);
                    st.exits.entry(pid).or_insert(Exit::ReapedElsewhere);
                }
            }
            if ours.is_empty() {
                return Ok(());
            }
            for p in &ours {
                if p.state != 'Z' && p.pid.as_raw() > 1 {
                    // Also catches a process forked after the killpg, or one that left the group.
                    let _ = kill(p.pid, Signal::SIGKILL);
                }
                if p.ppid == me {
                    if let Ok(Some(exit)) = try_reap(p.pid) {
                        let mut st = self.shared.lock();
                        st.known.remove(&p.pid);
                        st.exits.insert(p.pid, exit);
                    }
                }
            }
            if deadline.expired() {
                return Err(format!(
                    "after {:?}, processes of {} (pgid {}) are still there: {ours:?}",
                    deadline.elapsed(),
                    self.name,
                    self.pid
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
        if let Err(e) = self.kill_and_reap() {
            eprintln!("warning: {e}");
        }
    }
}

/// A one-line description of `pid` for timeout messages.
fn describe(pid: Pid) -> String {
    match proc_stat(pid) {
        None => format!("pid {pid} does not exist"),
        Some(p) => format!(
            "pid {pid} ({}) in state {} with parent {} (test process is {})",
            p.comm,
            p.state,
            p.ppid,
            getpid()
        ),
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    name: &str,
    stream: &'static str,
    pipe: R,
    shared: Arc<Shared>,
    echo: bool,
    on_line: impl Fn(&mut State, String) + Send + 'static,
) {
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("{name}-{stream}"))
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if echo {
                            eprintln!("[{name} {stream}] {line}");
                        }
                        on_line(&mut shared.lock(), line);
                        shared.changed.notify_all();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        on_line(&mut shared.lock(), format!("<error reading {stream}: {e}>"));
                        break;
                    }
                }
            }
            let mut st = shared.lock();
            if stream == "stdout" {
                st.stdout_closed = true;
            } else {
                st.stderr_closed = true;
            }
            drop(st);
            shared.changed.notify_all();
        })
        .expect("spawn output reader thread");
}
