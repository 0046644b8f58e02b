//! The environment protocol shared by every mode: pure parsing and rendering,
//! no I/O.
//!
//! It is systemd's socket activation plus three variables of our own:
//!
//! | variable | meaning |
//! |---|---|
//! | `LISTEN_FDS=N` | sockets are passed at fds `3 .. 3+N` |
//! | `LISTEN_FDNAMES=a:b:c` | their names, in order (optional; systemd's default name is `unknown`) |
//! | `LISTEN_PID=<pid>` | the process they are for; anyone else ignores all of the above |
//! | `HANDOVER_CONTROL_FD=<fd>` | a seqpacket socket to whoever started this generation: `ready`, `park`, `resume`, ... (see `channel`) |
//! | `HANDOVER_GENERATION=<n>` | generation number, 1 for the first process |
//! | `HANDOVER_SUPERVISOR=<pid>` | set by `handover run`: the supervisor owns upgrades |
//! | `HANDOVER_PROCESS_GROUP=<pgid>` | the group a new generation joins once it is current (it starts in a group of its own) |
//! | `HANDOVER_PROBATION_MS=<ms>` | the probation the new generation will be on once ready (it refuses to upgrade until promoted) |
//! | `HANDOVER_STATE_FD=<fd>` | a sealed memfd with the app state the previous generation handed over |
//! | `HANDOVER_PREVIOUS=<pid>.<start>:...` | earlier generations that may still be draining (pid and start time) |
//! | `NOTIFY_SOCKET=<path>` | sd_notify datagram socket (`READY=1`, `MAINPID=`, `STOPPING=1`) |
//!
//! Everything but `NOTIFY_SOCKET` is honoured only when `LISTEN_PID` is this
//! process's pid, exactly as `sd_listen_fds` does, so that a grandchild that
//! inherits the variables by accident adopts nothing.

use std::collections::HashMap;
use std::os::fd::RawFd;

use crate::error::{Error, Result};

/// `LISTEN_FDS`.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// `LISTEN_FDNAMES`.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// `LISTEN_PID`.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// `HANDOVER_CONTROL_FD`.
pub const CONTROL_FD: &str = "HANDOVER_CONTROL_FD";
/// `HANDOVER_GENERATION`.
pub const GENERATION: &str = "HANDOVER_GENERATION";
/// `HANDOVER_SUPERVISOR`.
pub const SUPERVISOR: &str = "HANDOVER_SUPERVISOR";
/// `NOTIFY_SOCKET`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// `HANDOVER_PROCESS_GROUP`.
pub const PROCESS_GROUP: &str = "HANDOVER_PROCESS_GROUP";
/// `HANDOVER_PREVIOUS`.
pub const PREVIOUS: &str = "HANDOVER_PREVIOUS";
/// `HANDOVER_STATE_FD`.
pub const STATE_FD: &str = "HANDOVER_STATE_FD";
/// `HANDOVER_PROBATION_MS`.
pub const PROBATION_MS: &str = "HANDOVER_PROBATION_MS";

/// Every variable of the protocol: removed from what the app's own children
/// inherit, and set afresh for each new generation.
pub const VARIABLES: [&str; 11] = [
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PID,
    CONTROL_FD,
    GENERATION,
    SUPERVISOR,
    NOTIFY_SOCKET,
    PROCESS_GROUP,
    PREVIOUS,
    STATE_FD,
    PROBATION_MS,
];

/// The first passed fd, by systemd's convention.
pub const FIRST_FD: RawFd = 3;

/// The most fds we accept from `LISTEN_FDS`: more is a sign of garbage.
pub const MAX_FDS: usize = 4096;

/// The name systemd gives a socket without `FileDescriptorName=`.
pub const UNNAMED: &str = "unknown";

