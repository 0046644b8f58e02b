//! The command line of the `handover` binary: hand-written parsing of
//! `run`, `upgrade` and `status`, with one-line errors that name the option.
//!
//! Nothing here starts, binds or opens anything: a bad command line is
//! reported before the supervisor does any work.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::health::{HealthCheck, Probe};

/// Overall help, printed by `handover --help`.
pub(crate) const HELP: &str = "\
handover: zero-downtime upgrades for network servers

Usage:
  handover run [OPTIONS] [--] COMMAND [ARGS...]   supervise COMMAND (container entrypoint)
  handover upgrade [--control PATH] [--timeout DUR]
  handover status [--control PATH] [--json | --check]
  handover help | --help | --version

`handover run --help` lists the options of the supervisor.
Exit codes of `upgrade`: 0 upgraded, 1 the upgrade failed or was refused (the old
generation keeps serving), 2 could not ask (no supervisor, bad arguments, timeout).
";

/// Help of `handover run`, with every option and its default.
pub(crate) const RUN_HELP: &str = "\
Usage: handover run [OPTIONS] [--] COMMAND [ARGS...]

Binds the listeners once, starts COMMAND with them (systemd socket activation:
LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), and upgrades it on SIGHUP or `handover
upgrade`: the next generation gets the same sockets; once it is ready the old one
gets the stop signal. As PID 1 it reaps every process and forwards signals.

Options:
  --listen [NAME=]URL    a socket to bind and pass on, repeatable:
                         tcp://HOST:PORT, udp://HOST:PORT (HOST: IPv4 or [IPv6]),
                         unix:///absolute/path. NAME= is required with several.
  --ready MODE           how a generation says it is ready (default notify):
                           notify       READY=1 on its NOTIFY_SOCKET (sd_notify),
                                        from the app or a process it started
                           exec:CMD     `sh -c CMD` exits 0 (rerun every 200ms;
                                        HANDOVER_PID and HANDOVER_GENERATION set)
                           delay:DUR    a fixed time after it started
  --ready-timeout DUR    readiness deadline of a new generation (default 60s)
  --drain-timeout DUR    time between the stop signal and SIGKILL (default 30s)
  --failed-drain-timeout DUR
                         the same for a new generation whose upgrade failed while
                         it runs (not ready in time, or a stop during the upgrade):
                         it gets the stop signal to finish the requests it took,
                         then SIGKILL (default: the --drain-timeout value)
  --stop-signal SIG      signal that tells a generation to drain and exit; not KILL
                         or STOP: a generation must be able to drain (default TERM)
  --shutdown-delay DUR   on SIGTERM/SIGINT keep serving this long first, while load
                         balancers deregister the endpoint (default 0s)
  --restart POLICY       on-failure: restart a generation that fails unasked, with
                         back-off; after 5 restarts, the 6th quick crash in a row
                         gives up; never: exit with its status (default on-failure)
  --control PATH         control socket for `handover upgrade` and `status`
                         (default: /run/handover/control.sock as root,
                         $XDG_RUNTIME_DIR/handover/control.sock or
                         /tmp/handover-<uid>/control.sock otherwise)
  --pid-file PATH        keep the pid of the current generation (the app, not the
                         supervisor) in PATH, replaced atomically when an upgrade
                         succeeds or a crash restarts it, removed on exit. Upgrades
                         are triggered by `kill -HUP` of the supervisor's own pid, or
                         by `handover upgrade`
  --max-draining N       old generations allowed to drain at once, 1 to 1000; an
                         upgrade beyond waits for one to exit (default 8)
  --admin [tcp://]HOST:PORT
                         serve GET /readyz, /livez and /metrics (Prometheus) on an
                         HTTP listener of the supervisor's own, never passed to the
                         app; /readyz is 503 from SIGTERM on (default: none)
  --backlog N            listen(2) backlog of stream listeners, 1 to 2147483647
                         (the kernel caps it at net.core.somaxconn) (default 1024)
  --probation DUR        after a new generation is ready, keep the old one until it
                         has run this long with every check healthy; any failure
                         meanwhile rolls back to the old one (default 0s: off)
  --health CHECK         probe of the generation on probation, then of the current
                         one (liveness: failures in a row restart it):
                           http://HOST:PORT/PATH  GET answers 2xx or 3xx
                           tcp://HOST:PORT        the connection is accepted
                           exec:CMD               `sh -c CMD` exits 0 (HANDOVER_PID
                                                  and HANDOVER_GENERATION set)
  --health-interval DUR  from one run of the check to the next (default 1s)
  --health-timeout DUR   a run that takes longer failed (default 1s)
  --health-threshold N   failures in a row that make a generation unhealthy, 1 to
                         1000 (default 3)
  --watchdog DUR         pass WATCHDOG_USEC to each generation; once ready it must
                         send WATCHDOG=1 at least this often (WATCHDOG=trigger
                         fails it at once) (default: off)
  --workers N            run N copies of the app on the same sockets, 1 to 1024; each
                         has HANDOVER_WORKER=0..N-1, is restarted alone when it
                         crashes, and an upgrade rolls through them (default 1)
  --max-surge K          in a rolling upgrade, new workers started at once, 1 to N
                         (default 1)
  -h, --help             this help

Durations: 500ms, 30s, 2m, 1h. Signals: TERM, SIGTERM or 15.
Logs go to stderr, one line per event; HANDOVER_LOG=error|warn|info|debug|trace
(default info); HANDOVER_LOG_FORMAT=json writes each as one JSON object.
";

/// Help of `handover upgrade`.
pub(crate) const UPGRADE_HELP: &str = "\
Usage: handover upgrade [--control PATH] [--timeout DUR]

Asks the supervisor for an upgrade, prints its steps as they happen, and exits
0 when the new generation is serving, 1 when the upgrade failed or was refused
(the old generation keeps serving), 2 when it could not ask or got no outcome
within --timeout (default 5m).
";

/// Help of `handover status`.
pub(crate) const STATUS_HELP: &str = "\
Usage: handover status [--control PATH] [--json | --check]

Shows the current generation, its pid, uptime and state, the generations still
draining, and the outcome of the last upgrade. Exits 2 when there is no supervisor.
--check, for a HEALTHCHECK CMD: prints one line and exits 0 when a generation is
ready and the supervisor is neither restarting nor stopping, else 1 (also when
there is no supervisor).
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum Command {
    /// `handover run`: supervise a command.
    Run(Box<RunConfig>),
    /// `handover upgrade`: ask the supervisor for an upgrade.
    Upgrade(ClientConfig),
    /// `handover status`: show the supervisor's state.
    Status(ClientConfig),
    /// Print this help text and exit 0.
    Help(&'static str),
    /// Print the version and exit 0.
    Version,
}

/// Options of `handover run`. Defaults as documented in [`RUN_HELP`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct RunConfig {
    /// Sockets to bind and pass on, in fd order.
    pub(crate) listeners: Vec<ListenSpec>,
    /// How a generation says it is ready.
    pub(crate) ready: ReadyMode,
    /// Readiness deadline of a new generation.
    pub(crate) ready_timeout: Duration,
    /// Time between the stop signal and SIGKILL.
    pub(crate) drain_timeout: Duration,
    /// The same, for a new generation whose upgrade failed while it runs.
    pub(crate) failed_drain_timeout: Duration,
    /// Signal that tells a generation to drain and exit.
    pub(crate) stop_signal: Signal,
    /// On SIGTERM/SIGINT, keep serving this long before stopping.
    pub(crate) shutdown_delay: Duration,
    /// What to do when the current generation fails unasked.
    pub(crate) restart: RestartPolicy,
    /// Path of the control socket.
    pub(crate) control: PathBuf,
    /// Where to keep the pid of the current generation.
    pub(crate) pid_file: Option<PathBuf>,
    /// Old generations allowed to drain at once.
    pub(crate) max_draining: usize,
    /// `listen(2)` backlog of stream listeners.
    pub(crate) backlog: i32,
    /// How long a new generation is on probation after it is ready
    /// (zero: promoted at ready).
    pub(crate) probation: Duration,
    /// `--health` and its schedule.
    pub(crate) health: Option<HealthCheck>,
    /// `--watchdog`: the longest time between two `WATCHDOG=1`.
    pub(crate) watchdog: Option<Duration>,
    /// `--admin`: the HTTP listener of `/readyz`, `/livez`, `/metrics`.
    pub(crate) admin: Option<SocketAddr>,
    /// `--workers`: copies of the app sharing the sockets.
    pub(crate) workers: usize,
    /// `--max-surge`: new workers started at once in a rolling upgrade.
    pub(crate) max_surge: usize,
    /// The command and its arguments.
    pub(crate) command: Vec<OsString>,
    /// Test-only debugging switch (`--debug-no-reap`, not in the help):
    /// reap only the processes the supervisor started, leaving orphans as
    /// zombies. It exists so that tests can prove that they detect a
    /// supervisor that does not reap.
    pub(crate) debug_no_reap: bool,
}

/// One `--listen` socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct ListenSpec {
    /// Its name in `LISTEN_FDNAMES` (`unknown`, systemd's default, when not given).
    pub(crate) name: String,
    /// What to bind.
    pub(crate) address: ListenAddress,
}

