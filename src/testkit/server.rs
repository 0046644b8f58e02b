//! A server under test as a process group: spawn it, read its ready lines, signal it, wait for
//! each generation to exit, and kill and reap everything on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

use super::wait::{poll_until, Deadline, Poll};
use super::Error;

/// How long `Drop` keeps killing and reaping before it gives up with a warning on stderr.
const DROP_REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of stderr kept by default; older output is dropped first.
const STDERR_CAP: usize = 1 << 20;
/// Lines of stdout and stderr shown in error messages by default.
const DUMP_LINES: usize = 40;

/// How [`Server::spawn_with`] handles the output of the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SpawnOptions {
    /// Copy every line of stdout and stderr to this process's stderr as it arrives, prefixed
    /// with `[<name> stdout]` or `[<name> stderr]`. Default: off.
    pub echo: bool,
    /// Bytes of stderr kept; once exceeded, the older half is dropped. Default: 1 MiB.
    pub stderr_cap: usize,
    /// Lines of stdout and of stderr shown by [`Server::dump`] and in error details.
    /// Default: 40.
    pub dump_lines: usize,
}

impl Default for SpawnOptions {
    fn default() -> SpawnOptions {
        SpawnOptions {
            echo: false,
            stderr_cap: STDERR_CAP,
            dump_lines: DUMP_LINES,
        }
    }
}

impl SpawnOptions {
    /// Sets [`SpawnOptions::echo`].
    pub fn echo(mut self, echo: bool) -> SpawnOptions {
        self.echo = echo;
        self
    }

    /// Sets [`SpawnOptions::stderr_cap`].
    pub fn stderr_cap(mut self, bytes: usize) -> SpawnOptions {
        self.stderr_cap = bytes;
        self
    }

    /// Sets [`SpawnOptions::dump_lines`].
    pub fn dump_lines(mut self, lines: usize) -> SpawnOptions {
        self.dump_lines = lines;
        self
    }
}

/// A parsed ready line: `ready pid=<pid> generation=<n>`, optionally followed by
/// `addr=<ip:port>` and other `key=value` tokens, which are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ready {
    /// Pid of the generation that became ready.
    pub pid: i32,
    /// Its generation number (the first process is generation 1).
    pub generation: u64,
    /// The address it serves on, if the line says.
    pub addr: Option<SocketAddr>,
    /// When the line was read.
    pub at: Instant,
}

impl Ready {
    /// Parses a ready line; `None` if `line` is not one.
    pub fn parse(line: &str) -> Option<Ready> {
        let mut tokens = line.split_whitespace();
        if tokens.next()? != "ready" {
            return None;
        }
        let (mut pid, mut generation, mut addr) = (None, None, None);
        for token in tokens {
            match token.split_once('=') {
                Some(("pid", v)) => pid = Some(v.parse().ok()?),
                Some(("generation", v)) => generation = Some(v.parse().ok()?),
                Some(("addr", v)) => addr = Some(v.parse().ok()?),
                _ => {}
            }
        }
        Some(Ready {
            pid: pid?,
            generation: generation?,
            addr,
            at: Instant::now(),
        })
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(Signal),
    /// Gone, but reaped by a process other than this one (its parent was still alive), so the
    /// status is unknown.
    ReapedElsewhere,
}

impl Exit {
    /// Whether this is `Exit::Code(0)`.
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(sig) => write!(f, "killed by {sig}"),
            Exit::ReapedElsewhere => f.write_str("reaped by another process (status unknown)"),
        }
    }
}

/// The fields of `/proc/<pid>/stat` the kit uses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcStat {
    /// The process.
    pub pid: i32,
    /// Its name (`comm`).
    pub comm: String,
    /// Its state letter: `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// Its parent.
    pub ppid: i32,
    /// Its process group.
    pub pgrp: i32,
    /// CPU time in user mode, in clock ticks.
    pub utime: u64,
    /// CPU time in kernel mode, in clock ticks.
    pub stime: u64,
    /// When it started, in clock ticks since boot.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist (any more).
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // "pid (comm) S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    // stime cutime cstime priority nice threads itrealvalue starttime ..."; comm may hold
    // spaces and parentheses: split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        utime: rest.get(11)?.parse().ok()?,
        stime: rest.get(12)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
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
        proc_stat(pid)
    })
    .collect()
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|p| p.state != 'Z')
}