/// What the environment says was passed to this process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Passed sockets, `(name, fd)`, in fd order starting at 3.
    pub fds: Vec<(String, RawFd)>,
    /// The control channel, when a previous generation or the supervisor started us.
    pub control_fd: Option<RawFd>,
    /// Our generation number (1 when nobody said).
    pub generation: u64,
    /// The supervisor's pid, when `handover run` started us.
    pub supervisor: Option<i32>,
    /// `NOTIFY_SOCKET`, as given.
    pub notify_socket: Option<String>,
    /// `LISTEN_PID` named another process: everything else was ignored.
    pub foreign_listen_pid: Option<i32>,
    /// The process group to join once current.
    pub process_group: Option<i32>,
    /// Earlier generations, `(pid, start time)`, that may still be draining.
    pub previous: Vec<Process>,
    /// The memfd with the state the previous generation handed over.
    pub state_fd: Option<RawFd>,
    /// The probation this generation will be on once ready, in ms.
    pub probation_ms: u64,
}

/// A process named by pid and start time (`/proc/<pid>/stat` field 22, in
/// clock ticks since boot), so that a reused pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    /// Its pid.
    pub pid: i32,
    /// Its start time.
    pub start_time: u64,
}

fn number<T: std::str::FromStr>(variable: &'static str, value: &str) -> Result<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::protocol(variable, value, "not a decimal number"));
    }
    value
        .parse()
        .map_err(|_| Error::protocol(variable, value, "number out of range"))
}

/// Checks a socket name the way systemd's `fdname_is_valid` does: 1 to 255
/// printable ASCII characters, no `:`.
pub fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > 255 {
        return Err("name longer than 255 characters");
    }
    if !name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':') {
        return Err("name has a character other than printable ASCII without ':'");
    }
    Ok(())
}

