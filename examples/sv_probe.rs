//! A test program for the `handover run` supervisor's PID-1 duties (used by
//! `tests/pid1.rs`; not an example of the library).
//!
//! ```text
//! sv_probe exit N            exit with status N
//! sv_probe kill SIG          die of signal SIG (a number), without a core dump
//! sv_probe signals [--ignore-term]
//!                            print `signals pid=<pid>`, then `got <SIG>` for each of
//!                            SIGUSR1, SIGUSR2, SIGINT, SIGTERM, SIGQUIT, SIGWINCH received;
//!                            exit 0 on SIGINT or SIGTERM (unless --ignore-term)
//! sv_probe orphan            leave a grandchild orphaned: it prints `grandchild exiting
//!                            pid=<pid>` and exits once its parent is gone; then print
//!                            `orphaned pid=<pid>` and behave as `signals`
//! ```
//!
//! It is single-threaded, so forking without exec is safe here.

use std::io::Write;

use nix::sys::signal::{SigSet, Signal};

fn usage() -> ! {
    eprintln!("usage: sv_probe exit N | kill SIG | signals [--ignore-term] | orphan");
    std::process::exit(100)
}

fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Waits for the signals of `signals` mode, printing each.
fn signals(ignore_term: bool) -> ! {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    // Blocked so that sigwait takes them; the mask the supervisor gave us is
    // inspected by the tests before this (or on other programs).
    if let Err(e) = set.thread_block() {
        eprintln!("sv_probe: cannot block signals: {e}");
        std::process::exit(101);
    }
    line(&format!("signals pid={}", std::process::id()));
    loop {
        match set.wait() {
            Ok(signal) => {
                line(&format!("got {}", signal.as_str()));
                if !ignore_term && matches!(signal, Signal::SIGINT | Signal::SIGTERM) {
                    std::process::exit(0);
                }
            }
            Err(e) => {
                eprintln!("sv_probe: sigwait: {e}");
                std::process::exit(102);
            }
        }
    }
}

fn die_of(signo: i32) -> ! {
    // SAFETY: plain calls with integer arguments: no core dump (PR_SET_DUMPABLE
    // 0 also stops a piped core_pattern), default action for the signal, an
    // empty mask so that it is delivered, then raise it.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::signal(signo, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::raise(signo);
    }
    eprintln!("sv_probe: signal {signo} did not kill me");
    std::process::exit(103)
}

fn orphan() -> ! {
    let (read, write) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sv_probe: pipe: {e}");
            std::process::exit(104);
        }
    };
    // SAFETY: this program is single-threaded, so the forked child may run
    // ordinary code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // The intermediate process: start the grandchild, then exit so
            // that the grandchild is orphaned.
            // SAFETY: still single-threaded.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    drop(write);
                    let mut byte = [0u8; 1];
                    // EOF once the intermediate process (the only writer
                    // left) has exited.
                    while matches!(nix::unistd::read(&read, &mut byte), Ok(n) if n > 0) {}
                    line(&format!("grandchild exiting pid={}", std::process::id()));
                    // SAFETY: _exit is always safe; skip the parent's atexit work.
                    unsafe { libc::_exit(0) }
                }
                Ok(nix::unistd::ForkResult::Parent { child }) => {
                    line(&format!("orphaned pid={child}"));
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) }
                }
                Err(e) => {
                    eprintln!("sv_probe: fork: {e}");
                    // SAFETY: as above.
                    unsafe { libc::_exit(105) }
                }
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(read);
            drop(write);
            // Reap the intermediate process (ours); the grandchild now
            // belongs to the nearest subreaper or PID 1.
            let _ = nix::sys::wait::waitpid(child, None);
            signals(false)
        }
        Err(e) => {
            eprintln!("sv_probe: fork: {e}");
            std::process::exit(104);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["exit", n] => std::process::exit(n.parse().unwrap_or_else(|_| usage())),
        ["kill", n] => die_of(n.parse().unwrap_or_else(|_| usage())),
        ["signals"] => signals(false),
        ["signals", "--ignore-term"] => signals(true),
        ["orphan"] => orphan(),
        _ => usage(),
    }
}