/// What a `--listen` socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ListenAddress {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A UDP socket.
    Udp(SocketAddr),
    /// A Unix stream listener at a path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddress::Udp(a) => write!(f, "udp://{a}"),
            ListenAddress::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// How a generation says it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ReadyMode {
    /// `READY=1` on its `NOTIFY_SOCKET`.
    Notify,
    /// A shell command, rerun until it exits 0.
    Exec(String),
    /// A fixed time after it started.
    Delay(Duration),
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadyMode::Notify => f.write_str("READY=1 on NOTIFY_SOCKET"),
            ReadyMode::Exec(cmd) => write!(f, "`{cmd}` exiting 0"),
            ReadyMode::Delay(d) => write!(f, "a fixed delay of {}", format_duration(*d)),
        }
    }
}

/// What to do when the current generation exits unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum RestartPolicy {
    /// Restart it when it failed (non-zero status or killed by a signal).
    OnFailure,
    /// Stop and exit with its status.
    Never,
}

/// Options of `handover upgrade` and `handover status`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct ClientConfig {
    /// Path of the control socket.
    pub(crate) control: PathBuf,
    /// How long to wait for the outcome.
    pub(crate) timeout: Duration,
    /// `status --json`.
    pub(crate) json: bool,
    /// `status --check`.
    pub(crate) check: bool,
}

/// A malformed command line: which option, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UsageError {
    /// The option (`--listen`), the subcommand for other mistakes, or empty
    /// when the subcommand itself is missing or unknown.
    pub(crate) option: String,
    /// What is wrong, with the offending value.
    pub(crate) problem: String,
}