/// Parses the protocol from a snapshot of the environment, for the process
/// whose pid is `own_pid`.
///
/// # Errors
/// [`Error::Protocol`] naming the first malformed variable.
pub fn parse(env: &HashMap<String, String>, own_pid: i32) -> Result<Parsed> {
    let get = |k: &str| env.get(k).map(String::as_str);
    let mut parsed = Parsed {
        generation: 1,
        notify_socket: get(NOTIFY_SOCKET)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        ..Parsed::default()
    };
    let Some(pid_text) = get(LISTEN_PID) else {
        return Ok(parsed);
    };
    let pid: i32 = number(LISTEN_PID, pid_text)?;
    if pid == 0 {
        return Err(Error::protocol(LISTEN_PID, pid_text, "pid 0 is no process"));
    }
    if pid != own_pid {
        parsed.foreign_listen_pid = Some(pid);
        return Ok(parsed);
    }

    let count_text = get(LISTEN_FDS)
        .ok_or_else(|| Error::protocol(LISTEN_FDS, "", "missing while LISTEN_PID is set"))?;
    let count: usize = number(LISTEN_FDS, count_text)?;
    if count > MAX_FDS {
        return Err(Error::protocol(
            LISTEN_FDS,
            count_text,
            format!("more than {MAX_FDS} fds"),
        ));
    }
    let names: Vec<String> = match get(LISTEN_FDNAMES) {
        None => vec![UNNAMED.to_owned(); count],
        Some("") if count == 0 => Vec::new(),
        Some(text) => {
            let names: Vec<String> = text.split(':').map(str::to_owned).collect();
            if names.len() != count {
                return Err(Error::protocol(
                    LISTEN_FDNAMES,
                    text,
                    format!("{} names for LISTEN_FDS={count}", names.len()),
                ));
            }
            for name in &names {
                check_name(name).map_err(|why| {
                    Error::protocol(LISTEN_FDNAMES, text, format!("{why}: {name:?}"))
                })?;
            }
            names
        }
    };
    // `count <= MAX_FDS`, so the fd numbers fit in an i32.
    parsed.fds = names.into_iter().zip(FIRST_FD..).collect();

    if let Some(text) = get(CONTROL_FD) {
        let fd: RawFd = number(CONTROL_FD, text)?;
        if fd < FIRST_FD {
            return Err(Error::protocol(
                CONTROL_FD,
                text,
                "fds 0, 1 and 2 are stdio",
            ));
        }
        if (fd as usize) < FIRST_FD as usize + count {
            return Err(Error::protocol(
                CONTROL_FD,
                text,
                "is also one of the LISTEN_FDS sockets",
            ));
        }
        parsed.control_fd = Some(fd);
    }
    if let Some(text) = get(GENERATION) {
        let generation: u64 = number(GENERATION, text)?;
        if generation == 0 {
            return Err(Error::protocol(
                GENERATION,
                text,
                "generations count from 1",
            ));
        }
        if generation == u64::MAX {
            return Err(Error::protocol(
                GENERATION,
                text,
                "no generation can follow it",
            ));
        }
        parsed.generation = generation;
    }
    if let Some(text) = get(SUPERVISOR) {
        let pid: i32 = number(SUPERVISOR, text)?;
        if pid == 0 {
            return Err(Error::protocol(SUPERVISOR, text, "pid 0 is no process"));
        }
        parsed.supervisor = Some(pid);
    }
    if let Some(text) = get(STATE_FD) {
        let fd: RawFd = number(STATE_FD, text)?;
        let taken = (fd as usize) < FIRST_FD as usize + count || parsed.control_fd == Some(fd);
        if fd < FIRST_FD || taken {
            return Err(Error::protocol(
                STATE_FD,
                text,
                "is stdio, one of the sockets or the control channel",
            ));
        }
        parsed.state_fd = Some(fd);
    }
    if let Some(text) = get(PROBATION_MS) {
        parsed.probation_ms = number(PROBATION_MS, text)?;
    }
    if let Some(text) = get(PROCESS_GROUP) {
        let pgid: i32 = number(PROCESS_GROUP, text)?;
        if pgid <= 1 {
            return Err(Error::protocol(
                PROCESS_GROUP,
                text,
                "no such process group",
            ));
        }
        parsed.process_group = Some(pgid);
    }
    if let Some(text) = get(PREVIOUS).filter(|t| !t.is_empty()) {
        for item in text.split(':') {
            let (pid, start) = item
                .split_once('.')
                .ok_or_else(|| Error::protocol(PREVIOUS, text, "expected <pid>.<start time>"))?;
            let pid: i32 = number(PREVIOUS, pid)?;
            let start_time: u64 = number(PREVIOUS, start)?;
            if pid <= 0 {
                return Err(Error::protocol(PREVIOUS, text, "pid 0 is no process"));
            }
            if parsed.previous.len() >= MAX_FDS {
                return Err(Error::protocol(PREVIOUS, text, "too many generations"));
            }
            parsed.previous.push(Process { pid, start_time });
        }
    }
    Ok(parsed)
}

/// What a new generation is told, apart from `LISTEN_PID`, which only the
/// forked child can fill in (see `sys::spawn`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Handoff<'a> {
    /// Names of the fds passed at 3, 4, ...
    pub names: Vec<&'a str>,
    /// Where the control channel lands in the child.
    pub control_fd: Option<RawFd>,
    /// The child's generation.
    pub generation: u64,
    /// The supervisor's pid, when there is one.
    pub supervisor: Option<i32>,
    /// `NOTIFY_SOCKET` to pass on.
    pub notify_socket: Option<&'a str>,
    /// The process group the child joins once it is current.
    pub process_group: Option<i32>,
    /// Earlier generations that may still be draining.
    pub previous: &'a [Process],
    /// Where the state memfd lands in the child.
    pub state_fd: Option<RawFd>,
    /// The probation the child will be on once ready, in ms (0: none).
    pub probation_ms: u64,
}

