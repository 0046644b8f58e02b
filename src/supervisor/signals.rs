//! Signals as data: the supervisor blocks every signal it can and reads them
//! from a signalfd, as tini does.
//!
//! Blocked signals are queued, never ignored, so this also works as PID 1 of
//! a PID namespace, where the kernel drops signals that have the default
//! disposition. Children get an empty mask and default dispositions from
//! `sys::spawn`. Signals the kernel raises for a fault in the supervisor
//! itself (SIGSEGV, SIGBUS, ...) stay unblocked, and so does SIGPIPE, which
//! Rust ignores.

use std::io;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{siginfo, SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;

/// Signals left unblocked: faults of our own, job control of a terminal,
/// and SIGPIPE (ignored by the Rust runtime; a write error says it).
const UNBLOCKED: [Signal; 10] = [
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGABRT,
    Signal::SIGTRAP,
    Signal::SIGSYS,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGPIPE,
];

/// Blocks every signal but [`UNBLOCKED`] in the calling thread (threads
/// started later inherit the mask) and returns a signalfd that reads them.
/// Call it first, while the process has one thread.
pub(crate) fn block() -> io::Result<SignalFd> {
    let mut mask = SigSet::all();
    for signal in UNBLOCKED {
        mask.remove(signal);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?)
}

/// The signalfd, registered with Tokio.
pub(crate) struct Signals {
    fd: AsyncFd<SignalFd>,
}

impl Signals {
    /// Registers the signalfd from [`block`]; needs a runtime with I/O.
    pub(crate) fn new(fd: SignalFd) -> io::Result<Self> {
        let fd = crate::sys::async_fd(fd)?;
        Ok(Signals { fd })
    }

    /// Waits for signals and returns every one queued.
    pub(crate) async fn recv(&self) -> io::Result<Vec<siginfo>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut batch = Vec::new();
            loop {
                match guard.get_inner().read_signal() {
                    Ok(Some(info)) => batch.push(info),
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

/// The name of signal number `signo`: `SIGTERM`, `SIGRTMIN+3`.
pub(crate) fn name(signo: i32) -> String {
    if let Ok(signal) = Signal::try_from(signo) {
        return signal.as_str().to_owned();
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if (min..=max).contains(&signo) {
        if signo == min {
            return "SIGRTMIN".to_owned();
        }
        return format!("SIGRTMIN+{}", signo - min);
    }
    format!("signal {signo}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
        assert_eq!(name(libc::SIGRTMIN()), "SIGRTMIN");
        assert_eq!(name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
        assert_eq!(name(1000), "signal 1000");
    }
}
