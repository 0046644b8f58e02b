//! A server under test as a process group: the library's [`handover::testkit::Server`], with
//! the types the tests use (`Pid`, `Signal`, a ready line that always has an address) and
//! waits that return the error as a `String` (the tests match on its text) or panic with it.
//!
//! The test process makes itself a child subreaper, so a generation orphaned by the exit of its
//! parent (the previous generation) is reparented to the test process and can be waited for
//! here. Only specific pids are ever waited for (never `waitpid(-1)`), so tests running in
//! parallel in one binary do not steal each other's exit statuses.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use handover::testkit::{self, Server, SpawnOptions};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Default budget for a generation to print its ready line (debug builds, loaded machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default budget for a process to exit after it was asked to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
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
    /// Parses a ready line; `None` if `line` is not one, or has no address (unknown keys are
    /// ignored).
    pub fn parse(line: &str) -> Option<Ready> {
        Ready::from_testkit(&testkit::Ready::parse(line)?)
    }

    fn from_testkit(r: &testkit::Ready) -> Option<Ready> {
        Some(Ready {
            pid: Pid::from_raw(r.pid),
            generation: r.generation,
            addr: r.addr?,
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

impl From<testkit::Exit> for Exit {
    fn from(exit: testkit::Exit) -> Exit {
        match exit {
            testkit::Exit::Code(c) => Exit::Code(c),
            testkit::Exit::Signal(sig) => Exit::Signal(sig),
            testkit::Exit::ReapedElsewhere => Exit::ReapedElsewhere,
            other => panic!("an exit the harness does not know: {other}"),
        }
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

/// One line of `/proc/<pid>/stat`, the fields the tests use.
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

impl From<testkit::ProcStat> for ProcStat {
    fn from(p: testkit::ProcStat) -> ProcStat {
        ProcStat {
            pid: Pid::from_raw(p.pid),
            comm: p.comm,
            state: p.state,
            ppid: Pid::from_raw(p.ppid),
            pgrp: Pid::from_raw(p.pgrp),
        }
    }
}

fn procs(list: Vec<testkit::ProcStat>) -> Vec<ProcStat> {
    list.into_iter().map(ProcStat::from).collect()
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist (any more).
pub fn proc_stat(pid: Pid) -> Option<ProcStat> {
    testkit::proc_stat(pid.as_raw()).map(ProcStat::from)
}

/// Every process visible in `/proc`.
pub fn all_processes() -> Vec<ProcStat> {
    procs(testkit::all_processes())
}

/// Children of `pid` (any state, zombies included).
pub fn children_of(pid: Pid) -> Vec<ProcStat> {
    procs(testkit::children_of(pid.as_raw()))
}

/// Zombie children of the test process.
pub fn zombies() -> Vec<ProcStat> {
    procs(testkit::zombies())
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: Pid) -> bool {
    testkit::is_alive(pid.as_raw())
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: Pid) -> Result<usize, testkit::Error> {
    testkit::fd_count(pid.as_raw())
}

/// The open file descriptors of `pid` and what they point to (`socket:[123]`, `pipe:[45]`, a
/// path), sorted by number: for failure messages about leaked fds.
pub fn fd_targets(pid: Pid) -> Result<Vec<(i32, String)>, testkit::Error> {
    testkit::fd_targets(pid.as_raw())
}

/// Makes the test process a child subreaper (once per process), so that descendants orphaned
/// by their parent are reparented to it instead of to init. Panics if `prctl` fails.
pub fn become_subreaper() {
    if let Err(e) = testkit::become_subreaper() {
        panic!("{e}");
    }
}

/// A server under test: its process group, its output, and every generation it spawns.
///
/// Dropping it kills the whole process group with SIGKILL and reaps every process of it
/// (including generations reparented to the test process). If the test is panicking, the
/// captured stdout and stderr are printed first.
pub struct ServerProcess(Server);

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
    pub fn try_spawn(cmd: Command) -> io::Result<ServerProcess> {
        let options = SpawnOptions::default()
            .echo(std::env::var_os(ECHO_ENV).is_some())
            .stderr_cap(STDERR_CAP)
            .dump_lines(DUMP_LINES);
        match Server::spawn_with(cmd, options) {
            Ok(server) => Ok(ServerProcess(server)),
            Err(testkit::Error::Spawn { source, .. }) => Err(source),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// Pid of the first process (generation 1), also the process group id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.0.pid())
    }

    /// The process group every generation runs in.
    pub fn pgid(&self) -> Pid {
        self.pid()
    }

    /// Waits until a stdout line not yet consumed by an earlier `wait_line` satisfies `pred`;
    /// lines before it are consumed. The error says why (timeout, stdout closed) and carries
    /// the recent stdout and stderr.
    pub fn wait_line(
        &self,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        self.0.wait_line(pred, timeout).map_err(|e| e.to_string())
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
        let ready = self
            .0
            .wait_ready(generation, timeout)
            .map_err(|e| e.to_string())?;
        Ready::from_testkit(&ready).ok_or_else(|| {
            format!(
                "the ready line of generation {generation} has no addr=\n{}",
                self.dump()
            )
        })
    }

    /// Every ready line seen so far.
    pub fn readies(&self) -> Vec<Ready> {
        self.0
            .readies()
            .iter()
            .filter_map(Ready::from_testkit)
            .collect()
    }

    /// The ready line with the highest generation seen so far: the generation serving now.
    pub fn latest_ready(&self) -> Option<Ready> {
        self.readies().into_iter().max_by_key(|r| r.generation)
    }

    /// Sends `sig` to the latest ready generation (the first process if none is ready yet).
    pub fn signal_latest(&self, sig: Signal) -> Result<(), String> {
        self.0.signal_latest(sig).map_err(|e| e.to_string())
    }

    /// Waits until stderr contains `needle`. Stdout and stderr are read by
    /// separate threads, so a line logged before a ready line may be seen
    /// after it: check stderr through this, not `stderr().contains`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.0
            .wait_stderr(needle, 1, timeout)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Every stdout line seen so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.0.stdout_lines()
    }

    /// The stderr captured so far (the most recent 2-4 MiB).
    pub fn stderr(&self) -> String {
        self.0.stderr()
    }

    /// The recent stdout and stderr, formatted for a failure message.
    pub fn dump(&self) -> String {
        self.0.dump()
    }

    /// Sends `sig` to the first process.
    pub fn signal(&self, sig: Signal) -> Result<(), String> {
        self.signal_pid(self.pid(), sig)
    }

    /// Sends `sig` to `pid` (any generation).
    pub fn signal_pid(&self, pid: Pid, sig: Signal) -> Result<(), String> {
        self.0.signal(pid.as_raw(), sig).map_err(|e| e.to_string())
    }

    /// Sends `sig` to the whole process group.
    pub fn signal_group(&self, sig: Signal) -> Result<(), String> {
        self.0.signal_group(sig).map_err(|e| e.to_string())
    }

    /// Waits for `pid` (the first process, or a later generation) to exit, and reaps it if it
    /// is a child of the test process (the first process always is; a later generation is once
    /// its parent has exited, thanks to the subreaper). A process reaped by its own parent
    /// gives [`Exit::ReapedElsewhere`]. The status is remembered: asking again returns it.
    pub fn wait_exit(&self, pid: Pid, timeout: Duration) -> Result<Exit, String> {
        self.0
            .wait_reaped(pid.as_raw(), timeout)
            .map(Exit::from)
            .map_err(|e| e.to_string())
    }

    /// Exit statuses collected so far by `wait_exit` and by reaping.
    pub fn exits(&self) -> BTreeMap<Pid, Exit> {
        self.0
            .exits()
            .into_iter()
            .map(|(pid, exit)| (Pid::from_raw(pid), Exit::from(exit)))
            .collect()
    }

    /// Processes of this server (its process group, and any pid named by a ready line) that
    /// are zombies parented to the test process, i.e. exited and not reaped yet.
    pub fn zombies(&self) -> Vec<ProcStat> {
        procs(self.0.zombies())
    }

    /// Live processes of the process group (zombies excluded), oldest first.
    pub fn group_members(&self) -> Vec<ProcStat> {
        procs(self.0.members())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
        // Dropping the `Server` then kills and reaps the whole group.
    }
}