impl Handoff<'_> {
    /// The variables to set, `LISTEN_PID` excluded.
    pub fn render(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (LISTEN_FDS, self.names.len().to_string()),
            (LISTEN_FDNAMES, self.names.join(":")),
            (GENERATION, self.generation.to_string()),
        ];
        if let Some(fd) = self.control_fd {
            vars.push((CONTROL_FD, fd.to_string()));
        }
        if let Some(pid) = self.supervisor {
            vars.push((SUPERVISOR, pid.to_string()));
        }
        if let Some(path) = self.notify_socket {
            vars.push((NOTIFY_SOCKET, path.to_owned()));
        }
        if let Some(pgid) = self.process_group {
            vars.push((PROCESS_GROUP, pgid.to_string()));
        }
        if let Some(fd) = self.state_fd {
            vars.push((STATE_FD, fd.to_string()));
        }
        if self.probation_ms > 0 {
            vars.push((PROBATION_MS, self.probation_ms.to_string()));
        }
        if !self.previous.is_empty() {
            let list: Vec<String> = self
                .previous
                .iter()
                .map(|p| format!("{}.{}", p.pid, p.start_time))
                .collect();
            vars.push((PREVIOUS, list.join(":")));
        }
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn err_of(pairs: &[(&str, &str)]) -> (String, String) {
        match parse(&env(pairs), 42) {
            Err(Error::Protocol {
                variable, problem, ..
            }) => (variable.to_owned(), problem),
            other => panic!("expected a protocol error for {pairs:?}, got {other:?}"),
        }
    }

    #[test]
    fn nothing_passed() {
        let parsed = parse(&env(&[]), 42).unwrap();
        assert!(parsed.fds.is_empty());
        assert_eq!(parsed.generation, 1);
        assert_eq!(parsed.control_fd, None);
    }

    #[test]
    fn full_handoff_round_trips() {
        let handoff = Handoff {
            names: vec!["http", "admin"],
            control_fd: Some(5),
            generation: 7,
            supervisor: None,
            notify_socket: Some("/run/notify"),
            process_group: Some(77),
            state_fd: Some(6),
            probation_ms: 1500,
            previous: &[
                Process {
                    pid: 10,
                    start_time: 123,
                },
                Process {
                    pid: 11,
                    start_time: 456,
                },
            ],
        };
        let mut vars: HashMap<String, String> = handoff
            .render()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        vars.insert(LISTEN_PID.into(), "42".into());
        let parsed = parse(&vars, 42).unwrap();
        assert_eq!(
            parsed.fds,
            vec![("http".to_owned(), 3), ("admin".to_owned(), 4)]
        );
        assert_eq!(parsed.control_fd, Some(5));
        assert_eq!(parsed.generation, 7);
        assert_eq!(parsed.notify_socket.as_deref(), Some("/run/notify"));
        assert_eq!(parsed.process_group, Some(77));
        assert_eq!(parsed.state_fd, Some(6));
        assert_eq!(parsed.probation_ms, 1500);
        assert_eq!(parsed.previous, handoff.previous);
    }

    #[test]
    fn systemd_style_without_names() {
        let parsed = parse(&env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "2")]), 42).unwrap();
        assert_eq!(
            parsed.fds,
            vec![("unknown".to_owned(), 3), ("unknown".to_owned(), 4)]
        );
        // systemd may give several sockets one name (one .socket unit).
        let parsed = parse(
            &env(&[
                ("LISTEN_PID", "42"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", "web.socket:web.socket"),
            ]),
            42,
        )
        .unwrap();
        assert_eq!(parsed.fds.len(), 2);
    }

    #[test]
    fn zero_fds_with_empty_names() {
        let parsed = parse(
            &env(&[
                ("LISTEN_PID", "42"),
                ("LISTEN_FDS", "0"),
                ("LISTEN_FDNAMES", ""),
            ]),
            42,
        )
        .unwrap();
        assert!(parsed.fds.is_empty());
    }

    #[test]
    fn other_process_is_ignored_entirely() {
        let parsed = parse(
            &env(&[
                ("LISTEN_PID", "41"),
                ("LISTEN_FDS", "garbage"),
                ("HANDOVER_CONTROL_FD", "9"),
                ("HANDOVER_GENERATION", "3"),
            ]),
            42,
        )
        .unwrap();
        assert!(parsed.fds.is_empty());
        assert_eq!(parsed.control_fd, None);
        assert_eq!(parsed.generation, 1);
        assert_eq!(parsed.foreign_listen_pid, Some(41));
    }

    #[test]
    fn non_numeric_values() {
        for (var, bad) in [
            ("LISTEN_PID", "abc"),
            ("LISTEN_PID", "-42"),
            ("LISTEN_PID", " 42"),
            ("LISTEN_PID", ""),
            ("LISTEN_FDS", "two"),
            ("LISTEN_FDS", "-1"),
            ("LISTEN_FDS", "1.5"),
            ("HANDOVER_CONTROL_FD", "x"),
            ("HANDOVER_GENERATION", "0x10"),
            ("HANDOVER_SUPERVISOR", "me"),
        ] {
            let mut pairs = vec![("LISTEN_PID", "42"), ("LISTEN_FDS", "1")];
            pairs.retain(|(k, _)| *k != var);
            pairs.push((var, bad));
            let (variable, problem) = err_of(&pairs);
            assert_eq!(variable, var, "{var}={bad:?}");
            assert!(problem.contains("number"), "{var}={bad:?}: {problem}");
        }
    }

    #[test]
    fn out_of_range_numbers() {
        let (v, p) = err_of(&[("LISTEN_PID", "99999999999999999999")]);
        assert_eq!(
            (v.as_str(), p.as_str()),
            ("LISTEN_PID", "number out of range")
        );
        let (v, _) = err_of(&[("LISTEN_PID", "0")]);
        assert_eq!(v, "LISTEN_PID");
        let (v, p) = err_of(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "100000")]);
        assert_eq!(v, "LISTEN_FDS");
        assert!(p.contains("more than"), "{p}");
        let (v, _) = err_of(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "0"),
            ("HANDOVER_GENERATION", "0"),
        ]);
        assert_eq!(v, "HANDOVER_GENERATION");
        let (v, p) = err_of(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "0"),
            ("HANDOVER_GENERATION", "18446744073709551615"),
        ]);
        assert_eq!(
            (v.as_str(), p.as_str()),
            ("HANDOVER_GENERATION", "no generation can follow it")
        );
    }

    #[test]
    fn missing_count() {
        let (v, p) = err_of(&[("LISTEN_PID", "42")]);
        assert_eq!(v, "LISTEN_FDS");
        assert!(p.contains("missing"), "{p}");
    }

    #[test]
    fn wrong_name_counts() {
        for names in ["a", "a:b:c", "", "a:"] {
            let (v, p) = err_of(&[
                ("LISTEN_PID", "42"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", names),
            ]);
            assert_eq!(v, "LISTEN_FDNAMES", "{names:?}");
            assert!(
                p.contains("names for LISTEN_FDS=2") || p.contains("empty"),
                "{names:?}: {p}"
            );
        }
    }

    #[test]
    fn bad_names() {
        let long = "x".repeat(256);
        for names in [
            "a:",
            ":a",
            "a:b\u{1}",
            "a:\u{e9}t\u{e9}",
            &format!("a:{long}"),
        ] {
            let (v, _) = err_of(&[
                ("LISTEN_PID", "42"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", names),
            ]);
            assert_eq!(v, "LISTEN_FDNAMES", "{names:?}");
        }
    }

    #[test]
    fn control_fd_clashes() {
        // A control channel that is also one of the sockets: a duplicated fd.
        let (v, p) = err_of(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "2"),
            ("HANDOVER_CONTROL_FD", "4"),
        ]);
        assert_eq!(v, "HANDOVER_CONTROL_FD");
        assert!(p.contains("also one of"), "{p}");
        let (v, p) = err_of(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "0"),
            ("HANDOVER_CONTROL_FD", "1"),
        ]);
        assert_eq!(v, "HANDOVER_CONTROL_FD");
        assert!(p.contains("stdio"), "{p}");
    }

    #[test]
    fn error_messages_name_the_variable_and_value() {
        let err = parse(&env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "many")]), 42).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("LISTEN_FDS=\"many\""), "{text}");
    }

    #[test]
    fn names_are_checked_like_systemd() {
        assert!(check_name("http").is_ok());
        assert!(check_name("web.socket").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("a\nb").is_err());
    }
}
