//! [`check_upgrades`]: start a server, load it, upgrade it N times, count what failed.

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Signal;

use super::load::{Failures, Load, LoadConfig, Mode, Report};
use super::server::{Exit, ProcStat, Server};
use super::wait::{poll_until, Poll};
use super::Error;

/// How [`check_upgrades`] knows that a generation is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Readiness {
    /// Each generation prints `ready pid=<pid> generation=<n>` on stdout (optionally followed
    /// by `addr=<ip:port>`, which then is where the load goes), like the crate's examples.
    /// An upgrade has succeeded when a ready line of a higher generation appears.
    ReadyLine,
    /// For servers that print nothing: the first generation is ready once a TCP connection to
    /// [`UpgradeCheck::addr`] succeeds. An upgrade has succeeded once a process of the server's
    /// process group that was alive at the trigger has exited (the replaced generation) and
    /// one started after the trigger is alive (the new one).
    ///
    /// # Caveats
    /// A helper process of the server that exits by itself looks like a replaced generation,
    /// and a failed upgrade is seen only at [`UpgradeCheck::upgrade_timeout`] (set it above
    /// the server's ready timeout plus its drain time).
    Connect,
}

/// Which process gets the upgrade signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// The generation serving now: the pid of the latest ready line
    /// ([`Readiness::ReadyLine`]), or the youngest process of the group
    /// ([`Readiness::Connect`]). Right for servers that upgrade themselves.
    Latest,
    /// The process started, always: right for a supervisor such as `handover run`.
    Started,
}

/// What [`check_upgrades`] does. Build with [`UpgradeCheck::new`] and the by-value setters;
/// the defaults are documented on each field.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UpgradeCheck {
    /// Upgrades to trigger, one after another.
    pub upgrades: u32,
    /// Loads run side by side during the whole check. Default: 8 keep-alive connections and
    /// 4 workers opening a connection per request.
    pub loads: Vec<Mode>,
    /// How readiness is seen. Default [`Readiness::ReadyLine`].
    pub readiness: Readiness,
    /// Where the load goes. Default: the `addr=` of the first ready line (required with
    /// [`Readiness::Connect`]). Use a loopback address.
    pub addr: Option<SocketAddr>,
    /// Request target. Default `/`.
    pub path: String,
    /// The upgrade signal. Default SIGHUP.
    pub signal: Signal,
    /// Who gets it. Default [`Target::Latest`].
    pub target: Target,
    /// Budget of the first generation to become ready. Default 30 s.
    pub start_timeout: Duration,
    /// Budget of each upgrade, from the signal to success. Default 60 s.
    pub upgrade_timeout: Duration,
    /// With [`Readiness::ReadyLine`]: also wait for the replaced generation to exit before
    /// the next upgrade (and report when it did). Default true.
    pub wait_old_exit: bool,
    /// Budget of a replaced generation to exit, and of the final stop. Default 60 s.
    pub exit_timeout: Duration,
    /// Successful requests (all loads together) before the first upgrade and after each one,
    /// so that every generation is loaded while it serves and while it drains. Default 200.
    pub requests_between: u64,
    /// Budget of one request. Default 5 s.
    pub request_timeout: Duration,
    /// Hard bound of the whole check's load. Default 10 min.
    pub max_duration: Duration,
}

impl UpgradeCheck {
    /// A check of `upgrades` upgrades with the defaults documented on each field.
    pub fn new(upgrades: u32) -> UpgradeCheck {
        UpgradeCheck {
            upgrades,
            loads: vec![
                Mode::KeepAlive { connections: 8 },
                Mode::PerRequest { concurrency: 4 },
            ],
            readiness: Readiness::ReadyLine,
            addr: None,
            path: "/".to_string(),
            signal: Signal::SIGHUP,
            target: Target::Latest,
            start_timeout: Duration::from_secs(30),
            upgrade_timeout: Duration::from_secs(60),
            wait_old_exit: true,
            exit_timeout: Duration::from_secs(60),
            requests_between: 200,
            request_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(600),
        }
    }

    /// Sets the loads.
    pub fn loads(mut self, loads: Vec<Mode>) -> UpgradeCheck {
        self.loads = loads;
        self
    }

    /// Sets how readiness is seen.
    pub fn readiness(mut self, readiness: Readiness) -> UpgradeCheck {
        self.readiness = readiness;
        self
    }

