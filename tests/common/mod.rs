//! Shared process-level test harness: `mod common;` in an integration test.
//!
//! - [`example_path`]: builds the examples once per test binary and locates one.
//! - [`ServerProcess`] (in `proc`): a server under test in its own process group, its ready
//!   lines, signals, exits of every generation, cleanup on drop; `/proc` helpers
//!   ([`zombies`], [`fd_count`], ...).
//! - [`load`]: an HTTP/1.1 load client that counts every failure by class.
//! - [`wait_for`] / [`poll_until`] / [`Deadline`]: every wait has a deadline and says what it
//!   waited for.
#![allow(dead_code)]

pub mod http;
pub mod load;
pub mod proc;
pub mod wait;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use self::proc::{
    all_processes, become_subreaper, children_of, fd_count, fd_targets, is_alive, proc_stat,
    zombies, Exit, ProcStat, Ready, ServerProcess, EXIT_TIMEOUT, READY_TIMEOUT,
};
#[allow(unused_imports)]
pub use self::wait::{poll_until, wait_for, wait_until, Deadline, Poll};
#[allow(unused_imports)]
pub use nix::sys::signal::Signal;
#[allow(unused_imports)]
pub use nix::unistd::Pid;

/// Seconds since midnight of the first log line containing `needle` (the RFC 3339 timestamp
/// tracing puts first): for timing assertions by the processes' own clocks.
pub fn log_timestamp(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Path of example `name`, built (once per test binary, with `cargo build --examples`) in the
/// target directory and profile this test binary was built in. Panics with cargo's output if
/// the build fails, or if the example does not exist.
pub fn example_path(name: &str) -> PathBuf {
    static EXAMPLES_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match EXAMPLES_DIR.get_or_init(build_examples) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "example `{name}` not found at {} after `cargo build --examples`",
        path.display()
    );
    path
}

/// Runs `cargo build --examples` for this crate with the profile, target directory and target
/// triple of the running test binary, which lives in `<target-dir>[/<triple>]/<profile-dir>/deps/`.
/// Returns `<...>/<profile-dir>/examples`.
fn build_examples() -> Result<PathBuf, String> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(manifest_dir)
        .args(["build", "--examples", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"));

    let layout = exe
        .parent()
        .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent);
    let examples_dir = match layout {
        Some(profile_dir) => {
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => {}
                Some("release") => {
                    cmd.arg("--release");
                }
                Some(other) => {
                    cmd.args(["--profile", other]);
                }
                None => return Err(format!("odd test binary path {}", exe.display())),
            }
            let mut target_dir = profile_dir
                .parent()
                .ok_or_else(|| format!("odd test binary path {}", exe.display()))?;
            // With `--target <triple>` the layout is <target-dir>/<triple>/<profile-dir>; the
            // target dir root is the one holding CACHEDIR.TAG.
            if !target_dir.join("CACHEDIR.TAG").exists() {
                if let Some(root) = target_dir
                    .parent()
                    .filter(|root| root.join("CACHEDIR.TAG").exists())
                {
                    let triple = target_dir.file_name().expect("triple dir has a name");
                    cmd.arg("--target").arg(triple);
                    target_dir = root;
                }
            }
            cmd.arg("--target-dir").arg(target_dir);
            profile_dir.join("examples")
        }
        None => {
            // Not the usual layout (a test runner that moved the binary): default target dir.
            let target_dir = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest_dir.join("target"));
            cmd.arg("--target-dir").arg(&target_dir);
            target_dir.join("debug").join("examples")
        }
    };

    let output = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(examples_dir)
}

/// A directory of its own for one test, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/handover-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("handover-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a per-test temp dir");
        TempDir(path)
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

/// What a deploy puts at the path a server was started from.
pub enum Deploy<'a> {
    /// A copy of this executable.
    Binary(&'a Path),
    /// A shell script with this body.
    Script(&'a str),
    /// Nothing: the file is removed.
    Missing,
    /// A copy of this executable without execute permission.
    NotExecutable(&'a Path),
}

/// Replaces `target` the way a deploy does: write beside it, then rename
/// over it (so a running binary is never written to).
pub fn deploy(target: &Path, what: Deploy<'_>) {
    use std::os::unix::fs::PermissionsExt;
    let staging = target.with_extension("deploying");
    let mode = match what {
        Deploy::Binary(src) => {
            std::fs::copy(src, &staging).expect("copy the binary");
            0o755
        }
        Deploy::Script(body) => {
            std::fs::write(&staging, format!("#!/bin/sh\n{body}\n")).expect("write a script");
            0o755
        }
        Deploy::NotExecutable(src) => {
            std::fs::copy(src, &staging).expect("copy the binary");
            0o644
        }
        Deploy::Missing => {
            let _ = std::fs::remove_file(target);
            return;
        }
    };
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&staging, target).expect("rename into place");
}
