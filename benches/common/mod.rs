//! Shared by the benchmarks and the demo (`examples/demo.rs` includes this file): building
//! the examples, cleaning up on Ctrl-C, CPU pinning, statistics and the machine description.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------------------
// Building what is measured, in the target directory and profile of the running binary.

/// Where cargo put the running binary: `<target-dir>[/<triple>]/<profile-dir>/{examples,deps}/`.
struct Layout {
    /// `<target-dir>`.
    target_dir: PathBuf,
    /// `--target <triple>`, if any.
    triple: Option<String>,
    /// `<target-dir>[/<triple>]/<profile-dir>`.
    profile_dir: PathBuf,
}

fn layout() -> Result<Layout, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let odd = || format!("unexpected binary location {}", exe.display());
    let profile_dir = exe
        .parent()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n == "deps" || n == "examples")
        })
        .and_then(Path::parent)
        .ok_or_else(odd)?
        .to_path_buf();
    let above = profile_dir.parent().ok_or_else(odd)?;
    if above.join("CACHEDIR.TAG").exists() {
        return Ok(Layout {
            target_dir: above.to_path_buf(),
            triple: None,
            profile_dir,
        });
    }
    match above
        .parent()
        .filter(|root| root.join("CACHEDIR.TAG").exists())
    {
        Some(root) => Ok(Layout {
            target_dir: root.to_path_buf(),
            triple: above.file_name().map(|t| t.to_string_lossy().into_owned()),
            profile_dir,
        }),
        None => Err(odd()),
    }
}

/// Runs `cargo build <what>` with the profile, target directory and triple of the running
/// binary; returns the profile directory (`target/release`).
fn cargo_build(what: &[&str]) -> Result<PathBuf, String> {
    let layout = layout()?;
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest_dir)
        .arg("build")
        .args(what)
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&layout.target_dir);
    match layout.profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => return Err("no profile directory".to_string()),
    }
    if let Some(triple) = &layout.triple {
        cmd.args(["--target", triple]);
    }
    let output = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(layout.profile_dir)
}

/// Builds the examples `names` (one cargo call) and returns their paths, in order.
pub fn build_examples(names: &[&str]) -> Result<Vec<PathBuf>, String> {
    let mut args = Vec::new();
    for name in names {
        args.push("--example");
        args.push(name);
    }
    let dir = cargo_build(&args)?.join("examples");
    Ok(names.iter().map(|n| dir.join(n)).collect())
}

/// The `handover` binary (`handover run`), built, if this tree has it (`src/bin/handover.rs`).
pub fn build_handover_bin() -> Result<Option<PathBuf>, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/handover.rs");
    if !source.is_file() {
        return Ok(None);
    }
    let dir = cargo_build(&["--bin", "handover"])?;
    Ok(Some(dir.join("handover")))
}

// ---------------------------------------------------------------------------------------------
// Cleanup on Ctrl-C: the servers run in process groups of their own, so the terminal's SIGINT
// reaches only us; a thread waits for it, kills every registered group and reaps.

static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Catches SIGINT, SIGTERM and SIGQUIT (from now on: call it first thing in `main`): a thread
/// then kills every registered process group with SIGKILL, reaps what it can, removes the
/// [`TempDir`]s and exits with 128 + signal. The handlers are tokio's; the signals are not
/// blocked, so children do not inherit a signal mask (std's `Command` does not reset it).
pub fn cleanup_on_signals() {
    if let Err(e) = install_cleanup() {
        eprintln!("warning: no cleanup on Ctrl-C ({e}); servers may be left behind");
    }
}

fn install_cleanup() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The handlers are installed here, before this returns.
    let (mut int, mut term, mut quit) = {
        let _entered = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::quit())?,
        )
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => libc::SIGINT,
                    _ = term.recv() => libc::SIGTERM,
                    _ = quit.recv() => libc::SIGQUIT,
                }
            });
            eprintln!("\nsignal {sig}: stopping every server started here");
            kill_registered();
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