    /// Sets where the load goes.
    pub fn addr(mut self, addr: SocketAddr) -> UpgradeCheck {
        self.addr = Some(addr);
        self
    }

    /// Sets the request target.
    pub fn path(mut self, path: impl Into<String>) -> UpgradeCheck {
        self.path = path.into();
        self
    }

    /// Sets the upgrade signal.
    pub fn signal(mut self, signal: Signal) -> UpgradeCheck {
        self.signal = signal;
        self
    }

    /// Sets who gets the upgrade signal.
    pub fn target(mut self, target: Target) -> UpgradeCheck {
        self.target = target;
        self
    }

    /// Sets the start budget.
    pub fn start_timeout(mut self, timeout: Duration) -> UpgradeCheck {
        self.start_timeout = timeout;
        self
    }

    /// Sets the budget of each upgrade.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> UpgradeCheck {
        self.upgrade_timeout = timeout;
        self
    }

    /// Sets whether to wait for each replaced generation to exit.
    pub fn wait_old_exit(mut self, wait: bool) -> UpgradeCheck {
        self.wait_old_exit = wait;
        self
    }

    /// Sets the exit budget.
    pub fn exit_timeout(mut self, timeout: Duration) -> UpgradeCheck {
        self.exit_timeout = timeout;
        self
    }

    /// Sets the successful requests between two upgrades.
    pub fn requests_between(mut self, n: u64) -> UpgradeCheck {
        self.requests_between = n;
        self
    }

    /// Sets the budget of one request.
    pub fn request_timeout(mut self, timeout: Duration) -> UpgradeCheck {
        self.request_timeout = timeout;
        self
    }

    /// Sets the bound of the whole load.
    pub fn max_duration(mut self, bound: Duration) -> UpgradeCheck {
        self.max_duration = bound;
        self
    }
}

/// What happened to one upgrade.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UpgradeOutcome {
    /// 1 for the first upgrade.
    pub number: u32,
    /// Whether a new generation took over.
    pub ok: bool,
    /// The process that got the signal.
    pub signalled: i32,
    /// The generation replaced (its pid).
    pub old_pid: Option<i32>,
    /// The new generation's pid.
    pub new_pid: Option<i32>,
    /// The new generation's number (from its ready line).
    pub generation: Option<u64>,
    /// From the signal to the new generation's ready line.
    pub ready_after: Option<Duration>,
    /// From the signal to the replaced generation's exit.
    pub old_exit_after: Option<Duration>,
    /// How the replaced generation exited.
    pub old_exit: Option<Exit>,
    /// Why the upgrade failed.
    pub error: Option<String>,
}

impl UpgradeOutcome {
    /// An upgrade just triggered: nothing known yet but who got the signal.
    fn pending(number: u32, signalled: i32, old_pid: Option<i32>) -> UpgradeOutcome {
        UpgradeOutcome {
            number,
            ok: false,
            signalled,
            old_pid,
            new_pid: None,
            generation: None,
            ready_after: None,
            old_exit_after: None,
            old_exit: None,
            error: None,
        }
    }
}

/// What [`check_upgrades`] saw. `Display` renders it as a table.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// One entry per upgrade triggered, in order.
    pub upgrades: Vec<UpgradeOutcome>,
    /// Each load and what it saw.
    pub loads: Vec<(Mode, Report)>,
    /// How the serving generation exited after the final stop signal (SIGTERM).
    pub final_exit: Option<Exit>,
    /// Time from the start of the command to the end of the load.
    pub elapsed: Duration,
}

impl UpgradeReport {
    /// Upgrades that succeeded.
    pub fn upgrades_ok(&self) -> usize {
        self.upgrades.iter().filter(|u| u.ok).count()
    }

    /// Upgrades that failed.
    pub fn upgrades_failed(&self) -> usize {
        self.upgrades.len() - self.upgrades_ok()
    }

    /// Failed requests of all loads, by class.
    pub fn failures(&self) -> Failures {
        let mut total = Failures::default();
        for (_, report) in &self.loads {
            total.add(&report.failures);
        }
        total
    }

    /// Requests sent by all loads (ok and failed).
    pub fn requests(&self) -> u64 {
        self.loads.iter().map(|(_, r)| r.requests()).sum()
    }