impl UsageError {
    fn new(option: impl Into<String>, problem: impl Into<String>) -> Self {
        UsageError {
            option: option.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.option.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.option, self.problem)
        }
    }
}

impl std::error::Error for UsageError {}

/// Default of `--ready-timeout`.
pub(crate) const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `--drain-timeout`.
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `upgrade --timeout`.
pub(crate) const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default of `--max-draining`.
pub(crate) const DEFAULT_MAX_DRAINING: usize = 8;
/// Default of `--backlog`.
pub(crate) const DEFAULT_BACKLOG: i32 = 1024;
/// Largest `--max-draining`: each draining generation is a process with
/// every socket open; more than this is a leak, not a policy.
pub(crate) const MAX_MAX_DRAINING: usize = 1000;
/// Largest `--workers` (and `--max-surge`).
pub(crate) const MAX_WORKERS: usize = 1024;

/// The default control socket path: `/run/handover/control.sock` for root
/// (`/tmp/handover-0/control.sock` when there is no `/run`),
/// `$XDG_RUNTIME_DIR/handover/control.sock` for other users when that is
/// set, `/tmp/handover-<uid>/control.sock` otherwise. The supervisor and the
/// clients compute it the same way.
pub(crate) fn default_control_path() -> PathBuf {
    let uid = crate::sys::euid();
    if uid == 0 {
        if Path::new("/run").is_dir() {
            return PathBuf::from("/run/handover/control.sock");
        }
    } else if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_absolute() {
            return dir.join("handover").join("control.sock");
        }
    }
    PathBuf::from(format!("/tmp/handover-{uid}/control.sock"))
}

/// Parses a duration: a whole number followed by `ms`, `s`, `m` or `h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (use e.g. 500ms, 30s, 2m)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (use e.g. 500ms, 30s, 2m)"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    // A year is plenty for any timeout here, and keeps Instant arithmetic safe.
    match millis {
        Some(ms) if ms <= 365 * 24 * 3_600_000 => Ok(Duration::from_millis(ms)),
        _ => Err(format!("{text:?} is too long (at most a year)")),
    }
}

/// Formats a duration the way [`parse_duration`] reads it, or with
/// fractions for odd values (`1.25s`).
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// Parses a signal: `TERM`, `SIGTERM`, `term` or `15`.
pub(crate) fn parse_signal(text: &str) -> Result<Signal, String> {
    let signal = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<i32>()
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
    } else {
        let upper = text.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        name.parse::<Signal>().ok()
    };
    match signal {
        Some(Signal::SIGKILL) => Err(
            "SIGKILL cannot be the stop signal: a generation must be able to drain \
             (SIGKILL follows anyway after --drain-timeout)"
                .to_owned(),
        ),
        Some(Signal::SIGSTOP) => Err("SIGSTOP does not stop a process for good".to_owned()),
        Some(Signal::SIGCHLD) => Err("SIGCHLD is not a stop signal".to_owned()),
        Some(s) => Ok(s),
        None => Err(format!(
            "{text:?} is not a signal (use e.g. TERM, SIGQUIT or 15)"
        )),
    }
}

fn parse_host_port(rest: &str, scheme: &str) -> Result<SocketAddr, String> {
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (host, port) = after
            .split_once("]:")
            .ok_or_else(|| format!("expected {scheme}://[IPv6]:PORT"))?;
        let ip: std::net::Ipv6Addr = host
            .parse()
            .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("expected {scheme}://HOST:PORT"))?;
        if host.is_empty() {
            return Err(format!(
                "the host is missing (use {scheme}://0.0.0.0:{port} or {scheme}://[::]:{port})"
            ));
        }
        if host.contains(':') {
            return Err(format!(
                "put an IPv6 address in brackets: {scheme}://[{host}]:{port}"
            ));
        }
        let ip: std::net::Ipv4Addr = host
            .parse()
            .map_err(|_| format!("host {host:?} is not an IP address (names are not resolved)"))?;
        (IpAddr::V4(ip), port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port} is out of range (0-65535)"))?;
    Ok(SocketAddr::new(host, port))
}

/// Parses one `--listen` value: `[NAME=]URL`.
pub(crate) fn parse_listen(text: &str) -> Result<ListenSpec, String> {
    let (name, url) = match text.find("://") {
        Some(scheme_end) => match text[..scheme_end].split_once('=') {
            Some((name, _)) => (Some(name), &text[name.len() + 1..]),
            None => (None, text),
        },
        None => {
            return Err(format!(
                "{text:?} is not a URL (use tcp://HOST:PORT, udp://HOST:PORT or unix:///path)"
            ))
        }
    };
    if let Some(name) = name {
        crate::protocol::check_name(name)
            .map_err(|why| format!("{text:?}: bad name {name:?}: {why}"))?;
    }
    let (scheme, rest) = url.split_once("://").unwrap_or((url, ""));
    let address = match scheme {
        "tcp" => {
            ListenAddress::Tcp(parse_host_port(rest, "tcp").map_err(|e| format!("{text:?}: {e}"))?)
        }
        "udp" => {
            ListenAddress::Udp(parse_host_port(rest, "udp").map_err(|e| format!("{text:?}: {e}"))?)
        }
        "unix" => {
            if !rest.starts_with('/') {
                return Err(format!(
                    "{text:?}: the path must be absolute (unix:///run/app.sock)"
                ));
            }
            // sun_path holds 108 bytes with the terminating NUL.
            if rest.len() > 107 {
                return Err(format!("{text:?}: the path is longer than 107 bytes"));
            }
            if rest.ends_with('/') {
                return Err(format!("{text:?}: the path names a directory"));
            }
            ListenAddress::Unix(PathBuf::from(rest))
        }
        other => {
            return Err(format!(
                "{text:?}: unknown scheme {other:?} (use tcp, udp or unix)"
            ))
        }
    };
    Ok(ListenSpec {
        name: name.unwrap_or(crate::protocol::UNNAMED).to_owned(),
        address,
    })
}

