//! Starting processes: a generation of the app (with the sockets, by the
//! protocol) and the readiness command of `--ready exec:CMD`. Both go through
//! `sys::spawn`, which puts the sockets at fds 3.., fills `LISTEN_PID` with
//! the child's own pid after the fork, and resets the signal mask and
//! dispositions in the child.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::BorrowedFd;

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
}

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
    /// order from 3) and `NOTIFY_SOCKET=notify_socket`; returns its pid once
    /// it has exec'd, or why it could not.
    pub(crate) fn app(
        &self,
        generation: u64,
        sockets: &[(&str, BorrowedFd<'_>)],
        notify_socket: &str,
    ) -> io::Result<i32> {
        let program = self
            .command
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let path = sys::find_program(program, self.path_var())?;
        let vars = Handoff {
            names: sockets.iter().map(|(name, _)| *name).collect(),
            control_fd: None,
            generation,
            supervisor: Some(self.supervisor_pid),
            notify_socket: Some(notify_socket),
            ..Handoff::default()
        };
        let exec = Exec::generation(
            path.as_os_str(),
            self.command.iter().map(OsString::as_os_str),
            &self.env,
            &vars,
            None,
        )?;
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
        // The supervisor's reaper owns every exit status.
        sys::spawn(exec, &fds)
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