    /// Whether every upgrade succeeded, with a new pid each time, and no request failed.
    pub fn passed(&self) -> bool {
        let mut pids: Vec<i32> = self.upgrades.iter().filter_map(|u| u.new_pid).collect();
        let n = pids.len();
        pids.sort_unstable();
        pids.dedup();
        self.upgrades_failed() == 0
            && pids.len() == n
            && self.failures().total() == 0
            && self.requests() > 0
    }

    fn durations(&self, f: impl Fn(&UpgradeOutcome) -> Option<Duration>) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.upgrades.iter().filter_map(f).collect();
        v.sort_unstable();
        v
    }
}

fn median(sorted: &[Duration]) -> Option<Duration> {
    sorted.get(sorted.len() / 2).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_string(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
    )
}

impl fmt::Display for UpgradeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} upgrades ok, {} failed; {} requests, {} failed, in {:.1?}",
            if self.passed() { "PASSED" } else { "FAILED" },
            self.upgrades_ok(),
            self.upgrades_failed(),
            self.requests(),
            self.failures().total(),
            self.elapsed
        )?;
        writeln!(
            f,
            "  {:<22} {:>9} {:>7} {:>7} {:>5} {:>7} {:>7} {:>5} {:>6} {:>9} {:>9}",
            "load",
            "requests",
            "refused",
            "reset",
            "eof",
            "timeout",
            "status",
            "other",
            "conns",
            "p50",
            "p99"
        )?;
        for (mode, r) in &self.loads {
            let x = &r.failures;
            writeln!(
                f,
                "  {:<22} {:>9} {:>7} {:>7} {:>5} {:>7} {:>7} {:>5} {:>6} {:>9} {:>9}",
                mode.to_string(),
                r.requests(),
                x.refused,
                x.reset,
                x.eof_before_response,
                x.timeout,
                x.bad_status,
                x.other,
                r.connections,
                ms(r.p50()),
                ms(r.p99())
            )?;
        }
        let ready = self.durations(|u| u.ready_after);
        let exit = self.durations(|u| u.old_exit_after);
        writeln!(
            f,
            "  trigger -> ready: median {}, max {}; trigger -> old generation exit: median {}, max {}",
            ms(median(&ready)),
            ms(ready.last().copied()),
            ms(median(&exit)),
            ms(exit.last().copied())
        )?;
        for u in self.upgrades.iter().filter(|u| !u.ok) {
            writeln!(
                f,
                "  upgrade {} failed: {}",
                u.number,
                u.error.as_deref().unwrap_or("?")
            )?;
        }
        if let Some(exit) = self.final_exit {
            writeln!(f, "  final stop (SIGTERM): {exit}")?;
        }
        for (mode, r) in &self.loads {
            for (class, samples) in &r.samples {
                for s in samples {
                    writeln!(f, "  {mode} [{class}] {s}")?;
                }
            }
        }
        Ok(())
    }
}