/// Parses a `--ready` value.
pub(crate) fn parse_ready(text: &str) -> Result<ReadyMode, String> {
    if text == "notify" {
        Ok(ReadyMode::Notify)
    } else if let Some(cmd) = text.strip_prefix("exec:") {
        if cmd.trim().is_empty() {
            Err("exec: needs a command (exec:CMD)".to_owned())
        } else {
            Ok(ReadyMode::Exec(cmd.to_owned()))
        }
    } else if let Some(d) = text.strip_prefix("delay:") {
        Ok(ReadyMode::Delay(parse_duration(d)?))
    } else {
        Err(format!(
            "{text:?} is not a readiness mode (use notify, exec:CMD or delay:DURATION)"
        ))
    }
}

/// Reads options one at a time: `--opt value`, `--opt=value`, flags.
struct Args {
    args: std::vec::IntoIter<OsString>,
    subcommand: &'static str,
}

enum Arg {
    /// `--name` with an optional inline `=value`.
    Opt(String, Option<OsString>),
    /// `--`.
    End,
    /// Anything else.
    Positional(OsString),
}

impl Args {
    fn next(&mut self) -> Option<Arg> {
        let arg = self.args.next()?;
        let bytes = arg.as_encoded_bytes();
        if bytes == b"--" {
            return Some(Arg::End);
        }
        if bytes.starts_with(b"-") && bytes.len() > 1 {
            let text = arg.to_string_lossy().into_owned();
            if let Some((name, _)) = text.split_once('=') {
                if name.starts_with("--") && name.is_ascii() {
                    // The value keeps its original bytes (a path need not
                    // be UTF-8); the name before it is ASCII.
                    let value = OsStr::from_bytes(&bytes[name.len() + 1..]).to_owned();
                    return Some(Arg::Opt(name.to_owned(), Some(value)));
                }
            }
            return Some(Arg::Opt(text, None));
        }
        Some(Arg::Positional(arg))
    }

    fn value(&mut self, option: &str, inline: Option<OsString>) -> Result<OsString, UsageError> {
        match inline {
            Some(v) => Ok(v),
            None => self
                .args
                .next()
                .ok_or_else(|| UsageError::new(option, "needs a value")),
        }
    }

    fn text(&mut self, option: &str, inline: Option<OsString>) -> Result<String, UsageError> {
        let value = self.value(option, inline)?;
        value
            .into_string()
            .map_err(|v| UsageError::new(option, format!("{v:?} is not valid UTF-8")))
    }

    fn no_value(&self, option: &str, inline: &Option<OsString>) -> Result<(), UsageError> {
        match inline {
            Some(_) => Err(UsageError::new(option, "takes no value")),
            None => Ok(()),
        }
    }

    fn rest(&mut self) -> Vec<OsString> {
        self.args.by_ref().collect()
    }

    fn unknown(&self, option: &str) -> UsageError {
        UsageError::new(
            option,
            format!(
                "unknown option for `handover {}` (see `handover {} --help`)",
                self.subcommand, self.subcommand
            ),
        )
    }
}

fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path,
    }
}

fn control_path(value: OsString) -> Result<PathBuf, UsageError> {
    if value.is_empty() {
        return Err(UsageError::new("--control", "the path is empty"));
    }
    let path = absolute(PathBuf::from(value));
    if path.as_os_str().len() > 107 {
        return Err(UsageError::new(
            "--control",
            format!("{} is longer than 107 bytes", path.display()),
        ));
    }
    Ok(path)
}

/// An absolute path for a file option (`--pid-file`).
fn file_path(option: &str, value: OsString) -> Result<PathBuf, UsageError> {
    if value.is_empty() {
        return Err(UsageError::new(option, "the path is empty"));
    }
    if value.as_bytes().ends_with(b"/") {
        return Err(UsageError::new(
            option,
            format!("{value:?} names a directory, not a file"),
        ));
    }
    Ok(absolute(PathBuf::from(value)))
}

/// Parses a whole number in `min..=max`; the error states the range.
fn number_in<T>(option: &str, text: &str, min: T, max: T) -> Result<T, UsageError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    match text.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(UsageError::new(
            option,
            format!("{text:?} is not a whole number from {min} to {max}"),
        )),
    }
}

type SubcommandParser = fn(&mut Args) -> Result<Command, UsageError>;