/// Children of `pid` (any state, zombies included).
pub fn children_of(pid: i32) -> Vec<ProcStat> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .collect()
}

/// Zombie children of this process: exited, and not reaped yet.
pub fn zombies() -> Vec<ProcStat> {
    let me = getpid().as_raw();
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == me && p.state == 'Z')
        .collect()
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
///
/// # Errors
/// [`Error::Io`] if `/proc/<pid>/fd` cannot be read (no such process, no permission).
pub fn fd_count(pid: i32) -> Result<usize, Error> {
    let dir = format!("/proc/{pid}/fd");
    match std::fs::read_dir(&dir) {
        Ok(entries) => Ok(entries.count()),
        Err(e) => Err(Error::io(format!("reading {dir}"), e)),
    }
}

/// The open file descriptors of `pid` and what they point to (`socket:[123]`, `pipe:[45]`, a
/// path), sorted by number: for messages about leaked fds. A link that cannot be read shows
/// as `<error>`.
///
/// # Errors
/// [`Error::Io`] if `/proc/<pid>/fd` cannot be read (no such process, no permission).
pub fn fd_targets(pid: i32) -> Result<Vec<(i32, String)>, Error> {
    let dir = format!("/proc/{pid}/fd");
    let err = |e| Error::io(format!("reading {dir}"), e);
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(err)? {
        let entry = entry.map_err(err)?;
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

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`, ...).
pub fn status_kb(pid: i32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`, once per process), so that
/// descendants orphaned by the exit of their parent (a previous generation) are reparented to
/// it instead of to init, and can be reaped here. [`Server::spawn`] calls it.
///
/// # Errors
/// [`Error::Io`] if `prctl` fails (the same error on every later call).
pub fn become_subreaper() -> Result<(), Error> {
    static DONE: OnceLock<Result<(), Errno>> = OnceLock::new();
    match DONE.get_or_init(|| nix::sys::prctl::set_child_subreaper(true)) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            io::Error::from_raw_os_error(*e as i32),
        )),
    }
}

/// Polls `waitpid(pid, WNOHANG)` once. `Ok(None)`: still running, or not (yet) our child.
fn try_reap(pid: i32) -> Result<Option<Exit>, Errno> {
    match waitpid(
        Pid::from_raw(pid),
        Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
    ) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(Exit::Code(code))),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(Exit::Signal(sig))),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Default)]
struct State {
    stdout: Vec<String>,
    /// Index of the first stdout line [`Server::wait_line`] has not consumed yet.
    cursor: usize,
    readies: Vec<Ready>,
    stdout_closed: bool,
    stderr: String,
    stderr_lines: Vec<(Instant, String)>,
    /// Bytes of stderr dropped to stay under the cap.
    stderr_dropped: usize,
    stderr_closed: bool,
    /// Pids that may still need to be killed and reaped: the first process and every pid
    /// named by a ready line. A pid leaves this set once its exit has been recorded.
    known: BTreeSet<i32>,
    exits: BTreeMap<i32, Exit>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A server under test: its process group, its output, and every generation it spawns.
///
/// [`Server::spawn`] starts the command in a new process group with stdin from `/dev/null`
/// and stdout and stderr captured. Lines of the form `ready pid=<pid> generation=<n>
/// [addr=<ip:port>]` on stdout are ready lines ([`Ready`]).
///
/// Dropping it kills the whole process group with SIGKILL and reaps every process of it,
/// including generations reparented to this process.
///
/// # Caveats
/// The calling process becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`, process-wide and
/// permanent), so that a generation orphaned by the exit of the previous one is reparented to
/// it and reaped here rather than by init. Only specific pids are ever waited for (never
/// `waitpid(-1)`), so other children of the process keep their exit statuses.
///
/// The command inherits the signal mask of the calling thread (std's `Command` does not reset
/// it): a server started from a thread that blocks SIGTERM or SIGHUP never sees them.
pub struct Server {
    name: String,
    pid: i32,
    dump_lines: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Spawns `cmd` in a new process group, its output captured.
    ///
    /// # Errors
    /// [`Error::Spawn`] if it cannot be started, [`Error::Io`] if this process cannot become a
    /// child subreaper or cannot start the threads that read the output.
    pub fn spawn(cmd: Command) -> Result<Server, Error> {
        Server::spawn_with(cmd, SpawnOptions::default())
    }