/// Starts `command`, puts load on it, triggers `check.upgrades` upgrades one after another,
/// and reports every failed request by class: the "zero failed requests across N upgrades"
/// check, for a server's own CI.
///
/// The command runs in a process group of its own; everything in it is killed and reaped
/// before this returns, whatever happens. The load uses the crate's HTTP/1.1 client
/// ([`Load`]), which never retries and counts refused connections, resets, EOF before a
/// response, timeouts and non-2xx statuses.
///
/// ```no_run
/// use std::process::Command;
/// use handover::testkit::{check_upgrades, UpgradeCheck};
///
/// # fn main() -> Result<(), handover::testkit::Error> {
/// // The server prints `ready pid=<pid> generation=<n> addr=<ip:port>` when ready and
/// // upgrades itself on SIGHUP.
/// let mut server = Command::new("target/debug/my_server");
/// server.args(["--listen", "127.0.0.1:0"]);
/// let report = check_upgrades(server, UpgradeCheck::new(10))?;
/// println!("{report}");
/// assert!(report.passed(), "{report}");
/// # Ok(())
/// # }
/// ```
///
/// A failed upgrade or a failed request is not an error: it is in the report (see
/// [`UpgradeReport::passed`]). When the server is gone (it died of the upgrade signal, say),
/// no further upgrade is triggered.
///
/// # Errors
/// [`Error::Spawn`] if the command cannot start; [`Error::Wait`] if the first generation is
/// not ready within [`UpgradeCheck::start_timeout`] or no load gets through before the first
/// upgrade or after a successful one; [`Error::Config`] if there is no address to load.
///
/// # Caveats
/// The calling process becomes a child subreaper (see [`Server`]).
pub fn check_upgrades(command: Command, check: UpgradeCheck) -> Result<UpgradeReport, Error> {
    if check.loads.is_empty() || check.loads.iter().any(|m| m.workers() == 0) {
        return Err(Error::config("every load needs at least one worker"));
    }
    if check.readiness == Readiness::Connect && check.addr.is_none() {
        return Err(Error::config(
            "Readiness::Connect needs UpgradeCheck::addr (where to connect)",
        ));
    }
    let started = Instant::now();
    let server = Server::spawn(command)?;
    let addr = match check.readiness {
        Readiness::ReadyLine => {
            let first = server.wait_ready(1, check.start_timeout)?;
            check.addr.or(first.addr).ok_or_else(|| {
                Error::config("no UpgradeCheck::addr and no addr= in the ready line")
            })?
        }
        Readiness::Connect => {
            let addr = check.addr.ok_or_else(|| Error::config("no address"))?;
            wait_connectable(&server, addr, check.start_timeout)?;
            addr
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<(Mode, Load)> = check
        .loads
        .iter()
        .map(|mode| {
            let cfg = LoadConfig::new(addr, *mode)
                .path(check.path.clone())
                .request_timeout(check.request_timeout)
                .max_duration(check.max_duration)
                .stop_flag(stop.clone());
            (*mode, Load::start(cfg))
        })
        .collect();
    wait_more_ok(&loads, check.requests_between, check.start_timeout)?;

    let mut upgrades = Vec::new();
    for number in 1..=check.upgrades {
        let outcome = match check.readiness {
            Readiness::ReadyLine => upgrade_by_ready_line(&server, &check, number),
            Readiness::Connect => upgrade_by_processes(&server, &check, number),
        };
        let ok = outcome.ok;
        upgrades.push(outcome);
        if server.members().is_empty() {
            break; // nothing left to upgrade: the report says what happened
        }
        if ok {
            // Load on the new generation (and on the old one while it drains, if its exit is
            // not awaited) before the next trigger.
            wait_more_ok(&loads, check.requests_between, check.upgrade_timeout)?;
        }
    }

    let loads: Vec<(Mode, Report)> = loads
        .into_iter()
        .map(|(mode, load)| (mode, load.stop()))
        .collect();
    let elapsed = started.elapsed();
    let final_exit = final_stop(&server, &check);
    Ok(UpgradeReport {
        upgrades,
        loads,
        final_exit,
        elapsed,
    })
}

/// SIGTERM to the serving generation, a wait for it to exit, then the rest of the group.
fn final_stop(server: &Server, check: &UpgradeCheck) -> Option<Exit> {
    let pid = match (check.readiness, check.target) {
        (_, Target::Started) => server.pid(),
        (Readiness::ReadyLine, Target::Latest) => server.latest_ready().map(|r| r.pid)?,
        (Readiness::Connect, Target::Latest) => server.members().last().map(|p| p.pid)?,
    };
    server.signal(pid, crate::Signal::SIGTERM).ok()?;
    let exit = server.wait_exit(pid, check.exit_timeout).ok();
    let _ = server.stop(crate::Signal::SIGTERM, check.exit_timeout);
    exit
}

fn wait_connectable(server: &Server, addr: SocketAddr, timeout: Duration) -> Result<(), Error> {
    poll_until(
        format!("a connection to {addr} to succeed"),
        timeout,
        || {
            if server.members().is_empty() {
                return Poll::Failed(format!("the server exited\n{}", server.dump()));
            }
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(_) => Poll::Ready(()),
                Err(e) => Poll::Pending(e.to_string()),
            }
        },
    )
}

fn wait_more_ok(loads: &[(Mode, Load)], n: u64, timeout: Duration) -> Result<(), Error> {
    let ok = |loads: &[(Mode, Load)]| loads.iter().map(|(_, l)| l.ok_count()).sum::<u64>();
    let target = ok(loads) + n;
    poll_until(format!("{n} more successful responses"), timeout, || {
        let finished = loads.iter().all(|(_, l)| l.is_finished());
        let now = ok(loads);
        if now >= target {
            Poll::Ready(())
        } else if finished {
            Poll::Failed(format!("the load finished with {now} successful responses"))
        } else {
            let failed: u64 = loads.iter().map(|(_, l)| l.failure_count()).sum();
            Poll::Pending(format!("{now} successful, {failed} failed"))
        }
    })
    .map_err(|e| {
        let reports: Vec<String> = loads
            .iter()
            .map(|(_, l)| l.snapshot().to_string())
            .collect();
        e.with_detail(&reports.join(""))
    })
}

fn upgrade_by_ready_line(server: &Server, check: &UpgradeCheck, number: u32) -> UpgradeOutcome {
    let current = server.latest_ready();
    let generation = current.as_ref().map_or(1, |r| r.generation);
    let old_pid = current.as_ref().map(|r| r.pid);
    let signalled = match check.target {
        Target::Started => server.pid(),
        Target::Latest => old_pid.unwrap_or_else(|| server.pid()),
    };
    let mut outcome = UpgradeOutcome::pending(number, signalled, old_pid);
    let trigger = Instant::now();
    if let Err(e) = server.signal(signalled, check.signal) {
        outcome.error = Some(e.to_string());
        return outcome;
    }
    match server.wait_ready_after(generation, check.upgrade_timeout) {
        Ok(ready) => {
            outcome.ok = true;
            outcome.new_pid = Some(ready.pid);
            outcome.generation = Some(ready.generation);
            outcome.ready_after = Some(ready.at.saturating_duration_since(trigger));
            if old_pid == Some(ready.pid) {
                outcome.ok = false;
                outcome.error = Some(format!(
                    "generation {} reports the same pid {} as generation {generation}",
                    ready.generation, ready.pid
                ));
            }
        }
        Err(e) => {
            outcome.error = Some(format!("no new generation: {e}"));
            return outcome;
        }
    }
    if check.wait_old_exit && outcome.ok {
        if let Some(pid) = old_pid {
            match server.wait_exit(pid, check.exit_timeout) {
                Ok(exit) => {
                    outcome.old_exit_after = Some(trigger.elapsed());
                    outcome.old_exit = Some(exit);
                    if matches!(exit, Exit::Code(c) if c != 0) || matches!(exit, Exit::Signal(_)) {
                        outcome.ok = false;
                        outcome.error = Some(format!("the replaced generation ended by {exit}"));
                    }
                }
                Err(e) => {
                    outcome.ok = false;
                    outcome.error = Some(format!("the replaced generation did not exit: {e}"));
                }
            }
        }
    }
    outcome
}

fn upgrade_by_processes(server: &Server, check: &UpgradeCheck, number: u32) -> UpgradeOutcome {
    let before = server.members();
    let signalled = match check.target {
        Target::Started => server.pid(),
        Target::Latest => before.last().map_or(server.pid(), |p| p.pid),
    };
    let mut outcome = UpgradeOutcome::pending(number, signalled, None);
    let same = |a: &ProcStat, b: &ProcStat| a.pid == b.pid && a.start_time == b.start_time;
    let trigger = Instant::now();
    if let Err(e) = server.signal(signalled, check.signal) {
        outcome.error = Some(e.to_string());
        return outcome;
    }
    let mut seen_new = false;
    let result = poll_until(
        format!("upgrade {number} to replace a generation"),
        check.upgrade_timeout,
        || {
            let now = server.members();
            let new: Vec<&ProcStat> = now
                .iter()
                .filter(|p| !before.iter().any(|b| same(b, p)))
                .collect();
            let gone: Vec<&ProcStat> = before
                .iter()
                .filter(|b| !now.iter().any(|p| same(b, p)))
                .collect();
            seen_new |= !new.is_empty();
            match (gone.first(), new.last()) {
                (Some(old), Some(new)) => Poll::Ready((old.pid, new.pid)),
                (None, None) if seen_new => Poll::Failed(
                    "the new process exited and the old ones are still serving".to_string(),
                ),
                _ => Poll::Pending(format!("before {before:?}, now {now:?}")),
            }
        },
    );
    match result {
        Ok((old, new)) => {
            outcome.ok = true;
            outcome.old_pid = Some(old);
            outcome.new_pid = Some(new);
            outcome.old_exit_after = Some(trigger.elapsed());
            outcome.old_exit = server.wait_exit(old, check.exit_timeout).ok();
        }
        Err(e) => outcome.error = Some(e.to_string()),
    }
    outcome
}