/// Seconds since midnight of the `n`th (from 1) log line containing `needle` (the RFC 3339
/// timestamp tracing puts first): durations by the processes' own clocks.
pub fn log_timestamp(text: &str, needle: &str, n: usize) -> Option<f64> {
    let line = text
        .lines()
        .filter(|l| l.contains(needle))
        .nth(n.checked_sub(1)?)?;
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Registers a process group for [`cleanup_on_signals`].
pub fn register_group(pgid: i32) {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
}

fn kill_registered() {
    let groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pgid in &groups {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
    // Every generation is our child (we are a subreaper): reap until none is left, or 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Ok(_) => {}
            Err(_) => break, // ECHILD: nothing left
        }
    }
    for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

// ---------------------------------------------------------------------------------------------
// CPU pinning.

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread (and the threads and processes it starts from now on) to `cpu`.
pub fn pin_to(cpu: usize) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("sched_setaffinity(cpu {cpu}): {e}"))
}

/// Lets the calling thread run on every CPU again.
pub fn unpin(cpus: usize) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..cpus {
        set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
    }
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("sched_setaffinity: {e}"))
}

/// CPU time (user + system) of this whole process so far.
pub fn own_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `struct rusage` into the pointer it is given, which points to
    // memory of that type, zero-initialised so that it is valid even if the call failed.
    let (rc, usage) = unsafe {
        let rc = libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        (rc, usage.assume_init())
    };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (user + system) of process `pid` so far, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: i32) -> Option<Duration> {
    let stat = handover::testkit::proc_stat(pid)?;
    let ticks = stat.utime + stat.stime;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Busy and total jiffies of each CPU (`cpuN` lines of `/proc/stat`), by CPU number.
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        if name.len() <= 3 || !name.starts_with("cpu") {
            continue;
        }
        // user nice system idle iowait irq softirq steal ...
        let v: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if v.len() < 8 {
            continue;
        }
        let total: u64 = v.iter().sum();
        let idle = v[3] + v[4];
        cpus.push((total - idle, total));
    }
    cpus
}

/// Fraction of time CPU `cpu` was busy (with anything) between two [`cpu_jiffies`] snapshots.
pub fn cpu_busy(before: &[(u64, u64)], after: &[(u64, u64)], cpu: usize) -> f64 {
    match (before.get(cpu), after.get(cpu)) {
        (Some(b), Some(a)) if a.1 > b.1 => (a.0 - b.0) as f64 / (a.1 - b.1) as f64,
        _ => 0.0,
    }
}

/// The 1-minute load average (other work on the machine skews every figure).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting.

/// The median (upper middle) of `values`; `None` if empty.
pub fn median<T: Copy + PartialOrd>(values: &[T]) -> Option<T> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// Median of durations.
pub fn median_d(values: &[Duration]) -> Duration {
    median(values).unwrap_or_default()
}

/// `12.3 ms`.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `1 234 567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// One line describing the machine: CPUs, CPU model, kernel.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".to_string());
    format!(
        "{} CPUs ({model}), Linux {kernel}, load average {} at start",
        cpus(),
        loadavg()
    )
}

// ---------------------------------------------------------------------------------------------
// Files and ports.

/// A directory of its own, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/handover-<tag>-<pid>`.
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let path = std::env::temp_dir().join(format!("handover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Puts `body` at `target` the way a deploy does: written beside it, then renamed over it.
pub fn deploy(target: &Path, body: Deploy<'_>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let staging = target.with_extension("deploying");
    let err = |e: std::io::Error| format!("deploying {}: {e}", target.display());
    match body {
        Deploy::Binary(src) => {
            std::fs::copy(src, &staging).map_err(err)?;
        }
        Deploy::Script(text) => {
            std::fs::write(&staging, format!("#!/bin/sh\n{text}\n")).map_err(err)?;
        }
    }
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    std::fs::rename(&staging, target).map_err(err)
}

/// What [`deploy`] puts in place.
pub enum Deploy<'a> {
    /// A copy of this executable.
    Binary(&'a Path),
    /// A shell script with this body.
    Script(&'a str),
}

/// A loopback port that was free a moment ago (bound, then closed).
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// The `main` of every bench: [`cleanup_on_signals`], then `run`; its error is printed as
/// `<name>: <error>` and ends the process with exit code 1.
pub fn main(name: &str, run: fn() -> Result<(), String>) {
    cleanup_on_signals();
    if let Err(e) = run() {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}
