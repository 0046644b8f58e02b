//! Starting processes: a generation of the app (with the sockets, by the
//! protocol, and its control channel) and the commands of `--ready exec:CMD`
//! and `--health exec:CMD`. All go through `sys::spawn`, which puts the
//! passed fds at 3.., fills `LISTEN_PID` with the child's own pid after the
//! fork, and resets the signal mask and dispositions in the child.
//!
//! Each start from disk also opens the program it runs (`O_PATH`, following
//! a `current` symlink to its target) and returns it as a [`Release`], so
//! that the supervisor can start that very file again after a deploy has
//! replaced it: [`Spawner::app`] with `release` execs `/proc/self/fd/K`,
//! where fd K of the child is the kept file (passed, not close-on-exec, so
//! that the interpreter of a `#!` script can open it too).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::protocol::{self, Handoff};
use crate::sys::{self, Exec};

/// Everything needed to start processes, fixed at start-up.
pub(crate) struct Spawner {
    /// The command and its arguments, as given.
    pub(crate) command: Vec<OsString>,
    /// The supervisor's environment without the protocol variables.
    pub(crate) env: Vec<(OsString, OsString)>,
    /// The supervisor's pid, for `HANDOVER_SUPERVISOR`.
    pub(crate) supervisor_pid: i32,
    /// `--watchdog`, passed as `WATCHDOG_USEC`.
    pub(crate) watchdog: Option<std::time::Duration>,
}

/// An executable a generation was started from, kept open so that it can be
/// started again after the file on disk was replaced.
#[derive(Debug)]
pub(crate) struct Release {
    /// `O_PATH`, close-on-exec.
    fd: OwnedFd,
    /// The file it was opened as, symlinks resolved (for messages).
    pub(crate) path: PathBuf,
    /// Device and inode: the same file is the same release.
    pub(crate) id: (u64, u64),
}

impl Release {
    /// Opens `path` (following symlinks) without reading it.
    fn open(path: &std::path::Path) -> io::Result<Release> {
        let fd: OwnedFd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Release {
            fd,
            path: resolved,
            id: (meta.dev(), meta.ino()),
        })
    }
}

/// Variables of the supervisor's environment a generation does not inherit:
/// a watchdog of the supervisor's own (systemd's) is not the app's.
const NOT_INHERITED: [&str; 2] = ["WATCHDOG_USEC", "WATCHDOG_PID"];

/// The index of a worker (`--workers`), 0 to N-1, in its environment.
pub(crate) const WORKER: &str = "HANDOVER_WORKER";

/// The command line, for messages.
pub(crate) fn describe_command(command: &[OsString]) -> String {
    command
        .iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"') {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Spawner {
    fn path_var(&self) -> Option<&OsStr> {
        self.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_os_str())
    }

    /// Starts generation `generation` with `sockets` (names and fds, in fd
    /// order from 3), its end of the control channel right after them
    /// (`HANDOVER_CONTROL_FD`, not counted in `LISTEN_FDS`) and
    /// `NOTIFY_SOCKET=notify_socket`, and `HANDOVER_WORKER=worker` when
    /// given (`--workers`). Without `release` it runs the command
    /// as found on disk now and returns that file as a [`Release`] (when it
    /// can be opened); with `release` it runs that kept file instead.
    /// Returns the pid once the child has exec'd, or why it could not.
    pub(crate) fn app(
        &self,
        generation: u64,
        sockets: &[(&str, BorrowedFd<'_>)],
        control: BorrowedFd<'_>,
        notify_socket: &str,
        release: Option<&Release>,
        worker: Option<usize>,
    ) -> io::Result<(i32, Option<Release>)> {
        let program = self
            .command
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let control_fd = protocol::FIRST_FD + sockets.len() as i32;
        let vars = Handoff {
            names: sockets.iter().map(|(name, _)| *name).collect(),
            control_fd: Some(control_fd),
            generation,
            supervisor: Some(self.supervisor_pid),
            notify_socket: Some(notify_socket),
            ..Handoff::default()
        };
        let watchdog = self.watchdog.map(|d| d.as_micros().to_string());
        let env: Vec<(OsString, OsString)> = self
            .env
            .iter()
            .filter(|(k, _)| !NOT_INHERITED.iter().any(|n| k == n) && k != WORKER)
            .cloned()
            .chain(watchdog.map(|usec| (OsString::from("WATCHDOG_USEC"), OsString::from(usec))))
            .chain(worker.map(|k| (OsString::from(WORKER), OsString::from(k.to_string()))))
            .collect();
        let mut fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
        fds.push(control);
        let (path, opened) = match release {
            Some(kept) => {
                fds.push(kept.fd.as_fd());
                (
                    PathBuf::from(format!("/proc/self/fd/{}", control_fd + 1)),
                    None,
                )
            }
            None => {
                let path = sys::find_program(program, self.path_var())?;
                // Opened before the fork: a deploy between the two would
                // make the kept file newer than the one that ran, never
                // older.
                let opened = match Release::open(&path) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "cannot keep the executable open");
                        None
                    }
                };
                (path, opened)
            }
        };
        let exec = Exec::generation(
            path.as_os_str(),
            self.command.iter().map(OsString::as_os_str),
            &env,
            &vars,
            None,
        )?;
        // The supervisor's reaper owns every exit status.
        let pid = sys::spawn(exec, &fds)?;
        Ok((pid, opened))
    }

    /// Starts `sh -c CMD` for `--ready exec:CMD`, with `HANDOVER_PID` and
    /// `HANDOVER_GENERATION` naming the generation it probes; no sockets. It
    /// leads a process group of its own (its pid is the group's id), so that
    /// it can be killed with everything it started.
    pub(crate) fn probe(&self, command: &str, pid: i32, generation: u64) -> io::Result<i32> {
        let pid_text = pid.to_string();
        let generation_text = generation.to_string();
        let env = self
            .env
            .iter()
            .filter(|(k, _)| k != "HANDOVER_PID")
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
            .chain([
                (OsStr::new("HANDOVER_PID"), OsStr::new(pid_text.as_str())),
                (
                    OsStr::new(protocol::GENERATION),
                    OsStr::new(generation_text.as_str()),
                ),
            ]);
        let exec = Exec::new(
            OsStr::new("/bin/sh"),
            [OsStr::new("sh"), OsStr::new("-c"), OsStr::new(command)],
            env,
            false,
            None,
        )?
        .in_new_process_group();
        sys::spawn(exec, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_quoted_when_needed() {
        let cmd: Vec<OsString> = ["/app/server", "--name", "two words", ""]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(
            describe_command(&cmd),
            "/app/server --name \"two words\" \"\""
        );
    }
}