/// Parses the arguments after the program name.
///
/// # Errors
/// A [`UsageError`] naming the first bad option or value.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.is_empty() {
        return Err(UsageError::new(
            "",
            "missing subcommand: run, upgrade or status (see `handover --help`)",
        ));
    }
    let first = args.remove(0);
    let sub = first.to_string_lossy().into_owned();
    let (subcommand, parse_sub): (&'static str, SubcommandParser) = match sub.as_str() {
        "run" => ("run", parse_run),
        "upgrade" => ("upgrade", parse_upgrade),
        "status" => ("status", parse_status),
        "help" | "--help" | "-h" => return Ok(Command::Help(HELP)),
        "--version" | "-V" | "version" => return Ok(Command::Version),
        other => {
            return Err(UsageError::new(
                "",
                format!("unknown subcommand {other:?} (use run, upgrade or status)"),
            ))
        }
    };
    let mut args = Args {
        args: args.into_iter(),
        subcommand,
    };
    parse_sub(&mut args)
}

fn parse_run(args: &mut Args) -> Result<Command, UsageError> {
    let mut listeners = Vec::new();
    let mut ready = ReadyMode::Notify;
    let mut ready_timeout = DEFAULT_READY_TIMEOUT;
    let mut drain_timeout = DEFAULT_DRAIN_TIMEOUT;
    let mut failed_drain_timeout = None;
    let mut pid_file = None;
    let mut stop_signal = Signal::SIGTERM;
    let mut shutdown_delay = Duration::ZERO;
    let mut restart = RestartPolicy::OnFailure;
    let mut control = None;
    let mut max_draining = DEFAULT_MAX_DRAINING;
    let mut backlog = DEFAULT_BACKLOG;
    let mut debug_no_reap = false;
    let mut probation = Duration::ZERO;
    let mut health: Option<Probe> = None;
    let mut health_interval = None;
    let mut health_timeout = None;
    let mut health_threshold = None;
    let mut watchdog = None;
    let mut admin = None;
    let mut workers = 1;
    let mut max_surge = 1;
    let mut command = Vec::new();
    let duration =
        |option: &str, text: String| parse_duration(&text).map_err(|e| UsageError::new(option, e));
    while let Some(arg) = args.next() {
        let (option, inline) = match arg {
            Arg::End => {
                command = args.rest();
                break;
            }
            Arg::Positional(first) => {
                command.push(first);
                command.extend(args.rest());
                break;
            }
            Arg::Opt(option, inline) => (option, inline),
        };
        let o = option.as_str();
        match o {
            "-h" | "--help" => return Ok(Command::Help(RUN_HELP)),
            "--listen" => {
                let text = args.text(o, inline)?;
                listeners.push(parse_listen(&text).map_err(|e| UsageError::new(o, e))?);
            }
            "--ready" => {
                let text = args.text(o, inline)?;
                ready = parse_ready(&text).map_err(|e| UsageError::new(o, e))?;
            }
            "--ready-timeout" => {
                ready_timeout = duration(o, args.text(o, inline)?)?;
                if ready_timeout.is_zero() {
                    return Err(UsageError::new(o, "must be more than 0"));
                }
            }
            "--drain-timeout" => drain_timeout = duration(o, args.text(o, inline)?)?,
            "--failed-drain-timeout" => {
                failed_drain_timeout = Some(duration(o, args.text(o, inline)?)?)
            }
            "--pid-file" => pid_file = Some(file_path(o, args.value(o, inline)?)?),
            "--shutdown-delay" => shutdown_delay = duration(o, args.text(o, inline)?)?,
            "--stop-signal" => {
                let text = args.text(o, inline)?;
                stop_signal = parse_signal(&text).map_err(|e| UsageError::new(o, e))?;
            }
            "--restart" => {
                restart = match args.text(o, inline)?.as_str() {
                    "on-failure" => RestartPolicy::OnFailure,
                    "never" => RestartPolicy::Never,
                    other => {
                        return Err(UsageError::new(
                            o,
                            format!("{other:?} is not a policy (use on-failure or never)"),
                        ))
                    }
                }
            }
            "--control" => control = Some(control_path(args.value(o, inline)?)?),
            "--max-draining" => {
                let text = args.text(o, inline)?;
                max_draining = number_in(o, &text, 1, MAX_MAX_DRAINING)?;
            }
            "--backlog" => {
                let text = args.text(o, inline)?;
                backlog = number_in(o, &text, 1, i32::MAX)?;
            }
            "--probation" => probation = duration(o, args.text(o, inline)?)?,
            "--workers" => {
                let text = args.text(o, inline)?;
                workers = number_in(o, &text, 1, MAX_WORKERS)?;
            }
            "--max-surge" => {
                let text = args.text(o, inline)?;
                max_surge = number_in(o, &text, 1, MAX_WORKERS)?;
            }
            "--health" => {
                let text = args.text(o, inline)?;
                health = Some(
                    Probe::parse(&text)
                        .map_err(|e| UsageError::new(o, format!("{text:?}: {e}")))?,
                );
            }
            "--health-interval" | "--health-timeout" | "--watchdog" => {
                let d = duration(o, args.text(o, inline)?)?;
                if d.is_zero() {
                    return Err(UsageError::new(o, "must be more than 0"));
                }
                match o {
                    "--health-interval" => health_interval = Some(d),
                    "--health-timeout" => health_timeout = Some(d),
                    _ => watchdog = Some(d),
                }
            }
            "--health-threshold" => {
                let text = args.text(o, inline)?;
                health_threshold = Some(number_in(o, &text, 1, 1000)?);
            }
            "--debug-no-reap" => {
                args.no_value(o, &inline)?;
                debug_no_reap = true;
            }
            "--admin" => {
                let text = args.text(o, inline)?;
                let rest = text.strip_prefix("tcp://").unwrap_or(&text);
                admin = Some(parse_host_port(rest, "tcp").map_err(|e| UsageError::new(o, e))?);
            }
            _ => return Err(args.unknown(o)),
        }
    }
    if command.is_empty() || command[0].is_empty() {
        return Err(UsageError::new(
            "run",
            "missing COMMAND (handover run [OPTIONS] -- COMMAND [ARGS...])",
        ));
    }
    if listeners.len() > 1 {
        if let Some(unnamed) = listeners
            .iter()
            .find(|l| l.name == crate::protocol::UNNAMED)
        {
            return Err(UsageError::new(
                "--listen",
                format!(
                    "{} has no name; with several listeners give each one (NAME=URL)",
                    unnamed.address
                ),
            ));
        }
    }
    let health = match health {
        Some(probe) => {
            let mut check = HealthCheck::new(probe);
            check.interval = health_interval.unwrap_or(check.interval);
            check.timeout = health_timeout.unwrap_or(check.timeout);
            check.threshold = health_threshold.unwrap_or(check.threshold);
            Some(check)
        }
        None => {
            let orphan = [
                ("--health-interval", health_interval.is_some()),
                ("--health-timeout", health_timeout.is_some()),
                ("--health-threshold", health_threshold.is_some()),
            ];
            if let Some((option, _)) = orphan.iter().find(|(_, given)| *given) {
                return Err(UsageError::new(*option, "has no effect without --health"));
            }
            None
        }
    };
    for (i, l) in listeners.iter().enumerate() {
        if listeners[..i].iter().any(|o| o.name == l.name) {
            return Err(UsageError::new(
                "--listen",
                format!("the name {:?} is used twice", l.name),
            ));
        }
    }
    Ok(Command::Run(Box::new(RunConfig {
        listeners,
        ready,
        ready_timeout,
        drain_timeout,
        failed_drain_timeout: failed_drain_timeout.unwrap_or(drain_timeout),
        stop_signal,
        shutdown_delay,
        restart,
        control: control.unwrap_or_else(default_control_path),
        pid_file,
        max_draining,
        backlog,
        probation,
        health,
        watchdog,
        admin,
        workers,
        max_surge: max_surge.min(workers),
        command,
        debug_no_reap,
    })))
}