    /// Like [`Server::spawn`], with `options` for the handling of the output.
    ///
    /// # Errors
    /// As [`Server::spawn`].
    pub fn spawn_with(mut cmd: Command, options: SpawnOptions) -> Result<Server, Error> {
        become_subreaper()?;
        let name = Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "server".to_string());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // The std `Child` is dropped without waiting: it neither kills nor reaps. Every wait
        // goes through `waitpid` on specific pids here.
        drop(child);

        let mut state = State::default();
        state.known.insert(pid);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        let server = Server {
            name,
            pid,
            dump_lines: options.dump_lines,
            shared,
        };
        // From here on, an error drops `server`, which kills and reaps the process.
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            return Err(Error::io(
                "capturing the output",
                io::Error::other("stdout or stderr was not piped"),
            ));
        };
        let (group, echo, cap) = (pid, options.echo, options.stderr_cap);
        server.spawn_reader("stdout", stdout, echo, move |st, line| {
            if let Some(ready) = Ready::parse(&line) {
                // Only a process of ours: a server in another pid namespace reports pids
                // that name other processes here.
                if ready.pid > 1 && proc_stat(ready.pid).is_some_and(|p| p.pgrp == group) {
                    st.known.insert(ready.pid);
                }
                st.readies.push(ready);
            }
            st.stdout.push(line);
        })?;
        server.spawn_reader("stderr", stderr, echo, move |st, line| {
            st.stderr.push_str(&line);
            st.stderr.push('\n');
            st.stderr_lines.push((Instant::now(), line));
            if st.stderr.len() > cap {
                let mut cut = st.stderr.len() - cap / 2;
                while !st.stderr.is_char_boundary(cut) {
                    cut += 1;
                }
                st.stderr.drain(..cut);
                st.stderr_dropped += cut;
                let keep = st.stderr_lines.len() / 2;
                st.stderr_lines.drain(..keep);
            }
        })?;
        Ok(server)
    }

    fn spawn_reader<R: Read + Send + 'static>(
        &self,
        stream: &'static str,
        pipe: R,
        echo: bool,
        on_line: impl Fn(&mut State, String) + Send + 'static,
    ) -> Result<(), Error> {
        let shared = self.shared.clone();
        let name = self.name.clone();
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
                                // Mirroring the server's output is what the
                                // caller asked for with `echo`: it goes where
                                // a test's own output goes, not to tracing.
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
            .map(|_| ())
            .map_err(|e| Error::io(format!("spawning the {stream} reader thread"), e))
    }

    /// Pid of the process started (generation 1, or a supervisor); also the process group.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits until a stdout line not yet consumed by an earlier `wait_line` satisfies `pred`,
    /// and returns it; the lines before it are consumed too. Ready lines are recorded apart
    /// from this cursor: [`Server::wait_ready`] finds one even if `wait_line` skipped it.
    ///
    /// # Errors
    /// [`Error::Wait`] at the timeout, or at once when stdout closes first; the detail holds
    /// the recent output.
    pub fn wait_line(
        &self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, Error> {
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
            if st.stdout_closed || deadline.expired() {
                return Err(self.wait_error(
                    format!("a matching stdout line from {}", self.name),
                    &deadline,
                    &st,
                ));
            }
            st = self.wait_change(st, &deadline);
        }
    }

    /// Waits for the ready line of `generation`.
    ///
    /// # Errors
    /// [`Error::Wait`] at the timeout, or at once when stdout closes first; the detail holds
    /// the recent output.
    pub fn wait_ready(&self, generation: u64, timeout: Duration) -> Result<Ready, Error> {
        self.wait_state(
            format!("`ready ... generation={generation}` from {}", self.name),
            timeout,
            |st| {
                st.readies
                    .iter()
                    .find(|r| r.generation == generation)
                    .cloned()
            },
        )
    }

    /// Waits for a ready line of a generation above `generation`, and returns the first one.
    ///
    /// # Errors
    /// As [`Server::wait_ready`].
    pub fn wait_ready_after(&self, generation: u64, timeout: Duration) -> Result<Ready, Error> {
        self.wait_state(
            format!("a ready line of a generation after {generation}"),
            timeout,
            |st| {
                st.readies
                    .iter()
                    .find(|r| r.generation > generation)
                    .cloned()
            },
        )
    }

    /// Waits for a stdout line satisfying `pred` (among all lines so far), and returns it.
    ///
    /// # Errors
    /// As [`Server::wait_ready`].
    pub fn wait_stdout(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, Error> {
        self.wait_state("a matching line on stdout".to_string(), timeout, |st| {
            st.stdout.iter().find(|l| pred(l)).cloned()
        })
    }

    /// Waits until `times` stderr lines (of those kept) contain `needle`, and returns when the
    /// last of them was read.
    ///
    /// # Errors
    /// [`Error::Wait`] at the timeout; the detail holds the recent output.
    pub fn wait_stderr(
        &self,
        needle: &str,
        times: usize,
        timeout: Duration,
    ) -> Result<Instant, Error> {
        let deadline = Deadline::after(timeout);
        let mut st = self.shared.lock();
        loop {
            let hits: Vec<Instant> = st
                .stderr_lines
                .iter()
                .filter(|(_, l)| l.contains(needle))
                .map(|(at, _)| *at)
                .collect();
            if hits.len() >= times {
                if let Some(at) = hits.get(times.saturating_sub(1)) {
                    return Ok(*at);
                }
            }
            if deadline.expired() || (st.stderr_closed && hits.len() < times) {
                return Err(Error::Wait {
                    what: format!("{times} stderr lines containing {needle:?}"),
                    waited: deadline.elapsed(),
                    timed_out: !st.stderr_closed,
                    detail: format!("{} seen\n{}", hits.len(), self.dump_locked(&st)),
                });
            }
            st = self.wait_change(st, &deadline);
        }
    }

    fn wait_state<T>(
        &self,
        what: String,
        timeout: Duration,
        find: impl Fn(&State) -> Option<T>,
    ) -> Result<T, Error> {
        let deadline = Deadline::after(timeout);
        let mut st = self.shared.lock();
        loop {
            if let Some(found) = find(&st) {
                return Ok(found);
            }
            if st.stdout_closed || deadline.expired() {
                return Err(self.wait_error(what, &deadline, &st));
            }
            st = self.wait_change(st, &deadline);
        }
    }

    /// The error of a wait on stdout that ended without a match: stdout closed, or the
    /// deadline passed. The detail holds the ready lines seen and the recent output.
    fn wait_error(&self, what: String, deadline: &Deadline, st: &State) -> Error {
        let readies: Vec<(i32, u64)> = st.readies.iter().map(|r| (r.pid, r.generation)).collect();
        let seen = format!("ready lines seen (pid, generation): {readies:?}");
        Error::Wait {
            what,
            waited: deadline.elapsed(),
            timed_out: !st.stdout_closed,
            detail: if st.stdout_closed {
                format!(
                    "stdout closed (every process holding it exited); {seen}\n{}",
                    self.dump_locked(st)
                )
            } else {
                format!("{seen}\n{}", self.dump_locked(st))
            },
        }
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

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.shared.lock().stdout.clone()
    }

    /// The stderr kept so far (the most recent 0.5-1 MiB).
    pub fn stderr(&self) -> String {
        self.shared.lock().stderr.clone()
    }

    /// The last lines of stdout and stderr, for an error message.
    pub fn dump(&self) -> String {
        self.dump_locked(&self.shared.lock())
    }

    fn dump_locked(&self, st: &State) -> String {
        let mut out = String::new();
        let skip = st.stdout.len().saturating_sub(self.dump_lines);
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
        let skip = lines.len().saturating_sub(self.dump_lines);
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

    /// Sends `signal` (e.g. `Signal::SIGHUP`) to `pid`.
    ///
    /// # Errors
    /// [`Error::Signal`] if `kill(2)` fails.
    pub fn signal(&self, pid: i32, signal: Signal) -> Result<(), Error> {
        let err = |e: Errno| Error::Signal {
            pid,
            signal,
            source: io::Error::from_raw_os_error(e as i32),
        };
        kill(Pid::from_raw(pid), signal).map_err(err)
    }

    /// Sends `signal` to the latest ready generation ([`Server::latest_ready`]), or to the
    /// first process if none is ready yet.
    ///
    /// # Errors
    /// As [`Server::signal`].
    pub fn signal_latest(&self, signal: Signal) -> Result<(), Error> {
        let pid = self.latest_ready().map_or(self.pid, |r| r.pid);
        self.signal(pid, signal)
    }

    /// Sends `signal` to the whole process group.
    ///
    /// # Errors
    /// [`Error::Signal`] (with the group id as `pid`) if the number is not a signal or
    /// `killpg(2)` fails.
    pub fn signal_group(&self, signal: Signal) -> Result<(), Error> {
        let err = |e: Errno| Error::Signal {
            pid: self.pid,
            signal,
            source: io::Error::from_raw_os_error(e as i32),
        };
        killpg(Pid::from_raw(self.pid), signal).map_err(err)
    }

    /// Waits for `pid` (the first process or a later generation) to exit, and reaps it if it
    /// is a child of this process. A process reaped by its own parent gives
    /// [`Exit::ReapedElsewhere`]. The status is remembered: asking again returns it. A
    /// zombie whose parent is still alive counts as exited.
    ///
    /// # Errors
    /// [`Error::Wait`] at the timeout, [`Error::Io`] if `waitpid` fails oddly.
    pub fn wait_exit(&self, pid: i32, timeout: Duration) -> Result<Exit, Error> {
        self.wait_exit_inner(pid, timeout, true)
    }

    /// Like [`Server::wait_exit`], except that a zombie whose parent is still alive is waited
    /// for until it is reaped: by its parent ([`Exit::ReapedElsewhere`]), or by this process
    /// once the parent has exited and it was reparented here (its real status).
    ///
    /// # Errors
    /// As [`Server::wait_exit`].
    pub fn wait_reaped(&self, pid: i32, timeout: Duration) -> Result<Exit, Error> {
        self.wait_exit_inner(pid, timeout, false)
    }

    fn wait_exit_inner(
        &self,
        pid: i32,
        timeout: Duration,
        zombie_is_exit: bool,
    ) -> Result<Exit, Error> {
        if let Some(exit) = self.shared.lock().exits.get(&pid) {
            return Ok(*exit);
        }
        let mut fatal = None;
        let result = poll_until(format!("pid {pid} to exit"), timeout, || {
            match try_reap(pid) {
                Ok(Some(exit)) => Poll::Ready(exit),
                Ok(None) => Poll::Pending(describe(pid)),
                // Not our child: gone already, a zombie of a living parent, or alive.
                Err(Errno::ECHILD) => match proc_stat(pid) {
                    None => Poll::Ready(Exit::ReapedElsewhere),
                    Some(p) if zombie_is_exit && p.state == 'Z' => {
                        Poll::Ready(Exit::ReapedElsewhere)
                    }
                    Some(_) => Poll::Pending(describe(pid)),
                },
                Err(e) => {
                    fatal = Some(e);
                    Poll::Failed(format!("waitpid({pid}) failed: {e}"))
                }
            }
        });
        match result {
            Ok(exit) => {
                let mut st = self.shared.lock();
                st.exits.insert(pid, exit);
                st.known.remove(&pid);
                Ok(exit)
            }
            Err(e) => match fatal {
                Some(errno) => Err(Error::io(
                    format!("waitpid({pid})"),
                    io::Error::from_raw_os_error(errno as i32),
                )),
                None => Err(e.with_detail(&self.dump())),
            },
        }
    }

    /// Exit statuses collected so far.
    pub fn exits(&self) -> BTreeMap<i32, Exit> {
        self.shared.lock().exits.clone()
    }

    /// Processes of this server (of its process group, or named by a ready line) that are
    /// zombies parented to this process: exited, and not reaped yet.
    pub fn zombies(&self) -> Vec<ProcStat> {
        let known = self.shared.lock().known.clone();
        zombies()
            .into_iter()
            .filter(|p| p.pgrp == self.pid || known.contains(&p.pid))
            .collect()
    }

    /// Live processes of the process group (zombies excluded), oldest first.
    pub fn members(&self) -> Vec<ProcStat> {
        let mut members: Vec<ProcStat> = all_processes()
            .into_iter()
            .filter(|p| p.pgrp == self.pid && p.state != 'Z')
            .collect();
        members.sort_by_key(|p| (p.start_time, p.pid));
        members
    }

    /// Stops everything: `signal` (a stop signal such as `Signal::SIGTERM`) to every live
    /// process of the group, a wait of up to `grace` for them to exit, then SIGKILL and
    /// reaping. Returns the exit of the first process.
    ///
    /// # Errors
    /// [`Error::Wait`] if processes are left after the SIGKILL too.
    pub fn stop(&self, signal: Signal, grace: Duration) -> Result<Exit, Error> {
        let _ = killpg(Pid::from_raw(self.pid), signal);
        let _ = poll_until("the process group to exit", grace, || {
            self.reap_ours();
            let members = self.members();
            if members.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{members:?}"))
            }
        });
        self.kill_and_reap()?;
        Ok(self
            .shared
            .lock()
            .exits
            .get(&self.pid)
            .copied()
            .unwrap_or(Exit::ReapedElsewhere))
    }

    /// Reaps every exited process of ours (of the group, or named by a ready line) whose
    /// parent is this process.
    fn reap_ours(&self) {
        let me = getpid().as_raw();
        let known = self.shared.lock().known.clone();
        for p in all_processes() {
            if p.ppid == me && (p.pgrp == self.pid || known.contains(&p.pid)) && p.state == 'Z' {
                if let Ok(Some(exit)) = try_reap(p.pid) {
                    let mut st = self.shared.lock();
                    st.known.remove(&p.pid);
                    st.exits.insert(p.pid, exit);
                }
            }
        }
    }

    /// SIGKILL to the group and to every known pid, then reap until nothing of ours is left.
    fn kill_and_reap(&self) -> Result<(), Error> {
        let me = getpid().as_raw();
        let deadline = Deadline::after(DROP_REAP_TIMEOUT);
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        loop {
            let known = self.shared.lock().known.clone();
            let ours: Vec<ProcStat> = all_processes()
                .into_iter()
                .filter(|p| p.pgrp == self.pid || known.contains(&p.pid))
                .collect();
            {
                let mut st = self.shared.lock();
                for pid in known {
                    if !ours.iter().any(|p| p.pid == pid) {
                        // Gone without us reaping it: reaped by its parent.
                        st.known.remove(&pid);
                        st.exits.entry(pid).or_insert(Exit::ReapedElsewhere);
                    }
                }
            }
            if ours.is_empty() {
                return Ok(());
            }
            for p in &ours {
                if p.state != 'Z' && p.pid > 1 {
                    // Also catches a process forked after the killpg, or one that left the group.
                    let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
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
                return Err(Error::Wait {
                    what: format!("the processes of {} to be killed and reaped", self.name),
                    waited: deadline.elapsed(),
                    timed_out: true,
                    detail: format!("still there: {ours:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_reap() {
            tracing::warn!(error = %e, "test kit: cannot kill and reap the server's processes");
        }
    }
}

/// A one-line description of `pid` for timeout messages.
fn describe(pid: i32) -> String {
    match proc_stat(pid) {
        None => format!("pid {pid} does not exist"),
        Some(p) => format!(
            "pid {pid} ({}) in state {} with parent {} (this process is {})",
            p.comm,
            p.state,
            p.ppid,
            getpid()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let r = Ready::parse("ready pid=42 generation=3 addr=127.0.0.1:8080").expect("parses");
        assert_eq!((r.pid, r.generation), (42, 3));
        assert_eq!(r.addr, Some("127.0.0.1:8080".parse().expect("addr")));
        let r = Ready::parse("ready pid=42 generation=3 version=2").expect("parses");
        assert_eq!(r.addr, None);
        assert!(Ready::parse("ready pid=42").is_none());
        assert!(Ready::parse("not ready pid=1 generation=1").is_none());
        assert!(Ready::parse("ready pid=x generation=1").is_none());
    }

    #[test]
    fn stat_parses_odd_names() {
        let line = "77 (a (b) c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 0 0";
        let p = parse_stat(line).expect("parses");
        assert_eq!((p.pid, p.comm.as_str(), p.state), (77, "a (b) c", 'S'));
        assert_eq!((p.ppid, p.pgrp, p.start_time), (1, 77, 12345));
        assert_eq!((p.utime, p.stime), (1, 2));
    }
}