fn parse_client(args: &mut Args, json_allowed: bool) -> Result<ClientConfig, UsageError> {
    let mut control = None;
    let mut timeout = DEFAULT_CLIENT_TIMEOUT;
    let mut json = false;
    let mut check = false;
    while let Some(arg) = args.next() {
        match arg {
            Arg::End => {
                if let Some(extra) = args.rest().first() {
                    return Err(UsageError::new(
                        args.subcommand,
                        format!("unexpected argument {extra:?}"),
                    ));
                }
            }
            Arg::Positional(extra) => {
                return Err(UsageError::new(
                    args.subcommand,
                    format!("unexpected argument {extra:?}"),
                ))
            }
            Arg::Opt(option, inline) => {
                let o = option.as_str();
                match o {
                    "--control" => control = Some(control_path(args.value(o, inline)?)?),
                    "--timeout" if !json_allowed => {
                        let text = args.text(o, inline)?;
                        timeout = parse_duration(&text).map_err(|e| UsageError::new(o, e))?;
                        if timeout.is_zero() {
                            return Err(UsageError::new(o, "must be more than 0"));
                        }
                    }
                    "--json" if json_allowed => {
                        args.no_value(o, &inline)?;
                        json = true;
                    }
                    "--check" if json_allowed => {
                        args.no_value(o, &inline)?;
                        check = true;
                    }
                    _ => return Err(args.unknown(o)),
                }
            }
        }
    }
    Ok(ClientConfig {
        control: control.unwrap_or_else(default_control_path),
        timeout,
        json,
        check,
    })
}

fn parse_upgrade(args: &mut Args) -> Result<Command, UsageError> {
    if args
        .args
        .as_slice()
        .iter()
        .any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help(UPGRADE_HELP));
    }
    parse_client(args, false).map(Command::Upgrade)
}

fn parse_status(args: &mut Args) -> Result<Command, UsageError> {
    if args
        .args
        .as_slice()
        .iter()
        .any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help(STATUS_HELP));
    }
    let mut config = parse_client(args, true)?;
    config.timeout = Duration::from_secs(10);
    Ok(Command::Status(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, UsageError> {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        match parse(all.iter().map(OsString::from))? {
            Command::Run(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    fn err(args: &[&str]) -> UsageError {
        match parse(args.iter().map(OsString::from)) {
            Err(e) => e,
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5x",
            "5 s",
            "5sec",
            "99999999999999999999s",
            "9000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for d in ["500ms", "30s", "2m", "1h", "0s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
        assert_eq!(format_duration(Duration::from_millis(1250)), "1.25s");
    }

    #[test]
    fn signals() {
        for text in ["TERM", "SIGTERM", "term", "15"] {
            assert_eq!(parse_signal(text), Ok(Signal::SIGTERM), "{text}");
        }
        assert_eq!(parse_signal("QUIT"), Ok(Signal::SIGQUIT));
        for bad in ["", "FOO", "99", "STOP", "CHLD", "-15"] {
            assert!(parse_signal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_urls() {
        let l = parse_listen("tcp://0.0.0.0:8080").unwrap();
        assert_eq!(l.name, "unknown");
        assert_eq!(
            l.address,
            ListenAddress::Tcp("0.0.0.0:8080".parse().unwrap())
        );
        let l = parse_listen("http=tcp://[::1]:0").unwrap();
        assert_eq!(l.name, "http");
        assert_eq!(l.address, ListenAddress::Tcp("[::1]:0".parse().unwrap()));
        let l = parse_listen("dns=udp://127.0.0.1:53").unwrap();
        assert_eq!(
            l.address,
            ListenAddress::Udp("127.0.0.1:53".parse().unwrap())
        );
        let l = parse_listen("api=unix:///run/app.sock").unwrap();
        assert_eq!(l.address, ListenAddress::Unix("/run/app.sock".into()));
        for bad in [
            "8080",
            "localhost:8080",
            "tcp://localhost:8080",
            "tcp://:8080",
            "tcp://1.2.3.4",
            "tcp://1.2.3.4:",
            "tcp://1.2.3.4:99999",
            "tcp://1.2.3.4:80x",
            "tcp://::1:80",
            "tcp://[::1]80",
            "tcp://[zz]:80",
            "http://1.2.3.4:80",
            "unix://relative.sock",
            "unix:///dir/",
            "a:b=tcp://1.2.3.4:80",
            "=tcp://1.2.3.4:80",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
        let long = format!("unix:///{}", "x".repeat(120));
        assert!(parse_listen(&long).is_err());
    }

    #[test]
    fn ready_modes() {
        assert_eq!(parse_ready("notify"), Ok(ReadyMode::Notify));
        assert_eq!(
            parse_ready("exec:curl -f localhost"),
            Ok(ReadyMode::Exec("curl -f localhost".into()))
        );
        assert_eq!(
            parse_ready("delay:2s"),
            Ok(ReadyMode::Delay(Duration::from_secs(2)))
        );
        for bad in ["", "exec:", "exec:  ", "delay:", "delay:5", "nope"] {
            assert!(parse_ready(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn run_defaults_and_options() {
        let c = run(&["--", "/app/server", "--config", "x"]).unwrap();
        assert_eq!(c.command, ["/app/server", "--config", "x"]);
        assert_eq!(c.ready, ReadyMode::Notify);
        assert_eq!(c.ready_timeout, Duration::from_secs(60));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.stop_signal, Signal::SIGTERM);
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert_eq!(c.restart, RestartPolicy::OnFailure);
        assert_eq!(c.control, default_control_path());
        assert_eq!(c.admin, None);
        assert!(!c.debug_no_reap);
        for (text, addr) in [
            ("127.0.0.1:9090", "127.0.0.1:9090"),
            ("tcp://0.0.0.0:0", "0.0.0.0:0"),
            ("[::]:9090", "[::]:9090"),
        ] {
            let c = run(&["--admin", text, "--", "a"]).unwrap();
            assert_eq!(c.admin, Some(addr.parse().unwrap()), "{text}");
        }

        let c = run(&[
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--listen=admin=unix:///tmp/a.sock",
            "--ready=delay:500ms",
            "--ready-timeout",
            "5s",
            "--drain-timeout=2m",
            "--stop-signal",
            "QUIT",
            "--shutdown-delay",
            "3s",
            "--restart",
            "never",
            "--control",
            "/tmp/c.sock",
            "--max-draining",
            "2",
            "--backlog",
            "64",
            "--debug-no-reap",
            "server",
            "--listen",
            "x",
        ])
        .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].name, "admin");
        assert_eq!(c.ready, ReadyMode::Delay(Duration::from_millis(500)));
        assert_eq!(c.ready_timeout, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(120));
        assert_eq!(c.stop_signal, Signal::SIGQUIT);
        assert_eq!(c.restart, RestartPolicy::Never);
        assert_eq!(c.control, Path::new("/tmp/c.sock"));
        assert_eq!((c.max_draining, c.backlog), (2, 64));
        assert!(c.debug_no_reap);
        // Options after the command belong to the command.
        assert_eq!(c.command, ["server", "--listen", "x"]);
    }

    #[test]
    fn worker_options() {
        let c = run(&["--", "a"]).unwrap();
        assert_eq!((c.workers, c.max_surge), (1, 1));
        let c = run(&["--workers", "4", "--max-surge=2", "--", "a"]).unwrap();
        assert_eq!((c.workers, c.max_surge), (4, 2));
        // A surge beyond N is N.
        let c = run(&["--workers=3", "--max-surge", "8", "--", "a"]).unwrap();
        assert_eq!((c.workers, c.max_surge), (3, 3));
    }

    #[test]
    fn probation_and_health_options() {
        let c = run(&["--", "a"]).unwrap();
        assert_eq!(
            (c.probation, &c.health, c.watchdog),
            (Duration::ZERO, &None, None)
        );
        let c = run(&[
            "--probation",
            "10s",
            "--health",
            "tcp://127.0.0.1:80",
            "--",
            "a",
        ])
        .unwrap();
        assert_eq!(c.probation, Duration::from_secs(10));
        let check = c.health.unwrap();
        assert_eq!(check.interval, Duration::from_secs(1));
        assert_eq!(check.timeout, Duration::from_secs(1));
        assert_eq!(check.threshold, 3);
        let c = run(&[
            "--health=http://127.0.0.1:8080/healthz",
            "--health-interval",
            "200ms",
            "--health-timeout=2s",
            "--health-threshold",
            "5",
            "--watchdog",
            "3s",
            "--",
            "a",
        ])
        .unwrap();
        let check = c.health.unwrap();
        assert_eq!(check.probe.to_string(), "http://127.0.0.1:8080/healthz");
        assert_eq!(
            (check.interval, check.timeout, check.threshold),
            (Duration::from_millis(200), Duration::from_secs(2), 5)
        );
        assert_eq!(c.watchdog, Some(Duration::from_secs(3)));
        let e = err(&["run", "--health", "http://h/x", "--", "a"]);
        assert_eq!(
            e.to_string(),
            "--health: \"http://h/x\": the port is missing (expected http://HOST:PORT)"
        );
        let e = err(&["run", "--health-threshold", "3", "--", "a"]);
        assert_eq!(
            e.to_string(),
            "--health-threshold: has no effect without --health"
        );
    }

    #[test]
    fn bad_run_options_name_the_option() {
        for (args, option) in [
            (&["run", "--listen", "tcp://x:1", "--", "a"][..], "--listen"),
            (&["run", "--listen"][..], "--listen"),
            (&["run", "--ready", "sometimes", "--", "a"][..], "--ready"),
            (
                &["run", "--ready-timeout", "5", "--", "a"][..],
                "--ready-timeout",
            ),
            (
                &["run", "--ready-timeout", "0s", "--", "a"][..],
                "--ready-timeout",
            ),
            (
                &["run", "--drain-timeout=x", "--", "a"][..],
                "--drain-timeout",
            ),
            (
                &["run", "--shutdown-delay", "1.5s", "--", "a"][..],
                "--shutdown-delay",
            ),
            (
                &["run", "--stop-signal", "NOPE", "--", "a"][..],
                "--stop-signal",
            ),
            (&["run", "--restart", "always", "--", "a"][..], "--restart"),
            (&["run", "--control", "", "--", "a"][..], "--control"),
            (
                &["run", "--max-draining", "0", "--", "a"][..],
                "--max-draining",
            ),
            (&["run", "--backlog", "x", "--", "a"][..], "--backlog"),
            (&["run", "--probation", "5", "--", "a"][..], "--probation"),
            (&["run", "--workers", "0", "--", "a"][..], "--workers"),
            (&["run", "--workers", "1025", "--", "a"][..], "--workers"),
            (&["run", "--max-surge", "0", "--", "a"][..], "--max-surge"),
            (&["run", "--health", "udp://h:1", "--", "a"][..], "--health"),
            (
                &[
                    "run",
                    "--health",
                    "exec:true",
                    "--health-interval",
                    "0s",
                    "--",
                    "a",
                ][..],
                "--health-interval",
            ),
            (
                &[
                    "run",
                    "--health",
                    "exec:true",
                    "--health-timeout",
                    "x",
                    "--",
                    "a",
                ][..],
                "--health-timeout",
            ),
            (
                &[
                    "run",
                    "--health",
                    "exec:true",
                    "--health-threshold",
                    "0",
                    "--",
                    "a",
                ][..],
                "--health-threshold",
            ),
            (&["run", "--watchdog", "0s", "--", "a"][..], "--watchdog"),
            (&["run", "--admin", "9090", "--", "a"][..], "--admin"),
            (
                &["run", "--admin", "localhost:9090", "--", "a"][..],
                "--admin",
            ),
            (&["status", "--check=1"][..], "--check"),
            (&["upgrade", "--check"][..], "--check"),
            (&["run", "--bogus", "--", "a"][..], "--bogus"),
            (
                &["run", "--debug-no-reap=1", "--", "a"][..],
                "--debug-no-reap",
            ),
            (
                &[
                    "run",
                    "--listen",
                    "tcp://1.2.3.4:1",
                    "--listen",
                    "tcp://1.2.3.4:2",
                    "--",
                    "a",
                ][..],
                "--listen",
            ),
            (
                &[
                    "run",
                    "--listen",
                    "a=tcp://1.2.3.4:1",
                    "--listen",
                    "a=tcp://1.2.3.4:2",
                    "--",
                    "a",
                ][..],
                "--listen",
            ),
            (&["run"][..], "run"),
            (&["run", "--"][..], "run"),
            (&["upgrade", "--timeout", "soon"][..], "--timeout"),
            (&["upgrade", "--json"][..], "--json"),
            (&["upgrade", "extra"][..], "upgrade"),
            (&["status", "--timeout", "1s"][..], "--timeout"),
            (&["bogus"][..], ""),
            (&[][..], ""),
            (&[""][..], ""),
        ] {
            let e = err(args);
            assert_eq!(e.option, option, "{args:?}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn clients() {
        match parse(["upgrade", "--control", "/x.sock", "--timeout", "10s"].map(OsString::from)) {
            Ok(Command::Upgrade(c)) => {
                assert_eq!(c.control, Path::new("/x.sock"));
                assert_eq!(c.timeout, Duration::from_secs(10));
            }
            other => panic!("{other:?}"),
        }
        match parse(["status", "--json"].map(OsString::from)) {
            Ok(Command::Status(c)) => assert!(c.json && !c.check),
            other => panic!("{other:?}"),
        }
        match parse(["status", "--check"].map(OsString::from)) {
            Ok(Command::Status(c)) => assert!(c.check && !c.json),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(["run", "--help"].map(OsString::from)),
            Ok(Command::Help(RUN_HELP))
        );
        assert_eq!(
            parse(["--help"].map(OsString::from)),
            Ok(Command::Help(HELP))
        );
        assert_eq!(
            parse(["--version"].map(OsString::from)),
            Ok(Command::Version)
        );
    }
}
